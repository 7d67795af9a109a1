"""One item per request (issue 13): the engine's push path — publish windows claim one-item
batches, each delivery (``POST <prefix>/runs/<id>/items/<item_id>``, QStash-signed) works
exactly its item through the engine's own claim, processor, checkpoint and ledger, and
the run finishes once. Duplicates and lost messages are harmless."""

from __future__ import annotations

import json
import time
from datetime import timedelta

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from gallery.models import Image
from tasks import engine, registry
from tasks.models import AdminTaskBatch, AdminTaskItem, AdminTaskRunFinish, RunStatus
from tests.engine_support import (
    BATCH_DEFINITION,
    DEFINITION,
    make_images,
    on_finish_calls,
    on_finish_calls_reset,
)
from tests.qstash_server import mint_signature

pytestmark = pytest.mark.django_db(transaction=True)

KEY = "sig_" + "k" * 32
PUBLIC = "https://photos.example.com"


@pytest.fixture(autouse=True)
def qstash_settings(settings):
    settings.QSTASH_CURRENT_SIGNING_KEY = KEY
    settings.QSTASH_NEXT_SIGNING_KEY = "sig_" + "n" * 32
    settings.PICSITE_PUBLIC_URL = PUBLIC
    settings.PICSITE_ITEM_RETRY_BASE_S = 0.5  # equal jitter: 0.25-0.5 s
    settings.PICSITE_ITEM_RETRY_CAP_S = 0.5


def item_path(defn, run_id: int, item_id: int) -> str:
    return reverse(registry.api_url_name(defn, "run-item"), kwargs={"run_id": run_id, "item_id": item_id})


def deliver(defn, item: engine.PushItem | tuple[int, int], *, signed: bool = True):
    run_id, item_id = (item.run_id, item.item_id) if isinstance(item, engine.PushItem) else item
    path = item_path(defn, run_id, item_id)
    body = json.dumps({"generation": getattr(item, "generation", "x")}).encode()
    headers = {"Upstash-Signature": mint_signature(KEY, url=PUBLIC + path, body=body)} if signed else {}
    return Client().post(path, data=body, content_type="application/json", headers=headers)


def window(run_id: int, n: int = 4, timeout: float = 900) -> list[engine.PushItem]:
    return engine.run_window_claim(run_id=run_id, window=n, inflight_timeout_s=timeout)


def test_every_item_once_counters_exact_and_one_finish_with_duplicates_and_a_retry():
    on_finish_calls_reset()
    images = make_images(10, titles={3: "fail-once"})
    ids = [i.pk for i in images]
    run = engine.create(task_key=BATCH_DEFINITION.key, scope={"image_ids": ids})
    outcomes: list[str] = []
    retried = 0
    while items := window(run.pk):
        assert len(items) <= 4
        for item in items:
            response = deliver(BATCH_DEFINITION, item)
            assert response.status_code == 200, response.content
            body = response.json()
            outcomes.append(body["outcome"])
            if body["retry_at"] is not None:
                assert body["state"] == "retrying"
                retried += 1
                early = deliver(BATCH_DEFINITION, (run.pk, item.item_id))  # a copy, in the backoff
                assert early.json()["outcome"] == "duplicate"
                time.sleep(0.6)
                again = deliver(BATCH_DEFINITION, (run.pk, item.item_id))  # the next attempt, once due
                assert again.json()["outcome"] == "processed"
            copy = deliver(BATCH_DEFINITION, item)  # QStash delivered it twice
            assert copy.status_code == 200 and copy.json()["outcome"] == "duplicate"
    run.refresh_from_db()
    assert run.status == RunStatus.SUCCEEDED
    assert (run.processed, run.succeeded, run.failed, run.total) == (10, 10, 0, 10)
    assert retried == 1 and outcomes == ["processed"] * 10
    calls = dict(Image.objects.filter(pk__in=ids).values_list("pk", "variants_attempts"))
    assert calls == {pk: (2 if pk == ids[3] else 1) for pk in ids}  # each item processed once (+ its retry)
    assert AdminTaskRunFinish.objects.filter(run=run).count() == 1
    assert on_finish_calls() == [(run.pk, 1, "succeeded")]
    assert not AdminTaskBatch.objects.filter(run=run).exists()
    assert set(AdminTaskItem.objects.filter(run=run).values_list("state", flat=True)) == {"succeeded"}


def test_a_window_holds_at_most_n_items_in_flight():
    make_images(9)
    run = engine.create(task_key=DEFINITION.key, scope={})
    first = window(run.pk, n=4)
    assert len(first) == 4
    assert window(run.pk, n=4) == []  # full: nothing more until one is checkpointed
    assert AdminTaskBatch.objects.filter(run=run).count() == 4
    assert deliver(DEFINITION, first[0]).json()["outcome"] == "processed"
    refill = window(run.pk, n=4)
    assert len(refill) == 1 and refill[0].item_id not in {i.item_id for i in first}
    run.refresh_from_db()
    assert run.status == RunStatus.RUNNING and run.processed == 1


def test_a_lost_message_is_republished_with_a_new_generation_and_runs_once():
    (image,) = make_images(1)
    run = engine.create(task_key=DEFINITION.key, scope={})
    (lost,) = window(run.pk, n=2, timeout=0.05)
    time.sleep(0.1)
    (again,) = window(run.pk, n=2)
    assert again.item_id == lost.item_id == image.pk
    assert again.generation != lost.generation and again.deduplication_id != lost.deduplication_id
    assert deliver(DEFINITION, lost).json()["outcome"] == "processed"  # the late original still counts
    assert deliver(DEFINITION, again).json()["outcome"] == "duplicate"
    run.refresh_from_db()
    image.refresh_from_db()
    assert run.status == RunStatus.SUCCEEDED and run.processed == 1 and image.variants_attempts == 1


def test_a_failure_out_of_attempts_is_ledgered_and_answered_2xx(settings):
    settings.PICSITE_ITEM_MAX_ATTEMPTS = 2
    (bad,) = make_images(1, titles={0: "fail-always"})
    run = engine.create(task_key=DEFINITION.key, scope={})
    (item,) = window(run.pk)
    first = deliver(DEFINITION, item).json()
    assert first["outcome"] == "processed" and first["state"] == "retrying" and first["retry_at"]
    (retry,) = window(run.pk)  # the next attempt is published for its time
    assert retry.item_id == bad.pk and retry.attempts == 1 and retry.not_before is not None
    time.sleep(0.6)
    second = deliver(DEFINITION, (run.pk, bad.pk)).json()
    assert second["outcome"] == "processed" and second["state"] == "failed" and second["retry_at"] is None
    run.refresh_from_db()
    assert (run.processed, run.failed) == (1, 1) and run.status in RunStatus.finished()


def test_cancel_with_items_in_flight_ends_cancelled_once_they_are_delivered():
    make_images(3)
    run = engine.create(task_key=DEFINITION.key, scope={})
    items = window(run.pk)
    engine.cancel(run_id=run.pk)
    for item in items:
        assert deliver(DEFINITION, item).json()["outcome"] == "not_runnable"
    run.refresh_from_db()
    assert run.status == RunStatus.CANCELLED
    assert AdminTaskRunFinish.objects.filter(run=run).count() == 1


def test_the_item_route_refuses_unsigned_and_unknown_runs():
    make_images(1)
    run = engine.create(task_key=DEFINITION.key, scope={})
    (item,) = window(run.pk)
    response = deliver(DEFINITION, item, signed=False)
    assert response.status_code == 401 and response.json()["error"]["code"] == "not_authenticated"
    wrong = deliver(DEFINITION, (run.pk + 1000, item.item_id))
    assert wrong.status_code == 404 and wrong.json()["error"]["code"] == "run_not_found"
    other_task = deliver(BATCH_DEFINITION, item)  # the run is not a run of that task
    assert other_task.status_code == 404


# --- the tick and the publisher, against the QStash stand-in (no deliveries: records only) ---


def test_the_tick_tops_windows_up_and_republishes_what_was_lost(settings):
    from tests.qstash_server import QStashStandIn

    settings.CRON_SECRET = "cron-" + "s" * 20
    settings.PICSITE_DISPATCH = "qstash"
    settings.QSTASH_TOKEN = "tok"
    settings.PICSITE_QSTASH_WINDOW = 3
    make_images(5)
    run = engine.create(task_key=DEFINITION.key, scope={})
    tick = reverse(registry.api_url_name(DEFINITION, "tick"))
    with QStashStandIn(token="tok", signing_key=KEY, concurrency=0) as qstash:
        settings.QSTASH_URL = qstash.base_url
        response = Client().get(tick, headers={"Authorization": f"Bearer {settings.CRON_SECRET}"})
        assert response.status_code == 200 and response.json()["run"]["id"] == run.pk
        assert len(qstash.published) == 3 and qstash.batch_calls == [3]
        first = {m.url: m for m in qstash.published}
        assert all(m.flow_key == f"picsite-run-{run.pk}" and m.parallelism == settings.PICSITE_QSTASH_PARALLELISM
                   for m in first.values())  # fmt: skip
        # A second tick with all 3 in flight publishes nothing.
        Client().get(tick, headers={"Authorization": f"Bearer {settings.CRON_SECRET}"})
        assert len(qstash.published) == 3
        # The in-flight timeout passes: the next tick republishes the same items, new generation.
        AdminTaskBatch.objects.filter(run=run).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
        Client().get(tick, headers={"Authorization": f"Bearer {settings.CRON_SECRET}"})
        again = qstash.published[3:]
        assert {m.url for m in again} == set(first)
        assert all(m.deduplication_id != first[m.url].deduplication_id for m in again)
    run.refresh_from_db()
    assert run.status == RunStatus.RUNNING and run.processed == 0


def test_a_failed_publish_hands_the_window_back_for_the_next_one(settings):
    settings.PICSITE_DISPATCH = "qstash"
    settings.QSTASH_TOKEN = "tok"
    settings.QSTASH_URL = "http://127.0.0.1:9"  # nothing listens: the SDK's publish fails
    make_images(2)
    run = engine.create(task_key=DEFINITION.key, scope={})
    from tasks.push import run_window_publish

    assert run_window_publish(run_id=run.pk) == 0
    assert not AdminTaskBatch.objects.filter(run=run, lease_expires_at__gt=timezone.now()).exists()
    handed_back = {b.item_ids[0] for b in AdminTaskBatch.objects.filter(run=run)}
    assert len(handed_back) == 2
    assert {i.item_id for i in window(run.pk)} == handed_back  # republished at once, not after the timeout


def test_a_window_with_nothing_left_ends_the_run_when_the_delivery_could_not(monkeypatch):
    """A delivery's settle gives up when the run's lock is busy (``settle`` is a try-lock):
    then the window that runs after it, which waits for the lock, ends the run."""
    import tasks.engine.push as push

    make_images(1)
    run = engine.create(task_key=DEFINITION.key, scope={})
    (item,) = window(run.pk)
    monkeypatch.setattr(push, "settle", lambda run_id, defn: None)  # as if the lock stayed taken
    assert deliver(DEFINITION, item).json()["outcome"] == "processed"
    run.refresh_from_db()
    assert run.status == RunStatus.RUNNING and run.processed == 1
    assert window(run.pk) == []
    run.refresh_from_db()
    assert run.status == RunStatus.SUCCEEDED
    assert AdminTaskRunFinish.objects.filter(run=run).count() == 1


def test_the_variants_route_takes_only_qstash_or_uploaders():
    (image,) = make_images(1)
    path = reverse("api-image-variants", kwargs={"image_id": image.pk})
    body = b'{"attempt": 1}'
    unsigned = Client().post(path, data=body, content_type="application/json")
    assert unsigned.status_code == 401 and unsigned.json()["error"]["code"] == "not_authenticated"
    wrong_key = mint_signature("sig_" + "w" * 32, url=PUBLIC + path, body=body)
    bad = Client().post(path, data=body, content_type="application/json", headers={"Upstash-Signature": wrong_key})
    assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_signature"
    missing = reverse("api-image-variants", kwargs={"image_id": image.pk + 1000})
    gone = Client().post(missing, data=body, content_type="application/json",
                         headers={"Upstash-Signature": mint_signature(KEY, url=PUBLIC + missing, body=body)})  # fmt: skip
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "image_not_found"
    junk = b'{"attempt": "many"}'
    refused = Client().post(path, data=junk, content_type="application/json",
                            headers={"Upstash-Signature": mint_signature(KEY, url=PUBLIC + path, body=junk)})  # fmt: skip
    assert refused.status_code == 400


def test_a_late_copy_never_takes_a_published_retry_before_its_time(settings):
    settings.PICSITE_ITEM_RETRY_BASE_S = settings.PICSITE_ITEM_RETRY_CAP_S = 120
    (flaky,) = make_images(1, titles={0: "fail-once"})
    run = engine.create(task_key=DEFINITION.key, scope={})
    (item,) = window(run.pk)
    assert deliver(DEFINITION, item).json()["state"] == "retrying"
    (retry,) = window(run.pk)  # published now, for next_attempt_at (60-120 s away)
    assert retry.not_before is not None
    copy = deliver(DEFINITION, item)  # the first attempt's message, delivered again late
    assert copy.json()["outcome"] == "duplicate"
    flaky.refresh_from_db()
    assert flaky.variants_attempts == 1
    # Its time comes (QStash delivers it at not-before): the retry runs, once.
    AdminTaskItem.objects.filter(run=run, item_id=flaky.pk).update(next_attempt_at=timezone.now())
    assert deliver(DEFINITION, retry).json()["outcome"] == "processed"
    assert deliver(DEFINITION, retry).json()["outcome"] == "duplicate"
    run.refresh_from_db()
    flaky.refresh_from_db()
    assert run.status == RunStatus.SUCCEEDED and (run.processed, run.succeeded) == (1, 1)
    assert flaky.variants_attempts == 2
