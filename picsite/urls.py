from django.conf import settings
from django.contrib import admin
from django.urls import include, path, re_path

from tasks import admin_views as task_admin_views


def healthz(request):
    """Liveness plus a database round trip (Docker HEALTHCHECK, load balancers)."""
    from django.db import connection
    from django.http import JsonResponse

    try:
        with connection.cursor() as cur:
            cur.execute("SELECT 1")
    except Exception as exc:
        return JsonResponse({"ok": False, "error": type(exc).__name__}, status=503)
    return JsonResponse({"ok": True})


urlpatterns = [
    path("healthz", healthz, name="healthz"),
    # Before admin.site.urls, whose catch-all would otherwise answer /admin/tasks/.
    path("admin/tasks/", task_admin_views.tasks_page, name="admin-tasks"),
    path("admin/", admin.site.urls),
    path("", include("api.urls")),  # the JSON API under /api/v1/ (and its JSON 404)
    path("", include("gallery.urls")),  # namespace "gallery"
]

if settings.PICSITE_VARIANT_STORAGE == "local" and settings.PICSITE_VARIANT_LOCAL_URL.startswith("/"):
    from django.views.static import serve

    def serve_variant(request, path):
        return serve(request, path, document_root=settings.PICSITE_VARIANT_LOCAL_ROOT)

    # Local variants are served by Django (put a CDN or nginx in front in production);
    # originals are never served: they may carry GPS.
    prefix = settings.PICSITE_VARIANT_LOCAL_URL.lstrip("/")
    urlpatterns.insert(0, re_path(rf"^{prefix}(?P<path>.*)$", serve_variant))
