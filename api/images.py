"""The gallery's JSON routes: ``POST /api/v1/images`` (multipart upload of one or many
photos) and ``GET /api/v1/images/<id>`` (one image with its serving and candidate sets).

Here, not in ``gallery``: the ``api`` app is the project's HTTP layer and may use the
gallery's services and selectors, while the gallery knows nothing of the API. Uploading
needs ``gallery.add_image`` (as the admin's upload form; a token needs scope ``write``),
reading ``gallery.view_image`` (scope ``read``), deleting ``gallery.delete_image`` (as the
admin's delete; scope ``write``). The work is ``gallery.importer``'s and ``gallery.services``'.
"""

from __future__ import annotations

from typing import Annotated, Any

from django.http import HttpRequest
from ninja import File, Router, UploadedFile
from ninja.responses import Status
from pydantic import BaseModel, Field

from api.auth import Access
from api.errors import ApiError
from api.http import Requires
from api.push_auth import PushSignedOr
from api.schemas import MAX_BIGINT, IsoDateTime, from_object, responses
from gallery import models
from gallery.importer import IngestItem, IngestSource, ingest_uploads
from gallery.jobs import generate_variants_job
from gallery.selectors import VariantStores, image_variant_sets, variant_url
from gallery.services import OriginalStorageError, image_soft_delete, variant_recipe_current

UPLOAD = Access(permission="gallery.add_image", scopes=("write",))
VIEW = Access(permission="gallery.view_image", scopes=("read",))
DELETE = Access(permission="gallery.delete_image", scopes=("write",))  # as the admin's delete
ERRORS = {
    400: "No file, an unreadable multipart body, or none of the files is an acceptable image (details lists them).",
    401: "Not authenticated (no or revoked bearer token, no session), or the token has expired (code token_expired).",
    403: "Not active staff, missing the route's permission, a token without its scope, or a failed CSRF check.",
    404: "No such image.",
    405: "Method not allowed (the Allow header lists the allowed ones).",
    413: "The request body is too large.",
    503: "The originals storage could not store the upload (code storage_unavailable); nothing was saved.",
}


class UploadedImage(BaseModel):
    id: int
    image_key: str
    title: str
    width: int
    height: int
    created: bool = Field(description="False: the same file existed already.")


class RejectedFile(BaseModel):
    file: str
    code: str
    message: str


class ImageUploadResult(BaseModel):
    images: list[UploadedImage]
    rejected: list[RejectedFile]


class VariantSet(BaseModel):
    id: int
    state: models.VariantSetState
    recipe_version: str
    key_version: str = Field(description="In every object key; empty for the legacy (unversioned) set.")
    storage: str
    folder: str
    widths: list[int]
    ready_widths: list[int]
    formats: list[str]
    complete: bool
    bytes: int
    params: dict[str, Any] = Field(description='Per-image encoder choices, e.g. {"quality": {"avif": 52, "webp": 71}}.')
    created_at: IsoDateTime
    completed_at: IsoDateTime | None
    superseded_at: IsoDateTime | None
    urls: dict[str, dict[str, str]] = Field(description="Format -> width (as a string) -> URL, ready tiers only.")


class ImageVariants(BaseModel):
    ready: bool
    ready_max_width: int
    recipe_version: str
    current_recipe_version: str
    stale: bool = Field(description="The serving set was made with another recipe.")
    error: str
    serving: VariantSet | None
    candidates: list[VariantSet]
    superseded: list[VariantSet]


class ImageDetail(BaseModel):
    id: int
    title: str
    image_key: str
    mime_type: str
    width: int
    height: int
    blurhash: str
    created_at: IsoDateTime
    deleted_at: IsoDateTime | None
    variants: ImageVariants


def _responses(success: int, model: type[BaseModel] | None, *errors: int) -> dict:
    return responses(success, model, ERRORS, *errors)


router = Router(tags=["Gallery"])

Files = Annotated[list[UploadedFile] | None, File(None)]


@router.post(
    "/images",
    auth=Requires(UPLOAD),
    url_name="api-images",
    operation_id="images_create",
    summary="Upload one or many photos (multipart field file or files).",
    **_responses(201, ImageUploadResult, 400, 413, 503),
)
def images_create(request: HttpRequest, file: Files = None, files: Files = None) -> Status:
    uploads = [*(file or []), *(files or [])]
    if not uploads:
        raise ApiError(status=400, code="no_file", message="Send one or more files in the multipart field 'file' (or 'files').")
    report = ingest_uploads(
        sources=[IngestSource(name=f.name, read=f.read, size=f.size) for f in uploads],
        uploaded_by=request.user,
    )
    rejected = [_rejected(item) for item in report.rejected]
    if not report.accepted:
        details = [r.model_dump() for r in rejected]
        if all(item.code == OriginalStorageError.code for item in report.rejected):
            # Not the files' fault: the server could not store them (503, try again).
            raise ApiError(
                status=503,
                code=OriginalStorageError.code,
                message="The originals storage is unavailable; nothing was saved.",
                details=details,
            )
        raise ApiError(
            status=400, code="all_rejected", message=f"None of the {len(uploads)} file(s) is an acceptable image.", details=details
        )
    return Status(201, ImageUploadResult(images=[_uploaded(item) for item in report.accepted], rejected=rejected))


def _uploaded(item: IngestItem) -> UploadedImage:
    return from_object(UploadedImage, item.image, created=item.status == "imported")


def _rejected(item: IngestItem) -> RejectedFile:
    return RejectedFile(file=item.name, code=item.code, message=item.message)


def _image_or_404(image_id: int) -> models.Image:
    image = None
    if 0 < image_id <= MAX_BIGINT:
        image = models.Image.objects.select_related("serving_set").filter(pk=image_id).first()
    if image is None:
        raise ApiError(status=404, code="image_not_found", message=f"No image with id {image_id}.")
    return image


def image_detail(request: HttpRequest, image_id: int) -> ImageDetail:
    """One image as staff see it: its variant state and the sets it serves or is building."""
    image = _image_or_404(image_id)
    stores = VariantStores()
    sets = image_variant_sets(image=image, stores=stores)
    current = variant_recipe_current().version
    return from_object(
        ImageDetail,
        image,
        variants=ImageVariants(
            ready=image.variants_ready,
            ready_max_width=image.ready_max_width,
            recipe_version=image.variants_recipe,
            current_recipe_version=current,
            stale=bool(image.serving_set_id) and image.variants_recipe != current,
            error=image.variants_error,
            serving=_set(image, sets["serving"], stores) if sets["serving"] else None,
            candidates=[_set(image, vset, stores) for vset in sets["candidates"]],
            superseded=[_set(image, vset, stores) for vset in sets["superseded"]],
        ),
    )


router.get(
    "/images/{int:image_id}",
    auth=Requires(VIEW),
    url_name="api-image",
    operation_id="image_detail",
    summary="One image: its variant state, serving set, candidates and superseded sets.",
    **_responses(200, ImageDetail, 404),
)(image_detail)
# HEAD answers as GET does (without a body), as before; not a second documented operation.
router.api_operation(["HEAD"], "/images/{int:image_id}", auth=Requires(VIEW), include_in_schema=False)(image_detail)


class VariantsAttempt(BaseModel):
    attempt: int = Field(1, ge=1, le=1000, description="Which attempt of the upload's variant job this is.")


class VariantsJobResult(BaseModel):
    outcome: str = Field(description="ready, partial, retrying (recorded; the next attempt is published), "
                         "failed, gone, busy, storage_unavailable or storage_not_configured.")  # fmt: skip


@router.post(
    "/images/{int:image_id}/variants",
    auth=PushSignedOr(UPLOAD),
    url_name="api-image-variants",
    operation_id="image_variants_generate",
    summary="Generate a new upload's variants (its QStash message; the same claim as the upload job).",
    **_responses(200, VariantsJobResult, 400, 404),
)
def image_variants_generate(request: HttpRequest, image_id: int, body: VariantsAttempt | None = None) -> VariantsJobResult:
    if not (0 < image_id <= MAX_BIGINT) or not models.Image.objects.filter(pk=image_id).exists():
        raise ApiError(status=404, code="image_not_found", message=f"No image with id {image_id}.")
    # Failures are recorded on the image and their retry published or scheduled: 2xx. Only an
    # exception (nothing recorded) is a 5xx, which QStash's own retry covers.
    return VariantsJobResult(outcome=generate_variants_job(image_id, body.attempt if body else 1))


@router.delete(
    "/images/{int:image_id}",
    auth=Requires(DELETE),
    operation_id="image_delete",
    summary="Soft-delete an image (hidden at once, its variants removed; the original stays until the collector's "
    "grace ends, and re-uploading the same file restores it). Deleting a deleted image is a 204 as well.",
    **_responses(204, None, 404),
)
def image_delete(request: HttpRequest, image_id: int) -> Status:
    image = _image_or_404(image_id)
    if image.deleted_at is None:
        image_soft_delete(image=image)
    return Status(204, None)


def _set(image: models.Image, vset: models.VariantSet, stores: VariantStores) -> VariantSet:
    store = stores.get(vset.storage_kind, vset.folder)
    urls = {
        fmt: {str(w): variant_url(image=image, vset=vset, store=store, width=w, fmt=fmt) for w in vset.ready_widths}
        for fmt in vset.formats
    } if store is not None else {}
    return from_object(VariantSet, vset, storage=vset.storage_kind, complete=vset.is_complete, urls=urls)
