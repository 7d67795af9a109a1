"""JSON API: ``POST /api/v1/images`` (multipart upload of one or many photos).

A thin adapter: auth via ``picsite.api_auth.api_authorize`` (a staff user with
``gallery.add_image``, as the admin's upload form requires; a token needs the
``write`` scope), the work in ``gallery.importer.ingest_uploads``. Every error is a
JSON ``{"error": {...}}`` body.
"""

from __future__ import annotations

from django.core.exceptions import RequestDataTooBig, TooManyFieldsSent, TooManyFilesSent
from django.http import HttpRequest, JsonResponse
from django.http.multipartparser import MultiPartParserError
from django.views.decorators.csrf import csrf_exempt

from gallery.importer import IngestItem, IngestSource, ingest_uploads
from gallery.services import OriginalStorageError
from picsite.api_auth import Access, ApiAuthError, api_authorize, api_error

FILE_FIELDS = ("file", "files")
UPLOAD = Access(permission="gallery.add_image", scopes=("write",))


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
