"""Gallery reads: the public grid, one photo, and the ``<picture>`` sources of a photo.

Only variants are ever exposed; the original file's URL never leaves the server.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.shortcuts import get_object_or_404

from gallery.imaging import VariantRecipe
from gallery.models import Image
from gallery.storage import (
    VariantStorageNotConfigured,
    VariantStore,
    variant_key,
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
class PictureSources:
    """What ``gallery/_picture.html`` needs. ``has_sources`` False = placeholder only."""

    avif_srcset: str = ""
    webp_srcset: str = ""
    src: str = ""
    width: int = 0  # of ``src``
    height: int = 0
    sizes: str = "100vw"
    aspect_width: int = 1  # of the photo, for the placeholder's aspect-ratio box
    aspect_height: int = 1
    blurhash: str = ""

    @property
    def has_sources(self) -> bool:
        return bool(self.src)


def gallery_page(*, before_id: int | None, page_size: int) -> GalleryPage:
    """Live images newest first, keyset-paged by id: one query whatever the page size."""
    qs = Image.objects.alive().order_by("-id")
    if before_id is not None:
        qs = qs.filter(id__lt=before_id)
    # One extra row tells whether an older page exists without a COUNT query.
    rows = list(qs[: page_size + 1])
    images = rows[:page_size]
    next_before = images[-1].pk if len(rows) > page_size else None
    return GalleryPage(images=images, next_before=next_before)


def image_detail(*, image_id: int) -> Image:
    """A live image; Http404 if missing or soft-deleted."""
    return get_object_or_404(Image.objects.alive(), pk=image_id)


def variant_store_or_none() -> VariantStore | None:
    """The variant store, or None when the pipeline is off (pages show placeholders)."""
    try:
        return variant_store_resolve()
    except VariantStorageNotConfigured:
        return None


def ready_tier_widths(*, image: Image, recipe: VariantRecipe) -> list[int]:
    """Tier widths whose AVIF and WebP both exist (``ready_max_width`` names a whole tier)."""
    if image.ready_max_width <= 0 or image.width <= 0 or image.height <= 0:
        return []
    return [w for w in recipe.tier_widths(image.width) if w <= image.ready_max_width]


def image_sources(
    *,
    image: Image,
    store: VariantStore | None,
    recipe: VariantRecipe,
    sizes: str = "100vw",
) -> PictureSources:
    """``srcset``/``src`` for the ready tiers of ``image``; none if nothing is ready."""
    aspect = {
        "aspect_width": image.width or 1,
        "aspect_height": image.height or 1,
        "blurhash": image.blurhash,
        "sizes": sizes,
    }
    widths = ready_tier_widths(image=image, recipe=recipe) if store is not None else []
    if not widths:
        return PictureSources(**aspect)

    def url(width: int, fmt: str) -> str:
        return store.url(variant_key(folder=store.folder, image_key=image.image_key, width=width, fmt=fmt))

    largest = widths[-1]
    return PictureSources(
        avif_srcset=", ".join(f"{url(w, 'avif')} {w}w" for w in widths),
        webp_srcset=", ".join(f"{url(w, 'webp')} {w}w" for w in widths),
        src=url(largest, "webp"),
        width=largest,
        height=max(1, round(largest * image.height / image.width)),
        **aspect,
    )


def image_thumbnail_url(*, image: Image, store: VariantStore | None, recipe: VariantRecipe) -> str:
    """URL of the smallest ready WebP, or "" when none is ready."""
    widths = ready_tier_widths(image=image, recipe=recipe) if store is not None else []
    if not widths:
        return ""
    return store.url(variant_key(folder=store.folder, image_key=image.image_key, width=widths[0], fmt="webp"))
