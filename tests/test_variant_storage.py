"""The variant store layer against real storage (local disk, moto S3 over HTTP):
put-if-absent (a key holds one content forever), listing, batch delete, the integrity
audit log, and the determinism that put-if-absent relies on (stored bytes never depend on
the encoder thread count or the low-memory path)."""

from __future__ import annotations

import hashlib
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gallery import imaging
from gallery.storage import (
    CACHE_CONTROL,
    LocalVariantStore,
    S3VariantStore,
    StoredObject,
    VariantOverwriteRefused,
    VariantStorageError,
)

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Harness:
    """A store plus a way to read what it really holds, bypassing the store's own API."""

    store: LocalVariantStore | S3VariantStore
    s3_client: object | None = None

    def read(self, key: str) -> bytes:
        if self.s3_client is None:
            return (Path(self.store.root) / key).read_bytes()
        return self.s3_client.get_object(Bucket=self.store.bucket, Key=key)["Body"].read()

    def headers(self, key: str) -> dict[str, str]:
        if self.s3_client is None:
            return {}
        head = self.s3_client.head_object(Bucket=self.store.bucket, Key=key)
        return {"ContentType": head["ContentType"], "CacheControl": head["CacheControl"]}


@pytest.fixture(params=["local", "s3"])
def harness(request) -> Harness:
    store = request.getfixturevalue(f"{request.param}_storage")
    return Harness(store, request.getfixturevalue("s3_client") if request.param == "s3" else None)


def _key(store, name: str) -> str:
    # The shape issue 10 gives variant keys: a shard directory, hash, version, width.
    return f"{store.folder}/variants/{name}"


def _random_name(width: int = 320, fmt: str = "avif") -> str:
    digest = uuid.uuid4().hex
    return f"{digest[:2]}/{digest}_v1_{width}.{fmt}"


# --- put-if-absent -------------------------------------------------------------------------


def test_overwrite_refusal_is_not_a_storage_failure():
    # Storage failures feed outage detection; a refused overwrite is a bug, not an outage.
    assert not issubclass(VariantOverwriteRefused, VariantStorageError)


def test_put_writes_once_and_refuses_different_bytes(harness, integrity_audit):
    store = harness.store
    key = _key(store, _random_name())
    first, other = b"AVIF-first" * 100, b"AVIF-other" * 100

    assert store.put(key, first, "image/avif") is True
    assert store.put(key, first, "image/webp") is False  # a retry's redo: same bytes, no write
    with pytest.raises(VariantOverwriteRefused) as info:
        store.put(key, other, "image/webp")

    refused = info.value
    assert refused.key == key
    assert refused.existing_sha256 == hashlib.sha256(first).hexdigest()
    assert refused.new_sha256 == hashlib.sha256(other).hexdigest()
    assert harness.read(key) == first
    if store.kind == "s3":  # the first put's headers stay
        assert harness.headers(key) == {"ContentType": "image/avif", "CacheControl": CACHE_CONTROL}

    entries = integrity_audit.take()
    assert [e["kind"] for e in entries] == ["variant_overwrite_refused"]
    details = entries[0]["details"]
    assert details["key"] == key and details["store"] == store.kind
    assert details["existing_sha256"] == refused.existing_sha256
    assert details["new_sha256"] == refused.new_sha256


def test_put_creates_shard_directories_and_leaves_no_temp_files(local_storage):
    key = _key(local_storage, "ab/cd/deep_v1_320.webp")
    assert local_storage.put(key, b"webp", "image/webp") is True
    folder = Path(local_storage.root) / key.rsplit("/", 1)[0]
    assert [p.name for p in folder.iterdir()] == ["deep_v1_320.webp"]
    assert (folder / "deep_v1_320.webp").stat().st_nlink == 1


def test_concurrent_puts_of_the_same_bytes_have_exactly_one_writer(harness):
    store = harness.store
    key = _key(store, _random_name(640))
    data = b"same bytes from every worker" * 2000
    barrier = threading.Barrier(8)

    def put() -> bool:
        barrier.wait()
        return store.put(key, data, "image/avif")

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: put(), range(8)))
    assert sorted(results) == [False] * 7 + [True]
    assert harness.read(key) == data


def test_concurrent_puts_of_different_bytes_keep_one_content(local_storage, integrity_audit):
    key = _key(local_storage, _random_name(800))
    contents = [bytes([65 + i]) * 50_000 for i in range(6)]
    barrier = threading.Barrier(len(contents))

    def put(data: bytes):
        barrier.wait()
        try:
            return local_storage.put(key, data, "image/avif")
        except VariantOverwriteRefused as exc:
            return exc

    with ThreadPoolExecutor(len(contents)) as pool:
        results = list(pool.map(put, contents))
    winners = [data for data, result in zip(contents, results, strict=True) if result is True]
    assert len(winners) == 1
    assert all(isinstance(r, VariantOverwriteRefused) for r in results if r is not True)
    assert (Path(local_storage.root) / key).read_bytes() == winners[0]
    assert len(integrity_audit.take()) == len(contents) - 1


def test_storage_failures_still_raise_storage_error(settings, tmp_path):
    from tests.conftest import free_port

    dead = S3VariantStore(
        bucket="nowhere", region="us-east-1", endpoint_url=f"http://127.0.0.1:{free_port()}",
        public_base_url="", folder="gallery", access_key="test", secret_key="test", timeout_s=2,
    )  # fmt: skip
    with pytest.raises(VariantStorageError):
        dead.put("gallery/variants/a_v1_320.avif", b"x", "image/avif")
    with pytest.raises(VariantStorageError):
        list(dead.list("gallery/variants/"))
    with pytest.raises(VariantStorageError):
        dead.delete_many(["gallery/variants/a_v1_320.avif"])

    blocked = tmp_path / "blocked"
    blocked.write_bytes(b"a file where the store wants a directory")
    local = LocalVariantStore(root=str(blocked), base_url="/v/", folder="gallery")
    with pytest.raises(VariantStorageError):
        local.put("gallery/variants/a_v1_320.avif", b"x", "image/avif")


# --- list ------------------------------------------------------------------------------------

INSIDE = [
    "gallery/variants/ab/x1_v1_320.avif",
    "gallery/variants/ab/x1_v1_320.webp",
    "gallery/variants/ab/cd/ef/deep_v1_480.avif",
    "gallery/variants/abz/y_v1_320.avif",
    "gallery/variants/cd/y_v1_640.webp",
    "gallery/variants/top_v1_800.avif",
]
OUTSIDE = [
    "gallery/variantsX/a_v1_320.avif",
    "gallery/variants-old/b_v1_320.avif",
    "gallery/.picsite-probe",
    "other/variants/c_v1_320.avif",
]


def test_list_filters_by_prefix_with_sizes_and_times(harness):
    store = harness.store
    before = datetime.now(UTC)
    sizes = {key: 10 + i for i, key in enumerate(INSIDE + OUTSIDE)}
    for key, size in sizes.items():
        assert store.put(key, b"v" * size, "image/avif")
    after = datetime.now(UTC)

    listed = list(store.list("gallery/variants/"))
    assert all(isinstance(o, StoredObject) for o in listed)
    assert sorted(o.key for o in listed) == sorted(INSIDE)
    for o in listed:
        assert o.size == sizes[o.key]
        assert o.last_modified.utcoffset() == timedelta(0)
        # S3 keeps whole seconds; allow for that and for clock rounding, nothing more.
        assert before - timedelta(seconds=2) <= o.last_modified <= after + timedelta(seconds=2)

    # The prefix is a string, not a directory: "ab" matches "abz" as S3 does; "ab/" does not.
    assert sorted(o.key for o in store.list("gallery/variants/ab")) == sorted(k for k in INSIDE if "/ab" in k)
    assert sorted(o.key for o in store.list("gallery/variants/ab/")) == sorted(k for k in INSIDE if "/ab/" in k)
    assert list(store.list("gallery/nothing-here/")) == []


def test_local_list_skips_files_being_written(local_storage):
    key = _key(local_storage, "ab/x_v1_320.avif")
    local_storage.put(key, b"done", "image/avif")
    # What a writer holds before it links the finished file into place.
    (Path(local_storage.root) / key).with_name(".picsite-tmp-x_v1_480.avif.123").write_bytes(b"half")
    assert [o.key for o in local_storage.list("gallery/variants/")] == [key]


def _put_many(store, keys: list[str]) -> None:
    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(lambda k: store.put(k, k.encode(), "image/avif"), keys))


def test_s3_list_pages_past_a_thousand_objects(s3_storage):
    keys = [_key(s3_storage, f"{i % 7:02x}/{i:05d}_v1_320.avif") for i in range(1100)]
    _put_many(s3_storage, keys + ["gallery/variantsX/outside.avif"])
    listed = list(s3_storage.list("gallery/variants/"))
    assert len(listed) == 1100  # one ListObjectsV2 page holds at most 1000
    assert {o.key: o.size for o in listed} == {k: len(k) for k in keys}


# --- delete_many -----------------------------------------------------------------------------


def test_delete_many_removes_keys_and_ignores_missing(harness):
    store = harness.store
    for key in INSIDE + OUTSIDE:
        store.put(key, key.encode(), "image/avif")
    assert store.delete_many(iter(INSIDE + ["gallery/variants/zz/missing_v1_320.avif"])) == len(INSIDE) + 1
    assert list(store.list("gallery/variants/")) == []
    assert sorted(o.key for o in store.list("")) == sorted(OUTSIDE)
    assert store.delete_many([]) == 0


def test_s3_delete_many_sends_chunks_of_at_most_a_thousand(s3_storage):
    keys = [_key(s3_storage, f"{i % 13:02x}/{i:05d}_v1_480.webp") for i in range(2500)]
    _put_many(s3_storage, keys[::10])  # objects in every chunk; S3 counts a missing key as deleted
    batch_sizes: list[int] = []
    client = s3_storage._client()  # count the DeleteObjects requests this store sends
    client.meta.events.register(
        "before-call.s3.DeleteObjects", lambda params, **_: batch_sizes.append(params["body"].count(b"<Key>"))
    )
    assert s3_storage.delete_many(keys) == 2500
    assert batch_sizes == [1000, 1000, 500]
    assert list(s3_storage.list("gallery/variants/")) == []


def test_local_delete_many_reports_keys_it_cannot_delete(local_storage):
    keep = _key(local_storage, "ab/keep_v1_320.avif")
    gone = _key(local_storage, "ab/gone_v1_320.avif")
    local_storage.put(keep, b"k", "image/avif")
    local_storage.put(gone, b"g", "image/avif")
    errors: list[tuple[str, str]] = []
    shard = _key(local_storage, "ab")  # a directory, not an object: unlink fails
    deleted = local_storage.delete_many([gone, shard], on_error=lambda key, message: errors.append((key, message)))
    assert deleted == 1
    assert [key for key, _ in errors] == [shard]
    assert [o.key for o in local_storage.list("gallery/variants/")] == [keep]


# --- determinism: what put-if-absent relies on -----------------------------------------------


@pytest.mark.parametrize(
    ("photo", "width", "size"),
    [
        ("photos/reconyx_trailcam_2048x1536.jpg", 1280, (1280, 960)),  # 1.2 MP
        # A tall tier: libaom's row-based multithreading made its bytes depend on the
        # thread count (2560x3413: 1 thread != 2 threads) until encode_variant turned it off.
        ("photos/iphone_dog_orientation6.jpg", 2560, (2560, 3413)),
    ],
)
def test_encoder_thread_count_does_not_change_the_bytes(corpus, photo, width, size):
    from gallery.services import variant_recipe_current

    data = (corpus / photo).read_bytes()
    source = imaging.decode_for_variants(data, max_pixels=100_000_000, target_width=width)
    ((_, tier),) = list(imaging.render_tiers(source, [width]))
    assert tier.size == size
    recipe = variant_recipe_current()
    for fmt in imaging.FORMATS:
        digests = {
            threads: hashlib.sha256(imaging.encode_variant(tier, fmt, replace(recipe, encoder_threads=threads))).hexdigest()
            for threads in (1, 2, 4)
        }
        assert len(set(digests.values())) == 1, f"{fmt} differs by thread count: {digests}"


@pytest.mark.parametrize("photo", ["photos/canon_sx60_orientation6.jpg", "photos/embedgravitybird_rgba.png"])
def test_formats_encoded_side_by_side_give_the_bytes_of_one_at_a_time(corpus, photo):
    """Both formats of a tier encode at once on two threads. Image.save() keeps its options
    on the Image object while it runs, so the two saves of one tier read each other's
    (WebP got AVIF's quality 55) until each encode saved through an object of its own."""
    from gallery.services import variant_recipe_current

    recipe = variant_recipe_current()
    with imaging.VariantSource((corpus / photo).read_bytes(), max_pixels=100_000_000) as source:
        tiers = list(imaging.variant_tiers(source, recipe.tier_widths(source.oriented_size[0])))

    def digests(encoder: imaging.TierEncoder) -> dict[str, str]:
        return {
            f"{width}.{fmt}": hashlib.sha256(blob).hexdigest()[:16]
            for width, tier in tiers
            for fmt, blob in encoder.encode(tier).items()
        }

    with imaging.TierEncoder(replace(recipe, encoder_threads=1)) as one_at_a_time:
        assert not one_at_a_time.parallel
        expected = digests(one_at_a_time)
    with imaging.TierEncoder(replace(recipe, encoder_threads=2)) as side_by_side:
        assert side_by_side.parallel
        for _ in range(3):
            assert digests(side_by_side) == expected


@pytest.mark.django_db
def test_low_memory_path_stores_the_same_bytes(corpus, settings, media_root, monkeypatch):
    from gallery.services import image_ingest, preprocess_image

    settings.PICSITE_ENCODER_THREADS = 4
    path = corpus / "photos/canon_sx60_orientation6.jpg"  # 1536x2048 upright: tiers up to 1280
    image = image_ingest(data=path.read_bytes(), filename=path.name).image
    normal = LocalVariantStore(root=str(media_root / "normal"), base_url="/n/", folder="gallery")
    low = LocalVariantStore(root=str(media_root / "low"), base_url="/l/", folder="gallery")

    threads_used: list[int] = []
    encode = imaging.encode_variant

    def encode_recording_threads(img, fmt, recipe):
        threads_used.append(recipe.encoder_threads)
        return encode(img, fmt, recipe)

    monkeypatch.setattr(imaging, "encode_variant", encode_recording_threads)
    assert not preprocess_image(image, normal).skipped
    assert set(threads_used) == {4}
    threads_used.clear()
    settings.PICSITE_LOW_MEMORY_PIXELS = 1  # every image is "huge": single-threaded encodes
    assert not preprocess_image(image, low, force=True).skipped
    assert set(threads_used) == {1}  # the low-memory path was taken

    def files(root: str) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}

    normal_files, low_files = files(normal.root), files(low.root)
    assert len(normal_files) == 12  # 6 tiers x (AVIF, WebP)
    assert normal_files.keys() == low_files.keys()
    differing = [name for name in normal_files if normal_files[name] != low_files[name]]
    assert differing == []
