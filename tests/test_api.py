"""The task JSON API (/api/v1/preprocess-tasks/, /api/v1/tasks/), API tokens and push
signatures, on the real Postgres with the Django test client.

Runs are driven in-process (kick, tick); the engine processes items on a helper
thread with its own connection, so these tests commit (transaction=True).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from django.contrib.messages import get_messages
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import Client
from django.utils import timezone
from django_q.models import OrmQ
from PIL import Image as PILImage

from api.auth import api_token_create, api_token_revoke
from api.models import ApiToken
from api.push_sign import sign
from gallery.models import Image
from tasks.models import AdminTaskItem, AdminTaskRun, ItemState, RunStatus
from tests.api_support import assert_api_error
from tests.engine_support import make_images
from tests.live_server import server_env
from tests.variants_support import serve_set

pytestmark = pytest.mark.django_db(transaction=True)

REPO = Path(__file__).resolve().parents[1]
META = "/api/v1/tasks"  # metadata-refresh
PRE = "/api/v1/preprocess-tasks"  # preprocess-images
SECRET, NEXT_SECRET = "push-secret-current", "push-secret-next"

RUN_KEYS = {
    "id", "task_key", "status", "pause_reason", "scope", "budget", "spent", "counters", "cursor", "lease",
    "last_error", "recent_issues", "created_by", "created_at", "started_at", "finished_at", "updated_at",
    "progress",
}  # fmt: skip


@pytest.fixture(autouse=True)
def api_settings(settings, local_storage):
    settings.PICSITE_ADMIN_PAGE_DRIVES_KICKS = True
    settings.PICSITE_PUSH_SECRET = SECRET
    settings.PICSITE_PUSH_SECRET_NEXT = NEXT_SECRET
    settings.PICSITE_ITEM_MAX_ATTEMPTS = 1
    settings.PICSITE_ITEM_RETRY_BASE_S = 0.01
    settings.PICSITE_ITEM_RETRY_CAP_S = 0.05
    settings.PICSITE_PUSH_TICK_BUDGET_S = 20


@pytest.fixture
def token(staff_user) -> str:
    return api_token_create(user=staff_user, name="tests")[1]


@pytest.fixture
def api(token) -> Client:
    """A bearer-token client that would fail any CSRF check (it needs none)."""
    return Client(enforce_csrf_checks=True, headers={"authorization": f"Bearer {token}"})


def real_images(n: int, media_root: Path, **kwargs) -> list[Image]:
    """Synthetic rows whose originals exist (small JPEGs), so metadata refresh succeeds."""
    images = make_images(n, **kwargs)
    for image in images:
        path = media_root / image.original.name
        path.parent.mkdir(parents=True, exist_ok=True)
        PILImage.new("RGB", (40, 30), (120, 80, 40)).save(path, "JPEG")
    return images


def post_json(client: Client, path: str, body, **kwargs):
    data = body if isinstance(body, str | bytes) else json.dumps(body)
    return client.post(path, data=data, content_type="application/json", **kwargs)




def assert_run(body: dict) -> None:
    assert set(body) >= RUN_KEYS
    assert set(body["counters"]) == {"total", "processed", "succeeded", "skipped", "failed"}
    assert set(body["spent"]) == {"items", "seconds", "bytes", "writes"}
    assert set(body["lease"]) == {"owner", "expires_at"}
    assert set(body["progress"]) == {"elapsed_seconds", "items_per_second", "eta_seconds", "percent"}


# --- success shapes ------------------------------------------------------------------------


def test_preview_count_parses_query_params(api):
    images = make_images(3)
    response = api.get(f"{PRE}/preview-count", {"force": "true"})
    assert response.status_code == 200
    body = response.json()
    assert body["task_key"] == "preprocess-images"
    assert body["scope"] == {"mode": "all"}
    assert body["count"] == 3
    assert set(body["estimate"]) >= {"cpu_seconds", "bytes", "object_writes", "basis"}

    ids = f"{images[0].pk},{images[2].pk}"
    body = api.get(f"{META}/preview-count", {"image_ids": ids}).json()
    assert body == {**body, "task_key": "metadata-refresh", "count": 2}
    assert body["scope"] == {"mode": "ids", "image_ids": [images[0].pk, images[2].pk]}
    assert api.get(f"{META}/preview-count", {"missing_only": "1"}).json()["scope"] == {"mode": "missing"}
    assert api.get(f"{META}/preview-count", {"missing_only": "0"}).json()["count"] == 3


@pytest.mark.parametrize(
    ("prefix", "query", "code", "field"),
    [
        (PRE, "force=maybe", "invalid_parameter", "force"),
        (PRE, "stale=", "invalid_parameter", "stale"),
        (META, "image_ids=1,x", "invalid_parameter", "image_ids"),
        (META, "image_ids=0", "invalid_parameter", "image_ids"),
        (META, "image_ids=-3", "invalid_parameter", "image_ids"),
        (META, "image_ids=99999999999999999999", "invalid_parameter", "image_ids"),
        (META, "bogus=1", "unknown_parameter", "bogus"),
        (META, "force=true", "unknown_parameter", "force"),  # a preprocess field, not metadata's
        (PRE, "force=true&stale=true", "invalid_scope", "stale"),
    ],
)
def test_preview_count_rejects_bad_params(api, prefix, query, code, field):
    assert_api_error(api.get(f"{prefix}/preview-count?{query}"), 400, code, field)


def test_create_list_detail(api, staff_user, settings):
    images = make_images(4)
    response = post_json(api, f"{META}/runs", {"scope": {"missing_only": True}, "budget": {"items": 100}})
    assert response.status_code == 201, response.content
    run = response.json()
    assert_run(run)
    assert run["status"] == "queued"
    assert run["task_key"] == "metadata-refresh"
    assert run["scope"] == {"mode": "missing"}
    assert run["budget"] == {"items": 100}
    assert run["counters"]["total"] == 4
    assert run["created_by"] == staff_user.username
    assert response["Location"].endswith(f"{META}/runs/{run['id']}")
    # django-q2 drains were enqueued for the workers.
    assert OrmQ.objects.count() == settings.PICSITE_DRAIN_PARALLELISM

    listing = api.get(f"{META}/runs").json()
    assert [r["id"] for r in listing["active"]] == [run["id"]]
    assert [r["id"] for r in listing["recent"]] == [run["id"]]
    assert api.get(f"{PRE}/runs").json() == {"active": [], "recent": []}

    detail = api.get(f"{META}/runs/{run['id']}").json()
    assert_run(detail)
    assert detail["failed_items"] == []
    assert detail["timeline"] == []
    assert len(images) == 4


def test_kick_drives_the_run_and_finished_kick_is_a_noop(api, media_root):
    real_images(3, media_root)
    run = post_json(api, f"{META}/runs", {"scope": {}}).json()
    response = api.post(f"{META}/runs/{run['id']}/kick")
    assert response.status_code == 200
    body = response.json()
    assert_run(body)
    assert body["status"] == "succeeded"
    assert body["counters"] == {"total": 3, "processed": 3, "succeeded": 3, "skipped": 0, "failed": 0}
    assert body["finished_at"] is not None

    again = api.post(f"{META}/runs/{run['id']}/kick")
    assert again.status_code == 200
    assert again.json()["counters"] == body["counters"]
    assert again.json()["updated_at"] == body["updated_at"]

    detail = api.get(f"{META}/runs/{run['id']}").json()
    assert detail["timeline"] and all(len(point) == 2 for point in detail["timeline"])


def test_kick_without_page_drive_only_enqueues(api, settings):
    settings.PICSITE_ADMIN_PAGE_DRIVES_KICKS = False
    make_images(2)
    run = post_json(api, f"{META}/runs", {"scope": {}}).json()
    queued = OrmQ.objects.count()
    body = api.post(f"{META}/runs/{run['id']}/kick").json()
    assert body["status"] == "queued"
    assert body["counters"]["processed"] == 0
    assert OrmQ.objects.count() == queued + settings.PICSITE_DRAIN_PARALLELISM


def test_cancel_then_cancel_again_is_409(api):
    make_images(2)
    run = post_json(api, f"{META}/runs", {"scope": {}}).json()
    response = api.post(f"{META}/runs/{run['id']}/cancel")
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    assert_api_error(api.post(f"{META}/runs/{run['id']}/cancel"), 409, "invalid_transition")


def test_failed_items_thumbnails_and_retry_failed(api, media_root):
    # No original files: every item fails at fetch (one attempt each in these tests).
    images = make_images(3)
    serve_set(images[0], ready_max_width=480)
    run = post_json(api, f"{META}/runs", {"scope": {}}).json()
    kicked = api.post(f"{META}/runs/{run['id']}/kick").json()
    assert kicked["status"] == "succeeded"
    assert kicked["counters"]["failed"] == 3
    assert kicked["recent_issues"] and kicked["recent_issues"][0]["code"] == "missing_original"

    detail = api.get(f"{META}/runs/{run['id']}").json()
    items = {item["item_id"]: item for item in detail["failed_items"]}
    assert set(items) == {image.pk for image in images}
    first = items[images[0].pk]
    assert set(first) == {"item_id", "state", "attempts", "next_attempt_at", "code", "stage", "message", "thumbnail_url"}
    assert first["state"] == "failed"
    assert first["code"] == "missing_original"
    assert first["stage"] == "fetch"
    assert first["attempts"] == 1
    assert first["thumbnail_url"].endswith(f"{images[0].image_key}_320.webp")
    assert items[images[1].pk]["thumbnail_url"] is None

    retried = api.post(f"{META}/runs/{run['id']}/retry-failed")
    assert retried.status_code == 200
    assert retried.json()["status"] == "queued"
    assert retried.json()["counters"]["failed"] == 0
    assert AdminTaskItem.objects.filter(run_id=run["id"], state=ItemState.RETRYING).count() == 3


def test_retry_failed_without_failures_is_409(api):
    make_images(1)
    run = post_json(api, f"{META}/runs", {"scope": {}}).json()
    assert_api_error(api.post(f"{META}/runs/{run['id']}/retry-failed"), 409, "invalid_transition")


def test_budget_route(api):
    make_images(2)
    run = post_json(api, f"{META}/runs", {"scope": {}}).json()
    response = post_json(api, f"{META}/runs/{run['id']}/budget", {"budget": {"items": 1, "seconds": 2.5}})
    assert response.status_code == 200
    assert response.json()["budget"] == {"items": 1, "seconds": 2.5}
    assert post_json(api, f"{META}/runs/{run['id']}/budget", {"budget": {}}).json()["budget"] == {}
    assert_api_error(post_json(api, f"{META}/runs/{run['id']}/budget", {}), 400, "invalid_body", "budget")
    assert_api_error(post_json(api, f"{META}/runs/{run['id']}/budget", {"budget": 3}), 400, "invalid_body", "budget")
    assert_api_error(
        post_json(api, f"{META}/runs/{run['id']}/budget", {"budget": {"items": -1}}), 400, "invalid_budget", "items"
    )
    assert_api_error(
        post_json(api, f"{META}/runs/{run['id']}/budget", {"budget": {"coins": 1}}), 400, "invalid_budget", "coins"
    )


def test_budget_pause_and_resume(api, media_root):
    real_images(3, media_root)
    run = post_json(api, f"{META}/runs", {"scope": {}, "budget": {"items": 1}}).json()
    paused = api.post(f"{META}/runs/{run['id']}/kick").json()
    assert paused["status"] == "paused"
    assert paused["pause_reason"] == "budget"
    assert paused["counters"]["processed"] == 1
    resumed = post_json(api, f"{META}/runs/{run['id']}/budget", {"budget": {"items": 10}}).json()
    assert resumed["status"] == "queued"
    done = api.post(f"{META}/runs/{run['id']}/kick").json()
    assert done["status"] == "succeeded"
    assert done["counters"]["processed"] == 3


def test_tick_as_staff(api, media_root):
    assert api.post(f"{META}/tick").json() == {"run": None}
    real_images(2, media_root)
    run = post_json(api, f"{META}/runs", {"scope": {}}).json()
    response = api.post(f"{META}/tick")
    assert response.status_code == 200
    body = response.json()["run"]
    assert body["id"] == run["id"]
    assert body["status"] == "succeeded"


# --- request errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "code", "field"),
    [
        ("{not json", 400, "malformed_json", "body"),
        ("", 400, "malformed_json", "body"),
        ('{"scope": {"missing_only": NaN}}', 400, "malformed_json", "body"),
        ('{"scope": {}, "budget": {"seconds": 1e999}}', 400, "malformed_json", "body"),
        (b'{"scope": {"a\xff": 1}}', 400, "malformed_json", "body"),
        ("[1, 2]", 400, "invalid_body", "body"),
        ('"scope"', 400, "invalid_body", "body"),
        ("{}", 400, "invalid_body", "scope"),
        ('{"scope": []}', 400, "invalid_body", "scope"),
        ('{"scope": null}', 400, "invalid_body", "scope"),
        ('{"scope": {}, "extra": 1}', 400, "invalid_body", "extra"),
        ('{"scope": {}, "budget": []}', 400, "invalid_body", "budget"),
        ('{"scope": {"nope": true}}', 400, "invalid_scope", "nope"),
        ('{"scope": {"missing_only": "yes"}}', 400, "invalid_scope", "missing_only"),
        ('{"scope": {"image_ids": "1,2"}}', 400, "invalid_scope", "image_ids"),
        ('{"scope": {"image_ids": [1, true]}}', 400, "invalid_scope", "image_ids"),
        ('{"scope": {"image_ids": [99999999999999999999]}}', 400, "invalid_scope", "image_ids"),
        ('{"scope": {"missing_only": true, "image_ids": [1]}}', 400, "invalid_scope", "image_ids"),
        ('{"scope": {}, "budget": {"items": "many"}}', 400, "invalid_budget", "items"),
        ('{"scope": {}, "budget": {"coins": 1}}', 400, "invalid_budget", "coins"),
    ],
)
def test_create_rejects_bad_bodies(api, body, status, code, field):
    make_images(1)
    assert_api_error(post_json(api, f"{META}/runs", body), status, code, field)
    assert not AdminTaskRun.objects.exists()


def test_oversized_body_is_413(api):
    body = json.dumps({"scope": {}, "pad": "x" * 70_000})
    assert_api_error(post_json(api, f"{META}/runs", body), 413, "body_too_large")


def test_second_run_is_409(api):
    make_images(2)
    first = post_json(api, f"{META}/runs", {"scope": {}}).json()
    error = assert_api_error(post_json(api, f"{META}/runs", {"scope": {}}), 409, "run_active")
    assert error["details"]["run_id"] == first["id"]
    # The other task is independent.
    assert post_json(api, f"{PRE}/runs", {"scope": {"force": True}}).status_code == 201


def test_empty_scope_is_422(api):
    assert_api_error(post_json(api, f"{META}/runs", {"scope": {}}), 422, "empty_scope")


def test_storage_not_configured_is_422(api, settings):
    settings.PICSITE_VARIANT_STORAGE = "none"
    make_images(1)
    assert_api_error(post_json(api, f"{PRE}/runs", {"scope": {}}), 422, "storage_not_configured")
    # metadata-refresh needs no variant storage
    assert post_json(api, f"{META}/runs", {"scope": {}}).status_code == 201


def test_unknown_and_cross_task_runs_are_404(api):
    make_images(1)
    meta_run = post_json(api, f"{META}/runs", {"scope": {}}).json()
    for path in (
        f"{PRE}/runs/{meta_run['id']}",
        f"{PRE}/runs/{meta_run['id'] + 1000}",
        f"{META}/runs/{meta_run['id'] + 1000}",
        f"{META}/runs/99999999999999999999999",
    ):
        assert_api_error(api.get(path), 404, "run_not_found")
    for action in ("kick", "cancel", "retry-failed"):
        assert_api_error(api.post(f"{PRE}/runs/{meta_run['id']}/{action}"), 404, "run_not_found")
    assert_api_error(post_json(api, f"{PRE}/runs/{meta_run['id']}/budget", {"budget": {}}), 404, "run_not_found")
    assert AdminTaskRun.objects.get(pk=meta_run["id"]).status == RunStatus.QUEUED


@pytest.mark.parametrize(
    "path", ["/api/v1/nope", "/api/v1/", "/api/v1", f"{META}/runs/abc", f"{META}/runs/1/explode", f"{META}/runs/"]
)
def test_unknown_api_routes_are_json_404(api, path):
    assert_api_error(api.get(path), 404, "not_found")
    assert_api_error(api.post(path), 404, "not_found")


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("put", f"{META}/tick", "GET, POST"),  # GET is Vercel Cron's (issue 13)
        ("get", f"{META}/runs/1/kick", "POST"),
        ("get", f"{META}/runs/1/items/2", "POST"),
        ("put", f"{META}/runs/1/cancel", "POST"),
        ("delete", f"{PRE}/runs", "GET, POST"),
        ("post", f"{PRE}/preview-count", "GET"),
        ("post", f"{META}/runs/1", "GET"),
        ("post", f"{META}/runs/1/events", "GET"),
        ("post", "/api/v1/schema", "GET, HEAD"),
    ],
)
def test_wrong_method_is_json_405(api, method, path, allow):
    response = getattr(api, method)(path)
    assert_api_error(response, 405, "method_not_allowed")
    assert response["Allow"] == allow


# --- authentication ---------------------------------------------------------------------------

ROUTES = [
    ("get", f"{PRE}/preview-count"),
    ("get", f"{META}/runs"),
    ("post", f"{META}/runs"),
    ("get", f"{META}/runs/1"),
    ("post", f"{META}/runs/1/kick"),
    ("post", f"{META}/runs/1/cancel"),
    ("post", f"{META}/runs/1/retry-failed"),
    ("post", f"{META}/runs/1/budget"),
    ("get", f"{META}/runs/1/events"),
    ("post", f"{META}/tick"),
]


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_anonymous_is_401(client, method, path):
    assert_api_error(getattr(client, method)(path), 401)


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_non_staff_is_403(client, plain_user, method, path):
    client.force_login(plain_user)
    assert_api_error(getattr(client, method)(path), 403, "forbidden")
    token = api_token_create(user=plain_user, name="x")[1]
    bearer = Client(headers={"authorization": f"Bearer {token}"})
    assert_api_error(getattr(bearer, method)(path), 403, "forbidden")


def test_session_post_needs_csrf(staff_user):
    make_images(1)
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(staff_user)
    assert browser.get(f"{META}/runs").status_code == 200  # safe methods need no token
    assert_api_error(post_json(browser, f"{META}/runs", {"scope": {}}), 403, "csrf_failed")
    assert_api_error(browser.post(f"{META}/tick"), 403, "csrf_failed")
    assert not AdminTaskRun.objects.exists()

    csrf = "k" * 32
    browser.cookies["csrftoken"] = csrf
    response = post_json(browser, f"{META}/runs", {"scope": {}}, headers={"x-csrftoken": csrf})
    assert response.status_code == 201, response.content


def test_bearer_token_needs_no_csrf_and_revocation_is_401(staff_user):
    make_images(1)
    token_row, raw = api_token_create(user=staff_user, name="ci")
    assert raw.startswith("pst_") and len(raw) > 40
    assert token_row.prefix == raw[:8]
    assert token_row.token_hash != raw and len(token_row.token_hash) == 64
    bearer = Client(enforce_csrf_checks=True, headers={"authorization": f"Bearer {raw}"})
    assert post_json(bearer, f"{META}/runs", {"scope": {}}).status_code == 201
    token_row.refresh_from_db()
    assert token_row.last_used_at is not None
    first_use = token_row.last_used_at
    assert bearer.get(f"{META}/runs").status_code == 200
    token_row.refresh_from_db()
    assert token_row.last_used_at == first_use  # written at most once a minute

    api_token_revoke(token=token_row)
    assert_api_error(bearer.get(f"{META}/runs"), 401, "not_authenticated")
    for header in ("Bearer pst_not-a-token", "Bearer ", "Bearer"):
        assert_api_error(Client(headers={"authorization": header}).get(f"{META}/runs"), 401)


def test_bad_bearer_token_does_not_fall_back_to_session(staff_user):
    browser = Client(headers={"authorization": "Bearer pst_wrong"})
    browser.force_login(staff_user)
    assert_api_error(browser.get(f"{META}/runs"), 401)


def test_inactive_user_token_is_401(staff_user):
    raw = api_token_create(user=staff_user, name="x")[1]
    staff_user.is_active = False
    staff_user.save()
    assert_api_error(Client(headers={"authorization": f"Bearer {raw}"}).get(f"{META}/runs"), 401)


# --- push-signed tick ----------------------------------------------------------------------------


def test_push_sign_matches_the_documented_recipe():
    import hashlib
    import hmac

    body = b'{"x": 1}'
    expected = hmac.new(b"k", b"1700000000\nPOST\n/api/v1/tasks/tick\n" + body, hashlib.sha256).hexdigest()
    assert sign("k", "post", "/api/v1/tasks/tick", body, ts=1700000000) == {
        "X-Picsite-Timestamp": "1700000000",
        "X-Picsite-Signature": f"sha256={expected}",
    }


def signed_tick(client: Client, path: str, *, secret: str = SECRET, body: bytes = b"", skew_s=None, send=None):
    # The timestamp is taken now, not at collection (a long session would age it).
    headers = sign(secret, "POST", path, body, ts=None if skew_s is None else int(time.time()) + skew_s)
    return client.post(path, data=send if send is not None else body, content_type="application/json", headers=headers)


@pytest.mark.parametrize("secret", [SECRET, NEXT_SECRET])
def test_signed_tick_with_either_secret(client, media_root, staff_user, secret):
    real_images(2, media_root)
    run = post_json(Client(headers={"authorization": f"Bearer {api_token_create(user=staff_user, name='t')[1]}"}),
                    f"{META}/runs", {"scope": {}}).json()  # fmt: skip
    response = signed_tick(client, f"{META}/tick", secret=secret, body=b'{"from": "cron"}')
    assert response.status_code == 200, response.content
    assert response.json()["run"]["id"] == run["id"]
    assert response.json()["run"]["status"] == "succeeded"


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"secret": "wrong-secret"}, "invalid_signature"),
        ({"skew_s": -301}, "invalid_signature"),
        ({"skew_s": 400}, "invalid_signature"),
        ({"body": b'{"a": 1}', "send": b'{"a": 2}'}, "invalid_signature"),
    ],
)
def test_bad_signatures_are_401(client, kwargs, code):
    make_images(1)
    assert_api_error(signed_tick(client, f"{META}/tick", **kwargs), 401, code)


def test_signature_for_another_path_or_missing_parts_is_401(client):
    headers = sign(SECRET, "POST", f"{PRE}/tick", b"")
    assert_api_error(client.post(f"{META}/tick", headers=headers), 401, "invalid_signature")
    headers = sign(SECRET, "POST", f"{META}/tick", b"")
    only_signature = {"X-Picsite-Signature": headers["X-Picsite-Signature"]}
    assert_api_error(client.post(f"{META}/tick", headers=only_signature), 401, "invalid_signature")
    bad_timestamp = {**headers, "X-Picsite-Timestamp": "soon"}
    assert_api_error(client.post(f"{META}/tick", headers=bad_timestamp), 401, "invalid_signature")
    assert_api_error(client.post(f"{META}/tick"), 401, "not_authenticated")


def test_signatures_disabled_without_secrets(client, settings):
    settings.PICSITE_PUSH_SECRET = settings.PICSITE_PUSH_SECRET_NEXT = ""
    assert_api_error(signed_tick(client, f"{META}/tick", secret=""), 401, "invalid_signature")


def test_non_staff_with_bad_signature_is_401_and_staff_with_bad_signature_passes(client, plain_user, api):
    client.force_login(plain_user)
    assert_api_error(signed_tick(client, f"{META}/tick", secret="wrong"), 401, "invalid_signature")
    headers = sign("wrong", "POST", f"{META}/tick", b"")
    response = api.post(f"{META}/tick", data=b"", content_type="application/json", headers=headers)
    assert response.status_code == 200


def test_signature_does_not_open_other_routes(client):
    make_images(1)
    path = f"{META}/runs"
    response = post_json(client, path, {"scope": {}}, headers=sign(SECRET, "POST", path, b'{"scope": {}}'))
    assert_api_error(response, 401, "not_authenticated")


def test_duplicate_signed_delivery_is_harmless(media_root, staff_user, settings):
    """Two signed deliveries at once (each signed anew, as a re-signing push service
    sends them): both 200, every item processed once. A copy of an accepted delivery
    is refused (replay store), so it cannot run anything."""
    n = 24
    real_images(n, media_root)
    api = Client(headers={"authorization": f"Bearer {api_token_create(user=staff_user, name='t')[1]}"})
    run = post_json(api, f"{META}/runs", {"scope": {}}).json()
    path = f"{META}/tick"
    now = int(time.time())
    deliveries = [sign(SECRET, "POST", path, b"", ts=now), sign(SECRET, "POST", path, b"", ts=now - 1)]
    results: list[int] = []

    def deliver(headers: dict[str, str]) -> None:
        from django.db import connection

        try:
            results.append(Client().post(path, data=b"", content_type="application/json", headers=headers).status_code)
        finally:
            connection.close()

    threads = [threading.Thread(target=deliver, args=(headers,)) for headers in deliveries]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [200, 200]
    # A third, late copy of one of them is refused; a fresh one finds nothing to do.
    late = Client().post(path, data=b"", content_type="application/json", headers=deliveries[0])
    assert_api_error(late, 401, "replayed_signature")
    fresh = Client().post(path, data=b"", content_type="application/json", headers=sign(SECRET, "POST", path, b"", ts=now + 1))
    assert fresh.json() == {"run": None}

    done = AdminTaskRun.objects.get(pk=run["id"])
    assert done.status == RunStatus.SUCCEEDED
    assert done.total == n
    assert done.spent_items == n  # one checkpoint per item: nothing ran twice
    assert done.processed == n
    assert done.succeeded + done.skipped + done.failed == n


# --- tokens: command and admin ----------------------------------------------------------------


def test_create_api_token_command(staff_user, capsys):
    call_command("create_api_token", staff_user.username, "--name", "deploy")
    raw = capsys.readouterr().out.strip()
    assert raw.startswith("pst_")
    token = ApiToken.objects.get()
    assert token.name == "deploy" and token.prefix == raw[:8] and token.user == staff_user
    assert Client(headers={"authorization": f"Bearer {raw}"}).get(f"{META}/runs").status_code == 200

    with pytest.raises(CommandError, match="no user named"):
        call_command("create_api_token", "nobody")


def test_create_api_token_command_exit_codes(staff_user, tmp_path):
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "manage.py", "create_api_token", *args],
            cwd=REPO,
            env=server_env(media_root=tmp_path),
            capture_output=True,
            text=True,
            timeout=60,
        )

    missing = run("nobody")
    assert missing.returncode == 1
    assert "no user named 'nobody'" in missing.stderr
    ok = run(staff_user.username)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip().startswith("pst_")


def test_admin_creates_token_shown_once_and_revokes(client, django_user_model):
    admin_user = django_user_model.objects.create_superuser("root", "root@example.com", "pw-root-123")
    client.force_login(admin_user)
    response = client.post(
        "/admin/api/apitoken/add/", {"user": admin_user.pk, "name": "from-admin", "scopes": ["read", "write"]}, follow=True
    )
    assert response.status_code == 200
    token = ApiToken.objects.get(name="from-admin")
    shown = [str(m) for m in get_messages(response.wsgi_request)] + [response.content.decode()]
    raw = next(word for text in shown for word in text.split() if word.startswith("pst_"))
    raw = raw.split("<")[0]
    assert token.prefix == raw[:8]
    assert Client(headers={"authorization": f"Bearer {raw}"}).get(f"{META}/runs").status_code == 200

    listing = client.get("/admin/api/apitoken/")
    assert token.prefix in listing.content.decode()
    assert raw not in listing.content.decode()
    client.post(
        "/admin/api/apitoken/",
        {"action": "revoke_tokens", "_selected_action": [token.pk]},
        follow=True,
    )
    token.refresh_from_db()
    assert token.revoked_at is not None and token.revoked_at <= timezone.now()
    assert_api_error(Client(headers={"authorization": f"Bearer {raw}"}).get(f"{META}/runs"), 401)


# --- schema ------------------------------------------------------------------------------------


def test_openapi_schema(client):
    from openapi_spec_validator import validate

    response = client.get("/api/v1/schema")
    assert response.status_code == 200
    document = response.json()
    validate(document)
    paths = document["paths"]
    for prefix in (PRE, META):
        for suffix in (
            "/preview-count", "/runs", "/runs/{run_id}", "/runs/{run_id}/kick", "/runs/{run_id}/cancel",
            "/runs/{run_id}/retry-failed", "/runs/{run_id}/budget", "/runs/{run_id}/events", "/tick",
        ):  # fmt: skip
            assert prefix + suffix in paths
    assert "post" in paths["/api/v1/images"]
    assert set(document["components"]["securitySchemes"]) == {"bearerAuth", "cookieAuth"}
    params = {p["name"] for p in paths[f"{PRE}/preview-count"]["get"]["parameters"]}
    assert params == {"force", "stale", "failed_only", "new_only", "image_ids"}
