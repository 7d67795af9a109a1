"""Gallery routes.

``urlpatterns`` is the ``gallery`` namespace (``gallery:grid``, ``gallery:detail``, ``gallery:tiles``);
``api_urlpatterns`` are un-namespaced (``api-images``). picsite/urls.py includes both.
"""

from django.urls import path

from gallery import api, views

app_name = "gallery"

urlpatterns = [
    path("", views.grid, name="grid"),
    path("photos/<int:image_id>/", views.detail, name="detail"),
    path("tiles", views.tiles, name="tiles"),
]

api_urlpatterns = [
    path("api/v1/images", api.images_create, name="api-images"),
    path("api/v1/images/<int:image_id>", api.image_detail, name="api-image"),
]
