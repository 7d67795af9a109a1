from django.apps import AppConfig


class PicsiteConfig(AppConfig):
    """The project package as an app: it owns API tokens (``picsite.models.ApiToken``)."""

    name = "picsite"
    verbose_name = "API access"
    default_auto_field = "django.db.models.BigAutoField"
