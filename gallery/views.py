"""Public pages: the photo grid and one photo, and the grid's pending tiles as JSON (polled
by tiles.js). Thin adapters over ``gallery.selectors``."""

from __future__ import annotations

import math
from collections.abc import Callable

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.template.loader import render_to_string
from django.urls import reverse
from django.views.decorators.http import require_GET

from gallery.models import Image
from gallery.selectors import (
    VariantStores,
    gallery_images,
    gallery_page,
    image_detail,
    image_sources,
)

GRID_PAGE_SIZE = 48
# Grid rows are about this tall (site.css: .grid li flex-basis), so a tile is about
# aspect * this wide; "sizes" tells the browser so it fetches a fitting tier.
GRID_ROW_PX = 240


def grid(request: HttpRequest) -> HttpResponse:
    page = gallery_page(before_id=_positive_int(request.GET.get("before")), page_size=GRID_PAGE_SIZE)
    return render(request, "gallery/grid.html", {"page": page, "tiles": grid_tiles(page.images)})


def grid_tiles(images: list[Image]) -> list[dict]:
    """What grid.html shows of each photo, as ready strings: the template costs a few µs a
    variable, a ``{% url %}`` or a filter several times that, 48 times a page."""
    stores = VariantStores()
    href = _detail_href()
    return [
        {
            "id": image.pk,
            "href": href(image.pk),
            "alt": image.title,
            "aspect": f"{round(_aspect(image), 4):f}",
            "pic": image_sources(image=image, stores=stores, sizes=_grid_sizes(image)),
            "ready": image.ready_max_width,
            # Tiers still to come: tiles.js polls ``tiles`` for them and swaps them in.
            "pending": not image.variants_ready,
        }
        for image in images
    ]


def _detail_href() -> Callable[[int], str]:
    # One reverse() (~20 µs) per page: the detail URLs differ only in the photo's id.
    marker = 987654321
    head, _, tail = reverse("gallery:detail", args=[marker]).partition(str(marker))
    return lambda pk: f"{head}{pk}{tail}"


@require_GET
def tiles(request: HttpRequest) -> JsonResponse:
    """``GET /tiles?ids=1,2``: the grid tiles of these live images as the grid renders them
    (their ``<picture>``: variant URLs only, never the original or GPS), with how far their
    variants are. tiles.js polls it for the grid's pending tiles, so a new upload's tiers
    show as they land, without a reload. Ids that are gone are simply absent."""
    raw = request.GET.get("ids", "")
    try:
        ids = sorted({int(part) for part in raw.split(",")})
    except ValueError:
        ids = []
    if not ids or ids[0] < 1 or len(ids) > GRID_PAGE_SIZE:
        # The API's error shape (the gallery knows nothing of the api app).
        problem = {"code": "invalid_ids", "message": f"ids must be 1 to {GRID_PAGE_SIZE} comma-separated image ids."}
        return JsonResponse({"error": {**problem, "details": {"ids": raw[:200]}}}, status=400)
    body = []
    for tile in grid_tiles(list(gallery_images(ids=ids))):
        html = render_to_string("gallery/_picture.html", {"pic": tile["pic"], "alt": tile["alt"]})
        body.append({"id": tile["id"], "ready_max_width": tile["ready"], "complete": not tile["pending"], "html": html})
    return JsonResponse({"tiles": body}, headers={"Cache-Control": "no-store"})


def detail(request: HttpRequest, image_id: int) -> HttpResponse:
    image = image_detail(image_id=image_id)
    pic = image_sources(image=image, stores=VariantStores(), sizes="(max-width: 1280px) 100vw, 1280px")
    context = {
        "image": image,
        "pic": pic,
        "aspect": round(_aspect(image), 4),
        "camera": _camera_label(image),
        "show_private": request.user.is_staff,  # GPS and pipeline errors
    }
    return render(request, "gallery/detail.html", context)


def _positive_int(value: str | None) -> int | None:
    # A malformed cursor just shows the first page.
    try:
        number = int(value) if value else None
    except ValueError:
        return None
    return number if number and number > 0 else None


def _aspect(image: Image) -> float:
    return image.width / image.height if image.width and image.height else 1.0


def _grid_sizes(image: Image) -> str:
    tile_px = math.ceil(min(_aspect(image), 4) * GRID_ROW_PX * 1.25)  # rows stretch a bit
    return f"(max-width: 600px) 100vw, {tile_px}px"


def _camera_label(image: Image) -> str:
    make, model = image.camera_make.strip(), image.camera_model.strip()
    # "Canon" + "Canon PowerShot G9" reads better without the repeat.
    if make and model.lower().startswith(make.split()[0].lower()):
        return model
    return " ".join(part for part in (make, model) if part)
