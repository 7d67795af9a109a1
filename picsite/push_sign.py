"""Sign (and verify) push requests such as ``POST /api/v1/tasks/tick``.

The signature covers the timestamp, the method, the path and the raw body::

    hex = HMAC-SHA256(secret, f"{timestamp}\\n{METHOD}\\n{path}\\n".encode() + body)
    X-Picsite-Timestamp: <unix seconds>
    X-Picsite-Signature: sha256=<hex>

A request is accepted within ±300 s of its timestamp, under PICSITE_PUSH_SECRET or
PICSITE_PUSH_SECRET_NEXT (rotate by setting NEXT, moving senders over, then
promoting it). A duplicate delivery is harmless: a tick only kicks the engine,
whose leases stop two ticks from processing one item twice.

Cron, every minute (no Python needed on the sender)::

    PATH_=/api/v1/preprocess-tasks/tick; TS=$(date +%s)
    SIG=$(printf '%s\\nPOST\\n%s\\n' "$TS" "$PATH_" \\
          | openssl dgst -sha256 -hmac "$PICSITE_PUSH_SECRET" -r | cut -d' ' -f1)
    curl -fsS -X POST "https://photos.example.com$PATH_" \\
         -H "X-Picsite-Timestamp: $TS" -H "X-Picsite-Signature: sha256=$SIG"

or with this module: ``python -m picsite.push_sign SECRET POST /api/v1/tasks/tick``
prints the two header lines (``-H`` arguments for curl).
"""

from __future__ import annotations

import hashlib
import hmac
import sys
import time
from collections.abc import Iterable

TIMESTAMP_HEADER = "X-Picsite-Timestamp"
SIGNATURE_HEADER = "X-Picsite-Signature"
REPLAY_WINDOW_S = 300


def signature(secret: str, method: str, path: str, body: bytes, ts: int) -> str:
    message = f"{ts}\n{method.upper()}\n{path}\n".encode() + body
    return "sha256=" + hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def sign(secret: str, method: str, path: str, body: bytes = b"", ts: int | None = None) -> dict[str, str]:
    """The two headers that authenticate ``method path`` with ``body``."""
    ts = int(time.time()) if ts is None else int(ts)
    return {TIMESTAMP_HEADER: str(ts), SIGNATURE_HEADER: signature(secret, method, path, body, ts)}


def verify(
    *,
    secrets: Iterable[str],
    method: str,
    path: str,
    body: bytes,
    timestamp: str | None,
    signature_header: str | None,
    now: float | None = None,
) -> str | None:
    """None if the signature is good under one of ``secrets``, else why it is not."""
    if not timestamp or not signature_header:
        return "missing signature headers"
    try:
        ts = int(timestamp)
    except ValueError:
        return "malformed timestamp"
    now = time.time() if now is None else now
    if abs(now - ts) > REPLAY_WINDOW_S:
        return "timestamp outside the replay window"
    good = False
    for secret in secrets:
        if secret and hmac.compare_digest(signature(secret, method, path, body, ts), signature_header.strip()):
            good = True  # keep comparing: same work whichever secret matched
    return None if good else "signature mismatch"


def main(argv: list[str]) -> int:
    if len(argv) not in (3, 4):
        print("usage: python -m picsite.push_sign SECRET METHOD PATH [BODY]", file=sys.stderr)
        return 2
    secret, method, path = argv[:3]
    body = argv[3].encode() if len(argv) == 4 else b""
    for name, value in sign(secret, method, path, body).items():
        print(f"{name}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
