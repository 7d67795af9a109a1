"""Live progress over Server-Sent Events, end to end: a real uvicorn server (ASGI) in a
subprocess streams ``GET runs/<id>/events`` while this process (another "host")
works the run; the events travel through Postgres NOTIFY."""

from __future__ import annotations

import http.client
import json
import queue
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from PIL import Image as PILImage

from api.auth import api_token_create
from tasks import engine
from tests.engine_support import make_images
from tests.live_server import live_uvicorn

pytestmark = pytest.mark.django_db(transaction=True)

META = "/api/v1/tasks"


@dataclass
class Event:
    at: float
    name: str
    data: dict = field(default_factory=dict)


class EventReader:
    """Reads an SSE response on a thread; events land in ``self.events`` (a queue)."""

    def __init__(self, response: http.client.HTTPResponse):
        self.response = response
        self.events: queue.Queue[Event | None] = queue.Queue()
        self.comments: list[str] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        name, data = "message", []
        try:
            while True:
                raw = self.response.readline()
                if not raw:
                    break
                line = raw.decode().rstrip("\r\n")
                if line.startswith(":"):
                    self.comments.append(line)
                elif line.startswith("event:"):
                    name = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].strip())
                elif line == "":
                    if data:
                        self.events.put(Event(time.monotonic(), name, json.loads("\n".join(data))))
                    name, data = "message", []
        except (OSError, ValueError, AttributeError):  # hung up / closed under us
            pass
        finally:
            self.events.put(None)  # end of stream

    def next(self, timeout: float = 10.0) -> Event | None:
        return self.events.get(timeout=timeout)


def open_stream(base_url: str, path: str, token: str | None) -> http.client.HTTPResponse:
    parts = urlsplit(base_url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=20)
    headers = {"Accept": "text/event-stream"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    conn.request("GET", path, headers=headers)
    return conn.getresponse()


def request_json(base_url: str, method: str, path: str, token: str, body: dict | None = None) -> tuple[int, dict]:
    parts = urlsplit(base_url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    payload = json.dumps(body).encode() if body is not None else b""
    conn.request(
        method, path, body=payload, headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    )
    response = conn.getresponse()
    result = response.status, json.loads(response.read() or b"{}")
    conn.close()
    return result


def real_images(n: int, media_root: Path) -> None:
    for image in make_images(n):
        path = media_root / image.original.name
        path.parent.mkdir(parents=True, exist_ok=True)
        PILImage.new("RGB", (64, 48), (10, 200, 30)).save(path, "JPEG")


@pytest.fixture
def live(tmp_path):
    with live_uvicorn(media_root=tmp_path / "server-media") as base_url:
        yield base_url


def test_events_stream_follows_a_run_worked_elsewhere(live, staff_user, media_root, local_storage):
    n = 15
    real_images(n, media_root)
    token = api_token_create(user=staff_user, name="sse")[1]
    status, run = request_json(live, "POST", f"{META}/runs", token, {"scope": {}})
    assert status == 201, run

    response = open_stream(live, f"{META}/runs/{run['id']}/events", token)
    assert response.status == 200
    assert response.getheader("Content-Type").startswith("text/event-stream")
    assert response.getheader("Cache-Control") == "no-cache"
    reader = EventReader(response)
    first = reader.next()
    assert first is not None and first.name == "snapshot"
    assert first.data["id"] == run["id"] and first.data["status"] == "queued"
    assert first.data["counters"]["processed"] == 0

    # Work the run from this process, as a worker on another host would: one batch
    # (10 items), a pause, then the rest.
    started = time.monotonic()
    engine.kick(run_id=run["id"], max_batches=1)
    time.sleep(0.8)
    kicked = engine.kick(run_id=run["id"])
    finished_at = time.monotonic()
    assert kicked.status == "succeeded"

    events: list[Event] = []
    while True:
        event = reader.next(timeout=10)
        if event is None:
            break
        events.append(event)
    progress = [e for e in events if e.name == "progress"]
    statuses = [e for e in events if e.name == "status"]
    snapshots = [e for e in events if e.name == "snapshot"]

    # Progress events come as the other process folds its checkpoints into the run row
    # (each batch end, at most every FOLD_EVERY_S): counters only ever grow, up to n.
    assert len(progress) >= 2
    assert {e.data["item_id"] for e in progress} <= set(kicked_ids(run["id"]))
    processed = [e.data["counters"]["processed"] for e in progress]
    assert processed == sorted(set(processed)) and processed[-1] == n
    assert 10 in processed  # the first kick's batch ended there
    assert all(e.data["counters"]["total"] == n for e in progress)
    assert all(e.data["outcome"] in ("succeeded", "skipped") for e in progress)
    # Events arrive as the other process works: within about a second.
    assert progress[0].at - started < 1.5
    assert progress[-1].at - finished_at < 1.0

    # While events flow, fresh snapshots (at most every 0.5 s) carry exact counters.
    mid = [e for e in snapshots if e.data["status"] == "running"]
    assert mid and mid[0].data["counters"]["processed"] == 10
    assert statuses[0].data["status"] == "running"
    assert statuses[-1].data["status"] == "succeeded"
    assert statuses[-1].at - finished_at < 1.0
    final = snapshots[-1]
    assert events[-1] is final  # the stream ends with a final snapshot after the run finished
    assert final.data["status"] == "succeeded"
    assert final.data["counters"] == {"total": n, "processed": n, "succeeded": n, "skipped": 0, "failed": 0}


def kicked_ids(run_id: int) -> list[int]:
    from tasks.models import AdminTaskRun

    run = AdminTaskRun.objects.get(pk=run_id)
    return list(engine.registry.get(run.task_key).scope_queryset(run.scope).values_list("pk", flat=True))


def test_events_stream_of_finished_run_is_one_snapshot(live, staff_user):
    make_images(1)
    token = api_token_create(user=staff_user, name="sse")[1]
    run = engine.create(task_key="metadata-refresh", scope={})
    engine.cancel(run_id=run.pk)
    response = open_stream(live, f"{META}/runs/{run.pk}/events", token)
    assert response.status == 200
    reader = EventReader(response)
    event = reader.next()
    assert event.name == "snapshot" and event.data["status"] == "cancelled"
    assert reader.next() is None


def test_events_stream_refusals_are_json(live, staff_user, plain_user):
    make_images(1)
    run = engine.create(task_key="metadata-refresh", scope={})
    path = f"{META}/runs/{run.pk}/events"

    anonymous = open_stream(live, path, None)
    assert anonymous.status == 401
    assert json.loads(anonymous.read())["error"]["code"] == "not_authenticated"

    plain = open_stream(live, path, api_token_create(user=plain_user, name="x")[1])
    assert plain.status == 403

    token = api_token_create(user=staff_user, name="sse")[1]
    other = open_stream(live, f"/api/v1/preprocess-tasks/runs/{run.pk}/events", token)
    assert other.status == 404
    assert json.loads(other.read())["error"]["code"] == "run_not_found"


def listeners() -> int:
    from django.db import connection

    with connection.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'LISTEN %%'"
        )
        return cur.fetchone()[0]


def test_client_disconnect_releases_the_listen_connection(live, staff_user):
    make_images(1)
    run = engine.create(task_key="metadata-refresh", scope={})
    token = api_token_create(user=staff_user, name="sse")[1]
    response = open_stream(live, f"{META}/runs/{run.pk}/events", token)
    reader = EventReader(response)
    assert reader.next().name == "snapshot"
    assert listeners() == 1
    response.fp.raw._sock.shutdown(socket.SHUT_RDWR)  # hang up, as a closed browser tab does
    deadline = time.monotonic() + 5
    while listeners() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert listeners() == 0


def test_stream_that_sees_the_end_in_a_snapshot_still_sends_the_status(live, staff_user):
    """The run ends with no status NOTIFY reaching the stream first (here: none at all):
    the snapshot that shows it finished is preceded by a status event, and ends the stream."""
    from django.db import connection

    from tasks.models import AdminTaskRun

    make_images(1)
    token = api_token_create(user=staff_user, name="sse")[1]
    run = engine.create(task_key="metadata-refresh", scope={})
    reader = EventReader(open_stream(live, f"{META}/runs/{run.pk}/events", token))
    assert reader.next().name == "snapshot"
    AdminTaskRun.objects.filter(pk=run.pk).update(status="succeeded")  # no NOTIFY of its own
    with connection.cursor() as cur:  # a progress event makes the stream take a snapshot
        payload = json.dumps({"run": run.pk, "event": "progress", "counters": {}})
        cur.execute("SELECT pg_notify(%s, %s)", [engine.NOTIFY_CHANNEL, payload])
    tail = []
    while (event := reader.next(timeout=10)) is not None:
        tail.append(event)
    assert [e.name for e in tail] == ["progress", "status", "snapshot"]
    assert tail[1].data["status"] == tail[2].data["status"] == "succeeded"
