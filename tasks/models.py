"""Engine tables: runs, claimed batches (leases) and the failed-item ledger.

The engine (``tasks.engine``) is the only writer; the Django admin shows these
read-only.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import Q


class RunStatus(models.TextChoices):
    """Lifecycle of an AdminTaskRun (``tasks.engine.lifecycle.TRANSITIONS`` is the table
    every status write is checked against):

    (create) -> queued -> running                 (the first claim)
    queued | running -> succeeded                 (nothing left to do)
    queued | running -> paused                    (budget reached, or an outage such as
                                                   the storage being down)
    paused -> queued                              (budget raised, or the outage is over)
    running -> cancelling -> cancelled            (cancel while a batch lease is live)
    queued | running | paused -> cancelled        (cancel with no live lease)
    queued | running | cancelling | paused -> failed   (RunFatal)
    succeeded | failed | cancelled -> queued      (retry failed reopens the run)
    """

    QUEUED = "queued", "Queued"
    RUNNING = "running", "Running"
    CANCELLING = "cancelling", "Cancelling"
    PAUSED = "paused", "Paused"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"
    CANCELLED = "cancelled", "Cancelled"

    @classmethod
    def active(cls) -> list[str]:
        """A run in one of these blocks another run of the same task."""
        return [cls.QUEUED, cls.RUNNING, cls.CANCELLING, cls.PAUSED]

    @classmethod
    def runnable(cls) -> list[str]:
        """A kick may claim work in these."""
        return [cls.QUEUED, cls.RUNNING]

    @classmethod
    def finished(cls) -> list[str]:
        return [cls.SUCCEEDED, cls.FAILED, cls.CANCELLED]


# What the task API and the /admin/tasks page check (superusers pass both).
PERM_VIEW_RUNS = "tasks.view_admintaskrun"
PERM_RUN_TASKS = "tasks.run_tasks"


class RunKind(models.TextChoices):
    """library: a run over a scope of the whole library (at most one active per task);
    batch: a run over explicit ids (any number active, beside the library run), with a row
    per requested item and priority over library runs."""

    LIBRARY = "library", "Library"
    BATCH = "batch", "Batch"


class AdminTaskRun(models.Model):
    task_key = models.CharField(max_length=64)
    # Database defaults on columns added later: code of the previous release can still insert.
    kind = models.CharField(max_length=8, choices=RunKind.choices, default=RunKind.LIBRARY, db_default=RunKind.LIBRARY)
    status = models.CharField(max_length=16, choices=RunStatus.choices, default=RunStatus.QUEUED)
    pause_reason = models.CharField(max_length=32, blank=True)
    scope = models.JSONField(default=dict)

    total = models.PositiveIntegerField(default=0)  # counted once, at create
    missing = models.PositiveIntegerField(default=0, db_default=0)  # batch: requested ids that do not exist (or are deleted)
    processed = models.PositiveIntegerField(default=0)
    succeeded = models.PositiveIntegerField(default=0)
    skipped = models.PositiveIntegerField(default=0)
    failed = models.PositiveIntegerField(default=0)

    # Highest item id handed out to a batch; the keyset cursor.
    cursor = models.BigIntegerField(default=0)
    # Scope is frozen at create: items with id > max_item_id are a later run's job.
    max_item_id = models.BigIntegerField(default=0)
    # The most recent lease taken on this run (batches carry their own leases).
    lease_owner = models.CharField(max_length=64, blank=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True)

    recent_issues = models.JSONField(default=list)
    last_error = models.TextField(blank=True)

    # POSTed a signed "run finished" event for every terminal transition (Standard Webhooks).
    callback_url = models.URLField(max_length=2000, blank=True, db_default="")
    # Terminal transitions so far: each wrote one AdminTaskRunFinish with this sequence number.
    finish_seq = models.PositiveIntegerField(default=0, db_default=0)

    # Budget: {"items": n, "seconds": s, "bytes": b, "money": m}; spent counts the same keys
    # (money from spent writes and bytes at the configured prices).
    budget = models.JSONField(default=dict, blank=True)
    spent_items = models.PositiveIntegerField(default=0)
    spent_seconds = models.FloatField(default=0)
    spent_bytes = models.BigIntegerField(default=0)
    spent_writes = models.PositiveIntegerField(default=0)

    # Throughput/ETA: processing seconds summed over workers, and [unix time, processed]
    # samples (one per 5 s at most) for the chart.
    busy_seconds = models.FloatField(default=0)
    timeline = models.JSONField(default=list)
    last_progress_at = models.DateTimeField(null=True, blank=True)

    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-id"]
        constraints = [
            # At most one active library run per task, enforced by the database too; batch
            # runs (explicit ids) coexist with it and with each other.
            models.UniqueConstraint(
                fields=["task_key"],
                condition=Q(status__in=["queued", "running", "cancelling", "paused"], kind="library"),
                name="one_active_library_run_per_task",
            )
        ]
        indexes = [
            models.Index(fields=["task_key", "-id"], name="run_task_recent_idx"),
            models.Index(
                fields=["kind", "id"],
                name="run_runnable_idx",
                condition=Q(status__in=["queued", "running", "cancelling"]),
            ),
        ]
        # Watching runs is the model's view permission; starting and controlling them is this.
        permissions = [("run_tasks", "Can start and control task runs")]

    def __str__(self) -> str:
        return f"{self.task_key} #{self.pk} ({self.status})"

    @property
    def is_active(self) -> bool:
        return self.status in RunStatus.active()


class AdminTaskBatch(models.Model):
    """A claimed slice of a run, leased to one worker.

    Several workers work on one run by each holding their own batch; a crashed
    worker's batch is adopted by the next kick once its lease has expired.
    """

    run = models.ForeignKey(AdminTaskRun, on_delete=models.CASCADE, related_name="batches")
    item_ids = models.JSONField(default=list)
    position = models.PositiveIntegerField(default=0)  # items of item_ids already checkpointed
    is_retry = models.BooleanField(default=False)
    lease_owner = models.CharField(max_length=64)
    lease_expires_at = models.DateTimeField()
    created_at = models.DateTimeField(auto_now_add=True)

    # Counter deltas of clean items (no failure, no ledger row) checkpointed here but not
    # yet folded into the run: a fast checkpoint writes only this row, a fold moves them
    # to the run (at least every engine FOLD_EVERY_S, at batch end, release and finish).
    # Readers add them (``engine.live_counters``); they travel with the batch on adoption.
    # Database defaults, so code from before these columns can still insert batches.
    pending_processed = models.PositiveIntegerField(db_default=0)
    pending_succeeded = models.PositiveIntegerField(db_default=0)
    pending_skipped = models.PositiveIntegerField(db_default=0)
    pending_seconds = models.FloatField(db_default=0)
    pending_bytes = models.BigIntegerField(db_default=0)
    pending_writes = models.PositiveIntegerField(db_default=0)

    def __str__(self) -> str:
        return f"batch #{self.pk} of run #{self.run_id} ({self.position}/{len(self.item_ids)})"


class ItemState(models.TextChoices):
    """State of an item row.

    Library runs keep rows only for items that failed at least once (the ledger):
    retrying (tried again at next_attempt_at, claimed into a retry batch), failed (out of
    attempts; "retry failed" re-arms it), succeeded (a later attempt worked).
    Batch runs keep a row per requested item from the start: pending -> processing ->
    succeeded | skipped | failed, retrying between attempts (shown as pending with a next
    attempt time), and missing for an id that does not exist (never processed).
    """

    PENDING = "pending", "Pending"
    PROCESSING = "processing", "Processing"
    RETRYING = "retrying", "Retrying"
    SUCCEEDED = "succeeded", "Succeeded"
    SKIPPED = "skipped", "Skipped"
    FAILED = "failed", "Failed"
    MISSING = "missing", "Missing"


class AdminTaskItem(models.Model):
    run = models.ForeignKey(AdminTaskRun, on_delete=models.CASCADE, related_name="items")
    item_id = models.BigIntegerField()
    # Batch runs: submission order (duplicates collapsed); None in a library run's ledger.
    position = models.PositiveIntegerField(null=True, blank=True)
    state = models.CharField(max_length=16, choices=ItemState.choices, default=ItemState.RETRYING)
    attempts = models.PositiveSmallIntegerField(default=0)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    claimed = models.BooleanField(default=False)
    last_error_code = models.CharField(max_length=64, blank=True)
    last_error_stage = models.CharField(max_length=32, blank=True)
    last_error_message = models.TextField(blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    seconds = models.FloatField(default=0, db_default=0)  # processing time over all attempts
    bytes = models.BigIntegerField(default=0, db_default=0)
    result = models.JSONField(null=True, blank=True)  # the definition's item_result (e.g. served widths, URLs)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["run", "item_id"], name="one_ledger_row_per_item")]
        indexes = [
            models.Index(
                fields=["run", "next_attempt_at"],
                name="item_due_idx",
                condition=Q(state="retrying", claimed=False),
            ),
            models.Index(fields=["run", "position"], name="item_position_idx", condition=Q(position__isnull=False)),
        ]

    def __str__(self) -> str:
        return f"item {self.item_id} of run #{self.run_id} ({self.state})"


class KeyShard(models.Model):
    """One shard of a content-addressed key space: the keys whose hash starts with
    ``prefix`` (two hex digits, "00".."ff"; id = 1 + its value). The engine walks rows by
    id, so a task over a key space rather than over rows (the variants collector) takes
    these as its items. Created on demand (``tasks.definitions.variants_gc``), since
    nothing else writes them and a flushed database has none."""

    id = models.PositiveSmallIntegerField(primary_key=True)
    prefix = models.CharField(max_length=8, unique=True)

    def __str__(self) -> str:
        return f"shard {self.prefix}"


class AdminTaskEvent(models.Model):
    """An item state change of a batch run, in commit order per run (written under the
    run's advisory lock, so ids of one run commit in order): the SSE stream's ``id``, so a
    client that reconnects with ``Last-Event-ID`` gets every transition it missed."""

    run = models.ForeignKey(AdminTaskRun, on_delete=models.CASCADE, related_name="events")
    item_id = models.BigIntegerField()
    state = models.CharField(max_length=16, choices=ItemState.choices)
    data = models.JSONField(default=dict)
    at = models.DateTimeField(auto_now_add=True)

    class Meta:
        indexes = [models.Index(fields=["run", "id"], name="event_run_idx")]

    def __str__(self) -> str:
        return f"event {self.pk}: item {self.item_id} of run #{self.run_id} {self.state}"


class DeliveryState(models.TextChoices):
    NONE = "none", "No callback"
    PENDING = "pending", "Pending"
    DELIVERED = "delivered", "Delivered"
    GAVE_UP = "gave_up", "Gave up"


class AdminTaskRunFinish(models.Model):
    """One terminal transition of a run (succeeded, failed, cancelled), written in the same
    transaction as the status change: durable, exactly once per transition (a run that
    "retry failed" reopens and that ends again gets a second one, ``seq`` 2). Each record is
    handed once to the definition's ``on_finish`` hook and delivered, at least once, to
    the run's ``callback_url`` (``webhook-id`` = ``delivery_id``, stable across retries)."""

    run = models.ForeignKey(AdminTaskRun, on_delete=models.CASCADE, related_name="finishes")
    seq = models.PositiveIntegerField()
    status = models.CharField(max_length=16, choices=RunStatus.choices)
    counters = models.JSONField(default=dict)
    created_at = models.DateTimeField(auto_now_add=True)
    hook_done_at = models.DateTimeField(null=True, blank=True)
    delivery_state = models.CharField(max_length=12, choices=DeliveryState.choices, default=DeliveryState.NONE)
    delivery_attempts = models.PositiveSmallIntegerField(default=0)
    next_delivery_at = models.DateTimeField(null=True, blank=True)
    delivered_at = models.DateTimeField(null=True, blank=True)
    delivery_log = models.JSONField(default=list)  # the last attempts: at, status or error, ms

    class Meta:
        constraints = [models.UniqueConstraint(fields=["run", "seq"], name="one_finish_per_seq")]
        indexes = [
            models.Index(fields=["next_delivery_at"], name="finish_due_idx", condition=Q(delivery_state="pending")),
            models.Index(fields=["id"], name="finish_hook_due_idx", condition=Q(hook_done_at__isnull=True)),
        ]

    def __str__(self) -> str:
        return f"finish {self.seq} of run #{self.run_id} ({self.status})"

    @property
    def delivery_id(self) -> str:
        """The ``webhook-id``: one per finish record, the same on every retry."""
        return f"run_{self.run_id}_finish_{self.seq}"
