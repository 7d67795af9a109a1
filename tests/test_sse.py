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
    id: str | None = None  # the SSE id: line, if the event had one


class EventReader:
    """Reads an SSE response on a thread; events land in ``self.events`` (a queue)."""

    def __init__(self, response: http.client.HTTPResponse):
        self.response = response
        self.events: queue.Queue[Event | None] = queue.Queue()
        self.comments: list[str] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        name, data, event_id = "message", [], None
        try:
            while True:
                raw = self.response.readline()
                if not raw:
                    break
                line = raw.decode().rstrip("\r\n")
                if line.startswith(":"):
                    self.comments.append(line)
                elif line.startswith("id:"):
                    event_id = line[3:].strip()
                elif line.startswith("event:"):
                    name = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].strip())
                elif line == "":
                    if data:
                        self.events.put(Event(time.monotonic(), name, json.loads("\n".join(data)), event_id))
                    name, data, event_id = "message", [], None
        except (OSError, ValueError, AttributeError):  # hung up / closed under us
            pass
        finally:
            self.events.put(None)  # end of stream

    def next(self, timeout: float = 10.0) -> Event | None:
        return self.events.get(timeout=timeout)


def open_stream(
    base_url: str, path: str, token: str | None, *, last_event_id: str | None = None
) -> http.client.HTTPResponse:
    parts = urlsplit(base_url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=20)
    headers = {"Accept": "text/event-stream"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
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


# --- batch runs: item events, the items snapshot, Last-Event-ID ------------------------------


def batch_images(n: int, media_root: Path) -> list[int]:
    ids = []
    for image in make_images(n):
        path = media_root / image.original.name
        path.parent.mkdir(parents=True, exist_ok=True)
        PILImage.new("RGB", (64, 48), (10, 200, 30)).save(path, "JPEG")
        ids.append(image.pk)
    return ids


def table_events(run_id: int, after: int = 0) -> list[tuple[int, int, str]]:
    from tasks.models import AdminTaskEvent

    rows = AdminTaskEvent.objects.filter(run_id=run_id, pk__gt=after).order_by("pk")
    return [(e.pk, e.item_id, e.data["state"]) for e in rows]


def read_until_end(reader: EventReader) -> list[Event]:
    events = []
    while (event := reader.next(timeout=15)) is not None:
        events.append(event)
    return events


def test_a_late_subscriber_of_a_batch_gets_every_item_in_a_snapshot(live, staff_user, media_root, local_storage):
    ids = batch_images(15, media_root)
    requested = [ids[3], 987654321, *ids[:3], *ids[4:]]
    run = engine.create(task_key="metadata-refresh", scope={"image_ids": requested})
    engine.kick(run_id=run.pk, max_batches=1)  # 10 of 15 done before anyone listens
    token = api_token_create(user=staff_user, name="sse")[1]
    reader = EventReader(open_stream(live, f"{META}/runs/{run.pk}/events", token))
    assert reader.next().name == "snapshot"
    snapshot = reader.next()
    assert snapshot.name == "items"
    last = table_events(run.pk)[-1][0]
    assert snapshot.id == str(last) and snapshot.data["last_event_id"] == last
    items = snapshot.data["items"]
    assert [i["item_id"] for i in items] == requested  # submission order, the missing id in place
    assert [i["position"] for i in items] == list(range(16))
    states = [i["state"] for i in items]
    assert states[1] == "missing"
    assert sorted(states) == sorted(["missing"] + ["succeeded"] * 10 + ["pending"] * 5)
    # Then live: the rest of the items, each change an item event with its table id.
    engine.kick(run_id=run.pk)
    events = read_until_end(reader)
    live_items = [(int(e.id), e.data["item"]["item_id"], e.data["item"]["state"]) for e in events if e.name == "item"]
    assert live_items == table_events(run.pk, after=last)
    assert [e.data["item"]["state"] for e in events if e.name == "item"].count("succeeded") == 5
    assert events[-1].name == "snapshot" and events[-1].data["status"] == "succeeded"


def test_a_reconnect_with_last_event_id_gets_every_item_change_it_missed(live, staff_user, media_root, local_storage):
    ids = batch_images(25, media_root)  # metadata-refresh claims 10 a batch
    run = engine.create(task_key="metadata-refresh", scope={"image_ids": ids})
    token = api_token_create(user=staff_user, name="sse")[1]
    first = open_stream(live, f"{META}/runs/{run.pk}/events", token)
    reader = EventReader(first)
    assert reader.next().name == "snapshot"
    items = reader.next()
    assert items.name == "items" and {i["state"] for i in items.data["items"]} == {"pending"}
    engine.kick(run_id=run.pk, max_batches=1)
    seen = []
    while len(seen) < 7:  # the client has some of this batch's changes, then loses its connection
        event = reader.next()
        assert event is not None
        if event.name == "item":
            seen.append(event)
    first.fp.raw._sock.shutdown(socket.SHUT_RDWR)
    assert [int(e.id) for e in seen] == [row[0] for row in table_events(run.pk)[:7]]

    engine.kick(run_id=run.pk, max_batches=1)  # changes while it is away
    second = EventReader(open_stream(live, f"{META}/runs/{run.pk}/events", token, last_event_id=seen[-1].id))
    assert second.next().name == "snapshot"
    replayed = []
    missed = table_events(run.pk, after=int(seen[-1].id))
    while len(replayed) < len(missed):
        event = second.next()
        assert event is not None and event.name == "item", event
        replayed.append((int(event.id), event.data["item"]["item_id"], event.data["item"]["state"]))
    assert replayed == missed  # every change it missed, in order, before anything live
    engine.kick(run_id=run.pk)  # the rest, live
    rest = [e for e in read_until_end(second) if e.name == "item"]
    received = [int(e.id) for e in seen] + [r[0] for r in replayed] + [int(e.id) for e in rest]
    assert received == [row[0] for row in table_events(run.pk)]  # all of them, none twice
    states = {}
    for event in rest:
        states[event.data["item"]["item_id"]] = event.data["item"]["state"]
    assert len(states) == 5 and set(states.values()) == {"succeeded"}


def test_a_bad_last_event_id_is_a_400(live, staff_user, media_root, local_storage):
    ids = batch_images(1, media_root)
    run = engine.create(task_key="metadata-refresh", scope={"image_ids": ids})
    token = api_token_create(user=staff_user, name="sse")[1]
    response = open_stream(live, f"{META}/runs/{run.pk}/events", token, last_event_id="abc")
    assert response.status == 400
    assert json.loads(response.read())["error"]["details"] == {"field": "Last-Event-ID"}


def test_after_a_resync_a_batch_stream_replays_the_item_changes_it_missed(media_root, local_storage):
    """NOTIFYs lost (the hub reconnected, or the client's queue overflowed: RESYNC): the
    stream reads every item change after the last one it sent from the table."""
    import asyncio

    from api.tasks import events as sse
    from tasks.notify_hub import RESYNC

    ids = batch_images(12, media_root)
    run = engine.create(task_key="metadata-refresh", scope={"image_ids": ids})

    class Deaf:  # a subscription whose NOTIFYs all get lost
        queue: asyncio.Queue

        def close(self) -> None:
            pass

    async def scenario() -> list[bytes]:
        sub = Deaf()
        sub.queue = asyncio.Queue()
        stream = sse._run_events(run_id=run.pk, subscription=sub, batch=True)
        chunks = [await stream.__anext__() for _ in range(3)]  # retry, run snapshot, items snapshot
        await asyncio.to_thread(engine.kick, run_id=run.pk)  # every change happens unheard
        sub.queue.put_nowait(RESYNC)
        chunks += [chunk async for chunk in stream]
        return chunks

    chunks = asyncio.run(scenario())
    assert chunks[2].startswith(b"id: 0\nevent: items\n")
    sent = [
        (int(chunk.split(b"\n")[0][4:]), json.loads(chunk.split(b"\ndata: ")[1])["item"]["state"])
        for chunk in chunks[3:]
        if b"\nevent: item\n" in chunk
    ]
    assert sent == [(pk, state) for pk, _, state in table_events(run.pk)]  # all, in order, once
    assert len(sent) == 24
    assert b'"status":"succeeded"' in chunks[-1]  # then the final snapshot
