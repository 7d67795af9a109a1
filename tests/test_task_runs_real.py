"""The two real tasks end to end through the engine: corpus photos, bad files placed
straight into the library, S3 behind a fault-injecting proxy, the upload/backfill
claim, metadata refresh outcomes, and the django-q2 drain job."""

from __future__ import annotations

import inspect
import io
import threading
import time
from datetime import timedelta

import pytest
from django.db import OperationalError, connection
from django.utils import timezone
from django_q.models import OrmQ
from PIL import Image as PILImage

from gallery import imaging
from gallery.models import Image, StorageHealth
from gallery.services import (
    _claim,
    _release,
    image_ingest,
    image_soft_delete,
    variant_recipe_current,
)
from tasks import engine
from tasks.jobs import drain_run_job, tick_all_job
from tasks.models import AdminTaskBatch, AdminTaskItem, ItemState, RunStatus
from tests.fault_proxy import FaultProxy
from tests.variants_support import served_key, served_keys

pytestmark = pytest.mark.django_db(transaction=True)

SMALL_PHOTOS = [
    "photos/webp_gallery_tree.webp",
    "photos/flower_exif_icc.webp",
    "photos/pixel4a_paris_exif_after_idat.png",
    "photos/embedgravitybird_rgba.png",
]


@pytest.fixture(autouse=True)
def fast_retries(settings):
    settings.PICSITE_ITEM_RETRY_BASE_S = 0.05
    settings.PICSITE_ITEM_RETRY_CAP_S = 0.2


def ingest(corpus, rels) -> list[Image]:
    return [image_ingest(data=(corpus / r).read_bytes(), filename=r).image for r in rels]


def place_bad_files(corpus, media_root, names) -> list[Image]:
    """Bad bytes placed directly in the library (bypassing ingest's validation)."""
    rows = []
    for i, name in enumerate(names):
        rel = f"originals/placed-{i}-{name}"
        (media_root / "originals").mkdir(exist_ok=True)
        (media_root / rel).write_bytes((corpus / "bad" / name).read_bytes())
        rows.append(Image.objects.create(original=rel, title=name, image_key=f"variants/placed{i:028d}"))
    return rows


def drain(run_id, rounds=400):
    for _ in range(rounds):
        run = engine.kick(run_id=run_id)
        if run.status not in RunStatus.runnable():
            return run
        time.sleep(0.05)
    raise AssertionError("run did not finish")


def test_bad_files_in_library_fail_alone_and_run_succeeds(corpus, local_storage, media_root):
    good = ingest(corpus, SMALL_PHOTOS)
    bad_names = ["truncated_photo.jpg", "html_error_page.png", "bomb_png_65536x65536.png", "zero_bytes.jpg"]
    bad = place_bad_files(corpus, media_root, bad_names)
    run = engine.create(task_key="preprocess-images", scope={})
    assert run.total == len(good) + len(bad)
    run = drain(run.pk)
    assert run.status == RunStatus.SUCCEEDED
    assert (run.succeeded, run.failed, run.processed) == (len(good), len(bad), run.total)
    failed = {i.item_id: i for i in AdminTaskItem.objects.filter(run=run)}
    assert set(failed) == {b.pk for b in bad}
    for item in failed.values():
        assert item.state == ItemState.FAILED and item.last_error_stage == "decode"
        assert item.attempts == 1  # undecodable bytes are not retried
        assert item.last_error_code in {"truncated", "not_an_image", "too_many_pixels", "empty_file", "corrupt"}
    codes = {i["code"] for i in run.recent_issues}
    assert codes <= {"truncated", "not_an_image", "too_many_pixels", "empty_file", "corrupt"}
    assert Image.objects.filter(pk__in=[g.pk for g in good], variants_ready=True).count() == len(good)


def test_s3_faults_are_retried_and_invariant_holds_throughout(corpus, settings, s3_storage, s3_client, s3_bucket, moto_server):
    images = ingest(corpus, SMALL_PHOTOS)
    violations: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        # Every moment: each advertised tier has both objects in the bucket.
        try:
            while not stop.is_set():
                for img in images:
                    for key in served_keys(img):
                        listing = s3_client.list_objects_v2(Bucket=s3_bucket, Prefix=key)
                        if listing.get("KeyCount", 0) == 0:
                            violations.append(f"{img.pk}: {key} advertised but missing")
                time.sleep(0.05)
        finally:
            connection.close()

    with FaultProxy(moto_server, fail_share=0.3, stall_share=0.1, stall_s=2.5) as proxy:
        settings.PICSITE_S3_ENDPOINT_URL = proxy.url
        settings.PICSITE_S3_TIMEOUT_S = 1
        settings.PICSITE_ITEM_MAX_ATTEMPTS = 8
        settings.PICSITE_STORAGE_OUTAGE_THRESHOLD = 50
        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            run = drain(engine.create(task_key="preprocess-images", scope={}).pk)
        finally:
            stop.set()
            watcher.join(30)
        stats = dict(proxy.stats)
    assert stats["failed"] > 0 and stats["stalled"] > 0, stats
    assert not violations, violations[:5]
    assert run.status == RunStatus.SUCCEEDED, run.last_error
    assert run.succeeded == len(images) and run.failed == 0
    assert Image.objects.filter(variants_ready=True).count() == len(images)


def _distinct_photos(n: int) -> list[bytes]:
    """n small, different JPEGs (400 px wide: one 320 tier each)."""
    out = []
    for i in range(n):
        img = PILImage.new("RGB", (400, 300), (i * 10 % 256, 255 - i * 7 % 256, i * 13 % 256))
        img.paste((i * 31 % 256, 40, 200), (i * 8, 20, i * 8 + 60, 140))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def test_storage_outage_pauses_the_run_and_it_finishes_by_itself_when_storage_is_back(corpus, settings, s3_storage, moto_server):
    """Default settings (outage threshold 8, batches of 4) and two workers. The failure count
    used to be local to a batch (4 < 8), so every image burned its attempts and the run ended
    succeeded with all of them failed."""
    photos = _distinct_photos(24)
    images = [image_ingest(data=data, filename=f"outage-{i}.jpg").image for i, data in enumerate(photos)]
    settings.PICSITE_OUTAGE_PROBE_BASE_S = 0  # probe at every tick (the schedule's minute, here)
    threshold, batch = settings.PICSITE_STORAGE_OUTAGE_THRESHOLD, engine._definition("preprocess-images").batch_size
    workers = 2
    with FaultProxy(moto_server, fail_share=1.0) as proxy:
        settings.PICSITE_S3_ENDPOINT_URL = proxy.url
        run = engine.create(task_key="preprocess-images", scope={})

        def worker() -> None:
            try:
                for _ in range(100):
                    if engine.kick(run_id=run.pk).status not in RunStatus.runnable():
                        return
            finally:
                connection.close()

        threads = [threading.Thread(target=worker) for _ in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        run.refresh_from_db()
        assert (run.status, run.pause_reason) == (RunStatus.PAUSED, "storage_unavailable"), run.recent_issues[:3]
        charged = AdminTaskItem.objects.filter(run=run, attempts__gt=0).count()
        assert 0 < charged <= threshold + workers * batch
        assert run.failed == 0
        assert Image.objects.exclude(variants_error="").count() <= charged
        # Still down: the scheduled tick probes, finds it down, and leaves the run paused.
        tick_all_job()
        run.refresh_from_db()
        assert run.status == RunStatus.PAUSED
        assert StorageHealth.objects.get(name="variants").failed_probes == 1

        proxy.fail_share = 0.0  # the bucket is back
        for _ in range(20):
            tick_all_job()
            run.refresh_from_db()
            if run.status not in (*RunStatus.runnable(), RunStatus.PAUSED):
                break
    assert run.status == RunStatus.SUCCEEDED, (run.status, run.recent_issues[:3])
    assert (run.succeeded, run.failed) == (len(images), 0)
    assert Image.objects.filter(variants_ready=True, variants_error="").count() == len(images)


def test_storage_config_removed_mid_run_fails_run(corpus, settings, local_storage):
    ingest(corpus, SMALL_PHOTOS)
    run = engine.create(task_key="preprocess-images", scope={})
    settings.PICSITE_VARIANT_STORAGE = "none"
    run = drain(run.pk)
    assert run.status == RunStatus.FAILED and "PICSITE_VARIANT_STORAGE" in run.last_error


def test_upload_job_claim_keeps_backfill_off_the_image(corpus, local_storage):
    (img,) = ingest(corpus, SMALL_PHOTOS[:1])
    token = _claim(img.pk, seconds=60)  # an upload's job is generating it right now
    run = engine.create(task_key="preprocess-images", scope={})
    run = engine.kick(run_id=run.pk)
    item = AdminTaskItem.objects.get(run=run, item_id=img.pk)
    assert item.state == ItemState.RETRYING and item.last_error_code == "busy" and item.attempts == 0
    assert not Image.objects.get(pk=img.pk).variants_ready
    _release(img.pk, token)
    run = drain(run.pk)
    assert run.status == RunStatus.SUCCEEDED and run.succeeded == 1


def test_metadata_refresh_outcomes(corpus, local_storage):
    images = ingest(corpus, ["photos/canon_sx60_orientation6.jpg", "photos/flower_exif_icc.webp"])
    Image.objects.filter(pk=images[0].pk).update(camera_model="wrong", width=1, height=1)
    run = drain(engine.create(task_key="metadata-refresh", scope={}).pk)
    assert run.status == RunStatus.SUCCEEDED
    assert (run.succeeded, run.skipped, run.failed) == (1, 1, 0)
    fixed = Image.objects.get(pk=images[0].pk)
    assert (fixed.width, fixed.height) == (1536, 2048) and "SX60" in fixed.camera_model


def test_metadata_refresh_missing_original_is_coded_failure(corpus, local_storage, media_root):
    (img,) = ingest(corpus, ["photos/flower_exif_icc.webp"])
    (media_root / img.original.name).unlink()
    run = drain(engine.create(task_key="metadata-refresh", scope={"image_ids": [img.pk]}).pk)
    assert run.status == RunStatus.SUCCEEDED and run.failed == 1
    assert AdminTaskItem.objects.get(run=run).last_error_code == "missing_original"


def test_drain_job_kicks_and_requeues_itself(corpus, settings, local_storage):
    ingest(corpus, SMALL_PHOTOS)
    settings.PICSITE_DRAIN_SLICE_S = 0.01  # one item per slice
    run = engine.create(task_key="preprocess-images", scope={})
    assert drain_run_job(run.pk) == "continued"
    assert OrmQ.objects.filter(key="backfill").count() == 1
    settings.PICSITE_DRAIN_SLICE_S = 60
    assert drain_run_job(run.pk) == RunStatus.SUCCEEDED


def test_serverless_tick_starts_a_run_for_new_images_only(corpus, local_storage, media_root):
    (good,) = ingest(corpus, SMALL_PHOTOS[:1])
    place_bad_files(corpus, media_root, ["truncated_photo.jpg"])
    run = engine.tick(task_key="preprocess-images", create_if_idle=True)
    assert run is not None and run.scope == {"mode": "new"}
    run = drain(run.pk)
    assert (run.status, run.succeeded, run.failed) == (RunStatus.SUCCEEDED, 1, 1)
    bad = Image.objects.get(title="truncated_photo.jpg")
    assert bad.variants_error.startswith("decode/")  # the reason is kept on the image
    # The bad file is not picked up again by every later tick; nothing else is new.
    assert engine.tick(task_key="preprocess-images", create_if_idle=True) is None
    assert engine.tick(task_key="preprocess-images") is None


@pytest.mark.parametrize("scope_of", [lambda img: {"force": True}, lambda img: {"image_ids": [img.pk]}])
def test_force_and_explicit_ids_regenerate_current_variants(corpus, local_storage, scope_of, integrity_audit):
    (image,) = ingest(corpus, SMALL_PHOTOS[:1])
    assert drain(engine.create(task_key="preprocess-images", scope={}).pk).succeeded == 1
    image.refresh_from_db()
    assert image.variants_ready
    # The bucket lost an object: the default scope sees nothing to do...
    widths = variant_recipe_current().tier_widths(image.width)
    lost = served_key(image, width=widths[-1], fmt="avif")
    local_storage.delete(lost)
    assert not local_storage.exists(lost)
    with pytest.raises(engine.EmptyScope):
        engine.create(task_key="preprocess-images", scope={})
    # ...while force (or naming the image) regenerates it rather than skipping it.
    run = drain(engine.create(task_key="preprocess-images", scope=scope_of(image)).pk)
    assert (run.status, run.succeeded, run.skipped) == (RunStatus.SUCCEEDED, 1, 0)
    assert run.spent_bytes > 0 and local_storage.exists(lost)
    # The integrity audit saw the lost object while the repair was under way, and nothing else.
    assert {entry["details"]["key"] for entry in integrity_audit.take()} == {lost}
    image.refresh_from_db()
    assert image.variants_ready and image.ready_max_width == widths[-1]


def test_deadline_inside_decode_is_a_retryable_timeout_not_a_corrupt_file(corpus, local_storage, monkeypatch):
    """The item deadline raised by the cancel check while the decoder runs must pass every
    error mapper untouched: a timeout is retryable, never a verdict on the file."""
    (image,) = ingest(corpus, SMALL_PHOTOS[:1])
    run = engine.create(task_key="preprocess-images", scope={})
    checks_in_decode = 0
    real_check = engine._CancelCheck.__call__

    def deadline_on_second_check_in_decode(self):
        nonlocal checks_in_decode
        if any(frame.filename.endswith("gallery/imaging/decode.py") for frame in inspect.stack()[1:4]):
            checks_in_decode += 1
            if checks_in_decode == 2:
                self.deadline = 0.0  # the item's time is up from here on: no sleeps involved
        return real_check(self)

    monkeypatch.setattr(engine._CancelCheck, "__call__", deadline_on_second_check_in_decode)
    run = engine.kick(run_id=run.pk, max_batches=1)
    assert checks_in_decode >= 2
    item = AdminTaskItem.objects.get(run=run, item_id=image.pk)
    assert (item.last_error_code, item.last_error_stage) == ("timeout", "process")
    assert item.state == ItemState.RETRYING and run.failed == 0
    assert Image.objects.get(pk=image.pk).variants_error == ""


@pytest.mark.parametrize("path", ["adopted", "retry"])
def test_deleted_image_is_not_regenerated_by_adopted_or_retry_batches(corpus, local_storage, media_root, variant_root, path):
    """Retry and adopted batches loaded their items with Image.objects.all(), so a photo
    deleted mid-run was regenerated and its variants became public again."""
    doomed, kept = ingest(corpus, SMALL_PHOTOS[:2])
    run = engine.create(task_key="preprocess-images", scope={})
    if path == "adopted":  # a worker claimed both, then died
        claim = engine._claim_batch(run.pk, engine._definition("preprocess-images"), "worker-a")
        assert set(claim.item_ids) == {doomed.pk, kept.pk}
        AdminTaskBatch.objects.filter(pk=claim.batch_id).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    else:  # the first attempt could not read the original; it is back for the retry
        original = media_root / doomed.original.name
        data = original.read_bytes()
        original.unlink()
        run = engine.kick(run_id=run.pk)
        assert AdminTaskItem.objects.get(run=run, item_id=doomed.pk).state == ItemState.RETRYING
        original.write_bytes(data)
    image_soft_delete(image=Image.objects.get(pk=doomed.pk))
    run = drain(run.pk)
    assert run.status == RunStatus.SUCCEEDED
    doomed.refresh_from_db()
    assert (doomed.variants_ready, doomed.ready_max_width) == (False, 0)
    assert list(variant_root.rglob(doomed.image_key.split("/")[-1] + "_*")) == []
    assert Image.objects.get(pk=kept.pk).variants_ready


def test_images_whose_job_was_never_enqueued_are_picked_up_by_the_scheduled_tick(corpus, settings, local_storage, media_root, monkeypatch):
    """A queue failure after commit leaves images pending (their originals intact); the
    scheduled tick starts a run for images pending longer than a few minutes, so they get
    their variants with no operator action."""
    import dispatch.django_q2

    def queue_down(*args, **kwargs):
        raise OperationalError("simulated: the queue table is unreachable")

    monkeypatch.setattr(dispatch.django_q2, "enqueue_many", queue_down)
    settings.PICSITE_PENDING_RESCUE_AFTER_S = 300
    from gallery.importer import IngestSource, ingest_uploads

    paths = [corpus / rel for rel in SMALL_PHOTOS[:2]]
    report = ingest_uploads(sources=[IngestSource(name=p.name, read=p.read_bytes, size=p.stat().st_size) for p in paths])
    images = [item.image for item in report.imported]
    assert len(images) == 2 and all((media_root / img.original.name).exists() for img in images)
    monkeypatch.undo()  # the queue is back; nobody re-enqueues those two

    assert tick_all_job() == {}  # too fresh: their own jobs may still come
    Image.objects.filter(pk__in=[i.pk for i in images]).update(created_at=timezone.now() - timedelta(minutes=6))
    tick_all_job()
    tick_all_job()
    assert Image.objects.filter(pk__in=[i.pk for i in images], variants_ready=True).count() == 2
    assert all((media_root / img.original.name).exists() for img in images)


def test_a_pillow_without_avif_fails_the_run_at_once(corpus, local_storage, monkeypatch):
    """Without an AVIF encoder every image failed at encode, one retryable item at a time;
    the run now fails before its first item with a clear reason."""
    from PIL import Image as PILImageModule

    ingest(corpus, SMALL_PHOTOS)
    run = engine.create(task_key="preprocess-images", scope={})
    monkeypatch.delitem(PILImageModule.SAVE, "AVIF")
    imaging.encoder_problems.cache_clear()
    try:
        run = engine.kick(run_id=run.pk)
    finally:
        monkeypatch.undo()
        imaging.encoder_problems.cache_clear()
    assert run.status == RunStatus.FAILED and "AVIF" in run.last_error
    assert run.processed == 0 and not AdminTaskItem.objects.filter(run=run).exists()
