"""Auth of a push-driven route (``POST .../tick``): an HMAC-signed request (``api.push_sign``)
is authority enough, so a cron job or a push service can drive the engine without a user."""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth.base_user import AbstractBaseUser
from django.http import HttpRequest

from api import push_sign
from api.auth import Access, ApiAuthError, api_authorize
from api.http import json_body_bytes
from api.push_replay import push_signature_use_record

PUSH_SIGNATURE = "push_signature"  # request.api_auth of a signed request


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

    def __init__(self, access: Access):
        self.access = access

    def __call__(self, request: HttpRequest) -> AbstractBaseUser | str:
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
