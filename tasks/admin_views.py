"""The /admin/tasks/ page: one panel per registered task, driven by the JSON API.

The page is a thin shell: the view only describes each task (title, scope choices
derived from the definition's ``scope_fields``, API base URL) and the browser does
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

from tasks import registry
from tasks.models import PERM_RUN_TASKS, PERM_VIEW_RUNS
from tasks.registry import TaskDefinition

# Where each task's API lives (tasks/urls.py). A task missing here gets a panel that
# says so instead of a broken one.
API_BASES = {
    "preprocess-images": "/api/v1/preprocess-tasks/",
    "metadata-refresh": "/api/v1/tasks/",
    "variants-gc": "/api/v1/variants-gc-tasks/",
}

# What an empty scope means for each task (the definition's normalize_scope default).
DEFAULT_SCOPE_LABELS = {
    "preprocess-images": ("Missing", "Images with no variants yet, or made with an older recipe"),
    "metadata-refresh": ("All", "Every live image"),
    "variants-gc": (
        "Everything",
        "Superseded sets and deleted photos past the grace period, and orphan objects (lists the storage)",
    ),
}

FIELD_LABELS = {
    "force": "Force all",
    "stale": "Stale",
    "failed_only": "Failed only",
    "missing_only": "Missing only",
    "image_ids": "Explicit ids",
    "skip_orphans": "No orphan sweep",
}

HIDDEN_KEY_PREFIXES = ("test-",)


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
    label, help_text = DEFAULT_SCOPE_LABELS.get(defn.key, ("Default", "The task's default scope"))
    options = [ScopeOption(value="", label=label, help=help_text, kind="default")]
    for f in defn.scope_fields:
        options.append(
            ScopeOption(
                value=f.name,
                label=FIELD_LABELS.get(f.name, f.name.replace("_", " ").capitalize()),
                help=f.help,
                kind=f.type,
                choices=tuple(f.choices),
            )
        )
    return options


def task_panels() -> list[TaskPanel]:
    panels = []
    for defn in registry.all_definitions():
        if defn.key.startswith(HIDDEN_KEY_PREFIXES):
            continue
        panels.append(
            TaskPanel(key=defn.key, title=defn.title, api_base=API_BASES.get(defn.key), options=scope_options(defn))
        )
    return panels


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
