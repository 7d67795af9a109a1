"""Who may do what (issue 9, item 12): Django permissions on every API route (the same
ones the admin uses), API token scopes and expiry, and minting tokens (command and
admin) with the raw token shown once and never stored in a cookie or the session.
"""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from django.contrib.admin.models import LogEntry
from django.contrib.messages import get_messages
from django.contrib.messages.storage.cookie import CookieStorage
from django.core.exceptions import PermissionDenied
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import IntegrityError, transaction
from django.test import Client
from django.utils import timezone

from api.auth import api_token_create
from api.models import ApiToken
from gallery.models import Image
from tasks.models import AdminTaskRun
from tests.api_support import assert_api_error
from tests.conftest import CORPUS
from tests.engine_support import make_images
from tests.perms import grant

pytestmark = pytest.mark.django_db

META = "/api/v1/tasks"  # metadata-refresh
PRE = "/api/v1/preprocess-tasks"  # preprocess-images
UPLOAD = "/api/v1/images"
VIEW_RUNS, RUN_TASKS, ADD_IMAGE = "tasks.view_admintaskrun", "tasks.run_tasks", "gallery.add_image"
TOKEN_ADMIN = ("api.add_apitoken", "api.view_apitoken", "api.change_apitoken")

# Every task route and the permission it needs (run 1 does not exist: the check comes first).
TASK_ROUTES = [
    ("get", f"{PRE}/preview-count", VIEW_RUNS),
    ("get", f"{META}/runs", VIEW_RUNS),
    ("post", f"{META}/runs", RUN_TASKS),
    ("get", f"{META}/runs/1", VIEW_RUNS),
    ("get", f"{META}/runs/1/items", VIEW_RUNS),
    ("post", f"{META}/runs/1/kick", RUN_TASKS),
    ("post", f"{META}/runs/1/cancel", RUN_TASKS),
    ("post", f"{META}/runs/1/retry-failed", RUN_TASKS),
    ("post", f"{META}/runs/1/budget", RUN_TASKS),
    ("get", f"{META}/runs/1/events", VIEW_RUNS),
    ("post", f"{META}/tick", RUN_TASKS),
]


@pytest.fixture(autouse=True)
def _storage(local_storage, settings):
    settings.PICSITE_ADMIN_PAGE_DRIVES_KICKS = False  # kicks only enqueue: no helper threads here


def bearer(raw: str) -> Client:
    """A token client that would fail any CSRF check (tokens need none)."""
    return Client(enforce_csrf_checks=True, headers={"authorization": f"Bearer {raw}"})


def session(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def token_for(user, **options) -> str:
    return api_token_create(user=user, name="t", **options)[1]


def post_json(client: Client, path: str, body) -> object:
    return client.post(path, data=json.dumps(body), content_type="application/json")




def upload(client: Client, name: str = "flower_exif_icc.webp"):
    path = CORPUS / "photos" / name
    return client.post(UPLOAD, {"file": SimpleUploadedFile(path.name, path.read_bytes())})


# --- permissions on the API ------------------------------------------------------------------


def test_staff_without_permissions_cannot_start_a_force_run(staff_user_no_perms):
    make_images(2)
    for client in (session(staff_user_no_perms), bearer(token_for(staff_user_no_perms))):
        error = assert_api_error(post_json(client, f"{PRE}/runs", {"scope": {"force": True}}), 403, "permission_denied")
        assert error["details"] == {"permission": RUN_TASKS}
        assert RUN_TASKS in error["message"]
    assert not AdminTaskRun.objects.exists()


def test_staff_with_run_tasks_starts_a_force_run(staff_user_no_perms):
    make_images(2)
    grant(staff_user_no_perms, RUN_TASKS)
    response = post_json(bearer(token_for(staff_user_no_perms)), f"{PRE}/runs", {"scope": {"force": True}})
    assert response.status_code == 201, response.content
    assert AdminTaskRun.objects.get().created_by == staff_user_no_perms


@pytest.mark.parametrize(("method", "path", "permission"), TASK_ROUTES)
def test_every_task_route_needs_its_permission(staff_user_no_perms, method, path, permission):
    for client in (session(staff_user_no_perms), bearer(token_for(staff_user_no_perms))):
        error = assert_api_error(getattr(client, method)(path), 403, "permission_denied")
        assert error["details"] == {"permission": permission}


def test_view_permission_reads_but_cannot_control(staff_user_no_perms):
    make_images(1)
    grant(staff_user_no_perms, VIEW_RUNS)
    client = session(staff_user_no_perms)
    assert client.get(f"{META}/runs").status_code == 200
    assert client.get(f"{META}/preview-count").json()["count"] == 1
    assert_api_error(post_json(client, f"{META}/runs", {"scope": {}}), 403, "permission_denied")
    assert_api_error(client.post(f"{META}/tick"), 403, "permission_denied")


def test_upload_needs_add_image(staff_user_no_perms):
    for client in (session(staff_user_no_perms), bearer(token_for(staff_user_no_perms))):
        error = assert_api_error(upload(client), 403, "permission_denied")
        assert error["details"] == {"permission": ADD_IMAGE}
    assert not Image.objects.exists()
    grant(staff_user_no_perms, ADD_IMAGE)
    response = upload(bearer(token_for(staff_user_no_perms)))
    assert response.status_code == 201, response.content
    assert Image.objects.get().uploaded_by == staff_user_no_perms


def test_superuser_needs_no_explicit_permission(django_user_model):
    make_images(1)
    root = django_user_model.objects.create_superuser("root", "root@example.com", "pw-root-123")
    api = bearer(token_for(root))
    assert post_json(api, f"{PRE}/runs", {"scope": {"force": True}}).status_code == 201
    assert upload(api).status_code == 201


def test_a_superuser_who_is_not_staff_is_still_refused(django_user_model):
    # The admin refuses such an account too: is_staff is required before any permission.
    user = django_user_model.objects.create_user("nostaff", password="pw-123456", is_superuser=True)
    assert_api_error(bearer(token_for(user)).get(f"{META}/runs"), 403, "forbidden")


# --- token scopes and expiry -----------------------------------------------------------------


def test_read_only_token_can_get_but_not_post(staff_user):
    make_images(1)
    api = bearer(token_for(staff_user, scopes=["read"]))
    assert api.get(f"{META}/runs").status_code == 200
    assert api.get(f"{PRE}/preview-count").status_code == 200
    error = assert_api_error(post_json(api, f"{META}/runs", {"scope": {}}), 403, "insufficient_scope")
    assert error["details"] == {"required_scopes": ["write"], "token_scopes": ["read"]}
    assert_api_error(api.post(f"{META}/tick"), 403, "insufficient_scope")
    assert_api_error(upload(api), 403, "insufficient_scope")
    assert not AdminTaskRun.objects.exists() and Image.objects.count() == 1  # only make_images' row


def test_write_only_token_cannot_read(staff_user):
    make_images(1)
    api = bearer(token_for(staff_user, scopes=["write"]))
    run = post_json(api, f"{META}/runs", {"scope": {}})
    assert run.status_code == 201
    assert api.post(f"{META}/runs/{run.json()['id']}/kick").status_code == 200
    assert_api_error(api.get(f"{META}/runs"), 403, "insufficient_scope")
    assert_api_error(api.get(f"{META}/runs/{run.json()['id']}/events"), 403, "insufficient_scope")


def test_tick_scope_opens_only_the_tick_route(staff_user):
    make_images(1)
    api = bearer(token_for(staff_user, scopes=["tick"]))
    assert api.post(f"{META}/tick").json() == {"run": None}
    assert_api_error(api.get(f"{META}/runs"), 403, "insufficient_scope")
    error = assert_api_error(post_json(api, f"{META}/runs", {"scope": {}}), 403, "insufficient_scope")
    assert error["details"]["token_scopes"] == ["tick"]
    # A tick token still needs a user who may run tasks.
    staff_user.user_permissions.clear()
    grant(staff_user, VIEW_RUNS)
    assert_api_error(api.post(f"{META}/tick"), 403, "permission_denied")


def test_default_token_reads_writes_and_ticks(staff_user):
    token, raw = api_token_create(user=staff_user, name="default")
    assert token.scope_list == ["read", "write"] and token.expires_at is None
    api = bearer(raw)
    assert api.get(f"{META}/runs").status_code == 200
    assert api.post(f"{META}/tick").status_code == 200  # write covers tick (it can create and kick runs anyway)


def test_expired_token_is_401(staff_user):
    expired = token_for(staff_user, expires_at=timezone.now() - timedelta(seconds=1))
    assert_api_error(bearer(expired).get(f"{META}/runs"), 401, "token_expired")
    assert_api_error(upload(bearer(expired)), 401, "token_expired")
    valid = token_for(staff_user, expires_at=timezone.now() + timedelta(days=1))
    assert bearer(valid).get(f"{META}/runs").status_code == 200


def test_token_scopes_are_validated(staff_user):
    for scopes in (["admin"], [], ["read", "READ "]):
        with pytest.raises(ValueError, match="scope"):
            api_token_create(user=staff_user, name="bad", scopes=scopes)
    token, _ = api_token_create(user=staff_user, name="ok", scopes=["tick", "read", "tick"])
    assert token.scopes == "read,tick"  # canonical order, no repeats
    with pytest.raises(IntegrityError), transaction.atomic():  # the database refuses unknown scopes too
        ApiToken.objects.filter(pk=token.pk).update(scopes="read,admin")


def test_create_api_token_command_scopes_and_expiry(staff_user, capsys):
    call_command("create_api_token", staff_user.username)
    default = ApiToken.objects.get()
    assert default.scope_list == ["read", "write"] and default.expires_at is None
    capsys.readouterr()

    before = timezone.now()
    call_command("create_api_token", staff_user.username, "--scope", "read", "--scope", "tick", "--expires-in", "7")
    after = timezone.now()
    raw = capsys.readouterr().out.strip()
    token = ApiToken.objects.get(prefix=raw[:8])
    assert token.scope_list == ["read", "tick"]
    assert before + timedelta(days=7) <= token.expires_at <= after + timedelta(days=7)
    assert bearer(raw).get(f"{META}/runs").status_code == 200
    assert_api_error(post_json(bearer(raw), f"{META}/runs", {"scope": {}}), 403, "insufficient_scope")

    for bad in (["--scope", "admin"], ["--expires-in", "0"], ["--expires-in", "-3"]):
        with pytest.raises(CommandError):
            call_command("create_api_token", staff_user.username, *bad)
    assert ApiToken.objects.count() == 2


# --- minting tokens in the admin ---------------------------------------------------------------

ADD = "/admin/api/apitoken/add/"
LIST = "/admin/api/apitoken/"


def add_form(user_pk: int, name: str, scopes=("read", "write"), **extra) -> dict:
    return {"user": user_pk, "name": name, "scopes": list(scopes), **extra}


def test_admin_non_superuser_mints_only_for_themselves(staff_user_no_perms, plain_user):
    grant(staff_user_no_perms, *TOKEN_ADMIN)
    client = session(staff_user_no_perms)
    form = client.get(ADD)
    assert form.status_code == 200
    html = form.content.decode()
    assert f'value="{staff_user_no_perms.pk}"' in html
    assert f'value="{plain_user.pk}"' not in html  # the only choice is oneself

    forged = client.post(ADD, add_form(plain_user.pk, "for-someone-else"))
    assert forged.status_code == 200  # the form again, with an error
    assert not ApiToken.objects.filter(user=plain_user).exists()
    assert not ApiToken.objects.exists()

    own = client.post(ADD, add_form(staff_user_no_perms.pk, "mine", scopes=["read"]))
    assert own.status_code == 200
    token = ApiToken.objects.get()
    assert token.user == staff_user_no_perms and token.scope_list == ["read"]


def test_admin_superuser_may_mint_for_another_user(django_user_model, staff_user):
    root = django_user_model.objects.create_superuser("root", "root@example.com", "pw-root-123")
    past = timezone.localtime() - timedelta(days=1)
    refused = session(root).post(
        ADD, add_form(staff_user.pk, "old", expires_at_0=past.strftime("%Y-%m-%d"), expires_at_1=past.strftime("%H:%M:%S"))
    )
    assert refused.status_code == 200 and "in the future" in refused.content.decode()
    assert not ApiToken.objects.exists()
    expires = (timezone.localtime() + timedelta(days=30)).replace(microsecond=0)
    response = session(root).post(
        ADD,
        add_form(
            staff_user.pk, "ci", scopes=["tick"],
            expires_at_0=expires.strftime("%Y-%m-%d"), expires_at_1=expires.strftime("%H:%M:%S"),
        ),
    )  # fmt: skip
    assert response.status_code == 200, response.content[:500]
    token = ApiToken.objects.get()
    assert token.user == staff_user and token.scope_list == ["tick"] and token.expires_at == expires


def test_admin_raw_token_is_shown_once_and_never_stored_in_cookies_or_session(django_user_model):
    root = django_user_model.objects.create_superuser("root", "root@example.com", "pw-root-123")
    client = session(root)
    response = client.post(ADD, add_form(root.pk, "shown-once"))
    # Rendered in this response (no redirect that would need to carry it somewhere).
    assert response.status_code == 200, response.status_code
    token = ApiToken.objects.get(name="shown-once")
    html = response.content.decode()
    raw = html.split('data-testid="raw-token">', 1)[1].split("<", 1)[0].strip()
    assert raw.startswith("pst_") and raw[:8] == token.prefix
    assert "no-store" in response["Cache-Control"]

    # Not in any Set-Cookie header, not even inside the (base64, signed) messages cookie.
    set_cookies = [morsel.OutputString() for morsel in response.cookies.values()]
    assert all(raw not in header for header in set_cookies), set_cookies
    storage = CookieStorage(response.wsgi_request)
    for morsel in response.cookies.values():
        if morsel.key == storage.cookie_name:
            assert all(raw not in str(m) for m in storage._decode(morsel.value) or [])
    assert all(raw not in str(m) for m in get_messages(response.wsgi_request))
    # Not in the session, nor in the admin's change log.
    assert raw not in json.dumps(dict(client.session.items()), default=str)
    assert not LogEntry.objects.filter(change_message__contains=raw).exists()
    assert not LogEntry.objects.filter(object_repr__contains=raw).exists()
    # Never shown again.
    assert raw not in client.get(LIST).content.decode()
    assert raw not in client.get(f"{LIST}{token.pk}/change/").content.decode()
    assert bearer(raw).get(f"{META}/runs").status_code == 200


def test_admin_non_superuser_sees_and_revokes_only_own_tokens(staff_user_no_perms, staff_user):
    grant(staff_user_no_perms, *TOKEN_ADMIN)
    mine, _ = api_token_create(user=staff_user_no_perms, name="mine-token")
    theirs, _ = api_token_create(user=staff_user, name="their-token")
    client = session(staff_user_no_perms)
    listing = client.get(LIST).content.decode()
    assert "mine-token" in listing and "their-token" not in listing
    assert client.get(f"{LIST}{theirs.pk}/change/").status_code == 302  # "does not exist" -> back to the list
    client.post(LIST, {"action": "revoke_tokens", "_selected_action": [mine.pk, theirs.pk]})
    mine.refresh_from_db()
    theirs.refresh_from_db()
    assert mine.revoked_at is not None and theirs.revoked_at is None


def test_token_service_refuses_minting_for_another_user_unless_superuser(staff_user_no_perms, staff_user, django_user_model):
    with pytest.raises(PermissionDenied):
        api_token_create(user=staff_user, name="theirs", minted_by=staff_user_no_perms)
    assert api_token_create(user=staff_user_no_perms, name="mine", minted_by=staff_user_no_perms)[0].pk
    root = django_user_model.objects.create_superuser("root", "root@example.com", "pw-root-123")
    assert api_token_create(user=staff_user, name="by-root", minted_by=root)[0].user == staff_user


# --- the /admin/tasks page -----------------------------------------------------------------------

PAGE = "/admin/tasks/"


def test_tasks_page_needs_view_permission(staff_user_no_perms):
    client = session(staff_user_no_perms)
    assert client.get(PAGE).status_code == 403
    assert 'data-testid="task-runs-link"' not in client.get("/admin/").content.decode()


def test_tasks_page_shows_controls_only_with_run_tasks(staff_user_no_perms, staff_user):
    grant(staff_user_no_perms, VIEW_RUNS)
    viewer = session(staff_user_no_perms).get(PAGE)
    assert viewer.status_code == 200
    html = viewer.content.decode()
    assert 'data-can-run="false"' in html
    assert html.count('data-testid="panel-') >= 2
    for control in ("start", "cancel", "retry", "budget-items"):
        assert f'data-testid="{control}"' not in html, control
    assert 'data-testid="view-only"' in html

    html = session(staff_user).get(PAGE).content.decode()
    assert 'data-can-run="true"' in html
    panels = html.count('data-testid="panel-')
    assert panels == 3  # preprocess-images, metadata-refresh, variants-gc
    for control in ("start", "cancel", "retry", "budget-items"):
        assert html.count(f'data-testid="{control}"') == panels, control  # one per panel
