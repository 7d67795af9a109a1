"""A test-only task definition over synthetic Image rows (no files).

The processor counts its calls in ``Image.variants_attempts`` (so tests can prove
each item ran exactly once), marks the row ready, and misbehaves on request by
title: "fail-always", "fail-once", "fatal", "hang". Imported by tests and by the
worker subprocesses the crash tests SIGKILL (``python -m tests.engine_worker``).
"""

from __future__ import annotations

import os
import time

from django.db.models import F

from gallery.models import Image
from gallery.selectors import image_thumbnail_urls
from tasks import engine
from tasks.models import RunStatus
from tasks.registry import (
    CostModel,
    ItemFailure,
    ItemResult,
    RunFatal,
    ScopeField,
    TaskDefinition,
    register,
    reject_unknown_keys,
)

TEST_TASK_KEY = "test-mark-ready"


def _normalize(raw: dict) -> dict:
    reject_unknown_keys(raw, set())
    return {}


def _process(image: Image, cancel, scope: dict) -> ItemResult:
    Image.objects.filter(pk=image.pk).update(variants_attempts=F("variants_attempts") + 1)
    calls = Image.objects.filter(pk=image.pk).values_list("variants_attempts", flat=True).get()
    delay = float(os.environ.get("PICSITE_TEST_ITEM_DELAY", "0"))
    end = time.monotonic() + delay
    while time.monotonic() < end:
        cancel()
        time.sleep(min(0.005, delay))
    cancel()
    if image.title == "fail-always":
        raise ItemFailure(code="boom", stage="process", message="this item always fails")
    if image.title == "fail-once" and calls == 1:
        raise ItemFailure(code="flaky", stage="process", message="fails on the first call")
    if image.title == "fatal":
        raise RunFatal("storage configuration removed")
    if image.title == "hang":
        for _ in range(400):
            cancel()
            time.sleep(0.01)
    Image.objects.filter(pk=image.pk).update(variants_ready=True)
    return ItemResult("succeeded", bytes_written=1000, objects_written=2)


DEFINITION = register(
    TaskDefinition(
        key=TEST_TASK_KEY,
        title="Test: mark ready",
        lock_id=49001,
        batch_size=4,
        lease_seconds=30,  # renewed by the heartbeat every 5 s while the worker lives
        scope_fields=(),
        normalize_scope=_normalize,
        scope_queryset=lambda scope: Image.objects.alive().filter(variants_ready=False),
        item_queryset=lambda: Image.objects.all(),
        process=_process,
        cost=CostModel(seconds_per_item=0.01, bytes_per_item=1000, writes_per_item=2),
        item_thumbnail_urls=lambda ids: image_thumbnail_urls(image_ids=ids),
        listed=False,  # not on /admin/tasks nor among the CLI's known tasks
    )
)


# --- a batch-capable twin: explicit ids, an on_finish hook recorded in a scratch table -------

TEST_BATCH_TASK_KEY = "test-batch"
ON_FINISH_TABLE = "test_on_finish_calls"  # not a Django table: flushes leave it alone


def _normalize_batch(raw: dict) -> dict:
    from tasks.registry import MAX_BATCH_IDS, batch_scope, scope_ids

    reject_unknown_keys(raw, {"image_ids"})
    ids = scope_ids(raw, "image_ids", limit=MAX_BATCH_IDS)
    return batch_scope(raw, "image_ids", ids) if ids else {"mode": "all"}


def _batch_scope(scope: dict):
    if scope.get("mode") == "ids":
        return Image.objects.alive().filter(pk__in=scope["image_ids"])
    return Image.objects.alive().filter(variants_ready=False)


def on_finish_calls_reset() -> None:
    from django.db import connection

    with connection.cursor() as cur:
        cur.execute(f"CREATE TABLE IF NOT EXISTS {ON_FINISH_TABLE} (run_id bigint, seq int, status text)")
        cur.execute(f"TRUNCATE {ON_FINISH_TABLE}")


def on_finish_calls() -> list[tuple[int, int, str]]:
    from django.db import connection

    with connection.cursor() as cur:
        cur.execute(f"SELECT run_id, seq, status FROM {ON_FINISH_TABLE} ORDER BY run_id, seq")
        return list(cur.fetchall())


def _on_finish(record) -> None:
    from django.db import connection

    with connection.cursor() as cur:  # in the engine's transaction: done iff marked done
        cur.execute(f"CREATE TABLE IF NOT EXISTS {ON_FINISH_TABLE} (run_id bigint, seq int, status text)")
        cur.execute(f"INSERT INTO {ON_FINISH_TABLE} VALUES (%s, %s, %s)", [record.run_id, record.seq, record.status])


BATCH_DEFINITION = register(
    TaskDefinition(
        key=TEST_BATCH_TASK_KEY,
        title="Test: batches",
        lock_id=49002,
        batch_size=4,
        lease_seconds=30,
        scope_fields=(ScopeField("image_ids", "int_list", "An explicit batch of up to 1000 ids", max_items=1000),),
        normalize_scope=_normalize_batch,
        scope_queryset=_batch_scope,
        item_queryset=lambda: Image.objects.alive(),
        process=_process,
        cost=CostModel(seconds_per_item=0.01, bytes_per_item=1000, writes_per_item=2),
        batch_ids=lambda scope: scope["image_ids"] if scope.get("mode") == "ids" else None,
        item_result=lambda image: {"title": image.title},
        on_finish=_on_finish,
        listed=False,
    )
)


def make_images(n: int, *, titles: dict[int, str] | None = None) -> list[Image]:
    """Synthetic rows: unique keys, no files. ``titles`` maps index -> behaviour title."""
    titles = titles or {}
    rows = [
        Image(
            original=f"originals/synthetic-{i}.jpg",
            image_key=f"variants/synthetic{time.monotonic_ns()}{i:06d}",
            title=titles.get(i, f"img {i}"),
            width=1000,
            height=800,
        )
        for i in range(n)
    ]
    return Image.objects.bulk_create(rows)


def checkpoint_clean_items(run, owner: str, outcomes: list[str]):
    """Claim a batch as ``owner`` and checkpoint its first items with ``outcomes``
    ("succeeded" / "skipped") while the fold window is open; returns the claim."""
    defn = engine._definition(run.task_key)
    claim = engine._claim_batch(run.pk, defn, owner)
    assert claim is not None
    for kind in outcomes:
        claim.folded_at = time.monotonic()  # inside FOLD_EVERY_S: the fast checkpoint
        outcome = engine._Outcome(kind, result=engine.ItemResult(kind, bytes_written=10, objects_written=1), seconds=0.5)
        state = engine._checkpoint(run.pk, defn, owner, claim, claim.item_ids[claim.position], outcome, None, False)
        assert state is not None and state.status == RunStatus.RUNNING
    return claim
