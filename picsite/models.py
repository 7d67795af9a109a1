"""API tokens for machine callers of the JSON API (``Authorization: Bearer pst_...``).

Only a SHA-256 of the token is stored; the raw token is shown once, at creation.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models


class ApiToken(models.Model):
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100)
    # The first 8 characters of the raw token, so a person can tell tokens apart.
    prefix = models.CharField(max_length=8, editable=False)
    token_hash = models.CharField(max_length=64, unique=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    revoked_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        ordering = ["-id"]
        verbose_name = "API token"

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @property
    def is_revoked(self) -> bool:
        return self.revoked_at is not None


class PushSignatureUse(models.Model):
    """A push signature already accepted: refused again until ``expires_at`` (replay store).

    Keyed by the signature's 64 hex digits (an HMAC over timestamp, method, path and
    body, so one per delivery); rows past ``expires_at`` are purged as new ones arrive.
    """

    digest = models.CharField(max_length=64, primary_key=True)
    expires_at = models.DateTimeField(db_index=True)

    class Meta:
        verbose_name = "used push signature"

    def __str__(self) -> str:
        return f"{self.digest[:12]}… until {self.expires_at:%Y-%m-%d %H:%M:%S}"
