"""QStash's own signature (``Upstash-Signature``, verified through the SDK's Receiver) and
Vercel Cron's GET on the tick: only valid ones pass, any junk is a 401 JSON, never a 500."""

from __future__ import annotations

import time

import pytest
from django.test import Client

from api.auth import api_token_create
from tests.api_support import assert_api_error
from tests.qstash_server import mint_signature

pytestmark = pytest.mark.django_db(transaction=True)

CURRENT, NEXT, WRONG = ("sig_" + c * 32 for c in "abc")
PUBLIC = "https://photos.example.com"
TICK = "/api/v1/tasks/tick"
BODY = b'{"from": "qstash"}'
CRON = "cron-secret-0123456789"


@pytest.fixture(autouse=True)
def qstash_settings(settings):
    settings.QSTASH_CURRENT_SIGNING_KEY = CURRENT
    settings.QSTASH_NEXT_SIGNING_KEY = NEXT
    settings.PICSITE_PUBLIC_URL = PUBLIC
    settings.CRON_SECRET = CRON
    settings.PICSITE_PUSH_TICK_BUDGET_S = 2




def post(signature: str, *, body: bytes = BODY, path: str = TICK, **headers: str):
    return Client().post(path, data=body, content_type="application/json", headers={"Upstash-Signature": signature, **headers})


def test_valid_current_key_is_accepted():
    response = post(mint_signature(CURRENT, url=PUBLIC + TICK, body=BODY))
    assert response.status_code == 200, response.content
    assert response.json() == {"run": None}


def test_valid_next_key_is_accepted_during_rotation():
    assert post(mint_signature(NEXT, url=PUBLIC + TICK, body=BODY)).status_code == 200


def test_next_key_alone_configured_still_verifies(settings):
    settings.QSTASH_CURRENT_SIGNING_KEY = ""
    assert post(mint_signature(NEXT, url=PUBLIC + TICK, body=BODY)).status_code == 200
    # The unset current key verifies nothing (not even what it signed before it was cleared).
    assert_api_error(post(mint_signature(CURRENT, url=PUBLIC + TICK, body=BODY)), 401, "invalid_signature")


def test_wrong_key_is_refused():
    assert_api_error(post(mint_signature(WRONG, url=PUBLIC + TICK, body=BODY)), 401, "invalid_signature")


def test_expired_signature_is_refused():
    old = time.time() - 3600
    assert_api_error(post(mint_signature(CURRENT, url=PUBLIC + TICK, body=BODY, now=old)), 401, "invalid_signature")
    # Issued four minutes ago it still passes (so the refusal above is the expiry, not the key).
    recent = time.time() - 240
    assert post(mint_signature(CURRENT, url=PUBLIC + TICK, body=BODY, now=recent)).status_code == 200


def test_changed_body_is_refused():
    signature = mint_signature(CURRENT, url=PUBLIC + TICK, body=BODY)
    assert_api_error(post(signature, body=b'{"from": "mallory"}'), 401, "invalid_signature")


def test_changed_url_is_refused():
    other_path = mint_signature(CURRENT, url=PUBLIC + "/api/v1/preprocess-tasks/tick", body=BODY)
    assert_api_error(post(other_path), 401, "invalid_signature")
    other_host = mint_signature(CURRENT, url="https://evil.example" + TICK, body=BODY)
    assert_api_error(post(other_host), 401, "invalid_signature")


def test_the_url_comes_from_the_setting_not_the_host_header():
    # Signed for the request's own Host: refused, because the site's URL is PICSITE_PUBLIC_URL.
    by_host = mint_signature(CURRENT, url="http://testserver" + TICK, body=BODY)
    assert_api_error(post(by_host), 401, "invalid_signature")


def test_no_public_url_or_no_keys_refuses_everything(settings):
    signature = mint_signature(CURRENT, url=PUBLIC + TICK, body=BODY)
    settings.PICSITE_PUBLIC_URL = ""
    assert_api_error(post(signature), 401, "invalid_signature")
    settings.PICSITE_PUBLIC_URL = PUBLIC
    settings.QSTASH_CURRENT_SIGNING_KEY = settings.QSTASH_NEXT_SIGNING_KEY = ""
    assert_api_error(post(signature), 401, "invalid_signature")


def _no_body_claim() -> str:
    import jwt

    now = int(time.time())
    return jwt.encode({"iss": "Upstash", "sub": PUBLIC + TICK, "nbf": now, "exp": now + 60}, CURRENT, algorithm="HS256")


JUNK = {
    "empty": lambda: "",
    "not a jwt": lambda: "hello",
    "three dots": lambda: "a.b.c",
    "huge": lambda: "x" * 100_000,
    "non-ascii": lambda: "é" * 40,
    "alg none": lambda: ".".join(mint_signature(CURRENT, url=PUBLIC + TICK, body=BODY).split(".")[:2]) + ".",
    "no body claim": _no_body_claim,
    "wrong issuer": lambda: __import__("jwt").encode(
        {"iss": "Mallory", "sub": PUBLIC + TICK, "nbf": int(time.time()), "exp": int(time.time()) + 60, "body": ""},
        CURRENT, algorithm="HS256"),  # fmt: skip
}


@pytest.mark.parametrize("junk", list(JUNK), ids=list(JUNK))
def test_junk_upstash_signature_is_401_json(junk):
    assert_api_error(post(JUNK[junk]()), 401, "invalid_signature")


def test_a_bad_signature_is_not_rescued_by_a_token(staff_user):
    token = api_token_create(user=staff_user, name="ops")[1]
    bad = mint_signature(WRONG, url=PUBLIC + TICK, body=BODY)
    assert_api_error(post(bad, Authorization=f"Bearer {token}"), 401, "invalid_signature")


def test_vercel_cron_get_with_the_secret_ticks():
    response = Client().get(TICK, headers={"Authorization": f"Bearer {CRON}"})
    assert response.status_code == 200, response.content
    assert response.json() == {"run": None}


@pytest.mark.parametrize(
    "authorization",
    ["", "Bearer", "Bearer wrong-secret", f"Basic {CRON}", f"Bearer {CRON}x", "Bearer " + "é" * 10],
)
def test_cron_get_refuses_anything_but_the_secret(authorization):
    headers = {"Authorization": authorization} if authorization else {}
    assert_api_error(Client().get(TICK, headers=headers), 401, "not_authenticated")


def test_cron_get_is_not_a_token_route(staff_user, settings):
    token = api_token_create(user=staff_user, name="ops")[1]
    assert_api_error(Client().get(TICK, headers={"Authorization": f"Bearer {token}"}), 401, "not_authenticated")
    settings.CRON_SECRET = ""  # unset: GET is refused whatever is sent
    assert_api_error(Client().get(TICK, headers={"Authorization": "Bearer "}), 401, "not_authenticated")


def test_post_tick_still_takes_tokens(staff_user):
    token = api_token_create(user=staff_user, name="ops")[1]
    response = Client().post(TICK, data=b"", content_type="application/json", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.content
