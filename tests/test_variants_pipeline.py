"""preprocess_image against real storage (local disk, moto S3 over HTTP): the
ready_max_width invariant under a storage failure at every tier and format position,
resume after failure, object headers, and the unconfigured-storage message."""

from __future__ import annotations

import pytest
from PIL import Image as PILImage

from gallery import imaging
from gallery.models import Image
from gallery.services import (
    VariantGenerationError,
    image_ingest,
    preprocess_image,
    variant_recipe_current,
)
from gallery.storage import (
    CACHE_CONTROL,
    VariantStorageError,
    VariantStorageNotConfigured,
    variant_store_resolve,
)
from tests.variants_support import PipelineEvents, served_key, served_keys

pytestmark = pytest.mark.django_db

SOURCE = "photos/webp_gallery_tree.webp"  # 1024 px wide: tiers 320, 480, 640, 800


class FailingAt:
    """Wraps a real store; the put at ``position`` (0-based) raises."""

    def __init__(self, inner, position: int):
        self.inner, self.position, self.calls = inner, position, 0
        self.kind, self.folder = inner.kind, inner.folder

    def put(self, key, data, content_type):
        index, self.calls = self.calls, self.calls + 1
        if index == self.position:
            raise VariantStorageError(f"injected failure at put #{index} ({key})")
        return self.inner.put(key, data, content_type)

    def exists(self, key):
        return self.inner.exists(key)

    def delete(self, key):
        self.inner.delete(key)

    def delete_many(self, keys, *, on_error=None):
        return self.inner.delete_many(keys, on_error=on_error)

    def list(self, prefix):
        return self.inner.list(prefix)

    def url(self, key):
        return self.inner.url(key)


def _ingest(corpus, rel: str) -> Image:
    path = corpus / rel
    return image_ingest(data=path.read_bytes(), filename=path.name).image


def _assert_invariant(image: Image, store) -> None:
    """Both objects of every tier the serving set advertises (up to ready_max_width) exist."""
    image.refresh_from_db()
    keys = served_keys(image)
    assert len(keys) == 2 * len([w for w in (image.serving_set.widths if image.serving_set else []) if w <= image.ready_max_width])
    for key in keys:
        assert store.exists(key), f"ready_max_width={image.ready_max_width} but {key} is missing"
    widths = variant_recipe_current().tier_widths(image.width)
    assert image.ready_max_width == 0 or image.ready_max_width in widths


@pytest.fixture(params=["local", "s3"])
def store(request):
    return request.getfixturevalue(f"{request.param}_storage")


@pytest.mark.parametrize("position", range(8))
def test_failure_at_every_position_keeps_ready_max_width_honest(corpus, store, position):
    image = _ingest(corpus, SOURCE)
    widths = variant_recipe_current().tier_widths(image.width)
    assert widths == [320, 480, 640, 800]
    tier = position // 2
    with pytest.raises(VariantGenerationError) as info:
        preprocess_image(image, FailingAt(store, position))
    assert (info.value.stage, info.value.code) == ("upload", "variant_upload_failed")
    image.refresh_from_db()
    assert image.ready_max_width == (widths[tier - 1] if tier else 0)
    assert image.variants_ready is False
    assert image.blurhash and image.width == 1024 and image.height == 772
    _assert_invariant(image, store)
    # A retry resumes and finishes; the claim was released by the failed attempt.
    outcome = preprocess_image(image, store)
    assert outcome.variants_ready and outcome.tiers_written == widths[tier:]
    image.refresh_from_db()
    assert image.variants_ready and image.ready_max_width == 800 and image.variants_error == ""
    _assert_invariant(image, store)


def test_variant_objects_are_correct_and_idempotent(corpus, store):
    image = _ingest(corpus, "photos/canon_sx60_orientation6.jpg")  # 2048x1536, EXIF 6
    assert (image.width, image.height) == (1536, 2048)
    outcome = preprocess_image(image, store)
    assert outcome.tiers_written == [320, 480, 640, 800, 1080, 1280]
    assert preprocess_image(image, store).skipped  # already ready with this recipe
    stored = {o.key: (o.size, o.last_modified) for o in store.list(f"{store.folder}/variants/")}
    assert len(stored) == 2 * len(outcome.tiers_written)
    # Redone from scratch: the same bytes again, so put-if-absent leaves every object as it was.
    again = preprocess_image(image, store, force=True)
    assert again.tiers_written == outcome.tiers_written
    assert {o.key: (o.size, o.last_modified) for o in store.list(f"{store.folder}/variants/")} == stored
    _assert_invariant(image, store)


def test_s3_objects_carry_type_and_cache_headers(corpus, s3_storage, s3_client, s3_bucket):
    image = _ingest(corpus, "photos/flower_exif_icc.webp")  # 300 px: one tier at its own width
    preprocess_image(image, s3_storage)
    for fmt, ctype in imaging.CONTENT_TYPES.items():
        key = served_key(image, width=300, fmt=fmt)
        head = s3_client.head_object(Bucket=s3_bucket, Key=key)
        assert head["ContentType"] == ctype
        assert head["CacheControl"] == CACHE_CONTROL
        body = s3_client.get_object(Bucket=s3_bucket, Key=key)["Body"].read()
        import io

        with PILImage.open(io.BytesIO(body)) as im:
            assert im.width == 300
            assert not im.getexif()


def test_unconfigured_storage_turns_pipeline_off_with_reason(settings):
    settings.PICSITE_VARIANT_STORAGE = "s3"
    settings.PICSITE_S3_BUCKET = ""
    with pytest.raises(VariantStorageNotConfigured, match="PICSITE_S3_BUCKET"):
        variant_store_resolve()
    settings.PICSITE_VARIANT_STORAGE = "none"
    with pytest.raises(VariantStorageNotConfigured, match="off"):
        variant_store_resolve()


def test_corrupt_original_fails_at_decode_and_advertises_nothing(corpus, local_storage, media_root):
    image = _ingest(corpus, SOURCE)
    # The original rots on disk after ingest.
    (media_root / image.original.name).write_bytes((corpus / "bad/truncated_photo.jpg").read_bytes())
    with pytest.raises(VariantGenerationError) as info:
        preprocess_image(image, local_storage)
    assert info.value.stage == "decode"
    image.refresh_from_db()
    assert image.ready_max_width == 0 and not image.variants_ready


def test_huge_images_take_the_low_memory_path_one_at_a_time(corpus, settings, local_storage):
    """Above the pixel threshold a host-wide slot serializes decodes; a waiting
    worker still honours cancellation."""
    import fcntl
    import tempfile
    import time
    from pathlib import Path

    from gallery.imaging import CancelledError

    settings.PICSITE_LOW_MEMORY_PIXELS = 100_000  # the 1024x772 photo counts as huge here
    image = _ingest(corpus, SOURCE)
    started = time.monotonic()

    def cancel_after_half_a_second():
        if time.monotonic() - started > 0.5:
            raise CancelledError("test cancel")

    with open(Path(tempfile.gettempdir()) / "picsite-low-memory.lock", "a+b") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another worker is decoding a huge image
        with pytest.raises(CancelledError):
            preprocess_image(image, local_storage, cancel_after_half_a_second)
        fcntl.flock(held, fcntl.LOCK_UN)
    image.refresh_from_db()
    assert image.ready_max_width == 0
    assert preprocess_image(image, local_storage).variants_ready


def test_progressive_jpeg_detection(corpus, settings):
    from gallery.services import _is_large_progressive_jpeg

    settings.PICSITE_LOW_MEMORY_PROGRESSIVE_BYTES = 1
    assert _is_large_progressive_jpeg((corpus / "edge/panorama_equirect_4096x2048.jpg").read_bytes())
    assert not _is_large_progressive_jpeg((corpus / "photos/jolla_leaf_3264x2448.jpg").read_bytes())
    settings.PICSITE_LOW_MEMORY_PROGRESSIVE_BYTES = 100 * 1024 * 1024
    assert not _is_large_progressive_jpeg((corpus / "edge/panorama_equirect_4096x2048.jpg").read_bytes())


# --- one decode per scale: validation happened at ingest ------------------------------------


@pytest.mark.parametrize("rel", ["photos/webp_gallery_tree.webp", "photos/weld_16bit_rgb.png"])
def test_generation_decodes_a_non_jpeg_original_once(corpus, local_storage, monkeypatch, rel):
    """Ingest validated the upload with a full decode; generation decoded it fully again to
    validate it, then a third time for the pixels. The structural checks stay, the
    validation decode goes: a format that cannot shrink on load is decoded once."""
    image = _ingest(corpus, rel)
    events = PipelineEvents().install(monkeypatch)
    assert preprocess_image(image, local_storage).variants_ready
    assert len(events.decodes()) == 1, events.decodes()


def test_generation_decodes_a_jpeg_once_per_scale_it_uses(corpus, local_storage, monkeypatch):
    """No 1/8-scale validation decode: one shrink-on-load decode for the smallest tier (the
    smallest scale that still covers 320 px), one for the largest tier's scale."""
    image = _ingest(corpus, "photos/canon_sx60_orientation6.jpg")  # stored 2048x1536, EXIF 6
    events = PipelineEvents().install(monkeypatch)
    assert preprocess_image(image, local_storage).tiers_written == [320, 480, 640, 800, 1080, 1280]
    assert events.decodes() == [("JPEG", (512, 384)), ("JPEG", (2048, 1536))]


def test_a_missing_structural_check_still_refuses_the_original(corpus, local_storage, media_root):
    """Dropping the validation decode keeps the checks that need no pixels: a PNG whose
    checksum was damaged after ingest fails at the decode stage, advertising nothing."""
    image = _ingest(corpus, "photos/embedgravitybird_rgba.png")
    path = media_root / image.original.name
    data = bytearray(path.read_bytes())
    data[40] ^= 0xFF  # inside the first chunk after IHDR: its CRC no longer matches
    path.write_bytes(bytes(data))
    with pytest.raises(VariantGenerationError) as info:
        preprocess_image(image, local_storage)
    assert (info.value.stage, info.value.code) == ("decode", "corrupt")
    assert served_keys(image) == []
