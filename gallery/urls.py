"""Gallery pages: the ``gallery`` namespace (``gallery:grid``, ``gallery:detail``, and
``gallery:tiles``, the grid's polling route). The gallery's JSON API is the ``api`` app's
(``api.images``)."""

from django.urls import path

from gallery import views

app_name = "gallery"

urlpatterns = [
    path("", views.grid, name="grid"),
    path("photos/<int:image_id>/", views.detail, name="detail"),
    path("tiles", views.tiles, name="tiles"),
]
