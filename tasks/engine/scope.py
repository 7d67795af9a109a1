"""What a run would cover and may spend: scopes, budgets, and the dry-run preview with
its cost estimate."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from django.conf import settings

from tasks import selectors
from tasks.engine.common import definition
from tasks.engine.errors import InvalidBudget, InvalidScope
from tasks.registry import ScopeError, TaskDefinition

BUDGET_KEYS = {"items": int, "seconds": (int, float), "bytes": int, "money": (int, float)}


def normalize_scope(*, task_key: str, scope: Any) -> dict:
    defn = definition(task_key)
    try:
        return defn.normalize_scope(scope if scope is not None else {})
    except ScopeError as exc:
        raise InvalidScope(exc.message, details={"field": exc.field}) from exc


def normalize_budget(budget: Any) -> dict:
    if budget in (None, {}):
        return {}
    if not isinstance(budget, dict):
        raise InvalidBudget("budget must be a JSON object", details={"field": "budget"})
    out = {}
    for key, value in budget.items():
        if key not in BUDGET_KEYS:
            raise InvalidBudget(f"unknown budget key {key!r}; allowed: {', '.join(BUDGET_KEYS)}", details={"field": key})
        if key == "money" and not (settings.PICSITE_PRICE_PER_1K_WRITES or settings.PICSITE_PRICE_PER_GB):
            raise InvalidBudget(
                "a money budget needs prices: set PICSITE_PRICE_PER_1K_WRITES and/or PICSITE_PRICE_PER_GB",
                details={"field": key},
            )
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, BUDGET_KEYS[key]) or value <= 0:
            raise InvalidBudget(f"budget {key} must be a positive number", details={"field": key})
        out[key] = value
    return out


@dataclass
class Preview:
    task_key: str
    scope: dict
    count: int
    estimate: dict = field(default_factory=dict)
    details: dict | None = None  # the definition's preview_details, if it has them
    batch: dict | None = None  # explicit ids: requested, existing, missing (and which), duplicates


def preview_count(*, task_key: str, scope: Any) -> Preview:
    """How many items the scope covers now, and what processing them would likely cost."""
    defn = definition(task_key)
    normalized = normalize_scope(task_key=task_key, scope=scope)
    ids = defn.batch_ids(normalized)
    qs = defn.scope_queryset(normalized)
    batch = None
    if ids is not None:
        # An explicit batch: exactly the ids that exist (as create would count them).
        existing = set(qs.values_list("pk", flat=True))
        missing = [i for i in ids if i not in existing]
        count = len(existing)
        batch = {
            "requested": len(ids),
            "existing": count,
            "missing": len(missing),
            "missing_ids": missing,
            "duplicates": list(normalized.get("duplicates", [])),
        }
    else:
        count = qs.count()
    per = _per_item_cost(defn)
    estimate = {
        "cpu_seconds": round(per["seconds"] * count, 1),
        "bytes": int(per["bytes"] * count),
        "object_writes": int(per["writes"] * count),
        "basis": per["source"],
    }
    if settings.PICSITE_PRICE_PER_1K_WRITES or settings.PICSITE_PRICE_PER_GB:
        estimate["money"] = round(
            estimate["object_writes"] / 1000 * settings.PICSITE_PRICE_PER_1K_WRITES
            + estimate["bytes"] / 1e9 * settings.PICSITE_PRICE_PER_GB,
            4,
        )
    details = defn.preview_details(normalized) if defn.preview_details is not None else None
    return Preview(task_key=task_key, scope=normalized, count=count, estimate=estimate, details=details, batch=batch)


def _per_item_cost(defn: TaskDefinition) -> dict:
    """Average cost per processed item over the last runs, else the definition's defaults."""
    spent = selectors.task_cost_history(task_key=defn.key)
    if spent["items"]:
        return {
            "seconds": spent["seconds"] / spent["items"],
            "bytes": spent["bytes"] / spent["items"],
            "writes": spent["writes"] / spent["items"],
            "source": "history",
        }
    c = defn.cost
    return {"seconds": c.seconds_per_item, "bytes": c.bytes_per_item, "writes": c.writes_per_item, "source": "default"}
