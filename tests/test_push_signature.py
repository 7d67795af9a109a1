"""The signed tick against junk and replays: any header junk is a 401 JSON (never a 500),
and an accepted signature is refused a second time until its window ends (Postgres)."""

from __future__ import annotations

import socket
import threading
import time
from datetime import timedelta

import pytest
from django.db import connection
from django.test import Client
from django.utils import timezone

from api import push_sign
from api.auth import api_token_create
from api.models import PushSignatureUse
from api.push_sign import sign
from tests.api_support import assert_api_error
from tests.live_server import live_uvicorn

pytestmark = pytest.mark.django_db(transaction=True)

SECRET, NEXT_SECRET = "push-secret-current", "push-secret-next"
TICK = "/api/v1/tasks/tick"


@pytest.fixture(autouse=True)
def push_settings(settings):
    settings.PICSITE_PUSH_SECRET = SECRET
    settings.PICSITE_PUSH_SECRET_NEXT = NEXT_SECRET
    settings.PICSITE_PUSH_TICK_BUDGET_S = 5




def now_ts() -> str:
    return str(int(time.time()))


def good_signature(ts: str | None = None) -> str:
    return sign(SECRET, "POST", TICK, b"", ts=int(ts or now_ts()))[push_sign.SIGNATURE_HEADER]


JUNK = {
    "400-digit timestamp": lambda: {"X-Picsite-Timestamp": "9" * 400, "X-Picsite-Signature": good_signature()},
    "negative 400 digits": lambda: {"X-Picsite-Timestamp": "-" + "9" * 400, "X-Picsite-Signature": good_signature()},
    "non-ASCII signature": lambda: {"X-Picsite-Timestamp": now_ts(), "X-Picsite-Signature": "sha256=" + "é" * 64},
    "non-ASCII same length": lambda: {
        "X-Picsite-Timestamp": now_ts(),
        "X-Picsite-Signature": good_signature()[:-1] + "é",
    },
    "fullwidth digits": lambda: {"X-Picsite-Timestamp": "１７００００００００", "X-Picsite-Signature": good_signature()},
    "underscored timestamp": lambda: {
        "X-Picsite-Timestamp": now_ts()[:4] + "_" + now_ts()[4:],
        "X-Picsite-Signature": good_signature(),
    },
    "float timestamp": lambda: {"X-Picsite-Timestamp": now_ts() + ".5", "X-Picsite-Signature": good_signature()},
    "huge signature": lambda: {"X-Picsite-Timestamp": now_ts(), "X-Picsite-Signature": "sha256=" + "a" * 100_000},
    "no prefix": lambda: {"X-Picsite-Timestamp": now_ts(), "X-Picsite-Signature": good_signature()[7:]},
    "upper-case hex": lambda: {"X-Picsite-Timestamp": now_ts(), "X-Picsite-Signature": good_signature().upper()},
    "empty signature": lambda: {"X-Picsite-Timestamp": now_ts(), "X-Picsite-Signature": ""},
    "blank timestamp": lambda: {"X-Picsite-Timestamp": "  ", "X-Picsite-Signature": good_signature()},
    "NUL in signature": lambda: {"X-Picsite-Timestamp": now_ts(), "X-Picsite-Signature": "sha256=\x00" * 9},
}


@pytest.mark.parametrize("junk", list(JUNK), ids=list(JUNK))
def test_junk_signature_headers_are_401_json(junk):
    response = Client().post(TICK, data=b"", content_type="application/json", headers=JUNK[junk]())
    assert_api_error(response, 401, "invalid_signature")
    assert PushSignatureUse.objects.count() == 0  # nothing is remembered for a refused signature


@pytest.mark.parametrize("junk", list(JUNK), ids=list(JUNK))
def test_verify_is_total(junk):
    headers = JUNK[junk]()
    reason = push_sign.verify(
        secrets=[SECRET, NEXT_SECRET],
        method="POST",
        path=TICK,
        body=b"",
        timestamp=headers["X-Picsite-Timestamp"],
        signature_header=headers["X-Picsite-Signature"],
    )
    assert isinstance(reason, str) and reason


def test_junk_headers_over_the_wire_are_401_json(tmp_path):
    """Raw non-ASCII bytes in the headers through a real uvicorn: a JSON 401, not a 500."""
    with live_uvicorn(media_root=tmp_path / "server-media", env={"PICSITE_PUSH_SECRET": SECRET}) as base_url:
        host, port = base_url.removeprefix("http://").split(":")
        for timestamp, signature in [
            (b"9" * 400, good_signature().encode()),
            (now_ts().encode(), b"sha256=" + b"\xe9\xff" * 32),
        ]:
            with socket.create_connection((host, int(port)), timeout=20) as sock:
                sock.sendall(
                    b"POST " + TICK.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n"
                    b"X-Picsite-Timestamp: " + timestamp + b"\r\nX-Picsite-Signature: " + signature + b"\r\n"
                    b"Connection: close\r\n\r\n"
                )
                raw = b""
                while chunk := sock.recv(65536):
                    raw += chunk
            assert raw.startswith(b"HTTP/1.1 401 "), raw[:300]
            assert b'"code": "invalid_signature"' in raw


def signed_tick(ts: int | None = None, *, secret: str = SECRET, body: bytes = b""):
    headers = sign(secret, "POST", TICK, body, ts=ts)
    return headers, Client().post(TICK, data=body, content_type="application/json", headers=headers)


def test_the_same_signed_request_twice_is_refused_the_second_time(staff_user):
    headers, first = signed_tick()
    assert first.status_code == 200, first.content
    again = Client().post(TICK, data=b"", content_type="application/json", headers=headers)
    assert_api_error(again, 401, "replayed_signature")
    # A staff token beside it does not make the replay acceptable either.
    token = api_token_create(user=staff_user, name="staff")[1]
    with_token = Client().post(
        TICK, data=b"", content_type="application/json", headers={**headers, "Authorization": f"Bearer {token}"}
    )
    assert_api_error(with_token, 401, "replayed_signature")
    assert PushSignatureUse.objects.count() == 1


def test_a_fresh_signature_works_after_one_was_used():
    ts = int(time.time())
    _, first = signed_tick(ts)
    assert first.status_code == 200
    _, other_second = signed_tick(ts - 1)  # a new delivery, signed anew
    assert other_second.status_code == 200
    _, other_secret = signed_tick(ts, secret=NEXT_SECRET)
    assert other_secret.status_code == 200
    _, other_body = signed_tick(ts, body=b'{"from": "cron"}')
    assert other_body.status_code == 200
    assert PushSignatureUse.objects.count() == 4


def test_the_store_remembers_each_signature_until_its_window_ends_and_purges_old_ones():
    stale = PushSignatureUse.objects.create(digest="0" * 64, expires_at=timezone.now() - timedelta(seconds=1))
    ts = int(time.time()) - 100
    headers, response = signed_tick(ts)
    assert response.status_code == 200
    assert not PushSignatureUse.objects.filter(pk=stale.pk).exists()  # purged on the way
    use = PushSignatureUse.objects.get()
    assert use.digest == headers[push_sign.SIGNATURE_HEADER].removeprefix("sha256=")
    window_end = ts + push_sign.REPLAY_WINDOW_S
    assert use.expires_at.timestamp() >= window_end  # kept at least as long as it could be accepted
    assert use.expires_at.timestamp() <= window_end + 120


def test_concurrent_copies_of_one_signed_request_run_once():
    headers = sign(SECRET, "POST", TICK, b"")
    statuses: list[int] = []
    codes: list[str] = []

    def deliver() -> None:
        try:
            response = Client().post(TICK, data=b"", content_type="application/json", headers=headers)
            statuses.append(response.status_code)
            if response.status_code != 200:
                codes.append(response.json()["error"]["code"])
        finally:
            connection.close()

    threads = [threading.Thread(target=deliver) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(statuses) == [200, 401, 401, 401]
    assert codes == ["replayed_signature"] * 3
