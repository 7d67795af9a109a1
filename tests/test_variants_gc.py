"""The variants-gc task end to end, against the real database and real stores (local disk,
moto's S3 server over HTTP): what it deletes and what it must never delete, with a backfill
writing candidates at the same time; its preview figures; and its surfaces (admin page, API,
OpenAPI, the ``variants_gc`` command).

Objects are made old on local disk with os.utime; moto cannot backdate LastModified, so the
S3 test runs with a grace of 0, where everything a set names must survive anyway.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from django.core.management import call_command
from django.db import connection
from django.utils import timezone

from gallery.models import Image, VariantSet
from gallery.services import _claim, _release, image_ingest
from gallery.storage import variant_key, variant_store_for
from gallery.variant_sets import variant_set_keys
from tasks import engine
from tasks.definitions import variants_gc
from tasks.models import AdminTaskRun, KeyShard, RunStatus
from tasks.registry import ItemFailure
from tests.variants_support import served_keys

pytestmark = pytest.mark.django_db(transaction=True)

GC = "variants-gc"
PREFIX = "/api/v1/variants-gc-tasks"
OLD = timedelta(days=30)
WIDTHS = [320, 640]
SMALL_PHOTOS = [
    "photos/webp_gallery_tree.webp",
    "photos/flower_exif_icc.webp",
    "photos/pixel4a_paris_exif_after_idat.png",
    "photos/embedgravitybird_rgba.png",
]


@pytest.fixture(autouse=True)
def gc_settings(settings):
    settings.PICSITE_ITEM_RETRY_BASE_S = 0.02
    settings.PICSITE_ITEM_RETRY_CAP_S = 0.1
    settings.PICSITE_VARIANT_GC_GRACE_DAYS = 7


# --- building a library by hand ----------------------------------------------------------------


def hexdigest(seed: str, *, length: int = 32) -> str:
    return hashlib.sha256(seed.encode()).hexdigest()[:length]


def payload(key: str) -> bytes:
    return (key + "|").encode() * 3  # distinct per key, sizes differ


def put(store, keys: list[str]) -> int:
    """Store each key (put-if-absent); returns the bytes stored."""
    for key in keys:
        store.put(key, payload(key), "image/avif")
    return sum(len(payload(k)) for k in keys)


def make_image(media_root: Path, seed: str, *, deleted_ago: timedelta | None = None) -> Image:
    digest = hexdigest(seed)
    name = f"originals/{digest}.jpg"
    data = b"original bytes of " + seed.encode()
    (media_root / "originals").mkdir(parents=True, exist_ok=True)
    (media_root / name).write_bytes(data)
    return Image.objects.create(
        original=name, image_key="variants/" + digest, original_bytes=len(data), width=1000, height=800,
        deleted_at=timezone.now() - deleted_ago if deleted_ago is not None else None,
    )  # fmt: skip


def set_keys(image: Image, store, *, tag: str, widths=WIDTHS) -> list[str]:
    kv = hexdigest(tag, length=12) if tag else ""
    return [
        variant_key(folder=store.folder, image_key=image.image_key, width=w, fmt=fmt, key_version=kv)
        for w in widths
        for fmt in ("avif", "webp")
    ]


def make_set(image: Image, store, *, state: str, tag: str, superseded_ago: timedelta | None = None, widths=WIDTHS) -> tuple[VariantSet, list[str]]:
    """A set row (committed first, as the pipeline does) and its objects in ``store``."""
    vset = VariantSet.objects.create(
        image=image, state=state, recipe_version=f"r-{tag}", key_version=hexdigest(tag, length=12) if tag else "",
        storage_kind=store.kind, folder=store.folder, widths=list(widths), formats=["avif", "webp"],
        ready_max_width=max(widths),
        superseded_at=timezone.now() - superseded_ago if superseded_ago is not None else None,
    )  # fmt: skip
    keys = set_keys(image, store, tag=tag, widths=widths)
    VariantSet.objects.filter(pk=vset.pk).update(bytes=put(store, keys))
    if state == "serving":
        Image.objects.filter(pk=image.pk).update(serving_set=vset, ready_max_width=max(widths), variants_ready=True)
    return vset, keys


def age_local(store, keys: list[str], ago: timedelta = OLD) -> None:
    when = time.time() - ago.total_seconds()
    for key in keys:
        os.utime(Path(store.root) / key, (when, when))


def local_keys(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def s3_keys(client, bucket: str) -> set[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {obj["Key"] for page in pages for obj in page.get("Contents", ())}


def drain(run_id: int, *, rounds: int = 400) -> AdminTaskRun:
    for _ in range(rounds):
        run = engine.kick(run_id=run_id)
        if run.status not in RunStatus.runnable():
            return run
        time.sleep(0.02)
    raise AssertionError(f"run {run_id} did not finish: {AdminTaskRun.objects.get(pk=run_id).status}")


def gc_run(scope: dict | None = None) -> AdminTaskRun:
    return drain(engine.create(task_key=GC, scope=scope or {}).pk)


def foreign_keys(store) -> list[str]:
    """Objects another app keeps in the same bucket/root: never ours, whatever their age."""
    digest = hexdigest("foreign")
    other_shard = "00" if not digest.startswith("00") else "01"
    return [
        f"{store.folder}/variants/readme.txt",
        f"{store.folder}/other/{digest}_320.avif",
        f"elsewhere/variants/{digest[:2]}/{digest}_{'a' * 12}_320.avif",  # our pattern, another folder
        f"{store.folder}/variants/{digest[:2]}/{digest}_{'a' * 12}_320.jpg",  # not our format
        f"{store.folder}/variants/{digest[:2]}/{digest}_{'a' * 12}_320.avif.bak",
        f"{store.folder}/variants/{other_shard}/{digest}_{'a' * 12}_320.avif",  # shard != digest
        f"{store.folder}/variants/{digest.upper()}_320.avif",
    ]


# --- exactly what it should ------------------------------------------------------------------


def test_gc_deletes_exactly_what_it_should_on_local_disk(local_storage, variant_root, media_root):
    store = local_storage
    a = make_image(media_root, "alive")
    serving, serving_keys = make_set(a, store, state="serving", tag="a-serving")
    _, superseded_old = make_set(a, store, state="superseded", tag="a-old", superseded_ago=OLD)
    _, superseded_recent = make_set(a, store, state="superseded", tag="a-recent", superseded_ago=timedelta(days=1))
    _, candidate_keys = make_set(a, store, state="candidate", tag="a-candidate")
    # A collector that stopped half way left this one reclaiming: finished whatever its age.
    _, reclaiming_keys = make_set(a, store, state="reclaiming", tag="a-reclaiming", superseded_ago=timedelta(days=1))
    orphan_old = set_keys(a, store, tag="a-orphan-old")
    orphan_new = set_keys(a, store, tag="a-orphan-new")
    put(store, orphan_old + orphan_new)

    # A legacy (unversioned) serving set, and an unversioned width no set names.
    legacy = make_image(media_root, "legacy")
    _, legacy_keys = make_set(legacy, store, state="serving", tag="")
    legacy_orphan = [variant_key(folder=store.folder, image_key=legacy.image_key, width=999, fmt="webp")]
    put(store, legacy_orphan)

    # A superseded set past grace that lives in another folder: deleted where it lives.
    elsewhere = variant_store_for(kind="local", folder="oldfolder")
    _, elsewhere_keys = make_set(a, elsewhere, state="superseded", tag="a-elsewhere", superseded_ago=OLD)

    # Soft-deleted photos: one past the grace (purged: leftovers of any age, original, row),
    # one within it (kept; only its old leftovers are orphans).
    gone = make_image(media_root, "deleted-old", deleted_ago=OLD)
    gone_leftovers = set_keys(gone, store, tag="d-old") + set_keys(gone, store, tag="d-new")
    put(store, gone_leftovers)
    kept = make_image(media_root, "deleted-recent", deleted_ago=timedelta(days=1))
    kept_old_leftovers, kept_new_leftovers = set_keys(kept, store, tag="k-old"), set_keys(kept, store, tag="k-new")
    put(store, kept_old_leftovers + kept_new_leftovers)

    # Objects of a photo that has no row at all.
    nobody = Image(image_key="variants/" + hexdigest("no row"))
    rowless_old, rowless_new = set_keys(nobody, store, tag="n-old"), set_keys(nobody, store, tag="n-new")
    put(store, rowless_old + rowless_new)

    foreign = foreign_keys(store)
    put(store, foreign)

    everything = local_keys(variant_root)
    young = set(orphan_new + gone_leftovers[4:] + kept_new_leftovers + rowless_new)
    age_local(store, [k for k in everything if k not in young and not k.startswith("oldfolder/")])
    age_local(elsewhere, elsewhere_keys)
    # Set rows and grace are about rows, not object times: the candidate's and serving
    # set's objects are as old as anything else here.

    deleted = set(
        superseded_old + reclaiming_keys + orphan_old + legacy_orphan + elsewhere_keys + gone_leftovers
        + kept_old_leftovers + rowless_old
    )  # fmt: skip
    assert deleted <= everything
    gone_original = media_root / gone.original.name

    run = gc_run()

    assert run.status == RunStatus.SUCCEEDED and run.failed == 0
    assert local_keys(variant_root) == everything - deleted
    survivors = set(serving_keys + superseded_recent + candidate_keys + legacy_keys + orphan_new + kept_new_leftovers + rowless_new + foreign)
    assert local_keys(variant_root) == survivors
    assert set(VariantSet.objects.values_list("recipe_version", flat=True)) == {
        "r-a-serving", "r-a-recent", "r-a-candidate", "r-",
    }  # fmt: skip
    assert Image.objects.get(pk=a.pk).serving_set_id == serving.pk
    assert set(Image.objects.values_list("pk", flat=True)) == {a.pk, legacy.pk, kept.pk}
    assert not gone_original.exists()
    assert (media_root / kept.original.name).exists() and (media_root / a.original.name).exists()
    # spent counts what was reclaimed: every object (the original is one) and its bytes.
    assert run.spent_writes == len(deleted) + 1
    assert run.spent_bytes == sum(len(payload(k)) for k in deleted) + gone.original_bytes

    again = gc_run()
    assert again.status == RunStatus.SUCCEEDED and again.spent_writes == 0 and again.succeeded == 0
    assert local_keys(variant_root) == survivors


@pytest.mark.s3
def test_gc_on_s3_with_no_grace_keeps_every_named_object_and_foreign_ones(
    settings, s3_storage, s3_client, s3_bucket, media_root
):
    settings.PICSITE_VARIANT_GC_GRACE_DAYS = 0
    store = s3_storage
    a = make_image(media_root, "alive")
    _, serving_keys = make_set(a, store, state="serving", tag="serving")
    _, candidate_keys = make_set(a, store, state="candidate", tag="candidate", widths=[320, 640, 800])
    _, superseded_keys = make_set(a, store, state="superseded", tag="superseded", superseded_ago=timedelta(seconds=5))
    orphans = set_keys(a, store, tag="orphan")
    gone = make_image(media_root, "deleted", deleted_ago=timedelta(seconds=5))
    leftovers = set_keys(gone, store, tag="leftover")
    rowless = set_keys(Image(image_key="variants/" + hexdigest("no row")), store, tag="x")
    foreign = foreign_keys(store)
    put(store, orphans + leftovers + rowless + foreign)
    time.sleep(1.1)  # S3 keeps LastModified in whole seconds: let every object be in the past

    run = gc_run()

    assert run.status == RunStatus.SUCCEEDED and run.failed == 0
    assert s3_keys(s3_client, s3_bucket) == set(serving_keys + candidate_keys + foreign)
    assert set(VariantSet.objects.values_list("state", flat=True)) == {"serving", "candidate"}
    assert not Image.objects.filter(pk=gone.pk).exists()
    assert not (media_root / gone.original.name).exists()
    deleted = superseded_keys + orphans + leftovers + rowless
    assert run.spent_writes == len(deleted) + 1
    assert run.spent_bytes == sum(len(payload(k)) for k in deleted) + gone.original_bytes


# --- never what a serving or candidate set names, with a backfill writing -------------------


def test_gc_running_beside_a_backfill_never_deletes_a_named_object(settings, local_storage, variant_root, corpus):
    """A new recipe makes every photo stale; the backfill builds candidates beside the serving
    sets and switches them in while the collector runs again and again with no grace. Every
    object a serving or candidate set names stays; what the switch superseded is reclaimed.
    (The integrity audit also checks, after every commit that changes what a photo serves,
    that each object it advertises exists.)"""
    settings.PICSITE_VARIANT_WIDTHS = [320, 480, 640]
    images = [image_ingest(data=(corpus / rel).read_bytes(), filename=rel).image for rel in SMALL_PHOTOS]
    first = drain(engine.create(task_key="preprocess-images", scope={}).pk)
    assert first.status == RunStatus.SUCCEEDED and first.failed == 0
    before = {key for image in images for key in served_keys(image)}
    assert before <= local_keys(variant_root)

    settings.PICSITE_VARIANT_GC_GRACE_DAYS = 0
    settings.PICSITE_AVIF_QUALITY = settings.PICSITE_AVIF_QUALITY - 7  # a new recipe: every photo is stale
    backfill_done = threading.Event()
    gc_runs: list[AdminTaskRun] = []
    errors: list[BaseException] = []

    def backfill() -> None:
        try:
            run = drain(engine.create(task_key="preprocess-images", scope={"stale": True}).pk)
            assert run.status == RunStatus.SUCCEEDED and run.failed == 0, run.recent_issues
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
        finally:
            backfill_done.set()
            connection.close()

    def collector() -> None:
        try:
            while not backfill_done.is_set():
                gc_runs.append(gc_run())
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    # Beside the runs, the shards of these photos are collected over and over (as a worker
    # would, one shard at a time), so listings keep falling between a candidate's row and
    # its objects, and between its objects and its switch.
    shards = [KeyShard(id=int(i.image_key[9:11], 16) + 1, prefix=i.image_key[9:11]) for i in images]
    passes = []

    def hammer() -> None:
        try:
            while not backfill_done.is_set():
                for shard in shards:
                    try:
                        variants_gc.process(shard, lambda: None, {"mode": "all"})
                    except ItemFailure as exc:
                        assert exc.code == "image_busy", exc.message  # a generation holds the photo
                passes.append(1)
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=f) for f in (backfill, collector, hammer)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert not errors, errors
    assert gc_runs and all(r.status == RunStatus.SUCCEEDED and r.failed == 0 for r in gc_runs)

    stored = local_keys(variant_root)
    for vset in VariantSet.objects.filter(state__in=["serving", "candidate"]).select_related("image"):
        missing = set(variant_set_keys(vset)) - stored
        assert not missing, f"{vset} lost {sorted(missing)}"
    after = {key for image in images for key in served_keys(image)}
    assert after <= stored and after.isdisjoint(before)  # every photo serves the new recipe

    final = gc_run()  # what the last switches superseded goes too
    assert final.status == RunStatus.SUCCEEDED and final.failed == 0
    assert not VariantSet.objects.exclude(state="serving").exists()
    assert local_keys(variant_root) == after


class WritesWhileListing:
    """The real store, but its first listing of ``shard`` lets a generation run up to the
    listing: under the photo's claim it commits a candidate set, stores its first tier and
    lets the claim go (the attempt stopped there), all after the collector started."""

    def __init__(self, inner, *, image: Image, tag: str):
        self.inner, self.image, self.tag = inner, image, tag
        self.kind, self.folder = inner.kind, inner.folder
        self.keys: list[str] = []

    def list(self, prefix: str):
        if not self.keys and prefix.endswith(self.image.image_key[9:11]):
            token = _claim(self.image.pk, seconds=60)
            self.keys = make_set(self.image, self.inner, state="candidate", tag=self.tag, widths=[320])[1]
            age_local(self.inner, self.keys)  # as old as anything: only its row protects it
            _release(self.image.pk, token)
        return self.inner.list(prefix)

    def delete_many(self, keys, *, on_error=None):
        return self.inner.delete_many(keys, on_error=on_error)


def test_a_candidate_stored_while_the_shard_is_being_collected_survives(
    settings, monkeypatch, local_storage, variant_root, media_root
):
    settings.PICSITE_VARIANT_GC_GRACE_DAYS = 0
    image = make_image(media_root, "alive")
    _, serving_keys = make_set(image, local_storage, state="serving", tag="serving")
    store = WritesWhileListing(local_storage, image=image, tag="candidate")
    monkeypatch.setattr(variants_gc, "_current_store", lambda: store)

    run = gc_run()

    assert store.keys and run.status == RunStatus.SUCCEEDED and run.spent_writes == 0
    assert local_keys(variant_root) == set(serving_keys + store.keys)


# --- claims, outages, preview -------------------------------------------------------------------


def test_an_image_being_processed_is_left_until_its_claim_ends(local_storage, variant_root, media_root):
    image = make_image(media_root, "busy")
    orphans = set_keys(image, local_storage, tag="orphan")
    put(local_storage, orphans)
    age_local(local_storage, orphans)
    token = _claim(image.pk, seconds=60)
    try:
        run = engine.create(task_key=GC, scope={})
        for _ in range(60):  # every shard once, and the busy one again after its backoff
            run = engine.kick(run_id=run.pk, time_budget_s=1.0)
            if run.processed == 255:
                break
        assert run.status == RunStatus.RUNNING  # the busy shard waits to be retried
        busy = [issue for issue in run.recent_issues if issue.get("code") == "image_busy"]
        assert busy and str(image.pk) in busy[0]["message"] and run.failed == 0
        assert set(orphans) <= local_keys(variant_root)
    finally:
        _release(image.pk, token)
    run = drain(run.pk)
    assert run.status == RunStatus.SUCCEEDED and run.failed == 0
    assert local_keys(variant_root) == set()


@pytest.mark.s3
def test_an_unreachable_bucket_pauses_the_run(settings, s3_storage):
    from tests.conftest import free_port

    settings.PICSITE_S3_ENDPOINT_URL = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    settings.PICSITE_S3_TIMEOUT_S = 2
    settings.PICSITE_STORAGE_OUTAGE_THRESHOLD = 2
    run = engine.kick(run_id=engine.create(task_key=GC, scope={}).pk)
    assert run.status == RunStatus.PAUSED and run.pause_reason == "storage_unavailable"
    assert run.failed == 0


def test_preview_reports_what_a_run_then_reclaims(staff_client, local_storage, variant_root, media_root):
    store = local_storage
    a = make_image(media_root, "alive")
    make_set(a, store, state="serving", tag="serving")
    _, superseded = make_set(a, store, state="superseded", tag="superseded", superseded_ago=OLD)
    make_set(a, store, state="superseded", tag="recent", superseded_ago=timedelta(days=1))
    gone = make_image(media_root, "deleted", deleted_ago=OLD)
    orphan_old, orphan_new = set_keys(a, store, tag="orphan-old"), set_keys(a, store, tag="orphan-new")
    put(store, orphan_old + orphan_new)
    age_local(store, orphan_old)

    body = staff_client.get(f"{PREFIX}/preview-count").json()
    assert body["task_key"] == GC and body["count"] == 256  # one item per shard of the key space
    details = body["details"]
    assert details["orphans_counted"] is True
    assert details["superseded_sets"] == {"sets": 1, "objects": 4, "bytes": sum(len(payload(k)) for k in superseded)}
    assert details["deleted_images"] == {"images": 1, "objects": 1, "bytes": gone.original_bytes}
    assert details["orphans"]["objects"] == len(orphan_old)
    assert details["orphans"]["bytes"] == sum(len(payload(k)) for k in orphan_old)
    assert details["objects"] == 4 + 1 + len(orphan_old)
    assert "to reclaim" in details["summary"]

    skipped = staff_client.get(f"{PREFIX}/preview-count", {"skip_orphans": "true"}).json()
    assert skipped["scope"] == {"mode": "no_orphans"}
    assert skipped["details"]["orphans_counted"] is False and skipped["details"]["objects"] == 5

    run = gc_run()
    assert (run.spent_writes, run.spent_bytes) == (details["objects"], details["bytes"])


def test_skip_orphans_scope_lists_nothing(local_storage, variant_root, media_root):
    a = make_image(media_root, "alive")
    _, superseded = make_set(a, local_storage, state="superseded", tag="superseded", superseded_ago=OLD)
    orphans = set_keys(a, local_storage, tag="orphan")
    put(local_storage, orphans)
    age_local(local_storage, orphans + superseded)
    run = gc_run({"skip_orphans": True})
    assert run.status == RunStatus.SUCCEEDED
    assert local_keys(variant_root) == set(orphans)


# --- surfaces -----------------------------------------------------------------------------------


def test_the_admin_page_has_a_card_for_it(staff_client, local_storage):
    html = staff_client.get("/admin/tasks/").content.decode()
    assert f'data-testid="panel-{GC}"' in html
    assert f'data-api-base="{PREFIX}/"' in html
    assert f'name="scope-{GC}" value="skip_orphans"' in html


def test_the_api_serves_its_routes(staff_client, local_storage):
    assert staff_client.get(f"{PREFIX}/preview-count").status_code == 200
    assert staff_client.get(f"{PREFIX}/runs").json() == {"active": [], "recent": []}
    response = staff_client.post(f"{PREFIX}/runs", {"scope": {"bogus": True}}, content_type="application/json")
    assert response.status_code == 400 and response.json()["error"]["details"] == {"field": "bogus"}


def test_the_openapi_document_lists_it(client):
    document = client.get("/api/v1/schema").json()
    for suffix in ("/preview-count", "/runs", "/runs/{run_id}", "/runs/{run_id}/cancel", "/tick"):
        assert PREFIX + suffix in document["paths"]
    params = {p["name"] for p in document["paths"][f"{PREFIX}/preview-count"]["get"]["parameters"]}
    assert params == {"skip_orphans"}
    assert "details" in document["components"]["schemas"]["Preview"]["properties"]


def test_the_command_dry_run_reports_and_changes_nothing(local_storage, variant_root, media_root):
    a = make_image(media_root, "alive")
    _, superseded = make_set(a, local_storage, state="superseded", tag="superseded", superseded_ago=OLD)
    out = io.StringIO()
    call_command("variants_gc", "--dry-run", stdout=out)
    text = out.getvalue()
    assert "Dry run" in text and "to reclaim: 4 objects" in text
    assert not AdminTaskRun.objects.exists()
    assert set(superseded) <= local_keys(variant_root)

    call_command("variants_gc", stdout=io.StringIO())
    assert local_keys(variant_root) == set()
    assert AdminTaskRun.objects.get(task_key=GC).status == RunStatus.SUCCEEDED


def test_it_refuses_to_start_without_variant_storage(settings):
    settings.PICSITE_VARIANT_STORAGE = "none"
    with pytest.raises(engine.StorageNotConfigured):
        engine.create(task_key=GC, scope={})
