"""Who is calling the JSON API, API tokens, and the API's error body.

Two ways in:

- ``Authorization: Bearer pst_...``: an ``ApiToken`` (looked up by the SHA-256 of
  the presented token, so the comparison never touches the secret itself). A token
  caller sends no cookies, so it is exempt from CSRF.
- The session cookie (a logged-in browser): must pass Django's CSRF check on
  unsafe methods, done here as DRF's SessionAuthentication does, because API views
  are ``csrf_exempt`` (so that failures are JSON, not Django's HTML 403).

Failures are always JSON, never a redirect to a login page.

What a caller may do (``api_authorize``): it must be an active staff user (as the
admin requires), hold the route's Django permission (superusers hold every one),
and, when it came with a token, the token must carry one of the route's scopes and
not have expired. Session callers are limited by permissions only.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.contrib.auth.base_user import AbstractBaseUser
from django.core.exceptions import PermissionDenied
from django.db.models import Q
from django.http import HttpRequest
from django.middleware.csrf import CsrfViewMiddleware
from django.utils import timezone

from api.errors import ApiError
from api.models import DEFAULT_SCOPES, SCOPE_ORDER, ApiToken, token_scopes_normalize

TOKEN_PREFIX = "pst_"
LAST_USED_RESOLUTION = timedelta(minutes=1)


class ApiAuthError(ApiError):
    """The caller must be refused: no or bad credentials, a failed CSRF check, not allowed."""


# --- tokens ---------------------------------------------------------------------------------


def token_hash(raw_token: str) -> str:
    return hashlib.sha256(raw_token.encode()).hexdigest()


def api_token_create(
    *,
    user: AbstractBaseUser,
    name: str,
    scopes: Iterable[str] | None = None,
    expires_at: datetime | None = None,
    minted_by: AbstractBaseUser | None = None,
) -> tuple[ApiToken, str]:
    """Create a token for ``user``. Returns the row and the raw token (shown once).

    ``scopes`` defaults to read and write (ValueError on an unknown or empty set).
    ``minted_by`` is the person asking (the admin passes request.user): one may mint
    tokens only for oneself unless a superuser. None means a trusted caller, such as
    ``manage.py create_api_token`` run on the server.
    """
    if minted_by is not None and not minted_by.is_superuser and minted_by.pk != user.pk:
        raise PermissionDenied("Only a superuser may create API tokens for another user.")
    normalized = DEFAULT_SCOPES if scopes is None else token_scopes_normalize(scopes)
    raw = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken.objects.create(
        user=user, name=name, prefix=raw[:8], token_hash=token_hash(raw), scopes=normalized, expires_at=expires_at
    )
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


def _token_of(raw: str) -> ApiToken | None:
    """The live token for ``raw``, or None. An expired one raises (401 token_expired)."""
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
    if token.is_expired(now=now):
        # Only the holder of the raw token learns this; it tells them to get a new one.
        raise ApiAuthError(status=401, code="token_expired", message="This API token has expired.")
    if token.last_used_at is None or now - token.last_used_at >= LAST_USED_RESOLUTION:
        # At most one write a minute per token, whatever the request rate.
        ApiToken.objects.filter(pk=token.pk).filter(
            Q(last_used_at__isnull=True) | Q(last_used_at__lte=now - LAST_USED_RESOLUTION)
        ).update(last_used_at=now)
    return token


def api_user(request: HttpRequest) -> AbstractBaseUser | None:
    """The authenticated caller, or None when anonymous (or the bearer token is bad).

    A bearer token, when sent, decides alone (no fallback to the session). Sets
    ``request.api_auth`` to "token" (and ``request.api_token``) or "session". Raises
    ApiAuthError when a token has expired or a session caller fails the CSRF check.
    """
    raw = _bearer_token(request)
    if raw is not None:
        token = _token_of(raw) if raw else None
        if token is None:
            return None
        request.api_auth = "token"
        request.api_token = token
        request.user = token.user
        return token.user
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return None
    _enforce_csrf(request)
    request.api_auth = "session"
    return user


# --- authorization ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Access:
    """What a route asks of its caller: a Django permission ("app_label.codename"),
    and for a token caller one of ``scopes`` (any one suffices)."""

    permission: str
    scopes: tuple[str, ...]

    def __post_init__(self) -> None:
        unknown = set(self.scopes) - set(SCOPE_ORDER)
        if unknown or not self.scopes:
            raise ValueError(f"bad scopes {self.scopes!r} for {self.permission}")


def api_authorize(request: HttpRequest, *, access: Access) -> AbstractBaseUser:
    """The caller, if it may make this request; else raises ApiAuthError.

    401 not_authenticated / token_expired; 403 csrf_failed, forbidden (not an active
    staff user), insufficient_scope (the token lacks every scope the route accepts)
    or permission_denied (naming the missing permission).
    """
    user = api_user(request)
    if user is None:
        raise ApiAuthError(
            status=401, code="not_authenticated", message="Send a bearer token or log in as a staff user."
        )
    if not (user.is_active and user.is_staff):
        raise ApiAuthError(status=403, code="forbidden", message="Only staff users may use the API.")
    token = getattr(request, "api_token", None) if request.api_auth == "token" else None
    if token is not None and not set(access.scopes) & set(token.scope_list):
        raise ApiAuthError(
            status=403,
            code="insufficient_scope",
            message=f"This token's scopes ({', '.join(token.scope_list)}) do not include "
            f"{' or '.join(access.scopes)}, which this request needs.",
            details={"required_scopes": list(access.scopes), "token_scopes": token.scope_list},
        )
    if not user.has_perm(access.permission):
        raise ApiAuthError(
            status=403,
            code="permission_denied",
            message=f"You need the permission {access.permission} for this request.",
            details={"permission": access.permission},
        )
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
