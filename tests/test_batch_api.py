"""Batch runs through the JSON API (issue 12): create with a callback URL and the report of
missing and duplicate ids, the 1,000-id limit, storage checks, every active run in the
list, keyset pages of a run's items (batch rows or a library run's ledger), finish records
with their callback deliveries on the run, preview-count of an explicit batch, and
DELETE /api/v1/images/<id>; with the permissions the admin would ask for."""

from __future__ import annotations

import json

import pytest
from django.test import Client
from django.utils import timezone

from api.auth import api_token_create
from gallery.models import Image, VariantSet
from tasks import engine
from tasks.models import AdminTaskRun, AdminTaskRunFinish, RunStatus
from tests.api_support import assert_api_error
from tests.engine_support import TEST_BATCH_TASK_KEY, make_images, on_finish_calls_reset
from tests.perms import grant
from tests.test_batch_runs import SECRET, Receiver, drain

pytestmark = pytest.mark.django_db(transaction=True)

BATCH = f"/api/v1/{TEST_BATCH_TASK_KEY}"
PRE = "/api/v1/preprocess-tasks"
META = "/api/v1/tasks"


@pytest.fixture(autouse=True)
def batch_settings(settings):
    settings.PICSITE_ADMIN_PAGE_DRIVES_KICKS = False  # kicks only enqueue: the tests drive runs
    settings.PICSITE_ITEM_RETRY_BASE_S = 0.01
    settings.PICSITE_ITEM_RETRY_CAP_S = 0.05
    settings.PICSITE_ITEM_MAX_ATTEMPTS = 2
    settings.PICSITE_WEBHOOK_SECRET = SECRET
    settings.PICSITE_WEBHOOK_ALLOWED_HOSTS = ["127.0.0.1"]
    settings.PICSITE_WEBHOOK_RETRY_BASE_S = 0.01
    on_finish_calls_reset()


@pytest.fixture
def api(staff_user) -> Client:
    """A bearer-token client that would fail any CSRF check (tokens need none)."""
    return Client(enforce_csrf_checks=True, headers={"authorization": f"Bearer {api_token_create(user=staff_user, name='t')[1]}"})


def post_json(client: Client, path: str, body):
    return client.post(path, data=json.dumps(body), content_type="application/json")




def all_pages(api: Client, path: str, **query) -> list[dict]:
    items, after, pages = [], None, 0
    while True:
        params = {**query, **({"after": after} if after is not None else {})}
        body = api.get(path, params).json()
        items += body["items"]
        pages += 1
        after = body["next"]
        if after is None:
            return items
        assert pages < 100


# --- create ----------------------------------------------------------------------------------


def test_a_batch_create_reports_missing_ids_and_duplicates(api):
    a, b, c = make_images(3)
    response = post_json(api, f"{BATCH}/runs", {"scope": {"image_ids": [c.pk, a.pk, 987654321, c.pk, b.pk, a.pk]}})
    assert response.status_code == 201, response.content
    run = response.json()
    assert run["kind"] == "batch"
    assert run["missing"] == [987654321]
    assert run["duplicates"] == [c.pk, a.pk]
    assert run["counters"]["total"] == 3
    # A library run of the same task still starts beside it, and reports no batch fields.
    library = post_json(api, f"{BATCH}/runs", {"scope": {}})
    assert library.status_code == 201, library.content
    assert library.json()["kind"] == "library" and "missing" not in library.json()


def test_a_callback_url_is_kept_on_the_run_and_a_private_one_refused(api, settings):
    (image,) = make_images(1)
    response = post_json(api, f"{BATCH}/runs", {"scope": {"image_ids": [image.pk]}, "callback_url": "http://127.0.0.1:9/hook"})
    assert response.status_code == 201, response.content
    assert AdminTaskRun.objects.get(pk=response.json()["id"]).callback_url == "http://127.0.0.1:9/hook"
    settings.PICSITE_WEBHOOK_ALLOWED_HOSTS = []
    error = assert_api_error(
        post_json(api, f"{BATCH}/runs", {"scope": {"image_ids": [image.pk]}, "callback_url": "https://10.0.0.1/hook"}),
        400,
        "invalid_callback_url",
    )
    assert error["details"] == {"field": "callback_url"}
    assert AdminTaskRun.objects.count() == 1


@pytest.mark.parametrize("prefix", [PRE, META, BATCH])
def test_more_than_1000_ids_is_a_400_naming_the_limit(api, local_storage, prefix):
    error = assert_api_error(post_json(api, f"{prefix}/runs", {"scope": {"image_ids": list(range(1, 1002))}}), 400, "invalid_scope")
    assert error["details"]["field"] == "image_ids"
    assert error["details"]["limit"] == 1000 and "1000" in error["message"]
    assert not AdminTaskRun.objects.exists()
    # Exactly 1,000 is allowed (all missing but one here).
    (image,) = make_images(1)
    ok = post_json(api, f"{prefix}/runs", {"scope": {"image_ids": [image.pk, *range(10**9, 10**9 + 999)]}})
    assert ok.status_code == 201, ok.content
    assert len(ok.json()["missing"]) == 999


def test_a_batch_over_unconfigured_variant_storage_is_422(api, settings):
    settings.PICSITE_VARIANT_STORAGE = "none"
    images = make_images(2)
    for scope in ({"image_ids": [i.pk for i in images]}, {}):  # a batch, and a library run as before
        assert_api_error(post_json(api, f"{PRE}/runs", {"scope": scope}), 422, "storage_not_configured")
    assert not AdminTaskRun.objects.exists()


# --- list, items, detail ---------------------------------------------------------------------


def test_runs_list_shows_every_active_run(api):
    images = make_images(4)
    library = post_json(api, f"{BATCH}/runs", {"scope": {}}).json()
    first = post_json(api, f"{BATCH}/runs", {"scope": {"image_ids": [images[0].pk]}}).json()
    second = post_json(api, f"{BATCH}/runs", {"scope": {"image_ids": [images[1].pk, images[2].pk]}}).json()
    listing = api.get(f"{BATCH}/runs").json()
    assert [run["id"] for run in listing["active"]] == [second["id"], first["id"], library["id"]]
    assert [run["kind"] for run in listing["active"]] == ["batch", "batch", "library"]
    assert api.post(f"{BATCH}/runs/{first['id']}/cancel").json()["status"] == "cancelled"
    assert [run["id"] for run in api.get(f"{BATCH}/runs").json()["active"]] == [second["id"], library["id"]]


def test_the_active_list_is_capped_but_keeps_the_library_run(api, monkeypatch):
    from tasks.engine import services

    monkeypatch.setattr(services, "ACTIVE_LISTED_MAX", 3)
    images = make_images(4)
    library = post_json(api, f"{BATCH}/runs", {"scope": {}}).json()
    batches = [post_json(api, f"{BATCH}/runs", {"scope": {"image_ids": [i.pk]}}).json() for i in images]
    listing = api.get(f"{BATCH}/runs").json()
    assert [run["id"] for run in listing["active"]] == [batches[3]["id"], batches[2]["id"], library["id"]]


def test_batch_items_come_in_keyset_pages_in_submission_order(api):
    images = make_images(7, titles={2: "fail-always"})
    ids = [images[i].pk for i in (5, 0, 2, 6, 1, 3, 4)]
    run = post_json(api, f"{BATCH}/runs", {"scope": {"image_ids": [ids[0], 987654321, *ids[1:]]}}).json()
    before = all_pages(api, f"{BATCH}/runs/{run['id']}/items", limit=3)
    assert [i["item_id"] for i in before] == [ids[0], 987654321, *ids[1:]]
    assert [i["position"] for i in before] == list(range(8))
    assert [i["state"] for i in before] == ["pending", "missing", *["pending"] * 6]
    page = api.get(f"{BATCH}/runs/{run['id']}/items", {"limit": 3}).json()
    assert (page["kind"], page["bookkeeping"], page["next"]) == ("batch", "items", 2)

    assert drain(run["id"]).status == RunStatus.SUCCEEDED
    items = all_pages(api, f"{BATCH}/runs/{run['id']}/items", limit=2)
    assert [i["item_id"] for i in items] == [ids[0], 987654321, *ids[1:]]
    by_id = {i["item_id"]: i for i in items}
    failed = by_id[images[2].pk]
    assert (failed["state"], failed["attempts"], failed["error"]["code"]) == ("failed", 2, "boom")
    done = by_id[images[5].pk]
    assert done["state"] == "succeeded" and done["result"] == {"title": images[5].title}
    assert done["started_at"] and done["finished_at"] and done["error"] is None
    assert [i["item_id"] for i in all_pages(api, f"{BATCH}/runs/{run['id']}/items", state="failed")] == [images[2].pk]
    assert [i["item_id"] for i in all_pages(api, f"{BATCH}/runs/{run['id']}/items", state="missing")] == [987654321]
    assert len(all_pages(api, f"{BATCH}/runs/{run['id']}/items", state="succeeded", limit=1)) == 6


def test_a_library_runs_items_are_its_failure_ledger(api):
    images = make_images(5, titles={1: "fail-always", 3: "fail-always"})
    run = post_json(api, f"{BATCH}/runs", {"scope": {}}).json()
    drain(run["id"])
    page = api.get(f"{BATCH}/runs/{run['id']}/items").json()
    assert (page["kind"], page["bookkeeping"], page["next"]) == ("library", "failures", None)
    assert [(i["item_id"], i["state"], i["position"]) for i in page["items"]] == [
        (images[1].pk, "failed", None),
        (images[3].pk, "failed", None),
    ]
    first = api.get(f"{BATCH}/runs/{run['id']}/items", {"limit": 1}).json()
    assert first["next"] == images[1].pk
    second = api.get(f"{BATCH}/runs/{run['id']}/items", {"limit": 1, "after": first["next"]}).json()
    assert [i["item_id"] for i in second["items"]] == [images[3].pk] and second["next"] is None


@pytest.mark.parametrize(
    ("query", "field"), [("state=done", "state"), ("limit=0", "limit"), ("limit=501", "limit"), ("after=-1", "after")]
)
def test_bad_item_queries_are_400(api, query, field):
    (image,) = make_images(1)
    run = post_json(api, f"{BATCH}/runs", {"scope": {"image_ids": [image.pk]}}).json()
    error = assert_api_error(api.get(f"{BATCH}/runs/{run['id']}/items?{query}"), 400, "invalid_parameter")
    assert error["details"]["field"] == field


def test_items_of_an_unknown_or_other_tasks_run_are_404(api):
    (image,) = make_images(1)
    run = post_json(api, f"{BATCH}/runs", {"scope": {"image_ids": [image.pk]}}).json()
    assert_api_error(api.get(f"{META}/runs/{run['id']}/items"), 404, "run_not_found")
    assert_api_error(api.get(f"{BATCH}/runs/999999/items"), 404, "run_not_found")


def test_run_detail_shows_finishes_and_their_callback_deliveries(api, settings):
    settings.PICSITE_WEBHOOK_RETRY_BASE_S = 3600  # the retry waits until the test makes it due
    receiver = Receiver(fail_first=1)
    try:
        images = make_images(2)
        body = {"scope": {"image_ids": [i.pk for i in images]}, "callback_url": receiver.url}
        run = post_json(api, f"{BATCH}/runs", body).json()
        drain(run["id"])
        detail = api.get(f"{BATCH}/runs/{run['id']}").json()
        assert detail["callback_url"] == receiver.url
        (finish,) = detail["finishes"]
        assert (finish["seq"], finish["status"], finish["at"] is not None) == (1, "succeeded", True)
        assert finish["delivery"]["id"] == f"run_{run['id']}_finish_1"
        engine.finishes_process(run_id=run["id"])  # the first delivery (if the worker has not made it): a 500
        delivery = api.get(f"{BATCH}/runs/{run['id']}").json()["finishes"][0]["delivery"]
        assert (delivery["state"], delivery["attempts"], delivery["last_status"]) == ("pending", 1, 500)
        assert delivery["last_error"] == "HTTP 500" and delivery["next_attempt_at"] is not None
        AdminTaskRunFinish.objects.filter(run_id=run["id"]).update(next_delivery_at=timezone.now())
        engine.finishes_process(run_id=run["id"])
        delivery = api.get(f"{BATCH}/runs/{run['id']}").json()["finishes"][0]["delivery"]
        assert (delivery["state"], delivery["attempts"], delivery["last_status"]) == ("delivered", 2, 204)
        assert delivery["delivered_at"] is not None and delivery["next_attempt_at"] is None
        assert [entry["status"] for entry in delivery["log"]] == [500, 204]
    finally:
        receiver.close()


# --- preview ---------------------------------------------------------------------------------


def test_preview_count_of_an_explicit_batch(api):
    a, b, gone = make_images(3)
    Image.objects.filter(pk=gone.pk).update(deleted_at=timezone.now())
    ids = f"{b.pk},{a.pk},999999999,{gone.pk},{a.pk}"
    body = api.get(f"{BATCH}/preview-count", {"image_ids": ids}).json()
    assert body["count"] == 2
    assert body["batch"] == {
        "requested": 4,
        "existing": 2,
        "missing": 2,
        "missing_ids": [999999999, gone.pk],
        "duplicates": [a.pk],
    }
    per_item = api.get(f"{BATCH}/preview-count", {"image_ids": str(a.pk)}).json()["estimate"]["bytes"]
    assert body["estimate"]["bytes"] == 2 * per_item  # the estimate of exactly this batch
    assert "batch" not in api.get(f"{BATCH}/preview-count").json()


# --- DELETE /api/v1/images/<id> --------------------------------------------------------------


def test_delete_image_soft_deletes_through_the_gallery_service(staff_user, local_storage):
    grant(staff_user, "gallery.delete_image")
    client = Client(enforce_csrf_checks=True, headers={"authorization": f"Bearer {api_token_create(user=staff_user, name='d')[1]}"})
    (image,) = make_images(1)
    VariantSet.objects.create(image=image, state="ready", recipe_version="r1", storage_kind="local", widths=[320], formats=["webp"])
    Image.objects.filter(pk=image.pk).update(variants_ready=True)
    response = client.delete(f"/api/v1/images/{image.pk}")
    assert response.status_code == 204, response.content
    image.refresh_from_db()
    assert image.deleted_at is not None and not image.variants_ready
    assert not VariantSet.objects.filter(image=image).exists()
    deleted_at = image.deleted_at
    assert client.delete(f"/api/v1/images/{image.pk}").status_code == 204  # idempotent
    image.refresh_from_db()
    assert image.deleted_at == deleted_at
    error = assert_api_error(client.delete("/api/v1/images/987654321"), 404, "image_not_found")
    assert "987654321" in error["message"]


def test_delete_image_needs_the_admins_delete_permission_and_write_scope(staff_user_no_perms):
    (image,) = make_images(1)
    session = Client(enforce_csrf_checks=True)
    session.force_login(staff_user_no_perms)
    read_only = Client(headers={"authorization": f"Bearer {api_token_create(user=staff_user_no_perms, name='r', scopes=['read'])[1]}"})
    writer = Client(headers={"authorization": f"Bearer {api_token_create(user=staff_user_no_perms, name='w')[1]}"})
    error = assert_api_error(writer.delete(f"/api/v1/images/{image.pk}"), 403, "permission_denied")
    assert error["details"] == {"permission": "gallery.delete_image"}
    grant(staff_user_no_perms, "gallery.delete_image")
    assert_api_error(read_only.delete(f"/api/v1/images/{image.pk}"), 403, "insufficient_scope")
    assert_api_error(session.delete(f"/api/v1/images/{image.pk}"), 403, "csrf_failed")  # a session needs the CSRF token
    assert_api_error(Client().delete(f"/api/v1/images/{image.pk}"), 401, "not_authenticated")
    assert Image.objects.get(pk=image.pk).deleted_at is None
    assert writer.delete(f"/api/v1/images/{image.pk}").status_code == 204
    assert Image.objects.get(pk=image.pk).deleted_at is not None


def test_the_new_routes_are_in_the_openapi_document(client):
    document = client.get("/api/v1/schema").json()
    items = document["paths"][f"{PRE}/runs/{{run_id}}/items"]["get"]
    assert {p["name"] for p in items["parameters"]} == {"run_id", "state", "after", "limit"}
    assert "delete" in document["paths"]["/api/v1/images/{image_id}"]
    schemas = document["components"]["schemas"]
    assert "callback_url" in schemas["RunCreate_preprocess_images"]["properties"]
    assert {"missing", "duplicates"} <= set(schemas["RunCreated"]["properties"])
    assert schemas["RunList"]["properties"]["active"]["type"] == "array"
    assert {"finishes", "callback_url"} <= set(schemas["RunDetail"]["properties"])
    assert "money" in schemas["Budget"]["properties"]
