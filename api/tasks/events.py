"""``GET .../runs/<id>/events``: a run as Server-Sent Events, a plain async Django view
(``api.tasks.routes`` documents it and routes each task's path here).

Every stream of this process shares one LISTEN connection (``tasks.notify_hub``); snapshots
are read on a small pool of threads of their own, so neither the number of Postgres
connections nor of their holders grows with the number of streams.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import weakref
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import DatabaseError, InterfaceError, close_old_connections, connection, transaction
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from psycopg.conninfo import make_conninfo

from api.auth import api_authorize
from api.errors import ApiError, api_error, bad_request
from api.http import method_not_allowed
from api.schemas import MAX_BIGINT
from api.tasks.access import VIEW, run_of_task
from api.tasks.schemas import run_json
from tasks import engine, selectors
from tasks.models import AdminTaskRun, RunKind, RunStatus
from tasks.notify_hub import (
    RESYNC,
    EventsUnavailable,
    Subscription,
    TooManyStreams,
    notify_hub_for_loop,
)

logger = logging.getLogger(__name__)

SSE_MAX_STREAM_S = 600
SSE_KEEPALIVE_S = 15
SSE_SNAPSHOT_EVERY_S = 0.5
SSE_RETRY_MS = 3000


@dataclass(frozen=True)
class _StreamStart:
    refusal: JsonResponse | None = None
    conninfo: str = ""
    user_key: Any = None
    batch: bool = False  # a batch run: item events, an items snapshot, Last-Event-ID
    last_event_id: int | None = None  # the client's Last-Event-ID (header or ?last_event_id=)


# OPTIONS keys that Django or psycopg.connect consume: not libpq conninfo parameters.
DJANGO_ONLY_OPTIONS = {"isolation_level", "server_side_binding", "pool", "assume_role", "cursor_factory", "prepare_threshold"}
# TCP keepalives on the long-lived LISTEN connection: a peer that vanished silently is
# noticed in about a minute (unless the database settings say otherwise).
LISTEN_KEEPALIVES = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}
SSE_RETRY_AFTER_S = 10
SSE_LISTEN_WAIT_S = 15  # how long a new stream waits for the hub's LISTEN before a 503
SSE_SNAPSHOT_THREADS = 2
_snapshot_executor = ThreadPoolExecutor(max_workers=SSE_SNAPSHOT_THREADS, thread_name_prefix="sse-snapshot")


def _listen_conninfo() -> str:
    """libpq conninfo of Django's default database (HOST may be a unix-socket dir)."""
    s = connection.settings_dict
    params: dict[str, Any] = {
        "dbname": s.get("NAME"),
        "user": s.get("USER"),
        "password": s.get("PASSWORD"),
        "host": s.get("HOST"),
        "port": s.get("PORT"),
        **LISTEN_KEEPALIVES,
        "connect_timeout": settings.PICSITE_DB_CONNECT_TIMEOUT_S,
    }
    for key, value in (s.get("OPTIONS") or {}).items():
        if key not in DJANGO_ONLY_OPTIONS and isinstance(value, str | int):
            params[key] = value
    return make_conninfo(**{k: v for k, v in params.items() if v not in (None, "")})


def _stream_start(request: HttpRequest, *, task_key: str, run_id: int) -> _StreamStart:
    try:
        api_authorize(request, access=VIEW)
        run = run_of_task(task_key=task_key, run_id=run_id)
        last_event_id = _last_event_id(request)
    except ApiError as exc:
        return _StreamStart(refusal=exc.response())
    except engine.EngineError as exc:
        return _StreamStart(refusal=api_error(exc.http_status, exc.code, exc.message, exc.details))
    start = _StreamStart(
        conninfo=_listen_conninfo(),
        user_key=request.user.pk,
        batch=run.kind == RunKind.BATCH,
        last_event_id=last_event_id,
    )
    if not connection.in_atomic_block:
        # This request's thread would hold its connection for the whole stream (up to
        # SSE_MAX_STREAM_S); the stream reads through the snapshot threads instead.
        connection.close()
    return start


def _last_event_id(request: HttpRequest) -> int | None:
    """The client's Last-Event-ID: the header a reconnecting EventSource sends, or the
    ``last_event_id`` query parameter (a page that opens a new EventSource itself)."""
    raw = request.headers.get("Last-Event-ID")
    name = "Last-Event-ID"
    if raw is None:
        raw, name = request.GET.get("last_event_id"), "last_event_id"
    if raw is None or raw.strip() == "":
        return None
    raw = raw.strip()
    if not (raw.isascii() and raw.isdigit()) or int(raw) > MAX_BIGINT:
        raise bad_request("invalid_parameter", f"{name} must be an event id (a non-negative integer).", field=name)
    return int(raw)


def _item_event(run_id: int, event_id: int, item: dict[str, Any]) -> dict[str, Any]:
    """An item event as the stream sends it (the same shape as the engine's NOTIFY)."""
    return {"run": run_id, "event": "item", "id": event_id, "item": item}


def _items_snapshot_read(run_id: int) -> dict[str, Any]:
    """Every item of a batch run and the id of the last event they reflect, read in one
    REPEATABLE READ snapshot: events commit in id order per run (under the run's lock), so
    the items show exactly the events up to that id and none after."""
    close_old_connections()
    try:
        with transaction.atomic():
            with connection.cursor() as cur:
                cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            last = selectors.run_last_event_id(run_id=run_id)
            items = [engine.item_json(row) for row in selectors.run_items_all(run_id=run_id)]
        return {"run": run_id, "event": "items", "last_event_id": last, "items": items}
    finally:
        close_old_connections()


def _events_after_read(run_id: int, after: int) -> list[dict[str, Any]]:
    """The run's item events after ``after``, in order (a replay; at most SSE_REPLAY_CHUNK)."""
    close_old_connections()
    try:
        return [
            _item_event(run_id, event.pk, event.data)
            for event in selectors.run_events_after(run_id=run_id, after=after, limit=SSE_REPLAY_CHUNK)
        ]
    finally:
        close_old_connections()


SSE_REPLAY_CHUNK = 1000
_items_snapshot = sync_to_async(_items_snapshot_read, thread_sensitive=False, executor=_snapshot_executor)
_events_after = sync_to_async(_events_after_read, thread_sensitive=False, executor=_snapshot_executor)


def _run_snapshot(run_id: int) -> dict[str, Any] | None:
    # Runs on an sse-snapshot thread: drop a broken or aged connection first and let
    # CONN_MAX_AGE decide after, as a request's start and end would.
    close_old_connections()
    try:
        run = AdminTaskRun.objects.select_related("created_by").filter(pk=run_id).first()
        return run_json(run) if run is not None else None
    finally:
        close_old_connections()


_snapshot = sync_to_async(_run_snapshot, thread_sensitive=False, executor=_snapshot_executor)


def _sse(event: str, data: Any, *, event_id: int | None = None) -> bytes:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'), default=str)}\n\n".encode()


class _ItemEvents:
    """A batch run's item events on one stream: each sent once, in id order, none missed.

    ``sent`` is the highest event id the client has (from its Last-Event-ID, the items
    snapshot or an event sent). Everything after it is read from the table (``catch_up``:
    on connect, after a RESYNC, before the stream ends); NOTIFYs at or below it are
    duplicates of what was read and are dropped."""

    def __init__(self, run_id: int):
        self.run_id = run_id
        self.sent = 0

    async def catch_up(self) -> AsyncIterator[bytes]:
        while True:
            events = await _events_after(self.run_id, self.sent)
            for event in events:
                yield self.send(event)
            if len(events) < SSE_REPLAY_CHUNK:
                return

    def send(self, event: dict[str, Any]) -> bytes:
        self.sent = event["id"]
        return _sse("item", event, event_id=event["id"])

    def fresh(self, payload: dict[str, Any]) -> bool:
        return isinstance(payload.get("id"), int) and payload["id"] > self.sent


async def _run_events(
    *, run_id: int, subscription: Subscription, batch: bool = False, last_event_id: int | None = None
) -> AsyncIterator[bytes]:
    """snapshot, then item/status events as NOTIFYs arrive (from any host), a fresh
    snapshot at most every 0.5 s while events flow (and after the hub had to
    reconnect), keepalives; ends when the run finishes (after a final snapshot) or
    after SSE_MAX_STREAM_S. The hub was LISTENing before this starts.

    A batch run's stream also sends, after the run snapshot, an ``items`` snapshot (every
    item, its SSE id the last event it reflects) or, for a client that gives its
    Last-Event-ID, every item event after that id; then an ``item`` event (SSE id = the
    event's) for every item state change."""
    finished = set(RunStatus.finished())
    inbox = subscription.queue
    getter: asyncio.Task | None = None
    items = _ItemEvents(run_id) if batch else None
    try:
        # Snapshot only after LISTEN: no change can fall between the two.
        state = await _snapshot(run_id)
        yield f"retry: {SSE_RETRY_MS}\n\n".encode()
        if state is None:
            yield _sse("status", {"run": run_id, "event": "status", "status": "gone"})
            return
        yield _sse("snapshot", state)
        if items is not None:
            # Read after LISTEN too: a change is in what is read here or comes as a NOTIFY.
            if last_event_id is None:
                snapshot = await _items_snapshot(run_id)
                items.sent = snapshot["last_event_id"]
                yield _sse("items", snapshot, event_id=snapshot["last_event_id"])
            else:
                items.sent = last_event_id
                async for chunk in items.catch_up():
                    yield chunk
        if state["status"] in finished:
            return
        now = time.monotonic()
        end = now + SSE_MAX_STREAM_S
        next_keepalive = now + SSE_KEEPALIVE_S
        last_snapshot = now
        dirty = False
        getter = asyncio.create_task(inbox.get())
        while now < end:
            due = min(next_keepalive, end)
            if dirty:
                due = min(due, last_snapshot + SSE_SNAPSHOT_EVERY_S)
            await asyncio.wait({getter}, timeout=max(due - now, 0))
            received = []
            if getter.done():
                received.append(getter.result())
                while not inbox.empty():
                    received.append(inbox.get_nowait())
                getter = asyncio.create_task(inbox.get())
            run_done = resync = False
            for payload in received:
                if payload is RESYNC:
                    resync = True
                    continue
                if payload["event"] == "item":
                    if items is None or not items.fresh(payload):
                        continue
                    if payload["item"].get("truncated"):
                        async for chunk in items.catch_up():  # the whole item is in the table
                            yield chunk
                    else:
                        yield items.send(payload)
                    continue  # item events do not call for a run snapshot
                yield _sse(payload["event"], payload)
                dirty = True
                if payload["event"] == "status" and payload.get("status") in finished:
                    run_done = True
                    break
            now = time.monotonic()
            if run_done or resync or (dirty and now - last_snapshot >= SSE_SNAPSHOT_EVERY_S):
                if items is not None:
                    # NOTIFYs may have been lost (resync), or come after the run's end.
                    async for chunk in items.catch_up():
                        yield chunk
                state = await _snapshot(run_id)
                if state is None:
                    return
                if not run_done and state["status"] in finished:
                    # The run ended before its status NOTIFY reached this stream: the
                    # stream still ends with a status event and then the final snapshot.
                    yield _sse("status", {"run": run_id, "event": "status", "status": state["status"]})
                yield _sse("snapshot", state)
                if run_done or state["status"] in finished:
                    return
                last_snapshot, dirty = time.monotonic(), False
            if now >= next_keepalive:
                yield b": keepalive\n\n"
                next_keepalive = now + SSE_KEEPALIVE_S
    except (DatabaseError, InterfaceError) as exc:  # a snapshot failed: the client reconnects
        logger.warning("event stream for run %s stopped: %s", run_id, exc)
    finally:
        if getter is not None:
            getter.cancel()
            await asyncio.gather(getter, return_exceptions=True)
        subscription.close()


async def run_events(request: HttpRequest, *, task_key: str, run_id: int) -> HttpResponse:
    """``GET runs/<id>/events``: the run as a ``text/event-stream`` (ASGI only).

    429 ``too_many_streams`` past PICSITE_SSE_MAX_STREAMS_PER_USER or PICSITE_SSE_MAX_STREAMS
    (per process); 503 ``events_unavailable`` if the process cannot LISTEN.
    """
    if request.method != "GET":
        return method_not_allowed(request, allow="GET")
    start = await sync_to_async(_stream_start)(request, task_key=task_key, run_id=run_id)
    if start.refusal is not None:
        return start.refusal
    hub = notify_hub_for_loop(channel=engine.NOTIFY_CHANNEL, conninfo=start.conninfo)
    try:
        subscription = hub.subscribe(
            run_id=run_id,
            user_key=start.user_key,
            max_total=settings.PICSITE_SSE_MAX_STREAMS,
            max_per_user=settings.PICSITE_SSE_MAX_STREAMS_PER_USER,
        )
    except TooManyStreams as exc:
        response = api_error(
            429, "too_many_streams", f"{exc}; close one or poll GET runs/{run_id}.", {"scope": exc.scope, "limit": exc.limit}
        )
        response["Retry-After"] = str(SSE_RETRY_AFTER_S)
        return response
    try:
        await hub.wait_listening(timeout=SSE_LISTEN_WAIT_S)
    except EventsUnavailable as exc:
        subscription.close()
        response = api_error(503, "events_unavailable", f"Live events are unavailable: {exc}; poll GET runs/{run_id}.")
        response["Retry-After"] = str(SSE_RETRY_AFTER_S)
        return response
    except BaseException:  # cancelled: the client left while we waited
        subscription.close()
        raise
    stream = _run_events(run_id=run_id, subscription=subscription, batch=start.batch, last_event_id=start.last_event_id)
    # If the response is dropped before streaming starts (client gone), the generator
    # never runs its finally: give the slot back when it is collected.
    weakref.finalize(stream, subscription.close)
    response = StreamingHttpResponse(stream, content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # nginx: do not buffer the stream
    return response
