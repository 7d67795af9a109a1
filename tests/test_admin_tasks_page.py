"""The /admin/tasks/ page shell and the read-only engine admin."""

from __future__ import annotations

import re

import pytest
from django.test import Client
from django.urls import reverse

import tests.engine_support  # noqa: F401  (registers "test-mark-ready", which the page must hide)
from tasks import engine
from tasks.models import AdminTaskBatch, AdminTaskItem, AdminTaskRun, ItemState
from tests.engine_support import TEST_TASK_KEY, checkpoint_clean_items, make_images

pytestmark = pytest.mark.django_db

PAGE = "/admin/tasks/"


def login(client: Client, user) -> Client:
    client.force_login(user)
    return client


@pytest.fixture
def superuser(django_user_model):
    return django_user_model.objects.create_superuser("root", "root@example.com", "pw-root-123")


def radios(html: str, key: str) -> list[str]:
    return re.findall(rf'name="scope-{re.escape(key)}" value="([^"]*)"', html)


# --- access ------------------------------------------------------------------------------------


def test_url_is_admin_tasks():
    assert reverse("admin-tasks") == PAGE


def test_staff_sees_one_panel_per_task(client, staff_user):
    response = login(client, staff_user).get(PAGE)
    assert response.status_code == 200
    html = response.content.decode()
    assert 'data-testid="panel-preprocess-images"' in html
    assert 'data-testid="panel-metadata-refresh"' in html
    assert 'data-testid="panel-variants-gc"' in html
    assert f"panel-{TEST_TASK_KEY}" not in html  # test-* tasks are hidden
    # Each panel talks to its own API prefix.
    assert 'data-api-base="/api/v1/preprocess-tasks/"' in html
    assert 'data-api-base="/api/v1/tasks/"' in html
    assert 'data-api-base="/api/v1/variants-gc-tasks/"' in html
    # Controls the browser tests and the script rely on: one of each per panel.
    for testid in ("start", "cancel", "retry", "progress-bar", "status", "count", "failed-items", "recent-runs", "chart"):
        assert html.count(f'data-testid="{testid}"') == 3, testid
    assert "tasks/tasks.js" in html and "tasks/tasks.css" in html
    assert "cdn" not in html.lower()


def test_scope_choices_come_from_the_definitions(client, staff_user):
    html = login(client, staff_user).get(PAGE).content.decode()
    # "" is the default (empty) scope: missing for preprocess, all for metadata.
    assert radios(html, "preprocess-images") == ["", "force", "stale", "failed_only", "new_only", "image_ids"]
    assert radios(html, "metadata-refresh") == ["", "missing_only", "image_ids"]
    assert html.count('data-testid="ids"') == 2
    assert re.search(r'value="" data-kind="default"\s+data-testid="scope-default" checked', html)


@pytest.mark.parametrize(("setting", "expected"), [(True, "true"), (False, "false")])
def test_drives_kicks_setting_reaches_the_page(client, staff_user, settings, setting, expected):
    settings.PICSITE_ADMIN_PAGE_DRIVES_KICKS = setting
    html = login(client, staff_user).get(PAGE).content.decode()
    assert f'data-drives-kicks="{expected}"' in html


def test_page_sets_the_csrf_cookie(staff_user):
    client = Client(enforce_csrf_checks=True)
    response = login(client, staff_user).get(PAGE)
    assert response.status_code == 200
    assert "csrftoken" in response.cookies
    assert 'data-csrf-token="' in response.content.decode()


def test_anonymous_is_sent_to_the_admin_login(client):
    response = client.get(PAGE)
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("admin:login"))
    assert "next=/admin/tasks/" in response["Location"]


def test_non_staff_user_is_sent_to_the_admin_login(client, plain_user):
    response = login(client, plain_user).get(PAGE)
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("admin:login"))


def test_non_staff_user_gets_no_api_access(client, plain_user):
    login(client, plain_user)
    assert client.get("/api/v1/preprocess-tasks/runs").status_code == 403
    assert client.get("/api/v1/tasks/preview-count").status_code == 403


def test_admin_index_links_to_the_page(client, staff_user):
    html = login(client, staff_user).get(reverse("admin:index")).content.decode()
    assert 'data-testid="task-runs-link"' in html
    assert f'href="{PAGE}"' in html
    # The stock app list is still there.
    assert 'id="content-main"' in html


# --- read-only engine admin -------------------------------------------------------------------------


@pytest.fixture
def run_with_rows():
    images = make_images(3)
    run = engine.create(task_key=TEST_TASK_KEY, scope={})
    AdminTaskItem.objects.create(
        run=run, item_id=images[0].pk, state=ItemState.FAILED, attempts=3, last_error_code="boom",
        last_error_stage="process", last_error_message="always fails",
    )
    from django.utils import timezone

    AdminTaskBatch.objects.create(
        run=run, item_ids=[images[1].pk, images[2].pk], lease_owner="w1", lease_expires_at=timezone.now()
    )
    return run


@pytest.mark.parametrize("model", [AdminTaskRun, AdminTaskItem, AdminTaskBatch])
def test_engine_tables_are_read_only(client, superuser, run_with_rows, model):
    login(client, superuser)
    opts = model._meta
    obj = model.objects.order_by("pk").first()
    changelist = client.get(reverse(f"admin:{opts.app_label}_{opts.model_name}_changelist"))
    assert changelist.status_code == 200
    add_url = reverse(f"admin:{opts.app_label}_{opts.model_name}_add")
    assert f'href="{add_url}"' not in changelist.content.decode()  # no "Add" button anywhere
    assert client.get(add_url).status_code == 403

    change_url = reverse(f"admin:{opts.app_label}_{opts.model_name}_change", args=[obj.pk])
    change = client.get(change_url)
    assert change.status_code == 200
    html = change.content.decode()
    assert 'name="_save"' not in html and 'name="_continue"' not in html
    assert 'class="readonly"' in html  # fields shown as text, not inputs
    assert '<input type="text"' not in html and "<textarea" not in html and "<select" not in html
    # Writes are refused.
    assert client.post(change_url, {}).status_code == 403
    delete_url = reverse(f"admin:{opts.app_label}_{opts.model_name}_delete", args=[obj.pk])
    assert client.post(delete_url, {"post": "yes"}).status_code == 403
    assert model.objects.filter(pk=obj.pk).exists()


def test_run_admin_lists_useful_columns(client, superuser, run_with_rows):
    html = login(client, superuser).get(reverse("admin:tasks_admintaskrun_changelist")).content.decode()
    assert TEST_TASK_KEY in html
    assert "0/3 (0%)" in html
    assert "?status__exact=queued" in html  # the status filter
    detail = client.get(reverse("admin:tasks_admintaskrun_change", args=[run_with_rows.pk])).content.decode()
    assert "always fails" in detail  # the failed-item ledger inline
    assert f'href="{PAGE}"' in detail


@pytest.mark.django_db(transaction=True)
def test_run_admin_progress_counts_items_pending_on_batches(client, superuser):
    make_images(8)
    run = engine.create(task_key=TEST_TASK_KEY, scope={})
    checkpoint_clean_items(run, "worker-a", ["succeeded", "succeeded", "skipped"])
    run.refresh_from_db()
    assert run.processed == 0  # still on the batch row
    html = login(client, superuser).get(reverse("admin:tasks_admintaskrun_changelist")).content.decode()
    assert "3/8 (38%)" in html


def test_the_page_has_a_place_for_batches(client, staff_user):
    html = login(client, staff_user).get(PAGE).content.decode()
    assert html.count('data-testid="batches"') == 3  # one per listed task (the script fills them)


def test_run_admin_shows_finish_records_and_their_deliveries(client, superuser):
    from django.utils import timezone

    from tasks.models import AdminTaskRunFinish, DeliveryState

    make_images(1)
    run = engine.create(task_key=TEST_TASK_KEY, scope={})
    AdminTaskRun.objects.filter(pk=run.pk).update(callback_url="https://hooks.example.com/picsite", status="succeeded")
    AdminTaskRunFinish.objects.create(
        run=run, seq=1, status="succeeded", delivery_state=DeliveryState.PENDING, delivery_attempts=1,
        next_delivery_at=timezone.now(), delivery_log=[{"at": "2026-01-01T00:00:00+00:00", "status": 503, "error": "HTTP 503", "ms": 12}],
    )  # fmt: skip
    detail = login(client, superuser).get(reverse("admin:tasks_admintaskrun_change", args=[run.pk])).content.decode()
    assert "finish records and callback deliveries" in detail.lower()
    assert "https://hooks.example.com/picsite" in detail
    assert "503 (12 ms" in detail and "Pending" in detail
