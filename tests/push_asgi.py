"""The site's ASGI app with the test tasks registered (``tests.engine_support``), for a live
uvicorn that must serve their routes (the push flow test and bench): the registry has to
hold them before the URLconf builds the API's routers."""

import django

django.setup()

import tests.engine_support  # noqa: E402, F401  (registers the test tasks)
from picsite.asgi import application  # noqa: E402, F401
