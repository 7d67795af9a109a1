"""A run's status: the transition table, the one function that writes status, and the
engine's ways to a status (pause, settle, finish, fail).

Every status write goes through ``transition``. The checkpoint statements
(``sql/checkpoint.sql``) read the status and never write it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from django.db import connection, transaction
from django.utils import timezone

from tasks import selectors
from tasks.engine.common import locked_run, notify, try_lock_run
from tasks.engine.counters import append_issue, fold_pending
from tasks.engine.errors import InvalidTransition
from tasks.engine.finishes import finish_record
from tasks.engine.queries import SQL, PendingCounters
from tasks.models import AdminTaskItem, AdminTaskRun, ItemState, RunStatus
from tasks.registry import ItemFailure, TaskDefinition

logger = logging.getLogger(__name__)

S = RunStatus
# From -> the statuses a run may go to (None: a run being created).
TRANSITIONS: dict[str | None, frozenset[str]] = {
    None: frozenset({S.QUEUED}),  # create
    # running: the first claim; paused: a budget or an outage; succeeded: nothing left;
    # cancelled: cancel with no live lease; failed: RunFatal
    S.QUEUED: frozenset({S.RUNNING, S.PAUSED, S.SUCCEEDED, S.CANCELLED, S.FAILED}),
    # cancelling: cancel while a batch lease is live
    S.RUNNING: frozenset({S.PAUSED, S.SUCCEEDED, S.CANCELLING, S.CANCELLED, S.FAILED}),
    # queued: the budget raised, or the outage over (resume)
    S.PAUSED: frozenset({S.QUEUED, S.CANCELLED, S.FAILED}),
    # cancelled: the last live lease is gone
    S.CANCELLING: frozenset({S.CANCELLED, S.FAILED}),
    # queued: "retry failed" reopens the run
    S.SUCCEEDED: frozenset({S.QUEUED}),
    S.FAILED: frozenset({S.QUEUED}),
    S.CANCELLED: frozenset({S.QUEUED}),
}

TIMELINE_MAX_POINTS = 720


def transition(
    run: AdminTaskRun, to: RunStatus, *, fields: Iterable[str] = (), event: str = "status", **payload: Any
) -> None:
    """Move ``run`` to ``to``: check the table, save the status with ``fields`` (set on
    ``run`` by the caller) in one write (an insert for a new run), and NOTIFY ``event``
    with the status and ``payload``. The caller holds the run's lock (or the task's, for
    a create). A move the table does not allow raises InvalidTransition, writing nothing."""
    current = None if run._state.adding else run.status
    if to not in TRANSITIONS[current]:
        raise InvalidTransition(
            f"run #{run.pk}: {current or '(new)'} -> {to} is not a transition", details={"from": current, "to": to}
        )
    run.status = to
    if current is None:
        run.save()
    else:
        run.save(update_fields=["status", *fields, "updated_at"])
    notify(run.pk, event, status=to, **payload)


def pause(run: AdminTaskRun, reason: str, *, detail: str, stage: str = "budget") -> None:
    """Pause a runnable run (the caller holds the run's lock). Unfinished batches stay,
    handed back; they are adopted when the run resumes."""
    run.pause_reason = reason
    run.lease_owner, run.lease_expires_at = "", None
    append_issue(run, {"stage": stage, "code": reason, "message": detail})
    transition(
        run, RunStatus.PAUSED, fields=["pause_reason", "lease_owner", "lease_expires_at", "recent_issues"], reason=reason
    )
    run.batches.update(lease_expires_at=timezone.now())


def pause_for(run_id: int, defn: TaskDefinition, failure: ItemFailure) -> None:
    """An item failed for a reason that is not its own (``failure.pause_run``, e.g. the
    storage is down): pause the run until the definition's probe says it can go on."""
    with transaction.atomic():
        run = locked_run(defn, run_id)
        if run.status not in RunStatus.runnable():
            return  # already paused (another worker saw it first), cancelling or ended
        logger.warning("run %s paused (%s): %s", run_id, failure.pause_run, failure.message)
        pause(run, failure.pause_run, detail=f"paused until it can go on: {failure.message[:400]}", stage=failure.stage)


def settle(run_id: int, defn: TaskDefinition) -> None:
    """Finish the run if nothing is left: success, or cancelled after a cancel request."""
    with transaction.atomic():
        if not try_lock_run(defn, run_id, wait_s=0.2):
            return  # another worker is mid-checkpoint and will settle after us
        settle_locked(AdminTaskRun.objects.get(pk=run_id))


def settle_locked(run: AdminTaskRun) -> None:
    """``settle`` for a caller that holds the run's lock already (a push window)."""
    if run.status == RunStatus.CANCELLING:
        if not selectors.run_has_live_batch(run=run):
            finish(run, RunStatus.CANCELLED)
        return
    if run.status in RunStatus.runnable() and not selectors.run_has_work_left(run=run):
        finish(run, RunStatus.SUCCEEDED)


def fail_run(run_id: int, defn: TaskDefinition, message: str) -> None:
    """RunFatal: the run fails with ``message`` as its error (unless it already ended)."""
    logger.error("run %s failed: %s", run_id, message)
    with transaction.atomic():
        run = locked_run(defn, run_id)  # waits out any checkpoint in flight
        if run.status in RunStatus.finished():
            return
        append_issue(run, {"stage": "run", "code": "run_failed", "message": message[:500]})
        finish(run, RunStatus.FAILED, error=message, fields=["recent_issues"])


def finish(run: AdminTaskRun, status: RunStatus, *, error: str = "", fields: Iterable[str] = ()) -> None:
    """End the run (the caller holds its lock): fold and end its batches, top up a success
    with the items that left the scope, stamp the timeline."""
    run.finished_at = timezone.now()
    run.lease_owner, run.lease_expires_at = "", None
    fields = [*fields, "finished_at", "lease_owner", "lease_expires_at", "timeline"]
    fields += fold_pending(run, end_batches(run, park_fresh=status != RunStatus.SUCCEEDED))
    if status == RunStatus.SUCCEEDED and run.processed != run.total:
        # Items that left the scope before their turn (deleted, or made ready by an
        # upload's own job) were never handed out: count them as skipped.
        gap = run.total - run.processed
        if gap > 0:
            run.skipped += gap
            run.processed += gap
            append_issue(run, {"stage": "scope", "code": "left_scope", "message": f"{gap} items left the scope during the run"})
            fields += ["skipped", "processed", "recent_issues"]
        else:
            run.total = run.processed
            fields.append("total")
    if error:
        run.last_error = error[:2000]
        fields.append("last_error")
    run.timeline = [*(run.timeline or []), [round(time.time(), 1), run.processed]][-TIMELINE_MAX_POINTS:]
    run.finish_seq += 1  # this terminal transition's record, written in the same transaction
    fields.append("finish_seq")
    transition(run, status, fields=dict.fromkeys(fields), error=error or None)
    finish_record(run)
    if status != RunStatus.SUCCEEDED:
        AdminTaskItem.objects.filter(run=run, state=ItemState.RETRYING).update(claimed=False)


def end_batches(run: AdminTaskRun, *, park_fresh: bool) -> list[PendingCounters]:
    """End every batch of ``run`` and return their pending counters. Called with the run's
    lock held, so no checkpoint races it.

    With ``park_fresh`` (cancel, failure) fresh batches stay, parked with no owner and an
    expired lease: their ids are past the cursor, so if "retry failed" reopens the run it
    adopts them instead of skipping them. Retry batches always go: their items are back
    in the ledger (``finish`` unclaims them)."""
    with connection.cursor() as cur:
        cur.execute(SQL["end_batches"], {"run": run.pk, "park": park_fresh})
        return [PendingCounters(*row) for row in cur.fetchall()]
