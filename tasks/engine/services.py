"""What callers ask of runs: create, budget, cancel, retry failed, resume; and the reads
that refuse with engine errors (list, detail). Each change holds the task's or the run's
advisory lock for one short transaction."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.db import IntegrityError, transaction
from django.utils import timezone

from tasks import selectors
from tasks.engine.common import definition, get_run, lock_task, locked_run, notify
from tasks.engine.counters import append_issue, budget_exhausted
from tasks.engine.errors import (
    EmptyScope,
    InvalidTransition,
    RunAlreadyActive,
    RunNotFound,
    StorageNotConfigured,
)
from tasks.engine.items import items_create
from tasks.engine.lifecycle import finish, transition
from tasks.engine.scope import normalize_budget, normalize_scope
from tasks.engine.webhooks import callback_url_check
from tasks.models import AdminTaskBatch, AdminTaskItem, AdminTaskRun, ItemState, RunKind, RunStatus
from tasks.registry import TaskUnavailable


def create(
    *, task_key: str, scope: Any = None, budget: Any = None, user=None, callback_url: str = ""
) -> AdminTaskRun:
    """Create a queued run. A scope of explicit ids makes a *batch* run (it coexists with
    other runs and keeps a row per requested id); anything else a *library* run (one active
    per task). Refuses with RunAlreadyActive, EmptyScope, StorageNotConfigured,
    InvalidCallback."""
    defn = definition(task_key)
    normalized = normalize_scope(task_key=task_key, scope=scope)
    clean_budget = normalize_budget(budget)
    callback = callback_url_check(callback_url) if callback_url else ""
    try:
        defn.check_available()
    except TaskUnavailable as exc:
        raise StorageNotConfigured(str(exc)) from exc
    ids = defn.batch_ids(normalized)
    with transaction.atomic():
        lock_task(defn)  # serializes creates of one task; the partial unique index is the backstop
        if ids is None:
            active = selectors.run_active(task_key=task_key)
            if active is not None:
                raise RunAlreadyActive(f"run #{active.pk} of {task_key} is {active.status}", details={"run_id": active.pk})
        qs = defn.scope_queryset(normalized)
        existing = set(qs.values_list("pk", flat=True)) if ids is not None else None
        total = len(existing) if existing is not None else qs.count()
        if total == 0:
            details = {"missing": ids} if ids is not None else {}
            raise EmptyScope(f"nothing to do: the scope {normalized} matches no items", details=details)
        run = AdminTaskRun(
            task_key=task_key,
            kind=RunKind.BATCH if ids is not None else RunKind.LIBRARY,
            scope=normalized,
            budget=clean_budget,
            total=total,
            missing=len(ids) - total if ids is not None else 0,
            max_item_id=max(existing) if existing is not None else qs.order_by("-pk").values_list("pk", flat=True).first(),
            callback_url=callback,
            created_by=user if getattr(user, "is_authenticated", False) else None,
        )
        try:
            transition(run, RunStatus.QUEUED, event="created")
        except IntegrityError:
            raise RunAlreadyActive(f"another run of {task_key} is active") from None
        if ids is not None:
            items_create(run=run, ids=ids, existing=existing)
    return run


def set_budget(*, run_id: int, budget: Any) -> AdminTaskRun:
    """Replace the budget; a run paused by its budget resumes if the new one allows."""
    clean = normalize_budget(budget)
    run = get_run(run_id)
    defn = definition(run.task_key)
    with transaction.atomic():
        run = locked_run(defn, run.pk)  # a claim deciding to pause the run holds this
        run.budget = clean
        if run.status == RunStatus.PAUSED and run.pause_reason == "budget" and not budget_exhausted(run, 1.0, 0):
            run.pause_reason = ""
            transition(run, RunStatus.QUEUED, fields=["budget", "pause_reason"])
        else:
            run.save(update_fields=["budget", "updated_at"])
            notify(run.pk, "status", status=run.status)
    return run


def cancel(*, run_id: int) -> AdminTaskRun:
    """Queued/paused runs, and runs with no live lease, are cancelled at once;
    otherwise the run goes to cancelling and each worker stops at its next check."""
    run = get_run(run_id)
    defn = definition(run.task_key)
    with transaction.atomic():
        run = locked_run(defn, run.pk)
        if run.status in RunStatus.finished():
            raise InvalidTransition(f"run #{run.pk} already {run.status}")
        if run.status in (RunStatus.QUEUED, RunStatus.PAUSED) or not selectors.run_has_live_batch(run=run):
            finish(run, RunStatus.CANCELLED)
        elif run.status != RunStatus.CANCELLING:
            transition(run, RunStatus.CANCELLING)
    return run


def retry_failed(*, run_id: int) -> AdminTaskRun:
    """Re-arm every item that ran out of attempts; a finished run is reopened."""
    run = get_run(run_id)
    defn = definition(run.task_key)
    with transaction.atomic():
        lock_task(defn)
        run = locked_run(defn, run.pk)
        failed_items = AdminTaskItem.objects.filter(run=run, state=ItemState.FAILED)
        n = failed_items.count()
        if n == 0:
            raise InvalidTransition(f"run #{run.pk} has no failed items to retry")
        if run.status == RunStatus.CANCELLING:
            raise InvalidTransition(f"run #{run.pk} is cancelling")
        reopen = run.status in RunStatus.finished()
        if reopen and run.kind == RunKind.LIBRARY:
            other = selectors.run_other_active(run=run)
            if other is not None:
                raise RunAlreadyActive(f"run #{other.pk} of {run.task_key} is active")
            run.finished_at = None
        failed_items.update(state=ItemState.RETRYING, attempts=0, next_attempt_at=timezone.now(), claimed=False)
        run.processed -= n
        run.failed -= n
        run.last_error = ""
        fields = ["finished_at", "processed", "failed", "last_error"]
        if reopen:
            transition(run, RunStatus.QUEUED, fields=fields)
        else:
            run.save(update_fields=[*fields, "updated_at"])
            notify(run.pk, "status", status=run.status)
    return run


def resume_paused(*, run_id: int) -> AdminTaskRun:
    """Resume a run paused for a reason its definition can probe (not a budget: that one
    resumes when the budget is raised). The probe runs outside any transaction."""
    run = get_run(run_id)
    defn = definition(run.task_key)
    reason = run.pause_reason
    if run.status != RunStatus.PAUSED or reason in ("", "budget") or defn.probe is None:
        return run
    if not defn.probe(reason):
        return run
    with transaction.atomic():
        run = locked_run(defn, run.pk)
        if run.status == RunStatus.PAUSED and run.pause_reason == reason:
            run.pause_reason = ""
            append_issue(run, {"stage": "run", "code": "resumed", "message": f"{reason} is over: resumed"})
            transition(run, RunStatus.QUEUED, fields=["pause_reason", "recent_issues"])
    return run


def resume_paused_runs(*, task_key: str) -> None:
    """Probe (with the definition's backoff) and resume every run of the task paused for a
    passing reason, e.g. the storage being back."""
    for paused in selectors.runs_paused_for_probe(task_key=task_key):
        resume_paused(run_id=paused.pk)


def release_worker_batches(*, run_id: int, owner: str) -> None:
    """Hand back every batch ``owner`` holds of the run (its lease ends now), so a cancel
    right after finishes at once instead of waiting for the lease."""
    AdminTaskBatch.objects.filter(run_id=run_id, lease_owner=owner).update(
        lease_expires_at=timezone.now() - timedelta(seconds=1)
    )


# --- reads that refuse ------------------------------------------------------------------------


# At most this many active runs are listed: the newest batch runs and the library run.
ACTIVE_LISTED_MAX = 100


def list_runs(*, task_key: str, limit: int = 10) -> dict:
    definition(task_key)
    return {
        "active": selectors.run_active(task_key=task_key),  # the library run (one at most)
        # Every active run, batches first (at most ACTIVE_LISTED_MAX: the newest batches).
        "active_runs": selectors.runs_active(task_key=task_key, limit=ACTIVE_LISTED_MAX),
        "recent": selectors.runs_recent(task_key=task_key, limit=limit),
    }


def detail(*, run_id: int, task_key: str | None = None) -> dict:
    run = get_run(run_id)
    if task_key is not None and run.task_key != task_key:
        raise RunNotFound(f"no {task_key} run with id {run_id}")
    return {
        "run": run,
        "items": selectors.run_items_not_succeeded(run=run, limit=200),
        "finishes": selectors.run_finishes(run=run),
    }


ITEMS_PAGE_MAX = 500


def items_page(*, run_id: int, task_key: str | None = None, state: str | None = None, after: int | None = None,
               limit: int = 100) -> dict:
    """One keyset page of a run's items. Batch runs keep a row per requested item
    (``bookkeeping`` "items", keyed by submission position); library runs only the ledger of
    items that failed at least once ("failures", keyed by item id). ``next`` is the
    ``after`` of the following page, None on the last one."""
    run = get_run(run_id)
    if task_key is not None and run.task_key != task_key:
        raise RunNotFound(f"no {task_key} run with id {run_id}")
    limit = max(1, min(limit, ITEMS_PAGE_MAX))
    rows = selectors.run_items_page(run=run, state=state, after=after, limit=limit + 1)
    more = len(rows) > limit
    rows = rows[:limit]
    batch = run.kind == RunKind.BATCH
    last = rows[-1] if rows else None
    return {
        "run": run,
        "bookkeeping": "items" if batch else "failures",
        "items": rows,
        "next": (last.position if batch else last.item_id) if more and last is not None else None,
    }
