"""Batch runs keep a row per requested item (``AdminTaskItem``): created at create in
submission order (pending, or missing for an id that does not exist), moved to processing
when a worker starts the item and to its outcome at the item's checkpoint. Every change is
written with an ``AdminTaskEvent`` in the same transaction, under the run's advisory lock,
so the events of one run commit in id order: the SSE stream sends them with that id, and a
client reconnecting with ``Last-Event-ID`` receives every transition it missed. Library
runs keep today's cheap bookkeeping (a ledger row only for an item that failed)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from django.db import transaction
from django.db.models import F
from django.utils import timezone

from tasks.engine.common import lock_run, notify
from tasks.models import AdminTaskEvent, AdminTaskItem, AdminTaskRun, ItemState
from tasks.registry import ItemFailure, TaskDefinition

# A retrying item is shown as pending (with its next attempt time): the states a client
# sees are pending -> processing -> succeeded | skipped | failed, and missing.
PUBLIC_STATE = {ItemState.RETRYING: ItemState.PENDING}


def public_state(state: str) -> str:
    return str(PUBLIC_STATE.get(state, state))


def items_create(*, run: AdminTaskRun, ids: list[int], existing: set[int]) -> None:
    """A row per requested id (already deduplicated, in submission order): pending when
    the item exists, missing (never processed) when it does not."""
    AdminTaskItem.objects.bulk_create(
        AdminTaskItem(
            run=run,
            item_id=item_id,
            position=position,
            state=ItemState.PENDING if item_id in existing else ItemState.MISSING,
        )
        for position, item_id in enumerate(ids)
    )


def item_start(*, run_id: int, defn: TaskDefinition, item_id: int) -> None:
    """The worker starts the item: pending (or retrying) -> processing, with its event."""
    with transaction.atomic():
        lock_run(defn, run_id)
        row = AdminTaskItem.objects.select_for_update().filter(run_id=run_id, item_id=item_id).first()
        if row is None or row.state in (ItemState.MISSING, ItemState.SUCCEEDED, ItemState.SKIPPED, ItemState.FAILED):
            return
        row.state = ItemState.PROCESSING
        row.started_at = row.started_at or timezone.now()
        row.save(update_fields=["state", "started_at", "updated_at"])
        _event(row)


def item_record(
    *,
    run_id: int,
    item_id: int,
    state: ItemState,
    attempts: int,
    next_attempt_at: datetime | None,
    failure: ItemFailure | None,
    seconds: float,
    bytes_written: int,
    result: dict[str, Any] | None,
) -> None:
    """The item's checkpoint verdict; called inside the checkpoint's transaction (the run's
    try-lock is held)."""
    fields: dict[str, Any] = {
        "state": state,
        "attempts": attempts,
        "next_attempt_at": next_attempt_at,
        "claimed": False,
        "seconds": F("seconds") + seconds,
        "bytes": F("bytes") + bytes_written,
    }
    if state in (ItemState.SUCCEEDED, ItemState.SKIPPED, ItemState.FAILED):
        fields["finished_at"] = timezone.now()
    if result is not None:
        fields["result"] = result
    if failure is not None:
        fields.update(
            last_error_code=failure.code,
            last_error_stage=failure.stage,
            last_error_message=failure.message[:2000],
        )
    AdminTaskItem.objects.filter(run_id=run_id, item_id=item_id).update(**fields)
    _event(AdminTaskItem.objects.get(run_id=run_id, item_id=item_id))


def item_json(row: AdminTaskItem) -> dict[str, Any]:
    """An item as clients see it (API pages, SSE events and snapshots)."""
    return {
        "item_id": row.item_id,
        "position": row.position,
        "state": public_state(row.state),
        "attempts": row.attempts,
        "next_attempt_at": row.next_attempt_at.isoformat() if row.next_attempt_at else None,
        "error": (
            {"code": row.last_error_code, "stage": row.last_error_stage, "message": row.last_error_message}
            if row.last_error_code
            else None
        ),
        "started_at": row.started_at.isoformat() if row.started_at else None,
        "finished_at": row.finished_at.isoformat() if row.finished_at else None,
        "seconds": round(row.seconds, 3),
        "bytes": row.bytes,
        "result": row.result,
    }


# A NOTIFY payload must stay under Postgres' 8000 bytes: an item too big to announce whole
# (a long result) is announced without its result; readers fetch it from the event row.
NOTIFY_ITEM_MAX = 6000


def _event(row: AdminTaskItem) -> None:
    data = item_json(row)
    event = AdminTaskEvent.objects.create(run_id=row.run_id, item_id=row.item_id, state=row.state, data=data)
    announced = data if len(json.dumps(data, default=str)) <= NOTIFY_ITEM_MAX else {**data, "result": None, "truncated": True}
    notify(row.run_id, "item", id=event.pk, item=announced)
