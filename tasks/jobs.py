"""django-q2 drivers: thin adapters over the engine.

- ``start_run_drains`` (called on create/kick from the admin or API) enqueues
  ``drain_run_job`` N times on the *backfill* cluster, after commit;
- ``drain_run_job`` kicks for one time slice and re-enqueues itself while the run
  is runnable, so one long run never pins a worker;
- ``tick_all_job`` runs on a django-q2 schedule: a batch whose lease ran out (its worker
  died) is adopted at once, and runs paused for a passing reason are probed.
"""

from __future__ import annotations

import logging
import time

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from dispatch.django_q2 import enqueue_many
from dispatch.qstash import dispatch_is_qstash
from dispatch.queues import BACKFILL_QUEUE
from tasks import engine, registry, selectors
from tasks.models import AdminTaskRun, RunStatus
from tasks.push import push_run_start

logger = logging.getLogger(__name__)

DRAIN_FUNC = "tasks.jobs.drain_run_job"


def start_run_drains(*, run_id: int, parallelism: int | None = None) -> None:
    """Hand the run to whoever works it: N drain jobs (workers), or, with
    PICSITE_DISPATCH=qstash, its first window of QStash messages."""
    if dispatch_is_qstash():
        push_run_start(run_id=run_id)
        return
    n = parallelism or settings.PICSITE_DRAIN_PARALLELISM
    transaction.on_commit(lambda: enqueue_many(DRAIN_FUNC, [(run_id,)] * n, cluster=BACKFILL_QUEUE))


def drain_run_job(run_id: int) -> str:
    slice_end = time.monotonic() + settings.PICSITE_DRAIN_SLICE_S
    while True:
        try:
            run = engine.kick(run_id=run_id, time_budget_s=max(slice_end - time.monotonic(), 0.01))
        except engine.RunNotFound:
            return "gone"
        if run.status not in RunStatus.runnable():
            return run.status
        if selectors.run_has_claimable_work(run=run):
            enqueue_many(DRAIN_FUNC, [(run_id,)], cluster=BACKFILL_QUEUE)
            return "continued"
        # Nothing to claim now (retries with a future backoff are left to the schedule's
        # tick). Wait (within this slice) for whatever comes first: a retry whose backoff
        # ends, or the lease of another worker's batch running out (if that worker died, we
        # adopt its batch; if it lives, its heartbeat moved the lease on).
        waits = [selectors.run_next_retry_at(run=run), selectors.run_next_lease_expiry(run=run)]
        due = min((w for w in waits if w is not None), default=None)
        if due is None:
            return run.status
        wait = (due - timezone.now()).total_seconds() + 0.05
        if time.monotonic() + wait >= slice_end:
            return "waiting"  # the scheduled tick resumes it
        time.sleep(max(wait, 0.01))


def tick_all_job() -> dict:
    """Adopt runs whose workers died, resume runs waiting on retry backoff, and
    probe runs paused for a reason that can pass (a storage outage)."""
    started = {}
    for defn in registry.all_definitions():
        engine.resume_paused_runs(task_key=defn.key)  # e.g. the storage is back
        runs = selectors.runs_to_kick(task_key=defn.key)  # batch runs first
        if not runs and (rescue := _start_rescue_run(defn)) is not None:
            runs = [rescue]
        for run in runs:
            # Kick when a batch's lease ran out (its worker died: adopt it now, even while
            # other workers are live) or when no worker holds the run at all.
            now = timezone.now()
            if selectors.run_has_live_batch(run=run, now=now) and not selectors.run_has_expired_batch(run=run, now=now):
                continue
            run = engine.kick(run_id=run.pk, time_budget_s=min(settings.PICSITE_DRAIN_SLICE_S, 20))
            if run.status in RunStatus.runnable():
                enqueue_many(DRAIN_FUNC, [(run.pk,)], cluster=BACKFILL_QUEUE)
            started[defn.key if defn.key not in started else f"{defn.key}#{run.pk}"] = run.status
    engine.finishes_process()  # on_finish hooks and callbacks that are due (retries, crashes)
    return started


def _start_rescue_run(defn: registry.TaskDefinition) -> AdminTaskRun | None:
    """Start the definition's rescue run when items waited too long for their own work and
    no run of the task is active (a paused or cancelling one blocks it too)."""
    scope = defn.rescue_scope() if defn.rescue_scope else None
    if scope is None:
        return None
    try:
        run = engine.create(task_key=defn.key, scope=scope)
    except (engine.RunAlreadyActive, engine.EmptyScope, engine.StorageNotConfigured):
        return None
    logger.warning("started run #%s of %s for items that waited too long: %s", run.pk, defn.key, scope)
    return run


def ensure_tick_schedule() -> None:
    """Create (or fix) the django-q2 schedule that runs ``tick_all_job`` (not with
    PICSITE_DISPATCH=qstash: nothing would run it; QStash or Vercel Cron call the tick)."""
    from django_q.models import Schedule

    if dispatch_is_qstash():
        return

    Schedule.objects.update_or_create(
        name="picsite-task-tick",
        defaults={
            "func": "tasks.jobs.tick_all_job",
            "schedule_type": Schedule.MINUTES,
            "minutes": settings.PICSITE_TICK_SCHEDULE_MINUTES,
            "repeats": -1,
        },
    )
