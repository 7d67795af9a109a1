"""QStash's own request signature (``Upstash-Signature``) and Vercel Cron's bearer secret.

QStash signs every delivery with a JWT (HS256, ``iss`` "Upstash", ``sub`` the destination
URL, ``exp``/``nbf``, ``body`` the base64url SHA-256 of the raw body) under the project's
current signing key, or the next one while keys rotate. We check it with the official SDK's
``qstash.Receiver`` against ``QSTASH_CURRENT_SIGNING_KEY`` then ``QSTASH_NEXT_SIGNING_KEY``,
and the URL we check is ``PICSITE_PUBLIC_URL`` + the request's path: never the Host header,
which the caller chooses. A good signature needs no token of ours.

Vercel Cron sends ``GET`` with ``Authorization: Bearer $CRON_SECRET``: compared in constant
time (``CRON_SECRET``, its own setting) before any API-token lookup.

Both checks are total: junk of any kind gives a reason, never an exception.
"""

from __future__ import annotations

import hmac
import secrets

from django.conf import settings
from django.http import HttpRequest
from qstash import Receiver

SIGNATURE_HEADER = "Upstash-Signature"
# A JWT is three base64url parts; anything longer than this is junk, refused unread.
MAX_SIGNATURE_CHARS = 4096
# Seconds of clock difference tolerated on exp/nbf between QStash and this host.
CLOCK_TOLERANCE_S = 5


def signed_url(request: HttpRequest) -> str | None:
    """The URL QStash must have signed: the configured public URL plus the path asked for."""
    base = settings.PICSITE_PUBLIC_URL.rstrip("/")
    return f"{base}{request.get_full_path()}" if base else None


def qstash_signature_problem(*, request: HttpRequest, body: bytes) -> str | None:
    """None if ``Upstash-Signature`` is good for this request and body, else why not."""
    keys = [settings.QSTASH_CURRENT_SIGNING_KEY, settings.QSTASH_NEXT_SIGNING_KEY]
    if not any(keys):
        return "QStash signing keys are not configured on this server"
    url = signed_url(request)
    if url is None:
        return "PICSITE_PUBLIC_URL is not configured, so no URL can be checked"
    signature = request.headers.get(SIGNATURE_HEADER, "").strip()
    if not signature:
        return "empty Upstash-Signature"
    if len(signature) > MAX_SIGNATURE_CHARS or not signature.isascii():
        return "malformed Upstash-Signature"
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return "the body is not UTF-8"
    # An unset key must never verify anything: stand in a random one (Receiver wants two).
    current, nxt = (key or secrets.token_hex(32) for key in keys)
    try:
        Receiver(current_signing_key=current, next_signing_key=nxt).verify(
            signature=signature, body=text, url=url, clock_tolerance=CLOCK_TOLERANCE_S
        )
    except Exception as exc:  # SignatureError, and a token without a body claim (KeyError)
        return f"Upstash-Signature refused ({type(exc).__name__}: {str(exc)[:200]})"
    return None


def cron_secret_matches(request: HttpRequest) -> bool:
    """``Authorization: Bearer <CRON_SECRET>``, compared in constant time; False when unset."""
    secret = settings.CRON_SECRET
    if not secret:
        return False
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.strip().encode("utf-8", "surrogatepass"), secret.encode("utf-8", "surrogatepass"))
