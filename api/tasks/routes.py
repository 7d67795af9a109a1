"""The task API: one ninja router per registered task, under the definition's
``api_prefix`` (``/api/v1/preprocess-tasks/``, ``/api/v1/tasks/``, ...), every route
derived from the definition (its scope schema, query parameters, thumbnails hook).

Thin adapters: the caller's access is checked (``auth=``: reading runs needs
``tasks.view_admintaskrun``, token scope ``read``; changing them ``tasks.run_tasks``,
scope ``write``; the tick also takes scope ``tick`` or a push signature), pydantic checks
the input, the engine does the work, ``api.tasks.schemas`` shapes the answer. Refusals
are raised and answered by ``api.errors``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Annotated, Any

from django.conf import settings
from django.db.models import prefetch_related_objects
from django.http import HttpRequest, HttpResponse
from ninja import Body, Header, Query, Router
from ninja.responses import Status
from pydantic import BaseModel, WithJsonSchema

from api import push_sign, schemas
from api.errors import bad_request
from api.http import Requires, plain_view
from api.push_auth import PushSignedOr
from api.tasks import events
from api.tasks import schemas as s
from api.tasks.access import CONTROL, TICK, VIEW, run_of_task
from dispatch.qstash import dispatch_is_qstash
from tasks import engine, registry, selectors
from tasks.jobs import start_run_drains
from tasks.models import ItemState, RunKind, RunStatus
from tasks.push import push_item_deliver, push_tick
from tasks.registry import TaskDefinition

KICK_TIME_BUDGET_S = 4

RunId = Annotated[
    int,  # any digits reach the handler: an id out of range is a 404, as an unknown one
    WithJsonSchema({"type": "integer", "format": "int64", "minimum": 1, "maximum": schemas.MAX_BIGINT}),
]

ERRORS: dict[int, str] = {
    400: "Malformed JSON, wrong types, unknown keys or parameters (details.field names the culprit).",
    401: "Not authenticated (no or revoked bearer token, no session), or the token has expired (code token_expired).",
    403: "Authenticated but not active staff (forbidden), missing the route's Django permission (permission_denied, "
    "details.permission), a token without the route's scope (insufficient_scope), or a session request that failed "
    "the CSRF check (csrf_failed).",
    404: "No such run for this task.",
    405: "Method not allowed (the Allow header lists the allowed ones).",
    409: "Another run of this task is active, or the transition is not allowed in the run's state.",
    413: "The request body is too large.",
    422: "The scope matches nothing, or variant storage is not configured.",
    429: "Too many open event streams for this user or server (code too_many_streams; see Retry-After).",
    503: "Live events are unavailable (code events_unavailable): poll GET runs/{run_id}.",
}


def responses(success: int, model: type[BaseModel] | None, *errors: int) -> dict[str, Any]:
    return schemas.responses(success, model, ERRORS, *errors)


def _signed(handler: Callable[..., Any], **params: Any) -> Callable[..., Any]:
    """Give a generated handler the typed signature ninja reads its parameters from
    (``name=annotation``, or ``name=(annotation, default)``)."""
    parameters = [inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    for name, spec in params.items():
        annotation, default = spec if isinstance(spec, tuple) else (spec, inspect.Parameter.empty)
        parameters.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default))
    handler.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    return handler


def task_router(defn: TaskDefinition) -> Router:
    """Every route of one task, under ``defn.api_prefix``."""
    key, op = defn.key, defn.api_prefix.replace("-", "_")
    scope_query, run_create = s.scope_query_schema(defn), s.run_create_schema(defn)
    router = Router(tags=[defn.title], exclude_unset=True)

    def route(method: str | list[str], path: str, name: str, summary: str, *, auth: Any, **options: Any) -> Callable:
        return router.api_operation(
            [method] if isinstance(method, str) else method, path, auth=auth, operation_id=f"{op}_{name.replace('-', '_')}",
            url_name=registry.api_url_name(defn, name), summary=summary, **options,
        )  # fmt: skip

    def preview_count(request: HttpRequest, *, scope: BaseModel | None) -> s.Preview:
        unknown = [name for name in request.GET if name not in scope_query.model_fields]
        if unknown:
            allowed = ", ".join(sorted(scope_query.model_fields)) or "none"
            raise bad_request("unknown_parameter", f"Unknown query parameter {unknown[0]!r}; allowed: {allowed}.", field=unknown[0])
        given = scope.model_dump(exclude_unset=True) if scope is not None else {}  # None: a task without fields
        return s.preview_out(engine.preview_count(task_key=key, scope=given))

    def thumbnails_of(ids: list[int]) -> dict[int, str]:
        return defn.item_thumbnail_urls(ids) if defn.item_thumbnail_urls is not None and ids else {}

    def runs_list(request: HttpRequest) -> s.RunList:
        runs = engine.list_runs(task_key=key, limit=10)
        prefetch_related_objects([*runs["active_runs"], *runs["recent"]], "created_by")
        return s.run_list_out(active=runs["active_runs"], recent=runs["recent"])

    def runs_create(request: HttpRequest, response: HttpResponse, *, body: BaseModel) -> Status:
        data = body.model_dump(exclude_unset=True)
        run = engine.create(
            task_key=key,
            scope=data["scope"],
            budget=data.get("budget"),
            user=request.user,
            callback_url=data.get("callback_url") or "",
        )
        start_run_drains(run_id=run.pk)
        response["Location"] = f"{request.path.rstrip('/')}/{run.pk}"
        missing = selectors.run_item_ids_in_state(run=run, state=ItemState.MISSING) if run.kind == RunKind.BATCH else []
        return Status(201, s.run_created_out(run=run, missing=missing))

    def run_detail(request: HttpRequest, *, run_id: int) -> s.RunDetail:
        run_of_task(task_key=key, run_id=run_id)
        found = engine.detail(run_id=run_id, task_key=key)
        run, items = found["run"], found["items"]
        prefetch_related_objects([run], "created_by")
        thumbnails = thumbnails_of([item.item_id for item in items])
        return s.run_detail_out(run=run, items=items, thumbnails=thumbnails, finishes=found["finishes"])

    def run_items(
        request: HttpRequest, *, run_id: int, state: s.ItemStateFilter | None, after: int | None, limit: int
    ) -> s.ItemPage:
        run_of_task(task_key=key, run_id=run_id)
        page = engine.items_page(run_id=run_id, task_key=key, state=state, after=after, limit=limit)
        return s.item_page_out(page=page, thumbnails=thumbnails_of([row.item_id for row in page["items"]]))

    def run_kick(request: HttpRequest, *, run_id: int) -> s.Run:
        run = run_of_task(task_key=key, run_id=run_id)
        if run.status in RunStatus.finished():
            return s.run_out(run)
        if settings.PICSITE_ADMIN_PAGE_DRIVES_KICKS:
            # No worker may be running: the open admin page drives the work itself.
            run = engine.kick(run_id=run.pk, time_budget_s=KICK_TIME_BUDGET_S)
        elif run.status in [*RunStatus.runnable(), RunStatus.CANCELLING]:
            start_run_drains(run_id=run.pk)
        return s.run_out(run)

    def run_cancel(request: HttpRequest, *, run_id: int) -> s.Run:
        return s.run_out(engine.cancel(run_id=run_of_task(task_key=key, run_id=run_id).pk))

    def run_retry_failed(request: HttpRequest, *, run_id: int) -> s.Run:
        run = engine.retry_failed(run_id=run_of_task(task_key=key, run_id=run_id).pk)
        start_run_drains(run_id=run.pk)
        return s.run_out(run)

    def run_budget(request: HttpRequest, *, run_id: int, body: s.BudgetChange) -> s.Run:
        run = run_of_task(task_key=key, run_id=run_id)
        was_paused = run.status == RunStatus.PAUSED
        run = engine.set_budget(run_id=run.pk, budget=body.model_dump(exclude_unset=True)["budget"])
        if was_paused and run.status in RunStatus.runnable():
            start_run_drains(run_id=run.pk)
        return s.run_out(run)

    async def run_events(request: HttpRequest, run_id: int) -> HttpResponse:
        return await events.run_events(request, task_key=key, run_id=run_id)

    def run_events_documented(request: HttpRequest, *, run_id: int) -> None:
        """`event: snapshot` (the full run) first, then `event: progress` (counters, the last item's id and
        outcome; as workers on any host fold their checkpoints into the run: each failure, each batch end,
        at least every 0.5 s) and `event: status`, a fresh snapshot at most every 0.5 s, `: keepalive`
        comments every 15 s. Ends after the run finishes (final snapshot) or after 10 minutes; clients
        reconnect, or poll GET runs/{run_id}.

        Batch runs also stream their items: after the run snapshot `event: items` (every item in submission
        order; its `id:` and `last_event_id` the last change it reflects), then `event: item` (`id:` = the
        change's event id; data `{"run", "id", "item": {item_id, position, state, attempts, next_attempt_at,
        error, started_at, finished_at, seconds, bytes, result}}`) for every item state change. A client that
        reconnects with the `Last-Event-ID` header (or `?last_event_id=`) gets, instead of the items snapshot,
        every change after that id, in order, before the live ones: none missed, none twice."""

    def tick(request: HttpRequest, **signature_headers: str | None) -> s.TickResult:
        """Staff (bearer token, or session + CSRF) or an HMAC-signed request: X-Picsite-Signature =
        sha256=hex(HMAC-SHA256(secret, "{timestamp}\\n{METHOD}\\n{path}\\n" + body)), timestamp within 300 s,
        secret PICSITE_PUSH_SECRET or PICSITE_PUSH_SECRET_NEXT; each signature is accepted once (a copy:
        401 replayed_signature). Overlapping deliveries are harmless."""
        if dispatch_is_qstash():
            # Items are delivered one per request: the tick republishes and tops windows up.
            run = push_tick(task_key=key, create_if_idle=settings.PICSITE_PUSH_TICK_CREATES_RUNS)
        else:
            run = engine.tick(
                task_key=key,
                time_budget_s=settings.PICSITE_PUSH_TICK_BUDGET_S,
                create_if_idle=settings.PICSITE_PUSH_TICK_CREATES_RUNS,
            )
        return s.TickResult(run=s.run_or_none_out(run))

    def run_item(request: HttpRequest, *, run_id: int, item_id: int) -> s.ItemDeliveryResult:
        """One QStash delivery: process exactly this item (claim, processor, checkpoint, ledger on failure,
        finish when it was the last). A retryable failure is recorded and answered 200 (its next attempt is
        published for next_attempt_at); a copy of a delivery is answered 200 with outcome duplicate."""
        run_of_task(task_key=key, run_id=run_id)
        delivery = push_item_deliver(run_id=run_id, item_id=item_id)
        return s.ItemDeliveryResult(
            outcome=delivery.outcome, run_status=delivery.run_status, state=delivery.state,
            retry_at=delivery.retry_at,
        )  # fmt: skip

    view, control = Requires(VIEW), Requires(CONTROL)
    route("GET", "/preview-count", "preview-count", f"How many items a {key} run with this scope would process, "
          "and its cost.", auth=view, **responses(200, s.Preview, 400))(
        _signed(preview_count, scope=(Query[scope_query], None)))  # fmt: skip
    route("GET", "/runs", "runs-list", "Every active run (batch runs first, then the library run) and the 10 most "
          "recent runs.", auth=view, **responses(200, s.RunList))(runs_list)  # fmt: skip
    route("POST", "/runs", "runs-create", "Start a run (queued; django-q2 workers or kicks drive it). Explicit ids "
          "make a batch run (beside any other run; missing ids and collapsed duplicates are reported); any other "
          "scope a library run (one active per task: 409).", auth=control,
          **responses(201, s.RunCreated, 400, 409, 413, 422))(
        _signed(runs_create, response=HttpResponse, body=Body[run_create]))  # fmt: skip
    route("GET", "/runs/{int:run_id}", "run-detail", "One run with its failed items, throughput timeline, finish "
          "records and their callback deliveries.", auth=view,
          **responses(200, s.RunDetail, 404))(_signed(run_detail, run_id=RunId))  # fmt: skip
    route("GET", "/runs/{int:run_id}/items", "run-items", "A run's items, one keyset page at a time: a batch run's "
          "row per requested item in submission order, a library run's failure ledger by item id.", auth=view,
          **responses(200, s.ItemPage, 400, 404))(_signed(
              run_items, run_id=RunId, state=(s.ItemStateFilter | None, Query(None)),
              after=(s.ItemsAfter | None, Query(None)), limit=(s.ItemsLimit, Query(100))))  # fmt: skip
    actions = (
        ("kick", run_kick, "Work on the run for a few seconds now (or enqueue workers); a finished run is returned as is.", ()),
        ("cancel", run_cancel, "Cancel the run.", (409,)),
        ("retry-failed", run_retry_failed, "Re-arm the items that ran out of attempts.", (409,)),
    )
    for name, handler, summary, errors in actions:
        route("POST", f"/runs/{{int:run_id}}/{name}", f"run-{name}", summary, auth=control,
              **responses(200, s.Run, 404, *errors))(_signed(handler, run_id=RunId))  # fmt: skip
    route("POST", "/runs/{int:run_id}/budget", "run-budget",
          "Replace the budget; a run paused by its budget resumes if the new one allows.", auth=control,
          **responses(200, s.Run, 400, 404, 413))(_signed(run_budget, run_id=RunId, body=Body[s.BudgetChange]))  # fmt: skip
    events_responses = responses(200, None, 404, 429, 503)
    events_responses["openapi_extra"]["responses"][200] = {
        "description": "An event stream.",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    }
    route("GET", "/runs/{int:run_id}/events", "run-events", "Live progress as Server-Sent Events.", auth=view,
          **events_responses)(plain_view(run_events)(_signed(run_events_documented, run_id=RunId)))  # fmt: skip
    tick_extra = responses(200, s.TickResult)
    tick_extra["openapi_extra"]["security"] = [{"bearerAuth": []}, {"cookieAuth": []}, {}]
    tick_auth = PushSignedOr(TICK, cron_get=True)
    route("POST", "/tick", "tick", "Kick the oldest runnable run for a while (cron / push driver).",
          auth=tick_auth, **tick_extra)(_signed(tick, **SIGNATURE_HEADERS))  # fmt: skip
    cron_extra = responses(200, s.TickResult)
    cron_extra["openapi_extra"]["security"] = [{"bearerAuth": []}]
    route("GET", "/tick", "tick-cron", "The tick for Vercel Cron: GET with Authorization: Bearer CRON_SECRET "
          "(that secret only, compared in constant time; no API token).", auth=tick_auth, **cron_extra)(
        _signed(tick, **SIGNATURE_HEADERS))  # fmt: skip
    route("POST", "/runs/{int:run_id}/items/{int:item_id}", "run-item",
          "Process one item of the run (a QStash delivery; PICSITE_DISPATCH=qstash).",
          auth=PushSignedOr(CONTROL), **responses(200, s.ItemDeliveryResult, 404))(
        _signed(run_item, run_id=RunId, item_id=RunId))  # fmt: skip
    return router


def _documented_header(name: str, pattern: str) -> tuple[Any, None]:
    """An optional header parameter, shown in the OpenAPI document (its check is elsewhere)."""
    return Annotated[str, WithJsonSchema({"type": "string", "pattern": pattern}), Header(None, alias=name)], None


# The push-signature headers (``PushSignedOr`` reads and checks them).
SIGNATURE_HEADERS = {
    "timestamp": _documented_header(push_sign.TIMESTAMP_HEADER, "^[0-9]{1,12}$"),
    "signature": _documented_header(push_sign.SIGNATURE_HEADER, "^sha256=[0-9a-f]{64}$"),
}
