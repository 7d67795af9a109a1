"""The /admin/tasks/ page: one panel per registered task, driven by the JSON API.

The page is a thin shell: the view only describes each task (title, scope choices
and their labels, API base URL: all from its definition) and the browser does
the rest through ``/api/v1/...`` (preview count, start, cancel, retry failed, live
progress over SSE with a polling fallback). Staff only, through
``admin.site.admin_view`` so anyone else gets the admin login; then the same
permissions as the API: viewing needs ``tasks.view_admintaskrun`` (else 403), and
the start/cancel/retry controls (and the page's kicks) appear only with
``tasks.run_tasks`` — the API refuses those requests anyway.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from django.conf import settings
from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.middleware.csrf import get_token
from django.template.response import TemplateResponse
from django.urls import NoReverseMatch, reverse

from tasks import registry
from tasks.models import PERM_RUN_TASKS, PERM_VIEW_RUNS
from tasks.registry import TaskDefinition


@dataclass
class ScopeOption:
    value: str  # "" = the default (empty) scope, else the scope field's name
    label: str
    help: str
    kind: str  # "default" | "bool" | "int_list" | "choice"
    choices: tuple[str, ...] = ()


@dataclass
class TaskPanel:
    key: str
    title: str
    api_base: str | None
    options: list[ScopeOption] = field(default_factory=list)

    @property
    def has_ids_option(self) -> bool:
        return any(o.kind == "int_list" for o in self.options)


def scope_options(defn: TaskDefinition) -> list[ScopeOption]:
    """Radio choices for a task's scope: the default first, then one per scope field."""
    options = [ScopeOption(value="", label=defn.default_scope_label, help=defn.default_scope_help, kind="default")]
    for f in defn.scope_fields:
        options.append(ScopeOption(value=f.name, label=f.label, help=f.help, kind=f.type, choices=tuple(f.choices)))
    return options


def task_api_base(defn: TaskDefinition) -> str | None:
    """Where the task's API lives (the ``api`` app derives its routes from the registry);
    None if it has none (the card then says so instead of breaking)."""
    try:
        return reverse(registry.api_url_name(defn, "runs-list")).removesuffix("runs")
    except NoReverseMatch:
        return None


def task_panel(defn: TaskDefinition) -> TaskPanel:
    return TaskPanel(key=defn.key, title=defn.title, api_base=task_api_base(defn), options=scope_options(defn))


def task_panels() -> list[TaskPanel]:
    """One card per listed task."""
    return [task_panel(defn) for defn in registry.all_definitions() if defn.listed]


def _tasks_page(request: HttpRequest) -> HttpResponse:
    if not request.user.has_perm(PERM_VIEW_RUNS):
        raise PermissionDenied(f"Viewing task runs needs the permission {PERM_VIEW_RUNS}.")
    can_run = request.user.has_perm(PERM_RUN_TASKS)
    context = {
        **admin.site.each_context(request),
        "title": "Task runs",
        "panels": task_panels(),
        "can_run": can_run,
        # A viewer who may not kick must not drive runs from the page either.
        "drives_kicks": bool(settings.PICSITE_ADMIN_PAGE_DRIVES_KICKS) and can_run,
        "csrf_token_value": get_token(request),  # also sets the csrftoken cookie
    }
    return TemplateResponse(request, "admin/tasks.html", context)


# Staff only: anyone else is sent to the admin login (admin_view checks is_staff).
tasks_page = admin.site.admin_view(_tasks_page)
