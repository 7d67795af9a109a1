"""Task definitions: what the engine needs to know about one kind of run, and what its
surfaces are made from.

A definition is data plus a few small functions; adding a task is one module in
``tasks/definitions/`` that calls ``register`` (and one import line in its ``__init__``).
Everything else is derived from the registry: the JSON API routes, their pydantic schemas
and the OpenAPI document (``api.tasks``), the /admin/tasks card (``tasks.admin_views``) and
the command line (``manage.py taskrun KEY``, and the definition's own ``command``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from django.db.models import Model, QuerySet


class ScopeError(ValueError):
    """A scope given to create/preview is malformed; ``field`` names the culprit."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


class TaskUnavailable(Exception):
    """The task cannot run at all right now (e.g. variant storage unconfigured)."""


class RunFatal(Exception):
    """The run cannot go on (configuration removed mid-run, an encoder missing)."""


class ItemFailure(Exception):
    """One item failed; the run goes on. ``retryable`` items come back with backoff.

    ``pause_run`` (a reason such as "storage_unavailable") says the failure is not the
    item's: the item is retried later at no attempt's cost and the run pauses until the
    definition's ``probe`` says it can go on."""

    def __init__(
        self,
        *,
        code: str,
        stage: str,
        message: str,
        retryable: bool = True,
        counts_attempt: bool = True,
        pause_run: str = "",
    ):
        super().__init__(message)
        self.code = code
        self.stage = stage
        self.message = message
        self.retryable = retryable or bool(pause_run)
        self.counts_attempt = counts_attempt and not pause_run
        self.pause_run = pause_run


class ItemOutcome(StrEnum):
    """How one item ended. A processor reports SUCCEEDED or SKIPPED (``ItemResult``); the
    engine decides the rest. The values are what progress events carry as ``outcome``."""

    SUCCEEDED = "succeeded"
    SKIPPED = "skipped"
    FAILED = "failed"  # out of attempts, or not retryable
    RETRY = "retry"  # failed; comes back after its backoff
    STOPPED = "stopped"  # the run stopped under it: no verdict, the item is handed back


@dataclass(frozen=True)
class ItemResult:
    """What processing one item did: ``outcome`` is SUCCEEDED or SKIPPED (a plain string
    with one of those values is accepted)."""

    outcome: ItemOutcome
    bytes_written: int = 0
    objects_written: int = 0

    def __post_init__(self) -> None:
        outcome = ItemOutcome(self.outcome)
        if outcome not in (ItemOutcome.SUCCEEDED, ItemOutcome.SKIPPED):
            raise ValueError(f"a processor reports succeeded or skipped, not {outcome.value!r}")
        object.__setattr__(self, "outcome", outcome)


@dataclass(frozen=True)
class CostModel:
    """Per-item defaults used until measured history exists."""

    seconds_per_item: float
    bytes_per_item: int = 0
    writes_per_item: int = 0


class ScopeFieldType(StrEnum):
    """How a scope field is given: a flag, a list of ids, or one of ``choices``."""

    BOOL = "bool"
    INT_LIST = "int_list"
    CHOICE = "choice"


MAX_SCOPE_IDS = 500


@dataclass(frozen=True)
class ScopeField:
    """One key of a task's scope; the API's scope schema and query parameters, the admin
    card's radio choice and the command's flag are made from it."""

    name: str
    type: ScopeFieldType  # a plain string with one of its values is accepted
    help: str
    choices: tuple[str, ...] = ()
    label: str = ""  # the admin card's radio label; "" = the name, capitalized
    flag: str = ""  # the command-line flag; "" = --name-with-dashes
    max_items: int = MAX_SCOPE_IDS  # an int_list takes at most this many ids

    def __post_init__(self) -> None:
        object.__setattr__(self, "type", ScopeFieldType(self.type))
        if not self.label:
            object.__setattr__(self, "label", self.name.replace("_", " ").capitalize())
        if not self.flag:
            object.__setattr__(self, "flag", "--" + self.name.replace("_", "-"))


@dataclass(frozen=True)
class TaskDefinition:
    key: str
    title: str
    lock_id: int
    batch_size: int
    lease_seconds: float
    scope_fields: tuple[ScopeField, ...]
    normalize_scope: Callable[[dict[str, Any]], dict[str, Any]]
    # Items in scope (unordered; the engine adds the id keyset and ordering).
    scope_queryset: Callable[[dict[str, Any]], QuerySet]
    # All items the processor may be handed (a retry may outlive the scope filter).
    item_queryset: Callable[[], QuerySet]
    # process(item, cancel check, the run's normalized scope) -> ItemResult.
    process: Callable[[Model, Callable[[], None], dict[str, Any]], ItemResult]
    cost: CostModel
    # Raise TaskUnavailable when the task cannot run (checked at create and per batch).
    check_available: Callable[[], None] = field(default=lambda: None)
    # Can a run paused by an ItemFailure's ``pause_run`` reason go on? Called by the
    # scheduled and push ticks (the engine knows nothing of what it checks).
    probe: Callable[[str], bool] | None = None
    # Raise RunFatal when no item can succeed (a missing encoder): checked at every claim,
    # so such a run fails before its first item instead of one item at a time.
    preflight: Callable[[], None] = field(default=lambda: None)
    # Scope of a run the scheduled tick starts when items have waited too long for work
    # that should have come by itself (an upload whose job was never enqueued); None: none.
    rescue_scope: Callable[[], dict | None] | None = None
    # Scope a push tick may start a run with when none is active (None: never).
    idle_scope: dict | None = None
    # Task-specific figures for a preview (normalized scope -> JSON-able dict), shown beside
    # the item count: e.g. the objects and bytes a collector would reclaim. None: none.
    preview_details: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    # The explicit ids of a normalized scope, in submission order (None: a library-wide
    # scope). A scope with ids makes a *batch* run: it coexists with other runs, keeps a row
    # per requested item and goes before library runs.
    batch_ids: Callable[[dict[str, Any]], list[int] | None] = field(default=lambda scope: None)
    # What a batch run shows for an item that succeeded (JSON-able; e.g. served widths, URLs).
    item_result: Callable[[Model], dict[str, Any]] | None = None
    # Called once for each terminal transition of a run (its AdminTaskRunFinish record).
    on_finish: Callable[[Any], None] | None = None
    # Thumbnails shown beside failed items: item ids -> URL (ids without one left out).
    # None: none (the API knows nothing of what an item is).
    item_thumbnail_urls: Callable[[list[int]], dict[int, str]] | None = None

    # --- surfaces -----------------------------------------------------------------------
    # The JSON API's prefix under /api/v1/ ("" = the key).
    api_prefix: str = ""
    # A manage.py command of its own (Django finds commands by file name, so it also needs
    # a two-line module in tasks/management/commands/; check tasks.E001 says when it is
    # missing). "" = none: ``manage.py taskrun KEY`` runs every task.
    command: str = ""
    command_help: str = ""
    # What the empty scope means, on the /admin/tasks card.
    default_scope_label: str = "Default"
    default_scope_help: str = "The task's default scope"
    # Shown on /admin/tasks and among the command line's known tasks (test tasks are not).
    listed: bool = True

    def __post_init__(self) -> None:
        if not self.api_prefix:
            object.__setattr__(self, "api_prefix", self.key)


_REGISTRY: dict[str, TaskDefinition] = {}


class UnknownTask(KeyError):
    pass


def register(definition: TaskDefinition) -> TaskDefinition:
    if definition.key in _REGISTRY and _REGISTRY[definition.key] is not definition:
        raise ValueError(f"task {definition.key!r} registered twice")
    others = [d for k, d in _REGISTRY.items() if k != definition.key]
    if definition.lock_id in {d.lock_id for d in others}:
        raise ValueError(f"lock id {definition.lock_id} already used")
    if definition.api_prefix in {d.api_prefix for d in others}:
        raise ValueError(f"API prefix {definition.api_prefix!r} already used")
    if definition.command and definition.command in {d.command for d in others}:
        raise ValueError(f"command {definition.command!r} already used")
    _REGISTRY[definition.key] = definition
    return definition


def get(key: str) -> TaskDefinition:
    try:
        return _REGISTRY[key]
    except KeyError:
        raise UnknownTask(key) from None


def all_definitions() -> list[TaskDefinition]:
    return sorted(_REGISTRY.values(), key=lambda d: d.key)


def by_command(command: str) -> TaskDefinition:
    """The definition that declares ``command`` as its manage.py command."""
    for definition in _REGISTRY.values():
        if definition.command == command:
            return definition
    raise UnknownTask(command)


def api_url_name(definition: TaskDefinition, route: str) -> str:
    """The URL name of one of a task's API routes ("runs-list", "run-detail", ...): how the
    /admin/tasks page finds the routes the ``api`` app derives, without importing it."""
    return f"{definition.api_prefix}-{route}"


def scope_bool(scope: dict, name: str) -> bool:
    value = scope.get(name, False)
    if not isinstance(value, bool):
        raise ScopeError(name, f"{name} must be true or false")
    return value


def scope_ids(scope: dict, name: str, *, limit: int) -> list[int] | None:
    """The ids of ``scope[name]`` in submission order, duplicates collapsed (None if absent)."""
    if name not in scope or scope[name] is None:
        return None
    value = scope[name]
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        raise ScopeError(name, f"{name} must be a list of positive integer ids")
    if not value:
        raise ScopeError(name, f"{name} must not be empty")
    if len(value) > limit:
        raise ScopeError(name, f"{name} takes at most {limit} ids, got {len(value)}")
    return list(dict.fromkeys(value))


# The most ids one batch run takes (the API answers 400 above it).
MAX_BATCH_IDS = 1000


def batch_scope(scope: dict, name: str, ids: list[int]) -> dict:
    """The normalized scope of a batch over ``ids`` (from ``scope_ids``), naming the ids given
    more than once, so the run reports them instead of silently collapsing them."""
    duplicates = scope_duplicates(scope, name)
    return {"mode": "ids", name: ids, **({"duplicates": duplicates} if duplicates else {})}


def scope_duplicates(scope: dict, name: str) -> list[int]:
    """Ids given more than once in ``scope[name]`` (each once, in order of first repeat)."""
    seen: set[int] = set()
    repeated: dict[int, None] = {}
    for value in scope.get(name) or []:
        if value in seen:
            repeated[value] = None
        seen.add(value)
    return list(repeated)


def reject_unknown_keys(scope: dict, allowed: set[str]) -> None:
    if not isinstance(scope, dict):
        raise ScopeError("scope", "scope must be a JSON object")
    unknown = sorted(set(scope) - allowed)
    if unknown:
        raise ScopeError(unknown[0], f"unknown scope key {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}")
