"""The API's one error shape and the one place that maps refusals onto it.

Every answer that is not a success is ``{"error": {"code", "message", "details"}}`` with an
HTTP status: the API's own refusals (``ApiError``: auth, bad bodies), the engine's
(``tasks.engine.EngineError``, which carries its code and status), request-parsing failures
and pydantic validation errors (400 with ``details.field`` naming the culprit). Bad input
is a 4xx, never a 500.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import RequestDataTooBig, TooManyFieldsSent, TooManyFilesSent
from django.http import HttpRequest, JsonResponse
from django.http.multipartparser import MultiPartParserError
from ninja import NinjaAPI
from ninja.errors import HttpError, ValidationError

from tasks.engine import EngineError, InvalidBudget, InvalidScope


def api_error(status: int, code: str, message: str, details: Any = None) -> JsonResponse:
    """``{"error": {"code", "message", "details"}}`` with the given HTTP status.

    ``details`` is always present (``{}`` when there is nothing to add).
    """
    body = {"code": code, "message": message, "details": {} if details is None else details}
    return JsonResponse({"error": body}, status=status)


class ApiError(Exception):
    """A refusal the API answers as it is: status, code, message, details."""

    def __init__(self, *, status: int, code: str, message: str, details: Any = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details

    def response(self) -> JsonResponse:
        return api_error(self.status, self.code, self.message, self.details)


def bad_request(code: str, message: str, *, field: str | None = None) -> ApiError:
    """A 400 about the request itself; ``field`` names the culprit."""
    return ApiError(status=400, code=code, message=message, details={"field": field} if field else {})


# Body keys whose own errors carry the engine's code (a bad scope key is invalid_scope,
# whether pydantic or the definition's normalizer finds it).
NESTED_ERROR_CODES = {"scope": InvalidScope.code, "budget": InvalidBudget.code}
_FIRST_KINDS = ("extra_forbidden", "missing")  # unknown keys, then missing ones, then the rest


def _precedence(error: dict[str, Any]) -> tuple[int, int]:
    kind = error.get("type", "")
    return len(error["loc"]), _FIRST_KINDS.index(kind) if kind in _FIRST_KINDS else len(_FIRST_KINDS)


def validation_error(exc: ValidationError) -> ApiError:
    """The first of ninja's validation errors, in the API's words."""
    error = min(exc.errors, key=_precedence)
    source, *path = error["loc"]
    kind, message = error.get("type", ""), error.get("msg", "invalid")
    if source != "body":  # query and path parameters
        name = str(path[0]) if path else source
        return bad_request("invalid_parameter", f"{name}: {message}", field=name)
    path = path[1:]  # the handler's parameter name
    if not path:
        if kind == "missing":
            return bad_request("malformed_json", "The body must be a JSON object.", field="body")
        return bad_request("invalid_body", "The body must be a JSON object.", field="body")
    key = str(path[0])
    if kind == "extra_forbidden" and len(path) == 1:
        return bad_request("invalid_body", f"Unknown key {key!r}.", field=key)
    if kind == "missing" and len(path) == 1:
        return bad_request("invalid_body", f"{key!r} is required.", field=key)
    if len(path) == 1 or key not in NESTED_ERROR_CODES:
        shape = "a JSON object" if key in NESTED_ERROR_CODES else "valid"
        return bad_request("invalid_body", f"{key!r} must be {shape}: {message}", field=key)
    name = str(path[1])
    if kind == "extra_forbidden":
        return bad_request(NESTED_ERROR_CODES[key], f"unknown {key} key {name!r}", field=name)
    refusal = bad_request(NESTED_ERROR_CODES[key], f"{key} {name}: {message}", field=name)
    if kind == "too_long":  # e.g. more ids than a batch takes: say the limit
        refusal.details["limit"] = (error.get("ctx") or {}).get("max_length")
    return refusal


def install_error_handlers(api: NinjaAPI) -> None:
    """Map every refusal onto the one error shape (ninja calls these for whatever an
    auth callable, a parameter or a handler raises)."""

    def on_api_error(request: HttpRequest, exc: ApiError) -> JsonResponse:
        return exc.response()

    def on_engine_error(request: HttpRequest, exc: EngineError) -> JsonResponse:
        return api_error(exc.http_status, exc.code, exc.message, exc.details)

    def on_validation_error(request: HttpRequest, exc: ValidationError) -> JsonResponse:
        return validation_error(exc).response()

    def on_http_error(request: HttpRequest, exc: HttpError) -> JsonResponse:
        # ninja wraps what the body parser raised: answer with the parser's own refusal.
        if isinstance(exc.__cause__, ApiError):
            return exc.__cause__.response()
        return api_error(exc.status_code, "bad_request", str(exc))

    def on_too_large(request: HttpRequest, exc: RequestDataTooBig) -> JsonResponse:
        return api_error(413, "request_too_large", str(exc))

    def on_unreadable(request: HttpRequest, exc: Exception) -> JsonResponse:
        return api_error(400, "bad_request", str(exc) or "The multipart body could not be read.")

    api.add_exception_handler(ApiError, on_api_error)
    api.add_exception_handler(EngineError, on_engine_error)
    api.add_exception_handler(ValidationError, on_validation_error)
    api.add_exception_handler(HttpError, on_http_error)
    api.add_exception_handler(RequestDataTooBig, on_too_large)
    for unreadable in (TooManyFilesSent, TooManyFieldsSent, MultiPartParserError):
        api.add_exception_handler(unreadable, on_unreadable)
