"""Task API routes, included by picsite/urls.py under ``api/v1/``: the same routes for
every registered task under its definition's ``api_prefix``; URL names from
``registry.api_url_name`` (e.g. ``preprocess-tasks-run-detail``)."""

from __future__ import annotations

from django.urls import URLPattern, include, path

from tasks import api, registry
from tasks.registry import TaskDefinition


def task_api_patterns(defn: TaskDefinition) -> list[URLPattern]:
    key = {"task_key": defn.key}

    def name(route: str) -> str:
        return registry.api_url_name(defn, route)

    return [
        path("preview-count", api.preview_count, key, name=name("preview-count")),
        path("runs", api.runs, key, name=name("runs")),
        path("runs/<int:run_id>", api.run_detail, key, name=name("run-detail")),
        path("runs/<int:run_id>/kick", api.run_kick, key, name=name("run-kick")),
        path("runs/<int:run_id>/cancel", api.run_cancel, key, name=name("run-cancel")),
        path("runs/<int:run_id>/retry-failed", api.run_retry_failed, key, name=name("run-retry-failed")),
        path("runs/<int:run_id>/budget", api.run_budget, key, name=name("run-budget")),
        path("runs/<int:run_id>/events", api.run_events, key, name=name("run-events")),
        path("tick", api.tick, key, name=name("tick")),
    ]


urlpatterns = [path(f"{defn.api_prefix}/", include(task_api_patterns(defn))) for defn in registry.all_definitions()]
