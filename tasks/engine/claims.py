"""Claims: a worker takes a batch of a run under its own lease, in one short transaction
holding the run's try-lock. In order: a batch whose lease ran out (its worker died or
handed it back), fresh ids after the run's keyset cursor, then retries whose backoff has
passed."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.db import connection, transaction
from django.db.models import F, OrderBy
from django.utils import timezone

from tasks import selectors
from tasks.engine.common import lease_seconds, try_lock_run
from tasks.engine.counters import budget_exhausted, budget_figures, live_counters, run_item_cost
from tasks.engine.lifecycle import TIMELINE_MAX_POINTS, pause, transition
from tasks.engine.queries import SQL, AdoptedBatch
from tasks.models import AdminTaskBatch, AdminTaskItem, AdminTaskRun, RunKind, RunStatus
from tasks.registry import RunFatal, TaskDefinition, TaskUnavailable

TIMELINE_EVERY_S = 5


@dataclass
class Claim:
    """A batch this worker holds: its item ids and how far its checkpoints got."""

    batch_id: int
    item_ids: list[int]
    position: int
    is_retry: bool
    # The claim just set a full lease; checkpoints renew it after a quarter has passed.
    renew_after: float = field(default_factory=lambda: time.monotonic())
    # When this worker last folded the batch's pending counters into the run row.
    folded_at: float = field(default_factory=lambda: time.monotonic())
    # The run has a budget: every checkpoint folds, so spent_* are exact for the checks.
    budgeted: bool = False
    # A batch run: every item has a row whose state each checkpoint writes (with an event).
    per_item: bool = False


def claim_batch(run_id: int, defn: TaskDefinition, owner: str) -> Claim | None:
    """Claim a batch of the run for ``owner``, or None: nothing to claim, the run is not
    runnable (or was just paused on its budget), or its lock stayed taken."""
    lease = timedelta(seconds=lease_seconds(defn))
    with transaction.atomic():
        if not try_lock_run(defn, run_id):
            return None
        run = AdminTaskRun.objects.get(pk=run_id)
        if run.status not in RunStatus.runnable():
            return None
        try:
            defn.check_available()
        except TaskUnavailable as exc:
            raise RunFatal(str(exc)) from exc
        defn.preflight()
        now = timezone.now()
        per = run_item_cost(run)
        reason = budget_exhausted(run, per["seconds"], per["bytes"], per["writes"])
        if reason:
            pause(run, "budget", detail=budget_figures(run, reason, per))
            return None
        renew_after = time.monotonic() + lease.total_seconds() / 4

        adopted = _adopt_expired_batch(run_id, owner, now=now, expires=now + lease)
        if adopted is not None:
            take_run_lease(run, owner, now + lease)
            ids = adopted.item_ids if isinstance(adopted.item_ids, list) else json.loads(adopted.item_ids)
            return Claim(
                adopted.id, ids, adopted.position, adopted.is_retry, renew_after=renew_after,
                budgeted=bool(run.budget), per_item=run.kind == RunKind.BATCH,
            )  # fmt: skip

        limit = defn.batch_size
        if "items" in (run.budget or {}):
            # Items other workers already hold count against the budget too.
            left = run.budget["items"] - live_counters(run)["spent_items"] - held_items(run_id)
            if left <= 0:
                return None  # the rest of the budget is held by live batches: not a pause
            limit = min(limit, left)
        # Fresh ids after the cursor (keyset, never OFFSET); the scope is frozen at max_item_id.
        ids = list(selectors.run_unclaimed_items(run=run).order_by(keyset_order(run)).values_list("pk", flat=True)[:limit])
        is_retry = False
        if not ids:
            ids = selectors.run_due_retry_ids(run_id=run_id, now=now, limit=limit)
            if ids:
                AdminTaskItem.objects.filter(run_id=run_id, item_id__in=ids).update(claimed=True)
                is_retry = True
        if not ids:
            return None
        batch = AdminTaskBatch.objects.create(
            run_id=run_id, item_ids=ids, is_retry=is_retry, lease_owner=owner, lease_expires_at=now + lease
        )
        if not is_retry:
            run.cursor = ids[-1]
        take_run_lease(run, owner, now + lease, save_cursor=not is_retry)
        return Claim(
            batch.pk, ids, 0, is_retry, renew_after=renew_after, budgeted=bool(run.budget), per_item=run.kind == RunKind.BATCH
        )


def _adopt_expired_batch(run_id: int, owner: str, *, now: datetime, expires: datetime) -> AdoptedBatch | None:
    with connection.cursor() as cur:
        cur.execute(SQL["adopt_expired_batch"], {"owner": owner, "expires": expires, "run": run_id, "now": now})
        row = cur.fetchone()
    return None if row is None else AdoptedBatch(*row)


def held_items(run_id: int) -> int:
    """Items handed to batches of the run and not yet checkpointed."""
    with connection.cursor() as cur:
        cur.execute(SQL["held_items"], {"run": run_id})
        return int(cur.fetchone()[0])


def keyset_order(run: AdminTaskRun) -> str | OrderBy:
    """Order for the next-batch query.

    Dense scopes walk the primary key. When what is left is sparse in the id range
    left to walk (say 3,000 new uploads at the end of a 1M-row library), an
    ORDER BY pk walk would filter out everything before them on each claim; ``pk + 0``
    makes Postgres combine the scope's partial indexes and top-N sort the few matches.
    """
    left = max(run.total - run.processed, 1)
    span = max(run.max_item_id - run.cursor, 1)
    return "pk" if left * 20 >= span else (F("pk") + 0).asc()


def take_run_lease(run: AdminTaskRun, owner: str, expires: datetime, *, save_cursor: bool = False) -> None:
    """Record the claim on the run row: its latest lease, a timeline sample, the start
    (queued -> running) and, for fresh ids, the moved cursor."""
    fields = ["lease_owner", "lease_expires_at"]
    run.lease_owner, run.lease_expires_at = owner, expires
    # Progress samples [unix time, processed] for the throughput chart, one per 5 s at most.
    now_ts = time.time()
    points = list(run.timeline or [])
    if not points or now_ts - points[-1][0] >= TIMELINE_EVERY_S:
        points.append([round(now_ts, 1), run.processed])
        run.timeline = points[-TIMELINE_MAX_POINTS:]
        fields.append("timeline")
    if run.started_at is None:
        run.started_at = timezone.now()
        fields.append("started_at")
    if save_cursor:
        fields.append("cursor")
    if run.status == RunStatus.QUEUED:
        transition(run, RunStatus.RUNNING, fields=fields)
    else:
        run.save(update_fields=[*fields, "updated_at"])
