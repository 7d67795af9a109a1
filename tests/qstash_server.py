"""A QStash stand-in on loopback, for tests and the bench (and a demo).

``mint_signature`` makes the ``Upstash-Signature`` JWT exactly as QStash documents it:
HS256 under a signing key, claims ``iss`` "Upstash", ``sub`` the destination URL, ``iat``,
``nbf``, ``exp`` (5 minutes), ``jti``, and ``body`` the base64url SHA-256 of the raw body.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import itertools
import json
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import jwt

SIGNATURE_TTL_S = 300


def mint_signature(key: str, *, url: str, body: bytes, now: float | None = None, ttl: int = SIGNATURE_TTL_S) -> str:
    now = int(time.time() if now is None else now)
    claims = {
        "iss": "Upstash",
        "sub": url,
        "iat": now,
        "nbf": now,
        "exp": now + ttl,
        "jti": f"jwt_{uuid.uuid4().hex}",
        "body": base64.urlsafe_b64encode(hashlib.sha256(body).digest()).decode(),
    }
    return jwt.encode(claims, key, algorithm="HS256")


# --- the stand-in server ----------------------------------------------------------------------


@dataclass
class Published:
    message_id: str
    url: str
    body: bytes
    headers: dict[str, str]
    flow_key: str | None
    parallelism: int | None
    deduplication_id: str | None
    not_before: float
    retries: int


@dataclass
class Delivery:
    message_id: str
    url: str
    status: int | None  # None: no answer (connection error)
    copy: bool  # a deliberate second delivery of a message already delivered
    body: bytes = b""


@dataclass(order=True)
class _Due:
    at: float
    seq: int
    message: Published = field(compare=False)
    attempt: int = field(compare=False, default=0)
    copy: bool = field(compare=False, default=False)


class QStashStandIn:
    """Enough of QStash for the SDK and the site: ``POST /v2/publish/<url>`` and
    ``POST /v2/batch`` (bearer token checked), deduplication ids, ``Upstash-Not-Before`` /
    ``Upstash-Delay``, flow control (at most ``parallelism`` deliveries of one key at once),
    and delivery to the destination signed with ``Upstash-Signature`` by ``concurrency``
    threads, retrying no answer or a 5xx with exponential backoff up to ``Upstash-Retries``.
    Every ``duplicate_every``-th message is delivered a second time (at-least-once).
    Records what it received (``published``) and every delivery (``deliveries``)."""

    def __init__(
        self,
        *,
        token: str,
        signing_key: str,
        concurrency: int = 8,
        duplicate_every: int = 0,
        backoff_s: float = 0.2,
        delivery_timeout_s: float = 120.0,
        port: int = 0,
    ):
        self.token, self.signing_key = token, signing_key
        self.concurrency, self.duplicate_every = concurrency, duplicate_every
        self.backoff_s, self.delivery_timeout_s = backoff_s, delivery_timeout_s
        self.published: list[Published] = []
        self.batch_calls: list[int] = []  # messages per /v2/batch call
        self.deliveries: list[Delivery] = []
        self.max_active: dict[str, int] = {}  # flow key -> most deliveries at once
        self._active: dict[str, int] = {}
        self._dedup: dict[str, str] = {}
        self._due: list[_Due] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stopping = False
        self._pending = 0  # messages (and copies) not yet delivered for good
        self._threads: list[threading.Thread] = []
        self._http = ThreadingHTTPServer(("127.0.0.1", port), self._handler_class())
        self._http.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self._http.server_address[1]}"

    # --- lifecycle ----------------------------------------------------------------------

    def __enter__(self) -> QStashStandIn:
        self._threads.append(threading.Thread(target=self._http.serve_forever, name="qstash-http", daemon=True))
        self._threads += [
            threading.Thread(target=self._deliver_loop, name=f"qstash-deliver-{i}", daemon=True)
            for i in range(self.concurrency)
        ]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._http.shutdown()
        self._http.server_close()
        for thread in self._threads:
            thread.join(10)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every message (and copy) was delivered for good or gave up."""
        end = time.monotonic() + timeout
        with self._cond:
            while self._pending:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
        return True

    # --- publishing ---------------------------------------------------------------------

    def _accept(self, destination: str, headers: dict[str, str], body: bytes) -> dict[str, Any]:
        lower = {k.lower(): v for k, v in headers.items()}
        dedup = lower.get("upstash-deduplication-id")
        with self._cond:
            if dedup and dedup in self._dedup:
                return {"messageId": self._dedup[dedup], "deduplicated": True}
            message_id = f"msg_{uuid.uuid4().hex}"
            if dedup:
                self._dedup[dedup] = message_id
            now = time.time()
            not_before = now
            if "upstash-not-before" in lower:
                not_before = max(now, float(lower["upstash-not-before"]))
            elif "upstash-delay" in lower:
                not_before = now + _seconds(lower["upstash-delay"])
            flow_key, parallelism = lower.get("upstash-flow-control-key"), None
            for part in lower.get("upstash-flow-control-value", "").split(","):
                name, _, value = part.strip().partition("=")
                if name == "parallelism" and value.isdigit():
                    parallelism = int(value)
            forwarded = {k[len("upstash-forward-"):]: v for k, v in lower.items() if k.startswith("upstash-forward-")}
            if "content-type" in lower:
                forwarded["content-type"] = lower["content-type"]
            message = Published(
                message_id=message_id, url=destination, body=body, headers=forwarded, flow_key=flow_key,
                parallelism=parallelism, deduplication_id=dedup, not_before=not_before,
                retries=int(lower.get("upstash-retries", "3")),
            )  # fmt: skip
            self.published.append(message)
            self._push(_Due(not_before, next(self._seq), message))
            if self.duplicate_every and len(self.published) % self.duplicate_every == 0:
                self._push(_Due(not_before + 0.05, next(self._seq), message, copy=True))
            self._cond.notify_all()
        return {"messageId": message_id}

    def _push(self, due: _Due) -> None:
        heapq.heappush(self._due, due)
        self._pending += 1

    # --- delivering ---------------------------------------------------------------------

    def _next(self) -> _Due | None:
        with self._cond:
            while not self._stopping:
                now = time.time()
                wait = 0.5
                for due in sorted(self._due):
                    if due.at > now:
                        wait = min(wait, due.at - now)
                        break
                    key, limit = due.message.flow_key, due.message.parallelism
                    if key and limit and self._active.get(key, 0) >= limit:
                        continue  # flow control: this key is at its parallelism
                    self._due.remove(due)
                    heapq.heapify(self._due)
                    if key:
                        self._active[key] = self._active.get(key, 0) + 1
                        self.max_active[key] = max(self.max_active.get(key, 0), self._active[key])
                    return due
                self._cond.wait(wait)
            return None

    def _deliver_loop(self) -> None:
        client = httpx.Client(timeout=self.delivery_timeout_s)
        try:
            while (due := self._next()) is not None:
                status = self._deliver(client, due)
                with self._cond:
                    key = due.message.flow_key
                    if key:
                        self._active[key] -= 1
                    failed = status is None or status >= 500
                    if failed and due.attempt < due.message.retries and not self._stopping:
                        backoff = self.backoff_s * (2**due.attempt)
                        self._push(_Due(time.time() + backoff, next(self._seq), due.message, due.attempt + 1, due.copy))
                    self._pending -= 1
                    self._cond.notify_all()
        finally:
            client.close()

    def _deliver(self, client: httpx.Client, due: _Due) -> int | None:
        message = due.message
        headers = {
            **message.headers,
            "Upstash-Signature": mint_signature(self.signing_key, url=message.url, body=message.body),
            "Upstash-Message-Id": message.message_id,
            "Upstash-Retried": str(due.attempt),
        }
        try:
            response = client.post(message.url, content=message.body, headers=headers)
            status, body = response.status_code, response.content[:2000]
        except httpx.HTTPError:
            status, body = None, b""
        with self._cond:
            self.deliveries.append(Delivery(message.message_id, message.url, status, due.copy, body))
        return status

    # --- HTTP -----------------------------------------------------------------------------

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _answer(self, status: int, payload: Any) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("Authorization") != f"Bearer {server.token}":
                    return self._answer(401, {"error": "Unauthorized"})
                path = urllib.parse.unquote(self.path)
                if path.startswith("/v2/publish/"):
                    return self._answer(201, server._accept(path[len("/v2/publish/"):], dict(self.headers), body))
                if path == "/v2/batch":
                    messages = json.loads(body)
                    server.batch_calls.append(len(messages))
                    if len(messages) > 100:
                        return self._answer(400, {"error": "at most 100 messages per batch"})
                    answers = [
                        server._accept(m["destination"], m.get("headers") or {}, (m.get("body") or "").encode())
                        for m in messages
                    ]
                    return self._answer(201, answers)
                return self._answer(404, {"error": f"not here: {path}"})

        return Handler


def _seconds(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip()
    return float(text[:-1]) * units[text[-1]] if text[-1:] in units else float(text)


def main(argv: list[str] | None = None) -> int:
    """Run the stand-in on its own (a local demo of PICSITE_DISPATCH=qstash)::

        python -m tests.qstash_server --port 8089 --token dev-token --key sig_dev_current_key
    """
    import argparse

    parser = argparse.ArgumentParser(description="QStash stand-in on loopback (tests and demos only).")
    parser.add_argument("--port", type=int, default=8089)
    parser.add_argument("--token", required=True, help="the QSTASH_TOKEN the site publishes with")
    parser.add_argument("--key", required=True, help="the signing key (the site's QSTASH_CURRENT_SIGNING_KEY)")
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args(argv)
    server = QStashStandIn(token=args.token, signing_key=args.key, concurrency=args.concurrency, port=args.port)
    print(f"QStash stand-in on {server.base_url} ({args.concurrency} deliveries at once); Ctrl-C stops it", flush=True)
    with server:
        seen = 0
        try:
            while True:
                time.sleep(0.5)
                for d in server.deliveries[seen:]:
                    print(f"delivered {d.message_id[:16]} -> {d.url} : {d.status} {d.body[:120].decode(errors='replace')}", flush=True)
                seen = len(server.deliveries)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
