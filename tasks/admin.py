"""Read-only admin for the engine's tables (runs, batches, failed-item ledger).

The engine is the only writer: nothing here can be added, changed or deleted. Runs
are started, cancelled and retried from /admin/tasks/ (``tasks.admin_views``).
"""

from __future__ import annotations

import json

from django.contrib import admin
from django.urls import reverse
from django.utils.html import format_html

from tasks import engine
from tasks.models import AdminTaskBatch, AdminTaskItem, AdminTaskRun, AdminTaskRunFinish


class NoWrites:
    """No add, change or delete, whatever the user's permissions (so no save buttons)."""

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


class ReadOnlyAdmin(NoWrites, admin.ModelAdmin):
    """Every field read-only; no add, change or delete."""

    actions = None

    def get_readonly_fields(self, request, obj=None):
        names = [f.name for f in self.model._meta.fields]
        return [*names, *[n for n in self.readonly_fields if n not in names]]


class ItemInline(NoWrites, admin.TabularInline):
    model = AdminTaskItem
    fields = ("item_id", "state", "attempts", "next_attempt_at", "last_error_code", "last_error_stage", "last_error_message")
    readonly_fields = fields
    extra = 0
    max_num = 0
    can_delete = False
    show_change_link = True
    verbose_name_plural = "failed-item ledger"


class FinishInline(NoWrites, admin.TabularInline):
    """Each terminal transition of the run and its callback delivery."""

    model = AdminTaskRunFinish
    fields = (
        "seq", "status", "created_at", "hook_done_at", "delivery_state", "delivery_attempts", "last_delivery",
        "next_delivery_at", "delivered_at",
    )  # fmt: skip
    readonly_fields = fields
    extra = 0
    max_num = 0
    can_delete = False
    ordering = ("seq",)
    verbose_name_plural = "finish records and callback deliveries"

    @admin.display(description="last attempt")
    def last_delivery(self, obj: AdminTaskRunFinish) -> str:
        if not obj.delivery_log:
            return "—"
        last = obj.delivery_log[-1]
        return f"{last.get('status') or last.get('error') or '?'} ({last.get('ms', 0)} ms, {last.get('at', '')})"


@admin.register(AdminTaskRun)
class AdminTaskRunAdmin(ReadOnlyAdmin):
    list_display = (
        "id",
        "task_key",
        "kind",
        "status",
        "pause_reason",
        "progress_display",
        "succeeded",
        "skipped",
        "failed",
        "created_by",
        "created_at",
        "finished_at",
    )
    list_display_links = ("id", "task_key")
    list_filter = ("task_key", "kind", "status", "pause_reason")
    search_fields = ("=id", "task_key", "last_error")
    date_hierarchy = "created_at"
    ordering = ("-id",)
    list_per_page = 50
    list_select_related = ("created_by",)
    readonly_fields = ("task_page_link", "scope_pretty", "budget_pretty", "issues_pretty")
    fieldsets = (
        (
            None,
            {"fields": ("task_page_link", "task_key", "kind", "status", "pause_reason", "scope_pretty", "last_error",
                        "callback_url")},
        ),
        (
            "Counters",
            {"fields": ("total", "missing", "processed", "succeeded", "skipped", "failed", "cursor", "max_item_id")},
        ),
        (
            "Budget and cost",
            {"fields": ("budget_pretty", "spent_items", "spent_seconds", "spent_bytes", "spent_writes", "busy_seconds")},
        ),
        ("Issues", {"fields": ("issues_pretty",)}),
        (
            "Lease and timing",
            {
                "classes": ("collapse",),
                "fields": (
                    "lease_owner",
                    "lease_expires_at",
                    "last_progress_at",
                    "created_by",
                    "created_at",
                    "started_at",
                    "finished_at",
                    "updated_at",
                ),
            },
        ),
    )
    inlines = (ItemInline, FinishInline)

    @admin.display(description="processed", ordering="processed")
    def progress_display(self, obj: AdminTaskRun) -> str:
        # Live: the run row plus what its batches hold pending (the raw fields below omit those).
        processed = engine.live_counters(obj)["processed"]
        percent = 100.0 * processed / obj.total if obj.total else 100.0
        return f"{processed}/{obj.total} ({percent:.0f}%)"

    @admin.display(description="task page")
    def task_page_link(self, obj: AdminTaskRun) -> str:
        return format_html('<a href="{}">Open the task runs page</a>', reverse("admin-tasks"))

    @admin.display(description="scope")
    def scope_pretty(self, obj: AdminTaskRun) -> str:
        return _pretty(obj.scope)

    @admin.display(description="budget")
    def budget_pretty(self, obj: AdminTaskRun) -> str:
        return _pretty(obj.budget) if obj.budget else "none"

    @admin.display(description="recent issues")
    def issues_pretty(self, obj: AdminTaskRun) -> str:
        return _pretty(obj.recent_issues) if obj.recent_issues else "none"


@admin.register(AdminTaskItem)
class AdminTaskItemAdmin(ReadOnlyAdmin):
    list_display = ("id", "run", "item_id", "state", "attempts", "last_error_code", "last_error_stage", "next_attempt_at", "updated_at")
    list_filter = ("state", "last_error_code", "last_error_stage", "run__task_key")
    search_fields = ("=item_id", "=run__id", "last_error_code", "last_error_message")
    list_select_related = ("run",)
    ordering = ("-id",)
    raw_id_fields = ("run",)


@admin.register(AdminTaskBatch)
class AdminTaskBatchAdmin(ReadOnlyAdmin):
    list_display = ("id", "run", "size", "position", "pending_processed", "is_retry", "lease_owner", "lease_expires_at", "created_at")
    list_filter = ("is_retry", "run__task_key")
    search_fields = ("=run__id", "lease_owner")
    list_select_related = ("run",)
    ordering = ("-id",)
    raw_id_fields = ("run",)

    @admin.display(description="items")
    def size(self, obj: AdminTaskBatch) -> int:
        return len(obj.item_ids or [])


def _pretty(value) -> str:
    return format_html("<pre style='margin:0;white-space:pre-wrap'>{}</pre>", json.dumps(value, indent=2, default=str))
