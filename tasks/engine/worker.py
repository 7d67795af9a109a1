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
from tasks.engine.claims import claim_batch
from tasks.engine.common import definition, get_run, lease_seconds
from tasks.engine.errors import EmptyScope, RunAlreadyActive, StorageNotConfigured
from tasks.engine.lifecycle import fail_run, settle
from tasks.engine.queries import SQL
from tasks.engine.runner import ItemRunner, work_batch
from tasks.engine.services import create, resume_paused_runs
from tasks.models import AdminTaskRun
from tasks.registry import RunFatal

logger = logging.getLogger(__name__)


def tick(
    *,
    task_key: str,
    time_budget_s: float | None = None,
    owner: str | None = None,
    create_if_idle: bool = False,
) -> AdminTaskRun | None:
    """Kick the oldest runnable run of ``task_key`` (if any) and return it.

    ``create_if_idle`` (serverless deployments, where no per-upload job runs) first
    starts a default-scope run when none is active and the scope is not empty.
    """
    defn = definition(task_key)
    resume_paused_runs(task_key=task_key)
    run = selectors.run_to_kick(task_key=task_key)
    if run is None and create_if_idle and defn.idle_scope is not None:
        try:
            run = create(task_key=task_key, scope=defn.idle_scope)
        except (EmptyScope, RunAlreadyActive, StorageNotConfigured):
            run = None
    if run is None:
        return None
    return kick(run_id=run.pk, time_budget_s=time_budget_s, owner=owner)


def kick(
    *,
    run_id: int,
    time_budget_s: float | None = None,
    owner: str | None = None,
    max_batches: int | None = None,
) -> AdminTaskRun:
    """Work on a run until it ends, there is nothing to claim, or the time budget is used.

    Safe to call from any number of processes at once; returns the run as it is now.
    """
    run = get_run(run_id)
    defn = definition(run.task_key)
    owner = owner or worker_owner()
    deadline = time.monotonic() + time_budget_s if time_budget_s else None
    worker = ItemRunner()
    heartbeat = Heartbeat(run_id, owner, lease_seconds(defn))
    batches = 0
    try:
        while deadline is None or time.monotonic() < deadline:
            claim = claim_batch(run_id, defn, owner)
            if claim is None:
                break
            batches += 1
            if not work_batch(run_id, defn, owner, claim, deadline, worker, run.scope):
                break
            if max_batches is not None and batches >= max_batches:
                break
    except RunFatal as exc:
        fail_run(run_id, defn, str(exc))
    finally:
        heartbeat.stop()
        worker.close()
    settle(run_id, defn)
    return get_run(run_id)


def worker_owner() -> str:
    """A lease owner that says who holds a batch: host, process id and a random part (one
    process may run several kicks)."""
    return f"{socket.gethostname()[:30]}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


class Heartbeat:
    """Renews this worker's batch leases every lease/6 seconds on its own thread (and its
    own connection) for as long as the worker lives, so liveness does not depend on how long
    an item takes and a crashed worker's batch is free within one short lease."""

    def __init__(self, run_id: int, owner: str, lease_s: float):
        self.run_id, self.owner, self.lease_s = run_id, owner, lease_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="task-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        params = {"lease": self.lease_s, "run": self.run_id, "owner": self.owner}
        try:
            while not self._stop.wait(self.lease_s / 6):
                try:
                    with connection.cursor() as cur:
                        cur.execute(SQL["renew_leases"], params)
                except DatabaseError:  # the next beat tries again on a fresh connection
                    logger.warning("lease heartbeat of run %s failed", self.run_id, exc_info=True)
                    connection.close()
        finally:
            connection.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
