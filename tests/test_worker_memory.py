"""PICSITE_WORKER_MEMORY_MB is enforced: a django-q2 worker whose RSS went over it is
recycled after the task it was running (a real ``manage.py qcluster`` on the test DB)."""

from __future__ import annotations

import sys
import time

import pytest
from django.db import connection
from django_q.models import Task
from django_q.tasks import async_task

from tests.live_processes import LiveSite, _spawn, _wait_log, site_env

pytestmark = pytest.mark.django_db(transaction=True)

BOUND_MB = 200  # well above an idle worker (about 55 MB), well below what the job holds
HELD_MB = 300


def run_job(site: LiveSite, func: str, *args, timeout: float = 30.0) -> dict:
    task_id = async_task(func, *args)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        site.check_alive()
        task = Task.objects.filter(id=task_id).first()
        if task is not None:
            assert task.success, task.result
            return task.result
        time.sleep(0.1)
    raise AssertionError(f"{func} did not finish in {timeout}s\n{site.logs()}")


@pytest.fixture
def cluster(tmp_path):
    """One django-q2 cluster with ONE worker and a low memory bound."""
    env = site_env(
        db_name=connection.settings_dict["NAME"],
        media_root=tmp_path / "media",
        variant_root=tmp_path / "media" / "v",
        extra={"PICSITE_WORKER_MEMORY_MB": str(BOUND_MB), "PICSITE_Q_WORKERS": "1", "PICSITE_LOG_LEVEL": "INFO"},
    )
    site = LiveSite(base_url="", log_dir=tmp_path)
    try:
        site.procs["worker"] = _spawn("worker", [sys.executable, "manage.py", "qcluster"], env, tmp_path)
        _wait_log(site, "worker", "running.", 45)
        yield site
    finally:
        site.stop()


def test_worker_over_the_memory_bound_is_recycled_after_its_task(cluster):
    first = run_job(cluster, "tests.queue_jobs.worker_pid")
    second = run_job(cluster, "tests.queue_jobs.worker_pid")
    # Under the bound the worker is kept (else the check below would prove nothing).
    assert second["pid"] == first["pid"], (first, second)
    assert second["peak_mb"] < BOUND_MB, second

    holder = run_job(cluster, "tests.queue_jobs.hold_memory", HELD_MB)
    assert holder["pid"] == first["pid"] and holder["peak_mb"] > BOUND_MB, holder

    after = run_job(cluster, "tests.queue_jobs.worker_pid")
    assert after["pid"] != holder["pid"], (holder, after)  # recycled once its task was done
    assert after["peak_mb"] < BOUND_MB, after
