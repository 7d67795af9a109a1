"""JSON API over the task-run engine: ``/api/v1/preprocess-tasks/`` and ``/api/v1/tasks/``.

Thin adapters: parse and check the request, call ``tasks.engine``, turn the result
into a dict (``tasks.serializers``). Every answer that is not a success is a JSON
``{"error": {"code", "message", "details"}}``: engine refusals map by their
``http_status``, so bad input is a 4xx, never a 500.

Auth (``api.auth.api_authorize``): a bearer token, or a staff session that
passes CSRF on unsafe methods; ``POST tick`` also takes an HMAC-signed request
(``api.push_sign``) so a cron job or a push service can drive the engine.
Each handler declares what it needs (``@requires``): reading runs needs
``tasks.view_admintaskrun`` (token scope ``read``), changing them ``tasks.run_tasks``
(scope ``write``; the tick route also takes scope ``tick``) — the admin's permissions.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import weakref
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import wraps
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured, RequestDataTooBig
from django.db import DatabaseError, InterfaceError, close_old_connections, connection
from django.db.models import prefetch_related_objects
from django.http import HttpRequest, HttpResponse, JsonResponse, QueryDict, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt
from psycopg.conninfo import make_conninfo

from api import push_sign
from api.auth import Access, ApiAuthError, api_authorize, api_error
from api.push_replay import push_signature_use_record
from tasks import engine, registry, serializers
from tasks.jobs import start_run_drains
from tasks.models import PERM_RUN_TASKS, PERM_VIEW_RUNS, AdminTaskRun, RunStatus
from tasks.notify_hub import (
    RESYNC,
    EventsUnavailable,
    Subscription,
    TooManyStreams,
    notify_hub_for_loop,
)

logger = logging.getLogger(__name__)

MAX_BIGINT = 2**63 - 1
MAX_JSON_BODY_BYTES = 64 * 1024
KICK_TIME_BUDGET_S = 4
BOOL_VALUES = {"true": True, "1": True, "false": False, "0": False}

# Server-Sent Events
SSE_MAX_STREAM_S = 600
SSE_KEEPALIVE_S = 15
SSE_SNAPSHOT_EVERY_S = 0.5
SSE_RETRY_MS = 3000


class BadRequest(Exception):
    """A 400 found by the adapter itself (malformed JSON, wrong shapes, bad params)."""

    def __init__(self, code: str, message: str, *, field: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = {"field": field} if field else {}


class PayloadTooLarge(Exception):
    pass


Handler = Callable[..., HttpResponse]

# What the routes need of their caller (superusers hold every permission).
VIEW = Access(permission=PERM_VIEW_RUNS, scopes=("read",))
CONTROL = Access(permission=PERM_RUN_TASKS, scopes=("write",))
# A scheduler's token can be narrowed to "tick"; "write" covers it too, since it may
# already create and kick runs (so today's read+write tokens keep ticking).
TICK = Access(permission=PERM_RUN_TASKS, scopes=("tick", "write"))


def requires(access: Access) -> Callable[[Handler], Handler]:
    """Declare what a handler's caller needs; ``api_endpoint`` refuses handlers without it."""

    def mark(handler: Handler) -> Handler:
        handler.access = access
        return handler

    return mark


# --- the decorator every JSON route goes through ---------------------------------------------


def api_endpoint(handlers: dict[str, Handler], *, push_signed: bool = False) -> Callable[..., HttpResponse]:
    """One view for one path: method dispatch (405 + Allow), auth, error mapping.

    Handlers are called as ``handler(request, **url_kwargs)`` once the caller has
    what the handler ``@requires`` (bearer token, or session + CSRF) or, when
    ``push_signed``, sent a valid push signature.
    """
    unguarded = [h.__name__ for h in handlers.values() if not isinstance(getattr(h, "access", None), Access)]
    if unguarded:
        raise ImproperlyConfigured(f"API handlers without @requires: {', '.join(unguarded)}")
    allow = ", ".join(sorted(handlers))

    @csrf_exempt  # CSRF is enforced by api_authorize for session callers (JSON 403)
    @wraps(next(iter(handlers.values())))
    def view(request: HttpRequest, **kwargs: Any) -> HttpResponse:
        handler = handlers.get(request.method or "")
        if handler is None:
            return method_not_allowed(request, allow=allow)
        try:
            denied = _authorize(request, access=handler.access, push_signed=push_signed)
            if denied is not None:
                return denied
            return handler(request, **kwargs)
        except ApiAuthError as exc:
            return exc.response()
        except BadRequest as exc:
            return api_error(400, exc.code, exc.message, exc.details)
        except PayloadTooLarge:
            return api_error(413, "body_too_large", f"JSON bodies are limited to {MAX_JSON_BODY_BYTES} bytes.")
        except engine.EngineError as exc:
            return api_error(exc.http_status, exc.code, exc.message, exc.details)

    return view


def method_not_allowed(request: HttpRequest, *, allow: str) -> JsonResponse:
    response = api_error(405, "method_not_allowed", f"{request.method} is not allowed here; use {allow}.")
    response["Allow"] = allow
    return response


def _authorize(request: HttpRequest, *, access: Access, push_signed: bool) -> JsonResponse | None:
    """None when the caller may proceed, else the JSON refusal.

    The caller needs ``access`` (``api_authorize``: active staff, the permission and,
    for a token, one of the scopes). With ``push_signed``, a good push signature is
    authority enough; on a bad one the caller still passes on its own credentials,
    else it gets a 401 saying what was wrong with the signature.
    """
    signature_sent = push_signed and _signature_sent(request)
    problem = None
    if signature_sent:
        problem = _push_signature_problem(request)
        if problem is None:
            request.api_auth = "push_signature"
            return None
    try:
        api_authorize(request, access=access)
    except ApiAuthError as exc:
        if signature_sent:
            return api_error(401, "invalid_signature", f"Push signature refused: {problem}.")
        return exc.response()
    return None


def _signature_sent(request: HttpRequest) -> bool:
    headers = request.headers
    return push_sign.TIMESTAMP_HEADER in headers or push_sign.SIGNATURE_HEADER in headers


def _push_signature_problem(request: HttpRequest) -> str | None:
    """None if the request is signed under a configured push secret, else why not.

    A good signature is used up here; a second use raises ApiAuthError (401
    ``replayed_signature``), which no other credential on the request overrides.
    """
    secrets = [s for s in (settings.PICSITE_PUSH_SECRET, settings.PICSITE_PUSH_SECRET_NEXT) if s]
    if not secrets:
        return "push signatures are not configured on this server"
    timestamp = request.headers.get(push_sign.TIMESTAMP_HEADER)
    signature_header = request.headers.get(push_sign.SIGNATURE_HEADER)
    problem = push_sign.verify(
        secrets=secrets,
        method=request.method or "",
        path=request.path,
        body=_raw_body(request),
        timestamp=timestamp,
        signature_header=signature_header,
    )
    if problem is not None:
        return problem
    signed = push_sign.parse_headers(timestamp=timestamp, signature_header=signature_header)
    assert isinstance(signed, push_sign.SignedHeaders)  # verify accepted them
    if not push_signature_use_record(digest=signed.digest, timestamp=signed.timestamp):
        raise ApiAuthError(
            status=401,
            code="replayed_signature",
            message="This push signature was already used; sign every request anew.",
        )
    return None


# --- request parsing -------------------------------------------------------------------------


def _raw_body(request: HttpRequest) -> bytes:
    try:
        declared = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        declared = 0
    if declared > MAX_JSON_BODY_BYTES:
        raise PayloadTooLarge()
    try:
        body = request.body
    except RequestDataTooBig:
        raise PayloadTooLarge() from None
    if len(body) > MAX_JSON_BODY_BYTES:
        raise PayloadTooLarge()
    return body


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _json_object(request: HttpRequest, *, allowed: set[str], required: set[str]) -> dict[str, Any]:
    raw = _raw_body(request)
    if not raw.strip():
        raise BadRequest("malformed_json", "The body must be a JSON object.", field="body")
    try:
        data = json.loads(raw, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as exc:
        raise BadRequest("malformed_json", f"The body is not valid JSON: {exc}", field="body") from None
    if not isinstance(data, dict):
        raise BadRequest("invalid_body", "The body must be a JSON object.", field="body")
    for key in sorted(data):
        if key not in allowed:
            raise BadRequest(
                "invalid_body", f"Unknown key {key!r}; allowed: {', '.join(sorted(allowed))}.", field=key
            )
    for key in sorted(required):
        if key not in data:
            raise BadRequest("invalid_body", f"{key!r} is required.", field=key)
    return data


def _object_field(data: dict[str, Any], name: str) -> dict[str, Any]:
    value = data[name]
    if not isinstance(value, dict):
        raise BadRequest("invalid_body", f"{name!r} must be a JSON object.", field=name)
    return value


def _guard_scope_ids(*, task_key: str, scope: dict[str, Any]) -> None:
    """Ids beyond the database's bigint range are refused here, not by a DataError."""
    for scope_field in registry.get(task_key).scope_fields:
        value = scope.get(scope_field.name)
        if scope_field.type != "int_list" or not isinstance(value, list):
            continue
        if any(isinstance(v, int) and not isinstance(v, bool) and v > MAX_BIGINT for v in value):
            raise engine.InvalidScope(
                f"{scope_field.name} holds an id above {MAX_BIGINT}", details={"field": scope_field.name}
            )


def _parse_query_value(scope_field: registry.ScopeField, value: str) -> Any:
    name = scope_field.name
    if scope_field.type == "bool":
        parsed = BOOL_VALUES.get(value.strip().lower())
        if parsed is None:
            raise BadRequest("invalid_parameter", f"{name} must be true, false, 1 or 0.", field=name)
        return parsed
    if scope_field.type == "int_list":
        parts = [part.strip() for part in value.split(",")]
        if not all(part.isascii() and part.isdigit() for part in parts):
            raise BadRequest("invalid_parameter", f"{name} must be comma-separated positive integers.", field=name)
        ids = [int(part) for part in parts]
        if any(i <= 0 or i > MAX_BIGINT for i in ids):
            raise BadRequest("invalid_parameter", f"{name} ids must be between 1 and {MAX_BIGINT}.", field=name)
        return ids
    if value not in scope_field.choices:
        raise BadRequest(
            "invalid_parameter", f"{name} must be one of {', '.join(scope_field.choices)}.", field=name
        )
    return value


def _scope_from_query(*, task_key: str, query: QueryDict) -> dict[str, Any]:
    fields = {f.name: f for f in registry.get(task_key).scope_fields}
    scope: dict[str, Any] = {}
    for name in query:
        scope_field = fields.get(name)
        if scope_field is None:
            allowed = ", ".join(sorted(fields)) or "none"
            raise BadRequest("unknown_parameter", f"Unknown query parameter {name!r}; allowed: {allowed}.", field=name)
        scope[name] = _parse_query_value(scope_field, query[name])
    return scope


# --- selectors the views need --------------------------------------------------------------


def _run_of_task(*, task_key: str, run_id: int) -> AdminTaskRun:
    """The run, if it exists and belongs to ``task_key`` (else the engine's 404)."""
    run = None
    if 0 < run_id <= MAX_BIGINT:
        run = AdminTaskRun.objects.select_related("created_by").filter(pk=run_id, task_key=task_key).first()
    if run is None:
        raise engine.RunNotFound(f"no {task_key} run with id {run_id}")
    return run


def _thumbnails(*, task_key: str, item_ids: list[int]) -> dict[int, str]:
    """The definition's thumbnails of these items, if it has any."""
    hook = registry.get(task_key).item_thumbnail_urls
    return hook(item_ids) if hook is not None and item_ids else {}


def _run_json(run: AdminTaskRun, *, status: int = 200) -> JsonResponse:
    return JsonResponse(serializers.run_to_dict(run), status=status)


# --- handlers -----------------------------------------------------------------------------------


@requires(VIEW)
def _preview_count(request: HttpRequest, *, task_key: str) -> JsonResponse:
    scope = _scope_from_query(task_key=task_key, query=request.GET)
    preview = engine.preview_count(task_key=task_key, scope=scope)
    return JsonResponse(serializers.preview_to_dict(preview))


@requires(VIEW)
def _runs_list(request: HttpRequest, *, task_key: str) -> JsonResponse:
    runs = engine.list_runs(task_key=task_key, limit=10)
    everything = [r for r in [runs["active"], *runs["recent"]] if r is not None]
    prefetch_related_objects(everything, "created_by")
    return JsonResponse(serializers.run_list_to_dict(active=runs["active"], recent=runs["recent"]))


@requires(CONTROL)
def _runs_create(request: HttpRequest, *, task_key: str) -> JsonResponse:
    data = _json_object(request, allowed={"scope", "budget"}, required={"scope"})
    scope = _object_field(data, "scope")
    budget = _object_field(data, "budget") if "budget" in data else None
    _guard_scope_ids(task_key=task_key, scope=scope)
    run = engine.create(task_key=task_key, scope=scope, budget=budget, user=request.user)
    start_run_drains(run_id=run.pk)
    response = _run_json(run, status=201)
    response["Location"] = f"{request.path.rstrip('/')}/{run.pk}"
    return response


@requires(VIEW)
def _run_detail(request: HttpRequest, *, task_key: str, run_id: int) -> JsonResponse:
    _run_of_task(task_key=task_key, run_id=run_id)
    found = engine.detail(run_id=run_id, task_key=task_key)
    run, items = found["run"], found["items"]
    prefetch_related_objects([run], "created_by")
    thumbnails = _thumbnails(task_key=task_key, item_ids=[item.item_id for item in items])
    return JsonResponse(serializers.run_detail_to_dict(run=run, items=items, thumbnails=thumbnails))


@requires(CONTROL)
def _run_kick(request: HttpRequest, *, task_key: str, run_id: int) -> JsonResponse:
    run = _run_of_task(task_key=task_key, run_id=run_id)
    if run.status in RunStatus.finished():
        return _run_json(run)
    if settings.PICSITE_ADMIN_PAGE_DRIVES_KICKS:
        # No worker may be running: the open admin page drives the work itself.
        run = engine.kick(run_id=run.pk, time_budget_s=KICK_TIME_BUDGET_S)
    elif run.status in [*RunStatus.runnable(), RunStatus.CANCELLING]:
        start_run_drains(run_id=run.pk)
    return _run_json(run)


@requires(CONTROL)
def _run_cancel(request: HttpRequest, *, task_key: str, run_id: int) -> JsonResponse:
    run = _run_of_task(task_key=task_key, run_id=run_id)
    return _run_json(engine.cancel(run_id=run.pk))


@requires(CONTROL)
def _run_retry_failed(request: HttpRequest, *, task_key: str, run_id: int) -> JsonResponse:
    run = _run_of_task(task_key=task_key, run_id=run_id)
    run = engine.retry_failed(run_id=run.pk)
    start_run_drains(run_id=run.pk)
    return _run_json(run)


@requires(CONTROL)
def _run_budget(request: HttpRequest, *, task_key: str, run_id: int) -> JsonResponse:
    run = _run_of_task(task_key=task_key, run_id=run_id)
    data = _json_object(request, allowed={"budget"}, required={"budget"})
    budget = _object_field(data, "budget")
    was_paused = run.status == RunStatus.PAUSED
    run = engine.set_budget(run_id=run.pk, budget=budget)
    if was_paused and run.status in RunStatus.runnable():
        start_run_drains(run_id=run.pk)
    return _run_json(run)


@requires(TICK)
def _tick(request: HttpRequest, *, task_key: str) -> JsonResponse:
    run = engine.tick(
        task_key=task_key,
        time_budget_s=settings.PICSITE_PUSH_TICK_BUDGET_S,
        create_if_idle=settings.PICSITE_PUSH_TICK_CREATES_RUNS,
    )
    return JsonResponse({"run": serializers.run_or_none_to_dict(run)})


preview_count = api_endpoint({"GET": _preview_count})
runs = api_endpoint({"GET": _runs_list, "POST": _runs_create})
run_detail = api_endpoint({"GET": _run_detail})
run_kick = api_endpoint({"POST": _run_kick})
run_cancel = api_endpoint({"POST": _run_cancel})
run_retry_failed = api_endpoint({"POST": _run_retry_failed})
run_budget = api_endpoint({"POST": _run_budget})
tick = api_endpoint({"POST": _tick}, push_signed=True)


# --- project-level JSON routes --------------------------------------------------------------


@csrf_exempt
def api_schema(request: HttpRequest) -> JsonResponse:
    """The OpenAPI 3.0 document (public: it holds no secrets)."""
    if request.method not in ("GET", "HEAD"):
        return method_not_allowed(request, allow="GET, HEAD")
    from tasks.openapi import openapi_document

    return JsonResponse(openapi_document())


# --- Server-Sent Events: GET runs/<id>/events -----------------------------------------------
#
# Every stream of this process shares one LISTEN connection (tasks.notify_hub); snapshots
# are read on a small pool of threads of their own, so neither the number of Postgres
# connections nor of their holders grows with the number of streams.


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
        denied = _authorize(request, access=VIEW, push_signed=False)
        if denied is not None:
            return _StreamStart(refusal=denied)
        _run_of_task(task_key=task_key, run_id=run_id)
    except ApiAuthError as exc:
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
        return serializers.run_to_dict(run) if run is not None else None
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


@csrf_exempt
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
