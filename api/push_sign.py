"""Sign (and verify) push requests such as ``POST /api/v1/tasks/tick``.

The signature covers the timestamp, the method, the path and the raw body::

    hex = HMAC-SHA256(secret, f"{timestamp}\\n{METHOD}\\n{path}\\n".encode() + body)
    X-Picsite-Timestamp: <unix seconds>
    X-Picsite-Signature: sha256=<hex>

A request is accepted within ±300 s of its timestamp, under PICSITE_PUSH_SECRET or
PICSITE_PUSH_SECRET_NEXT (rotate by setting NEXT, moving senders over, then
promoting it), and only once: the server remembers each accepted signature until its
window ends (``api.push_replay``), so a captured request cannot be replayed. Sign
every delivery anew. ``verify`` never raises: any junk in the headers is a reason.

Cron, every minute (no Python needed on the sender)::

    PATH_=/api/v1/preprocess-tasks/tick; TS=$(date +%s)
    SIG=$(printf '%s\\nPOST\\n%s\\n' "$TS" "$PATH_" \\
          | openssl dgst -sha256 -hmac "$PICSITE_PUSH_SECRET" -r | cut -d' ' -f1)
    curl -fsS -X POST "https://photos.example.com$PATH_" \\
         -H "X-Picsite-Timestamp: $TS" -H "X-Picsite-Signature: sha256=$SIG"

or with this module: ``python -m api.push_sign SECRET POST /api/v1/tasks/tick``
prints the two header lines (``-H`` arguments for curl).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass

TIMESTAMP_HEADER = "X-Picsite-Timestamp"
SIGNATURE_HEADER = "X-Picsite-Signature"
REPLAY_WINDOW_S = 300
SIGNATURE_PREFIX = "sha256="
# Exactly what ``sign`` sends (ASCII only: int() would also take "１２", "1_2", " 12").
_TIMESTAMP_RE = re.compile(r"[0-9]{1,12}")
_SIGNATURE_RE = re.compile(r"sha256=([0-9a-f]{64})")


def signature(secret: str, method: str, path: str, body: bytes, ts: int) -> str:
    # surrogatepass: any str encodes, so signing (and verifying) never raises.
    message = f"{ts}\n{method.upper()}\n{path}\n".encode("utf-8", "surrogatepass") + body
    return SIGNATURE_PREFIX + hmac.new(secret.encode("utf-8", "surrogatepass"), message, hashlib.sha256).hexdigest()


def sign(secret: str, method: str, path: str, body: bytes = b"", ts: int | None = None) -> dict[str, str]:
    """The two headers that authenticate ``method path`` with ``body``."""
    ts = int(time.time()) if ts is None else int(ts)
    return {TIMESTAMP_HEADER: str(ts), SIGNATURE_HEADER: signature(secret, method, path, body, ts)}


@dataclass(frozen=True)
class SignedHeaders:
    timestamp: int
    digest: str  # the 64 hex digits after "sha256="


def parse_headers(*, timestamp: str | None, signature_header: str | None) -> SignedHeaders | str:
    """The two headers, well-formed, or why they are not (never raises)."""
    if not timestamp or not signature_header:
        return "missing signature headers"
    # Bound before matching: a header can be as long as the server allows.
    timestamp, signature_header = timestamp.strip()[:64], signature_header.strip()[:128]
    if not _TIMESTAMP_RE.fullmatch(timestamp):
        return "malformed timestamp"
    match = _SIGNATURE_RE.fullmatch(signature_header)
    if match is None:
        return "malformed signature (expected sha256= and 64 lower-case hex digits)"
    return SignedHeaders(timestamp=int(timestamp), digest=match.group(1))


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
    """None if the signature is good under one of ``secrets``, else why it is not.

    Total: header junk of any kind gives a reason, never an exception. Replays are
    not checked here (``api.push_replay``).
    """
    parsed = parse_headers(timestamp=timestamp, signature_header=signature_header)
    if isinstance(parsed, str):
        return parsed
    now = time.time() if now is None else now
    if abs(now - parsed.timestamp) > REPLAY_WINDOW_S:
        return "timestamp outside the replay window"
    sent = (SIGNATURE_PREFIX + parsed.digest).encode("ascii")
    good = False
    for secret in secrets:
        expected = signature(secret, method, path, body, parsed.timestamp).encode("ascii")
        if secret and hmac.compare_digest(expected, sent):
            good = True  # keep comparing: same work whichever secret matched
    return None if good else "signature mismatch"


def main(argv: list[str]) -> int:
    if len(argv) not in (3, 4):
        print("usage: python -m api.push_sign SECRET METHOD PATH [BODY]", file=sys.stderr)
        return 2
    secret, method, path = argv[:3]
    body = argv[3].encode() if len(argv) == 4 else b""
    for name, value in sign(secret, method, path, body).items():
        print(f"{name}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
