"""Finish records: every terminal transition of a run (succeeded, failed, cancelled) writes
one ``AdminTaskRunFinish`` in the same transaction as the status change (``lifecycle.finish``),
numbered by the run's ``finish_seq``. Each record is then

- handed exactly once to the definition's ``on_finish`` hook: the hook runs inside the
  transaction that marks the record done, on a row taken with FOR UPDATE SKIP LOCKED, so
  no two processes run it and a crash before commit leaves it to run again;
- delivered at least once to the run's ``callback_url``: a signed POST whose ``webhook-id``
  is the record's, the same on every retry (receivers dedupe on it), retried with backoff
  until a 2xx, each attempt logged on the record.

``finishes_process`` does both; the worker that ended a run calls it at once, and the
scheduled (or push) tick calls it for retries and for anything a crash left behind.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from tasks.engine.common import definition
from tasks.engine.webhooks import webhook_post
from tasks.models import AdminTaskRun, AdminTaskRunFinish, DeliveryState

logger = logging.getLogger(__name__)

DELIVERY_LOG_MAX = 10


def finish_record(run: AdminTaskRun) -> AdminTaskRunFinish:
    """Write the record of ``run`` having just ended (its status and ``finish_seq`` saved in
    this same transaction; the caller holds the run's lock)."""
    return AdminTaskRunFinish.objects.create(
        run=run,
        seq=run.finish_seq,
        status=run.status,
        counters={
            name: getattr(run, name) for name in ("total", "missing", "processed", "succeeded", "skipped", "failed")
        },
        delivery_state=DeliveryState.PENDING if run.callback_url else DeliveryState.NONE,
        next_delivery_at=timezone.now() if run.callback_url else None,
    )


def finishes_process(*, run_id: int | None = None, limit: int = 50) -> int:
    """Run due on_finish hooks and deliver due callbacks (of one run, or of all);
    returns how many records it handled."""
    handled = 0
    for _ in range(limit):
        if not _run_one_hook(run_id):
            break
        handled += 1
    for _ in range(limit):
        if not _deliver_one(run_id):
            break
        handled += 1
    return handled


def _due(run_id: int | None):
    qs = AdminTaskRunFinish.objects.select_for_update(skip_locked=True, of=("self",)).select_related("run")
    return qs.filter(run_id=run_id) if run_id is not None else qs


def _run_one_hook(run_id: int | None) -> bool:
    with transaction.atomic():
        record = _due(run_id).filter(hook_done_at__isnull=True).order_by("id").first()
        if record is None:
            return False
        defn = definition(record.run.task_key)
        if defn.on_finish is not None:
            defn.on_finish(record)  # in this transaction: done and marked done commit together
        record.hook_done_at = timezone.now()
        record.save(update_fields=["hook_done_at"])
    return True


def _deliver_one(run_id: int | None) -> bool:
    now = timezone.now()
    with transaction.atomic():  # take the record for one attempt (a lease: next_delivery_at moves on)
        record = (
            _due(run_id).filter(delivery_state=DeliveryState.PENDING, next_delivery_at__lte=now).order_by("next_delivery_at").first()
        )
        if record is None:
            return False
        record.next_delivery_at = now + timedelta(seconds=settings.PICSITE_WEBHOOK_TIMEOUT_S * 3 + 5)
        record.save(update_fields=["next_delivery_at"])
    run = record.run
    result = webhook_post(url=run.callback_url, delivery_id=record.delivery_id, payload=payload(record), timestamp=now)
    attempt = {"at": now.isoformat(), "status": result.status, "error": result.error, "ms": result.ms}
    record.delivery_attempts += 1
    record.delivery_log = [*record.delivery_log, attempt][-DELIVERY_LOG_MAX:]
    if result.ok:
        record.delivery_state, record.delivered_at, record.next_delivery_at = DeliveryState.DELIVERED, timezone.now(), None
    elif record.delivery_attempts >= settings.PICSITE_WEBHOOK_MAX_ATTEMPTS:
        record.delivery_state, record.next_delivery_at = DeliveryState.GAVE_UP, None
        logger.warning("gave up delivering %s to %s: %s", record.delivery_id, run.callback_url, result.error)
    else:
        record.next_delivery_at = timezone.now() + timedelta(seconds=_backoff(record.delivery_attempts))
    AdminTaskRunFinish.objects.filter(pk=record.pk).update(
        delivery_attempts=record.delivery_attempts,
        delivery_log=record.delivery_log,
        delivery_state=record.delivery_state,
        delivered_at=record.delivered_at,
        next_delivery_at=record.next_delivery_at,
    )
    return True


def _backoff(attempts: int) -> float:
    return min(settings.PICSITE_WEBHOOK_RETRY_BASE_S * 2 ** (attempts - 1), 3600.0)


def payload(record: AdminTaskRunFinish) -> dict:
    """The callback's body (Standard Webhooks shape: type, timestamp, data)."""
    run = record.run
    return {
        "type": "task_run.finished",
        "timestamp": record.created_at.isoformat(),
        "data": {
            "run_id": run.pk,
            "task_key": run.task_key,
            "kind": run.kind,
            "finish_seq": record.seq,
            "status": record.status,
            "counters": record.counters,
            "scope": run.scope,
        },
    }


def finish_json(record: AdminTaskRunFinish) -> dict:
    """A finish record as the API and the admin show it."""
    return {
        "seq": record.seq,
        "status": record.status,
        "at": record.created_at.isoformat(),
        "counters": record.counters,
        "hook_done": record.hook_done_at is not None,
        "delivery": {
            "id": record.delivery_id,
            "state": record.delivery_state,
            "attempts": record.delivery_attempts,
            "next_attempt_at": record.next_delivery_at.isoformat() if record.next_delivery_at else None,
            "delivered_at": record.delivered_at.isoformat() if record.delivered_at else None,
            "log": record.delivery_log,
        },
    }
