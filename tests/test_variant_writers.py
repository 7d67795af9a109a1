"""Who may write an image's variant state while it is being generated: a delete during
processing wins, a worker whose claim expired (and was taken over) writes nothing, and an
upload job waiting for the low-memory slot gives up at its deadline instead of outliving
its claim. Threads and real Postgres, so transactional."""

from __future__ import annotations

import fcntl
import tempfile
import threading
from pathlib import Path

import pytest
from django.db import connection
from django.utils import timezone

from gallery.jobs import generate_variants_job
from gallery.models import Image
from gallery.services import (
    ImageBusy,
    image_ingest,
    image_soft_delete,
    preprocess_image,
    variant_recipe_current,
)

pytestmark = pytest.mark.django_db(transaction=True)

SOURCE = "photos/webp_gallery_tree.webp"  # 1024 px wide: tiers 320, 480, 640, 800


def _ingest(corpus, rel: str = SOURCE) -> Image:
    path = corpus / rel
    return image_ingest(data=path.read_bytes(), filename=path.name).image


class PauseAfterFirstTier:
    """A cancel callback that blocks the worker once, right after its first tier is
    advertised, until the test lets it go; afterwards it records what a reader sees."""

    def __init__(self, image_id: int):
        self.image_id = image_id
        self.paused = threading.Event()
        self.resume = threading.Event()
        self.seen_after_resume: list[tuple[bool, int]] = []

    def __call__(self) -> None:
        ready, width = Image.objects.filter(pk=self.image_id).values_list("variants_ready", "ready_max_width").get()
        if self.resume.is_set():
            self.seen_after_resume.append((ready, width))
        elif width > 0:
            self.paused.set()
            assert self.resume.wait(60)


def _in_thread(fn, *args, **kwargs) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def target() -> None:
        try:
            result["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            result["error"] = exc
        finally:
            connection.close()

    thread = threading.Thread(target=target)
    thread.start()
    return thread, result


def _variant_files(variant_root: Path, image: Image) -> list[Path]:
    name = image.image_key.split("/")[-1]
    return sorted(variant_root.rglob(f"{name}_*"))


def test_delete_during_processing_wins(corpus, local_storage, variant_root):
    image = _ingest(corpus)
    pause = PauseAfterFirstTier(image.pk)
    worker, result = _in_thread(preprocess_image, image, local_storage, pause)
    assert pause.paused.wait(60), result
    image_soft_delete(image=Image.objects.get(pk=image.pk))
    pause.resume.set()
    worker.join(60)
    image.refresh_from_db()
    assert image.deleted_at is not None
    assert (image.variants_ready, image.ready_max_width) == (False, 0)
    assert _variant_files(variant_root, image) == []  # nothing public is left behind


def test_worker_that_lost_its_claim_cannot_lower_ready_width(corpus, local_storage):
    image = _ingest(corpus)
    widths = variant_recipe_current().tier_widths(image.width)
    slow = PauseAfterFirstTier(image.pk)
    worker, result = _in_thread(preprocess_image, image, local_storage, slow, force=True)
    assert slow.paused.wait(60), result
    # The slow worker's claim expires; another worker takes the image and finishes it.
    Image.objects.filter(pk=image.pk).update(processing_until=timezone.now() - timezone.timedelta(seconds=1))
    assert preprocess_image(Image.objects.get(pk=image.pk), local_storage, force=True).variants_ready
    slow.resume.set()
    worker.join(60)
    # Readers never saw a complete image lose tiers; the slow worker stopped, writing nothing.
    assert all(width == widths[-1] for ready, width in slow.seen_after_resume if ready), slow.seen_after_resume
    assert isinstance(result.get("error"), ImageBusy), result
    image.refresh_from_db()
    assert (image.variants_ready, image.ready_max_width) == (True, widths[-1])


def test_upload_job_waiting_for_the_low_memory_slot_gives_up_at_its_deadline(corpus, settings, local_storage):
    settings.PICSITE_LOW_MEMORY_PIXELS = 1  # every image takes the one-at-a-time slot
    settings.PICSITE_ITEM_TIME_LIMIT_S = 0.5
    image = _ingest(corpus)
    with open(Path(tempfile.gettempdir()) / "picsite-low-memory.lock", "a+b") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another worker is decoding a huge image
        job, result = _in_thread(generate_variants_job, image.pk, 1)
        job.join(30)
        stuck = job.is_alive()
        fcntl.flock(held, fcntl.LOCK_UN)
    job.join(60)
    assert not stuck, "the job waited past its deadline (and its claim) for the slot"
    assert result.get("value") == "retrying", result
    image.refresh_from_db()
    assert image.processing_token == "" and not image.variants_ready
    assert "timeout" in image.variants_error


def test_admin_delete_is_a_soft_delete_that_removes_public_variants(corpus, local_storage, variant_root, media_root, django_user_model, client):
    """The change form's Delete used to hard-delete the row, orphaning the original (it may
    carry GPS) and every public variant."""
    image = _ingest(corpus)
    assert preprocess_image(image, local_storage).variants_ready
    assert _variant_files(variant_root, image)
    admin = django_user_model.objects.create_superuser("deleter", password="pw-delete-123")
    client.force_login(admin)
    response = client.post(f"/admin/gallery/image/{image.pk}/delete/", {"post": "yes"})
    assert response.status_code == 302
    image.refresh_from_db()  # the row stays (restorable until purged) ...
    assert image.deleted_at is not None and (image.variants_ready, image.ready_max_width) == (False, 0)
    assert _variant_files(variant_root, image) == []  # ... but nothing of it is public any more
    assert (media_root / image.original.name).exists()
