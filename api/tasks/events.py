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
from django.db import DatabaseError, InterfaceError, close_old_connections, connection
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from psycopg.conninfo import make_conninfo

from api.auth import api_authorize
from api.errors import ApiError, api_error
from api.http import method_not_allowed
from api.tasks.access import VIEW, run_of_task
from api.tasks.schemas import run_json
from tasks import engine
from tasks.models import AdminTaskRun, RunStatus
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
        run_of_task(task_key=task_key, run_id=run_id)
    except ApiError as exc:
        return _StreamStart(refusal=exc.response())
    except engine.EngineError as exc:
        return _StreamStart(refusal=api_error(exc.http_status, exc.code, exc.message, exc.details))
    start = _StreamStart(conninfo=_listen_conninfo(), user_key=request.user.pk)
    if not connection.in_atomic_block:
        # This request's thread would hold its connection for the whole stream (up to
        # SSE_MAX_STREAM_S); the stream reads through the snapshot threads instead.
        connection.close()
    return start


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


def _sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'), default=str)}\n\n".encode()


async def _run_events(*, run_id: int, subscription: Subscription) -> AsyncIterator[bytes]:
    """snapshot, then item/status events as NOTIFYs arrive (from any host), a fresh
    snapshot at most every 0.5 s while events flow (and after the hub had to
    reconnect), keepalives; ends when the run finishes (after a final snapshot) or
    after SSE_MAX_STREAM_S. The hub was LISTENing before this starts."""
    finished = set(RunStatus.finished())
    inbox = subscription.queue
    getter: asyncio.Task | None = None
    try:
        # Snapshot only after LISTEN: no change can fall between the two.
        state = await _snapshot(run_id)
        yield f"retry: {SSE_RETRY_MS}\n\n".encode()
        if state is None:
            yield _sse("status", {"run": run_id, "event": "status", "status": "gone"})
            return
        yield _sse("snapshot", state)
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
                yield _sse(payload["event"], payload)
                dirty = True
                if payload["event"] == "status" and payload.get("status") in finished:
                    run_done = True
                    break
            now = time.monotonic()
            if run_done or resync or (dirty and now - last_snapshot >= SSE_SNAPSHOT_EVERY_S):
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
    stream = _run_events(run_id=run_id, subscription=subscription)
    # If the response is dropped before streaming starts (client gone), the generator
    # never runs its finally: give the slot back when it is collected.
    weakref.finalize(stream, subscription.close)
    response = StreamingHttpResponse(stream, content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # nginx: do not buffer the stream
    return response
