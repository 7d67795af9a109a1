"""Is a storage down? One row per storage (``StorageHealth``), shared by every worker, job
and web process through the database, so an outage is recognised across batches, runs,
upload jobs and hosts rather than by one worker's local count.

- ``storage_failure_record`` after a put/read failed for a reason that is not the file's:
  after PICSITE_STORAGE_OUTAGE_THRESHOLD of them in a row (from anywhere) the storage is
  *down*; callers then stop charging attempts and recording errors, and pause instead.
- ``storage_success_record`` after one worked: any success ends the streak and the outage.
- ``storages_recover`` probes each down storage once its backoff has passed (the scheduled
  tick and waiting upload jobs call it); True when none is down any more.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from gallery.models import StorageHealth

logger = logging.getLogger(__name__)

VARIANTS = "variants"
ORIGINALS = "originals"
STORAGES = (VARIANTS, ORIGINALS)


def _locked_row(storage: str) -> StorageHealth:
    row, _ = StorageHealth.objects.get_or_create(name=storage)
    return StorageHealth.objects.select_for_update().get(pk=row.pk)


def _probe_delay(failed_probes: int) -> timedelta:
    base = settings.PICSITE_OUTAGE_PROBE_BASE_S * (2 ** min(failed_probes, 16))
    return timedelta(seconds=min(base, settings.PICSITE_OUTAGE_PROBE_CAP_S))


def storage_failure_record(*, storage: str, error: str) -> bool:
    """Count a failure of ``storage``; True when the storage is (now) considered down."""
    with transaction.atomic():
        row = _locked_row(storage)
        row.consecutive_failures += 1
        row.last_error = error[:2000]
        if row.down_since is None and row.consecutive_failures >= settings.PICSITE_STORAGE_OUTAGE_THRESHOLD:
            row.down_since = timezone.now()
            row.failed_probes = 0
            row.next_probe_at = row.down_since + _probe_delay(0)
            logger.error("%s storage is down after %s failures in a row: %s", storage, row.consecutive_failures, error)
        row.save()
        return row.down_since is not None


def storage_success_record(*, storage: str) -> None:
    """Any success ends a failure streak and an outage (one UPDATE that matches nothing
    while the storage is healthy)."""
    StorageHealth.objects.filter(name=storage).filter(Q(consecutive_failures__gt=0) | Q(down_since__isnull=False)).update(
        consecutive_failures=0, down_since=None, next_probe_at=None, failed_probes=0, last_error=""
    )


def storage_down(*, storage: str) -> StorageHealth | None:
    """The storage's row if it is down, else None."""
    return StorageHealth.objects.filter(name=storage, down_since__isnull=False).first()


def storages_recover(*, storages: tuple[str, ...] = STORAGES) -> bool:
    """Probe each down storage whose backoff has passed; True when none is down any more.
    A failed probe doubles the wait before the next (PICSITE_OUTAGE_PROBE_BASE_S .. _CAP_S)."""
    recovered = True
    for storage in storages:
        row = storage_down(storage=storage)
        if row is None:
            continue
        if row.next_probe_at and row.next_probe_at > timezone.now():
            recovered = False
            continue
        problem = _probe(storage)
        if problem is None:
            logger.warning("%s storage answers again after an outage since %s", storage, row.down_since)
            storage_success_record(storage=storage)
            continue
        recovered = False
        with transaction.atomic():
            row = _locked_row(storage)
            if row.down_since is not None:
                row.failed_probes += 1
                row.next_probe_at = timezone.now() + _probe_delay(row.failed_probes)
                row.last_error = f"probe: {problem}"[:2000]
                row.save()
    return recovered


def _probe(storage: str) -> str | None:
    """None if ``storage`` answers, else why not. Variants: write the probe object (the
    outage that matters is failing puts); originals: a metadata read."""
    try:
        if storage == VARIANTS:
            from gallery.storage import variant_store_resolve

            variant_store_resolve().probe()
        else:
            from django.core.files.storage import default_storage

            default_storage.exists("originals/.picsite-probe")
    except Exception as exc:  # any failure means "still down"; the reason is kept
        return f"{type(exc).__name__}: {exc}"
    return None
