"""The whole serverless flow (issue 13) against a QStash stand-in on loopback: a live site
with PICSITE_DISPATCH=qstash publishes through the official SDK; the stand-in records what
it receives and delivers every message signed, 8 at a time, retrying 5xx with backoff and
delivering some messages twice. 20 corpus photos are uploaded (the real pipeline) and a
200-row backfill of the test task runs: every item processed once, counters exact, the run
finishes once, never more than N items of the run in flight, and no django-q2 row."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest
from django.db import connection
from django.db.models import Count
from django_q.models import OrmQ, Schedule

from api.auth import api_token_create
from gallery.models import Image
from tasks.models import AdminTaskBatch, AdminTaskRun, AdminTaskRunFinish, RunStatus
from tests.engine_support import TEST_TASK_KEY, make_images
from tests.live_server import free_port, live_uvicorn
from tests.qstash_server import QStashStandIn

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

TOKEN, KEY, NEXT_KEY = "qstash-token-test", "sig_" + "c" * 32, "sig_" + "n" * 32
WINDOW = 6


def corpus_uploads(corpus: Path, n: int = 20) -> list[Path]:
    """The smaller camera photos, then EXIF-orientation samples: n real files."""
    photos = sorted((corpus / "photos").glob("*.jp*g"), key=lambda p: p.stat().st_size)[:8]
    edge = sorted((corpus / "edge" / "orientation").glob("*.jpg"))
    return [*photos, *edge][:n]


def site_env(qstash: QStashStandIn, base_url: str, media_root: Path) -> dict[str, str]:
    return {
        "PICSITE_DISPATCH": "qstash",
        "QSTASH_URL": qstash.base_url,
        "QSTASH_TOKEN": TOKEN,
        "QSTASH_CURRENT_SIGNING_KEY": KEY,
        "QSTASH_NEXT_SIGNING_KEY": NEXT_KEY,
        "PICSITE_PUBLIC_URL": base_url,
        "PICSITE_QSTASH_WINDOW": str(WINDOW),
        "PICSITE_QSTASH_PARALLELISM": "8",
        "PICSITE_VARIANT_STORAGE": "local",
        "PICSITE_VARIANT_LOCAL_URL": "/media/v/",
        "PICSITE_ITEM_RETRY_BASE_S": "0.2",
        "PICSITE_ITEM_RETRY_CAP_S": "0.5",
    }


class InFlightSampler(threading.Thread):
    """The most batches (= published, not yet checkpointed items) the run ever had."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.most: dict[int, int] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            while not self.stop.wait(0.01):
                for run_id, count in AdminTaskBatch.objects.values_list("run_id").annotate(n=Count("id")):
                    self.most[run_id] = max(self.most.get(run_id, 0), count)
        finally:
            connection.close()


def wait_for(predicate, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_serverless_flow_uploads_and_backfill_through_qstash(corpus, tmp_path, staff_user):
    token = api_token_create(user=staff_user, name="uploader")[1]
    schedules_before = Schedule.objects.count()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with QStashStandIn(token=TOKEN, signing_key=KEY, concurrency=8, duplicate_every=5) as qstash:
        env = site_env(qstash, base, tmp_path / "media")
        with live_uvicorn(media_root=tmp_path / "media", env=env, app="tests.push_asgi:application", port=port):
            auth = {"Authorization": f"Bearer {token}"}
            probe = httpx.get(f"{base}/api/v1/tasks/runs", headers=auth, timeout=30)
            assert probe.status_code == 200, probe.text
            # 1. Uploads: one message per new image, the real pipeline behind each delivery.
            files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in corpus_uploads(corpus)]
            response = httpx.post(f"{base}/api/v1/images", files=files, headers=auth, timeout=300)
            assert response.status_code == 201, response.text
            uploaded = [i["id"] for i in response.json()["images"]]
            assert len(uploaded) == 20
            assert qstash.wait_idle(600), "upload messages still pending"
            images = Image.objects.filter(pk__in=uploaded)
            assert all(i.variants_ready for i in images), [(i.pk, i.variants_error) for i in images if not i.variants_ready]
            # One message per upload, in one batch call after the upload's commit (a copy delivered
            # while the first was working finds the image busy and publishes a later check).
            assert qstash.batch_calls[0] == 20
            first = qstash.published[:20]
            assert sorted(int(m.url.split("/")[-2]) for m in first) == sorted(uploaded)
            assert all("/variants" in m.url and json.loads(m.body) == {"attempt": 1} for m in first)

            # 2. A 200-row backfill of the test task, created through the API.
            flaky = {17, 123}  # fail on their first call: recorded, retried at next_attempt_at
            rows = make_images(200, titles={i: "fail-once" for i in flaky})
            sampler = InFlightSampler()
            sampler.start()
            created = httpx.post(f"{base}/api/v1/{TEST_TASK_KEY}/runs", json={"scope": {}}, headers=auth, timeout=60)
            assert created.status_code == 201, created.text
            run_id = created.json()["id"]
            wait_for(lambda: AdminTaskRun.objects.get(pk=run_id).status in RunStatus.finished(), 300, "the run to end")
            assert qstash.wait_idle(120)
            sampler.stop.set()
            sampler.join(5)

    run = AdminTaskRun.objects.get(pk=run_id)
    assert run.status == RunStatus.SUCCEEDED, run.recent_issues
    assert (run.total, run.processed, run.succeeded, run.failed, run.skipped) == (200, 200, 200, 0, 0)
    flaky_ids = {rows[i].pk for i in flaky}
    calls = dict(Image.objects.filter(pk__in=[r.pk for r in rows]).values_list("pk", "variants_attempts"))
    # Every item processed exactly once (the two flaky ones once more), copies and all.
    assert calls == {r.pk: 2 if r.pk in flaky_ids else 1 for r in rows}
    assert AdminTaskRunFinish.objects.filter(run_id=run_id).count() == 1
    assert not AdminTaskBatch.objects.filter(run_id=run_id).exists()
    # What QStash saw: item messages in batch calls of at most 100, at most WINDOW in flight,
    # and flow control held (never more than the parallelism of one key at once).
    item_msgs = [m for m in qstash.published if f"/runs/{run_id}/items/" in m.url]
    retries = sorted(int(m.url.rsplit("/", 1)[1]) for m in item_msgs if json.loads(m.body)["attempts"] == 1)
    # A next attempt is published once (a late copy of the first message may take it first).
    assert len(retries) == len(set(retries)) and set(retries) <= flaky_ids
    assert sorted(int(m.url.rsplit("/", 1)[1]) for m in item_msgs) == sorted([r.pk for r in rows] + retries)
    assert all(m.deduplication_id and m.flow_key == f"picsite-run-{run_id}" and m.parallelism == 8 for m in item_msgs)
    assert qstash.batch_calls and max(qstash.batch_calls) <= 100
    assert 1 <= sampler.most.get(run_id, 0) <= WINDOW
    assert all(count <= 8 for count in qstash.max_active.values())
    copies = [d for d in qstash.deliveries if d.copy]
    assert copies and all(d.status == 200 for d in copies)
    assert all(d.status is not None and d.status < 500 for d in qstash.deliveries), [
        (d.url, d.status, d.body[:200]) for d in qstash.deliveries if d.status is None or d.status >= 500
    ]
    # Nothing went through django-q2.
    assert OrmQ.objects.count() == 0
    assert Schedule.objects.count() == schedules_before
