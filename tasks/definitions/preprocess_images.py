"""preprocess-images: make every in-scope image's AVIF/WebP tiers.

Scope: {} = missing or stale by recipe; {"stale": true} = only stale;
{"new_only": true} = never attempted and not ready (what a serverless tick starts);
{"failed_only": true} = not ready and with a recorded error; {"force": true} = all;
{"image_ids": [...]} = an explicit batch (up to 500). "force" and "image_ids" regenerate
their images even when the variants are current (a wiped bucket, a repair); the other
scopes skip what is already done.
"""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from gallery.imaging import encoder_problems
from gallery.models import Image
from gallery.selectors import VariantStores, image_thumbnail_urls, variant_url
from gallery.services import (
    STORAGE_UNAVAILABLE,
    ImageBusy,
    ImageGone,
    VariantGenerationError,
    image_record_variant_failure,
    preprocess_image,
    variant_recipe_current,
)
from gallery.storage import VariantStorageNotConfigured, variant_store_resolve
from gallery.storage_health import storages_recover
from tasks.registry import (
    MAX_BATCH_IDS,
    CostModel,
    ItemFailure,
    ItemResult,
    RunFatal,
    ScopeError,
    ScopeField,
    TaskDefinition,
    TaskUnavailable,
    batch_scope,
    register,
    reject_unknown_keys,
    scope_bool,
    scope_ids,
)


def normalize_scope(raw: dict) -> dict:
    reject_unknown_keys(raw, {"force", "stale", "failed_only", "new_only", "image_ids"})
    ids = scope_ids(raw, "image_ids", limit=MAX_BATCH_IDS)
    flags = {name: scope_bool(raw, name) for name in ("force", "stale", "failed_only", "new_only")}
    chosen = [name for name, on in flags.items() if on] + (["image_ids"] if ids else [])
    if len(chosen) > 1:
        raise ScopeError(chosen[1], f"choose one of force, stale, failed_only, new_only, image_ids (got {', '.join(chosen)})")
    if ids:
        return batch_scope(raw, "image_ids", ids)
    mode = {"force": "all", "stale": "stale", "failed_only": "failed", "new_only": "new"}.get(
        chosen[0] if chosen else "", "missing"
    )
    return {"mode": mode}


def scope_queryset(scope: dict):
    alive = Image.objects.alive()
    mode = scope.get("mode", "missing")
    if mode == "ids":
        return alive.filter(pk__in=scope["image_ids"])
    if mode == "all":
        return alive
    version = variant_recipe_current().version
    if mode == "stale":
        return alive.filter(Q(variants_recipe__lt=version) | Q(variants_recipe__gt=version), variants_ready=True)
    if mode == "failed":
        return alive.filter(variants_ready=False).exclude(variants_error="")
    if mode == "new":
        return alive.filter(variants_ready=False, variants_error="")
    return Image.objects.needing_variants(recipe_version=version)


def check_available() -> None:
    try:
        variant_store_resolve()
    except VariantStorageNotConfigured as exc:
        raise TaskUnavailable(str(exc)) from exc


def preflight() -> None:
    problems = encoder_problems()
    if problems:
        raise RunFatal(" ".join(problems))


def rescue_scope() -> dict | None:
    """Images still waiting for their first variants well after upload (their job was never
    enqueued, or the queue lost it): the scheduled tick starts a "new only" run for them."""
    waited = timezone.now() - timedelta(seconds=settings.PICSITE_PENDING_RESCUE_AFTER_S)
    stranded = Image.objects.alive().filter(variants_ready=False, variants_error="", created_at__lt=waited)
    stranded = stranded.filter(Q(processing_until__isnull=True) | Q(processing_until__lt=timezone.now()))
    return {"new_only": True} if stranded.exists() else None


# Failures that another attempt would only repeat: a file that will not decode will not
# decode next time either, and an immutable key refusing other bytes refuses them again.
FINAL_CODES = frozenset({"variant_overwrite_refused"})

# Scopes whose images are regenerated even when their variants are current: "force"
# (after a bucket was wiped or restored) and an explicit list of ids.
REGENERATING_MODES = ("all", "ids")


def process(image: Image, cancel, scope: dict) -> ItemResult:
    try:
        store = variant_store_resolve()
    except VariantStorageNotConfigured as exc:
        raise RunFatal(f"variant storage configuration removed: {exc}") from exc
    try:
        outcome = preprocess_image(image, store, cancel, force=scope.get("mode") in REGENERATING_MODES)
    except ImageGone:
        return ItemResult("skipped")  # deleted while we worked: the delete wins
    except ImageBusy as exc:
        # An upload's own job holds the image; look again shortly without using an attempt.
        raise ItemFailure(code="busy", stage="claim", message=str(exc), counts_attempt=False) from exc
    except VariantGenerationError as exc:
        if exc.code == STORAGE_UNAVAILABLE:
            # The storage is down (known across workers): no attempt used, no error kept on
            # the image; the run pauses until the probe finds the storage back.
            raise ItemFailure(code=exc.code, stage=exc.stage, message=exc.message, pause_run=STORAGE_UNAVAILABLE) from exc
        # The reason stays visible on the image (admin, "failed only" scope).
        image_record_variant_failure(image_id=image.pk, message=f"{exc.stage}/{exc.code}: {exc.message}")
        raise ItemFailure(
            code=exc.code, stage=exc.stage, message=exc.message, retryable=exc.code not in FINAL_CODES and exc.stage != "decode"
        ) from exc
    if outcome.skipped:
        return ItemResult("skipped")
    return ItemResult("succeeded", bytes_written=outcome.bytes_written, objects_written=outcome.objects_written)


def batch_ids(scope: dict) -> list[int] | None:
    return scope["image_ids"] if scope.get("mode") == "ids" else None


def item_result(image: Image) -> dict:
    """What a batch shows for a processed image: the tiers its serving set has ready, and
    their URLs (from the set's record, as the pages build them)."""
    image = Image.objects.select_related("serving_set").get(pk=image.pk)
    vset = image.serving_set
    if vset is None:
        return {"widths": [], "urls": {}}
    store = VariantStores().get(vset.storage_kind, vset.folder)
    urls = (
        {fmt: {str(w): variant_url(image=image, vset=vset, store=store, width=w, fmt=fmt) for w in vset.ready_widths} for fmt in vset.formats}
        if store is not None
        else {}
    )
    return {"widths": vset.ready_widths, "set": vset.key_version or "legacy", "urls": urls}


DEFINITION = register(
    TaskDefinition(
        key="preprocess-images",
        title="Preprocess images (AVIF/WebP tiers)",
        lock_id=42012,
        batch_size=4,
        lease_seconds=30,  # renewed by the heartbeat every 5 s while the worker lives
        scope_fields=(
            ScopeField("force", "bool", "All live images, regenerated even when ready", label="Force all"),
            ScopeField("stale", "bool", "Only images made with an older recipe"),
            ScopeField("failed_only", "bool", "Only images whose last attempt failed"),
            ScopeField("new_only", "bool", "Only images never attempted (not ready, no recorded error)"),
            ScopeField(
                "image_ids",
                "int_list",
                f"An explicit batch of up to {MAX_BATCH_IDS} ids, regenerated",
                label="Explicit ids",
                flag="--ids",
                max_items=MAX_BATCH_IDS,
            ),
        ),
        normalize_scope=normalize_scope,
        scope_queryset=scope_queryset,
        item_queryset=lambda: Image.objects.alive(),  # a deleted photo leaves every batch
        process=process,
        cost=CostModel(seconds_per_item=2.0, bytes_per_item=600_000, writes_per_item=16),
        check_available=check_available,
        probe=lambda reason: storages_recover(),
        preflight=preflight,
        rescue_scope=rescue_scope,
        batch_ids=batch_ids,
        item_result=item_result,
        idle_scope={"new_only": True},
        item_thumbnail_urls=lambda ids: image_thumbnail_urls(image_ids=ids),
        api_prefix="preprocess-tasks",
        command="preprocess_backfill",
        command_help=(
            "Generate image variants for images that miss them (default), or --stale, --force (all, regenerated), "
            "--failed-only, --new-only or --ids (regenerated). Ctrl-C cancels the run. "
            "Exit 0 succeeded, 1 failed/cancelled/paused, 2 usage."
        ),
        default_scope_label="Missing",
        default_scope_help="Images with no variants yet, or made with an older recipe",
    )
)
