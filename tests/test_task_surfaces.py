"""A task definition owns its surfaces: registering it is all it takes for the JSON API
(routes, pydantic schemas, OpenAPI), the /admin/tasks card and the command line.

The test task ("test-mark-ready", registered by tests/engine_support.py and nowhere else)
and a definition registered inside a test prove it; the GC task shows a declared command.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from django.core.checks import Error
from django.core.management import get_commands, load_command_class
from django.test import Client

import tests.engine_support  # noqa: F401  (registers the test task: its one registry line)
from api.auth import api_token_create
from api.urls import build_api
from tasks import registry
from tasks.admin_views import task_panel, task_panels
from tasks.checks import task_commands_check
from tasks.cli import TaskCommand
from tasks.registry import ScopeField
from tests.engine_support import TEST_TASK_KEY, make_images

pytestmark = pytest.mark.django_db

BASE = f"/api/v1/{TEST_TASK_KEY}"


@pytest.fixture
def api(staff_user) -> Client:
    return Client(headers={"authorization": f"Bearer {api_token_create(user=staff_user, name='t')[1]}"})


@pytest.fixture
def probe(monkeypatch):
    """A definition registered for this test only (the test task's callables, new surfaces)."""
    defn = replace(
        registry.get(TEST_TASK_KEY),
        key="surface-probe",
        title="Surface probe",
        lock_id=49077,
        api_prefix="surface-probe-tasks",
        listed=True,
        scope_fields=(ScopeField("only_new", "bool", "Only new ones"), ScopeField("ids", "int_list", "Some ids", max_items=7)),
    )
    monkeypatch.setitem(registry._REGISTRY, defn.key, defn)
    return defn


def test_the_test_task_has_api_routes(api):
    make_images(2)
    assert api.get(f"{BASE}/runs").json() == {"active": [], "recent": []}
    assert api.get(f"{BASE}/preview-count").json()["count"] == 2
    created = api.post(f"{BASE}/runs", {"scope": {}}, content_type="application/json")
    assert created.status_code == 201, created.content
    assert created["Location"].endswith(f"{BASE}/runs/{created.json()['id']}")
    refused = api.post(f"{BASE}/runs", {"scope": {"force": True}}, content_type="application/json")
    assert refused.status_code == 400 and refused.json()["error"]["details"] == {"field": "force"}


def test_the_test_task_is_in_the_openapi_document(client):
    document = client.get("/api/v1/schema").json()
    for suffix in ("/preview-count", "/runs", "/runs/{run_id}", "/runs/{run_id}/events", "/tick"):
        assert BASE + suffix in document["paths"]
    scope = document["components"]["schemas"]["Scope_test_mark_ready"]
    assert scope["properties"] == {} and scope["additionalProperties"] is False
    assert document["paths"][f"{BASE}/runs"]["get"]["tags"] == ["Test: mark ready"]


def test_the_test_task_has_an_admin_card_but_is_not_listed():
    panel = task_panel(registry.get(TEST_TASK_KEY))
    assert panel.api_base == f"{BASE}/"
    assert [(o.value, o.label, o.kind) for o in panel.options] == [("", "Default", "default")]
    assert TEST_TASK_KEY not in {p.key for p in task_panels()}  # listed=False keeps it off the page


def test_a_definition_registered_later_gets_every_surface_from_the_next_build(probe):
    api = build_api()
    routes = {str(p.pattern) for p in api.url_patterns()}
    assert {"surface-probe-tasks/runs", "surface-probe-tasks/runs/<int:run_id>/events", "surface-probe-tasks/tick"} <= routes
    document = json.loads(json.dumps(api.openapi_document(path_prefix="/api/v1/"), default=str))
    preview = document["paths"]["/api/v1/surface-probe-tasks/preview-count"]["get"]
    assert {p["name"] for p in preview["parameters"]} == {"only_new", "ids"}
    scope = document["components"]["schemas"]["Scope_surface_probe"]["properties"]
    assert scope["only_new"]["type"] == "boolean"
    assert scope["ids"]["anyOf"][0]["maxItems"] == 7
    panel = task_panel(probe)
    assert [o.label for o in panel.options] == ["Default", "Only new", "Ids"]
    assert "surface-probe" in {p.key for p in task_panels()}


def test_a_declared_command_runs_its_task():
    assert get_commands()["variants_gc"] == "tasks"
    command = load_command_class("tasks", "variants_gc")
    assert isinstance(command, TaskCommand) and command.task_key == "variants-gc"
    assert command.help == registry.get("variants-gc").command_help
    assert task_commands_check() == []


def test_a_declared_command_without_its_module_is_a_check_error(probe, monkeypatch):
    monkeypatch.setitem(registry._REGISTRY, probe.key, replace(probe, command="surface_probe"))
    (error,) = task_commands_check()
    assert isinstance(error, Error) and error.id == "tasks.E001" and "surface_probe" in error.msg


def test_prefixes_and_commands_are_unique(probe):
    with pytest.raises(ValueError, match="API prefix"):
        registry.register(replace(probe, key="surface-probe-2", lock_id=49078))
    with pytest.raises(ValueError, match="command"):
        registry.register(replace(probe, key="surface-probe-3", lock_id=49079, api_prefix="x", command="variants_gc"))
