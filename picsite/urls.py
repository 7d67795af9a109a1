from django.conf import settings
from django.contrib import admin
from django.urls import include, path

from gallery import urls as gallery_urls

urlpatterns = [
    path("admin/", admin.site.urls),
    path("", include(gallery_urls.api_urlpatterns)),  # un-namespaced: "api-images"
    path("", include("gallery.urls")),  # namespace "gallery"
]

if settings.DEBUG:
    from django.conf.urls.static import static

    urlpatterns += static(settings.MEDIA_URL, document_root=settings.MEDIA_ROOT)
