from django.apps import AppConfig
from django.core import checks


class GalleryConfig(AppConfig):
    name = "gallery"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from gallery.checks import encoders_check

        checks.register(encoders_check)
