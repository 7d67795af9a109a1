"""Who is calling the JSON API, and the API's error body.

API views are ``csrf_exempt`` and call ``api_user`` instead: a session caller still
has to pass Django's CSRF check (done here, as DRF's SessionAuthentication does),
while a future bearer-token caller, which sends no cookies, will not. Failures are
always JSON, never a redirect to a login page or Django's HTML 403.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth.base_user import AbstractBaseUser
from django.http import HttpRequest, JsonResponse
from django.middleware.csrf import CsrfViewMiddleware


class ApiAuthError(Exception):
    """The caller presented credentials that must be refused (e.g. a failed CSRF check)."""

    def __init__(self, *, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def response(self) -> JsonResponse:
        return api_error(self.status, self.code, self.message)


def api_error(status: int, code: str, message: str, details: Any = None) -> JsonResponse:
    """``{"error": {"code", "message"[, "details"]}}`` with the given HTTP status."""
    body: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        body["details"] = details
    return JsonResponse({"error": body}, status=status)


def api_user(request: HttpRequest) -> AbstractBaseUser | None:
    """The authenticated caller, or None when anonymous.

    Raises ApiAuthError when a session caller fails the CSRF check.
    """
    # Hook: bearer tokens go here ("Authorization: Bearer ..."), checked before the
    # session and exempt from CSRF since the browser never sends them on its own.
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return None
    _enforce_csrf(request)
    return user


class _CsrfCheck(CsrfViewMiddleware):
    def _reject(self, request, reason):  # return the reason instead of an HTML page
        return reason


def _csrf_dummy_view(request):  # no ``csrf_exempt`` attribute, so the check runs
    return None


def _enforce_csrf(request: HttpRequest) -> None:
    check = _CsrfCheck(lambda req: None)
    check.process_request(request)
    reason = check.process_view(request, _csrf_dummy_view, (), {})
    if reason:
        raise ApiAuthError(status=403, code="csrf_failed", message=f"CSRF check failed: {reason}")
