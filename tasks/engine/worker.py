"""A worker's loop: ``kick`` works one run until it ends, nothing is claimable or its
time is up; ``tick`` picks the run to kick. Every driver (queue jobs, the push tick, the
admin page, the CLI) comes down to these."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid

from django.db import DatabaseError, connection

from tasks import selectors
from tasks.engine.claims import Claim, claim_batch
from tasks.engine.common import definition, get_run, lease_seconds
from tasks.engine.errors import EmptyScope, RunAlreadyActive, StorageNotConfigured
from tasks.engine.finishes import finishes_process
from tasks.engine.lifecycle import fail_run, settle
from tasks.engine.queries import SQL
from tasks.engine.runner import ItemRunner, over_memory_bound, work_batch
from tasks.engine.services import create, resume_paused_runs
from tasks.models import AdminTaskRun
from tasks.registry import RunFatal, TaskDefinition

logger = logging.getLogger(__name__)


def tick(
    *,
    task_key: str,
    time_budget_s: float | None = None,
    owner: str | None = None,
    create_if_idle: bool = False,
) -> AdminTaskRun | None:
    """Kick the runs of ``task_key`` that have work — batch runs first, then the library
    run — within ``time_budget_s`` in all, and return the last one kicked.

    ``create_if_idle`` (serverless deployments, where no per-upload job runs) first
    starts a default-scope run when none is active and the scope is not empty.
    """
    defn = definition(task_key)
    resume_paused_runs(task_key=task_key)
    runs = selectors.runs_to_kick(task_key=task_key)
    if not runs and create_if_idle and defn.idle_scope is not None:
        try:
            runs = [create(task_key=task_key, scope=defn.idle_scope)]
        except (EmptyScope, RunAlreadyActive, StorageNotConfigured):
            runs = []
    deadline = time.monotonic() + time_budget_s if time_budget_s else None
    kicked = None
    for run in runs:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            break
        kicked = kick(run_id=run.pk, time_budget_s=left, owner=owner)
    return kicked


def kick(
    *,
    run_id: int,
    time_budget_s: float | None = None,
    owner: str | None = None,
    max_batches: int | None = None,
) -> AdminTaskRun:
    """Work on a run until it ends, there is nothing to claim, or the time budget is used.
    Between batches the worker serves runnable *batch* runs first (any task), so a small
    batch is never stuck behind a long backfill.

    Safe to call from any number of processes at once; returns the run as it is now.
    """
    run = get_run(run_id)
    defn = definition(run.task_key)
    owner = owner or worker_owner()
    deadline = time.monotonic() + time_budget_s if time_budget_s else None
    worker = ItemRunner()
    heartbeat = Heartbeat(owner, lease_seconds(defn))
    touched: dict[int, TaskDefinition] = {run_id: defn}
    batches = 0
    try:
        while deadline is None or time.monotonic() < deadline:
            target = _next_claim(run, defn, owner)
            if target is None:
                break
            target_run, target_defn, claim = target
            touched[target_run.pk] = target_defn
            batches += 1
            try:
                go_on = work_batch(target_run.pk, target_defn, owner, claim, deadline, worker, target_run.scope)
            except RunFatal as exc:
                fail_run(target_run.pk, target_defn, str(exc))
                go_on = target_run.pk != run_id
            if target_run.pk != run_id:
                # A batch run served between our own batches ends now, not when we stop.
                settle(target_run.pk, target_defn)
                finishes_process(run_id=target_run.pk)
            if not go_on and (target_run.pk == run_id or not _may_go_on(deadline)):
                break
            if max_batches is not None and batches >= max_batches:
                break
    finally:
        heartbeat.stop()
        worker.close()
    for touched_id, touched_defn in touched.items():
        settle(touched_id, touched_defn)
        finishes_process(run_id=touched_id)  # an ended run's hook and callback, at once
    return get_run(run_id)


def _next_claim(run: AdminTaskRun, defn: TaskDefinition, owner: str) -> tuple[AdminTaskRun, TaskDefinition, Claim] | None:
    """A batch of a runnable batch run (oldest first), else of ``run`` itself. A run whose
    claim finds it cannot go on at all (RunFatal) fails; for ``run`` itself that ends the kick."""
    for batch_run_id, task_key in selectors.batch_run_ids_runnable(exclude=run.pk):
        batch_defn = definition(task_key)
        try:
            claim = claim_batch(batch_run_id, batch_defn, owner)
        except RunFatal as exc:
            fail_run(batch_run_id, batch_defn, str(exc))
            continue
        if claim is not None:
            return get_run(batch_run_id), batch_defn, claim
    try:
        claim = claim_batch(run.pk, defn, owner)
    except RunFatal as exc:
        fail_run(run.pk, defn, str(exc))
        return None
    return (run, defn, claim) if claim is not None else None


def _may_go_on(deadline: float | None) -> bool:
    """After another run's batch stopped early: go on with our own unless time or memory is out."""
    return (deadline is None or time.monotonic() < deadline) and not over_memory_bound()


def worker_owner() -> str:
    """A lease owner that says who holds a batch: host, process id and a random part (one
    process may run several kicks)."""
    return f"{socket.gethostname()[:30]}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


class Heartbeat:
    """Renews this worker's batch leases every lease/6 seconds on its own thread (and its
    own connection) for as long as the worker lives, so liveness does not depend on how long
    an item takes and a crashed worker's batch is free within one short lease."""

    def __init__(self, owner: str, lease_s: float):
        self.owner, self.lease_s = owner, lease_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="task-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        params = {"lease": self.lease_s, "owner": self.owner}
        try:
            while not self._stop.wait(self.lease_s / 6):
                try:
                    with connection.cursor() as cur:
                        cur.execute(SQL["renew_leases"], params)
                except DatabaseError:  # the next beat tries again on a fresh connection
                    logger.warning("lease heartbeat of %s failed", self.owner, exc_info=True)
                    connection.close()
        finally:
            connection.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
