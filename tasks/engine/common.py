"""What every layer of the engine uses: a run's task definition and lease, its
advisory-lock keys and locks, and NOTIFY."""

from __future__ import annotations

import json
import random
import time
from typing import Any

from django.conf import settings
from django.db import connection

from tasks import registry, selectors
from tasks.engine.errors import RunNotFound, UnknownTaskKey
from tasks.engine.queries import SQL
from tasks.models import AdminTaskRun
from tasks.registry import TaskDefinition

NOTIFY_CHANNEL = "picsite_task_runs"


def definition(task_key: str) -> TaskDefinition:
    try:
        return registry.get(task_key)
    except registry.UnknownTask:
        raise UnknownTaskKey(f"no task named {task_key!r}") from None


def lease_seconds(defn: TaskDefinition) -> float:
    return settings.PICSITE_LEASE_OVERRIDE_S or defn.lease_seconds


def get_run(run_id: int) -> AdminTaskRun:
    run = selectors.run_get(run_id=run_id)
    if run is None:
        raise RunNotFound(f"no run with id {run_id}")
    return run


def run_key(run_id: int) -> int:
    """The run's half of its advisory-lock key: an int4 in 1..2**31-1 (0 is the task-wide
    key of create and retry_failed). Claims, cancel and checkpoints all use it."""
    return (run_id - 1) % 2147483647 + 1


def lock_task(defn: TaskDefinition) -> None:
    """Wait for the task-wide lock (create, retry_failed) until the transaction ends."""
    with connection.cursor() as cur:
        cur.execute(SQL["lock_task"], {"lock_id": defn.lock_id})


def lock_run(defn: TaskDefinition, run_id: int) -> None:
    """Wait for the run's lock until the transaction ends (it waits out any claim or
    checkpoint in flight)."""
    with connection.cursor() as cur:
        cur.execute(SQL["lock_run"], {"lock_id": defn.lock_id, "run_key": run_key(run_id)})


def locked_run(defn: TaskDefinition, run_id: int) -> AdminTaskRun:
    """The run's row, read FOR UPDATE after waiting for the run's lock (inside the
    caller's transaction)."""
    lock_run(defn, run_id)
    return AdminTaskRun.objects.select_for_update().get(pk=run_id)


def try_lock_run(defn: TaskDefinition, run_id: int, *, wait_s: float = 5.0) -> bool:
    """The run's lock with a short spin (claims and checkpoints are brief); False if it
    stayed taken for ``wait_s``."""
    give_up = time.monotonic() + wait_s
    delay = 0.0005
    params = {"lock_id": defn.lock_id, "run_key": run_key(run_id)}
    with connection.cursor() as cur:
        while True:
            cur.execute(SQL["try_lock_run"], params)
            if cur.fetchone()[0]:
                return True
            if time.monotonic() > give_up:
                return False
            time.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, 0.05)


def notify(run_id: int, event: str, **payload: Any) -> None:
    """Tell listeners (SSE streams on any host) that a run changed. Sent at commit."""
    body = json.dumps({"run": run_id, "event": event, **payload}, default=str)
    with connection.cursor() as cur:
        cur.execute(SQL["notify"], {"channel": NOTIFY_CHANNEL, "body": body[:7900]})
