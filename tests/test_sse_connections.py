"""Event streams share Postgres connections: many concurrent streams against a real
uvicorn keep the number of backends small and constant, and streams past the caps
(per user, per process) get a 429 JSON answer."""

from __future__ import annotations

import json
import time

import pytest
from django.db import connection

from api.auth import api_token_create
from tasks import engine
from tests.engine_support import make_images
from tests.live_server import live_uvicorn
from tests.perms import grant
from tests.test_sse import META, EventReader, open_stream

pytestmark = pytest.mark.django_db(transaction=True)

PER_USER = 40
TOTAL = 61
# The server's one LISTEN connection and its two snapshot threads, plus two backends still
# exiting (with CONN_MAX_AGE=0 a snapshot thread closes its connection after each read):
# nothing that grows with the number of streams. Counted over what the database had before
# the server started (this test's own connection, and any an earlier test left closing).
SERVER_BACKENDS_BOUND = 5


def backends() -> int:
    with connection.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()")
        return cur.fetchone()[0]


def notify(payload: dict) -> None:
    with connection.cursor() as cur:
        cur.execute("SELECT pg_notify(%s, %s)", [engine.NOTIFY_CHANNEL, json.dumps(payload)])


def assert_too_many(response, *, scope: str) -> None:
    assert response.status == 429, (response.status, response.read()[:300])
    assert int(response.getheader("Retry-After")) > 0
    error = json.loads(response.read())["error"]
    assert error["code"] == "too_many_streams"
    assert error["details"]["scope"] == scope


def test_sixty_streams_share_one_listen_connection_and_caps_answer_429(tmp_path, staff_user, django_user_model):
    make_images(1)
    run = engine.create(task_key="metadata-refresh", scope={})
    path = f"{META}/runs/{run.pk}/events"
    alice = api_token_create(user=staff_user, name="alice")[1]
    bob_user = django_user_model.objects.create_user("bob", "bob@example.com", "pw-bob-12345", is_staff=True)
    grant(bob_user, "tasks.view_admintaskrun")  # streams need the view permission
    bob = api_token_create(user=bob_user, name="bob")[1]
    env = {"PICSITE_SSE_MAX_STREAMS": str(TOTAL), "PICSITE_SSE_MAX_STREAMS_PER_USER": str(PER_USER)}

    before = backends()
    with live_uvicorn(media_root=tmp_path / "server-media", env=env) as live:
        readers = []
        for token in [alice] * PER_USER + [bob] * 20:
            response = open_stream(live, path, token)
            assert response.status == 200, response.read()[:300]
            readers.append(EventReader(response))
        for reader in readers:
            first = reader.next(timeout=20)
            assert first is not None and first.name == "snapshot", first
        seen = [backends()]

        # Events still reach every stream, and the snapshots they trigger do not
        # open a connection per stream either.
        names: list[set[str]] = [set() for _ in readers]
        for i in range(3):
            notify({"run": run.pk, "event": "progress", "counters": {"processed": i}})
            for reader, seen_names in zip(readers, names, strict=True):
                while True:
                    event = reader.next(timeout=20)
                    assert event is not None, "stream ended early"
                    seen_names.add(event.name)
                    if event.name == "progress" and event.data["counters"]["processed"] == i:
                        break
            seen.append(backends())
            time.sleep(0.6)  # past SSE_SNAPSHOT_EVERY_S: every stream takes a fresh snapshot
            seen.append(backends())
        assert all("snapshot" in n for n in names[:-1])  # (the last one may still be due)
        assert max(seen) - before <= SERVER_BACKENDS_BOUND, f"backends over time: {seen} (before: {before})"

        # Caps: alice is at her own cap; bob may open one more, then the process is full.
        assert_too_many(open_stream(live, path, alice), scope="user")
        extra = open_stream(live, path, bob)
        assert extra.status == 200
        readers.append(EventReader(extra))
        assert_too_many(open_stream(live, path, bob), scope="server")

        # The run ends: every stream sends the status and a final snapshot, then closes,
        # which frees the slots.
        engine.cancel(run_id=run.pk)
        for reader in readers:
            tail = []
            while (event := reader.next(timeout=20)) is not None:
                tail.append(event)
            assert [e.name for e in tail][-2:] == ["status", "snapshot"], [e.name for e in tail]
            assert tail[-1].data["status"] == "cancelled"
        deadline = time.monotonic() + 10
        while (opened := open_stream(live, path, alice)).status == 429 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert opened.status == 200
        assert EventReader(opened).next().data["status"] == "cancelled"
        assert backends() - before <= SERVER_BACKENDS_BOUND


def test_streams_outlive_a_dropped_listen_connection(tmp_path, staff_user):
    """Postgres ends the hub's connection (a restart, a failover): the hub reconnects, each
    stream takes a fresh snapshot (a NOTIFY may have been lost meanwhile) and events flow on."""
    make_images(1)
    run = engine.create(task_key="metadata-refresh", scope={})
    token = api_token_create(user=staff_user, name="sse")[1]
    with live_uvicorn(media_root=tmp_path / "server-media") as live:
        reader = EventReader(open_stream(live, f"{META}/runs/{run.pk}/events", token))
        assert reader.next().name == "snapshot"
        with connection.cursor() as cur:
            cur.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND query LIKE 'LISTEN %%'"
            )
            assert cur.rowcount == 1
        resynced = reader.next(timeout=15)
        assert resynced is not None and resynced.name == "snapshot"
        assert resynced.data["status"] == "queued"
        notify({"run": run.pk, "event": "progress", "counters": {"processed": 1}})
        event = reader.next(timeout=10)
        assert event is not None and event.name == "progress"
        assert event.data["counters"] == {"processed": 1}
