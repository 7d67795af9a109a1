"""Reads of the engine's tables: runs, their leased batches and the failed-item ledger.

The CLI, the queue jobs and the engine itself ask here (writes are the engine's services).
A selector never writes and knows nothing of the engine: a run that is not there is None.
"""

from __future__ import annotations

from datetime import datetime

from django.db.models import Case, QuerySet, Sum, When
from django.utils import timezone

from tasks import registry
from tasks.models import (
    AdminTaskBatch,
    AdminTaskEvent,
    AdminTaskItem,
    AdminTaskRun,
    AdminTaskRunFinish,
    ItemState,
    RunKind,
    RunStatus,
)

# --- runs ---------------------------------------------------------------------------------


def run_get(*, run_id: int) -> AdminTaskRun | None:
    return AdminTaskRun.objects.filter(pk=run_id).first()


def run_status(*, run_id: int) -> str | None:
    return AdminTaskRun.objects.filter(pk=run_id).values_list("status", flat=True).first()


def run_active(*, task_key: str) -> AdminTaskRun | None:
    """The library run of ``task_key`` that blocks another (at most one: a unique index);
    batch runs block nothing."""
    return AdminTaskRun.objects.filter(task_key=task_key, kind=RunKind.LIBRARY, status__in=RunStatus.active()).first()


def runs_active(*, task_key: str, limit: int | None = None) -> list[AdminTaskRun]:
    """Every active run of ``task_key``: batch runs first (newest first), then the library
    run. With ``limit``, at most that many: the newest batch runs and the library run."""
    if limit is None:
        return list(
            AdminTaskRun.objects.filter(task_key=task_key, status__in=RunStatus.active()).order_by(
                Case(When(kind=RunKind.BATCH, then=0), default=1), "-id"
            )
        )
    library = run_active(task_key=task_key)
    batches = AdminTaskRun.objects.filter(task_key=task_key, kind=RunKind.BATCH, status__in=RunStatus.active())
    batches = list(batches.order_by("-id")[: max(limit - (library is not None), 0)])
    return [*batches, *([library] if library is not None else [])]


def run_other_active(*, run: AdminTaskRun) -> AdminTaskRun | None:
    """An active library run of ``run``'s task other than ``run``."""
    return (
        AdminTaskRun.objects.filter(task_key=run.task_key, kind=RunKind.LIBRARY, status__in=RunStatus.active())
        .exclude(pk=run.pk)
        .first()
    )


def runs_to_kick(*, task_key: str | None = None) -> list[AdminTaskRun]:
    """Runs a kick has something to do for — runnable ones, and cancelling ones (a kick
    settles them once their workers are gone) — batch runs first, oldest first."""
    qs = AdminTaskRun.objects.filter(status__in=[*RunStatus.runnable(), RunStatus.CANCELLING])
    if task_key is not None:
        qs = qs.filter(task_key=task_key)
    return list(qs.order_by(Case(When(kind=RunKind.BATCH, then=0), default=1), "id"))


def batch_run_ids_runnable(*, exclude: int | None = None, limit: int = 5) -> list[tuple[int, str]]:
    """(id, task key) of runnable batch runs, oldest first: a worker serves these before its
    own (library) run, so a small batch is never stuck behind a long backfill."""
    qs = AdminTaskRun.objects.filter(kind=RunKind.BATCH, status__in=RunStatus.runnable())
    if exclude is not None:
        qs = qs.exclude(pk=exclude)
    return list(qs.order_by("id").values_list("id", "task_key")[:limit])


def runs_recent(*, task_key: str, limit: int) -> list[AdminTaskRun]:
    return list(AdminTaskRun.objects.filter(task_key=task_key).order_by("-id")[:limit])


def run_to_kick(*, task_key: str) -> AdminTaskRun | None:
    """The first run of ``task_key`` a kick has something to do for (``runs_to_kick``)."""
    runs = runs_to_kick(task_key=task_key)
    return runs[0] if runs else None


def runs_paused_for_probe(*, task_key: str) -> list[AdminTaskRun]:
    """Runs paused for a reason their definition can probe (an outage); a budget pause
    ends when the budget is raised, not by a probe."""
    return list(AdminTaskRun.objects.filter(task_key=task_key, status=RunStatus.PAUSED).exclude(pause_reason="budget"))


def task_cost_history(*, task_key: str, runs: int = 10) -> dict:
    """What the last ``runs`` runs that processed anything spent in all: items, seconds,
    bytes and writes (None each when there are none)."""
    recent = AdminTaskRun.objects.filter(task_key=task_key, processed__gt=0).order_by("-id")[:runs]
    return AdminTaskRun.objects.filter(pk__in=list(recent.values_list("pk", flat=True))).aggregate(
        items=Sum("spent_items"), seconds=Sum("busy_seconds"), bytes=Sum("spent_bytes"), writes=Sum("spent_writes")
    )


# --- what is left of a run ------------------------------------------------------------------


def run_unclaimed_items(*, run: AdminTaskRun) -> QuerySet:
    """Items of the run's frozen scope (ids up to ``max_item_id``) never handed to a batch:
    past the keyset cursor. Unordered; the claim adds its ordering."""
    defn = registry.get(run.task_key)
    return defn.scope_queryset(run.scope).filter(pk__gt=run.cursor, pk__lte=run.max_item_id)


def run_has_claimable_work(*, run: AdminTaskRun) -> bool:
    """Could a kick claim something now besides retries: a batch whose lease ran out (its
    worker died or handed it back), or unclaimed items?"""
    return run_has_expired_batch(run=run) or run_unclaimed_items(run=run).exists()


def run_has_work_besides_retries(*, run: AdminTaskRun) -> bool:
    """Is anything left but retries waiting on their backoff: a batch (held by a live
    worker or not), or unclaimed items?"""
    return AdminTaskBatch.objects.filter(run=run).exists() or run_unclaimed_items(run=run).exists()


def run_has_work_left(*, run: AdminTaskRun) -> bool:
    """Is anything left at all: a batch, a retry (due or not), or unclaimed items?"""
    return (
        AdminTaskBatch.objects.filter(run=run).exists()
        or AdminTaskItem.objects.filter(run=run, state=ItemState.RETRYING).exists()
        or run_unclaimed_items(run=run).exists()
    )


def run_has_live_batch(*, run: AdminTaskRun, now: datetime | None = None) -> bool:
    return AdminTaskBatch.objects.filter(run=run, lease_expires_at__gt=now or timezone.now()).exists()


def run_has_expired_batch(*, run: AdminTaskRun, now: datetime | None = None) -> bool:
    return AdminTaskBatch.objects.filter(run=run, lease_expires_at__lte=now or timezone.now()).exists()


def run_lease_holder(*, run: AdminTaskRun) -> AdminTaskBatch | None:
    """The live batch whose lease runs out first (who holds the run up, if anyone)."""
    return (
        AdminTaskBatch.objects.filter(run=run, lease_expires_at__gt=timezone.now()).order_by("lease_expires_at").first()
    )


def run_next_lease_expiry(*, run: AdminTaskRun) -> datetime | None:
    return (
        AdminTaskBatch.objects.filter(run=run)
        .order_by("lease_expires_at")
        .values_list("lease_expires_at", flat=True)
        .first()
    )


def run_next_retry_at(*, run: AdminTaskRun, after: datetime | None = None) -> datetime | None:
    """When the earliest unclaimed retry is due (only those due after ``after``, if given)."""
    retries = AdminTaskItem.objects.filter(run=run, state=ItemState.RETRYING, claimed=False)
    if after is not None:
        retries = retries.filter(next_attempt_at__gt=after)
    return retries.order_by("next_attempt_at").values_list("next_attempt_at", flat=True).first()


def run_due_retry_ids(*, run_id: int, now: datetime, limit: int) -> list[int]:
    """Unclaimed retries whose backoff has passed, the longest-waiting first."""
    return list(
        AdminTaskItem.objects.filter(run_id=run_id, state=ItemState.RETRYING, claimed=False, next_attempt_at__lte=now)
        .order_by("next_attempt_at", "item_id")
        .values_list("item_id", flat=True)[:limit]
    )


# --- the failed-item ledger -------------------------------------------------------------------


def run_ledger(*, run_id: int, item_ids: list[int]) -> dict[int, AdminTaskItem]:
    """Ledger rows of these items, by item id."""
    return {row.item_id: row for row in AdminTaskItem.objects.filter(run_id=run_id, item_id__in=item_ids)}


def run_items_not_succeeded(*, run: AdminTaskRun, limit: int = 200) -> list[AdminTaskItem]:
    """Items that failed at least once and are still retrying or out of attempts, by item
    id (a batch run's other rows — pending, processing, skipped, missing — are not failures)."""
    return list(
        AdminTaskItem.objects.filter(run=run, state__in=[ItemState.RETRYING, ItemState.FAILED]).order_by("item_id")[:limit]
    )


def run_failed_items(*, run: AdminTaskRun, limit: int) -> list[AdminTaskItem]:
    """Items out of attempts, by item id."""
    return list(AdminTaskItem.objects.filter(run=run, state=ItemState.FAILED).order_by("item_id")[:limit])


# --- a run's items, events and finish records ------------------------------------------------

# The states a client asks for, as stored: a retrying item is shown as pending.
STORED_STATES = {ItemState.PENDING: [ItemState.PENDING, ItemState.RETRYING]}


def run_items_page(*, run: AdminTaskRun, state: str | None, after: int | None, limit: int) -> list[AdminTaskItem]:
    """One keyset page of the run's item rows: a batch run's by submission position, a
    library run's ledger by item id; ``after`` is the last key of the previous page."""
    qs = AdminTaskItem.objects.filter(run=run)
    if state is not None:
        qs = qs.filter(state__in=STORED_STATES.get(state, [state]))
    key = "position" if run.kind == RunKind.BATCH else "item_id"
    if after is not None:
        qs = qs.filter(**{f"{key}__gt": after})
    return list(qs.order_by(key)[:limit])


def run_item_ids_in_state(*, run: AdminTaskRun, state: str, limit: int = 1000) -> list[int]:
    """Item ids of the run in ``state``, in submission order (batch runs)."""
    return list(
        AdminTaskItem.objects.filter(run=run, state=state).order_by("position", "item_id").values_list("item_id", flat=True)[:limit]
    )


def run_items_all(*, run_id: int) -> list[AdminTaskItem]:
    """Every item row of a batch run, in submission order (an event stream's snapshot)."""
    return list(AdminTaskItem.objects.filter(run_id=run_id).order_by("position", "item_id"))


def run_events_after(*, run_id: int, after: int, limit: int = 5000) -> list[AdminTaskEvent]:
    """The run's item events with an id above ``after``, in commit (id) order."""
    return list(AdminTaskEvent.objects.filter(run_id=run_id, pk__gt=after).order_by("pk")[:limit])


def run_last_event_id(*, run_id: int) -> int:
    return AdminTaskEvent.objects.filter(run_id=run_id).order_by("-pk").values_list("pk", flat=True).first() or 0


def run_finishes(*, run: AdminTaskRun) -> list[AdminTaskRunFinish]:
    """The run's finish records (one per terminal transition), by sequence number."""
    return list(AdminTaskRunFinish.objects.filter(run=run).order_by("seq"))
