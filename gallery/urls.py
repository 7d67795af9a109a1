"""Gallery pages: the ``gallery`` namespace (``gallery:grid``, ``gallery:detail``).
The gallery's JSON routes are the ``api`` app's (``api.images``)."""

from django.urls import path

from gallery import views

app_name = "gallery"

urlpatterns = [
    path("", views.grid, name="grid"),
    path("photos/<int:image_id>/", views.detail, name="detail"),
]
