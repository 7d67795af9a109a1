"""The per-upload django-q2 job: success, a visible reason on failure, retries with
exponential backoff, and stepping aside while a backfill holds the image."""

from __future__ import annotations

import io
from datetime import timedelta

import pytest
from django.utils import timezone
from django_q.models import Schedule
from PIL import Image as PILImage

from gallery.jobs import generate_variants_job, upload_retry_delay
from gallery.models import Image
from gallery.services import _claim, image_ingest
from tests.variants_support import PipelineEvents

pytestmark = pytest.mark.django_db

PHOTO = "photos/flower_exif_icc.webp"
JOB = "gallery.jobs.generate_variants_job"


@pytest.fixture
def image(corpus, local_storage):
    return image_ingest(data=(corpus / PHOTO).read_bytes(), filename="flower.webp").image


def test_job_generates_variants(image):
    assert generate_variants_job(image.pk) == "ready"
    image.refresh_from_db()
    assert image.variants_ready and image.ready_max_width == 300 and image.variants_attempts == 1


def test_storage_failure_leaves_reason_and_schedules_backoff_retry(image, settings, variant_root):
    variant_root.parent.mkdir(parents=True, exist_ok=True)
    variant_root.write_bytes(b"")  # a file where the folder should be: every put fails (even as root)
    before = timezone.now()
    assert generate_variants_job(image.pk, 1) == "retrying"
    image.refresh_from_db()
    assert not image.variants_ready
    assert image.variants_error.startswith("upload/variant_upload_failed")
    retry = Schedule.objects.get(func=JOB)
    assert retry.args == f"{image.pk},2"
    delay = (retry.next_run - before).total_seconds()
    assert settings.PICSITE_UPLOAD_RETRY_BASE_S * 0.8 <= delay <= settings.PICSITE_UPLOAD_RETRY_BASE_S * 1.2 + 1


def test_gives_up_after_max_attempts(image, settings):
    settings.PICSITE_VARIANT_STORAGE = "s3"
    settings.PICSITE_S3_BUCKET = ""
    assert generate_variants_job(image.pk, settings.PICSITE_UPLOAD_MAX_ATTEMPTS) == "storage_not_configured"
    assert "PICSITE_S3_BUCKET" in Image.objects.get(pk=image.pk).variants_error
    assert not Schedule.objects.filter(func=JOB).exists()


def test_undecodable_original_is_not_retried(image, media_root, corpus):
    (media_root / image.original.name).write_bytes((corpus / "bad/corrupt_header.jpg").read_bytes())
    assert generate_variants_job(image.pk) == "failed"
    assert Image.objects.get(pk=image.pk).variants_error.startswith("decode/")
    assert not Schedule.objects.filter(func=JOB).exists()


def test_busy_image_is_left_to_the_backfill_and_checked_later(image):
    _claim(image.pk, seconds=60)
    assert generate_variants_job(image.pk, 1) == "busy"
    retry = Schedule.objects.get(func=JOB)
    assert retry.args == f"{image.pk},1"  # a busy image does not use up an attempt
    assert retry.next_run > timezone.now() - timedelta(seconds=1)


def test_backoff_grows_exponentially(settings):
    settings.PICSITE_UPLOAD_RETRY_BASE_S = 10
    assert 8 <= upload_retry_delay(1) <= 12
    assert 32 <= upload_retry_delay(3) <= 48


def test_storage_outage_costs_upload_jobs_no_attempt_and_no_error(image, settings, variant_root):
    """Upload jobs share the outage state with runs (and with each other): once the storage
    is known to be down a job records no error and uses no attempt; it comes back when the
    storage does."""
    settings.PICSITE_OUTAGE_PROBE_BASE_S = 0
    others = [
        image_ingest(data=_small_jpeg(i), filename=f"other-{i}.jpg").image
        for i in range(settings.PICSITE_STORAGE_OUTAGE_THRESHOLD - 1)
    ]
    variant_root.parent.mkdir(parents=True, exist_ok=True)
    variant_root.write_bytes(b"")  # every put fails from now on
    for other in others:  # other uploads' jobs fail first (and may record their reason)
        assert generate_variants_job(other.pk, 1) == "retrying"
    assert generate_variants_job(image.pk, 2) == "storage_unavailable"
    image.refresh_from_db()
    assert image.variants_error == "" and not image.variants_ready
    retry = Schedule.objects.get(func=JOB, args__startswith=f"{image.pk},")
    assert retry.args == f"{image.pk},2"  # no attempt used
    variant_root.unlink()  # the storage is back
    assert generate_variants_job(image.pk, 2) == "ready"
    image.refresh_from_db()
    assert image.variants_ready and image.variants_error == ""


def _small_jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    PILImage.new("RGB", (64, 48), (i * 20 % 256, 90, 200)).save(buf, "JPEG")
    return buf.getvalue()


def test_first_tier_is_stored_and_served_before_the_big_decode(corpus, local_storage, monkeypatch):
    """A new upload shows as soon as possible: its job stores the smallest tier (both
    formats) from a shrink-on-load decode, and serves it, before the decode for the rest."""
    path = corpus / "photos/canon_sx60_orientation6.jpg"  # stored 2048x1536: tiers up to 1280
    image = image_ingest(data=path.read_bytes(), filename=path.name).image
    events = PipelineEvents().install(monkeypatch)
    served_at_decode = []
    events.on_decode = lambda im: served_at_decode.append(Image.objects.get(pk=image.pk).ready_max_width)
    assert generate_variants_job(image.pk) == "ready"
    assert events.log[:3] == [("decode", "JPEG", (512, 384)), ("put", "320.avif"), ("put", "320.webp")]
    assert events.log[3] == ("decode", "JPEG", (2048, 1536))
    assert served_at_decode == [0, 320]  # the big decode starts with the first tier served
