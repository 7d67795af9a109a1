"""Task API routes, included by picsite/urls.py under ``api/v1/``.

Each task gets the same routes under its own prefix; the prefix picks the task key.
URL names are namespaced by prefix, e.g. ``preprocess-tasks:run-detail``.
"""

from __future__ import annotations

from django.urls import URLPattern, include, path

from tasks import api

# URL prefix under /api/v1/ -> task key
TASK_API_PREFIXES: dict[str, str] = {
    "preprocess-tasks": "preprocess-images",
    "tasks": "metadata-refresh",
    "variants-gc-tasks": "variants-gc",
}


def task_api_patterns(task_key: str) -> list[URLPattern]:
    key = {"task_key": task_key}
    return [
        path("preview-count", api.preview_count, key, name="preview-count"),
        path("runs", api.runs, key, name="runs"),
        path("runs/<int:run_id>", api.run_detail, key, name="run-detail"),
        path("runs/<int:run_id>/kick", api.run_kick, key, name="run-kick"),
        path("runs/<int:run_id>/cancel", api.run_cancel, key, name="run-cancel"),
        path("runs/<int:run_id>/retry-failed", api.run_retry_failed, key, name="run-retry-failed"),
        path("runs/<int:run_id>/budget", api.run_budget, key, name="run-budget"),
        path("runs/<int:run_id>/events", api.run_events, key, name="run-events"),
        path("tick", api.tick, key, name="tick"),
    ]


urlpatterns = [
    path(f"{prefix}/", include((task_api_patterns(task_key), "tasks_api"), namespace=prefix))
    for prefix, task_key in TASK_API_PREFIXES.items()
]
