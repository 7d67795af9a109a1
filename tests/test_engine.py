"""Task-run engine on the real Postgres: lifecycle, refusals, retries, budgets,
leases, concurrency and crash recovery."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta

import psycopg
import pytest
from django.db import connection
from django.utils import timezone

from gallery.models import Image
from tasks import engine
from tasks.models import AdminTaskBatch, AdminTaskItem, AdminTaskRun, ItemState, RunStatus
from tests.engine_support import TEST_TASK_KEY, checkpoint_clean_items, make_images

pytestmark = pytest.mark.django_db(transaction=True)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def fast_retries(settings):
    settings.PICSITE_ITEM_RETRY_BASE_S = 0.01
    settings.PICSITE_ITEM_RETRY_CAP_S = 0.05
    settings.PICSITE_ITEM_MAX_ATTEMPTS = 3


def drain(run_id: int, *, rounds: int = 200) -> AdminTaskRun:
    """Kick until the run ends (retries wait out their short backoff)."""
    for _ in range(rounds):
        run = engine.kick(run_id=run_id)
        if run.status not in RunStatus.runnable():
            return run
        time.sleep(0.02)
    raise AssertionError(f"run {run_id} did not finish: {AdminTaskRun.objects.get(pk=run_id).status}")


def assert_counters_exact(run: AdminTaskRun, *, left_scope: int = 0) -> None:
    assert run.processed == run.total
    assert run.succeeded + run.skipped + run.failed == run.processed
    # A success tops up a shortfall as "skipped" with a left_scope issue (items that left
    # the scope before their turn): that must not hide lost counts where nothing left.
    gaps = [i["message"] for i in run.recent_issues if i.get("code") == "left_scope"]
    assert gaps == ([f"{left_scope} items left the scope during the run"] if left_scope else []), gaps
    assert run.spent_items >= run.processed - left_scope  # one per checkpointed attempt


# --- refusals (table-driven) ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("setup", "kwargs", "error", "field"),
    [
        ("none", {"scope": {}}, engine.EmptyScope, None),
        ("images", {"scope": {"nope": 1}}, engine.InvalidScope, "nope"),
        ("images", {"scope": [1, 2]}, engine.InvalidScope, "scope"),
        ("images", {"scope": {}, "budget": {"items": -1}}, engine.InvalidBudget, "items"),
        ("images", {"scope": {}, "budget": {"coins": 3}}, engine.InvalidBudget, "coins"),
        ("active", {"scope": {}}, engine.RunAlreadyActive, None),
    ],
)
def test_create_refusals(setup, kwargs, error, field):
    if setup in ("images", "active"):
        make_images(3)
    if setup == "active":
        engine.create(task_key=TEST_TASK_KEY, scope={})
    with pytest.raises(error) as info:
        engine.create(task_key=TEST_TASK_KEY, **kwargs)
    if field:
        assert info.value.details["field"] == field
    assert AdminTaskRun.objects.filter(status=RunStatus.QUEUED).count() == (1 if setup == "active" else 0)


def test_unknown_task_and_run():
    with pytest.raises(engine.UnknownTaskKey):
        engine.create(task_key="no-such-task", scope={})
    with pytest.raises(engine.RunNotFound):
        engine.kick(run_id=987654)


@pytest.mark.parametrize(
    ("scope", "field"),
    [
        ({"image_ids": [1, "2"]}, "image_ids"),
        ({"image_ids": list(range(1, 1002))}, "image_ids"),  # over the 1,000-id limit
        ({"force": "yes"}, "force"),
        ({"force": True, "stale": True}, "stale"),
    ],
)
def test_preprocess_scope_validation(scope, field):
    with pytest.raises(engine.InvalidScope) as info:
        engine.normalize_scope(task_key="preprocess-images", scope=scope)
    assert info.value.details["field"] == field


def test_preprocess_refuses_without_storage(settings):
    make_images(2)
    settings.PICSITE_VARIANT_STORAGE = "none"
    with pytest.raises(engine.StorageNotConfigured):
        engine.create(task_key="preprocess-images", scope={})


# --- happy path and counters -------------------------------------------------------------


def test_run_goes_queued_running_succeeded():
    images = make_images(10)
    run = engine.create(task_key=TEST_TASK_KEY, scope={})
    assert (run.status, run.total, run.cursor) == (RunStatus.QUEUED, 10, 0)
    run = engine.kick(run_id=run.pk, max_batches=1)
    assert run.status == RunStatus.RUNNING and run.processed == 4 and run.cursor == images[6].pk or run.cursor > 0
    run = drain(run.pk)
    assert run.status == RunStatus.SUCCEEDED
    assert_counters_exact(run)
    assert run.succeeded == 10 and run.finished_at is not None
    assert set(Image.objects.values_list("variants_attempts", flat=True)) == {1}
    assert not AdminTaskBatch.objects.exists()


def test_rows_inserted_during_run_are_not_skipped_or_double_counted():
    make_images(5)
    run = engine.create(task_key=TEST_TASK_KEY, scope={})
    engine.kick(run_id=run.pk, max_batches=1)
    make_images(3)  # after create: a later run's job, never behind the cursor
    run = drain(run.pk)
    assert run.total == 5 and run.processed == 5
    assert Image.objects.filter(variants_ready=False).count() == 3
    nxt = engine.create(task_key=TEST_TASK_KEY, scope={})
    assert nxt.total == 3


def test_item_leaving_scope_is_counted_as_skipped():
    images = make_images(6)
    run = engine.create(task_key=TEST_TASK_KEY, scope={})
    Image.objects.filter(pk=images[-1].pk).update(variants_ready=True)  # e.g. its upload job finished
    run = drain(run.pk)
    assert run.status == RunStatus.SUCCEEDED
    assert_counters_exact(run, left_scope=1)
    assert run.skipped == 1


# --- retries ---------------------------------------------------------------------------------


def test_flaky_item_is_retried_with_backoff_and_succeeds():
    make_images(5, titles={2: "fail-once"})
    run = drain(engine.create(task_key=TEST_TASK_KEY, scope={}).pk)
    assert run.status == RunStatus.SUCCEEDED and run.succeeded == 5 and run.failed == 0
    item = AdminTaskItem.objects.get(run=run)
    assert item.state == ItemState.SUCCEEDED and item.attempts == 1
    assert any(i["code"] == "flaky" for i in run.recent_issues)


def test_item_out_of_attempts_fails_alone_then_retry_failed_rearms(settings):
    make_images(6, titles={1: "fail-always"})
    run = drain(engine.create(task_key=TEST_TASK_KEY, scope={}).pk)
    assert run.status == RunStatus.SUCCEEDED  # one bad item never fails the run
    assert (run.succeeded, run.failed) == (5, 1)
    assert_counters_exact(run)
    item = AdminTaskItem.objects.get(run=run)
    assert (item.state, item.attempts, item.last_error_code) == (ItemState.FAILED, 3, "boom")
    bad = Image.objects.get(title="fail-always")
    assert bad.variants_attempts == 3

    Image.objects.filter(pk=bad.pk).update(title="fixed now")
    run = engine.retry_failed(run_id=run.pk)
    assert run.status == RunStatus.QUEUED and run.failed == 0 and run.processed == 5
    run = drain(run.pk)
    assert run.status == RunStatus.SUCCEEDED and (run.succeeded, run.failed) == (6, 0)
    assert_counters_exact(run)
    with pytest.raises(engine.InvalidTransition):
        engine.retry_failed(run_id=run.pk)


@pytest.mark.parametrize("stop", ["cancel", "fail"])
def test_retry_failed_after_cancel_or_failure_processes_what_held_batches_left(settings, stop):
    """Cancel and run failure used to drop held batches after the cursor had passed them,
    so "retry failed" reopened the run and it ended succeeded with those items never
    processed (topped up as left_scope skips)."""
    settings.PICSITE_ITEM_MAX_ATTEMPTS = 1
    images = make_images(8, titles={0: "fail-always"})
    run = engine.create(task_key=TEST_TASK_KEY, scope={})
    defn = engine._definition(TEST_TASK_KEY)
    run = engine.kick(run_id=run.pk, max_batches=1)  # items 0-3: one fails for good
    assert (run.processed, run.failed) == (4, 1)
    claim = engine._claim_batch(run.pk, defn, "worker-b")  # items 4-7 held by a worker...
    assert claim is not None and len(claim.item_ids) == 4
    if stop == "cancel":  # ...that died: its lease expired, then the run was cancelled
        AdminTaskBatch.objects.filter(pk=claim.batch_id).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
        assert engine.cancel(run_id=run.pk).status == RunStatus.CANCELLED
    else:
        engine._fail_run(run.pk, defn, "configuration removed")
    Image.objects.filter(title="fail-always").update(title="fixed now")
    run = drain(engine.retry_failed(run_id=run.pk).pk)
    assert run.status == RunStatus.SUCCEEDED and (run.succeeded, run.failed) == (8, 0)
    assert_counters_exact(run)
    calls = dict(Image.objects.filter(pk__in=[i.pk for i in images]).values_list("pk", "variants_attempts"))
    assert calls == {img.pk: (2 if img.pk == images[0].pk else 1) for img in images}


def test_stuck_item_becomes_timeout_failure(settings):
    settings.PICSITE_ITEM_TIME_LIMIT_S = 0.5
    settings.PICSITE_ITEM_MAX_ATTEMPTS = 1
    make_images(3, titles={0: "hang"})
    run = drain(engine.create(task_key=TEST_TASK_KEY, scope={}).pk)
    assert run.status == RunStatus.SUCCEEDED and run.failed == 1 and run.succeeded == 2
    assert AdminTaskItem.objects.get(run=run).last_error_code == "timeout"


def test_run_fatal_fails_the_run_with_clear_error():
    make_images(4, titles={1: "fatal"})
    run = drain(engine.create(task_key=TEST_TASK_KEY, scope={}).pk)
    assert run.status == RunStatus.FAILED
    assert "storage configuration removed" in run.last_error
    # No worker holds anything; what the batch had left stays parked for "retry failed".
    assert not AdminTaskBatch.objects.filter(run=run).exclude(lease_owner="").exists()
    assert not AdminTaskBatch.objects.filter(run=run, lease_expires_at__gt=timezone.now()).exists()


# --- cancel ------------------------------------------------------------------------------------


def test_cancel_queued_is_immediate_and_final():
    make_images(3)
    run = engine.create(task_key=TEST_TASK_KEY, scope={})
    run = engine.cancel(run_id=run.pk)
    assert run.status == RunStatus.CANCELLED and run.finished_at
    with pytest.raises(engine.InvalidTransition):
        engine.cancel(run_id=run.pk)
    # a new run may start now
    assert engine.create(task_key=TEST_TASK_KEY, scope={}).status == RunStatus.QUEUED


def test_cancel_with_live_lease_goes_cancelling_then_worker_stops():
    make_images(8)
    run = engine.create(task_key=TEST_TASK_KEY, scope={})
    engine.kick(run_id=run.pk, max_batches=1)
    # a worker holds a live batch
    AdminTaskBatch.objects.create(
        run=run, item_ids=[1], lease_owner="other", lease_expires_at=timezone.now() + timedelta(minutes=5)
    )
    run = engine.cancel(run_id=run.pk)
    assert run.status == RunStatus.CANCELLING
    run = engine.kick(run_id=run.pk)  # nothing is claimed while cancelling
    assert run.status == RunStatus.CANCELLING and run.processed == 4
    AdminTaskBatch.objects.filter(run=run).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    run = engine.kick(run_id=run.pk)
    assert run.status == RunStatus.CANCELLED


def test_cancel_with_expired_lease_is_immediate():
    make_images(8)
    run = engine.create(task_key=TEST_TASK_KEY, scope={})
    AdminTaskBatch.objects.create(
        run=run, item_ids=[1], lease_owner="dead", lease_expires_at=timezone.now() - timedelta(seconds=5)
    )
    AdminTaskRun.objects.filter(pk=run.pk).update(status=RunStatus.RUNNING)
    assert engine.cancel(run_id=run.pk).status == RunStatus.CANCELLED


def test_cancel_from_another_process_stops_within_one_item(settings):
    make_images(40)
    run = engine.create(task_key=TEST_TASK_KEY, scope={})
    env = _worker_env(delay="0.3")
    worker = subprocess.Popen([sys.executable, "-m", "tests.engine_worker", "kick", str(run.pk)], cwd=REPO, env=env)
    try:
        _wait_until(lambda: AdminTaskRun.objects.get(pk=run.pk).processed >= 2, 30)
        subprocess.run([sys.executable, "-m", "tests.engine_worker", "cancel", str(run.pk)], cwd=REPO, env=env, check=True)
        at_cancel = AdminTaskRun.objects.get(pk=run.pk).processed
        worker.wait(30)
    finally:
        if worker.poll() is None:
            worker.kill()
    run.refresh_from_db()
    assert run.status == RunStatus.CANCELLED
    # the in-flight item is abandoned at its next cancel check: at most one more lands
    assert run.processed - at_cancel <= 1
    assert run.processed < 40


# --- the transition table ------------------------------------------------------------------


def test_status_writes_the_transition_table_does_not_allow_are_refused():
    """Every status write goes through lifecycle.transition: a move the table does not
    list (an engine bug) raises InvalidTransition and writes nothing."""
    from tasks.engine import lifecycle

    assert set(lifecycle.TRANSITIONS) == {None, *RunStatus.values}
    make_images(2)
    run = drain(engine.create(task_key=TEST_TASK_KEY, scope={}).pk)
    assert run.status == RunStatus.SUCCEEDED
    for status in (RunStatus.RUNNING, RunStatus.PAUSED, RunStatus.CANCELLING, RunStatus.SUCCEEDED):
        with pytest.raises(engine.InvalidTransition):
            lifecycle.transition(run, status)
        assert run.status == RunStatus.SUCCEEDED
    assert AdminTaskRun.objects.get(pk=run.pk).status == RunStatus.SUCCEEDED


def test_a_paused_run_cancels_at_once_and_retry_failed_reopens_it(settings):
    settings.PICSITE_ITEM_MAX_ATTEMPTS = 1
    make_images(6, titles={0: "fail-always"})
    run = drain(engine.create(task_key=TEST_TASK_KEY, scope={}, budget={"items": 2}).pk)
    assert (run.status, run.pause_reason, run.failed) == (RunStatus.PAUSED, "budget", 1)
    run = engine.cancel(run_id=run.pk)
    assert run.status == RunStatus.CANCELLED and run.finished_at
    Image.objects.filter(title="fail-always").update(title="fixed now")
    run = engine.retry_failed(run_id=run.pk)
    assert run.status == RunStatus.QUEUED and run.finished_at is None
    run = engine.set_budget(run_id=run.pk, budget={})
    run = drain(run.pk)
    assert run.status == RunStatus.SUCCEEDED and (run.succeeded, run.failed) == (6, 0)
    assert_counters_exact(run)


# --- budgets -----------------------------------------------------------------------------------


def test_budget_pauses_before_exceeding_and_raising_it_resumes():
    make_images(10)
    run = engine.create(task_key=TEST_TASK_KEY, scope={}, budget={"items": 6})
    run = drain(run.pk)
    assert run.status == RunStatus.PAUSED and run.pause_reason == "budget"
    assert run.processed == 6 and run.spent_items == 6
    run = engine.set_budget(run_id=run.pk, budget={"items": 100})
    assert run.status == RunStatus.QUEUED
    run = drain(run.pk)
    assert run.status == RunStatus.SUCCEEDED and run.processed == 10
    assert set(Image.objects.values_list("variants_attempts", flat=True)) == {1}


def test_bytes_budget_pauses():
    make_images(10)
    run = drain(engine.create(task_key=TEST_TASK_KEY, scope={}, budget={"bytes": 3500}).pk)
    assert run.status == RunStatus.PAUSED and run.spent_bytes <= 3500 and run.processed == 3


def test_items_budget_counts_what_other_workers_already_hold():
    """Concurrent claims each limited themselves by spent items only, so every worker but
    the first could overrun an items budget by up to a batch."""
    make_images(12)
    run = engine.create(task_key=TEST_TASK_KEY, scope={}, budget={"items": 5})
    defn = engine._definition(TEST_TASK_KEY)
    claims = {owner: engine._claim_batch(run.pk, defn, owner) for owner in ("worker-a", "worker-b", "worker-c")}
    held = {owner: len(claim.item_ids) if claim else 0 for owner, claim in claims.items()}
    assert held == {"worker-a": 4, "worker-b": 1, "worker-c": 0}
    assert AdminTaskRun.objects.get(pk=run.pk).status == RunStatus.RUNNING  # holding is not spending
    runner = engine._ItemRunner()
    try:
        for owner in ("worker-a", "worker-b"):
            engine._work_batch(run.pk, defn, owner, claims[owner], None, runner, run.scope)
    finally:
        runner.close()
    run = drain(run.pk)
    assert run.status == RunStatus.PAUSED and run.pause_reason == "budget"
    assert run.spent_items == 5 and run.processed == 5


def test_set_budget_waits_for_a_claim_that_is_pausing_the_run():
    """A claim pauses an exhausted run under the run's advisory lock; set_budget did not
    take it, so a raised budget could land between the claim's read and its pause and the
    run stayed paused with a budget that allowed it to go on."""
    make_images(6)
    run = engine.create(task_key=TEST_TASK_KEY, scope={}, budget={"items": 2})
    defn = engine._definition(TEST_TASK_KEY)
    AdminTaskRun.objects.filter(pk=run.pk).update(status=RunStatus.RUNNING, spent_items=2)
    locked, go = threading.Event(), threading.Event()

    def claim_that_pauses() -> None:  # what _claim_batch does once it found the budget spent
        with _second_connection() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", [defn.lock_id, engine._run_key(run.pk)])
            locked.set()
            go.wait(30)
            conn.execute("UPDATE tasks_admintaskrun SET status = 'paused', pause_reason = 'budget' WHERE id = %s", [run.pk])
            conn.commit()

    def raise_budget() -> None:
        try:
            engine.set_budget(run_id=run.pk, budget={"items": 100})
        finally:
            connection.close()

    claimer = threading.Thread(target=claim_that_pauses)
    claimer.start()
    assert locked.wait(30)
    setter = threading.Thread(target=raise_budget)
    setter.start()
    deadline = time.monotonic() + 30
    while setter.is_alive() and time.monotonic() < deadline:  # until it ends or waits on the lock
        with connection.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
            if cur.fetchone()[0]:
                break
        time.sleep(0.01)
    go.set()
    claimer.join(30)
    setter.join(30)
    run.refresh_from_db()
    assert run.budget == {"items": 100}
    assert run.status == RunStatus.QUEUED and run.pause_reason == ""


# --- leases --------------------------------------------------------------------------------------


def test_worker_that_lost_its_lease_writes_nothing():
    make_images(4)
    run = engine.create(task_key=TEST_TASK_KEY, scope={})
    defn = engine._definition(TEST_TASK_KEY)
    claim = engine._claim_batch(run.pk, defn, "worker-a")
    assert claim is not None and len(claim.item_ids) == 4
    # A's lease expires; B adopts the batch.
    AdminTaskBatch.objects.filter(pk=claim.batch_id).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    adopted = engine._claim_batch(run.pk, defn, "worker-b")
    assert adopted.batch_id == claim.batch_id
    outcome = engine._Outcome("succeeded", result=engine.ItemResult("succeeded"))
    state = engine._checkpoint(run.pk, defn, "worker-a", claim, claim.item_ids[0], outcome, None, False)
    assert state is None
    run.refresh_from_db()
    assert run.processed == 0 and run.lease_owner == "worker-b"


# --- fast checkpoints and folding ----------------------------------------------------------


def test_fast_checkpoints_hold_clean_items_on_the_batch_and_readers_add_them():
    from api.tasks.schemas import run_json as run_to_dict

    make_images(8)
    run = engine.create(task_key=TEST_TASK_KEY, scope={})
    claim = checkpoint_clean_items(run, "worker-a", ["succeeded", "succeeded", "skipped"])
    run.refresh_from_db()
    batch = AdminTaskBatch.objects.get(pk=claim.batch_id)
    # The run row is untouched; the batch holds the three items and has moved on.
    assert (run.processed, run.spent_items) == (0, 0)
    assert (batch.position, batch.pending_processed, batch.pending_succeeded, batch.pending_skipped) == (3, 3, 2, 1)
    assert (batch.pending_bytes, batch.pending_writes) == (30, 3)
    live = engine.live_counters(run)
    assert (live["processed"], live["succeeded"], live["skipped"], live["spent_items"]) == (3, 2, 1, 3)
    assert live["spent_bytes"] == 30 and live["spent_seconds"] == pytest.approx(1.5)
    body = run_to_dict(run)
    assert body["counters"] == {"total": 8, "processed": 3, "succeeded": 2, "skipped": 1, "failed": 0}
    assert body["spent"]["items"] == 3 and body["progress"]["percent"] == pytest.approx(37.5)

    # Releasing the batch folds them into the run row in the same statement.
    engine._release_batch(run.pk, engine._definition(TEST_TASK_KEY), "worker-a", claim)
    run.refresh_from_db()
    batch.refresh_from_db()
    assert (run.processed, run.succeeded, run.skipped, run.spent_items, run.spent_bytes) == (3, 2, 1, 3, 30)
    assert (batch.pending_processed, batch.pending_succeeded, batch.pending_bytes) == (0, 0, 0)
    assert batch.lease_expires_at <= timezone.now()
    assert engine.live_counters(run)["processed"] == 3


def test_checkpoint_folds_when_the_window_has_passed_and_on_failures():
    make_images(6, titles={1: "fail-always"})
    run = engine.create(task_key=TEST_TASK_KEY, scope={})
    defn = engine._definition(TEST_TASK_KEY)
    claim = checkpoint_clean_items(run, "worker-a", ["succeeded"])
    # The fold window has passed: this clean item folds itself and the one before it.
    claim.folded_at = time.monotonic() - engine.FOLD_EVERY_S - 1
    outcome = engine._Outcome("succeeded", result=engine.ItemResult("succeeded"))
    engine._checkpoint(run.pk, defn, "worker-a", claim, claim.item_ids[1], outcome, None, False)
    run.refresh_from_db()
    assert run.processed == 2 and AdminTaskBatch.objects.get(pk=claim.batch_id).pending_processed == 0
    # A failure is on the run row at once, whatever the window says.
    claim.folded_at = time.monotonic()
    failure = engine.ItemFailure(code="boom", stage="process", message="x", retryable=False)
    engine._checkpoint(run.pk, defn, "worker-a", claim, claim.item_ids[2], engine._Outcome("failed", failure=failure), None, False)
    run.refresh_from_db()
    assert (run.processed, run.failed) == (3, 1)
    assert run.recent_issues[0]["code"] == "boom"


def test_adopted_batch_brings_its_pending_counters_and_counts_stay_exact():
    make_images(4)
    run = engine.create(task_key=TEST_TASK_KEY, scope={})
    claim = checkpoint_clean_items(run, "worker-a", ["succeeded", "succeeded"])
    # worker-a dies: its lease expires with two items pending on the batch.
    AdminTaskBatch.objects.filter(pk=claim.batch_id).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    assert engine.live_counters(run)["processed"] == 2
    run = engine.kick(run_id=run.pk, owner="worker-b")
    assert run.status == RunStatus.SUCCEEDED
    assert_counters_exact(run)
    assert (run.processed, run.succeeded, run.spent_items) == (4, 4, 4)
    # worker-b processed only the two items worker-a had not checkpointed.
    calls = sorted(Image.objects.values_list("variants_attempts", flat=True))
    assert calls == [0, 0, 1, 1]


def test_cancel_and_failure_fold_what_held_batches_still_carry():
    make_images(8)
    run = engine.create(task_key=TEST_TASK_KEY, scope={})
    claim = checkpoint_clean_items(run, "worker-a", ["succeeded", "skipped", "succeeded"])
    AdminTaskBatch.objects.filter(pk=claim.batch_id).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    run = engine.cancel(run_id=run.pk)
    assert run.status == RunStatus.CANCELLED
    run.refresh_from_db()
    assert (run.processed, run.succeeded, run.skipped, run.spent_items) == (3, 2, 1, 3)
    # The batch stays parked for "retry failed" (its last item was never processed), with
    # nothing pending and nobody's lease.
    (parked,) = AdminTaskBatch.objects.filter(run=run)
    assert (parked.pending_processed, parked.lease_owner, parked.position) == (0, "", 3)
    assert parked.lease_expires_at <= timezone.now()

    run2 = engine.create(task_key=TEST_TASK_KEY, scope={})
    checkpoint_clean_items(run2, "worker-a", ["succeeded"])
    engine._fail_run(run2.pk, engine._definition(TEST_TASK_KEY), "storage gone")
    run2.refresh_from_db()
    assert run2.status == RunStatus.FAILED and run2.processed == 1 and run2.last_error == "storage gone"


def _second_connection() -> psycopg.Connection:
    s = connection.settings_dict
    return psycopg.connect(dbname=s["NAME"], user=s["USER"], host=s["HOST"], port=s["PORT"], autocommit=False)


def _fold_in_thread(run, claim, owner: str) -> threading.Thread:
    """Start a folding checkpoint of ``claim``'s next item on its own connection."""

    def fold() -> None:
        try:
            claim.folded_at = 0.0  # the fold window has passed
            outcome = engine._Outcome("succeeded", result=engine.ItemResult("succeeded"), seconds=0.1)
            defn = engine._definition(run.task_key)
            engine._checkpoint(run.pk, defn, owner, claim, claim.item_ids[claim.position], outcome, None, False)
        finally:
            connection.close()

    thread = threading.Thread(target=fold)
    thread.start()
    return thread


def test_fold_takes_pending_counters_committed_after_its_snapshot():
    make_images(12)
    run = engine.create(task_key=TEST_TASK_KEY, scope={})
    claim = checkpoint_clean_items(run, "worker-a", ["succeeded", "succeeded"])
    # Another transaction holds the batch row with 5 more pending items when the fold starts.
    other = _second_connection()
    other.execute(
        "UPDATE tasks_admintaskbatch SET pending_processed = pending_processed + 5,"
        " pending_succeeded = pending_succeeded + 5 WHERE id = %s",
        [claim.batch_id],
    )
    thread = _fold_in_thread(run, claim, "worker-a")
    time.sleep(0.5)
    other.commit()
    other.close()
    thread.join(10)
    run.refresh_from_db()
    # 2 + 5 pending + the folding item: nothing zeroed without being counted.
    assert (run.processed, run.succeeded) == (8, 8)
    assert AdminTaskBatch.objects.get(pk=claim.batch_id).pending_processed == 0


def test_progress_notify_counts_a_fold_committed_after_the_snapshot_once():
    make_images(40)
    run = engine.create(task_key=TEST_TASK_KEY, scope={})
    first = checkpoint_clean_items(run, "worker-a", ["succeeded", "succeeded", "succeeded"])
    second = checkpoint_clean_items(run, "worker-b", ["succeeded"])
    listener = _second_connection()
    listener.autocommit = True
    listener.execute(f"LISTEN {engine.NOTIFY_CHANNEL}")
    # worker-a's fold (3 items to the run row) commits while worker-b's fold waits on the row.
    other = _second_connection()
    other.execute("UPDATE tasks_admintaskrun SET processed = processed + 3, succeeded = succeeded + 3 WHERE id = %s", [run.pk])
    other.execute("UPDATE tasks_admintaskbatch SET pending_processed = 0, pending_succeeded = 0 WHERE id = %s", [first.batch_id])
    thread = _fold_in_thread(run, second, "worker-b")
    time.sleep(0.5)
    other.commit()
    other.close()
    thread.join(10)
    payloads = [json.loads(n.payload) for n in listener.notifies(timeout=2, stop_after=1)]
    listener.close()
    assert payloads and payloads[0]["event"] == "progress"
    assert payloads[0]["counters"]["processed"] == engine.live_counters(run)["processed"] == 5


def test_checkpoint_survives_a_migration_that_changes_its_result_type():
    """A prepared checkpoint whose result type changed (a migration widened a column) is
    re-prepared instead of failing every later checkpoint on that connection."""
    make_images(12)
    run = engine.create(task_key=TEST_TASK_KEY, scope={})
    claim = checkpoint_clean_items(run, "worker-a", ["succeeded"])  # prepared now
    other = _second_connection()
    try:
        other.execute("ALTER TABLE tasks_admintaskrun ALTER COLUMN status TYPE varchar(32)")
        other.commit()
        checkpoint_more = engine._Outcome("succeeded", result=engine.ItemResult("succeeded"))
        defn = engine._definition(TEST_TASK_KEY)
        for _ in range(2):
            claim.folded_at = time.monotonic()
            state = engine._checkpoint(run.pk, defn, "worker-a", claim, claim.item_ids[claim.position], checkpoint_more, None, False)
            assert state is not None and state.status == RunStatus.RUNNING
        assert AdminTaskBatch.objects.get(pk=claim.batch_id).pending_processed == 3
    finally:
        other.execute("ALTER TABLE tasks_admintaskrun ALTER COLUMN status TYPE varchar(16)")
        other.commit()
        other.close()


def test_budget_set_mid_batch_stops_the_fast_path_at_the_live_count():
    make_images(8)
    run = engine.create(task_key=TEST_TASK_KEY, scope={})
    claim = checkpoint_clean_items(run, "worker-a", ["succeeded", "succeeded"])  # pending on the batch
    engine.set_budget(run_id=run.pk, budget={"items": 3})
    defn = engine._definition(TEST_TASK_KEY)
    claim.folded_at = time.monotonic()
    outcome = engine._Outcome("succeeded", result=engine.ItemResult("succeeded"))
    state = engine._checkpoint(run.pk, defn, "worker-a", claim, claim.item_ids[2], outcome, None, False)
    assert state.budget_reached  # 3 of 3 items spent, counting the batch's pending ones
    assert claim.budgeted  # every later checkpoint of this batch folds


@pytest.mark.parametrize("run_id", [7, 2**31 - 1, 2**31 + 6, 2**40])
def test_checkpoints_and_claims_share_one_lock_key_for_any_run_id(run_id):
    defn = engine._definition(TEST_TASK_KEY)
    claim = engine._Claim(batch_id=1, item_ids=[1], position=0, is_retry=False)
    params = engine._checkpoint_params(run_id, defn, "worker-a", claim)
    holder = _second_connection()
    try:
        holder.execute("SELECT pg_advisory_xact_lock(%s, %s)", [defn.lock_id, engine._run_key(run_id)])
        connection.ensure_connection()
        with psycopg.Cursor(connection.connection) as cur:
            cur.execute(engine.FAST_CHECKPOINT_SQL, params)
            assert cur.fetchone()[0] is False  # the claim's key is the checkpoint's key
    finally:
        holder.rollback()
        holder.close()
    assert 1 <= engine._run_key(run_id) <= 2**31 - 1  # never 0: the task-wide key


def test_budgeted_run_folds_every_checkpoint():
    make_images(6)
    run = engine.create(task_key=TEST_TASK_KEY, scope={}, budget={"items": 100})
    claim = checkpoint_clean_items(run, "worker-a", ["succeeded", "succeeded"])
    run.refresh_from_db()
    assert run.spent_items == 2 and AdminTaskBatch.objects.get(pk=claim.batch_id).pending_processed == 0


def test_tick_kicks_oldest_runnable_run():
    make_images(3)
    assert engine.tick(task_key=TEST_TASK_KEY) is None
    run = engine.create(task_key=TEST_TASK_KEY, scope={})
    ticked = engine.tick(task_key=TEST_TASK_KEY)
    assert ticked.pk == run.pk and ticked.status == RunStatus.SUCCEEDED


# --- liveness: heartbeat, short leases, prompt adoption -------------------------------------


def test_heartbeat_keeps_a_slow_items_batch_leased(settings, monkeypatch):
    """Leases were renewed only at checkpoints, so liveness depended on the longest item:
    an item longer than the lease let another worker adopt the batch mid-item."""
    settings.PICSITE_LEASE_OVERRIDE_S = 1.0
    monkeypatch.setenv("PICSITE_TEST_ITEM_DELAY", "3")
    images = make_images(2)
    run = engine.create(task_key=TEST_TASK_KEY, scope={})
    defn = engine._definition(TEST_TASK_KEY)

    def work() -> None:
        try:
            engine.kick(run_id=run.pk)
        finally:
            connection.close()

    worker = threading.Thread(target=work)
    worker.start()
    deadline = time.monotonic() + 30
    while not Image.objects.filter(variants_attempts=1).exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(2.0)  # twice the lease, mid-item, with no checkpoint in between
    stolen = engine._claim_batch(run.pk, defn, "worker-b")
    worker.join(60)
    assert stolen is None
    assert set(Image.objects.filter(pk__in=[i.pk for i in images]).values_list("variants_attempts", flat=True)) == {1}
    assert AdminTaskRun.objects.get(pk=run.pk).status == RunStatus.SUCCEEDED


def test_tick_adopts_an_expired_batch_even_while_another_is_live():
    """The scheduled tick skipped a run as long as any of its batches was live, so a dead
    worker's batch waited for the others to finish (or for the lease of a long task)."""
    from tasks.jobs import tick_all_job

    images = make_images(8)
    run = engine.create(task_key=TEST_TASK_KEY, scope={})
    defn = engine._definition(TEST_TASK_KEY)
    engine._claim_batch(run.pk, defn, "live-worker")
    dead = engine._claim_batch(run.pk, defn, "dead-worker")
    AdminTaskBatch.objects.filter(pk=dead.batch_id).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    tick_all_job()
    calls = dict(Image.objects.filter(pk__in=[i.pk for i in images]).values_list("pk", "variants_attempts"))
    assert [calls[pk] for pk in dead.item_ids] == [1, 1, 1, 1]


def test_drain_job_adopts_a_batch_whose_lease_runs_out_within_its_slice(settings):
    """A drain job with nothing left to claim used to return while a batch of a dead worker
    was about to expire, leaving it to the next scheduled tick."""
    from tasks.jobs import drain_run_job

    settings.PICSITE_DRAIN_SLICE_S = 20
    make_images(4)
    run = engine.create(task_key=TEST_TASK_KEY, scope={})
    claim = engine._claim_batch(run.pk, engine._definition(TEST_TASK_KEY), "dying-worker")
    AdminTaskBatch.objects.filter(pk=claim.batch_id).update(lease_expires_at=timezone.now() + timedelta(seconds=1))
    assert drain_run_job(run.pk) == RunStatus.SUCCEEDED


def test_worker_over_the_memory_bound_stops_after_its_item(settings):
    """PICSITE_WORKER_MEMORY_MB is enforced per item: a worker over it hands its batch back
    after the item and returns, so its process can be recycled (django-q2 max_rss)."""
    settings.PICSITE_WORKER_MEMORY_MB = 1  # every process is over it
    make_images(8)
    run = engine.kick(run_id=engine.create(task_key=TEST_TASK_KEY, scope={}).pk)
    assert run.processed == 1 and run.status == RunStatus.RUNNING
    (batch,) = AdminTaskBatch.objects.filter(run=run)
    assert batch.position == 1 and batch.lease_expires_at <= timezone.now()  # handed back at once


# --- concurrency ------------------------------------------------------------------------------


def test_eight_concurrent_kickers_process_each_item_exactly_once(settings):
    os.environ["PICSITE_TEST_ITEM_DELAY"] = "0.01"
    try:
        make_images(80)
        run = engine.create(task_key=TEST_TASK_KEY, scope={})
        errors: list[BaseException] = []

        def caller(i: int) -> None:
            try:
                for _ in range(30):
                    r = engine.tick(task_key=TEST_TASK_KEY) if i % 2 else engine.kick(run_id=run.pk)
                    if r is None or r.status not in RunStatus.runnable():
                        return
            except BaseException as exc:  # surfaced below
                errors.append(exc)
            finally:
                connection.close()

        threads = [threading.Thread(target=caller, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        os.environ.pop("PICSITE_TEST_ITEM_DELAY", None)
    assert not errors, errors
    run.refresh_from_db()
    assert run.status == RunStatus.SUCCEEDED
    assert_counters_exact(run)
    assert (run.succeeded, run.spent_items) == (80, 80)
    calls = list(Image.objects.values_list("variants_attempts", flat=True))
    assert calls == [1] * 80


# --- crash recovery ---------------------------------------------------------------------------


def _worker_env(*, delay: str = "0.02", lease: str = "1.0") -> dict:
    env = dict(os.environ)
    env["PICSITE_DB_NAME"] = connection.settings_dict["NAME"]
    env["PICSITE_LEASE_OVERRIDE_S"] = lease
    env["PICSITE_TEST_ITEM_DELAY"] = delay
    env["PICSITE_ITEM_RETRY_BASE_S"] = "0.01"
    env["PYTHONPATH"] = REPO
    return env


def _wait_until(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_sigkilled_workers_are_adopted_and_counters_stay_exact(seed):
    """12 SIGKILLs per seed at random points; the next worker adopts after the lease."""
    rng = random.Random(seed)
    make_images(160)
    run = engine.create(task_key=TEST_TASK_KEY, scope={})
    env = _worker_env(delay="0.03")
    kills = 0
    while kills < 12:
        before = AdminTaskRun.objects.get(pk=run.pk).processed
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.engine_worker", "kick", str(run.pk)],
            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        # Kill at a random point once this worker is really working (mid-item,
        # mid-checkpoint or between batches), whatever the interpreter start-up costs.
        _wait_until(
            lambda p=proc, b=before: p.poll() is not None or AdminTaskRun.objects.get(pk=run.pk).processed > b, 30
        )
        time.sleep(rng.uniform(0.0, 0.25))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        if AdminTaskRun.objects.get(pk=run.pk).status not in RunStatus.active():
            break
    assert kills == 12
    # A survivor adopts whatever batch a killed worker held once its lease expires.
    final = subprocess.run(
        [sys.executable, "-m", "tests.engine_worker", "kick", str(run.pk)], cwd=REPO, env=env, timeout=120
    )
    assert final.returncode == 0
    run.refresh_from_db()
    if run.status != RunStatus.SUCCEEDED:
        time.sleep(1.2)
        run = drain(run.pk)
    assert run.status == RunStatus.SUCCEEDED
    assert_counters_exact(run)
    # The test processor always succeeds, also when it reruns a killed worker's item.
    assert (run.succeeded, run.skipped, run.spent_items) == (160, 0, 160)
    assert not Image.objects.filter(variants_ready=False).exists()


def test_sparse_scope_uses_index_friendly_order_and_finishes():
    images = make_images(300)
    Image.objects.filter(pk__lt=images[-5].pk).update(variants_ready=True)  # 5 pending at the end
    run = engine.create(task_key=TEST_TASK_KEY, scope={})
    assert run.total == 5
    assert engine._keyset_order(run) != "pk"  # sparse: partial indexes + top-N sort
    run = drain(run.pk)
    assert run.status == RunStatus.SUCCEEDED
    assert_counters_exact(run)
    assert list(Image.objects.filter(variants_attempts=1).values_list("pk", flat=True).order_by("pk")) == [
        i.pk for i in images[-5:]
    ]


def test_migrate_installs_the_tick_schedule():
    from django.core.management import call_command
    from django_q.models import Schedule

    Schedule.objects.filter(name="picsite-task-tick").delete()
    call_command("migrate", verbosity=0)
    tick = Schedule.objects.get(name="picsite-task-tick")
    assert tick.func == "tasks.jobs.tick_all_job" and tick.repeats == -1
