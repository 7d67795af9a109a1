"""JSON API: ``POST /api/v1/images`` (multipart upload of one or many photos) and
``GET /api/v1/images/<id>`` (one image with its serving and candidate variant sets).

A thin adapter: auth via ``api.auth.api_authorize`` (a staff user with
``gallery.add_image``, as the admin's upload form requires; a token needs the
``write`` scope), the work in ``gallery.importer.ingest_uploads``. Every error is a
JSON ``{"error": {...}}`` body.
"""

from __future__ import annotations

from django.core.exceptions import RequestDataTooBig, TooManyFieldsSent, TooManyFilesSent
from django.http import HttpRequest, JsonResponse
from django.http.multipartparser import MultiPartParserError
from django.views.decorators.csrf import csrf_exempt

from api.auth import Access, ApiAuthError, api_authorize, api_error
from gallery.importer import IngestItem, IngestSource, ingest_uploads
from gallery.models import Image, VariantSet
from gallery.selectors import VariantStores, image_variant_sets, variant_url
from gallery.services import OriginalStorageError, variant_recipe_current

FILE_FIELDS = ("file", "files")
UPLOAD = Access(permission="gallery.add_image", scopes=("write",))
VIEW = Access(permission="gallery.view_image", scopes=("read",))
MAX_BIGINT = 2**63 - 1


# CSRF is checked by api_authorize for session callers (token callers need none), so the
# answer is a JSON 403 and an anonymous caller gets 401 rather than a CSRF page.
@csrf_exempt
def images_create(request: HttpRequest) -> JsonResponse:
    if request.method != "POST":
        response = api_error(405, "method_not_allowed", f"{request.method} is not allowed here; use POST.")
        response["Allow"] = "POST"
        return response
    try:
        user = api_authorize(request, access=UPLOAD)
        uploads = [f for name in FILE_FIELDS for f in request.FILES.getlist(name)]
    except ApiAuthError as exc:
        return exc.response()
    except RequestDataTooBig as exc:
        return api_error(413, "request_too_large", str(exc))
    except (TooManyFilesSent, TooManyFieldsSent, MultiPartParserError) as exc:
        return api_error(400, "bad_request", str(exc) or "The multipart body could not be read.")

    if not uploads:
        return api_error(400, "no_file", "Send one or more files in the multipart field 'file' (or 'files').")

    report = ingest_uploads(
        sources=[IngestSource(name=f.name, read=f.read, size=f.size) for f in uploads],
        uploaded_by=user,
    )
    rejected = [_rejected_json(item) for item in report.rejected]
    if not report.accepted:
        if all(item.code == OriginalStorageError.code for item in report.rejected):
            # Not the files' fault: the server could not store them (503, try again).
            return api_error(503, OriginalStorageError.code, "The originals storage is unavailable; nothing was saved.", rejected)
        return api_error(400, "all_rejected", f"None of the {len(uploads)} file(s) is an acceptable image.", rejected)
    return JsonResponse({"images": [_image_json(item) for item in report.accepted], "rejected": rejected}, status=201)


def _image_json(item: IngestItem) -> dict:
    image = item.image
    return {
        "id": image.pk,
        "image_key": image.image_key,
        "title": image.title,
        "width": image.width,
        "height": image.height,
        "created": item.status == "imported",
    }


def _rejected_json(item: IngestItem) -> dict:
    return {"file": item.name, "code": item.code, "message": item.message}


@csrf_exempt
def image_detail(request: HttpRequest, image_id: int) -> JsonResponse:
    """One image as staff see it: its variant state and the sets it serves or is building."""
    if request.method not in ("GET", "HEAD"):
        response = api_error(405, "method_not_allowed", f"{request.method} is not allowed here; use GET.")
        response["Allow"] = "GET, HEAD"
        return response
    try:
        api_authorize(request, access=VIEW)
    except ApiAuthError as exc:
        return exc.response()
    image = None
    if 0 < image_id <= MAX_BIGINT:
        image = Image.objects.select_related("serving_set").filter(pk=image_id).first()
    if image is None:
        return api_error(404, "image_not_found", f"No image with id {image_id}.")
    stores = VariantStores()
    sets = image_variant_sets(image=image, stores=stores)
    current = variant_recipe_current().version
    return JsonResponse(
        {
            "id": image.pk,
            "title": image.title,
            "image_key": image.image_key,
            "mime_type": image.mime_type,
            "width": image.width,
            "height": image.height,
            "blurhash": image.blurhash,
            "created_at": image.created_at.isoformat(),
            "deleted_at": image.deleted_at.isoformat() if image.deleted_at else None,
            "variants": {
                "ready": image.variants_ready,
                "ready_max_width": image.ready_max_width,
                "recipe_version": image.variants_recipe,
                "current_recipe_version": current,
                "stale": bool(image.serving_set_id) and image.variants_recipe != current,
                "error": image.variants_error,
                "serving": _set_json(image, sets["serving"], stores) if sets["serving"] else None,
                "candidates": [_set_json(image, s, stores) for s in sets["candidates"]],
                "superseded": [_set_json(image, s, stores) for s in sets["superseded"]],
            },
        }
    )


def _set_json(image: Image, vset: VariantSet, stores: VariantStores) -> dict:
    store = stores.get(vset.storage_kind, vset.folder)
    urls = {
        fmt: {str(w): variant_url(image=image, vset=vset, store=store, width=w, fmt=fmt) for w in vset.ready_widths}
        for fmt in vset.formats
    } if store is not None else {}
    return {
        "id": vset.pk,
        "state": vset.state,
        "recipe_version": vset.recipe_version,
        "key_version": vset.key_version,
        "storage": vset.storage_kind,
        "folder": vset.folder,
        "widths": vset.widths,
        "ready_widths": vset.ready_widths,
        "formats": vset.formats,
        "complete": vset.is_complete,
        "bytes": vset.bytes,
        "params": vset.params,  # per-image choices, e.g. {"quality": {"avif": 52, "webp": 71}}
        "created_at": vset.created_at.isoformat(),
        "completed_at": vset.completed_at.isoformat() if vset.completed_at else None,
        "superseded_at": vset.superseded_at.isoformat() if vset.superseded_at else None,
        "urls": urls,
    }
