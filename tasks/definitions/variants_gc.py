"""variants-gc: give back the variant storage nothing serves any more.

Three kinds of garbage, each only once it is older than ``PICSITE_VARIANT_GC_GRACE_DAYS``
(cached HTML may still name it):

- *superseded sets*: replaced by a newer set; marked ``reclaiming`` (a conditional UPDATE,
  so a backfill reviving the set cannot race us; ``variant_set_target`` refuses to revive a
  reclaiming set), their objects deleted where they live, then their rows;
- *soft-deleted photos*: their leftover objects, their original and their row (the delete
  itself already removed every set, so nothing of them is public since);
- *orphans*: objects under ``{folder}/variants/`` in our key pattern (``VARIANT_KEY_PATTERN``;
  anything else in a shared bucket is not ours and never touched) that no set row names.

Work unit: a *shard* of the key space, ``tasks.KeyShard`` "00".."ff", the first two hex
digits of the image hash; ``{folder}/variants/{hh}`` covers the versioned layout
(``variants/{hh}/{hash}_{version}_{w}.{fmt}``) and the legacy flat one
(``variants/{hash}_{w}.{fmt}``). Per shard: list the current store first, then read the
shard's images and all their sets from the database. Every object in the listing was stored
after its set's row committed (``gallery.variant_sets``), so the read sees every set that names
it: nothing a serving, candidate or superseded set names is ever taken for an orphan, even
while a backfill writes candidates. Each image with something to reclaim is then handled
under its processing claim (``gallery.services._claim``; busy: its shard is retried later,
at no attempt's cost) and re-read under it, so no generation can adopt an object between
our decision and our delete.

For this task a run's ``bytes`` and ``writes`` (``ItemResult.bytes_written`` /
``objects_written``, the API's ``spent``, a ``bytes`` budget) count what was *reclaimed*:
objects deleted (an original is one) and their bytes. A shard that fails counts nothing of
what it reclaimed before the failure; its retry counts the rest.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError
from django.conf import settings
from django.core.files.storage import default_storage
from django.db import transaction
from django.db.models import Count, Q, QuerySet, Sum
from django.db.models.expressions import RawSQL
from django.utils import timezone

from gallery.models import Image, VariantSet, VariantSetState
from gallery.services import STORAGE_UNAVAILABLE, _claim, _release
from gallery.storage import (
    StoredObject,
    VariantStorageError,
    VariantStorageNotConfigured,
    VariantStore,
    variant_key_parse,
    variant_store_for,
    variant_store_resolve,
)
from gallery.storage_health import (
    ORIGINALS,
    VARIANTS,
    storage_failure_record,
    storage_success_record,
    storages_recover,
)
from gallery.variant_sets import variant_set_keys
from tasks.models import KeyShard
from tasks.registry import (
    CostModel,
    ItemFailure,
    ItemResult,
    RunFatal,
    ScopeField,
    TaskDefinition,
    TaskUnavailable,
    register,
    reject_unknown_keys,
    scope_bool,
)
from tasks.text import format_bytes

logger = logging.getLogger(__name__)

TASK_KEY = "variants-gc"
SHARDS = 256
IMAGE_KEY_PREFIX = "variants/"  # Image.image_key = this + 32 hex digits
# The preview lists the whole store to count orphans; past this it says it stopped.
PREVIEW_LIST_BUDGET_S = 5.0
_PREVIEW_CHUNK = 1000
# A shard stops taking up images after this share of the item time limit (the rest is
# done by its retry), so a huge shard never fails on the deadline half-way through.
_SHARD_TIME_SHARE = 0.7
# What the originals storage raises when it fails (the filesystem, or boto for S3).
_ORIGINALS_FAILURES: tuple[type[Exception], ...] = (OSError, BotoCoreError, ClientError)


def grace_cutoff() -> datetime:
    """Garbage younger than this is left alone."""
    days = max(float(settings.PICSITE_VARIANT_GC_GRACE_DAYS), 0.0)
    return timezone.now() - timedelta(days=days)


def _is_reclaimable(vset: VariantSet, cutoff: datetime) -> bool:
    """Superseded past the grace, or left reclaiming by a collector that stopped half way."""
    if vset.state == VariantSetState.RECLAIMING:
        return True
    return vset.state == VariantSetState.SUPERSEDED and vset.superseded_at is not None and vset.superseded_at < cutoff


def _shard_prefix(store: VariantStore, shard: str) -> str:
    folder = store.folder.strip("/")
    return f"{folder}/variants/{shard}" if folder else f"variants/{shard}"


def _in_store(vset: VariantSet, store: VariantStore) -> bool:
    return vset.storage_kind == store.kind and vset.folder.strip("/") == store.folder.strip("/")


def _hex_image_keys() -> Q:
    """Image keys that fall in some shard ("variants/" + a hex digit ...): what a run visits."""
    return Q(image_key__gte=IMAGE_KEY_PREFIX + "0", image_key__lt=IMAGE_KEY_PREFIX + "g")


# --- scope --------------------------------------------------------------------------------------


def normalize_scope(raw: dict) -> dict:
    reject_unknown_keys(raw, {"skip_orphans"})
    return {"mode": "no_orphans" if scope_bool(raw, "skip_orphans") else "all"}


def shards_ensure() -> None:
    """The 256 shard rows, created on first use (idempotent; a flushed database has none)."""
    if KeyShard.objects.count() < SHARDS:
        KeyShard.objects.bulk_create(
            [KeyShard(id=value + 1, prefix=f"{value:02x}") for value in range(SHARDS)], ignore_conflicts=True
        )


def scope_queryset(scope: dict) -> QuerySet:
    shards_ensure()
    return KeyShard.objects.all()


def check_available() -> None:
    try:
        variant_store_resolve()
    except VariantStorageNotConfigured as exc:
        raise TaskUnavailable(str(exc)) from exc


# --- one shard ----------------------------------------------------------------------------------


@dataclass
class _Reclaimed:
    objects: int = 0
    bytes: int = 0
    rows: int = 0  # set and image rows deleted

    def add(self, objects: int, nbytes: int, rows: int = 0) -> None:
        self.objects += objects
        self.bytes += nbytes
        self.rows += rows


@dataclass
class _Problem:
    code: str
    stage: str
    message: str
    retryable: bool = True


@dataclass
class _ShardCollector:
    """Collects one shard (see the module docstring); ``result()`` is the item's verdict."""

    store: VariantStore
    cutoff: datetime
    cancel: Callable[[], None]
    stop_at: float  # time.monotonic() after which no further image is taken up
    claim_seconds: float
    reclaimed: _Reclaimed = field(default_factory=_Reclaimed)
    busy: list[int] = field(default_factory=list)
    problems: list[_Problem] = field(default_factory=list)
    unfinished: bool = False
    listed: bool = False  # the current store was listed (its object sizes are known)
    _stores: dict[tuple[str, str], VariantStore] = field(default_factory=dict)

    def collect(self, shard: str, *, sweep: bool) -> None:
        by_digest = self._list(shard) if sweep else {}
        self.cancel()
        images = _shard_images(shard, by_digest.keys())
        for image in images:
            objects = by_digest.pop(image.image_key.removeprefix(IMAGE_KEY_PREFIX), [])
            if not self._has_work(image, objects):
                continue
            if time.monotonic() > self.stop_at:
                self.unfinished = True
                return
            self.cancel()
            self._image_collect(image.pk, objects)
        self._rowless_collect(by_digest)

    def result(self) -> ItemResult:
        done = f"reclaimed {self.reclaimed.objects} objects ({self.reclaimed.bytes} bytes) before"
        if self.problems:
            first = self.problems[0]
            more = f" (and {len(self.problems) - 1} more problems)" if len(self.problems) > 1 else ""
            raise ItemFailure(
                code=first.code,
                stage=first.stage,
                message=f"{first.message}{more}; {done}",
                retryable=any(p.retryable for p in self.problems),
            )
        if self.busy:
            ids = ", ".join(str(i) for i in self.busy[:10])
            raise ItemFailure(
                code="image_busy",
                stage="claim",
                message=f"images {ids} were being processed; the shard is looked at again ({done})",
                counts_attempt=False,
            )
        if self.unfinished:
            raise ItemFailure(
                code="shard_unfinished",
                stage="reclaim",
                message=f"the shard had more to reclaim than fits in one item's time; it goes on ({done})",
                counts_attempt=False,
            )
        r = self.reclaimed
        return ItemResult("succeeded" if r.objects or r.rows else "skipped", bytes_written=r.bytes, objects_written=r.objects)

    # -- reading

    def _list(self, shard: str) -> dict[str, list[StoredObject]]:
        """Our objects of the shard in the current store, by image hash."""
        by_digest: dict[str, list[StoredObject]] = {}
        try:
            for obj in self.store.list(_shard_prefix(self.store, shard)):
                parts = variant_key_parse(folder=self.store.folder, key=obj.key)
                if parts is not None:  # anything else is not ours
                    by_digest.setdefault(parts["digest"], []).append(obj)
        except VariantStorageError as exc:
            self._storage_failed(VARIANTS, exc, stage="list")
            raise ItemFailure(code="list_failed", stage="list", message=str(exc)) from exc
        storage_success_record(storage=VARIANTS)
        self.listed = True
        return by_digest

    def _has_work(self, image: Image, objects: list[StoredObject]) -> bool:
        if image.deleted_at is not None and image.deleted_at < self.cutoff:
            return True
        sets = list(image.variant_sets.all())
        if any(_is_reclaimable(vset, self.cutoff) for vset in sets):
            return True
        named = self._named(image, sets)
        return any(obj.key not in named and obj.last_modified < self.cutoff for obj in objects)

    def _named(self, image: Image, sets: Iterable[VariantSet]) -> set[str]:
        """Keys of the current store named by any of ``sets`` (whatever their state)."""
        named: set[str] = set()
        for vset in sets:
            if _in_store(vset, self.store):
                vset.image = image
                named.update(variant_set_keys(vset))
        return named

    # -- one image, under its claim

    def _image_collect(self, image_id: int, objects: list[StoredObject]) -> None:
        token = _claim(image_id, seconds=self.claim_seconds)
        if token is None:
            if Image.objects.filter(pk=image_id).exists():
                self.busy.append(image_id)  # a generation holds it: the shard comes back
            return
        try:
            image = Image.objects.filter(pk=image_id).first()
            if image is None:
                return
            # Re-read under the claim: no generation can change the sets while we hold it.
            sets = list(VariantSet.objects.filter(image_id=image_id).order_by("pk"))
            listed = {obj.key: obj for obj in objects}
            kept = []
            for vset in sets:
                vset.image = image
                if not (_is_reclaimable(vset, self.cutoff) and self._set_reclaim(vset, listed)):
                    kept.append(vset)  # what it names is no orphan
            if image.deleted_at is not None and image.deleted_at < self.cutoff:
                self._image_purge(image, kept, listed, token)
            else:
                self._orphans_delete(image, kept, listed, token)
        finally:
            _release(image_id, token)

    def _set_reclaim(self, vset: VariantSet, listed: dict[str, StoredObject]) -> bool:
        """Mark the set reclaiming, delete its objects where they live, then its row.
        False when it is not (entirely) done: the set and what it names stay."""
        try:
            store = self._store_of(vset)
        except VariantStorageNotConfigured as exc:
            self.problems.append(_Problem("set_storage_not_configured", "reclaim", f"{vset}: {exc}", retryable=False))
            return False
        if vset.state != VariantSetState.RECLAIMING:
            marked = VariantSet.objects.filter(
                pk=vset.pk, state=VariantSetState.SUPERSEDED, superseded_at__lt=self.cutoff
            ).update(state=VariantSetState.RECLAIMING)
            if not marked:
                return False  # revived or gone since we read it: not ours any more
        keys = variant_set_keys(vset)
        deleted = self._delete(store, keys)
        if deleted is None or len(deleted) < len(keys):
            return False  # stays reclaiming; the next run finishes it
        VariantSet.objects.filter(pk=vset.pk, state=VariantSetState.RECLAIMING).delete()
        if store is self.store and self.listed:
            gone = [listed.pop(key) for key in keys if key in listed]
            self.reclaimed.add(len(gone), sum(obj.size for obj in gone), rows=1)
        else:  # not listed: what the row says
            self.reclaimed.add(len(deleted), vset.bytes, rows=1)
        return True

    def _orphans_delete(self, image: Image, sets: list[VariantSet], listed: dict[str, StoredObject], token: str) -> None:
        named = self._named(image, sets)
        doomed = [obj for obj in listed.values() if obj.key not in named and obj.last_modified < self.cutoff]
        if not doomed or not _claim_renew(image.pk, token):
            return
        self._delete_listed(doomed)

    def _image_purge(self, image: Image, sets: list[VariantSet], listed: dict[str, StoredObject], token: str) -> None:
        """A photo deleted longer ago than the grace: whatever objects it still has (any
        age), then its original and its row; the row stays until all else is gone."""
        for vset in sets:  # none normally: the delete removed them
            try:
                store = self._store_of(vset)
            except VariantStorageNotConfigured as exc:
                self.problems.append(_Problem("set_storage_not_configured", "purge", f"{vset}: {exc}", retryable=False))
                return
            keys = variant_set_keys(vset)
            deleted = self._delete(store, keys)
            if deleted is None or len(deleted) < len(keys):
                return
            VariantSet.objects.filter(pk=vset.pk).delete()
            for key in keys:
                listed.pop(key, None)
            self.reclaimed.add(len(deleted), vset.bytes, rows=1)
        if listed and not self._delete_listed(list(listed.values())):
            return
        try:
            with transaction.atomic():
                # Locked, and only while still deleted past the grace under our claim: a
                # re-upload that restores the photo either went first (we find nothing) or
                # waits for us and finds no row.
                locked = (
                    Image.objects.select_for_update()
                    .filter(pk=image.pk, processing_token=token, deleted_at__lt=self.cutoff)
                    .first()
                )
                if locked is None:
                    return
                name = locked.original.name
                if name:
                    default_storage.delete(name)
                Image.objects.filter(pk=locked.pk).delete()
        except _ORIGINALS_FAILURES as exc:
            self._storage_failed(ORIGINALS, exc, stage="purge")
            self.problems.append(_Problem("original_delete_failed", "purge", f"image {image.pk}: {exc}"))
            return
        storage_success_record(storage=ORIGINALS)
        self.reclaimed.add(1 if name else 0, locked.original_bytes if name else 0, rows=1)

    # -- objects whose photo has no row

    def _rowless_collect(self, by_digest: dict[str, list[StoredObject]]) -> None:
        old = {d: [o for o in objs if o.last_modified < self.cutoff] for d, objs in by_digest.items()}
        old = {d: objs for d, objs in old.items() if objs}
        if not old:
            return
        # An upload may have created the row since our read: those wait for the next run.
        appeared = set(
            Image.objects.filter(image_key__in=[IMAGE_KEY_PREFIX + d for d in old]).values_list("image_key", flat=True)
        )
        doomed = [o for d, objs in old.items() if IMAGE_KEY_PREFIX + d not in appeared for o in objs]
        if doomed:
            self._delete_listed(doomed)

    # -- storage

    def _store_of(self, vset: VariantSet) -> VariantStore:
        if _in_store(vset, self.store):
            return self.store
        where = (vset.storage_kind, vset.folder)
        if where not in self._stores:
            self._stores[where] = variant_store_for(kind=vset.storage_kind, folder=vset.folder)
        return self._stores[where]

    def _delete_listed(self, objects: list[StoredObject]) -> bool:
        """Delete listed objects of the current store; True when all are gone."""
        deleted = self._delete(self.store, [obj.key for obj in objects])
        if deleted is None:
            return False
        gone = [obj for obj in objects if obj.key in deleted]
        self.reclaimed.add(len(gone), sum(obj.size for obj in gone))
        return len(gone) == len(objects)

    def _delete(self, store: VariantStore, keys: list[str]) -> set[str] | None:
        """The keys deleted (all but those the store reported), or None when the request
        failed. Failures become problems (or an outage pause)."""
        if not keys:
            return set()
        failed: dict[str, str] = {}
        try:
            store.delete_many(keys, on_error=failed.__setitem__)
        except VariantStorageError as exc:
            self._storage_failed(VARIANTS, exc, stage="delete")
            self.problems.append(_Problem("delete_failed", "delete", str(exc)))
            return None
        if failed:
            key, message = next(iter(failed.items()))
            self.problems.append(
                _Problem("delete_failed", "delete", f"{len(failed)} of {len(keys)} objects not deleted, e.g. {key}: {message}")
            )
        else:
            storage_success_record(storage=VARIANTS)
        return set(keys) - set(failed)

    def _storage_failed(self, storage: str, exc: Exception, *, stage: str) -> None:
        """Count the failure in the shared storage health; once the storage is down the run
        pauses (no attempt charged) until a probe finds it back."""
        if storage_failure_record(storage=storage, error=str(exc)):
            raise ItemFailure(
                code=STORAGE_UNAVAILABLE, stage=stage, message=f"the {storage} storage is down: {exc}", pause_run=STORAGE_UNAVAILABLE
            ) from exc


def _claim_renew(image_id: int, token: str) -> bool:
    """Still ours? Extend the claim before a delete, so it cannot run out under it."""
    until = timezone.now() + timedelta(seconds=_claim_seconds())
    return bool(Image.objects.filter(pk=image_id, processing_token=token).update(processing_until=until))


def _claim_seconds() -> float:
    return settings.PICSITE_ITEM_TIME_LIMIT_S + 30


def _shard_images(shard: str, digests: Iterable[str]) -> list[Image]:
    """The shard's images (any state) with all their sets: those whose key is in the shard's
    range, and by exact key every image the listing found (whatever the collation does
    with the range, a listed object's image is never missed)."""
    low = IMAGE_KEY_PREFIX + shard
    in_range = Q(image_key__startswith=low, image_key__gte=low)
    if shard != "ff":
        in_range &= Q(image_key__lt=f"{IMAGE_KEY_PREFIX}{int(shard, 16) + 1:02x}")
    listed = Q(image_key__in=[IMAGE_KEY_PREFIX + d for d in digests])
    return list(
        Image.objects.filter(in_range | listed)
        .only("id", "image_key", "deleted_at")
        .prefetch_related("variant_sets")
        .order_by("id")
    )


# Settings a variant store is built from: the store is reused while they stay the same
# (building an S3 client costs more than listing a shard), and rebuilt when they change.
_STORE_SETTINGS = (
    "PICSITE_VARIANT_STORAGE", "PICSITE_VARIANT_FOLDER", "PICSITE_VARIANT_LOCAL_ROOT", "PICSITE_VARIANT_LOCAL_URL",
    "PICSITE_S3_BUCKET", "PICSITE_S3_REGION", "PICSITE_S3_ENDPOINT_URL", "PICSITE_S3_PUBLIC_BASE_URL",
    "PICSITE_S3_ACCESS_KEY_ID", "PICSITE_S3_SECRET_ACCESS_KEY", "PICSITE_S3_TIMEOUT_S",
)  # fmt: skip
_store_cache: dict[tuple, VariantStore] = {}


def _current_store() -> VariantStore:
    """``variant_store_resolve()``, reused while its settings are unchanged (an S3 store keeps
    one client per thread)."""
    key = tuple(str(getattr(settings, name, "")) for name in _STORE_SETTINGS)
    store = _store_cache.get(key)
    if store is None:
        store = variant_store_resolve()
        _store_cache.clear()
        _store_cache[key] = store
    return store


def process(shard: KeyShard, cancel, scope: dict) -> ItemResult:
    try:
        store = _current_store()
    except VariantStorageNotConfigured as exc:
        raise RunFatal(f"variant storage configuration removed: {exc}") from exc
    collector = _ShardCollector(
        store=store,
        cutoff=grace_cutoff(),
        cancel=cancel,
        stop_at=time.monotonic() + settings.PICSITE_ITEM_TIME_LIMIT_S * _SHARD_TIME_SHARE,
        claim_seconds=_claim_seconds(),
    )
    collector.collect(shard.prefix, sweep=scope.get("mode") != "no_orphans")
    return collector.result()


# --- preview: what a run would reclaim -----------------------------------------------------------


def preview_details(scope: dict) -> dict[str, Any]:
    """Objects and bytes a run would reclaim now. Superseded sets and deleted photos come
    from their rows (a set's objects are its widths x formats); orphans from a listing of
    the store, stopped after PREVIEW_LIST_BUDGET_S (``orphans_counted`` false then)."""
    cutoff = grace_cutoff()
    ours = _hex_image_keys()
    due_sets = VariantSet.objects.filter(
        Q(state=VariantSetState.SUPERSEDED, superseded_at__lt=cutoff) | Q(state=VariantSetState.RECLAIMING),
        image__in=Image.objects.filter(ours, Q(deleted_at__isnull=True) | Q(deleted_at__gte=cutoff)),
    )
    superseded = _sets_figures(due_sets)
    deleted_images = Image.objects.filter(ours, deleted_at__lt=cutoff)
    purge = deleted_images.aggregate(images=Count("id"), originals=Count("id", filter=~Q(original="")), bytes=Sum("original_bytes"))
    leftover_sets = _sets_figures(VariantSet.objects.filter(image__in=deleted_images))
    deleted = {
        "images": purge["images"],
        "objects": purge["originals"] + leftover_sets["objects"],
        "bytes": (purge["bytes"] or 0) + leftover_sets["bytes"],
    }
    orphans, counted, note = _orphans_preview(cutoff) if scope.get("mode") != "no_orphans" else (
        {"objects": 0, "bytes": 0, "listed": 0}, False, "the scope skips the orphan sweep"
    )
    objects = superseded["objects"] + deleted["objects"] + orphans["objects"]
    nbytes = superseded["bytes"] + deleted["bytes"] + orphans["bytes"]
    summary = (
        f"to reclaim: {objects} objects, {format_bytes(nbytes)} (superseded sets: {superseded['sets']}, "
        f"deleted photos: {deleted['images']}, orphans: {orphans['objects']}"
        + ("" if counted else f" or more: {note}")
        + f"; grace {settings.PICSITE_VARIANT_GC_GRACE_DAYS:g} days)"
    )
    details: dict[str, Any] = {
        "grace_days": float(settings.PICSITE_VARIANT_GC_GRACE_DAYS),
        "cutoff": cutoff.isoformat(),
        "superseded_sets": superseded,
        "deleted_images": deleted,
        "orphans": orphans,
        "orphans_counted": counted,
        "objects": objects,
        "bytes": nbytes,
        "summary": summary,
    }
    if not counted:
        details["orphans_note"] = note
    return details


def _sets_figures(sets: QuerySet) -> dict[str, int]:
    figures = sets.aggregate(
        sets=Count("id"),
        objects=Sum(RawSQL("jsonb_array_length(widths) * jsonb_array_length(formats)", [])),
        bytes=Sum("bytes"),
    )
    return {"sets": figures["sets"], "objects": figures["objects"] or 0, "bytes": figures["bytes"] or 0}


def _orphans_preview(cutoff: datetime) -> tuple[dict[str, int], bool, str]:
    """Orphans in the current store (as a run would judge them), listing for at most
    PREVIEW_LIST_BUDGET_S: (figures, whether the whole store was counted, why not)."""
    figures = {"objects": 0, "bytes": 0, "listed": 0}
    try:
        store = variant_store_resolve()
    except VariantStorageNotConfigured as exc:
        return figures, False, str(exc)
    deadline = time.monotonic() + PREVIEW_LIST_BUDGET_S
    try:
        for chunk in _our_objects_in_chunks(store, deadline):
            figures["listed"] += len(chunk)
            for obj in _orphans_among(chunk, store, cutoff):
                figures["objects"] += 1
                figures["bytes"] += obj.size
    except _ListingStopped:
        return figures, False, f"the listing stopped after {PREVIEW_LIST_BUDGET_S:g} s"
    except VariantStorageError as exc:
        return figures, False, f"the storage could not be listed: {exc}"
    return figures, True, ""


class _ListingStopped(Exception):
    pass


def _our_objects_in_chunks(store: VariantStore, deadline: float) -> Iterator[list[tuple[str, StoredObject]]]:
    chunk: list[tuple[str, StoredObject]] = []
    for obj in store.list(_shard_prefix(store, "")):
        if time.monotonic() > deadline:
            raise _ListingStopped()
        parts = variant_key_parse(folder=store.folder, key=obj.key)
        if parts is None:
            continue
        chunk.append((parts["digest"], obj))
        if len(chunk) >= _PREVIEW_CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _orphans_among(chunk: list[tuple[str, StoredObject]], store: VariantStore, cutoff: datetime) -> Iterator[StoredObject]:
    """What a run would delete as orphans: objects no set names (older than the grace), and
    every object of a photo deleted past the grace (it is purged)."""
    images = {
        image.image_key.removeprefix(IMAGE_KEY_PREFIX): image
        for image in Image.objects.filter(image_key__in={IMAGE_KEY_PREFIX + d for d, _ in chunk})
        .only("id", "image_key", "deleted_at")
        .prefetch_related("variant_sets")
    }
    named: dict[str, set[str]] = {}
    for digest, obj in chunk:
        image = images.get(digest)
        if image is not None and image.deleted_at is not None and image.deleted_at < cutoff:
            yield obj
            continue
        if obj.last_modified >= cutoff:
            continue
        if image is not None and digest not in named:
            keys: set[str] = set()
            for vset in image.variant_sets.all():
                if _in_store(vset, store):
                    vset.image = image
                    keys.update(variant_set_keys(vset))
            named[digest] = keys
        if image is None or obj.key not in named[digest]:
            yield obj


DEFINITION = register(
    TaskDefinition(
        key=TASK_KEY,
        title="Reclaim variant storage (GC)",
        lock_id=42013,
        batch_size=8,  # shards
        lease_seconds=30,  # renewed by the heartbeat every 5 s while the worker lives
        scope_fields=(
            ScopeField(
                "skip_orphans",
                "bool",
                "Only superseded sets and deleted photos past the grace: no listing of the storage, no orphan sweep",
                label="No orphan sweep",
            ),
        ),
        normalize_scope=normalize_scope,
        scope_queryset=scope_queryset,
        item_queryset=lambda: KeyShard.objects.all(),
        process=process,
        cost=CostModel(seconds_per_item=0.2),
        check_available=check_available,
        probe=lambda reason: storages_recover(),
        preview_details=preview_details,
        api_prefix="variants-gc-tasks",
        command="variants_gc",
        command_help=(
            "Delete superseded variant sets and purge soft-deleted photos older than the grace period, and sweep "
            "orphan variant objects (--skip-orphans: no sweep). --dry-run prints what would be reclaimed. "
            "Ctrl-C cancels the run. Exit 0 succeeded, 1 failed/cancelled/paused, 2 usage."
        ),
        default_scope_label="Everything",
        default_scope_help=(
            "Superseded sets and deleted photos past the grace period, and orphan objects (lists the storage)"
        ),
    )
)
