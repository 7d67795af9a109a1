"""Push-driven work (a push service such as QStash delivers one item per request): the same
claims, processor, checkpoint, ledger and finish as a worker's kick, one item at a time.

In-flight state is the engine's own batch table: publishing an item *claims* it into a
one-item ``AdminTaskBatch`` whose lease owner is ``push:<generation>`` and whose lease is the
in-flight timeout. So the run's cursor moves at publish (no item is published twice), live
counters and ``held_items`` see it, ``settle`` never finishes a run with messages in flight,
and a message lost in flight shows up as an expired push batch, which the next window
republishes under a new generation. The delivery takes the batch over under its own lease
(any generation may: the first to come wins, later copies find no batch and are
duplicates), then works it exactly as ``runner.work_batch`` works any batch.

Retries stay in the ledger: a retryable failure is recorded (``AdminTaskItem``, retrying,
``next_attempt_at``). Windows take retries as items too: due ones first, then fresh ids,
then retries still in their backoff, published with QStash's not-before at
``next_attempt_at`` (their batch's lease runs from then). So a retry is published once,
and "never more than N in flight" counts every published, unchecked item.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db import transaction
from django.utils import timezone

from tasks import selectors
from tasks.engine.claims import Claim, held_items, keyset_order, take_run_lease
from tasks.engine.common import definition, get_run, lease_seconds, lock_run
from tasks.engine.counters import budget_exhausted, budget_figures, live_counters, run_item_cost
from tasks.engine.finishes import finishes_process
from tasks.engine.lifecycle import fail_run, pause, settle, settle_locked
from tasks.engine.runner import ItemRunner, work_batch
from tasks.engine.worker import Heartbeat, worker_owner
from tasks.models import AdminTaskBatch, AdminTaskItem, AdminTaskRun, ItemState, RunKind, RunStatus
from tasks.registry import RunFatal, TaskDefinition, TaskUnavailable

logger = logging.getLogger(__name__)

PUSH_OWNER_PREFIX = "push:"
# A retry delivered this early (QStash's clock ahead of ours) still counts as due.
RETRY_CLOCK_TOLERANCE_S = 5


@dataclass(frozen=True)
class PushItem:
    """One item to publish: its run, id, attempts so far, the publish generation (part of
    the deduplication id, so a deliberate republish is not swallowed) and when to deliver."""

    run_id: int
    item_id: int
    attempts: int
    generation: str
    not_before: datetime | None = None

    @property
    def deduplication_id(self) -> str:
        return f"run-{self.run_id}-item-{self.item_id}-attempt-{self.attempts}-gen-{self.generation}"


@dataclass(frozen=True)
class ItemDelivery:
    """What one delivery did: ``processed`` (and the item's state after it), ``duplicate``
    (already done or held by another delivery), or ``not_runnable``; ``retry_at`` is when the
    item, failed, will be tried again (a window publishes that attempt for that time)."""

    outcome: str
    run_status: str
    state: str | None = None
    retry_at: datetime | None = None


def _generation() -> str:
    return uuid.uuid4().hex[:12]


def _push_owner(generation: str) -> str:
    return f"{PUSH_OWNER_PREFIX}{generation}"


def run_window_claim(*, run_id: int, window: int, inflight_timeout_s: float) -> list[PushItem]:
    """Claim what to publish for the run so that at most ``window`` items are in flight
    (published and not yet checkpointed): push batches whose lease ran out (lost messages, or
    handed back by a pause), due retries, fresh ids after the cursor, then retries still in
    their backoff (``not_before``). Each gets a one-item batch under a push lease."""
    run = get_run(run_id)
    defn = definition(run.task_key)
    now = timezone.now()
    expires = now + timedelta(seconds=inflight_timeout_s)
    with transaction.atomic():
        lock_run(defn, run_id)  # waits: a window must not be skipped because a checkpoint was busy
        run = AdminTaskRun.objects.get(pk=run_id)
        claimed = _window_claim_locked(run, defn, window=window, now=now, expires=expires, timeout=inflight_timeout_s)
        if not claimed:
            # A delivery's own settle gives up when the lock is busy (say, with this window):
            # whoever holds the lock last with nothing left to hand out ends the run.
            settle_locked(run)
    return claimed


def _window_claim_locked(
    run: AdminTaskRun, defn: TaskDefinition, *, window: int, now: datetime, expires: datetime, timeout: float
) -> list[PushItem]:
    run_id, inflight_timeout_s = run.pk, timeout
    claimed: list[PushItem] = []
    if run.status not in RunStatus.runnable():
        return []
    try:
        defn.check_available()
    except TaskUnavailable:
        return []  # the first delivery fails the run (RunFatal), as a worker's claim does
    per = run_item_cost(run)
    reason = budget_exhausted(run, per["seconds"], per["bytes"], per["writes"])
    if reason:
        pause(run, "budget", detail=budget_figures(run, reason, per))
        return []
    room = window - AdminTaskBatch.objects.filter(run=run, lease_expires_at__gt=now).count()
    # 1. Lost or handed back: expired batches with one item left (a worker's longer
    #    batch is adopted by the next kick, as it always was).
    for batch in AdminTaskBatch.objects.select_for_update(skip_locked=True).filter(run=run, lease_expires_at__lte=now).order_by("id")[: max(room, 0) * 4]:
        if room <= 0:
            break
        if len(batch.item_ids) - batch.position != 1:
            continue
        gen = _generation()
        batch.lease_owner, batch.lease_expires_at = _push_owner(gen), expires
        batch.save(update_fields=["lease_owner", "lease_expires_at"])
        item_id = batch.item_ids[batch.position]
        claimed.append(PushItem(run_id, item_id, _attempts(run_id, item_id), gen))
        room -= 1
    if room <= 0:
        return claimed
    if "items" in (run.budget or {}):
        room = min(room, run.budget["items"] - live_counters(run)["spent_items"] - held_items(run_id))
    # 2. Retries that are due (a failure's next attempt, or re-armed by "retry failed").
    if room > 0:
        due_ids = selectors.run_due_retry_ids(run_id=run_id, now=now, limit=room)
        claimed += _push_retries(run, due_ids, now=now, timeout=inflight_timeout_s)
        room -= len(due_ids)
    # 3. Fresh ids after the cursor (keyset), as claim_batch takes them.
    if room > 0:
        ids = list(selectors.run_unclaimed_items(run=run).order_by(keyset_order(run)).values_list("pk", flat=True)[:room])
        if ids:
            claimed += _push_batches(run, ids, is_retry=False, expires=expires)
            run.cursor = ids[-1]
            take_run_lease(run, _push_owner("window"), expires, save_cursor=True)
            room -= len(ids)
    # 4. Retries still in their backoff: published now, delivered at next_attempt_at.
    if room > 0:
        waiting = list(
            AdminTaskItem.objects.filter(run=run, state=ItemState.RETRYING, claimed=False)
            .order_by("next_attempt_at", "item_id")
            .values_list("item_id", flat=True)[:room]
        )
        claimed += _push_retries(run, waiting, now=now, timeout=inflight_timeout_s)
    return claimed


def _push_retries(run: AdminTaskRun, ids: list[int], *, now: datetime, timeout: float) -> list[PushItem]:
    """Claim these retries (ledger rows: claimed) into push batches, each delivered at its
    next_attempt_at and in flight from then for ``timeout``."""
    if not ids:
        return []
    rows = {r.item_id: r for r in AdminTaskItem.objects.filter(run=run, item_id__in=ids)}
    AdminTaskItem.objects.filter(run=run, item_id__in=ids).update(claimed=True)
    items = []
    for item_id in ids:
        row, gen = rows[item_id], _generation()
        due = max(row.next_attempt_at or now, now)
        AdminTaskBatch.objects.create(
            run=run, item_ids=[item_id], is_retry=True, lease_owner=_push_owner(gen),
            lease_expires_at=due + timedelta(seconds=timeout),
        )  # fmt: skip
        items.append(PushItem(run.pk, item_id, row.attempts, gen, not_before=due if due > now else None))
    return items


def _attempts(run_id: int, item_id: int) -> int:
    return AdminTaskItem.objects.filter(run_id=run_id, item_id=item_id).values_list("attempts", flat=True).first() or 0


def _push_batches(run: AdminTaskRun, ids: list[int], *, is_retry: bool, expires: datetime) -> list[PushItem]:
    attempts = dict(AdminTaskItem.objects.filter(run=run, item_id__in=ids).values_list("item_id", "attempts"))
    gens = [_generation() for _ in ids]
    AdminTaskBatch.objects.bulk_create(
        AdminTaskBatch(run=run, item_ids=[item_id], is_retry=is_retry, lease_owner=_push_owner(gen), lease_expires_at=expires)
        for item_id, gen in zip(ids, gens, strict=True)
    )
    return [PushItem(run.pk, item_id, attempts.get(item_id, 0), gen) for item_id, gen in zip(ids, gens, strict=True)]


def push_batches_release(*, run_id: int, items: list[PushItem]) -> None:
    """Hand published batches back at once (their publish failed): the next window
    republishes them instead of waiting for the in-flight timeout."""
    owners = [_push_owner(item.generation) for item in items]
    AdminTaskBatch.objects.filter(run_id=run_id, lease_owner__in=owners).update(
        lease_expires_at=timezone.now() - timedelta(seconds=1)
    )


def run_item_process(*, run_id: int, item_id: int) -> ItemDelivery:
    """Process exactly this item of the run, as one delivery of a push service: take its
    batch (or its due retry), run the processor, checkpoint into the run's counters (the
    ledger on failure), settle and finish the run when it was the last item.

    Harmless to call twice: a copy finds the item done or held and returns ``duplicate``.
    """
    run = get_run(run_id)
    defn = definition(run.task_key)
    owner = worker_owner()
    lease = lease_seconds(defn)
    try:
        claim = _item_claim(run_id, item_id, owner, lease)
    except RunFatal as exc:
        fail_run(run_id, defn, str(exc))
        claim = "not_runnable"
    if isinstance(claim, str):
        settle(run_id, defn)
        finishes_process(run_id=run_id)
        return ItemDelivery(outcome=claim, run_status=get_run(run_id).status)
    heartbeat = Heartbeat(owner, lease)
    worker = ItemRunner()
    try:
        work_batch(run_id, defn, owner, claim, None, worker, run.scope)
    except RunFatal as exc:
        fail_run(run_id, defn, str(exc))
    finally:
        heartbeat.stop()
        worker.close()
    settle(run_id, defn)
    finishes_process(run_id=run_id)
    row = AdminTaskItem.objects.filter(run_id=run_id, item_id=item_id).first()
    retry_at = row.next_attempt_at if row is not None and row.state == ItemState.RETRYING else None
    return ItemDelivery(
        outcome="processed", run_status=get_run(run_id).status, state=row.state if row else None, retry_at=retry_at
    )


def _item_claim(run_id: int, item_id: int, owner: str, lease: float) -> Claim | str:
    """The item's one-item claim for this delivery, or why there is none."""
    defn = definition(get_run(run_id).task_key)
    now = timezone.now()
    with transaction.atomic():
        lock_run(defn, run_id)
        run = AdminTaskRun.objects.get(pk=run_id)
        batch = (
            AdminTaskBatch.objects.select_for_update()
            .filter(run=run, item_ids=[item_id], position=0)
            .order_by("id")
            .first()
        )
        if run.status not in RunStatus.runnable():
            if batch is not None and batch.lease_owner.startswith(PUSH_OWNER_PREFIX):
                # Hand it back: a cancelling run settles once nothing is held; a paused one
                # republishes it when it resumes.
                batch.lease_owner, batch.lease_expires_at = "", now - timedelta(seconds=1)
                batch.save(update_fields=["lease_owner", "lease_expires_at"])
            return "duplicate" if batch is None and run.status in RunStatus.finished() else "not_runnable"
        try:
            defn.check_available()
        except TaskUnavailable as exc:
            raise RunFatal(str(exc)) from exc
        defn.preflight()
        if batch is not None:
            if not batch.lease_owner.startswith(PUSH_OWNER_PREFIX) and batch.lease_expires_at > now:
                return "duplicate"  # another delivery of this item is working on it now
            if batch.is_retry and _in_backoff(run, item_id, now):
                return "duplicate"  # a late copy of the failed attempt's message: not yet
            is_retry = batch.is_retry
        else:
            # No batch: a stray copy. It may take a retry that is due (its message is late or
            # lost), never one still in its backoff.
            ledger = AdminTaskItem.objects.filter(
                run=run, item_id=item_id, state=ItemState.RETRYING, claimed=False, next_attempt_at__lte=now
            )
            if not ledger.update(claimed=True):
                return "duplicate"  # done already, in its backoff, or never published
            batch = AdminTaskBatch(run=run, item_ids=[item_id], is_retry=True)
            is_retry = True
        batch.lease_owner, batch.lease_expires_at = owner, now + timedelta(seconds=lease)
        batch.save()
        take_run_lease(run, owner, batch.lease_expires_at)
        return Claim(
            batch.pk, [item_id], 0, is_retry, budgeted=bool(run.budget), per_item=run.kind == RunKind.BATCH
        )


def _in_backoff(run: AdminTaskRun, item_id: int, now: datetime) -> bool:
    """The item's next attempt is not due yet (beyond the clock tolerance between QStash,
    which delivers it at next_attempt_at, and this host)."""
    due = AdminTaskItem.objects.filter(run=run, item_id=item_id).values_list("next_attempt_at", flat=True).first()
    return due is not None and due > now + timedelta(seconds=RETRY_CLOCK_TOLERANCE_S)
