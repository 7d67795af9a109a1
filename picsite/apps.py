from django.apps import AppConfig


class PicsiteConfig(AppConfig):
    """The project package as an app only for its migration history: it has no models.

    ApiToken and PushSignatureUse were created by picsite.0001-0003 and moved to the
    ``api`` app by picsite.0004 / api.0001 (state only: the tables keep their names and
    rows). A new database still builds those tables through picsite.0001-0003, so the
    app stays installed until a squash gives ``api`` a migration that creates them.
    """

    name = "picsite"
    verbose_name = "picsite (migration history)"
    default_auto_field = "django.db.models.BigAutoField"
