"""The project's JSON API under ``/api/v1/``: one ``PicsiteAPI`` made of the gallery's
routes and one router per registered task, its OpenAPI document at ``/api/v1/schema``
(generated from the code), and a JSON 404 for anything else under ``/api/v1``.
picsite/urls.py includes ``urlpatterns``.
"""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest
from django.urls import URLPattern, URLResolver, include, path, re_path
from ninja import Router

from api import images
from api.http import PUBLIC, PicsiteAPI
from api.tasks.routes import task_router
from api.views import api_not_found
from tasks import registry

API_ROOT = "api/v1/"


def build_api() -> PicsiteAPI:
    """The API as the registry stands now: a task registered later gets its routes from
    the next build (the URLconf builds once, after every app's definitions are in)."""
    api = PicsiteAPI(
        title="picsite API",
        version="1",
        description='Photo uploads and the resumable task runs behind /admin/tasks/. Errors are always '
        '{"error": {"code", "message", "details"}}.',
        servers=[{"url": "/"}],
    )
    meta = Router(tags=["Meta"])

    def schema(request: HttpRequest) -> dict[str, Any]:
        return api.openapi_document(path_prefix="/" + API_ROOT)

    meta.get(
        "/schema", operation_id="schema", summary="This document.", url_name="api-schema",
        response={200: dict[str, Any]}, openapi_extra=PUBLIC,
    )(schema)  # fmt: skip
    meta.api_operation(["HEAD"], "/schema", include_in_schema=False)(schema)
    api.add_router("", meta)
    api.add_router("", images.router)
    for defn in registry.all_definitions():
        api.add_router(defn.api_prefix, task_router(defn))
    return api


API = build_api()

urlpatterns: list[URLPattern | URLResolver] = [
    path(API_ROOT, include(API.url_patterns())),
    # Anything else under /api/v1 is a JSON 404 (no HTML page, no APPEND_SLASH redirect).
    re_path(r"^api/v1(?:/(?P<rest>.*))?$", api_not_found),
]
