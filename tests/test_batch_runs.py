"""Batch runs (explicit ids) on the real Postgres: they coexist with the library run and
with each other, keep a row per requested item in submission order with its states and
events, go before library runs, never process one image twice at once, and end with
exactly one durable finish record per terminal transition, handed once to the on_finish
hook and delivered (at least once, signed) to a callback URL."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.db import connection
from django.utils import timezone
from standardwebhooks import Webhook

from gallery.models import Image
from tasks import engine
from tasks.models import (
    AdminTaskEvent,
    AdminTaskItem,
    AdminTaskRun,
    AdminTaskRunFinish,
    RunKind,
    RunStatus,
)
from tests.engine_support import (
    TEST_BATCH_TASK_KEY,
    make_images,
    on_finish_calls,
    on_finish_calls_reset,
)

pytestmark = pytest.mark.django_db(transaction=True)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRET = "whsec_" + "c2VjcmV0LWZvci10ZXN0cy0xMjM0NTY3ODkwMTIzNDU2"


@pytest.fixture(autouse=True)
def fast_retries(settings):
    settings.PICSITE_ITEM_RETRY_BASE_S = 0.01
    settings.PICSITE_ITEM_RETRY_CAP_S = 0.05
    settings.PICSITE_ITEM_MAX_ATTEMPTS = 3
    on_finish_calls_reset()


def drain(run_id: int, rounds: int = 300) -> AdminTaskRun:
    for _ in range(rounds):
        run = engine.kick(run_id=run_id)
        if run.status not in RunStatus.runnable():
            return run
        time.sleep(0.02)
    raise AssertionError(f"run {run_id} did not finish")


def test_batch_runs_coexist_with_the_library_run_and_each_other():
    """A batch over explicit ids used to be refused (409 run_active) whenever any run of
    the task was active."""
    images = make_images(6)
    library = engine.create(task_key=TEST_BATCH_TASK_KEY, scope={})
    first = engine.create(task_key=TEST_BATCH_TASK_KEY, scope={"image_ids": [images[0].pk, images[1].pk]})
    second = engine.create(task_key=TEST_BATCH_TASK_KEY, scope={"image_ids": [images[1].pk, images[2].pk]})
    assert (library.kind, first.kind, second.kind) == (RunKind.LIBRARY, RunKind.BATCH, RunKind.BATCH)
    with pytest.raises(engine.RunAlreadyActive):  # still one library run at a time
        engine.create(task_key=TEST_BATCH_TASK_KEY, scope={})
    for run in (first, second, library):
        assert drain(run.pk).status == RunStatus.SUCCEEDED


def test_a_batch_keeps_a_row_per_requested_item_in_submission_order():
    a, b, c = make_images(3)
    gone = make_images(1)[0]
    Image.objects.filter(pk=gone.pk).update(deleted_at=timezone.now())
    ids = [c.pk, a.pk, 987654321, c.pk, gone.pk, b.pk]
    run = engine.create(task_key=TEST_BATCH_TASK_KEY, scope={"image_ids": ids})
    assert run.scope["duplicates"] == [c.pk]
    assert (run.total, run.missing) == (3, 2)
    rows = list(AdminTaskItem.objects.filter(run=run).order_by("position").values_list("item_id", "state"))
    assert rows == [(c.pk, "pending"), (a.pk, "pending"), (987654321, "missing"), (gone.pk, "missing"), (b.pk, "pending")]
    run = drain(run.pk)
    assert (run.status, run.succeeded, run.processed, run.total) == (RunStatus.SUCCEEDED, 3, 3, 3)
    done = {row.item_id: row for row in AdminTaskItem.objects.filter(run=run)}
    for image in (a, b, c):
        row = done[image.pk]
        assert row.state == "succeeded" and row.started_at and row.finished_at and row.seconds > 0
        assert row.result == {"title": image.title}
    assert done[987654321].state == "missing" and done[987654321].started_at is None
    # Every transition is an event, in order, per item: pending -> processing -> succeeded.
    for image in (a, b, c):
        states = list(AdminTaskEvent.objects.filter(run=run, item_id=image.pk).order_by("id").values_list("state", flat=True))
        assert states == ["processing", "succeeded"]


def test_a_failing_item_retries_then_fails_with_its_error_and_attempts():
    ok, bad = make_images(2, titles={1: "fail-always"})
    run = drain(engine.create(task_key=TEST_BATCH_TASK_KEY, scope={"image_ids": [ok.pk, bad.pk]}).pk)
    assert (run.succeeded, run.failed) == (1, 1)
    row = AdminTaskItem.objects.get(run=run, item_id=bad.pk)
    assert (row.state, row.attempts, row.last_error_code) == ("failed", 3, "boom")
    states = list(AdminTaskEvent.objects.filter(run=run, item_id=bad.pk).order_by("id").values_list("state", flat=True))
    assert states == ["processing", "retrying", "processing", "retrying", "processing", "failed"]
    assert engine.item_json(row)["state"] == "failed" and engine.public_state("retrying") == "pending"


def test_a_batch_goes_before_the_library_run(monkeypatch):
    monkeypatch.setenv("PICSITE_TEST_ITEM_DELAY", "0.02")
    backlog = make_images(40)
    library = engine.create(task_key=TEST_BATCH_TASK_KEY, scope={})
    engine.kick(run_id=library.pk, max_batches=1)
    urgent = make_images(3)
    batch = engine.create(task_key=TEST_BATCH_TASK_KEY, scope={"image_ids": [i.pk for i in urgent]})
    engine.kick(run_id=library.pk, max_batches=1)  # a worker of the backfill serves the batch first
    assert AdminTaskRun.objects.get(pk=batch.pk).status == RunStatus.SUCCEEDED
    assert AdminTaskRun.objects.get(pk=library.pk).processed == 4
    assert len(backlog) == 40


def test_two_batches_and_a_backfill_never_process_an_image_twice_at_once(corpus, local_storage, monkeypatch):
    """Overlapping runs of preprocess-images: the image claim keeps each image to one worker
    at a time (the loser retries at no attempt's cost); every run's items end final."""
    from gallery import services
    from gallery.services import image_ingest

    rels = ["photos/webp_gallery_tree.webp", "photos/flower_exif_icc.webp", "photos/pixel4a_paris_exif_after_idat.png",
            "photos/embedgravitybird_rgba.png", "photos/canon_sx60_orientation6.jpg"]  # fmt: skip
    images = [image_ingest(data=(corpus / r).read_bytes(), filename=r).image for r in rels]
    ids = [i.pk for i in images]
    intervals: list[tuple[int, float, float]] = []
    lock = threading.Lock()
    real_generate = services._generate

    def recording(image, **kwargs):
        started = time.monotonic()
        try:
            return real_generate(image, **kwargs)
        finally:
            with lock:
                intervals.append((image.pk, started, time.monotonic()))

    monkeypatch.setattr(services, "_generate", recording)
    runs = [
        engine.create(task_key="preprocess-images", scope={"force": True}),
        engine.create(task_key="preprocess-images", scope={"image_ids": ids[:3]}),
        engine.create(task_key="preprocess-images", scope={"image_ids": ids[2:]}),
    ]

    def work(run_id: int) -> None:
        try:
            drain(run_id)
        finally:
            connection.close()

    threads = [threading.Thread(target=work, args=(run.pk,)) for run in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for image_id in ids:
        spans = sorted((s, e) for i, s, e in intervals if i == image_id)
        assert all(prev[1] <= nxt[0] for prev, nxt in zip(spans, spans[1:], strict=False)), f"image {image_id} overlapped"
    for run in runs:
        run.refresh_from_db()
        assert run.status == RunStatus.SUCCEEDED and run.processed == run.total and run.failed == 0
        assert run.succeeded + run.skipped == run.processed
    for run in runs[1:]:
        assert set(AdminTaskItem.objects.filter(run=run).values_list("state", flat=True)) <= {"succeeded", "skipped"}


def test_each_terminal_transition_writes_one_finish_record_and_runs_the_hook_once():
    images = make_images(3, titles={1: "fail-always"})
    run = drain(engine.create(task_key=TEST_BATCH_TASK_KEY, scope={"image_ids": [i.pk for i in images]}).pk)
    assert run.status == RunStatus.SUCCEEDED and run.finish_seq == 1
    Image.objects.filter(title="fail-always").update(title="fixed")
    run = drain(engine.retry_failed(run_id=run.pk).pk)
    assert run.finish_seq == 2
    records = list(AdminTaskRunFinish.objects.filter(run=run).order_by("seq").values_list("seq", "status"))
    assert records == [(1, "succeeded"), (2, "succeeded")]
    threads = [threading.Thread(target=_process_finishes) for _ in range(4)]  # racing processors
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert on_finish_calls() == [(run.pk, 1, "succeeded"), (run.pk, 2, "succeeded")]


def _process_finishes() -> None:
    try:
        engine.finishes_process()
    finally:
        connection.close()


class Receiver:
    """A loopback webhook receiver that answers 500 to its first ``fail_first`` requests."""

    def __init__(self, fail_first: int = 0):
        self.received: list[tuple[dict, bytes]] = []
        self.fail_first = fail_first
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                return

            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                outer.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                status = 500 if len(outer.received) <= outer.fail_first else 204
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/picsite"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def webhooks(settings):
    settings.PICSITE_WEBHOOK_SECRET = SECRET
    settings.PICSITE_WEBHOOK_ALLOWED_HOSTS = ["127.0.0.1"]
    settings.PICSITE_WEBHOOK_RETRY_BASE_S = 0.01


def test_callbacks_are_signed_retried_until_2xx_and_keep_their_id(webhooks):
    receiver = Receiver(fail_first=2)
    try:
        images = make_images(2)
        run = engine.create(task_key=TEST_BATCH_TASK_KEY, scope={"image_ids": [i.pk for i in images]}, callback_url=receiver.url)
        run = drain(run.pk)  # the worker that ends the run delivers at once: attempt 1 (500)
        for _ in range(50):
            engine.finishes_process()
            record = AdminTaskRunFinish.objects.get(run=run)
            if record.delivery_state == "delivered":
                break
            time.sleep(0.05)
    finally:
        receiver.close()
    assert (record.delivery_state, record.delivery_attempts) == ("delivered", 3)
    assert [entry["status"] for entry in record.delivery_log] == [500, 500, 204]
    ids = {headers["webhook-id"] for headers, _ in receiver.received}
    assert ids == {record.delivery_id} and len(receiver.received) == 3
    verifier = Webhook(SECRET)
    for headers, body in receiver.received:
        data = verifier.verify(body, headers)  # the receiver side of the same library
        assert data["data"]["run_id"] == run.pk and data["data"]["status"] == "succeeded"


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://example.com/hook", "https"),
        ("https://10.1.2.3/hook", "non-public"),
        ("https://localhost/hook", "non-public"),
        ("https://user:pw@example.com/hook", "credentials"),
        ("ftp://example.com/hook", "https"),
    ],
)
def test_callback_urls_into_the_private_network_are_refused(settings, url, why):
    settings.PICSITE_WEBHOOK_SECRET = SECRET
    settings.PICSITE_WEBHOOK_ALLOWED_HOSTS = []
    images = make_images(1)
    with pytest.raises(engine.InvalidCallback) as info:
        engine.create(task_key=TEST_BATCH_TASK_KEY, scope={"image_ids": [images[0].pk]}, callback_url=url)
    assert why in info.value.message
    assert not AdminTaskRun.objects.exists()


def test_a_money_budget_pauses_before_the_next_item_would_exceed_it(settings):
    settings.PICSITE_PRICE_PER_1K_WRITES = 5.0  # the test task writes 2 objects (1000 bytes) per item
    settings.PICSITE_PRICE_PER_GB = 0.0
    images = make_images(10)
    run = engine.create(task_key=TEST_BATCH_TASK_KEY, scope={"image_ids": [i.pk for i in images]}, budget={"money": 0.035})
    run = drain(run.pk)
    assert (run.status, run.pause_reason) == (RunStatus.PAUSED, "budget")
    assert run.processed == 3  # 3 x 0.01 = 0.03; a 4th would make 0.04 > 0.035
    assert "money budget" in run.recent_issues[0]["message"] and "0.035" in run.recent_issues[0]["message"]
    settings.PICSITE_PRICE_PER_1K_WRITES = 0.0
    with pytest.raises(engine.InvalidBudget):  # no prices, no money budget
        engine.create(task_key=TEST_BATCH_TASK_KEY, scope={"image_ids": [images[0].pk]}, budget={"money": 1})


@pytest.mark.slow
def test_sigkills_around_completion_leave_one_finish_record_per_terminal_transition(webhooks):
    """Workers SIGKILLed at random moments around the end of small batch runs (seed
    printed): every run ends, with exactly one finish record per terminal transition, the
    hook run once per record and every callback delivered once after dedupe."""
    seed = int(os.environ.get("PICSITE_TEST_SEED", random.randrange(1_000_000)))
    print(f"seed={seed}")
    rng = random.Random(seed)
    receiver = Receiver(fail_first=1)
    env = dict(
        os.environ,
        PICSITE_DB_NAME=connection.settings_dict["NAME"],
        PICSITE_TEST_ITEM_DELAY="0.05",
        PICSITE_LEASE_OVERRIDE_S="1.0",
        PICSITE_WEBHOOK_SECRET=SECRET,
        PICSITE_WEBHOOK_ALLOWED_HOSTS="127.0.0.1",
        PICSITE_WEBHOOK_RETRY_BASE_S="0.01",
        PYTHONPATH=REPO,
    )
    kills = 0
    runs = []
    try:
        while kills < 20 and len(runs) < 40:  # a worker that ends before its kill does not count
            images = make_images(6)
            run = engine.create(task_key=TEST_BATCH_TASK_KEY, scope={"image_ids": [i.pk for i in images]}, callback_url=receiver.url)
            runs.append(run)
            for _ in range(4):  # kill workers late in the run: around its completion
                proc = subprocess.Popen([sys.executable, "-m", "tests.engine_worker", "kick", str(run.pk)],
                                        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
                time.sleep(rng.uniform(0.3, 1.2))  # a quiet machine starts a worker in ~0.5 s
                if proc.poll() is None:
                    os.kill(proc.pid, signal.SIGKILL)
                    kills += 1
                proc.wait()
        for run in runs:  # the survivors finish (adopting what the dead held)
            time.sleep(1.1)
            assert drain(run.pk).status == RunStatus.SUCCEEDED
        for _ in range(100):
            engine.finishes_process()
            if not AdminTaskRunFinish.objects.filter(delivery_state="pending").exists():
                break
            time.sleep(0.05)
    finally:
        receiver.close()
    assert kills >= 20, f"only {kills} kills (seed={seed})"
    for run in runs:
        run.refresh_from_db()
        assert list(AdminTaskRunFinish.objects.filter(run=run).values_list("seq", flat=True)) == [1] == [run.finish_seq]
    assert on_finish_calls() == sorted((run.pk, 1, "succeeded") for run in runs)
    delivered = {json.loads(body)["data"]["run_id"] for headers, body in receiver.received}
    assert delivered == {run.pk for run in runs}
    by_id: dict[str, set[int]] = {}
    for headers, body in receiver.received:
        by_id.setdefault(headers["webhook-id"], set()).add(json.loads(body)["data"]["run_id"])
    assert all(len(runs_) == 1 for runs_ in by_id.values()) and len(by_id) == len(runs)


def test_a_batch_served_by_a_backfill_worker_ends_while_that_worker_goes_on(monkeypatch):
    """The worker used to settle runs it served only when its own kick ended (up to a drain
    slice later): the batch's items were done in seconds, its status came 40 s later."""
    monkeypatch.setenv("PICSITE_TEST_ITEM_DELAY", "0.05")
    make_images(200)
    library = engine.create(task_key=TEST_BATCH_TASK_KEY, scope={})
    done = threading.Event()

    def backfill() -> None:
        try:
            engine.kick(run_id=library.pk, time_budget_s=60)
        finally:
            done.set()
            connection.close()

    worker = threading.Thread(target=backfill)
    worker.start()
    try:
        time.sleep(0.5)
        batch = engine.create(task_key=TEST_BATCH_TASK_KEY, scope={"image_ids": [i.pk for i in make_images(3)]})
        deadline = time.monotonic() + 30
        while AdminTaskRun.objects.get(pk=batch.pk).status != RunStatus.SUCCEEDED and time.monotonic() < deadline:
            time.sleep(0.05)
        assert AdminTaskRun.objects.get(pk=batch.pk).status == RunStatus.SUCCEEDED
        assert not done.is_set()  # the backfill's worker is still on its own run
    finally:
        engine.cancel(run_id=library.pk)
        worker.join(60)
