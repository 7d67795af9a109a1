"""Gallery business logic: ingest, variant generation, metadata refresh, delete.

Keyword-only ``image_<action>`` functions; views, admin, commands and queue jobs
call these and nothing else. This module knows nothing of the ``tasks`` app.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import timedelta
from functools import partial
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError
from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone
from PIL.Image import Image as PILImage

from gallery import imaging
from gallery.imaging import CancelledError, ImageRejected, VariantRecipe
from gallery.models import Image, VariantSet
from gallery.storage import (
    VariantOverwriteRefused,
    VariantStorageError,
    VariantStore,
    variant_key,
    variant_store_resolve,
)
from gallery.storage_health import (
    ORIGINALS,
    VARIANTS,
    storage_failure_record,
    storage_success_record,
)
from gallery.variant_sets import (
    ClaimLost,
    SetBusy,
    variant_key_version,
    variant_set_complete,
    variant_set_delete_objects,
    variant_set_target,
    variant_set_tier_stored,
)

logger = logging.getLogger(__name__)

CancelCheck = Callable[[], None]


def _no_cancel() -> None:
    return None


class ImageBusy(Exception):
    """Another worker holds this image's processing claim (or took it over after ours expired)."""


class DeadlineExceeded(CancelledError):
    """A job's own time limit passed (raised by its cancel check): retry later."""


class ImageGone(Exception):
    """The image was deleted while it was being processed: the delete wins, nothing is kept."""


class OriginalFetchError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class OriginalStorageError(Exception):
    """Storing an upload's original failed (disk full, the originals bucket unreachable):
    the upload is refused with nothing saved, and may simply be sent again."""

    code = "storage_unavailable"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


# The code of a failure that is the storage's, not the image's, once the storage is known
# to be down (``gallery.storage_health``): callers pause or wait; no attempt, no error kept.
STORAGE_UNAVAILABLE = "storage_unavailable"

# What the originals storage raises when it fails: the filesystem, or boto (S3 originals).
_STORAGE_FAILURES: tuple[type[Exception], ...] = (OSError, BotoCoreError, ClientError)


class VariantGenerationError(Exception):
    """A stage of variant generation failed; ``stage`` and ``code`` say which."""

    def __init__(self, *, stage: str, code: str, message: str):
        super().__init__(message)
        self.stage = stage
        self.code = code
        self.message = message


# --- recipe -----------------------------------------------------------------------------


def variant_recipe_current() -> VariantRecipe:
    return VariantRecipe(
        widths=tuple(settings.PICSITE_VARIANT_WIDTHS),
        avif_quality=settings.PICSITE_AVIF_QUALITY,
        avif_speed=settings.PICSITE_AVIF_SPEED,
        webp_quality=settings.PICSITE_WEBP_QUALITY,
        webp_method=settings.PICSITE_WEBP_METHOD,
        quality_mode=settings.PICSITE_QUALITY_MODE,
        quality_target=settings.PICSITE_QUALITY_TARGET,
        quality_max_drop=settings.PICSITE_QUALITY_MAX_DROP,
        avif_quality_floor=settings.PICSITE_AVIF_QUALITY_FLOOR,
        avif_quality_ceiling=settings.PICSITE_AVIF_QUALITY_CEILING,
        webp_quality_floor=settings.PICSITE_WEBP_QUALITY_FLOOR,
        webp_quality_ceiling=settings.PICSITE_WEBP_QUALITY_CEILING,
        # Concurrent encodes on this host = the django-q2 workers of this cluster.
        encoder_threads=settings.PICSITE_ENCODER_THREADS
        or imaging.default_encoder_threads(settings.Q_CLUSTER.get("workers")),
    )


def image_key_for(data: bytes) -> str:
    return "variants/" + hashlib.sha256(data).hexdigest()[:32]


# --- ingest -----------------------------------------------------------------------------


@dataclass
class IngestResult:
    image: Image
    created: bool
    # The row existed but its original file was gone; these bytes put it back.
    original_restored: bool = False


def image_ingest(*, data: bytes, filename: str, title: str = "", uploaded_by=None) -> IngestResult:
    """Validate by content, store the original, create the row (or return the existing one).

    The row commits on its own (a durable transaction: never inside a caller's), so an
    original is removed again only when its row did not commit. Re-sending the bytes of an
    existing row whose original is missing puts the file back. Raises ImageRejected or
    OriginalStorageError (nothing is stored). Does not enqueue work: callers decide (see
    ``image_variants_enqueue``), so a multi-file upload can enqueue in one go.
    """
    if len(data) > settings.PICSITE_MAX_UPLOAD_BYTES:
        raise ImageRejected(
            "too_large",
            f"{len(data)} bytes is over the {settings.PICSITE_MAX_UPLOAD_BYTES}-byte upload limit.",
        )
    meta = imaging.inspect_image(data, max_pixels=settings.PICSITE_MAX_PIXELS)
    key = image_key_for(data)
    existing = Image.objects.filter(image_key=key).first()
    if existing is not None:
        restored = _original_restore_if_missing(image=existing, data=data, filename=filename)
        if existing.deleted_at is not None:  # re-upload restores a soft-deleted photo
            existing.deleted_at = None
            existing.save(update_fields=["deleted_at", "updated_at"])
        return IngestResult(existing, created=False, original_restored=restored)

    blurhash = ""
    try:
        thumb = imaging.decode_for_variants(data, max_pixels=settings.PICSITE_MAX_PIXELS, target_width=64)
        blurhash = imaging.compute_blurhash(thumb)
    except ImageRejected:
        raise
    except Exception:  # a placeholder is a nicety; the variant job computes it again
        logger.warning("blurhash failed for %s", filename, exc_info=True)

    safe_name = key.split("/")[-1] + "." + _extension_for(meta.mime_type)
    stored_name = _original_store(name=f"originals/{safe_name}", data=data, filename=filename)
    image = Image(
        original=stored_name,
        title=title or _title_from_filename(filename),
        image_key=key,
        original_bytes=len(data),
        mime_type=meta.mime_type,
        blurhash=blurhash,
        uploaded_by=uploaded_by,
        **_metadata_fields(meta),
    )
    try:
        with transaction.atomic(durable=True):
            image.save()
    except IntegrityError:
        # Same bytes uploaded concurrently: the other request won; return its row. Its
        # original may be this very object (S3 overwrites the same key rather than renaming).
        winner = Image.objects.filter(image_key=key).first()
        if winner is None or winner.original.name != stored_name:
            _original_discard(stored_name)
        if winner is None:
            raise  # some other constraint: not a duplicate
        return IngestResult(winner, created=False)
    except BaseException:
        _original_discard(stored_name)  # its row did not commit
        raise
    return IngestResult(image, created=True)


def _original_store(*, name: str, data: bytes, filename: str) -> str:
    try:
        stored = default_storage.save(name, ContentFile(data))
    except _STORAGE_FAILURES as exc:
        logger.error("storing the original of %s failed: %s", filename, exc)
        storage_failure_record(storage=ORIGINALS, error=str(exc))
        raise OriginalStorageError(f"The original could not be stored ({type(exc).__name__}); nothing was saved, send it again.") from exc
    storage_success_record(storage=ORIGINALS)
    return stored


def _original_discard(name: str) -> None:
    try:
        default_storage.delete(name)
    except Exception:
        logger.warning("could not remove the orphaned original %s", name, exc_info=True)


def _original_restore_if_missing(*, image: Image, data: bytes, filename: str) -> bool:
    """Same bytes, same content address: if the row's original is gone, store these."""
    name = image.original.name
    try:
        if default_storage.exists(name):
            return False
    except _STORAGE_FAILURES as exc:
        raise OriginalStorageError(f"The originals storage could not be checked ({type(exc).__name__}); send it again.") from exc
    stored = _original_store(name=name, data=data, filename=filename)
    if stored != name:  # a concurrent re-upload put it back first
        _original_discard(stored)
        return False
    logger.warning("restored the missing original %s of image %s from a re-upload", name, image.pk)
    return True


def _metadata_fields(meta: imaging.PhotoMetadata) -> dict:
    return {
        "width": meta.width,
        "height": meta.height,
        "taken_at": meta.taken_at,
        "camera_make": meta.camera_make[:120],
        "camera_model": meta.camera_model[:120],
        "lens": meta.lens[:160],
        "gps_latitude": meta.gps_latitude,
        "gps_longitude": meta.gps_longitude,
    }


def _extension_for(mime_type: str) -> str:
    return {
        "image/jpeg": "jpg",
        "image/png": "png",
        "image/webp": "webp",
        "image/avif": "avif",
        "image/heic": "heic",
        "image/heif": "heif",
        "image/gif": "gif",
        "image/tiff": "tif",
    }.get(mime_type, "bin")


def _title_from_filename(filename: str) -> str:
    stem = filename.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    return stem.replace("_", " ").replace("-", " ").strip()[:255]


UPLOADS_FLOW_CONTROL_KEY = "picsite-uploads"


def image_variants_message(*, image_id: int, attempt: int, not_before=None):
    """The QStash message of an upload's variant job (``POST /api/v1/images/<id>/variants``)."""
    from django.urls import reverse

    from dispatch.qstash import Message

    return Message(
        path=reverse("api-image-variants", kwargs={"image_id": image_id}),
        body={"attempt": attempt},
        # A new generation per publish: a deliberate republish is never swallowed.
        deduplication_id=f"image-{image_id}-attempt-{attempt}-gen-{uuid.uuid4().hex[:12]}",
        flow_control_key=UPLOADS_FLOW_CONTROL_KEY,
        not_before=not_before,
    )


def image_variants_enqueue(*, image_ids: list[int]) -> None:
    """After commit, enqueue one variant job per image, all in one INSERT.

    Never raises: by then the rows are committed, and a queue failure must neither fail
    the upload nor undo it. The images stay pending (not ready, no error) for the
    scheduled tick to pick up.
    """
    ids = list(image_ids)
    if ids:
        transaction.on_commit(partial(_variants_enqueue_now, ids))


def _variants_enqueue_now(ids: list[int]) -> None:
    from dispatch import django_q2, qstash

    try:
        if qstash.dispatch_is_qstash():
            qstash.publish_messages([image_variants_message(image_id=i, attempt=1) for i in ids])
        else:
            django_q2.enqueue_many("gallery.jobs.generate_variants_job", [(i, 1) for i in ids])
    except Exception:
        logger.exception("could not enqueue the variant jobs of images %s; they stay pending", ids)


# --- original fetch ---------------------------------------------------------------------


def image_fetch_original(*, image: Image, timeout_s: float | None = None, cancel: CancelCheck = _no_cancel) -> bytes:
    """Read the original from default storage in chunks, honouring a deadline and cancel."""
    timeout_s = settings.PICSITE_FETCH_TIMEOUT_S if timeout_s is None else timeout_s
    deadline = time.monotonic() + timeout_s
    chunks: list[bytes] = []
    try:
        with default_storage.open(image.original.name, "rb") as fh:
            while True:
                cancel()
                if time.monotonic() > deadline:
                    raise OriginalFetchError("timeout", f"fetching the original took over {timeout_s:.0f}s")
                chunk = fh.read(1 << 20)
                if not chunk:
                    break
                chunks.append(chunk)
    except FileNotFoundError as exc:
        raise OriginalFetchError("missing_original", f"original file {image.original.name!r} is missing") from exc
    except _STORAGE_FAILURES as exc:
        if storage_failure_record(storage=ORIGINALS, error=str(exc)):
            raise OriginalFetchError(STORAGE_UNAVAILABLE, f"the originals storage is down: {exc}") from exc
        raise OriginalFetchError("fetch_error", f"reading the original failed: {exc}") from exc
    storage_success_record(storage=ORIGINALS)
    return b"".join(chunks)


# --- processing claim -------------------------------------------------------------------


def _claim(image_id: int, *, seconds: float) -> str | None:
    token = uuid.uuid4().hex
    now = timezone.now()
    claimed = (
        Image.objects.filter(pk=image_id)
        .filter(Q(processing_until__isnull=True) | Q(processing_until__lt=now))
        .update(processing_token=token, processing_until=now + timedelta(seconds=seconds))
    )
    return token if claimed else None


def _release(image_id: int, token: str) -> None:
    Image.objects.filter(pk=image_id, processing_token=token).update(processing_token="", processing_until=None)


def _claim_lost(image_id: int) -> Exception:
    """Why a write under our claim matched no row: the image was deleted, or our claim
    expired and another worker took the image over."""
    deleted_at = Image.objects.filter(pk=image_id).values_list("deleted_at", flat=True).first()
    if deleted_at is not None or not Image.objects.filter(pk=image_id).exists():
        return ImageGone(f"image {image_id} was deleted while it was being processed")
    return ImageBusy(f"the claim on image {image_id} expired and another worker took the image over")


def _claimed_update(image_id: int, token: str, **fields) -> None:
    """Write variant state only while we hold the image's claim and the image is alive,
    so a delete, or a worker that took over an expired claim, always wins."""
    if not Image.objects.filter(pk=image_id, processing_token=token, deleted_at__isnull=True).update(**fields):
        raise _claim_lost(image_id)


class _ClaimGuard:
    """The cancel check handed down the pipeline: the caller's own check, plus the claim.
    The claim is renewed once half of it has passed (a slow image outlives the first
    expiry without a second worker starting on it) and checked at the same time, so a
    worker that lost it stops at the next stage."""

    def __init__(self, image_id: int, token: str, *, seconds: float, cancel: CancelCheck):
        self.image_id, self.token, self.seconds, self.cancel = image_id, token, seconds, cancel
        self.renew_at = time.monotonic() + seconds / 2

    def __call__(self) -> None:
        self.cancel()
        if time.monotonic() >= self.renew_at:
            until = timezone.now() + timedelta(seconds=self.seconds)
            _claimed_update(self.image_id, self.token, processing_until=until)
            self.renew_at = time.monotonic() + self.seconds / 2


# --- variants ---------------------------------------------------------------------------


@dataclass
class VariantOutcome:
    image_id: int
    ready_max_width: int
    variants_ready: bool
    tiers_written: list[int] = field(default_factory=list)
    bytes_written: int = 0
    objects_written: int = 0
    skipped: bool = False  # already ready with the current recipe


def preprocess_image(
    image: Image,
    storage: VariantStore | None = None,
    cancel: CancelCheck = _no_cancel,
    *,
    recipe: VariantRecipe | None = None,
    claim_seconds: float | None = None,
    force: bool = False,
) -> VariantOutcome:
    """Generate and store every tier of one image in every output format, smallest first.

    ``ready_max_width`` is written after *every* object of a tier is stored, so it
    always names a complete tier. Tiers already stored with the current recipe are
    not redone, so a retry resumes where a failure stopped. Raises ImageBusy,
    CancelledError, VariantGenerationError (``stage``/``code``), or
    VariantStorageNotConfigured.
    """
    recipe = recipe or variant_recipe_current()
    storage = storage or variant_store_resolve()
    claim_seconds = claim_seconds or settings.PICSITE_ITEM_TIME_LIMIT_S + 30
    token = _claim(image.pk, seconds=claim_seconds)
    if token is None:
        raise ImageBusy(f"image {image.pk} is being processed by another worker")
    guard = _ClaimGuard(image.pk, token, seconds=claim_seconds, cancel=cancel)
    try:
        return _generate(image, token=token, storage=storage, cancel=guard, recipe=recipe, force=force)
    finally:
        _release(image.pk, token)


def _generate(
    image: Image, *, token: str, storage: VariantStore, cancel: CancelCheck, recipe: VariantRecipe, force: bool
) -> VariantOutcome:
    image.refresh_from_db()
    if image.deleted_at is not None:
        raise ImageGone(f"image {image.pk} is deleted")
    serving = image.serving_set
    # The serving set is current when its key is what this recipe gives with the set's own
    # per-image params: a choice made per image (say a quality) never makes it stale.
    current = serving is not None and serving.key_version == _key_version(recipe, storage, serving.params)
    if current and serving.is_complete and not force:
        return VariantOutcome(image.pk, image.ready_max_width, True, skipped=True)
    # Nothing changes for readers until a tier of the target set is stored: the serving set
    # stays served while a candidate is built beside it.
    try:
        data = image_fetch_original(image=image, cancel=cancel)
    except OriginalFetchError as exc:
        raise VariantGenerationError(stage="fetch", code=exc.code, message=exc.message) from exc
    cancel()
    try:
        # The structural checks ingest ran, without its validation decode: the pixels are
        # decoded once per scale the ladder uses (a JPEG's smallest at 1/8 or so).
        source = imaging.VariantSource(data, max_pixels=settings.PICSITE_MAX_PIXELS, cancel=cancel)
    except ImageRejected as exc:
        raise VariantGenerationError(stage="decode", code=exc.code, message=exc.message) from exc
    large = source.pixels > settings.PICSITE_LOW_MEMORY_PIXELS or _is_large_progressive_jpeg(data)
    with source, _low_memory_slot(large, cancel) as low_memory:
        if low_memory:
            recipe = replace(recipe, encoder_threads=1)
        with _decode_errors():
            size = source.oriented_size  # decodes a non-JPEG (its one decode)
        widths = recipe.tier_widths(size[0])
        params = _per_image_params(data, recipe=recipe, widths=widths, cancel=cancel)
        del data  # the source holds the bytes until its last decode
        with _set_writes(image.pk):
            target = variant_set_target(
                image=image,
                token=token,
                recipe_version=recipe.version,
                key_version=_key_version(recipe, storage, params),
                storage=storage,
                widths=widths,
                params=params,
            )
        encode_with = imaging.recipe_with_params(recipe, params)
        writer = _SetWriter(image=image, size=size, token=token, target=target, storage=storage, cancel=cancel, recipe=encode_with)
        return _encode_and_store(writer, source, force=force)


@contextmanager
def _decode_errors() -> Iterator[None]:
    try:
        yield
    except ImageRejected as exc:
        raise VariantGenerationError(stage="decode", code=exc.code, message=exc.message) from exc


def _key_version(recipe: VariantRecipe, storage: VariantStore, params: dict) -> str:
    return variant_key_version(recipe_version=recipe.version, storage_kind=storage.kind, folder=storage.folder, params=params)


def _per_image_params(data: bytes, *, recipe: VariantRecipe, widths: list[int], cancel: CancelCheck) -> dict:
    """The set's per-image parameters: the qualities an "auto" recipe chooses ({} when fixed).
    A pure function of the bytes and the recipe, so a retry lands in the same set."""
    try:
        choice = imaging.quality_choose(data, recipe=recipe, widths=widths, max_pixels=settings.PICSITE_MAX_PIXELS, cancel=cancel)
    except ImageRejected as exc:
        raise VariantGenerationError(stage="decode", code=exc.code, message=exc.message) from exc
    except CancelledError:
        raise
    except Exception as exc:
        raise VariantGenerationError(stage="encode", code="variant_generation_failed", message=f"quality search: {exc}") from exc
    return choice.params if choice else {}


@contextmanager
def _set_writes(image_id: int) -> Iterator[None]:
    """Map variant-set refusals to this module's: a lost claim or a delete, a busy set."""
    try:
        yield
    except ClaimLost:
        raise _claim_lost(image_id) from None
    except SetBusy as exc:
        raise ImageBusy(str(exc)) from exc


def _is_large_progressive_jpeg(data: bytes) -> bool:
    """A progressive JPEG buffers every coefficient while decoding, draft or not."""
    if len(data) < settings.PICSITE_LOW_MEMORY_PROGRESSIVE_BYTES or data[:2] != b"\xff\xd8":
        return False
    pos = 2
    while pos + 4 <= len(data):  # walk marker segments up to the frame header
        if data[pos] != 0xFF:
            return False
        marker = data[pos + 1]
        if marker in (0xC2, 0xC6, 0xCA, 0xCE):  # SOF2/6/10/14: progressive
            return True
        if marker in (0xC0, 0xC1, 0xC3, 0xC5, 0xC7, 0xC9, 0xCB, 0xCD, 0xDA):
            return False
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return False


@contextmanager
def _low_memory_slot(large: bool, cancel: CancelCheck) -> Iterator[bool]:
    """Huge images (and large progressive JPEGs) take the low-memory path: one at a
    time per host (a file lock shared by every worker process) with single-threaded
    encodes and resizes, so N workers never hold N huge decodes at once."""
    if not large:
        yield False
        return
    lock_path = Path(tempfile.gettempdir()) / "picsite-low-memory.lock"
    with open(lock_path, "a+b") as fh:
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                cancel()
                time.sleep(0.2)
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@dataclass(frozen=True)
class _SetWriter:
    """One generation's writes: the image (under claim ``token``) and its oriented size, the
    target set and its storage, the recipe, and the cancel check polled between steps."""

    image: Image
    size: tuple[int, int]
    token: str
    target: VariantSet
    storage: VariantStore
    cancel: CancelCheck
    recipe: VariantRecipe


def _encode_and_store(writer: _SetWriter, source: imaging.VariantSource, *, force: bool) -> VariantOutcome:
    image, target = writer.image, writer.target
    # A forced run repairs the target from its first tier (put-if-absent writes only what
    # is missing); otherwise a retry resumes after the target's last complete tier.
    outcome = VariantOutcome(image.pk, 0 if force else target.ready_max_width, False)
    written: list[str] = []
    threads = writer.recipe.encoder_threads or imaging.default_encoder_threads()
    tiers = _decoded(imaging.variant_tiers(source, target.widths, threads=threads))
    try:
        with _set_writes(image.pk):
            _store_tiers(writer, tiers, outcome=outcome, written=written)
    except ImageGone:
        # Deleted while we worked: the delete removed what existed then; remove what we
        # stored since, so nothing of the photo stays public.
        for key in written:
            _delete_quietly(writer.storage, key)
        raise
    return outcome


def _decoded(tiers: Iterator[tuple[int, PILImage]]) -> Iterator[tuple[int, PILImage]]:
    """The ladder decodes as it goes (the big decode after the first tier): its refusals
    are the decode stage's."""
    with _decode_errors():
        yield from tiers


def _store_tiers(writer: _SetWriter, tiers: Iterator, *, outcome: VariantOutcome, written: list[str]) -> None:
    """Encode and store every tier, smallest first. The first tier (from a small decode of
    its own) is stored and served before the next is asked for, which starts the big decode;
    after that, each tier encodes while the one before it is stored."""
    image, token, target, cancel = writer.image, writer.token, writer.target, writer.cancel
    blurhash = image.blurhash
    with imaging.TierEncoder(writer.recipe, formats=target.formats, encode=imaging.encode_variant) as encoder:
        pending: tuple[int, dict] | None = None  # a tier being encoded, stored next
        for index, (width, tier) in enumerate(tiers):
            cancel()
            if not blurhash:
                blurhash = imaging.compute_blurhash(tier)
                _claimed_update(image.pk, token, blurhash=blurhash, width=writer.size[0], height=writer.size[1])
            if width <= outcome.ready_max_width:
                continue
            encoding = (width, encoder.submit(tier))
            del tier
            if pending is not None:
                _store_tier(writer, *pending, outcome=outcome, written=written)
            pending = encoding
            if index == 0:
                _store_tier(writer, *pending, outcome=outcome, written=written)
                pending = None
        if pending is not None:
            _store_tier(writer, *pending, outcome=outcome, written=written)

    variant_set_complete(vset=target, token=token, width=writer.size[0], height=writer.size[1])
    outcome.ready_max_width = target.widths[-1]
    outcome.variants_ready = True


def _store_tier(writer: _SetWriter, width: int, payloads: dict, *, outcome: VariantOutcome, written: list[str]) -> None:
    """Store every format of one tier (``payloads``: format -> future bytes), then advertise it."""
    image, target, cancel = writer.image, writer.target, writer.cancel
    tier_bytes = 0
    for fmt, future in payloads.items():
        try:
            payload = future.result()
        except Exception as exc:
            raise VariantGenerationError(stage="encode", code="variant_generation_failed", message=f"{fmt} {width}px: {exc}") from exc
        cancel()
        key = variant_key(folder=target.folder, image_key=image.image_key, width=width, fmt=fmt, key_version=target.key_version)
        try:
            stored = writer.storage.put(key, payload, imaging.output_format(fmt).mime_type)
        except VariantOverwriteRefused as exc:
            # Not an outage and not worth a retry: the same key would get the same bytes.
            raise VariantGenerationError(stage="upload", code="variant_overwrite_refused", message=str(exc)) from exc
        except VariantStorageError as exc:
            down = storage_failure_record(storage=VARIANTS, error=str(exc))
            code = STORAGE_UNAVAILABLE if down else "variant_upload_failed"
            raise VariantGenerationError(stage="upload", code=code, message=str(exc)) from exc
        if not written:
            storage_success_record(storage=VARIANTS)
        written.append(key)
        if stored is not False:  # False: these very bytes were there already
            tier_bytes += len(payload)
            outcome.objects_written += 1
    # Every format of this tier is stored: only now may the set advertise it.
    variant_set_tier_stored(vset=target, token=writer.token, width=width, tier_bytes=tier_bytes)
    outcome.ready_max_width = width
    outcome.tiers_written.append(width)
    outcome.bytes_written += tier_bytes


def _delete_quietly(storage: VariantStore, key: str) -> None:
    try:
        storage.delete(key)
    except Exception:  # best effort; an orphan is swept later and harms nobody
        logger.warning("could not delete variant %s", key, exc_info=True)


def _f_add(name: str, amount: int):
    from django.db.models import F

    return F(name) + amount


def image_record_variant_failure(*, image_id: int, message: str, attempts: int | None = None) -> None:
    """Leave a visible reason on the image (admin list, gallery detail for staff)."""
    fields: dict = {"variants_error": message[:2000]}
    if attempts is not None:
        fields["variants_attempts"] = attempts
    Image.objects.filter(pk=image_id).update(**fields)


# --- metadata refresh --------------------------------------------------------------------


METADATA_FIELDS = ("width", "height", "taken_at", "camera_make", "camera_model", "lens", "gps_latitude", "gps_longitude")


def image_refresh_metadata(*, image: Image, cancel: CancelCheck = _no_cancel) -> bool:
    """Re-read EXIF from the original. Returns True if anything changed.

    Raises OriginalFetchError or ImageRejected (as the stage that failed).
    """
    data = image_fetch_original(image=image, cancel=cancel, timeout_s=min(settings.PICSITE_FETCH_TIMEOUT_S, 20))
    cancel()
    meta = imaging.inspect_image(data, max_pixels=settings.PICSITE_MAX_PIXELS)
    fresh = _metadata_fields(meta)
    changed = {name: value for name, value in fresh.items() if getattr(image, name) != value}
    if not changed:
        return False
    Image.objects.filter(pk=image.pk).update(**changed)
    for name, value in changed.items():
        setattr(image, name, value)
    return True


# --- delete -----------------------------------------------------------------------------


def image_soft_delete(*, image: Image) -> None:
    """Hide the photo and remove every variant set it has, at once: nothing of it stays
    public. The original and the row stay until the collector purges them after its grace
    (a re-upload of the same bytes restores the photo meanwhile)."""
    with transaction.atomic():
        Image.objects.filter(pk=image.pk).update(
            deleted_at=timezone.now(), serving_set=None, variants_ready=False, ready_max_width=0, variants_recipe=""
        )
        sets = list(VariantSet.objects.filter(image_id=image.pk).select_related("image"))
        # The rows go with the delete; objects a failed delete leaves behind are orphans
        # (no set names them), which the collector's sweep removes. A worker generating the
        # image right now finds it deleted at its next write and removes what it stored.
        VariantSet.objects.filter(image_id=image.pk).delete()
    for vset in sets:
        variant_set_delete_objects(vset)


__all__ = [
    "CancelledError",
    "DeadlineExceeded",
    "ImageBusy",
    "ImageGone",
    "ImageRejected",
    "IngestResult",
    "STORAGE_UNAVAILABLE",
    "OriginalFetchError",
    "VariantGenerationError",
    "VariantOutcome",
    "image_fetch_original",
    "image_ingest",
    "image_refresh_metadata",
    "image_soft_delete",
    "image_variants_enqueue",
    "preprocess_image",
    "variant_recipe_current",
]
