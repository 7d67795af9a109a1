"""Plain functions turning engine objects into the JSON API's dicts.

Shapes are documented in ``tasks.openapi``; keep the two in step.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from tasks import engine
from tasks.models import AdminTaskItem, AdminTaskRun


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def run_to_dict(run: AdminTaskRun) -> dict[str, Any]:
    live = engine.live_counters(run)  # includes items still pending on the run's batches
    return {
        "id": run.pk,
        "task_key": run.task_key,
        "status": run.status,
        "pause_reason": run.pause_reason,
        "scope": run.scope,
        "budget": run.budget or {},
        "spent": {
            "items": live["spent_items"],
            "seconds": round(live["spent_seconds"], 3),
            "bytes": live["spent_bytes"],
            "writes": live["spent_writes"],
        },
        "counters": {
            "total": run.total,
            "processed": live["processed"],
            "succeeded": live["succeeded"],
            "skipped": live["skipped"],
            "failed": live["failed"],
        },
        "cursor": run.cursor,
        "lease": {"owner": run.lease_owner, "expires_at": _iso(run.lease_expires_at)},
        "last_error": run.last_error,
        "recent_issues": list(run.recent_issues or []),
        "created_by": run.created_by.get_username() if run.created_by_id and run.created_by else None,
        "created_at": _iso(run.created_at),
        "started_at": _iso(run.started_at),
        "finished_at": _iso(run.finished_at),
        "updated_at": _iso(run.updated_at),
        "progress": engine.progress(run, processed=live["processed"]),
    }


def run_or_none_to_dict(run: AdminTaskRun | None) -> dict[str, Any] | None:
    return run_to_dict(run) if run is not None else None


def item_to_dict(item: AdminTaskItem, *, thumbnail_url: str | None) -> dict[str, Any]:
    return {
        "item_id": item.item_id,
        "state": item.state,
        "attempts": item.attempts,
        "next_attempt_at": _iso(item.next_attempt_at),
        "code": item.last_error_code,
        "stage": item.last_error_stage,
        "message": item.last_error_message,
        "thumbnail_url": thumbnail_url,
    }


def run_detail_to_dict(
    *, run: AdminTaskRun, items: list[AdminTaskItem], thumbnails: dict[int, str]
) -> dict[str, Any]:
    return {
        **run_to_dict(run),
        "failed_items": [item_to_dict(item, thumbnail_url=thumbnails.get(item.item_id)) for item in items],
        "timeline": [[point[0], point[1]] for point in (run.timeline or [])],
    }


def run_list_to_dict(*, active: AdminTaskRun | None, recent: list[AdminTaskRun]) -> dict[str, Any]:
    return {"active": run_or_none_to_dict(active), "recent": [run_to_dict(run) for run in recent]}


def preview_to_dict(preview: engine.Preview) -> dict[str, Any]:
    return {
        "task_key": preview.task_key,
        "scope": preview.scope,
        "count": preview.count,
        "estimate": preview.estimate,
        "details": preview.details,
    }
