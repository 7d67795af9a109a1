"""A run's counters: its own, plus what its batches still hold pending (clean items a fast
checkpoint wrote to the batch row only); budgets and cost per item; progress; issues."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.conf import settings
from django.db import connection
from django.utils import timezone

from tasks.engine.common import definition
from tasks.engine.queries import SQL, LiveCounters, PendingCounters
from tasks.models import AdminTaskRun, RunStatus

MAX_RECENT_ISSUES = 20

# Pending counters on a batch (PendingCounters' fields), and the run counters each is folded into.
PENDING_INTO_RUN: dict[str, tuple[str, ...]] = {
    "processed": ("processed", "spent_items"),  # fast checkpoints carry clean items only
    "succeeded": ("succeeded",),
    "skipped": ("skipped",),
    "seconds": ("spent_seconds", "busy_seconds"),
    "bytes": ("spent_bytes",),
    "writes": ("spent_writes",),
}
FOLDED_FIELDS = [name for targets in PENDING_INTO_RUN.values() for name in targets]


def live_counters(run: AdminTaskRun) -> dict[str, Any]:
    """The run's counters as of now: its own plus what its batches still hold pending,
    read in one statement. A finished run has no batches and answers from ``run`` itself."""
    own = {name: getattr(run, name) for name in LiveCounters._fields}
    if run.status in RunStatus.finished() or run.pk is None:
        return own
    with connection.cursor() as cur:
        cur.execute(SQL["live_counters"], {"run": run.pk})
        row = cur.fetchone()
    return own if row is None else LiveCounters(*row)._asdict()


def fold_pending(run: AdminTaskRun, pending: Iterable[PendingCounters]) -> list[str]:
    """Add batches' pending counters to ``run`` in memory (the caller saves); returns the
    fields changed."""
    changed = False
    for counters in pending:
        changed = True
        for value, targets in zip(counters, PENDING_INTO_RUN.values(), strict=True):
            for name in targets:
                setattr(run, name, getattr(run, name) + value)
    return FOLDED_FIELDS if changed else []


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


# --- budgets -----------------------------------------------------------------------------------


def run_item_cost(run: AdminTaskRun) -> dict:
    """What one more item of the run will likely cost: its average so far, else the
    definition's defaults."""
    if run.spent_items:
        n = run.spent_items
        return {"seconds": run.spent_seconds / n, "bytes": run.spent_bytes / n, "writes": run.spent_writes / n}
    c = definition(run.task_key).cost
    return {"seconds": c.seconds_per_item, "bytes": c.bytes_per_item, "writes": c.writes_per_item}


def money(*, writes: float, bytes_: float) -> float:
    """What ``writes`` object writes and ``bytes_`` stored bytes cost at the configured prices."""
    return writes / 1000 * settings.PICSITE_PRICE_PER_1K_WRITES + bytes_ / 1e9 * settings.PICSITE_PRICE_PER_GB


def budget_exhausted(run: AdminTaskRun, next_seconds: float, next_bytes: float, next_writes: float = 0) -> str | None:
    """Which budget the next item would exceed (live counters), if any."""
    b = run.budget or {}
    if not b:
        return None
    return budget_exceeded_by(b, live_counters(run), next_seconds, next_bytes, next_writes)


def budget_exceeded_by(
    budget: dict, spent: dict, next_seconds: float, next_bytes: float, next_writes: float = 0
) -> str | None:
    """Which of ``budget`` one more item costing this would exceed, given ``spent``."""
    if "items" in budget and spent["spent_items"] + 1 > budget["items"]:
        return "items"
    if "seconds" in budget and spent["spent_seconds"] + next_seconds > budget["seconds"]:
        return "seconds"
    if "bytes" in budget and spent["spent_bytes"] + next_bytes > budget["bytes"]:
        return "bytes"
    if "money" in budget:
        spent_money = money(writes=spent.get("spent_writes") or 0, bytes_=spent["spent_bytes"])
        if spent_money + money(writes=next_writes, bytes_=next_bytes) > budget["money"]:
            return "money"
    return None


def budget_figures(run: AdminTaskRun, reason: str, cost: dict) -> str:
    """A pause's detail: what was spent, what the next item would cost, the budget."""
    spent = live_counters(run)
    if reason == "money":
        now = money(writes=spent.get("spent_writes") or 0, bytes_=spent["spent_bytes"])
        nxt = money(writes=cost.get("writes", 0), bytes_=cost.get("bytes", 0))
        return f"the next item would exceed the money budget: spent {now:.4f}, next item ~{nxt:.4f}, budget {run.budget['money']}"
    return f"the next item would exceed the {reason} budget"


# --- issues ------------------------------------------------------------------------------------


def append_issue(run: AdminTaskRun, issue: dict) -> None:
    """Newest first, at most MAX_RECENT_ISSUES (in memory: the caller saves recent_issues)."""
    issue = {"at": timezone.now().isoformat(), **issue}
    run.recent_issues = ([issue] + list(run.recent_issues or []))[:MAX_RECENT_ISSUES]
