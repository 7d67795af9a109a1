"""The item runner: a claimed batch's items, one at a time, each on a helper thread under
its time limit and a cooperative stop check, each followed by its checkpoint."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from django.conf import settings
from django.db import close_old_connections, connection
from django.db.models import Model

from tasks import selectors
from tasks.engine.checkpoint import CheckpointState, Outcome, checkpoint, release_batch
from tasks.engine.claims import Claim
from tasks.engine.items import item_start
from tasks.engine.lifecycle import pause_for
from tasks.models import RunStatus
from tasks.registry import ItemFailure, ItemOutcome, ItemResult, RunFatal, TaskDefinition

logger = logging.getLogger(__name__)


class ItemInterrupted(BaseException):
    """Raised by the cancel check handed to processors. A BaseException, like
    asyncio.CancelledError: a processor's ``except Exception`` error mapping (a decoder's,
    a storage client's) can never turn a stop into a verdict on the item."""


class ItemStopped(ItemInterrupted):
    """The run is no longer runnable (cancelling, paused), or the worker gave up on the item."""


class ItemDeadline(ItemInterrupted):
    """The item's time limit passed: a retryable ``timeout``, whatever stage it was in."""


class CancelCheck:
    """Cooperative stop signal handed to processors (called between stages).

    Raises ItemStopped when the run stopped being runnable (status re-read at most every
    0.5 s) or the worker gave up on the item; ItemDeadline past the item's deadline.
    """

    def __init__(self, run_id: int, deadline: float):
        self.run_id = run_id
        self.deadline = deadline
        self.abandoned = threading.Event()
        self.cancelled = False
        self._next_poll = 0.0

    def __call__(self) -> None:
        if self.abandoned.is_set():
            raise ItemStopped("the worker gave up on this item")
        now = time.monotonic()
        if now > self.deadline:
            raise ItemDeadline()
        if now >= self._next_poll:
            self._next_poll = now + 0.5
            status = selectors.run_status(run_id=self.run_id)
            if status not in RunStatus.runnable():
                self.cancelled = True
                raise ItemStopped(f"run is {status}")


class ItemRunner:
    """Runs processors on one helper thread so a stuck item can be abandoned at its limit."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None

    def run(self, fn: Callable[..., ItemResult], *args: Any, timeout: float) -> ItemResult:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="task-item")
        future = self._pool.submit(_in_thread, fn, *args)
        try:
            return future.result(timeout=timeout)
        except FutureTimeout:
            # Leave the stuck thread behind (it stops at its next cancel check).
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
            raise ItemDeadline() from None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.submit(connection.close)
            self._pool.shutdown(wait=True)
            self._pool = None


def _in_thread(fn, *args):
    close_old_connections()
    return fn(*args)


def process_one(defn: TaskDefinition, run_id: int, item: Model, worker: ItemRunner, scope: dict) -> Outcome:
    """Run the definition's processor on one item; every way it can end becomes an Outcome,
    except RunFatal (the run cannot go on), which is raised."""
    limit = settings.PICSITE_ITEM_TIME_LIMIT_S
    check = CancelCheck(run_id, time.monotonic() + limit)
    started = time.monotonic()
    try:
        result = worker.run(defn.process, item, check, scope, timeout=limit + 1)
        kind = result.outcome
    except ItemDeadline:
        check.abandoned.set()
        timeout = ItemFailure(code="timeout", stage="process", message=f"item took over {limit:.0f}s")
        return Outcome(ItemOutcome.FAILED, failure=timeout, seconds=time.monotonic() - started)
    except ItemStopped:
        return Outcome(ItemOutcome.STOPPED, seconds=time.monotonic() - started)
    except ItemFailure as exc:
        return Outcome(ItemOutcome.FAILED, failure=exc, seconds=time.monotonic() - started)
    except RunFatal:
        raise
    except Exception as exc:
        logger.exception("task %s item %s crashed", defn.key, getattr(item, "pk", item))
        failure = ItemFailure(code="unexpected_error", stage="process", message=f"{type(exc).__name__}: {exc}")
        return Outcome(ItemOutcome.FAILED, failure=failure, seconds=time.monotonic() - started)
    return Outcome(kind, result=result, seconds=time.monotonic() - started)


def work_batch(
    run_id: int, defn: TaskDefinition, owner: str, claim: Claim, deadline: float | None, worker: ItemRunner, scope: dict
) -> bool:
    """Process the claim's remaining items. Returns False when this worker must stop."""
    remaining = claim.item_ids[claim.position :]
    items = {obj.pk: obj for obj in defn.item_queryset().filter(pk__in=remaining)}
    ledger = selectors.run_ledger(run_id=run_id, item_ids=remaining) if claim.is_retry or claim.per_item else {}
    for index, item_id in enumerate(remaining):
        item = items.get(item_id)
        if item is None:  # gone since the claim
            outcome = Outcome(ItemOutcome.SKIPPED, result=ItemResult(ItemOutcome.SKIPPED))
        else:
            if claim.per_item:
                item_start(run_id=run_id, defn=defn, item_id=item_id)
            outcome = process_one(defn, run_id, item, worker, scope)
            if claim.per_item and outcome.kind == ItemOutcome.SUCCEEDED and defn.item_result is not None:
                outcome.detail = _item_result(defn, item)
        if outcome.kind == ItemOutcome.STOPPED:
            release_batch(run_id, defn, owner, claim)
            return False
        last = index == len(remaining) - 1
        state = checkpoint(run_id, defn, owner, claim, item_id, outcome, ledger.get(item_id), last)
        if state is None:  # lease lost: someone adopted the batch; write nothing more
            return False
        go_on, reason = _after_item(run_id, defn, outcome, state, deadline)
        if reason is not None:
            if reason == "memory":
                # Recycled after this item (django-q2's max_rss replaces the process when the
                # job returns); the rest of the batch goes to the next kick at once.
                logger.warning("worker over PICSITE_WORKER_MEMORY_MB after an item of run %s: stopping", run_id)
            if not last:
                release_batch(run_id, defn, owner, claim)
            return go_on
    return True


def _item_result(defn: TaskDefinition, item: Model) -> dict | None:
    """The definition's item_result; a failure there never costs the item its success."""
    try:
        return defn.item_result(item)
    except Exception:
        logger.exception("item_result of %s item %s failed", defn.key, getattr(item, "pk", item))
        return None


def _after_item(
    run_id: int, defn: TaskDefinition, outcome: Outcome, state: CheckpointState, deadline: float | None
) -> tuple[bool, str | None]:
    """Whether this worker stops after the item, and why: (go on with another batch,
    reason) with reason None to go on with this batch."""
    if outcome.failure is not None and outcome.failure.pause_run:
        # Not the item's fault (it was recorded as a retry costing no attempt).
        pause_for(run_id, defn, outcome.failure)
        return False, "paused"
    if state.status not in RunStatus.runnable():
        return False, "status"
    if state.budget_reached:
        return True, "budget"  # the next claim pauses the run with reason "budget"
    if deadline is not None and time.monotonic() >= deadline:
        return False, "deadline"  # hand the rest to the next kick at once
    if over_memory_bound():
        return False, "memory"
    return True, None


def over_memory_bound() -> bool:
    """This process's resident memory is over PICSITE_WORKER_MEMORY_MB (Linux /proc)."""
    try:
        with open("/proc/self/statm") as fh:
            resident_pages = int(fh.read().split()[1])
    except (OSError, ValueError, IndexError):
        return False
    return resident_pages * os.sysconf("SC_PAGE_SIZE") > settings.PICSITE_WORKER_MEMORY_MB * 1024 * 1024
