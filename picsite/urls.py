from django.conf import settings
from django.contrib import admin
from django.urls import include, path, re_path

from gallery import urls as gallery_urls
from tasks import admin_views as task_admin_views
from tasks import api as tasks_api

urlpatterns = [
    # Before admin.site.urls, whose catch-all would otherwise answer /admin/tasks/.
    path("admin/tasks/", task_admin_views.tasks_page, name="admin-tasks"),
    path("admin/", admin.site.urls),
    path("", include(gallery_urls.api_urlpatterns)),  # un-namespaced: "api-images"
    path("api/v1/", include("tasks.urls")),  # /api/v1/preprocess-tasks/..., /api/v1/tasks/...
    path("api/v1/schema", tasks_api.api_schema, name="api-schema"),
    # Anything else under /api/v1 is a JSON 404 (no HTML page, no APPEND_SLASH redirect).
    re_path(r"^api/v1(?:/(?P<rest>.*))?$", tasks_api.api_not_found),
    path("", include("gallery.urls")),  # namespace "gallery"
]

if settings.DEBUG:
    from django.conf.urls.static import static

    urlpatterns += static(settings.MEDIA_URL, document_root=settings.MEDIA_ROOT)
