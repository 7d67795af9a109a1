"""Auth of a push-driven route (``.../tick``, ``.../runs/<id>/items/<item_id>``,
``images/<id>/variants``): a request signed by QStash (``Upstash-Signature``,
``api.qstash_sign``) or with our HMAC (``api.push_sign``) is authority enough, so a cron job
or a push service can drive the engine without a user; so is Vercel Cron's ``GET`` with
``Authorization: Bearer $CRON_SECRET`` on the tick."""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth.base_user import AbstractBaseUser
from django.http import HttpRequest

from api import push_sign, qstash_sign
from api.auth import Access, ApiAuthError, api_authorize
from api.http import json_body_bytes
from api.push_replay import push_signature_use_record

PUSH_SIGNATURE = "push_signature"  # request.api_auth of a signed request
QSTASH_SIGNATURE = "qstash_signature"  # ... of a request signed by QStash
CRON_SECRET = "cron_secret"  # ... of Vercel Cron's GET


def _signature_sent(request: HttpRequest) -> bool:
    headers = request.headers
    return push_sign.TIMESTAMP_HEADER in headers or push_sign.SIGNATURE_HEADER in headers


def push_signature_problem(request: HttpRequest) -> str | None:
    """None if the request is signed under a configured push secret, else why not.

    A good signature is used up here; a second use raises ApiAuthError (401
    ``replayed_signature``), which no other credential on the request overrides.
    """
    secrets = [s for s in (settings.PICSITE_PUSH_SECRET, settings.PICSITE_PUSH_SECRET_NEXT) if s]
    if not secrets:
        return "push signatures are not configured on this server"
    timestamp = request.headers.get(push_sign.TIMESTAMP_HEADER)
    signature_header = request.headers.get(push_sign.SIGNATURE_HEADER)
    problem = push_sign.verify(
        secrets=secrets,
        method=request.method or "",
        path=request.path,
        body=json_body_bytes(request),
        timestamp=timestamp,
        signature_header=signature_header,
    )
    if problem is not None:
        return problem
    signed = push_sign.parse_headers(timestamp=timestamp, signature_header=signature_header)
    assert isinstance(signed, push_sign.SignedHeaders)  # verify accepted them
    if not push_signature_use_record(digest=signed.digest, timestamp=signed.timestamp):
        raise ApiAuthError(
            status=401,
            code="replayed_signature",
            message="This push signature was already used; sign every request anew.",
        )
    return None


class PushSignedOr:
    """A good push signature, or else a caller with ``access``. On a bad signature the
    caller still passes on its own credentials, else it gets a 401 saying what was wrong
    with the signature."""

    def __init__(self, access: Access, *, cron_get: bool = False):
        self.access = access
        self.cron_get = cron_get  # GET is Vercel Cron's, with CRON_SECRET and nothing else

    def __call__(self, request: HttpRequest) -> AbstractBaseUser | str:
        if self.cron_get and request.method == "GET":
            # Before any token lookup: the cron secret is not an API token.
            if qstash_sign.cron_secret_matches(request):
                request.api_auth = CRON_SECRET
                return CRON_SECRET
            raise ApiAuthError(
                status=401, code="not_authenticated", message="A GET tick needs Authorization: Bearer <CRON_SECRET>."
            )
        if qstash_sign.SIGNATURE_HEADER in request.headers:
            problem = qstash_sign.qstash_signature_problem(request=request, body=json_body_bytes(request))
            if problem is None:
                request.api_auth = QSTASH_SIGNATURE
                return QSTASH_SIGNATURE
            raise ApiAuthError(status=401, code="invalid_signature", message=f"QStash signature refused: {problem}.")
        if not _signature_sent(request):
            return api_authorize(request, access=self.access)
        problem = push_signature_problem(request)
        if problem is None:
            request.api_auth = PUSH_SIGNATURE
            return PUSH_SIGNATURE
        try:
            return api_authorize(request, access=self.access)
        except ApiAuthError:
            raise ApiAuthError(
                status=401, code="invalid_signature", message=f"Push signature refused: {problem}."
            ) from None
