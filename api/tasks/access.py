"""What a task route asks of its caller, and the one run a route may reach."""

from __future__ import annotations

from api.auth import Access
from api.schemas import MAX_BIGINT
from tasks import engine
from tasks.models import PERM_RUN_TASKS, PERM_VIEW_RUNS, AdminTaskRun

# Reading runs needs the admin's view permission (token scope read), changing them
# tasks.run_tasks (scope write); superusers hold every permission.
VIEW = Access(permission=PERM_VIEW_RUNS, scopes=("read",))
CONTROL = Access(permission=PERM_RUN_TASKS, scopes=("write",))
# A scheduler's token can be narrowed to "tick"; "write" covers it too, since it may
# already create and kick runs (so today's read+write tokens keep ticking).
TICK = Access(permission=PERM_RUN_TASKS, scopes=("tick", "write"))


def run_of_task(*, task_key: str, run_id: int) -> AdminTaskRun:
    """The run, if it exists and belongs to ``task_key`` (else the engine's 404)."""
    run = None
    if 0 < run_id <= MAX_BIGINT:
        run = AdminTaskRun.objects.select_related("created_by").filter(pk=run_id, task_key=task_key).first()
    if run is None:
        raise engine.RunNotFound(f"no {task_key} run with id {run_id}")
    return run
