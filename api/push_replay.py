"""Replay store for push signatures: each accepted signature is usable once.

A signature stays acceptable for ``push_sign.REPLAY_WINDOW_S`` after its timestamp,
so it is remembered (in Postgres, shared by every web process and host) at least
that long; expired rows are purged as new signatures arrive.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from django.db import connection
from django.utils import timezone

from api.models import PushSignatureUse
from api.push_sign import REPLAY_WINDOW_S

# Kept this long past the window, so clock skew between hosts cannot reopen it.
CLOCK_SKEW_MARGIN_S = 60


def push_signature_use_record(*, digest: str, timestamp: int) -> bool:
    """Remember the signature ``digest``; False if it was already used (a replay).

    One statement decides (``ON CONFLICT DO NOTHING``), so of two concurrent copies
    exactly one wins.
    """
    expires_at = datetime.fromtimestamp(timestamp, tz=UTC) + timedelta(seconds=REPLAY_WINDOW_S + CLOCK_SKEW_MARGIN_S)
    table = connection.ops.quote_name(PushSignatureUse._meta.db_table)
    with connection.cursor() as cur:
        cur.execute(
            f"INSERT INTO {table} (digest, expires_at) VALUES (%s, %s) ON CONFLICT (digest) DO NOTHING RETURNING 1",
            [digest, expires_at],
        )
        first_use = cur.fetchone() is not None
    PushSignatureUse.objects.filter(expires_at__lt=timezone.now()).delete()
    return first_use
