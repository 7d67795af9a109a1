"""QStash drivers (``PICSITE_DISPATCH=qstash``): thin adapters over the engine's push path
(``tasks.engine.push``), as ``tasks.jobs`` is for django-q2.

- ``push_run_start``: after a run is created, resumed or retried, publish its first window;
- ``push_item_deliver``: one delivery (``POST <task prefix>/runs/<id>/items/<item_id>``)
  processes its item and tops the run's window up (which publishes a failed item's next
  attempt for its ``next_attempt_at``);
- ``push_tick``: the scheduled tick (QStash schedule or Vercel Cron): resume runs paused for
  a passing reason, start the idle run if configured, republish what was lost in flight and
  top every window up, run due finish hooks.
"""

from __future__ import annotations

import logging

from django.conf import settings
from django.db import transaction
from django.urls import reverse

from dispatch.qstash import Message, dispatch_is_qstash, publish_messages
from tasks import engine, registry, selectors
from tasks.models import AdminTaskRun, RunStatus

logger = logging.getLogger(__name__)


def run_flow_control_key(run_id: int) -> str:
    return f"picsite-run-{run_id}"


def _item_message(item: engine.PushItem, defn: registry.TaskDefinition) -> Message:
    path = reverse(registry.api_url_name(defn, "run-item"), kwargs={"run_id": item.run_id, "item_id": item.item_id})
    return Message(
        path=path,
        body={"attempts": item.attempts, "generation": item.generation},
        deduplication_id=item.deduplication_id,
        flow_control_key=run_flow_control_key(item.run_id),
        not_before=item.not_before,
    )


def _publish(run: AdminTaskRun, items: list[engine.PushItem]) -> int:
    defn = registry.get(run.task_key)
    try:
        return publish_messages([_item_message(item, defn) for item in items])
    except Exception:
        # Handed back at once: the next window (a delivery or the tick) republishes them.
        logger.exception("publishing %s items of run %s to QStash failed", len(items), run.pk)
        engine.push_batches_release(run_id=run.pk, items=items)
        return 0


def run_window_publish(*, run_id: int) -> int:
    """Publish what keeps the run's window full (at most PICSITE_QSTASH_WINDOW in flight)."""
    items = engine.run_window_claim(
        run_id=run_id,
        window=settings.PICSITE_QSTASH_WINDOW,
        inflight_timeout_s=settings.PICSITE_QSTASH_INFLIGHT_TIMEOUT_S,
    )
    return _publish(selectors.run_get(run_id=run_id), items) if items else 0


def push_run_start(*, run_id: int) -> None:
    """After commit: the run's first window (a failure leaves it to the tick)."""

    def start() -> None:
        try:
            run_window_publish(run_id=run_id)
        except Exception:
            logger.exception("could not publish the first window of run %s; the tick will", run_id)

    transaction.on_commit(start)


def push_item_deliver(*, run_id: int, item_id: int) -> engine.ItemDelivery:
    delivery = engine.run_item_process(run_id=run_id, item_id=item_id)
    if not dispatch_is_qstash():
        return delivery  # an operator's manual delivery on a worker site: workers do the rest
    run = selectors.run_get(run_id=run_id)
    if run.status in RunStatus.runnable():
        # Tops the window up: fresh items, and this item's next attempt if it failed.
        try:
            run_window_publish(run_id=run_id)
        except Exception:  # the item is recorded: never make QStash redeliver it for this
            logger.exception("could not top up the window of run %s", run_id)
        if selectors.run_status(run_id=run_id) in RunStatus.finished():
            engine.finishes_process(run_id=run_id)  # the window ended it: its hooks, at once
    return delivery


def push_tick(*, task_key: str, create_if_idle: bool = False) -> AdminTaskRun | None:
    """Republish lost items and top up the windows of the task's runnable runs; returns the
    last run topped up (as the worker tick returns the last run kicked)."""
    defn = registry.get(task_key)
    engine.resume_paused_runs(task_key=task_key)
    runs = list(selectors.runs_to_kick(task_key=task_key))
    if not runs and create_if_idle and defn.idle_scope is not None:
        try:
            runs = [engine.create(task_key=task_key, scope=defn.idle_scope)]
        except (engine.EmptyScope, engine.RunAlreadyActive, engine.StorageNotConfigured):
            runs = []
    last = None
    for run in runs:
        run_window_publish(run_id=run.pk)
        last = selectors.run_get(run_id=run.pk)
    engine.finishes_process()
    return last
