"""Request bodies are refused by size before Django reads them (api.body_limit).

A real uvicorn serves the ASGI application; a raw-socket client streams 200 MB at it,
with ``Content-Length`` and chunked without one, and must get a 413 JSON answer while
the server's memory stays flat and nothing is spooled to its temp directory.
"""

from __future__ import annotations

import io
import json
import os
import select
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from PIL import Image as PILImage

from api.auth import api_token_create
from gallery.models import Image
from tests.live_server import live_uvicorn_process

pytestmark = pytest.mark.django_db(transaction=True)

MB = 1024 * 1024
HUGE = 200 * MB
PIECE = b"x" * (64 * 1024)
RSS_BOUND_KB = 50 * 1024


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    sent: int  # body bytes the client got out before the server answered

    def json(self) -> dict:
        return json.loads(self.body)


@dataclass
class Server:
    base_url: str
    pid: int
    tmpdir: Path

    @property
    def address(self) -> tuple[str, int]:
        parts = urlsplit(self.base_url)
        return parts.hostname, parts.port

    def status_kb(self, field: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise AssertionError(f"{field} not in /proc/{self.pid}/status")

    def files_in_tmpdir(self) -> list[str]:
        """Files the server holds open under its TMPDIR (an O_TMPFILE spool has no name
        in the directory, but shows up here as '<tmpdir>/#123 (deleted)')."""
        found = []
        fd_dir = Path(f"/proc/{self.pid}/fd")
        for fd in fd_dir.iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue  # closed while we looked
            if target.startswith(str(self.tmpdir)):
                found.append(target)
        return found


@pytest.fixture
def server(tmp_path):
    tmpdir = tmp_path / "server-tmp"
    tmpdir.mkdir()
    env = {"TMPDIR": str(tmpdir), "PICSITE_PUSH_SECRET": "edge-secret"}
    with live_uvicorn_process(media_root=tmp_path / "server-media", env=env) as (base_url, proc):
        yield Server(base_url=base_url, pid=proc.pid, tmpdir=tmpdir)


def _read_answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    raw = b""
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                break
            raw += data
            head, sep, body = raw.partition(b"\r\n\r\n")
            if sep:
                length = [line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
                if length and len(body) >= int(length[0].split(b":")[1]):
                    break
    except ConnectionResetError:
        pass  # the server closed with our unread body in its buffer: keep what arrived
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines and lines[0].startswith("HTTP/1.1 "), f"no HTTP answer: {raw[:200]!r}"
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


def stream_body(
    server: Server,
    method: str,
    path: str,
    *,
    size: int,
    chunked: bool,
    headers: dict[str, str] | None = None,
    watch: list | None = None,
) -> Answer:
    """Send ``size`` bytes of body (stopping as soon as the server answers) and read the answer.

    Every 4 MB sent, ``watch`` gets the server's open temp files and its RSS.
    """
    sock = socket.create_connection(server.address, timeout=30)
    lines = [f"{method} {path} HTTP/1.1", f"Host: {server.address[0]}", "Content-Type: application/json"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    lines.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}")
    sent = 0
    try:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        while sent < size:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                break  # answered (or closed) early: stop sending
            piece = PIECE[: size - sent]
            sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n" if chunked else piece)
            sent += len(piece)
            if watch is not None and sent % (4 * MB) == 0:
                watch.append((server.files_in_tmpdir(), server.status_kb("VmRSS")))
        else:
            if chunked:
                sock.sendall(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and hung up while we were still sending
    try:
        status, answer_headers, body = _read_answer(sock)
    finally:
        sock.close()
    return Answer(status=status, headers=answer_headers, body=body, sent=sent)


def warm_up(server: Server) -> None:
    """One ordinary request first, so imports and the URLconf do not count as growth."""
    answer = stream_body(server, "GET", "/healthz", size=0, chunked=False)
    assert answer.status == 200, answer.body


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize(
    ("method", "path"), [("POST", "/api/v1/tasks/tick"), ("GET", "/healthz"), ("POST", "/healthz")]
)
def test_huge_body_is_refused_before_django_reads_it(server, method, path, chunked):
    warm_up(server)
    rss_before = server.status_kb("VmRSS")
    watch: list = []

    answer = stream_body(server, method, path, size=HUGE, chunked=chunked, watch=watch)

    assert answer.status == 413, (answer.status, answer.body[:300])
    assert answer.headers["content-type"] == "application/json"
    error = answer.json()["error"]
    assert error["code"] == "request_too_large"
    assert error["details"]["limit_bytes"] <= MB
    assert set(error) == {"code", "message", "details"}
    # The server stopped reading long before the end of the body.
    assert answer.sent < 64 * MB
    # Nothing spooled to disk, during or after, and memory stayed flat.
    assert [files for files, _ in watch if files] == []
    assert server.files_in_tmpdir() == []
    assert list(server.tmpdir.iterdir()) == []
    peak_growth = max([server.status_kb("VmRSS"), *(rss for _, rss in watch)]) - rss_before
    assert peak_growth < RSS_BOUND_KB, f"server RSS grew by {peak_growth} kB"
    assert server.status_kb("VmHWM") - rss_before < RSS_BOUND_KB
    # The server is still healthy for the next client.
    warm_up(server)


def test_signed_tick_with_a_huge_body_is_refused_too(server):
    """Signature headers change nothing: the size is checked before anyone reads the body."""
    from api.push_sign import sign

    headers = sign("edge-secret", "POST", "/api/v1/tasks/tick", b"")
    answer = stream_body(server, "POST", "/api/v1/tasks/tick", size=HUGE, chunked=True, headers=headers)
    assert answer.status == 413
    assert answer.json()["error"]["code"] == "request_too_large"
    assert server.files_in_tmpdir() == []


def test_small_json_body_still_reaches_the_view(server):
    """Under the limit, the request goes through to Django (here: a 401 from the tick)."""
    answer = stream_body(server, "POST", "/api/v1/tasks/tick", size=512 * 1024, chunked=True)
    assert answer.status == 401
    assert answer.json()["error"]["code"] == "not_authenticated"


def test_json_route_limit_sits_at_the_default(server):
    just_over = stream_body(server, "POST", "/api/v1/tasks/runs", size=MB + 1, chunked=False)
    assert just_over.status == 413
    assert just_over.json()["error"]["details"]["limit_bytes"] == MB


def multipart(files: list[tuple[str, bytes]]) -> tuple[str, bytes]:
    boundary = "picsite-boundary-7d1"
    out = io.BytesIO()
    for name, data in files:
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'.encode())
        out.write(b"Content-Type: application/octet-stream\r\n\r\n" + data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return f"multipart/form-data; boundary={boundary}", out.getvalue()


def jpeg(width: int, height: int, seed: int) -> bytes:
    buffer = io.BytesIO()
    PILImage.effect_noise((width, height), 60 + seed).convert("RGB").save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def test_upload_route_has_its_own_request_cap(tmp_path, staff_user):
    """Uploads are not held to the JSON limit, but to PICSITE_MAX_UPLOAD_REQUEST_BYTES."""
    token = api_token_create(user=staff_user, name="upload")[1]
    tmpdir = tmp_path / "server-tmp"
    tmpdir.mkdir()
    env = {"TMPDIR": str(tmpdir), "PICSITE_MAX_UPLOAD_BYTES": str(4 * MB), "PICSITE_MAX_UPLOAD_REQUEST_BYTES": str(8 * MB)}
    with live_uvicorn_process(media_root=tmp_path / "server-media", env=env) as (base_url, proc):
        server = Server(base_url=base_url, pid=proc.pid, tmpdir=tmpdir)
        auth = {"Authorization": f"Bearer {token}"}

        # A real multipart upload above the 1 MiB JSON limit goes through.
        content_type, body = multipart([("a.jpg", jpeg(900, 700, 1)), ("b.jpg", jpeg(900, 700, 2))])
        assert MB < len(body) < 8 * MB
        sock = socket.create_connection(server.address, timeout=60)
        head = (
            f"POST /api/v1/images HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {auth['Authorization']}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        sock.sendall(head.encode() + body)
        status, _, answer = _read_answer(sock)
        sock.close()
        assert status == 201, answer[:500]
        assert len(json.loads(answer)["images"]) == 2
        assert Image.objects.count() == 2

        # Above its own cap, refused before reading, with the cap in the details.
        huge = stream_body(server, "POST", "/api/v1/images", size=HUGE, chunked=True, headers=auth)
        assert huge.status == 413
        assert huge.json()["error"]["details"]["limit_bytes"] == 8 * MB
        declared = stream_body(server, "POST", "/api/v1/images", size=HUGE, chunked=False, headers=auth)
        assert declared.status == 413
        assert declared.sent < 8 * MB
        assert Image.objects.count() == 2
        # The admin's upload form is an upload route too (anonymous here: refused by size first).
        admin = stream_body(server, "POST", "/admin/gallery/image/upload/", size=HUGE, chunked=True)
        assert admin.status == 413
        assert admin.json()["error"]["details"]["limit_bytes"] == 8 * MB
        time.sleep(0.2)
        assert server.files_in_tmpdir() == []
