"""Who is calling the JSON API, API tokens, and the API's error body.

Two ways in:

- ``Authorization: Bearer pst_...``: an ``ApiToken`` (looked up by the SHA-256 of
  the presented token, so the comparison never touches the secret itself). A token
  caller sends no cookies, so it is exempt from CSRF.
- The session cookie (a logged-in browser): must pass Django's CSRF check on
  unsafe methods, done here as DRF's SessionAuthentication does, because API views
  are ``csrf_exempt`` (so that failures are JSON, not Django's HTML 403).

Failures are always JSON, never a redirect to a login page.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import timedelta
from typing import Any

from django.contrib.auth.base_user import AbstractBaseUser
from django.db.models import Q
from django.http import HttpRequest, JsonResponse
from django.middleware.csrf import CsrfViewMiddleware
from django.utils import timezone

from picsite.models import ApiToken

TOKEN_PREFIX = "pst_"
LAST_USED_RESOLUTION = timedelta(minutes=1)


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
    """``{"error": {"code", "message", "details"}}`` with the given HTTP status.

    ``details`` is always present (``{}`` when there is nothing to add).
    """
    body = {"code": code, "message": message, "details": {} if details is None else details}
    return JsonResponse({"error": body}, status=status)


# --- tokens ---------------------------------------------------------------------------------


def token_hash(raw_token: str) -> str:
    return hashlib.sha256(raw_token.encode()).hexdigest()


def api_token_create(*, user: AbstractBaseUser, name: str) -> tuple[ApiToken, str]:
    """Create a token for ``user``. Returns the row and the raw token (shown once)."""
    raw = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken.objects.create(user=user, name=name, prefix=raw[:8], token_hash=token_hash(raw))
    return token, raw


def api_token_revoke(*, token: ApiToken) -> ApiToken:
    """Revoke ``token`` (idempotent: a revoked token keeps its first revocation time)."""
    if token.revoked_at is None:
        now = timezone.now()
        ApiToken.objects.filter(pk=token.pk, revoked_at__isnull=True).update(revoked_at=now)
        token.refresh_from_db(fields=["revoked_at"])
    return token


def _bearer_token(request: HttpRequest) -> str | None:
    """The raw token from ``Authorization: Bearer ...``; "" if the header is malformed."""
    header = request.headers.get("Authorization")
    if header is None:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip()


def _token_user(raw: str) -> AbstractBaseUser | None:
    if not raw.startswith(TOKEN_PREFIX) or len(raw) > 200:
        return None
    digest = token_hash(raw)
    token = (
        ApiToken.objects.select_related("user")
        .filter(token_hash=digest, revoked_at__isnull=True)
        .first()
    )
    if token is None or not hmac.compare_digest(token.token_hash, digest):
        return None
    if not token.user.is_active:
        return None
    now = timezone.now()
    if token.last_used_at is None or now - token.last_used_at >= LAST_USED_RESOLUTION:
        # At most one write a minute per token, whatever the request rate.
        ApiToken.objects.filter(pk=token.pk).filter(
            Q(last_used_at__isnull=True) | Q(last_used_at__lte=now - LAST_USED_RESOLUTION)
        ).update(last_used_at=now)
    return token.user


def api_user(request: HttpRequest) -> AbstractBaseUser | None:
    """The authenticated caller, or None when anonymous (or the bearer token is bad).

    A bearer token, when sent, decides alone (no fallback to the session). Sets
    ``request.api_auth`` to "token" or "session". Raises ApiAuthError when a session
    caller fails the CSRF check.
    """
    raw = _bearer_token(request)
    if raw is not None:
        user = _token_user(raw) if raw else None
        if user is not None:
            request.api_auth = "token"
            request.user = user
        return user
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return None
    _enforce_csrf(request)
    request.api_auth = "session"
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
