"""API tokens for machine callers of the JSON API (``Authorization: Bearer pst_...``).

Only a SHA-256 of the token is stored; the raw token is shown once, at creation. A
token acts as its user (whose permissions still apply) but only within its scopes
and, when set, until ``expires_at``.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import Q
from django.utils import timezone


class TokenScope(models.TextChoices):
    """What kind of request a token may make (any permission is checked on top)."""

    READ = "read", "read: GET routes (runs, preview counts, event streams)"
    WRITE = "write", "write: state-changing routes (start, kick, cancel, retry, budget, tick, upload)"
    TICK = "tick", "tick: only POST …/tick (for a scheduler)"


# The order scopes are stored in; what a token gets when no scope is named.
SCOPE_ORDER = [scope.value for scope in TokenScope]
DEFAULT_SCOPES = "read,write"
SCOPES_PATTERN = r"^(read|write|tick)(,(read|write|tick))*$"


def token_scopes_normalize(scopes: str | Iterable[str]) -> str:
    """``scopes`` (names, or a comma-separated string) as stored: "read,tick".

    Raises ValueError on an unknown or empty selection.
    """
    names = scopes.split(",") if isinstance(scopes, str) else list(scopes)
    unknown = sorted({name for name in names if name not in SCOPE_ORDER}, key=str)
    if unknown:
        raise ValueError(f"unknown token scope(s) {', '.join(map(repr, unknown))}; choose from {', '.join(SCOPE_ORDER)}")
    if not names:
        raise ValueError(f"a token needs at least one scope ({', '.join(SCOPE_ORDER)})")
    return ",".join(scope for scope in SCOPE_ORDER if scope in names)


def validate_token_scopes(value: str) -> None:
    try:
        normalized = token_scopes_normalize(value)
    except ValueError as exc:
        raise ValidationError(str(exc)) from None
    if normalized != value:
        raise ValidationError(f"store scopes as {normalized!r}")


class ApiToken(models.Model):
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100)
    # The first 8 characters of the raw token, so a person can tell tokens apart.
    prefix = models.CharField(max_length=8, editable=False)
    token_hash = models.CharField(max_length=64, unique=True, editable=False)
    # Comma-separated TokenScope values in SCOPE_ORDER (the database checks the shape).
    scopes = models.CharField(max_length=32, default=DEFAULT_SCOPES, validators=[validate_token_scopes])
    expires_at = models.DateTimeField(
        null=True, blank=True, help_text="After this the token is refused (401 token_expired). Empty: never."
    )
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    revoked_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        # Created as picsite.ApiToken; the move to this app kept the table (api.0001).
        db_table = "picsite_apitoken"
        ordering = ["-id"]
        verbose_name = "API token"
        constraints = [
            models.CheckConstraint(condition=Q(scopes__regex=SCOPES_PATTERN), name="api_token_known_scopes"),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @property
    def is_revoked(self) -> bool:
        return self.revoked_at is not None

    @property
    def scope_list(self) -> list[str]:
        return self.scopes.split(",")

    def is_expired(self, *, now: datetime | None = None) -> bool:
        return self.expires_at is not None and self.expires_at <= (now or timezone.now())


class PushSignatureUse(models.Model):
    """A push signature already accepted: refused again until ``expires_at`` (replay store).

    Keyed by the signature's 64 hex digits (an HMAC over timestamp, method, path and
    body, so one per delivery); rows past ``expires_at`` are purged as new ones arrive.
    """

    digest = models.CharField(max_length=64, primary_key=True)
    expires_at = models.DateTimeField(db_index=True)

    class Meta:
        db_table = "picsite_pushsignatureuse"  # created as picsite.PushSignatureUse (api.0001)
        verbose_name = "used push signature"

    def __str__(self) -> str:
        return f"{self.digest[:12]}… until {self.expires_at:%Y-%m-%d %H:%M:%S}"
