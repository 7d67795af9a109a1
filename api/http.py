"""The API's plumbing on django-ninja: the ``PicsiteAPI`` class, its JSON body parser, the
auth callables routes declare, and the JSON 405.

Routers declare what they need (``auth=Requires(access)``); ``PicsiteAPI`` turns them into
URL patterns (a path whose operation names a ``plain_view`` is served by that view: the
event stream, an async Django view, documented like any route) and the OpenAPI document.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from django.contrib.auth.base_user import AbstractBaseUser
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed
from django.urls import URLPattern
from django.urls import path as django_path
from ninja import NinjaAPI
from ninja.openapi.schema import OpenAPISchema
from ninja.parser import Parser
from ninja.utils import normalize_path, replace_path_param_notation

from api.auth import Access, api_authorize
from api.errors import ApiError, api_error, bad_request, install_error_handlers

MAX_JSON_BODY_BYTES = 64 * 1024

# Who may call (tokens: ``Authorization: Bearer``; browsers: the session plus CSRF).
SECURITY_SCHEMES: dict[str, dict[str, Any]] = {
    "bearerAuth": {
        "type": "http",
        "scheme": "bearer",
        "description": "An API token (pst_...) from the admin or `manage.py create_api_token`. No CSRF. "
        "Scopes: read (GET routes), write (state-changing routes, tick included), tick (only POST .../tick); "
        "the token's user also needs the route's permission: tasks.view_admintaskrun to read runs, "
        "tasks.run_tasks to change them, gallery.add_image to upload, gallery.view_image to read images.",
    },
    "cookieAuth": {
        "type": "apiKey",
        "in": "cookie",
        "name": "sessionid",
        "description": "A staff session; unsafe methods also need the X-CSRFToken header.",
    },
}
PUBLIC: dict[str, Any] = {"security": []}  # openapi_extra of a route anyone may call


class Requires:
    """A route's auth: the caller must have ``access`` (``api.auth.api_authorize``: a
    bearer token with one of its scopes, or a staff session passing CSRF; then the
    permission). Refusals raise ``ApiAuthError``, answered as JSON."""

    def __init__(self, access: Access):
        self.access = access

    def __call__(self, request: HttpRequest) -> AbstractBaseUser:
        return api_authorize(request, access=self.access)


# --- request bodies ---------------------------------------------------------------------------


def payload_too_large() -> ApiError:
    return ApiError(status=413, code="body_too_large", message=f"JSON bodies are limited to {MAX_JSON_BODY_BYTES} bytes.")


def json_body_bytes(request: HttpRequest) -> bytes:
    """The raw body of a JSON route, refused past MAX_JSON_BODY_BYTES (declared or read)."""
    try:
        declared = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        declared = 0
    if declared > MAX_JSON_BODY_BYTES:
        raise payload_too_large()
    try:
        body = request.body
    except RequestDataTooBig:
        raise payload_too_large() from None
    if len(body) > MAX_JSON_BODY_BYTES:
        raise payload_too_large()
    return body


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


class JsonBodyParser(Parser):
    """Strict JSON: no NaN or Infinity, no numbers out of float range, valid UTF-8."""

    def parse_body(self, request: HttpRequest) -> Any:
        raw = json_body_bytes(request)
        if not raw.strip():
            raise bad_request("malformed_json", "The body must be a JSON object.", field="body")
        try:
            return json.loads(raw, parse_constant=_reject_constant, parse_float=_finite_float)
        except (ValueError, RecursionError) as exc:
            raise bad_request("malformed_json", f"The body is not valid JSON: {exc}", field="body") from None


# --- the API class ----------------------------------------------------------------------------


def _json_405(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """ninja answers a method it has no operation for with a plain-text 405: say it in JSON."""

    def json_view(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        response = view(request, *args, **kwargs)
        if isinstance(response, HttpResponseNotAllowed):
            allow = ", ".join(sorted(m.strip() for m in response["Allow"].split(",")))
            response = api_error(405, "method_not_allowed", f"{request.method} is not allowed here; use {allow}.")
            response["Allow"] = allow
        return response

    json_view.csrf_exempt = True  # type: ignore[attr-defined]  # CSRF: api_authorize, for sessions
    return json_view


def method_not_allowed(request: HttpRequest, *, allow: str) -> HttpResponse:
    response = api_error(405, "method_not_allowed", f"{request.method} is not allowed here; use {allow}.")
    response["Allow"] = allow
    return response


def plain_view(view: Callable[..., Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Mark a route as served by ``view`` (a plain Django view, e.g. async) rather than by
    ninja: the decorated operation only documents it. As every API view, ``view`` is
    exempt from Django's CSRF middleware: ``api_authorize`` checks sessions (a JSON 403)."""
    view.csrf_exempt = True  # type: ignore[attr-defined]

    def mark(operation: Callable[..., Any]) -> Callable[..., Any]:
        operation.plain_view = view  # type: ignore[attr-defined]
        return operation

    return mark


class PicsiteAPI(NinjaAPI):
    """NinjaAPI with the API's error handlers, JSON parser and content type, URL patterns
    whose 405s are JSON, and the security schemes in the OpenAPI document."""

    def __init__(self, **kwargs: Any):
        super().__init__(parser=JsonBodyParser(), openapi_url=None, docs_url=None, **kwargs)
        install_error_handlers(self)

    def get_content_type(self) -> str:
        return "application/json"  # as Django's JsonResponse says it

    def url_patterns(self) -> list[URLPattern]:
        """One pattern per path (no root page, no docs: the document is a route of its own)."""
        patterns = []
        for bound in self._get_bound_routers():
            prefix = replace_path_param_notation(bound.prefix)
            for path, path_view in bound.path_operations.items():
                route = normalize_path("/".join(p for p in (prefix, replace_path_param_notation(path)) if p))
                operation = path_view.operations[0]
                view = getattr(operation.view_func, "plain_view", None) or _json_405(path_view.get_view())
                patterns.append(django_path(route.lstrip("/"), view, name=getattr(operation, "url_name", None)))
        return patterns

    def openapi_document(self, *, path_prefix: str) -> OpenAPISchema:
        schema = self.get_openapi_schema(path_prefix=path_prefix)
        schema["components"]["securitySchemes"] = SECURITY_SCHEMES
        schema["security"] = [{name: []} for name in SECURITY_SCHEMES]
        return schema
