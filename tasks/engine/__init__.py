"""The task-run engine: one lifecycle for every registered task.

create -> kick/tick (claim a batch, process items one by one, checkpoint after each)
-> succeeded | failed | cancelled, with cancel, retry_failed and budget or outage pauses.

Concurrency model: a run is worked by any number of workers, each holding its own
*batch* (a slice of ids after the run's cursor) under its own lease, renewed by a
heartbeat. Claims and checkpoints take the run's transaction-scoped advisory try-lock
(task lock id, run key) for one short transaction only, never across fetch, encode or
upload. A worker whose batch lease was lost (expired and adopted) finds its checkpoint
matches no row and stops without writing. Items that fail are retried with exponential
backoff (``AdminTaskItem`` ledger) while the run goes on; ``processed`` counts an item
once, at its final outcome.

Layers, each importing only those above it:

- ``errors``: the refusals (EngineError and one subclass each).
- ``queries`` + ``sql/*.sql``: every statement by name, read once; row shapes.
- ``common``: a run's definition, lease, lock keys and locks; NOTIFY.
- ``counters``: live counters (run + batches' pending), budgets, progress, issues.
- ``lifecycle``: the transition table and ``transition``, the one status writer; pause,
  settle, finish, fail.
- ``claims``: claiming a batch and the run lease.
- ``checkpoint``: one item's outcome in one prepared statement; the failed-item ledger.
- ``runner``: a batch's items on a helper thread, with time limit and stop check.
- ``scope``: scopes, budgets, the dry-run preview.
- ``services``: create, set_budget, cancel, retry_failed, resume; list and detail.
- ``worker``: kick, tick, the lease heartbeat.
- ``push``: one item per request for push services (QStash): publish windows, deliveries.

Reads of the engine's tables by others go through ``tasks.selectors``.
"""

from tasks import registry
from tasks.engine import checkpoint, claims, common, lifecycle, runner
from tasks.engine.checkpoint import FAST_CHECKPOINT_SQL, FOLD_EVERY_S
from tasks.engine.common import NOTIFY_CHANNEL
from tasks.engine.counters import MAX_RECENT_ISSUES, live_counters, progress
from tasks.engine.errors import (
    EmptyScope,
    EngineError,
    InvalidBudget,
    InvalidScope,
    InvalidTransition,
    RunAlreadyActive,
    RunNotFound,
    StorageNotConfigured,
    UnknownTaskKey,
)
from tasks.engine.finishes import finish_json, finishes_process
from tasks.engine.items import item_json, public_state
from tasks.engine.lifecycle import TRANSITIONS
from tasks.engine.push import (
    ItemDelivery,
    PushItem,
    push_batches_release,
    run_item_process,
    run_window_claim,
)
from tasks.engine.runner import ItemDeadline, ItemInterrupted, ItemStopped
from tasks.engine.scope import (
    BUDGET_KEYS,
    Preview,
    normalize_budget,
    normalize_scope,
    preview_count,
)
from tasks.engine.services import (
    cancel,
    create,
    detail,
    items_page,
    list_runs,
    release_worker_batches,
    resume_paused,
    resume_paused_runs,
    retry_failed,
    set_budget,
)
from tasks.engine.webhooks import InvalidCallback
from tasks.engine.worker import kick, tick, worker_owner
from tasks.models import AdminTaskRun
from tasks.registry import ItemFailure, ItemOutcome, ItemResult

# Internals the tests and benches reach as ``engine._<name>``.
_Outcome = checkpoint.Outcome
_checkpoint = checkpoint.checkpoint
_checkpoint_params = checkpoint.checkpoint_params
_release_batch = checkpoint.release_batch
_Claim = claims.Claim
_claim_batch = claims.claim_batch
_keyset_order = claims.keyset_order
_definition = common.definition
_get_run = common.get_run
_lease_seconds = common.lease_seconds
_run_key = common.run_key
_fail_run = lifecycle.fail_run
_CancelCheck = runner.CancelCheck
_ItemRunner = runner.ItemRunner
_work_batch = runner.work_batch

__all__ = [
    "BUDGET_KEYS",
    "FAST_CHECKPOINT_SQL",
    "FOLD_EVERY_S",
    "MAX_RECENT_ISSUES",
    "NOTIFY_CHANNEL",
    "TRANSITIONS",
    "AdminTaskRun",
    "EmptyScope",
    "EngineError",
    "InvalidBudget",
    "InvalidCallback",
    "InvalidScope",
    "InvalidTransition",
    "ItemDeadline",
    "ItemFailure",
    "ItemInterrupted",
    "ItemOutcome",
    "ItemResult",
    "ItemStopped",
    "Preview",
    "RunAlreadyActive",
    "RunNotFound",
    "StorageNotConfigured",
    "UnknownTaskKey",
    "ItemDelivery",
    "PushItem",
    "push_batches_release",
    "run_item_process",
    "run_window_claim",
    "cancel",
    "create",
    "detail",
    "finish_json",
    "finishes_process",
    "item_json",
    "items_page",
    "kick",
    "list_runs",
    "live_counters",
    "normalize_budget",
    "normalize_scope",
    "preview_count",
    "progress",
    "public_state",
    "registry",
    "release_worker_batches",
    "resume_paused",
    "resume_paused_runs",
    "retry_failed",
    "set_budget",
    "tick",
    "worker_owner",
    "_CancelCheck",
    "_Claim",
    "_ItemRunner",
    "_Outcome",
    "_checkpoint",
    "_checkpoint_params",
    "_claim_batch",
    "_definition",
    "_fail_run",
    "_get_run",
    "_keyset_order",
    "_lease_seconds",
    "_release_batch",
    "_run_key",
    "_work_batch",
]
