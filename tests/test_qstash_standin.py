"""The QStash stand-in itself, driven by the official SDK: publish and deduplication,
signed deliveries that the SDK's Receiver accepts, 5xx retried with backoff, flow control."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from qstash import QStash, Receiver

from tests.qstash_server import QStashStandIn

KEY = "sig_" + "s" * 32


class Receiving:
    """A destination on loopback: verifies each delivery with the SDK's Receiver, answers
    503 to the first ``fail_first`` and holds each request ``hold_s``."""

    def __init__(self, *, fail_first: int = 0, hold_s: float = 0.0):
        self.fail_first, self.hold_s = fail_first, hold_s
        self.seen: list[tuple[str, bool]] = []  # (body, signature ok)
        self.active = self.most_active = 0
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
                url = f"http://127.0.0.1:{outer.server.server_address[1]}{self.path}"
                try:
                    Receiver(KEY, KEY).verify(signature=self.headers["Upstash-Signature"], body=body, url=url)
                    ok = True
                except Exception:
                    ok = False
                with outer.lock:
                    outer.seen.append((body, ok))
                    failing = len(outer.seen) <= outer.fail_first
                    outer.active += 1
                    outer.most_active = max(outer.most_active, outer.active)
                time.sleep(outer.hold_s)
                with outer.lock:
                    outer.active -= 1
                self.send_response(503 if failing else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_publish_dedup_signed_delivery_and_5xx_retries():
    dest = Receiving(fail_first=2)
    try:
        with QStashStandIn(token="t", signing_key=KEY, concurrency=2, backoff_s=0.05) as qstash:
            client = QStash("t", base_url=qstash.base_url)
            first = client.message.publish_json(url=dest.url, body={"n": 1}, deduplication_id="d-1", retries=3)
            again = client.message.publish_json(url=dest.url, body={"n": 1}, deduplication_id="d-1", retries=3)
            assert again.deduplicated and again.message_id == first.message_id
            assert qstash.wait_idle(30)
        assert [d.status for d in qstash.deliveries] == [503, 503, 200]  # retried, then delivered
        assert len(qstash.published) == 1
        assert all(ok for _, ok in dest.seen) and len(dest.seen) == 3
    finally:
        dest.close()


def test_flow_control_caps_deliveries_of_one_key():
    dest = Receiving(hold_s=0.1)
    try:
        with QStashStandIn(token="t", signing_key=KEY, concurrency=8) as qstash:
            client = QStash("t", base_url=qstash.base_url)
            client.message.batch_json([
                {"url": dest.url, "body": {"i": i}, "flow_control": {"key": "k", "parallelism": 2}} for i in range(10)
            ])  # fmt: skip
            assert qstash.wait_idle(30)
        assert qstash.batch_calls == [10] and len(dest.seen) == 10
        assert qstash.max_active["k"] == 2 and dest.most_active <= 2
    finally:
        dest.close()
