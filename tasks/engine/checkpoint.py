"""Checkpoints: one item's outcome recorded in one prepared statement (``sql/checkpoint.sql``),
the failed-item ledger, and handing a batch back."""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta

import psycopg
from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from tasks import selectors
from tasks.engine.claims import Claim
from tasks.engine.common import NOTIFY_CHANNEL, lease_seconds, run_key
from tasks.engine.counters import (
    MAX_RECENT_ISSUES,
    budget_exceeded_by,
    budget_exhausted,
    run_item_cost,
)
from tasks.engine.items import item_record
from tasks.engine.queries import SQL, CheckpointRow
from tasks.models import AdminTaskItem, ItemState
from tasks.registry import ItemFailure, ItemOutcome, ItemResult, TaskDefinition

logger = logging.getLogger(__name__)

# How long clean items may wait on their batch row before they are folded into the run
# row (and announced by NOTIFY). Slow items fold at every checkpoint anyway.
FOLD_EVERY_S = 0.5

FAST_CHECKPOINT_SQL = SQL["fast_checkpoint"]
FOLD_ADVANCE_SQL = SQL["fold_advance"]
FOLD_DONE_SQL = SQL["fold_done"]
FOLD_RELEASE_SQL = SQL["fold_release"]
RELEASED = "released"  # the progress event's outcome when a batch is handed back


@dataclass
class Outcome:
    """How processing one item went, as the runner saw it."""

    kind: ItemOutcome  # SUCCEEDED | SKIPPED | FAILED | STOPPED (RETRY is the checkpoint's verdict)
    result: ItemResult | None = None
    failure: ItemFailure | None = None
    seconds: float = 0.0
    detail: dict | None = None  # batch runs: the definition's item_result for a success


@dataclass
class CheckpointState:
    status: str
    budget_reached: bool


def checkpoint(
    run_id: int,
    defn: TaskDefinition,
    owner: str,
    claim: Claim,
    item_id: int,
    outcome: Outcome,
    ledger_row: AdminTaskItem | None,
    last: bool,
) -> CheckpointState | None:
    """Record one item's outcome in one statement (one round trip, its own transaction
    unless a ledger row is written too). Returns the run's state, or None if the lease
    was lost, in which case nothing was written.

    A clean item takes the fast checkpoint (batch row only); anything the run row must
    show now (a failure, a ledger change, the batch's end, a lease renewal, a budget) or
    FOLD_EVERY_S since the last fold takes the folding one."""
    failure = outcome.failure
    counts = {"processed": 0, "succeeded": 0, "skipped": 0, "failed": 0}
    issue = None
    ledger_action = None
    reported = outcome.kind
    if failure is None:
        counts["processed"] = 1
        counts["succeeded" if outcome.kind == ItemOutcome.SUCCEEDED else "skipped"] = 1
        if claim.per_item:  # a batch run writes every item's verdict
            done = ItemState.SUCCEEDED if outcome.kind == ItemOutcome.SUCCEEDED else ItemState.SKIPPED
            ledger_action = (done, ledger_row.attempts if ledger_row else 0)
        elif ledger_row is not None:
            ledger_action = (ItemState.SUCCEEDED, 0)
    else:
        attempts = (ledger_row.attempts if ledger_row else 0) + (1 if failure.counts_attempt else 0)
        exhausted = not failure.retryable or attempts >= settings.PICSITE_ITEM_MAX_ATTEMPTS
        if exhausted:
            counts["processed"], counts["failed"] = 1, 1
            ledger_action = (ItemState.FAILED, attempts)
        else:
            ledger_action, reported = (ItemState.RETRYING, attempts), ItemOutcome.RETRY
        issue = {
            "item_id": item_id,
            "stage": failure.stage,
            "code": failure.code,
            "message": failure.message[:500],
            "attempt": attempts,
            "final": exhausted,
            "at": timezone.now().isoformat(),
        }
    result = outcome.result
    now = time.monotonic()
    # Renew once a quarter of the lease has passed: fewer row versions, same safety.
    renew = now >= claim.renew_after
    fast = (
        ledger_action is None
        and not last
        and not renew
        and not claim.budgeted
        and now - claim.folded_at < FOLD_EVERY_S
    )
    params = checkpoint_params(
        run_id,
        defn,
        owner,
        claim,
        **counts,
        items=1,
        renew=renew,
        seconds=outcome.seconds,
        bytes=result.bytes_written if result else 0,
        writes=result.objects_written if result else 0,
        issue=json.dumps(issue) if issue else None,
        item_id=item_id,
        outcome=str(reported),
        code=failure.code if failure else None,
    )
    sql = FAST_CHECKPOINT_SQL if fast else (FOLD_DONE_SQL if last else FOLD_ADVANCE_SQL)
    after = None
    if ledger_action and claim.per_item:
        after = lambda: _record_item(run_id, item_id, ledger_action, failure, outcome)  # noqa: E731
    elif ledger_action:
        after = lambda: write_ledger(run_id, item_id, ledger_action, failure)  # noqa: E731
    row = execute_checkpoint(sql, params, after=after)
    if row.status is None:
        return None
    claim.position += 1
    if not fast:
        claim.folded_at = now
    if renew:
        claim.renew_after = now + lease_seconds(defn) / 4
    b = (json.loads(row.budget) if isinstance(row.budget, str) else row.budget) or {}  # Django loads jsonb as text
    claim.budgeted = bool(b)
    if fast:
        if not b:
            return CheckpointState(row.status, False)
        # A budget was set since this batch was claimed: spent_* leave out the batches'
        # pending counters, so check against the live ones (from here on every item folds).
        run = selectors.run_get(run_id=run_id)
        cost = run_item_cost(run)
        return CheckpointState(
            row.status, budget_exhausted(run, cost["seconds"], cost["bytes"], cost["writes"]) is not None
        )
    spent = {
        "spent_items": row.spent_items, "spent_seconds": row.spent_seconds,
        "spent_bytes": row.spent_bytes, "spent_writes": row.spent_writes,
    }  # fmt: skip
    n = row.spent_items or 0
    per = (row.spent_seconds / n, row.spent_bytes / n, row.spent_writes / n) if n else (0, 0, 0)
    return CheckpointState(row.status, budget_exceeded_by(b, spent, *per) is not None)


def checkpoint_params(run_id: int, defn: TaskDefinition, owner: str, claim: Claim, **item) -> dict:
    """Parameters of a checkpoint statement; ``item`` overrides the no-item defaults."""
    return {
        "processed": 0, "succeeded": 0, "skipped": 0, "failed": 0, "items": 0,
        "seconds": 0.0, "bytes": 0, "writes": 0,
        "issue": None, "item_id": None, "code": None, "renew": False,
        "lock_id": defn.lock_id,
        "lease": lease_seconds(defn),
        "batch": claim.batch_id,
        "owner": owner,
        "position": claim.position,
        "run": run_id,
        "run_key": run_key(run_id),
        "max_issues": MAX_RECENT_ISSUES,
        "channel": NOTIFY_CHANNEL,
        **item,
    }


_STALE_PREPARED = (psycopg.errors.FeatureNotSupported, psycopg.errors.InvalidSqlStatementName)


def execute_checkpoint(sql: str, params: dict, *, after: Callable[[], None] | None = None) -> CheckpointRow:
    """Run a checkpoint statement, spinning briefly while another worker of the run holds
    the try-lock. ``after`` (ledger writes) runs in the same transaction when the
    statement matched the batch."""
    delay = 0.0005
    reprepared = False
    while True:
        try:
            with transaction.atomic() if after else nullcontext():  # alone, one statement is one transaction
                # A server-side-bound cursor so psycopg prepares these hot statements once per
                # connection (Django's client-side binding would re-plan them every item).
                connection.ensure_connection()
                with psycopg.Cursor(connection.connection) as cur:
                    cur.execute(sql, params, prepare=True)
                    row = CheckpointRow(*cur.fetchone())
                if row.locked and row.status is not None and after is not None:
                    after()
        except _STALE_PREPARED as exc:
            # A migration changed a column these statements return ("cached plan must not
            # change result type"), or the statement is gone (DISCARD ALL, a pooler):
            # nothing was written. Drop this connection's prepared statements and prepare
            # afresh, once.
            if reprepared:
                raise
            logger.warning("checkpoint statement re-prepared after: %s", exc)
            reprepared = True
            with psycopg.Cursor(connection.connection) as cur:
                cur.execute(SQL["deallocate_all"])
            continue
        if row.locked:
            return row
        time.sleep(delay * random.uniform(0.5, 1.5))
        delay = min(delay * 2, 0.05)


def write_ledger(run_id: int, item_id: int, action: tuple[ItemState, int], failure: ItemFailure | None) -> None:
    state, attempts = action
    if state == ItemState.SUCCEEDED:
        AdminTaskItem.objects.filter(run_id=run_id, item_id=item_id).update(
            state=ItemState.SUCCEEDED, claimed=False, next_attempt_at=None
        )
        return
    next_at = _next_attempt_at(state, attempts)
    AdminTaskItem.objects.update_or_create(
        run_id=run_id,
        item_id=item_id,
        defaults={
            "state": state,
            "attempts": attempts,
            "next_attempt_at": next_at,
            "claimed": False,
            "last_error_code": failure.code,
            "last_error_stage": failure.stage,
            "last_error_message": failure.message[:2000],
        },
    )


def _record_item(run_id: int, item_id: int, action: tuple[ItemState, int], failure: ItemFailure | None, outcome: Outcome) -> None:
    state, attempts = action
    next_at = _next_attempt_at(state, attempts)
    result = outcome.result
    item_record(
        run_id=run_id,
        item_id=item_id,
        state=state,
        attempts=attempts,
        next_attempt_at=next_at,
        failure=failure,
        seconds=outcome.seconds,
        bytes_written=result.bytes_written if result else 0,
        result=outcome.detail,
    )


def _next_attempt_at(state: ItemState, attempts: int):
    if state != ItemState.RETRYING:
        return None
    return timezone.now() + timedelta(seconds=backoff_seconds(max(attempts, 1)))


def backoff_seconds(attempts: int) -> float:
    base = settings.PICSITE_ITEM_RETRY_BASE_S * (2 ** max(attempts - 1, 0))
    capped = min(base, settings.PICSITE_ITEM_RETRY_CAP_S)
    return random.uniform(capped / 2, capped)  # "equal jitter"


def release_batch(run_id: int, defn: TaskDefinition, owner: str, claim: Claim) -> None:
    """Give the rest of a batch back (the next kick adopts it at once), folding its
    pending counters into the run. Does nothing if the lease was lost meanwhile."""
    params = checkpoint_params(run_id, defn, owner, claim, outcome=RELEASED)
    execute_checkpoint(FOLD_RELEASE_SQL, params)
