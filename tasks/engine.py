"""The task-run engine: one lifecycle for every registered task.

create -> kick/tick (claim a batch, process items one by one, checkpoint after each)
-> succeeded | failed | cancelled, with cancel, retry_failed and budget pauses.

Concurrency model: a run is worked by any number of workers, each holding its own
*batch* (a slice of ids after the run's cursor) under its own lease. Claims and
checkpoints take ``pg_try_advisory_xact_lock(task lock id, run id)`` for the length
of one short transaction only, never across fetch, encode or upload. A worker whose
batch lease was lost (expired and adopted) finds its checkpoint matches no row and
stops without writing.

Items that fail are retried with exponential backoff (``AdminTaskItem`` ledger)
while the run goes on; ``processed`` counts an item once, at its final outcome.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import psycopg
from django.conf import settings
from django.db import DatabaseError, IntegrityError, close_old_connections, connection, transaction
from django.db.models import F, Sum
from django.utils import timezone

from tasks import registry
from tasks.models import AdminTaskBatch, AdminTaskItem, AdminTaskRun, ItemState, RunStatus
from tasks.registry import (
    ItemFailure,
    ItemResult,
    RunFatal,
    ScopeError,
    TaskDefinition,
    TaskUnavailable,
)

logger = logging.getLogger(__name__)

MAX_RECENT_ISSUES = 20
NOTIFY_CHANNEL = "picsite_task_runs"


# --- errors (each refusal is its own type; the API maps them to status codes) ---------


class EngineError(Exception):
    code = "engine_error"
    http_status = 400

    def __init__(self, message: str, *, details: dict | None = None):
        super().__init__(message)
        self.message = message
        self.details = details or {}


class RunAlreadyActive(EngineError):
    code, http_status = "run_active", 409


class EmptyScope(EngineError):
    code, http_status = "empty_scope", 422


class StorageNotConfigured(EngineError):
    code, http_status = "storage_not_configured", 422


class InvalidScope(EngineError):
    code, http_status = "invalid_scope", 400


class InvalidBudget(EngineError):
    code, http_status = "invalid_budget", 400


class RunNotFound(EngineError):
    code, http_status = "run_not_found", 404


class UnknownTaskKey(EngineError):
    code, http_status = "unknown_task", 404


class InvalidTransition(EngineError):
    code, http_status = "invalid_transition", 409


def _definition(task_key: str) -> TaskDefinition:
    try:
        return registry.get(task_key)
    except registry.UnknownTask:
        raise UnknownTaskKey(f"no task named {task_key!r}") from None


def _lease_seconds(defn: TaskDefinition) -> float:
    return settings.PICSITE_LEASE_OVERRIDE_S or defn.lease_seconds


def _run_key(run_id: int) -> int:
    """The run's half of its advisory-lock key: an int4 in 1..2**31-1 (0 is the task-wide
    key of create and retry_failed). Claims, cancel and checkpoints all use it."""
    return (run_id - 1) % 2147483647 + 1


def _get_run(run_id: int) -> AdminTaskRun:
    try:
        return AdminTaskRun.objects.get(pk=run_id)
    except AdminTaskRun.DoesNotExist:
        raise RunNotFound(f"no run with id {run_id}") from None


def _notify(run_id: int, event: str, **payload: Any) -> None:
    """Tell listeners (SSE streams on any host) that a run changed. Sent at commit."""
    body = json.dumps({"run": run_id, "event": event, **payload}, default=str)
    with connection.cursor() as cur:
        cur.execute("SELECT pg_notify(%s, %s)", [NOTIFY_CHANNEL, body[:7900]])


# --- scope, budget, preview ------------------------------------------------------------


def normalize_scope(*, task_key: str, scope: Any) -> dict:
    defn = _definition(task_key)
    try:
        return defn.normalize_scope(scope if scope is not None else {})
    except ScopeError as exc:
        raise InvalidScope(exc.message, details={"field": exc.field}) from exc


BUDGET_KEYS = {"items": int, "seconds": (int, float), "bytes": int}


def normalize_budget(budget: Any) -> dict:
    if budget in (None, {}):
        return {}
    if not isinstance(budget, dict):
        raise InvalidBudget("budget must be a JSON object", details={"field": "budget"})
    out = {}
    for key, value in budget.items():
        if key not in BUDGET_KEYS:
            raise InvalidBudget(f"unknown budget key {key!r}; allowed: items, seconds, bytes", details={"field": key})
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, BUDGET_KEYS[key]) or value <= 0:
            raise InvalidBudget(f"budget {key} must be a positive number", details={"field": key})
        out[key] = value
    return out


@dataclass
class Preview:
    task_key: str
    scope: dict
    count: int
    estimate: dict = field(default_factory=dict)
    details: dict | None = None  # the definition's preview_details, if it has them


def _per_item_cost(defn: TaskDefinition) -> dict:
    """Average cost per processed item over the last finished runs, else the defaults."""
    recent = AdminTaskRun.objects.filter(task_key=defn.key, processed__gt=0).order_by("-id")[:10]
    agg = AdminTaskRun.objects.filter(pk__in=list(recent.values_list("pk", flat=True))).aggregate(
        items=Sum("spent_items"), seconds=Sum("busy_seconds"), bytes=Sum("spent_bytes"), writes=Sum("spent_writes")
    )
    if agg["items"]:
        return {
            "seconds": agg["seconds"] / agg["items"],
            "bytes": agg["bytes"] / agg["items"],
            "writes": agg["writes"] / agg["items"],
            "source": "history",
        }
    c = defn.cost
    return {"seconds": c.seconds_per_item, "bytes": c.bytes_per_item, "writes": c.writes_per_item, "source": "default"}


def preview_count(*, task_key: str, scope: Any) -> Preview:
    defn = _definition(task_key)
    normalized = normalize_scope(task_key=task_key, scope=scope)
    count = defn.scope_queryset(normalized).count()
    per = _per_item_cost(defn)
    estimate = {
        "cpu_seconds": round(per["seconds"] * count, 1),
        "bytes": int(per["bytes"] * count),
        "object_writes": int(per["writes"] * count),
        "basis": per["source"],
    }
    if settings.PICSITE_PRICE_PER_1K_WRITES or settings.PICSITE_PRICE_PER_GB:
        estimate["money"] = round(
            estimate["object_writes"] / 1000 * settings.PICSITE_PRICE_PER_1K_WRITES
            + estimate["bytes"] / 1e9 * settings.PICSITE_PRICE_PER_GB,
            4,
        )
    details = defn.preview_details(normalized) if defn.preview_details is not None else None
    return Preview(task_key=task_key, scope=normalized, count=count, estimate=estimate, details=details)


# --- create -----------------------------------------------------------------------------


def create(*, task_key: str, scope: Any = None, budget: Any = None, user=None) -> AdminTaskRun:
    """Create a queued run. Refuses with RunAlreadyActive, EmptyScope, StorageNotConfigured."""
    defn = _definition(task_key)
    normalized = normalize_scope(task_key=task_key, scope=scope)
    clean_budget = normalize_budget(budget)
    try:
        defn.check_available()
    except TaskUnavailable as exc:
        raise StorageNotConfigured(str(exc)) from exc
    with transaction.atomic():
        # Serialize creates of one task; the partial unique index is the backstop.
        with connection.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s, 0)", [defn.lock_id])
        active = AdminTaskRun.objects.filter(task_key=task_key, status__in=RunStatus.active()).first()
        if active is not None:
            raise RunAlreadyActive(
                f"run #{active.pk} of {task_key} is {active.status}", details={"run_id": active.pk}
            )
        qs = defn.scope_queryset(normalized)
        total = qs.count()
        if total == 0:
            raise EmptyScope(f"nothing to do: the scope {normalized} matches no items")
        max_id = qs.order_by("-pk").values_list("pk", flat=True).first()
        try:
            run = AdminTaskRun.objects.create(
                task_key=task_key,
                scope=normalized,
                budget=clean_budget,
                total=total,
                max_item_id=max_id,
                created_by=user if getattr(user, "is_authenticated", False) else None,
            )
        except IntegrityError:
            raise RunAlreadyActive(f"another run of {task_key} is active") from None
        _notify(run.pk, "created", status=run.status)
    return run


def set_budget(*, run_id: int, budget: Any) -> AdminTaskRun:
    """Replace the budget; a run paused by its budget resumes if the new one allows."""
    clean = normalize_budget(budget)
    run = _get_run(run_id)
    defn = _definition(run.task_key)
    with transaction.atomic():
        with connection.cursor() as cur:  # a claim deciding to pause the run holds this
            cur.execute("SELECT pg_advisory_xact_lock(%s, %s)", [defn.lock_id, _run_key(run.pk)])
        run = AdminTaskRun.objects.select_for_update().get(pk=run.pk)
        run.budget = clean
        fields = ["budget", "updated_at"]
        if run.status == RunStatus.PAUSED and run.pause_reason == "budget" and not _budget_exhausted(run, 1.0, 0):
            run.status, run.pause_reason = RunStatus.QUEUED, ""
            fields += ["status", "pause_reason"]
        run.save(update_fields=fields)
        _notify(run.pk, "status", status=run.status)
    return run


def _budget_exhausted(run: AdminTaskRun, next_seconds: float, next_bytes: float) -> str | None:
    """Which budget the next item would exceed, if any."""
    b = run.budget or {}
    if not b:
        return None
    spent = live_counters(run)
    if "items" in b and spent["spent_items"] + 1 > b["items"]:
        return "items"
    if "seconds" in b and spent["spent_seconds"] + next_seconds > b["seconds"]:
        return "seconds"
    if "bytes" in b and spent["spent_bytes"] + next_bytes > b["bytes"]:
        return "bytes"
    return None


# --- cancel / retry ----------------------------------------------------------------------


def cancel(*, run_id: int) -> AdminTaskRun:
    """Queued/paused runs, and runs with no live lease, are cancelled at once;
    otherwise the run goes to cancelling and each worker stops at its next check."""
    run = _get_run(run_id)
    defn = _definition(run.task_key)
    with transaction.atomic():
        with connection.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s, %s)", [defn.lock_id, _run_key(run.pk)])
        run = AdminTaskRun.objects.select_for_update().get(pk=run.pk)
        if run.status in RunStatus.finished():
            raise InvalidTransition(f"run #{run.pk} already {run.status}")
        live = AdminTaskBatch.objects.filter(run=run, lease_expires_at__gt=timezone.now()).exists()
        if run.status in (RunStatus.QUEUED, RunStatus.PAUSED) or not live:
            _finish(run, RunStatus.CANCELLED)
        elif run.status != RunStatus.CANCELLING:
            run.status = RunStatus.CANCELLING
            run.save(update_fields=["status", "updated_at"])
            _notify(run.pk, "status", status=run.status)
    return run


def retry_failed(*, run_id: int) -> AdminTaskRun:
    """Re-arm every item that ran out of attempts; a finished run is reopened."""
    run = _get_run(run_id)
    defn = _definition(run.task_key)
    with transaction.atomic():
        with connection.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s, 0)", [defn.lock_id])
            cur.execute("SELECT pg_advisory_xact_lock(%s, %s)", [defn.lock_id, _run_key(run.pk)])
        run = AdminTaskRun.objects.select_for_update().get(pk=run.pk)
        failed_items = AdminTaskItem.objects.filter(run=run, state=ItemState.FAILED)
        n = failed_items.count()
        if n == 0:
            raise InvalidTransition(f"run #{run.pk} has no failed items to retry")
        if run.status in (RunStatus.CANCELLING,):
            raise InvalidTransition(f"run #{run.pk} is cancelling")
        if run.status in RunStatus.finished():
            other = AdminTaskRun.objects.filter(task_key=run.task_key, status__in=RunStatus.active()).exclude(pk=run.pk)
            if other.exists():
                raise RunAlreadyActive(f"run #{other.first().pk} of {run.task_key} is active")
            run.status, run.finished_at = RunStatus.QUEUED, None
        failed_items.update(state=ItemState.RETRYING, attempts=0, next_attempt_at=timezone.now(), claimed=False)
        run.processed -= n
        run.failed -= n
        run.last_error = ""
        run.save(update_fields=["status", "finished_at", "processed", "failed", "last_error", "updated_at"])
        _notify(run.pk, "status", status=run.status)
    return run


# --- reads ------------------------------------------------------------------------------


def list_runs(*, task_key: str, limit: int = 10) -> dict:
    _definition(task_key)
    active = AdminTaskRun.objects.filter(task_key=task_key, status__in=RunStatus.active()).first()
    recent = list(AdminTaskRun.objects.filter(task_key=task_key).order_by("-id")[:limit])
    return {"active": active, "recent": recent}


def detail(*, run_id: int, task_key: str | None = None) -> dict:
    run = _get_run(run_id)
    if task_key is not None and run.task_key != task_key:
        raise RunNotFound(f"no {task_key} run with id {run_id}")
    items = list(AdminTaskItem.objects.filter(run=run).exclude(state=ItemState.SUCCEEDED).order_by("item_id")[:200])
    return {"run": run, "items": items}


def progress(run: AdminTaskRun, *, processed: int | None = None) -> dict:
    """Throughput (items/s of wall time since start) and ETA for what is left.

    ``processed`` is the live count (``live_counters``) when the caller has it."""
    processed = run.processed if processed is None else processed
    now = timezone.now()
    elapsed = ((run.finished_at or now) - run.started_at).total_seconds() if run.started_at else 0.0
    rate = processed / elapsed if elapsed > 0 and processed else 0.0
    remaining = max(run.total - processed, 0)
    eta = remaining / rate if rate > 0 and run.is_active else None
    return {
        "elapsed_seconds": round(elapsed, 1),
        "items_per_second": round(rate, 3),
        "eta_seconds": round(eta, 1) if eta is not None else None,
        "percent": round(100.0 * processed / run.total, 1) if run.total else 100.0,
    }


# --- kick / tick ----------------------------------------------------------------------------


@dataclass
class _Claim:
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
    defn = _definition(task_key)
    for paused in AdminTaskRun.objects.filter(task_key=task_key, status=RunStatus.PAUSED).exclude(pause_reason="budget"):
        resume_paused(run_id=paused.pk)  # probes (with the definition's backoff) and resumes
    run = (
        AdminTaskRun.objects.filter(task_key=task_key, status__in=[*RunStatus.runnable(), RunStatus.CANCELLING])
        .order_by("id")
        .first()
    )
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
    run = _get_run(run_id)
    defn = _definition(run.task_key)
    owner = owner or worker_owner()
    deadline = time.monotonic() + time_budget_s if time_budget_s else None
    worker = _ItemRunner()
    heartbeat = _Heartbeat(run_id, owner, _lease_seconds(defn))
    batches = 0
    try:
        while deadline is None or time.monotonic() < deadline:
            claim = _claim_batch(run_id, defn, owner)
            if claim is None:
                break
            batches += 1
            if not _work_batch(run_id, defn, owner, claim, deadline, worker, run.scope):
                break
            if max_batches is not None and batches >= max_batches:
                break
    except RunFatal as exc:
        _fail_run(run_id, defn, str(exc))
    finally:
        heartbeat.stop()
        worker.close()
    _settle(run_id, defn)
    return AdminTaskRun.objects.get(pk=run_id)


def worker_owner() -> str:
    """A lease owner that says who holds a batch: host, process id and a random part (one
    process may run several kicks)."""
    return f"{socket.gethostname()[:30]}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


class _Heartbeat:
    """Renews this worker's batch leases every lease/6 seconds on its own thread (and its
    own connection) for as long as the worker lives, so liveness does not depend on how long
    an item takes and a crashed worker's batch is free within one short lease. A released
    batch has no owner, so it is never renewed by mistake."""

    def __init__(self, run_id: int, owner: str, lease_s: float):
        self.run_id, self.owner, self.lease_s = run_id, owner, lease_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="task-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        try:
            while not self._stop.wait(self.lease_s / 6):
                try:
                    with connection.cursor() as cur:
                        cur.execute(
                            "UPDATE tasks_admintaskbatch SET lease_expires_at = now() + make_interval(secs => %s)"
                            " WHERE run_id = %s AND lease_owner = %s",
                            [self.lease_s, self.run_id, self.owner],
                        )
                except DatabaseError:  # the next beat tries again on a fresh connection
                    logger.warning("lease heartbeat of run %s failed", self.run_id, exc_info=True)
                    connection.close()
        finally:
            connection.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _try_lock(cur, defn: TaskDefinition, run_id: int, *, wait_s: float = 5.0) -> bool:
    """Transaction-scoped try-lock with a short spin: claims and checkpoints are brief."""
    give_up = time.monotonic() + wait_s
    delay = 0.0005
    while True:
        cur.execute("SELECT pg_try_advisory_xact_lock(%s, %s)", [defn.lock_id, _run_key(run_id)])
        if cur.fetchone()[0]:
            return True
        if time.monotonic() > give_up:
            return False
        time.sleep(delay * random.uniform(0.5, 1.5))
        delay = min(delay * 2, 0.05)


def _claim_batch(run_id: int, defn: TaskDefinition, owner: str) -> _Claim | None:
    lease = timedelta(seconds=_lease_seconds(defn))
    with transaction.atomic():
        with connection.cursor() as cur:
            if not _try_lock(cur, defn, run_id):
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
        per = _run_item_cost(run)
        reason = _budget_exhausted(run, per["seconds"], per["bytes"])
        if reason:
            _pause(run, "budget", detail=f"the next item would exceed the {reason} budget")
            return None

        # 1. Adopt a batch whose worker died (lease expired).
        with connection.cursor() as cur:
            cur.execute(
                """
                UPDATE tasks_admintaskbatch SET lease_owner = %s, lease_expires_at = %s
                WHERE id = (
                    SELECT id FROM tasks_admintaskbatch
                    WHERE run_id = %s AND lease_expires_at <= %s
                    ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)
                RETURNING id, item_ids, position, is_retry
                """,
                [owner, now + lease, run_id, now],
            )
            row = cur.fetchone()
        if row is not None:
            _take_run_lease(run, owner, now + lease)
            ids = row[1] if isinstance(row[1], list) else json.loads(row[1])
            return _Claim(
                row[0], ids, row[2], row[3], renew_after=time.monotonic() + lease.total_seconds() / 4, budgeted=bool(run.budget)
            )

        # 2. Fresh ids after the cursor (keyset, never OFFSET); scope frozen at max_item_id.
        limit = defn.batch_size
        if "items" in (run.budget or {}):
            # Items other workers already hold count against the budget too.
            left = run.budget["items"] - live_counters(run)["spent_items"] - _held_items(run_id)
            if left <= 0:
                return None  # the rest of the budget is held by live batches: not a pause
            limit = min(limit, left)
        ids = list(
            defn.scope_queryset(run.scope)
            .filter(pk__gt=run.cursor, pk__lte=run.max_item_id)
            .order_by(_keyset_order(run))
            .values_list("pk", flat=True)[:limit]
        )
        is_retry = False
        if not ids:
            # 3. Failed items whose backoff has elapsed.
            due = list(
                AdminTaskItem.objects.filter(
                    run_id=run_id, state=ItemState.RETRYING, claimed=False, next_attempt_at__lte=now
                )
                .order_by("next_attempt_at", "item_id")
                .values_list("item_id", flat=True)[:limit]
            )
            if due:
                AdminTaskItem.objects.filter(run_id=run_id, item_id__in=due).update(claimed=True)
                ids, is_retry = due, True
        if not ids:
            return None
        batch = AdminTaskBatch.objects.create(
            run_id=run_id, item_ids=ids, is_retry=is_retry, lease_owner=owner, lease_expires_at=now + lease
        )
        if not is_retry:
            run.cursor = ids[-1]
        _take_run_lease(run, owner, now + lease, save_cursor=not is_retry)
        return _Claim(
            batch.pk, ids, 0, is_retry, renew_after=time.monotonic() + lease.total_seconds() / 4, budgeted=bool(run.budget)
        )


def _held_items(run_id: int) -> int:
    """Items handed to batches of the run and not yet checkpointed."""
    with connection.cursor() as cur:
        cur.execute(
            "SELECT coalesce(sum(jsonb_array_length(item_ids) - position), 0)"
            " FROM tasks_admintaskbatch WHERE run_id = %s",
            [run_id],
        )
        return int(cur.fetchone()[0])


TIMELINE_EVERY_S = 5
TIMELINE_MAX_POINTS = 720


def _keyset_order(run: AdminTaskRun):
    """Order for the next-batch query.

    Dense scopes walk the primary key. When what is left is sparse in the id range
    left to walk (say 3,000 new uploads at the end of a 1M-row library), an
    ORDER BY pk walk would filter out everything before them on each claim; ``pk + 0``
    makes Postgres combine the scope's partial indexes and top-N sort the few matches.
    """
    left = max(run.total - run.processed, 1)
    span = max(run.max_item_id - run.cursor, 1)
    return "pk" if left * 20 >= span else (F("pk") + 0).asc()


def _take_run_lease(run: AdminTaskRun, owner: str, expires, *, save_cursor: bool = False) -> None:
    fields = ["lease_owner", "lease_expires_at", "updated_at"]
    run.lease_owner, run.lease_expires_at = owner, expires
    # Progress samples [unix time, processed] for the throughput chart, one per 5 s at most.
    now_ts = time.time()
    points = list(run.timeline or [])
    if not points or now_ts - points[-1][0] >= TIMELINE_EVERY_S:
        points.append([round(now_ts, 1), run.processed])
        run.timeline = points[-TIMELINE_MAX_POINTS:]
        fields.append("timeline")
    if run.status == RunStatus.QUEUED:
        run.status = RunStatus.RUNNING
        fields.append("status")
        _notify(run.pk, "status", status=run.status)
    if run.started_at is None:
        run.started_at = timezone.now()
        fields.append("started_at")
    if save_cursor:
        fields.append("cursor")
    run.save(update_fields=fields)


def _run_item_cost(run: AdminTaskRun) -> dict:
    if run.spent_items:
        return {"seconds": run.spent_seconds / run.spent_items, "bytes": run.spent_bytes / run.spent_items}
    c = _definition(run.task_key).cost
    return {"seconds": c.seconds_per_item, "bytes": c.bytes_per_item}


def _pause(run: AdminTaskRun, reason: str, *, detail: str, stage: str = "budget") -> None:
    """Pause a runnable run (the caller holds the run's advisory lock)."""
    run.status, run.pause_reason = RunStatus.PAUSED, reason
    run.lease_owner, run.lease_expires_at = "", None
    run.save(update_fields=["status", "pause_reason", "lease_owner", "lease_expires_at", "updated_at"])
    # Unfinished batches stay; they are adopted when the run resumes.
    AdminTaskBatch.objects.filter(run=run).update(lease_expires_at=timezone.now())
    _record_issue_now(run, {"stage": stage, "code": reason, "message": detail})
    _notify(run.pk, "status", status=run.status, reason=reason)


def _pause_for(run_id: int, defn: TaskDefinition, failure: ItemFailure) -> None:
    """An item failed for a reason that is not its own (``failure.pause_run``, e.g. the
    storage is down): pause the run until the definition's probe says it can go on."""
    with transaction.atomic():
        with connection.cursor() as cur:  # waits out any checkpoint in flight
            cur.execute("SELECT pg_advisory_xact_lock(%s, %s)", [defn.lock_id, _run_key(run_id)])
        run = AdminTaskRun.objects.select_for_update().get(pk=run_id)
        if run.status not in RunStatus.runnable():
            return  # already paused (another worker saw it first), cancelling or ended
        logger.warning("run %s paused (%s): %s", run_id, failure.pause_run, failure.message)
        _pause(run, failure.pause_run, detail=f"paused until it can go on: {failure.message[:400]}", stage=failure.stage)


def resume_paused(*, run_id: int) -> AdminTaskRun:
    """Resume a run paused for a reason its definition can probe (not a budget: that one
    resumes when the budget is raised). The probe runs outside any transaction."""
    run = _get_run(run_id)
    defn = _definition(run.task_key)
    reason = run.pause_reason
    if run.status != RunStatus.PAUSED or reason in ("", "budget") or defn.probe is None:
        return run
    if not defn.probe(reason):
        return run
    with transaction.atomic():
        with connection.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s, %s)", [defn.lock_id, _run_key(run.pk)])
        run = AdminTaskRun.objects.select_for_update().get(pk=run.pk)
        if run.status == RunStatus.PAUSED and run.pause_reason == reason:
            run.status, run.pause_reason = RunStatus.QUEUED, ""
            run.save(update_fields=["status", "pause_reason", "updated_at"])
            _record_issue_now(run, {"stage": "run", "code": "resumed", "message": f"{reason} is over: resumed"})
            _notify(run.pk, "status", status=run.status)
    return run


# --- per-item execution ----------------------------------------------------------------


class ItemInterrupted(BaseException):
    """Raised by the cancel check handed to processors. A BaseException, like
    asyncio.CancelledError: a processor's ``except Exception`` error mapping (a decoder's,
    a storage client's) can never turn a stop into a verdict on the item."""


class ItemStopped(ItemInterrupted):
    """The run is no longer runnable (cancelling, paused), or the worker gave up on the item."""


class ItemDeadline(ItemInterrupted):
    """The item's time limit passed: a retryable ``timeout``, whatever stage it was in."""


class _CancelCheck:
    """Cooperative stop signal handed to processors (called between stages).

    Raises ItemStopped when the run is being cancelled (status re-read at most every
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
            status = AdminTaskRun.objects.filter(pk=self.run_id).values_list("status", flat=True).first()
            if status not in RunStatus.runnable():
                self.cancelled = True
                raise ItemStopped(f"run is {status}")


class _ItemRunner:
    """Runs processors on one helper thread so a stuck item can be abandoned at its limit."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None

    def run(self, fn, *args, timeout: float):
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


@dataclass
class _Outcome:
    kind: str  # succeeded | skipped | failed | retry | stopped
    result: ItemResult | None = None
    failure: ItemFailure | None = None
    seconds: float = 0.0


def _process_one(defn: TaskDefinition, run_id: int, item, worker: _ItemRunner, scope: dict) -> _Outcome:
    limit = settings.PICSITE_ITEM_TIME_LIMIT_S
    check = _CancelCheck(run_id, time.monotonic() + limit)
    started = time.monotonic()
    try:
        result = worker.run(defn.process, item, check, scope, timeout=limit + 1)
        kind = result.outcome
    except ItemDeadline:
        check.abandoned.set()
        return _Outcome(
            "failed",
            failure=ItemFailure(code="timeout", stage="process", message=f"item took over {limit:.0f}s"),
            seconds=time.monotonic() - started,
        )
    except ItemStopped:
        return _Outcome("stopped", seconds=time.monotonic() - started)
    except ItemFailure as exc:
        return _Outcome("failed", failure=exc, seconds=time.monotonic() - started)
    except RunFatal:
        raise
    except Exception as exc:
        logger.exception("task %s item %s crashed", defn.key, getattr(item, "pk", item))
        failure = ItemFailure(code="unexpected_error", stage="process", message=f"{type(exc).__name__}: {exc}")
        return _Outcome("failed", failure=failure, seconds=time.monotonic() - started)
    return _Outcome(kind, result=result, seconds=time.monotonic() - started)


def _backoff_seconds(attempts: int) -> float:
    base = settings.PICSITE_ITEM_RETRY_BASE_S * (2 ** max(attempts - 1, 0))
    capped = min(base, settings.PICSITE_ITEM_RETRY_CAP_S)
    return random.uniform(capped / 2, capped)  # "equal jitter"


def _work_batch(
    run_id: int, defn: TaskDefinition, owner: str, claim: _Claim, deadline: float | None, worker, scope: dict
) -> bool:
    """Process the claim's remaining items. Returns False when this worker must stop."""
    remaining = claim.item_ids[claim.position :]
    items = {obj.pk: obj for obj in defn.item_queryset().filter(pk__in=remaining)}
    ledger = {}
    if claim.is_retry:
        ledger = {row.item_id: row for row in AdminTaskItem.objects.filter(run_id=run_id, item_id__in=remaining)}
    for index, item_id in enumerate(remaining):
        item = items.get(item_id)
        if item is None:
            outcome = _Outcome("skipped", result=ItemResult("skipped"))
        else:
            outcome = _process_one(defn, run_id, item, worker, scope)
        if outcome.kind == "stopped":
            _release_batch(run_id, defn, owner, claim)
            return False
        last = index == len(remaining) - 1
        state = _checkpoint(run_id, defn, owner, claim, item_id, outcome, ledger.get(item_id), last)
        if state is None:  # lease lost: someone adopted the batch; write nothing more
            return False
        if outcome.failure is not None and outcome.failure.pause_run:
            # Not the item's fault (it was recorded as a retry costing no attempt).
            _pause_for(run_id, defn, outcome.failure)
            if not last:
                _release_batch(run_id, defn, owner, claim)
            return False
        if state.status not in RunStatus.runnable():
            if not last:
                _release_batch(run_id, defn, owner, claim)
            return False
        if state.budget_reached:
            if not last:
                _release_batch(run_id, defn, owner, claim)
            return True  # the next claim pauses the run with reason "budget"
        if deadline is not None and time.monotonic() >= deadline and not last:
            _release_batch(run_id, defn, owner, claim)  # hand the rest to the next kick at once
            return False
        if _over_memory_bound():
            # Recycled after this item (django-q2's max_rss replaces the process when the
            # job returns); the rest of the batch goes to the next kick at once.
            logger.warning("worker over PICSITE_WORKER_MEMORY_MB after an item of run %s: stopping", run_id)
            if not last:
                _release_batch(run_id, defn, owner, claim)
            return False
    return True


def _over_memory_bound() -> bool:
    """This process's resident memory is over PICSITE_WORKER_MEMORY_MB (Linux /proc)."""
    try:
        with open("/proc/self/statm") as fh:
            resident_pages = int(fh.read().split()[1])
    except (OSError, ValueError, IndexError):
        return False
    return resident_pages * os.sysconf("SC_PAGE_SIZE") > settings.PICSITE_WORKER_MEMORY_MB * 1024 * 1024


@dataclass
class _CheckpointState:
    status: str
    budget_reached: bool


# How long clean items may wait on their batch row before they are folded into the run
# row (and announced by NOTIFY). Slow items fold at every checkpoint anyway.
FOLD_EVERY_S = 0.5

_LOCK_CTE = """lk AS (SELECT pg_try_advisory_xact_lock(%(lock_id)s::int, %(run_key)s::int) AS ok,
                   -- Checkpoints commit without waiting for the WAL flush: a Postgres crash
                   -- can drop the last ~0.6 s of them, and then the batch position and the
                   -- counters roll back together, so those items are simply redone.
                   set_config('synchronous_commit', 'off', true) AS async_commit)"""


def _mine(alias: str = "tasks_admintaskbatch") -> str:
    """This worker still owns the batch at this position (and holds the run's try-lock)."""
    return (
        f"{alias}.id = %(batch)s::bigint AND {alias}.lease_owner = %(owner)s::text"
        f" AND {alias}.position = %(position)s::int AND (SELECT ok FROM lk)"
    )


_RENEWED_LEASE = "CASE WHEN %(renew)s::bool THEN now() + make_interval(secs => %(lease)s::float8) ELSE {col} END"
# Pending counters on a batch, and the run counters each one is folded into.
_PENDING_INTO_RUN = {
    "processed": ("processed", "spent_items"),  # fast checkpoints carry clean items only
    "succeeded": ("succeeded",),
    "skipped": ("skipped",),
    "seconds": ("spent_seconds", "busy_seconds"),
    "bytes": ("spent_bytes",),
    "writes": ("spent_writes",),
}
_PENDING = tuple(_PENDING_INTO_RUN)
_PENDING_COLUMNS = ", ".join(f"pending_{name}" for name in _PENDING)
_TAKE_PENDING = ", ".join(f"{{src}}pending_{name} AS p_{name}" for name in _PENDING)
_ZERO_PENDING = ", ".join(f"pending_{name} = 0" for name in _PENDING)

# The fast checkpoint: a clean item (no failure, no ledger row) on an unbudgeted run
# moves the batch on and adds to its pending counters, and re-reads the run's status.
# One small-row UPDATE instead of two; the run row is untouched.
FAST_CHECKPOINT_SQL = f"""
WITH {_LOCK_CTE},
b AS (
    UPDATE tasks_admintaskbatch SET
        position = position + 1,
        pending_processed = pending_processed + 1,
        pending_succeeded = pending_succeeded + %(succeeded)s::int,
        pending_skipped = pending_skipped + %(skipped)s::int,
        pending_seconds = pending_seconds + %(seconds)s::float8,
        pending_bytes = pending_bytes + %(bytes)s::bigint,
        pending_writes = pending_writes + %(writes)s::int
     WHERE {_mine()}
    RETURNING id
)
SELECT lk.ok, r.status, r.budget, r.spent_items, r.spent_seconds, r.spent_bytes
  FROM lk LEFT JOIN tasks_admintaskrun r ON r.id = %(run)s::bigint AND EXISTS (SELECT 1 FROM b)
"""

# How a folding statement takes the batch's pending counters as it advances, finishes or
# releases the batch. The old values come from a locking read (FOR UPDATE re-reads the
# row's latest version once it holds it), not from a self-join, which would return the
# statement's snapshot and zero anything committed after it.
_LOCKED_BATCH = f"(SELECT id, {_PENDING_COLUMNS} FROM tasks_admintaskbatch WHERE {_mine()} FOR UPDATE) AS ob"
_FOLD_BATCH = {
    # Advance the batch (renewing its lease when due) and zero its pending counters.
    "advance": f"""UPDATE tasks_admintaskbatch AS nb
       SET position = nb.position + 1, lease_expires_at = {_RENEWED_LEASE.format(col="nb.lease_expires_at")},
           {_ZERO_PENDING}
      FROM {_LOCKED_BATCH}
     WHERE nb.id = ob.id
    RETURNING {_TAKE_PENDING.format(src="ob.")}""",
    # The batch's last item: the batch row goes (DELETE returns its latest version).
    "done": f"""DELETE FROM tasks_admintaskbatch WHERE {_mine()}
    RETURNING {_TAKE_PENDING.format(src="")}""",
    # Stopping early: hand the rest back with an expired lease (the next kick adopts it).
    "release": f"""UPDATE tasks_admintaskbatch AS nb
       SET lease_owner = '', lease_expires_at = now() - interval '1 second', {_ZERO_PENDING}
      FROM {_LOCKED_BATCH}
     WHERE nb.id = ob.id
    RETURNING {_TAKE_PENDING.format(src="ob.")}""",
}

# The folding checkpoint: this item's outcome plus the batch's pending counters go to the
# run row in one statement, with its issue, the run lease and a NOTIFY whose counters
# include what other batches still hold.
FOLD_CHECKPOINT_SQL = f"""
WITH {_LOCK_CTE},
b AS (
    {{batch_sql}}
),
r AS (
    UPDATE tasks_admintaskrun AS run SET
        processed = run.processed + %(processed)s::int + b.p_processed,
        succeeded = run.succeeded + %(succeeded)s::int + b.p_succeeded,
        skipped = run.skipped + %(skipped)s::int + b.p_skipped,
        failed = run.failed + %(failed)s::int,
        spent_items = run.spent_items + %(items)s::int + b.p_processed,
        spent_seconds = run.spent_seconds + %(seconds)s::float8 + b.p_seconds,
        busy_seconds = run.busy_seconds + %(seconds)s::float8 + b.p_seconds,
        spent_bytes = run.spent_bytes + %(bytes)s::bigint + b.p_bytes,
        spent_writes = run.spent_writes + %(writes)s::int + b.p_writes,
        lease_owner = %(owner)s::text,
        lease_expires_at = {_RENEWED_LEASE.format(col="run.lease_expires_at")},
        last_progress_at = now(),
        updated_at = now(),
        recent_issues = CASE WHEN %(issue)s::jsonb IS NULL THEN run.recent_issues ELSE (
            SELECT coalesce(jsonb_agg(e ORDER BY n), '[]'::jsonb)
              FROM jsonb_array_elements(jsonb_build_array(%(issue)s::jsonb) || run.recent_issues)
                   WITH ORDINALITY AS t(e, n)
             WHERE n <= %(max_issues)s::int) END
      FROM b
     WHERE run.id = %(run)s::bigint
    RETURNING run.status, run.budget, run.spent_items, run.spent_seconds, run.spent_bytes,
              run.processed, run.succeeded, run.skipped, run.failed, run.total
),
o AS (
    -- FOR SHARE: the other batches as they are now (a fold committed after this
    -- statement's snapshot has moved their counters into r already).
    SELECT coalesce(sum(pending_processed), 0) AS processed, coalesce(sum(pending_succeeded), 0) AS succeeded,
           coalesce(sum(pending_skipped), 0) AS skipped
      FROM (SELECT pending_processed, pending_succeeded, pending_skipped FROM tasks_admintaskbatch
             WHERE run_id = %(run)s::bigint AND id <> %(batch)s::bigint FOR SHARE) AS others
)
SELECT lk.ok, r.status, r.budget, r.spent_items, r.spent_seconds, r.spent_bytes,
       CASE WHEN r.status IS NULL THEN NULL ELSE pg_notify(%(channel)s::text, json_build_object(
           'run', %(run)s::bigint, 'event', 'progress', 'item_id', %(item_id)s::bigint, 'outcome', %(outcome)s::text,
           'code', %(code)s::text, 'status', r.status, 'counters', json_build_object(
               'processed', r.processed + o.processed, 'succeeded', r.succeeded + o.succeeded,
               'skipped', r.skipped + o.skipped, 'failed', r.failed, 'total', r.total))::text) END
  FROM lk CROSS JOIN o LEFT JOIN r ON true
"""
_FOLD_SQL = {mode: FOLD_CHECKPOINT_SQL.format(batch_sql=sql) for mode, sql in _FOLD_BATCH.items()}


def _checkpoint(run_id, defn, owner, claim: _Claim, item_id, outcome: _Outcome, ledger_row, last: bool):
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
        counts["succeeded" if outcome.kind == "succeeded" else "skipped"] = 1
        if ledger_row is not None:
            ledger_action = ("succeeded", 0)
    else:
        attempts = (ledger_row.attempts if ledger_row else 0) + (1 if failure.counts_attempt else 0)
        exhausted = not failure.retryable or attempts >= settings.PICSITE_ITEM_MAX_ATTEMPTS
        if exhausted:
            counts["processed"], counts["failed"] = 1, 1
            ledger_action = ("failed", attempts)
        else:
            ledger_action, reported = ("retrying", attempts), "retry"
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
    params = _checkpoint_params(
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
        outcome=reported,
        code=failure.code if failure else None,
    )
    sql = FAST_CHECKPOINT_SQL if fast else _FOLD_SQL["done" if last else "advance"]
    after = (lambda: _write_ledger(run_id, item_id, ledger_action, failure)) if ledger_action else None
    row = _execute_checkpoint(sql, params, after=after)
    if row[1] is None:
        return None
    claim.position += 1
    if not fast:
        claim.folded_at = now
    if renew:
        claim.renew_after = now + _lease_seconds(defn) / 4
    budget, spent_items, spent_seconds, spent_bytes = row[2:6]
    b = (json.loads(budget) if isinstance(budget, str) else budget) or {}  # Django loads jsonb as text
    claim.budgeted = bool(b)
    if fast:
        if not b:
            return _CheckpointState(row[1], False)
        # A budget was set since this batch was claimed: spent_* leave out the batches'
        # pending counters, so check against the live ones (from here on every item folds).
        run = AdminTaskRun.objects.get(pk=run_id)
        cost = _run_item_cost(run)
        return _CheckpointState(row[1], _budget_exhausted(run, cost["seconds"], cost["bytes"]) is not None)
    per_s = spent_seconds / spent_items if spent_items else 0
    per_b = spent_bytes / spent_items if spent_items else 0
    reached = (
        ("items" in b and spent_items + 1 > b["items"])
        or ("seconds" in b and spent_seconds + per_s > b["seconds"])
        or ("bytes" in b and spent_bytes + per_b > b["bytes"])
    )
    return _CheckpointState(row[1], reached)


def _checkpoint_params(run_id: int, defn: TaskDefinition, owner: str, claim: _Claim, **item) -> dict:
    """Parameters of a checkpoint statement; ``item`` overrides the no-item defaults."""
    return {
        "processed": 0, "succeeded": 0, "skipped": 0, "failed": 0, "items": 0,
        "seconds": 0.0, "bytes": 0, "writes": 0,
        "issue": None, "item_id": None, "code": None, "renew": False,
        "lock_id": defn.lock_id,
        "lease": _lease_seconds(defn),
        "batch": claim.batch_id,
        "owner": owner,
        "position": claim.position,
        "run": run_id,
        "run_key": _run_key(run_id),
        "max_issues": MAX_RECENT_ISSUES,
        "channel": NOTIFY_CHANNEL,
        **item,
    }


_STALE_PREPARED = (psycopg.errors.FeatureNotSupported, psycopg.errors.InvalidSqlStatementName)


def _execute_checkpoint(sql: str, params: dict, *, after=None) -> tuple:
    """Run a checkpoint statement, spinning briefly while another worker of the run holds
    the try-lock. ``after`` (ledger writes) runs in the same transaction when the
    statement matched the batch. Returns the row: (lock ok, run status or None, ...)."""
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
                    row = cur.fetchone()
                if row[0] and row[1] is not None and after is not None:
                    after()
        except _STALE_PREPARED as exc:
            # A migration changed a column these statements return ("cached plan must not
            # change result type"), or the statement is gone (DISCARD ALL, a pooler):
            # nothing was written. Drop this connection's prepared statements (psycopg
            # forgets its own on DEALLOCATE ALL) and prepare afresh, once.
            if reprepared:
                raise
            logger.warning("checkpoint statement re-prepared after: %s", exc)
            reprepared = True
            with psycopg.Cursor(connection.connection) as cur:
                cur.execute("DEALLOCATE ALL")
            continue
        if row[0]:
            return row
        time.sleep(delay * random.uniform(0.5, 1.5))
        delay = min(delay * 2, 0.05)


def _write_ledger(run_id: int, item_id: int, action: tuple[str, int], failure: ItemFailure | None) -> None:
    state, attempts = action
    if state == "succeeded":
        AdminTaskItem.objects.filter(run_id=run_id, item_id=item_id).update(
            state=ItemState.SUCCEEDED, claimed=False, next_attempt_at=None
        )
        return
    next_at = timezone.now() + timedelta(seconds=_backoff_seconds(max(attempts, 1))) if state == "retrying" else None
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


def _release_batch(run_id: int, defn: TaskDefinition, owner: str, claim: _Claim) -> None:
    """Give the rest of a batch back (the next kick adopts it at once), folding its
    pending counters into the run. Does nothing if the lease was lost meanwhile."""
    params = _checkpoint_params(run_id, defn, owner, claim, outcome="released")
    _execute_checkpoint(_FOLD_SQL["release"], params)


# --- finishing ---------------------------------------------------------------------------


def _settle(run_id: int, defn: TaskDefinition) -> None:
    """Finish the run if nothing is left: success, or cancelled after a cancel request."""
    with transaction.atomic():
        with connection.cursor() as cur:
            if not _try_lock(cur, defn, run_id, wait_s=0.2):
                return  # another worker is mid-checkpoint and will settle after us
        run = AdminTaskRun.objects.get(pk=run_id)
        now = timezone.now()
        if run.status == RunStatus.CANCELLING:
            if not AdminTaskBatch.objects.filter(run=run, lease_expires_at__gt=now).exists():
                _finish(run, RunStatus.CANCELLED)
            return
        if run.status not in RunStatus.runnable():
            return
        if AdminTaskBatch.objects.filter(run=run).exists():
            return
        if AdminTaskItem.objects.filter(run=run, state=ItemState.RETRYING).exists():
            return
        more = (
            defn.scope_queryset(run.scope).filter(pk__gt=run.cursor, pk__lte=run.max_item_id).exists()
        )
        if more:
            return
        _finish(run, RunStatus.SUCCEEDED)


def _finish(run: AdminTaskRun, status: str, *, error: str = "") -> None:
    run.status = status
    run.finished_at = timezone.now()
    run.lease_owner, run.lease_expires_at = "", None
    fields = ["status", "finished_at", "lease_owner", "lease_expires_at", "updated_at"]
    fields += _end_batches(run, park_fresh=status != RunStatus.SUCCEEDED)
    if status == RunStatus.SUCCEEDED and run.processed != run.total:
        # Items that left the scope before their turn (deleted, or made ready by an
        # upload's own job) were never handed out: count them as skipped.
        gap = run.total - run.processed
        if gap > 0:
            run.skipped += gap
            run.processed += gap
            _append_issue(run, {"stage": "scope", "code": "left_scope", "message": f"{gap} items left the scope during the run"})
            fields += ["skipped", "processed", "recent_issues"]
        else:
            run.total = run.processed
            fields.append("total")
    if error:
        run.last_error = error[:2000]
        fields.append("last_error")
    run.timeline = [*(run.timeline or []), [round(time.time(), 1), run.processed]][-TIMELINE_MAX_POINTS:]
    fields.append("timeline")
    run.save(update_fields=fields)
    if status != RunStatus.SUCCEEDED:
        AdminTaskItem.objects.filter(run=run, state=ItemState.RETRYING).update(claimed=False)
    _notify(run.pk, "status", status=status, error=error or None)


def _end_batches(run: AdminTaskRun, *, park_fresh: bool) -> list[str]:
    """Fold every batch's pending counters into ``run`` (in memory; the caller saves) and
    end the batches. Called with the run's advisory lock held, so no checkpoint races it.
    Returns the fields changed.

    With ``park_fresh`` (cancel, failure) fresh batches stay, parked with no owner and an
    expired lease: their ids are past the cursor, so if "retry failed" reopens the run it
    adopts them instead of skipping them. Retry batches always go: their items are back
    in the ledger (``_finish`` unclaims them)."""
    with connection.cursor() as cur:
        cur.execute(
            f"""
            WITH gone AS (
                DELETE FROM tasks_admintaskbatch WHERE run_id = %(run)s AND (is_retry OR NOT %(park)s)
                RETURNING {_PENDING_COLUMNS}
            ), parked AS (
                UPDATE tasks_admintaskbatch AS nb
                   SET lease_owner = '', lease_expires_at = now() - interval '1 second', {_ZERO_PENDING}
                  FROM (SELECT id, {_PENDING_COLUMNS} FROM tasks_admintaskbatch
                         WHERE run_id = %(run)s AND NOT is_retry AND %(park)s FOR UPDATE) AS ob
                 WHERE nb.id = ob.id
                RETURNING {", ".join(f"ob.pending_{name}" for name in _PENDING)}
            )
            SELECT * FROM gone UNION ALL SELECT * FROM parked
            """,
            {"run": run.pk, "park": park_fresh},
        )
        rows = cur.fetchall()
    for row in rows:
        for value, targets in zip(row, _PENDING_INTO_RUN.values(), strict=True):
            for name in targets:
                setattr(run, name, getattr(run, name) + value)
    return [name for targets in _PENDING_INTO_RUN.values() for name in targets] if rows else []


def live_counters(run: AdminTaskRun) -> dict[str, Any]:
    """The run's counters as of now: its own plus what its batches still hold pending,
    read in one statement (one snapshot, so a fold in between cannot be missed or
    counted twice). A finished run has no batches and answers from ``run`` itself."""
    names = ("processed", "succeeded", "skipped", "failed", "spent_items", "spent_seconds", "spent_bytes", "spent_writes")
    own = {name: getattr(run, name) for name in names}
    if run.status in RunStatus.finished() or run.pk is None:
        return own
    with connection.cursor() as cur:
        # Each counter plus the pending one folded into it (_PENDING_INTO_RUN).
        cur.execute(
            """
            SELECT r.processed + coalesce(sum(b.pending_processed), 0),
                   r.succeeded + coalesce(sum(b.pending_succeeded), 0),
                   r.skipped + coalesce(sum(b.pending_skipped), 0),
                   r.failed,
                   r.spent_items + coalesce(sum(b.pending_processed), 0),
                   r.spent_seconds + coalesce(sum(b.pending_seconds), 0),
                   (r.spent_bytes + coalesce(sum(b.pending_bytes), 0))::bigint,
                   r.spent_writes + coalesce(sum(b.pending_writes), 0)
              FROM tasks_admintaskrun r LEFT JOIN tasks_admintaskbatch b ON b.run_id = r.id
             WHERE r.id = %s GROUP BY r.id
            """,
            [run.pk],
        )
        row = cur.fetchone()
    return own if row is None else dict(zip(names, row, strict=True))


def _append_issue(run: AdminTaskRun, issue: dict) -> None:
    issue = {"at": timezone.now().isoformat(), **issue}
    run.recent_issues = ([issue] + list(run.recent_issues or []))[:MAX_RECENT_ISSUES]


def _record_issue_now(run: AdminTaskRun, issue: dict) -> None:
    _append_issue(run, issue)
    run.save(update_fields=["recent_issues", "updated_at"])


def _fail_run(run_id: int, defn: TaskDefinition, message: str) -> None:
    logger.error("run %s failed: %s", run_id, message)
    with transaction.atomic():
        with connection.cursor() as cur:  # waits out any checkpoint in flight
            cur.execute("SELECT pg_advisory_xact_lock(%s, %s)", [defn.lock_id, _run_key(run_id)])
        run = AdminTaskRun.objects.select_for_update().get(pk=run_id)
        if run.status in RunStatus.finished():
            return
        _append_issue(run, {"stage": "run", "code": "run_failed", "message": message[:500]})
        run.save(update_fields=["recent_issues"])
        _finish(run, RunStatus.FAILED, error=message)
