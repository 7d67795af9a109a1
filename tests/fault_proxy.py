"""A fault-injecting HTTP proxy in front of the moto S3 server, on loopback.

Real HTTP end to end: boto3 talks to this proxy as its endpoint; the proxy forwards
to moto, except that a share of PUTs is answered with 503 and another share is
held past the client's read timeout before being dropped.
"""

from __future__ import annotations

import http.client
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse


class FaultProxy:
    def __init__(self, upstream: str, *, fail_share: float = 0.0, stall_share: float = 0.0, stall_s: float = 3.0, seed: int = 7):
        self.upstream = urlparse(upstream)
        self.fail_share = fail_share
        self.stall_share = stall_share
        self.stall_s = stall_s
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.stats = {"put": 0, "failed": 0, "stalled": 0}
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                return

            def _forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if self.command == "PUT":
                    with proxy.lock:
                        proxy.stats["put"] += 1
                        roll = proxy.rng.random()
                    if roll < proxy.fail_share:
                        with proxy.lock:
                            proxy.stats["failed"] += 1
                        msg = b"<Error><Code>SlowDown</Code><Message>injected</Message></Error>"
                        self.send_response(503)
                        self.send_header("Content-Length", str(len(msg)))
                        self.end_headers()
                        self.wfile.write(msg)
                        return
                    if roll < proxy.fail_share + proxy.stall_share:
                        with proxy.lock:
                            proxy.stats["stalled"] += 1
                        time.sleep(proxy.stall_s)
                        self.close_connection = True
                        return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection",)}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
