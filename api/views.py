"""Project-wide API routes that belong to no feature app."""

from __future__ import annotations

from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from api.errors import api_error


@csrf_exempt
def api_not_found(request: HttpRequest, rest: str = "") -> JsonResponse:
    """Anything else under /api/v1/: a JSON 404 (never Django's HTML page)."""
    return api_error(404, "not_found", f"No API route at {request.path}.")
