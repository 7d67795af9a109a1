"""Gallery reads: the public grid, one photo, and the ``<picture>`` sources of a photo.

Only variants are ever exposed; the original file's URL never leaves the server.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from django.shortcuts import get_object_or_404

from gallery.imaging.formats import fallback_format, picture_formats
from gallery.models import Image, VariantSet, VariantSetState
from gallery.storage import (
    VariantStorageNotConfigured,
    VariantStore,
    key_is_url_safe,
    variant_key_stem,
    variant_store_for,
    variant_store_resolve,
)


@dataclass(frozen=True)
class GalleryPage:
    images: list[Image]
    # Pass as ``before_id`` for the next (older) page; None on the last page.
    next_before: int | None

    @property
    def has_next(self) -> bool:
        return self.next_before is not None


@dataclass(frozen=True)
class PictureSource:
    """One ``<source>`` of a ``<picture>``."""

    fmt: str
    mime_type: str
    srcset: str


@dataclass(frozen=True)
class PictureSources:
    """What ``gallery/_picture.html`` needs. ``has_sources`` False = placeholder only."""

    sources: tuple[PictureSource, ...] = ()  # in <picture> order (gallery.imaging.formats)
    src: str = ""  # in the set's fallback format
    width: int = 0  # of ``src``
    height: int = 0
    sizes: str = "100vw"
    aspect_width: int = 1  # of the photo, for the placeholder's aspect-ratio box
    aspect_height: int = 1
    blurhash: str = ""

    @property
    def has_sources(self) -> bool:
        return bool(self.src)

    def srcset(self, fmt: str) -> str:
        """The ``srcset`` of format ``fmt`` ("" when the set has none)."""
        return next((source.srcset for source in self.sources if source.fmt == fmt), "")


# What a grid tile shows (title, box, blurhash, the serving set's URLs): loading the other
# columns (EXIF, JSON params, timestamps) was a third of the query's cost. Reading another
# field of a page's image costs a query per photo (the grid tests count queries).
GRID_FIELDS = (
    "id", "title", "image_key", "width", "height", "blurhash", "variants_ready", "ready_max_width", "serving_set",
    "serving_set__storage_kind", "serving_set__folder", "serving_set__key_version",
    "serving_set__widths", "serving_set__formats", "serving_set__ready_max_width",
)  # fmt: skip


def gallery_page(*, before_id: int | None, page_size: int) -> GalleryPage:
    """Live images newest first, keyset-paged by id, with the ``GRID_FIELDS`` only: one
    query whatever the page size (each image's serving set comes in the same query)."""
    qs = Image.objects.alive().select_related("serving_set").only(*GRID_FIELDS).order_by("-id")
    if before_id is not None:
        qs = qs.filter(id__lt=before_id)
    # One extra row tells whether an older page exists without a COUNT query.
    rows = list(qs[: page_size + 1])
    images = rows[:page_size]
    next_before = images[-1].pk if len(rows) > page_size else None
    return GalleryPage(images=images, next_before=next_before)


def gallery_images(*, ids: list[int]) -> list[Image]:
    """The live images among ``ids`` (with their serving sets), in id order: one query."""
    return list(Image.objects.alive().select_related("serving_set").filter(pk__in=ids).order_by("id"))


def image_detail(*, image_id: int) -> Image:
    """A live image (with its serving set); Http404 if missing or soft-deleted."""
    return get_object_or_404(Image.objects.alive().select_related("serving_set"), pk=image_id)


class VariantStores:
    """The stores recorded sets live in, resolved once per (kind, folder) for a page (an S3
    store builds a boto3 client). None for a kind that is not configured, and for every
    kind while the pipeline is off (PICSITE_VARIANT_STORAGE=none): placeholders only."""

    def __init__(self) -> None:
        self._stores: dict[tuple[str, str], VariantStore | None] = {}
        self._off = variant_store_or_none() is None

    def get(self, kind: str, folder: str) -> VariantStore | None:
        if self._off:
            return None
        if (kind, folder) not in self._stores:
            try:
                self._stores[(kind, folder)] = variant_store_for(kind=kind, folder=folder)
            except VariantStorageNotConfigured:
                self._stores[(kind, folder)] = None
        return self._stores[(kind, folder)]


def variant_store_or_none() -> VariantStore | None:
    """The variant store, or None when the pipeline is off (pages show placeholders)."""
    try:
        return variant_store_resolve()
    except VariantStorageNotConfigured:
        return None


def _served(image: Image, stores: VariantStores) -> tuple[VariantSet, VariantStore, list[int]] | None:
    """The serving set, its store and its ready widths, or None when nothing can be shown."""
    vset = image.serving_set
    if vset is None or image.width <= 0 or image.height <= 0 or fallback_format(vset.formats) is None:
        return None
    store = stores.get(vset.storage_kind, vset.folder)
    widths = vset.ready_widths
    if store is None or not widths:
        return None
    return vset, store, widths


def variant_url(*, image: Image, vset: VariantSet, store: VariantStore, width: int, fmt: str) -> str:
    return set_urls(image=image, vset=vset, store=store)(width, fmt)


def set_urls(*, image: Image, vset: VariantSet, store: VariantStore) -> Callable[[int, str], str]:
    """``(width, fmt) -> URL`` for the tiers of one set: the store's base URL and the set's
    key stem are joined once, each tier is a concatenation. A key ``url()`` would quote (or a
    store that signs its URLs) goes through ``url()`` tier by tier."""
    stem = variant_key_stem(folder=vset.folder, image_key=image.image_key, key_version=vset.key_version)
    prefix = store.url_prefix()
    if prefix is None or not key_is_url_safe(stem):
        return lambda width, fmt: store.url(f"{stem}{width}.{fmt}")
    base = prefix + stem

    def url(width: int, fmt: str) -> str:
        # The tail is an int and a format name ("avif"); one read from a record is checked.
        if fmt.isalnum() and fmt.isascii():
            return f"{base}{width}.{fmt}"
        return store.url(f"{stem}{width}.{fmt}")

    return url


def image_sources(*, image: Image, stores: VariantStores, sizes: str = "100vw") -> PictureSources:
    """``<source>``s and ``src`` for the ready tiers of the image's serving set, in the formats
    that set has (from that record alone, never from current settings); none if nothing is
    ready."""
    aspect = {
        "aspect_width": image.width or 1,
        "aspect_height": image.height or 1,
        "blurhash": image.blurhash,
        "sizes": sizes,
    }
    served = _served(image, stores)
    if served is None:
        return PictureSources(**aspect)
    vset, store, widths = served
    url = set_urls(image=image, vset=vset, store=store)
    largest = widths[-1]
    return PictureSources(
        sources=tuple(
            PictureSource(fmt=fmt.name, mime_type=fmt.mime_type, srcset=", ".join(f"{url(w, fmt.name)} {w}w" for w in widths))
            for fmt in picture_formats(vset.formats)
        ),
        src=url(largest, fallback_format(vset.formats).name),
        width=largest,
        height=max(1, round(largest * image.height / image.width)),
        **aspect,
    )


def image_thumbnail_url(*, image: Image, stores: VariantStores) -> str:
    """URL of the smallest ready tier of the serving set in its fallback format (WebP), or ""
    when none is ready."""
    served = _served(image, stores)
    if served is None:
        return ""
    vset, store, widths = served
    return variant_url(image=image, vset=vset, store=store, width=widths[0], fmt=fallback_format(vset.formats).name)


def image_thumbnail_urls(*, image_ids: list[int]) -> dict[int, str]:
    """``image_thumbnail_url`` of each of ``image_ids`` that has a ready tier (the others
    are left out), in one query."""
    stores = VariantStores()
    images = Image.objects.filter(pk__in=image_ids, ready_max_width__gt=0).select_related("serving_set")
    urls = {image.pk: image_thumbnail_url(image=image, stores=stores) for image in images}
    return {pk: url for pk, url in urls.items() if url}


def image_variant_sets(*, image: Image, stores: VariantStores) -> dict:
    """The image's serving set and its candidates, with the URLs of their ready tiers."""
    sets = list(VariantSet.objects.filter(image=image).exclude(state=VariantSetState.RECLAIMING).order_by("-id"))
    serving = next((s for s in sets if s.pk == image.serving_set_id), None)
    candidates = [s for s in sets if s.state == VariantSetState.CANDIDATE]
    superseded = [s for s in sets if s.state == VariantSetState.SUPERSEDED]
    return {"serving": serving, "candidates": candidates, "superseded": superseded, "stores": stores}
