"""Variant sets: which objects an image serves, and how a new set replaces it with no downtime.

An image serves one ``VariantSet`` (``Image.serving_set``); pages, thumbnails and the API
build every URL from that record alone. A generation writes into a *target* set:

- the serving set itself when it has the current key version (resume after a failure, or
  a forced repair: put-if-absent rewrites only what is missing);
- else a *candidate* beside it, switched in by ``variant_set_complete`` in one transaction
  once every tier is stored; the old set becomes *superseded* (the collector deletes it
  after the grace period, so cached HTML that still names it keeps working);
- for an image that serves nothing yet, the new set is serving from the start and its
  tiers appear as they land (smallest first).

The target's row is committed before its first object is stored. Every write here is
made under the image's processing claim and only while the image is alive (see
``gallery.services``: a delete, or a worker that took an expired claim over, wins).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

from django.conf import settings
from django.db import transaction
from django.db.models import F, Subquery
from django.db.models.functions import Greatest
from django.utils import timezone

from gallery import imaging
from gallery.models import Image, VariantSet, VariantSetState
from gallery.storage import (
    VariantStorageNotConfigured,
    VariantStore,
    variant_key,
    variant_store_for,
)

logger = logging.getLogger(__name__)


class ClaimLost(Exception):
    """The image's claim is not ours any more, or the image is gone (see services)."""


def variant_key_version(*, recipe_version: str, storage_kind: str, folder: str, params: dict | None = None) -> str:
    """12 hex digits naming what makes a set's objects: the recipe (bytes and tier list),
    per-image parameters (say an adaptive quality) and where the objects live."""
    payload = {"recipe": recipe_version, "storage": storage_kind, "folder": folder.strip("/"), "params": params or {}}
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def variant_set_keys(vset: VariantSet, *, ready_only: bool = False) -> list[str]:
    """Every object key of the set (or only those of its ready tiers)."""
    widths = vset.ready_widths if ready_only else vset.widths
    image_key = vset.image.image_key
    return [
        variant_key(folder=vset.folder, image_key=image_key, width=w, fmt=fmt, key_version=vset.key_version)
        for w in widths
        for fmt in vset.formats
    ]


def _locked_claimed_image(image_id: int, token: str) -> Image:
    image = (
        Image.objects.select_for_update()
        .filter(pk=image_id, processing_token=token, deleted_at__isnull=True)
        .first()
    )
    if image is None:
        raise ClaimLost(image_id)
    return image


def variant_set_target(
    *,
    image: Image,
    token: str,
    recipe_version: str,
    key_version: str,
    storage: VariantStore,
    widths: list[int],
    params: dict | None = None,
) -> VariantSet:
    """The set this generation writes into (see the module docstring); committed before the
    caller stores anything. ``params`` are the per-image parameters ``key_version`` was made
    with (see ``variant_key_version``). Raises ClaimLost, or SetBusy while the collector
    reclaims a set with this key version."""
    with transaction.atomic():
        locked = _locked_claimed_image(image.pk, token)
        serving = VariantSet.objects.filter(pk=locked.serving_set_id).first() if locked.serving_set_id else None
        if serving is not None and serving.key_version == key_version:
            return serving
        state = VariantSetState.CANDIDATE if serving is not None else VariantSetState.SERVING
        vset = VariantSet.objects.select_for_update().filter(image_id=image.pk, key_version=key_version).first()
        if vset is not None and vset.state == VariantSetState.RECLAIMING:
            raise SetBusy(f"the collector is deleting set {key_version} of image {image.pk}")
        if vset is None:
            vset = VariantSet.objects.create(
                image_id=image.pk,
                state=state,
                recipe_version=recipe_version,
                key_version=key_version,
                storage_kind=storage.kind,
                folder=storage.folder,
                widths=sorted(widths),
                formats=list(imaging.format_names()),
                params=params or {},
            )
        elif vset.state != state:
            # A superseded set of this very key version is wanted again (the recipe went
            # back): revive it rather than write its keys anew (they may still exist).
            vset.state, vset.superseded_at = state, None
            vset.save(update_fields=["state", "superseded_at"])
        if state == VariantSetState.SERVING:
            Image.objects.filter(pk=image.pk).update(
                serving_set=vset,
                ready_max_width=vset.ready_max_width,
                variants_ready=vset.is_complete,
                variants_recipe=recipe_version,
            )
            _audit_after_commit(image.pk)
    vset.image = image
    return vset


class SetBusy(Exception):
    """Another party (the collector) is working on this set: try again later."""


def variant_set_tier_stored(*, vset: VariantSet, token: str, width: int, tier_bytes: int) -> None:
    """Every format of tier ``width`` is stored: advance the set (never backwards: a repair
    rewrites lower tiers), and the image's mirror when it is the serving set."""
    with transaction.atomic():
        image = _locked_claimed_image(vset.image_id, token)
        VariantSet.objects.filter(pk=vset.pk).update(
            ready_max_width=Greatest(F("ready_max_width"), width), bytes=F("bytes") + tier_bytes
        )
        if image.serving_set_id == vset.pk:
            Image.objects.filter(pk=image.pk).update(
                ready_max_width=Greatest(F("ready_max_width"), width),
                variants_bytes=F("variants_bytes") + tier_bytes,
            )
            _audit_after_commit(image.pk)
    vset.ready_max_width = max(vset.ready_max_width, width)


def variant_set_complete(*, vset: VariantSet, token: str, width: int, height: int) -> None:
    """Every tier is stored: make it the serving set (one transaction: the image's row and
    both sets), the old one superseded from now."""
    now = timezone.now()
    top = vset.widths[-1]
    with transaction.atomic():
        image = _locked_claimed_image(vset.image_id, token)
        old = image.serving_set_id if image.serving_set_id != vset.pk else None
        VariantSet.objects.filter(pk=vset.pk).update(
            state=VariantSetState.SERVING, ready_max_width=top, completed_at=F("completed_at") if vset.completed_at else now
        )
        if old is not None:
            VariantSet.objects.filter(pk=old).update(state=VariantSetState.SUPERSEDED, superseded_at=now)
        Image.objects.filter(pk=image.pk).update(
            serving_set=vset.pk,
            variants_ready=True,
            ready_max_width=top,
            variants_recipe=vset.recipe_version,
            variants_error="",
            variants_bytes=Subquery(VariantSet.objects.filter(pk=vset.pk).values("bytes")[:1]),
            width=width,
            height=height,
        )
        _audit_after_commit(image.pk)
    vset.state, vset.ready_max_width = VariantSetState.SERVING, top


def variant_set_delete_objects(vset: VariantSet) -> int:
    """Delete every object of the set from its own storage (best effort, as many as it can);
    returns how many deletions were sent. Objects left behind are orphans: the collector's
    sweep finds them."""
    try:
        store = variant_store_for(kind=vset.storage_kind, folder=vset.folder)
    except VariantStorageNotConfigured:
        logger.warning("cannot delete %s: its storage %s is not configured", vset, vset.storage_kind)
        return 0
    deleted = 0
    for key in variant_set_keys(vset):
        try:
            store.delete(key)
            deleted += 1
        except Exception:  # best effort; the sweep catches what is left
            logger.warning("could not delete variant %s", key, exc_info=True)
    return deleted


# --- integrity audit (tests turn it on): every advertised object exists ------------------


def _audit_enabled() -> bool:
    return bool(os.environ.get("PICSITE_INTEGRITY_AUDIT_LOG") or getattr(settings, "PICSITE_INTEGRITY_AUDIT_LOG", ""))


def _audit_after_commit(image_id: int) -> None:
    """With the integrity audit on, check after the commit that changed what an image
    advertises that every object it now advertises exists (a polling watcher can miss a
    short gap; this cannot)."""
    if _audit_enabled():
        transaction.on_commit(lambda: audit_advertised_objects(image_id=image_id))


def audit_advertised_objects(*, image_id: int) -> list[str]:
    """Keys the image advertises that its storage lacks (each recorded in the audit log)."""
    from gallery.audit import audit_record

    image = Image.objects.select_related("serving_set").filter(pk=image_id).first()
    if image is None or image.serving_set is None or image.deleted_at is not None:
        return []
    vset = image.serving_set
    vset.image = image
    try:
        store = variant_store_for(kind=vset.storage_kind, folder=vset.folder)
    except VariantStorageNotConfigured:
        return []
    missing = [key for key in variant_set_keys(vset, ready_only=True) if not store.exists(key)]
    for key in missing:
        audit_record("advertised_missing", image_id=image_id, set_id=vset.pk, key=key)
    return missing
