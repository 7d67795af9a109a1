"""Pydantic shapes of the task API: what it answers (runs, previews) and what it takes
(one scope schema per definition, made from its ``scope_fields``, and a budget).

The class names are the OpenAPI component names. Builders (``run_out``...) turn engine
objects into them; routes answer them with ``exclude_unset`` so that free-form records
(an issue, an estimate) keep exactly the keys they have.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationInfo,
    WithJsonSchema,
    create_model,
)
from pydantic_core import PydanticCustomError

from api.schemas import MAX_BIGINT, IsoDateTime, from_object
from tasks import engine
from tasks.models import (
    AdminTaskItem,
    AdminTaskRun,
    AdminTaskRunFinish,
    DeliveryState,
    RunKind,
    RunStatus,
)
from tasks.registry import ScopeField, ScopeFieldType, TaskDefinition

Count = Annotated[int, Field(ge=0)]


class Strict(BaseModel):
    """An input object: unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")


# --- answers -----------------------------------------------------------------------------------


class Progress(BaseModel):
    elapsed_seconds: float
    items_per_second: float
    eta_seconds: float | None
    percent: float


class Spent(BaseModel):
    items: Count
    seconds: Annotated[float, Field(ge=0)]
    bytes: Count
    writes: Count


class Counters(BaseModel):
    total: Count
    processed: Count
    succeeded: Count
    skipped: Count
    failed: Count


class Lease(BaseModel):
    owner: str
    expires_at: IsoDateTime | None


class Issue(BaseModel):
    """One entry of a run's recent issues (keys vary with what happened)."""

    model_config = ConfigDict(extra="allow")

    item_id: int | None = None
    stage: str | None = None
    code: str | None = None
    message: str | None = None
    attempt: int | None = None
    final: bool | None = None
    at: str | None = None


class Run(BaseModel):
    id: Annotated[int, Field(ge=1)]
    task_key: str
    kind: RunKind = Field(
        description="batch: explicit ids, a row per requested item, coexists with other runs; "
        "library: a scope of the library (one active per task), failures-only bookkeeping."
    )
    status: RunStatus
    pause_reason: str
    scope: dict[str, Any] = Field(description="The normalized scope (mode and ids).")
    budget: dict[str, int | float] = Field(description="Caps (items, seconds, bytes); {} for none.")
    spent: Spent
    counters: Counters
    cursor: int
    lease: Lease
    last_error: str
    recent_issues: list[Issue]
    created_by: str | None
    created_at: IsoDateTime
    started_at: IsoDateTime | None
    finished_at: IsoDateTime | None
    updated_at: IsoDateTime
    progress: Progress


class FailedItem(BaseModel):
    item_id: int
    state: Literal["retrying", "failed"]  # ItemState.RETRYING, ItemState.FAILED
    attempts: Count
    next_attempt_at: IsoDateTime | None
    code: str
    stage: str
    message: str
    thumbnail_url: str | None


class DeliveryAttempt(BaseModel):
    at: str
    status: int | None = Field(description="The receiver's HTTP status; null if no answer came.")
    error: str
    ms: int


class Delivery(BaseModel):
    """The callback of one finish record (``webhook-id`` = ``id``, the same on every retry)."""

    id: str
    state: DeliveryState = Field(description="none: the run has no callback_url.")
    attempts: Count
    last_status: int | None
    last_error: str
    next_attempt_at: IsoDateTime | None
    delivered_at: IsoDateTime | None
    log: list[DeliveryAttempt] = Field(description="The last attempts, oldest first.")


class Finish(BaseModel):
    """One terminal transition of the run, recorded once (a run reopened by retry-failed
    that ends again gets seq 2)."""

    seq: Annotated[int, Field(ge=1)]
    status: RunStatus
    at: IsoDateTime
    counters: dict[str, int]
    hook_done: bool = Field(description="The task's on_finish hook has run (or it has none).")
    delivery: Delivery


class RunDetail(Run):
    failed_items: list[FailedItem] = Field(description="Items retrying or out of attempts (up to 200).")
    timeline: list[tuple[int | float, int | float]] = Field(
        description="[unix time, processed] samples for a throughput chart."
    )
    callback_url: str = Field(description="Called back (signed POST) at each finish; empty for none.")
    finishes: list[Finish]


class RunCreated(Run):
    missing: list[int] | None = Field(
        None, description="Batch runs: requested ids that do not exist or are deleted (never processed)."
    )
    duplicates: list[int] | None = Field(None, description="Batch runs: ids given more than once (kept once).")


class RunList(BaseModel):
    active: list[Run] = Field(
        description="Every active run of the task: batch runs (newest first), then the library run; at most "
        "100 (the newest batch runs and the library run). A list since batch runs coexist (was one run or null)."
    )
    recent: Annotated[list[Run], Field(max_length=10)]


class ItemError(BaseModel):
    code: str
    stage: str
    message: str


class Item(BaseModel):
    item_id: int
    position: int | None = Field(description="Submission order in a batch run; null in a library run's ledger.")
    state: Literal["pending", "processing", "succeeded", "skipped", "failed", "missing"] = Field(
        description="pending (also between attempts: see next_attempt_at) -> processing -> succeeded | skipped "
        "| failed; missing: the id did not exist or was deleted at create."
    )
    attempts: Count
    next_attempt_at: IsoDateTime | None
    error: ItemError | None = Field(description="The last failure, if any.")
    started_at: IsoDateTime | None
    finished_at: IsoDateTime | None
    seconds: float
    bytes: Count
    result: dict[str, Any] | None = Field(description="What the task reports per item (preprocess: served widths, URLs).")
    thumbnail_url: str | None


ItemStateFilter = Literal["pending", "processing", "succeeded", "skipped", "failed", "missing"]
ItemsAfter = Annotated[int, Field(ge=0, le=MAX_BIGINT, description="The `next` of the previous page.")]
ItemsLimit = Annotated[int, Field(ge=1, le=500, description="Items per page (default 100).")]


class ItemPage(BaseModel):
    run_id: int
    kind: RunKind
    bookkeeping: Literal["items", "failures"] = Field(
        description="items: a batch run's row per requested item, keyed by position; failures: a library run's "
        "ledger of items that failed at least once (retrying, failed, or succeeded later), keyed by item id."
    )
    items: list[Item]
    next: int | None = Field(description="Pass as `after` for the next page; null on the last page.")


class TickResult(BaseModel):
    run: Run | None


class ItemDeliveryResult(BaseModel):
    outcome: Literal["processed", "duplicate", "not_runnable"] = Field(
        description="processed: this delivery worked the item; duplicate: it was done or is being worked by "
        "another delivery; not_runnable: the run is paused, cancelling or over (nothing done)."
    )
    run_status: RunStatus
    state: str | None = Field(None, description="The item's ledger state after it (retrying, failed, ...), if it has one.")
    retry_at: IsoDateTime | None = Field(None, description="When its next attempt is published, if it will be retried.")


class Estimate(BaseModel):
    cpu_seconds: float
    bytes: int
    object_writes: int
    basis: Literal["history", "default"]
    money: float | None = None


class BatchPreview(BaseModel):
    requested: Count = Field(description="Distinct ids given.")
    existing: Count
    missing: Count
    missing_ids: list[int]
    duplicates: list[int]


class Preview(BaseModel):
    task_key: str
    scope: dict[str, Any]
    count: Count
    batch: BatchPreview | None = Field(None, description="Explicit ids: how many exist and which are missing.")
    estimate: Estimate
    details: dict[str, Any] | None = Field(
        description="Task-specific figures, null for tasks without them (variants-gc: the objects and bytes "
        "a run would reclaim, and a one-line summary)."
    )


def run_out(run: AdminTaskRun) -> Run:
    live = engine.live_counters(run)  # includes items still pending on the run's batches
    return from_object(
        Run,
        run,
        budget=run.budget or {},
        spent=Spent(
            items=live["spent_items"],
            seconds=round(live["spent_seconds"], 3),
            bytes=live["spent_bytes"],
            writes=live["spent_writes"],
        ),
        counters=Counters(
            total=run.total,
            processed=live["processed"],
            succeeded=live["succeeded"],
            skipped=live["skipped"],
            failed=live["failed"],
        ),
        lease=Lease(owner=run.lease_owner, expires_at=run.lease_expires_at),
        recent_issues=[Issue(**issue) for issue in run.recent_issues or []],
        created_by=run.created_by.get_username() if run.created_by_id and run.created_by else None,
        progress=Progress(**engine.progress(run, processed=live["processed"])),
    )


def run_or_none_out(run: AdminTaskRun | None) -> Run | None:
    return run_out(run) if run is not None else None


def run_json(run: AdminTaskRun) -> dict[str, Any]:
    """A run as the API writes it (event-stream snapshots)."""
    return run_out(run).model_dump(mode="json", exclude_unset=True)


def run_detail_out(
    *, run: AdminTaskRun, items: list[AdminTaskItem], thumbnails: dict[int, str], finishes: list[AdminTaskRunFinish]
) -> RunDetail:
    failed = [
        from_object(
            FailedItem,
            item,
            code=item.last_error_code,
            stage=item.last_error_stage,
            message=item.last_error_message,
            thumbnail_url=thumbnails.get(item.item_id),
        )
        for item in items
    ]
    timeline = [(point[0], point[1]) for point in run.timeline or []]
    return RunDetail(
        **dict(run_out(run)),
        failed_items=failed,
        timeline=timeline,
        callback_url=run.callback_url,
        finishes=[finish_out(record) for record in finishes],
    )


def run_list_out(*, active: list[AdminTaskRun], recent: list[AdminTaskRun]) -> RunList:
    return RunList(active=[run_out(run) for run in active], recent=[run_out(run) for run in recent])


def run_created_out(*, run: AdminTaskRun, missing: list[int]) -> RunCreated:
    created = RunCreated(**dict(run_out(run)))
    if run.kind == RunKind.BATCH:
        created.missing, created.duplicates = missing, list(run.scope.get("duplicates", []))
    return created


def finish_out(record: AdminTaskRunFinish) -> Finish:
    log = record.delivery_log or []
    last = log[-1] if log else {}
    return Finish(
        seq=record.seq,
        status=record.status,
        at=record.created_at,
        counters=record.counters,
        hook_done=record.hook_done_at is not None,
        delivery=Delivery(
            id=record.delivery_id,
            state=record.delivery_state,
            attempts=record.delivery_attempts,
            last_status=last.get("status"),
            last_error=last.get("error") or "",
            next_attempt_at=record.next_delivery_at,
            delivered_at=record.delivered_at,
            log=[DeliveryAttempt(**attempt) for attempt in log],
        ),
    )


def item_out(row: AdminTaskItem, thumbnail_url: str | None) -> Item:
    error = (
        ItemError(code=row.last_error_code, stage=row.last_error_stage, message=row.last_error_message)
        if row.last_error_code
        else None
    )
    return from_object(
        Item,
        row,
        state=engine.public_state(row.state),
        error=error,
        seconds=round(row.seconds, 3),
        thumbnail_url=thumbnail_url,
    )


def item_page_out(*, page: dict, thumbnails: dict[int, str]) -> ItemPage:
    run = page["run"]
    return ItemPage(
        run_id=run.pk,
        kind=run.kind,
        bookkeeping=page["bookkeeping"],
        items=[item_out(row, thumbnails.get(row.item_id)) for row in page["items"]],
        next=page["next"],
    )


def preview_out(preview: engine.Preview) -> Preview:
    out = Preview(
        task_key=preview.task_key,
        scope=preview.scope,
        count=preview.count,
        estimate=Estimate(**preview.estimate),
        details=preview.details,
    )
    if preview.batch is not None:
        out.batch = BatchPreview(**preview.batch)
    return out


# --- what the routes take -----------------------------------------------------------------------

PositiveId = Annotated[StrictInt, Field(ge=1, le=MAX_BIGINT)]


class Budget(Strict):
    """Caps for the run; the run pauses (reason budget) before exceeding one."""

    items: Annotated[StrictInt, Field(ge=1)] | None = None
    seconds: Annotated[StrictInt, Field(gt=0)] | Annotated[StrictFloat, Field(gt=0)] | None = None
    bytes: Annotated[StrictInt, Field(ge=1)] | None = None
    money: Annotated[StrictInt, Field(gt=0)] | Annotated[StrictFloat, Field(gt=0)] | None = Field(
        None, description="Spent writes and bytes at PICSITE_PRICE_PER_1K_WRITES / PICSITE_PRICE_PER_GB (needs a price)."
    )


class BudgetChange(Strict):
    budget: Budget


def _scope_annotation(field: ScopeField) -> tuple[Any, Any]:
    """(type, default) of one scope key in a JSON body."""
    info = Field(description=field.help)
    if field.type == ScopeFieldType.BOOL:
        return Annotated[StrictBool, info], False
    if field.type == ScopeFieldType.INT_LIST:
        ids = Annotated[list[PositiveId], Field(min_length=1, max_length=field.max_items)]
        return Annotated[ids | None, info], None
    return Annotated[Literal[field.choices] | None, info], None  # type: ignore[valid-type]


def _model_name(prefix: str, defn: TaskDefinition) -> str:
    return prefix + defn.key.replace("-", "_")


def scope_schema(defn: TaskDefinition) -> type[Strict]:
    """The scope a run of ``defn`` takes in a JSON body ({} is its default scope)."""
    fields = {f.name: _scope_annotation(f) for f in defn.scope_fields}
    return create_model(  # type: ignore[call-overload]
        _model_name("Scope_", defn),
        __base__=Strict,
        __doc__=f"Scope of a {defn.key} run; {{}} is the default scope. At most one mode may be chosen; "
        "a conflict is a 400 naming the field.",
        **fields,
    )


CallbackUrl = Annotated[
    str,
    Field(
        min_length=1,
        max_length=2000,
        description="Called back at each finish of the run: a signed POST (Standard Webhooks headers webhook-id, "
        "webhook-timestamp, webhook-signature; secret PICSITE_WEBHOOK_SECRET), retried with backoff until a 2xx, "
        "webhook-id stable across retries. https to a public address (http and private addresses only for hosts "
        "in PICSITE_WEBHOOK_ALLOWED_HOSTS); redirects are not followed. 400 invalid_callback_url otherwise.",
    ),
]


def run_create_schema(defn: TaskDefinition) -> type[Strict]:
    """The body of ``POST runs``: a scope, an optional budget and an optional callback URL."""
    return create_model(  # type: ignore[call-overload]
        _model_name("RunCreate_", defn),
        __base__=Strict,
        scope=(scope_schema(defn), ...),
        budget=(Budget, None),
        callback_url=(CallbackUrl | None, None),
    )


# Query parameters are strings: parsed here as the previous hand-written API did.
BOOL_VALUES = {"true": True, "1": True, "false": False, "0": False}


def _last(value: Any) -> str:
    """The last of repeated parameters (as Django's ``QueryDict[name]``)."""
    return str(value[-1]) if isinstance(value, list) else str(value)


def _query_bool(value: Any, info: ValidationInfo) -> bool:
    parsed = BOOL_VALUES.get(_last(value).strip().lower())
    if parsed is None:
        raise PydanticCustomError("query_bool", "{name} must be true, false, 1 or 0.", {"name": info.field_name})
    return parsed


def _query_ids(value: Any, info: ValidationInfo) -> list[int]:
    parts = [part.strip() for part in _last(value).split(",")]
    if not all(part.isascii() and part.isdigit() for part in parts):
        raise PydanticCustomError("query_ids", "{name} must be comma-separated positive integers.", {"name": info.field_name})
    ids = [int(part) for part in parts]
    if any(i <= 0 or i > MAX_BIGINT for i in ids):
        raise PydanticCustomError(
            "query_ids", "{name} ids must be between 1 and {max}.", {"name": info.field_name, "max": MAX_BIGINT}
        )
    return ids


def _query_annotation(field: ScopeField) -> Any:
    info = Field(description=field.help)
    if field.type == ScopeFieldType.BOOL:
        documented = WithJsonSchema({"type": "string", "enum": list(BOOL_VALUES)})
        return Annotated[bool, BeforeValidator(_query_bool), documented, info]
    if field.type == ScopeFieldType.INT_LIST:
        one = "[1-9][0-9]{0,17}"
        pattern = f"^{one}(,{one}){{0,{field.max_items - 1}}}$"
        documented = WithJsonSchema({"type": "string", "pattern": pattern})
        return Annotated[list[int], BeforeValidator(_query_ids), documented, info]
    return Annotated[Literal[field.choices], info]  # type: ignore[valid-type]


def scope_query_schema(defn: TaskDefinition) -> type[BaseModel]:
    """``GET preview-count``'s query parameters: one per scope field, all optional."""
    fields = {f.name: (_query_annotation(f), None) for f in defn.scope_fields}  # None: not given
    return create_model(_model_name("ScopeQuery_", defn), **fields)  # type: ignore[call-overload]
