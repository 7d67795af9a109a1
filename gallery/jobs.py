"""django-q2 job for a new upload: generate one image's variants.

Failures retry with exponential backoff (a one-off django-q2 schedule) up to
PICSITE_UPLOAD_MAX_ATTEMPTS and leave the reason in ``Image.variants_error``.
"""

from __future__ import annotations

import logging
import random
import time
from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from gallery.models import Image
from gallery.services import (
    STORAGE_UNAVAILABLE,
    DeadlineExceeded,
    ImageBusy,
    ImageGone,
    VariantGenerationError,
    image_record_variant_failure,
    image_variants_message,
    preprocess_image,
)
from gallery.storage import VariantStorageNotConfigured
from gallery.storage_health import STORAGES, storage_down, storages_recover

logger = logging.getLogger(__name__)


def upload_retry_delay(attempt: int) -> float:
    """Seconds before attempt ``attempt + 1``: base * 2^(attempt-1), with +-20% jitter."""
    base = settings.PICSITE_UPLOAD_RETRY_BASE_S * (2 ** (attempt - 1))
    return base * random.uniform(0.8, 1.2)


def generate_variants_job(image_id: int, attempt: int = 1) -> str:
    image = Image.objects.alive().filter(pk=image_id).first()
    if image is None:
        return "gone"
    if not storages_recover():
        # A storage is down (seen by any worker): wait for its next probe, no attempt used.
        _schedule_after_outage(image_id, attempt)
        return STORAGE_UNAVAILABLE
    # The job has a deadline like any engine item: waiting for the low-memory slot or a
    # stuck stage must not outlive the image's claim (limit + 30 s).
    deadline = time.monotonic() + settings.PICSITE_ITEM_TIME_LIMIT_S

    def cancel() -> None:
        if time.monotonic() > deadline:
            raise DeadlineExceeded(f"took over {settings.PICSITE_ITEM_TIME_LIMIT_S:.0f}s")

    try:
        outcome = preprocess_image(image, cancel=cancel)
    except ImageGone:
        return "gone"
    except DeadlineExceeded as exc:
        message = f"timeout: {exc}"
        image_record_variant_failure(image_id=image_id, message=message, attempts=attempt)
        _schedule_retry(image_id, attempt, reason=message)
        return "retrying"
    except ImageBusy:
        # A backfill holds the claim; it will finish the image. Check back once.
        _schedule_retry(image_id, attempt, reason="busy: another worker is generating this image", count=False)
        return "busy"
    except VariantStorageNotConfigured as exc:
        image_record_variant_failure(image_id=image_id, message=str(exc), attempts=attempt)
        return "storage_not_configured"
    except VariantGenerationError as exc:
        if exc.code == STORAGE_UNAVAILABLE:  # not the image's fault: no error kept, no attempt
            _schedule_after_outage(image_id, attempt)
            return STORAGE_UNAVAILABLE
        message = f"{exc.stage}/{exc.code}: {exc.message}"
        image_record_variant_failure(image_id=image_id, message=message, attempts=attempt)
        if exc.stage == "decode" or exc.code == "variant_overwrite_refused":  # a retry repeats it
            return "failed"
        _schedule_retry(image_id, attempt, reason=message)
        return "retrying"
    except Exception as exc:  # unknown failure: record it, retry
        logger.exception("variant job for image %s failed", image_id)
        image_record_variant_failure(image_id=image_id, message=f"error: {exc}", attempts=attempt)
        _schedule_retry(image_id, attempt, reason=str(exc))
        return "retrying"
    Image.objects.filter(pk=image_id).update(variants_attempts=attempt)
    return "ready" if outcome.variants_ready else "partial"


def _schedule_retry(image_id: int, attempt: int, *, reason: str, count: bool = True, at=None) -> None:
    from django_q.models import Schedule

    from dispatch import qstash

    next_attempt = attempt + 1 if count else attempt
    if next_attempt > settings.PICSITE_UPLOAD_MAX_ATTEMPTS:
        logger.warning("image %s gave up after %s attempts: %s", image_id, attempt, reason)
        return
    when = at or timezone.now() + timedelta(seconds=upload_retry_delay(attempt))
    if qstash.dispatch_is_qstash():
        # Raises if it cannot publish: the request answers 5xx and QStash redelivers it.
        qstash.publish_messages([image_variants_message(image_id=image_id, attempt=next_attempt, not_before=when)])
        return
    Schedule.objects.create(
        name=f"variants-retry-{image_id}-{next_attempt}-{timezone.now().timestamp():.0f}",
        func="gallery.jobs.generate_variants_job",
        args=f"{image_id},{next_attempt}",
        schedule_type=Schedule.ONCE,
        repeats=1,
        next_run=when,
    )


def _schedule_after_outage(image_id: int, attempt: int) -> None:
    """Try again at the down storage's next probe (or shortly), with the same attempt."""
    probes = [row.next_probe_at for name in STORAGES if (row := storage_down(storage=name)) and row.next_probe_at]
    at = max([*probes, timezone.now() + timedelta(seconds=settings.PICSITE_OUTAGE_PROBE_BASE_S)])
    _schedule_retry(image_id, attempt, reason="storage unavailable", count=False, at=at)
