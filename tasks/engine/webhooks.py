"""Callback URLs: checked when a run is created, and a signed POST (Standard Webhooks) per
finish record, delivered at least once.

A callback URL is not a way into the private network: it must be https and resolve only to
public addresses, unless its host is listed in PICSITE_WEBHOOK_ALLOWED_HOSTS (then http is
allowed too, e.g. a receiver on loopback in tests). The address is resolved and checked again
at delivery, and the connection goes to the address that was checked (no second lookup a
DNS rebinding could change); redirects are not followed; the timeout is short.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import socket
import ssl
import time
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import urlsplit

from django.conf import settings
from standardwebhooks import Webhook

from tasks.engine.errors import EngineError


class InvalidCallback(EngineError):
    code, http_status = "invalid_callback_url", 400


@dataclass(frozen=True)
class DeliveryResult:
    ok: bool
    status: int | None
    error: str
    ms: int


def _allowed_hosts() -> set[str]:
    return {h.strip().lower() for h in settings.PICSITE_WEBHOOK_ALLOWED_HOSTS if h.strip()}


def callback_url_check(url: str) -> str:
    """The URL if a run may call it back, else InvalidCallback naming the problem."""
    if not isinstance(url, str) or len(url) > 2000:
        raise InvalidCallback("callback_url must be a URL of at most 2000 characters", details={"field": "callback_url"})
    if not settings.PICSITE_WEBHOOK_SECRET:
        raise InvalidCallback(
            "callbacks are not configured on this server (PICSITE_WEBHOOK_SECRET)", details={"field": "callback_url"}
        )
    try:
        _target(url)
    except ValueError as exc:
        raise InvalidCallback(f"callback_url refused: {exc}", details={"field": "callback_url"}) from None
    return url


def _target(url: str) -> tuple[str, str, int, str, str]:
    """(scheme, host, port, path?query, the checked address) or ValueError."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    allowed = host in _allowed_hosts()
    if parts.scheme not in ("https", "http") or not host:
        raise ValueError("it must be an https URL")
    if parts.scheme == "http" and not allowed:
        raise ValueError("it must be https (http only for hosts in PICSITE_WEBHOOK_ALLOWED_HOSTS)")
    if parts.username or parts.password:
        raise ValueError("credentials in the URL are not allowed")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ValueError(f"{host} does not resolve ({exc})") from None
    addresses = [info[4][0] for info in infos]
    if not allowed:
        private = [a for a in addresses if not ipaddress.ip_address(a.split("%")[0]).is_global]
        if private:
            raise ValueError(f"{host} resolves to a non-public address ({private[0]})")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.scheme, host, port, path, addresses[0]


def webhook_sign(*, delivery_id: str, timestamp: datetime, body: str) -> dict[str, str]:
    """The Standard Webhooks headers for ``body``."""
    signature = Webhook(settings.PICSITE_WEBHOOK_SECRET).sign(delivery_id, timestamp, body)
    return {
        "webhook-id": delivery_id,
        "webhook-timestamp": str(int(timestamp.timestamp())),
        "webhook-signature": signature,
    }


def webhook_post(*, url: str, delivery_id: str, payload: dict, timestamp: datetime) -> DeliveryResult:
    """POST the signed payload once; 2xx is delivered, anything else (a redirect too) is not."""
    started = time.monotonic()
    body = json.dumps(payload, separators=(",", ":"), default=str)
    headers = {"content-type": "application/json", "user-agent": "picsite-webhooks/1", **webhook_sign(
        delivery_id=delivery_id, timestamp=timestamp, body=body
    )}  # fmt: skip
    try:
        scheme, host, port, path, address = _target(url)
        conn = _connection(scheme, host, port, address, timeout=settings.PICSITE_WEBHOOK_TIMEOUT_S)
        try:
            conn.request("POST", path, body=body.encode(), headers={**headers, "host": host})
            response = conn.getresponse()
            response.read(65536)
            status = response.status
        finally:
            conn.close()
    except (OSError, ValueError, http.client.HTTPException) as exc:
        return DeliveryResult(False, None, f"{type(exc).__name__}: {exc}"[:500], _ms(started))
    ok = 200 <= status < 300
    return DeliveryResult(ok, status, "" if ok else f"HTTP {status}", _ms(started))


def _connection(scheme: str, host: str, port: int, address: str, *, timeout: float) -> http.client.HTTPConnection:
    """A connection to the address that was checked (SNI and certificate for ``host``)."""
    if scheme == "http":
        conn = http.client.HTTPConnection(address, port, timeout=timeout)
    else:
        context = ssl.create_default_context()
        conn = _PinnedHTTPSConnection(address, port, timeout=timeout, context=context, server_hostname=host)
    return conn


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, address: str, port: int, *, timeout: float, context: ssl.SSLContext, server_hostname: str):
        super().__init__(address, port, timeout=timeout, context=context)
        self._server_hostname = server_hostname
        self._context = context

    def connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self._server_hostname)


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)
