from django.apps import AppConfig


class ApiConfig(AppConfig):
    """API access: tokens (``api.models.ApiToken``), the push replay store, their admin."""

    name = "api"
    label = "api"
    verbose_name = "API access"
    default_auto_field = "django.db.models.BigAutoField"
