import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "picsite.settings")
django_application = get_asgi_application()

from api.body_limit import BodyLimitMiddleware  # noqa: E402  (needs settings configured)

# Bodies are refused by size before Django's handler reads (and spools) them.
application = BodyLimitMiddleware(django_application)
