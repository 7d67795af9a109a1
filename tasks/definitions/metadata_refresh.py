"""metadata-refresh: re-read EXIF (oriented dims, taken_at, camera, lens, GPS).

Scope: {} = every live image; {"missing_only": true} = images with no taken_at
and no camera; {"image_ids": [...]} = an explicit batch (up to 500).
"""

from __future__ import annotations

from gallery.imaging import ImageRejected
from gallery.models import Image
from gallery.selectors import image_thumbnail_urls
from gallery.services import STORAGE_UNAVAILABLE, OriginalFetchError, image_refresh_metadata
from gallery.storage_health import ORIGINALS, storages_recover
from tasks.registry import (
    MAX_BATCH_IDS,
    CostModel,
    ItemFailure,
    ItemResult,
    ScopeError,
    ScopeField,
    TaskDefinition,
    batch_scope,
    register,
    reject_unknown_keys,
    scope_bool,
    scope_ids,
)


def normalize_scope(raw: dict) -> dict:
    reject_unknown_keys(raw, {"missing_only", "image_ids"})
    ids = scope_ids(raw, "image_ids", limit=MAX_BATCH_IDS)
    missing_only = scope_bool(raw, "missing_only")
    if ids and missing_only:
        raise ScopeError("image_ids", "choose one of missing_only, image_ids")
    if ids:
        return batch_scope(raw, "image_ids", ids)
    return {"mode": "missing" if missing_only else "all"}


def scope_queryset(scope: dict):
    alive = Image.objects.alive()
    if scope.get("mode") == "ids":
        return alive.filter(pk__in=scope["image_ids"])
    if scope.get("mode") == "missing":
        return alive.filter(taken_at__isnull=True, camera_make="", camera_model="")
    return alive


def process(image: Image, cancel, scope: dict) -> ItemResult:
    try:
        changed = image_refresh_metadata(image=image, cancel=cancel)
    except OriginalFetchError as exc:
        pause = STORAGE_UNAVAILABLE if exc.code == STORAGE_UNAVAILABLE else ""
        raise ItemFailure(code=exc.code, stage="fetch", message=exc.message, pause_run=pause) from exc
    except ImageRejected as exc:
        raise ItemFailure(code="exif_read_failed", stage="parse-exif", message=f"{exc.code}: {exc.message}", retryable=False) from exc
    return ItemResult("succeeded" if changed else "skipped")


DEFINITION = register(
    TaskDefinition(
        key="metadata-refresh",
        title="Refresh metadata (EXIF)",
        lock_id=42011,
        batch_size=10,
        lease_seconds=30,  # renewed by the heartbeat every 5 s while the worker lives
        scope_fields=(
            ScopeField("missing_only", "bool", "Only images with no date and no camera"),
            ScopeField(
                "image_ids",
                "int_list",
                f"An explicit batch of up to {MAX_BATCH_IDS} ids",
                label="Explicit ids",
                flag="--ids",
                max_items=MAX_BATCH_IDS,
            ),
        ),
        normalize_scope=normalize_scope,
        scope_queryset=scope_queryset,
        item_queryset=lambda: Image.objects.alive(),  # a deleted photo leaves every batch
        process=process,
        cost=CostModel(seconds_per_item=0.15),
        probe=lambda reason: storages_recover(storages=(ORIGINALS,)),
        batch_ids=lambda scope: scope["image_ids"] if scope.get("mode") == "ids" else None,
        item_thumbnail_urls=lambda ids: image_thumbnail_urls(image_ids=ids),
        api_prefix="tasks",  # the first task's prefix, kept for clients
        command="metadata_refresh",
        command_help=(
            "Re-read EXIF metadata (dimensions, date, camera, lens, GPS) of every live image, or --missing-only, "
            "or --ids. Ctrl-C cancels the run. Exit 0 succeeded, 1 failed/cancelled/paused, 2 usage."
        ),
        default_scope_label="All",
        default_scope_help="Every live image",
    )
)
