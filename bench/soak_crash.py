"""Crash soak (outside CI): SIGKILL engine workers at random moments, then check the books.

    python bench/soak_crash.py [--kills 200] [--rows 2000] [--parallel 2] [--delay 0.15]
                               [--lease 1.0] [--seed 1]                        (``make soak``)

In a throwaway database, ``--rows`` synthetic Image rows get one run of the test task
(tests/engine_support.py: the processor counts its calls in ``variants_attempts`` and marks
the row ready). ``--parallel`` workers (``python -m tests.engine_worker kick RUN_ID``) run at
once; each is SIGKILLed at a random moment between 0.8x its measured start-up time and
start-up + 2 s (so some die while starting, most mid-item or mid-checkpoint) and replaced,
until ``--kills`` kills. Leases are short (``--lease``) so a dead worker's batch is adopted
quickly. Then two survivors (no per-item delay) drain the run and the script verifies:

- the run succeeded, ``processed == total == rows`` and ``succeeded + skipped + failed ==
  processed`` with no failures;
- every row is ready and was processed at least once; re-runs (calls beyond the first) are
  at most the number of kills (only the item in flight when a worker dies is redone);
- no batch or retry ledger row is left behind.

Prints a summary; exit status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402  (puts the repo on sys.path)


def worker_cmd(run_id: int | str) -> list[str]:
    return [sys.executable, "-m", "tests.engine_worker", "kick", str(run_id)]


def startup_seconds(env: dict) -> float:
    """Time for a worker to import, set Django up and reach the database (median of 3)."""
    samples = []
    for _ in range(3):
        started = time.monotonic()
        subprocess.run(worker_cmd(2**62), cwd=_common.REPO, env=env, check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        samples.append(time.monotonic() - started)
    return sorted(samples)[1]


def soak(args) -> int:
    from django.db.models import Count, Sum

    from gallery.models import Image
    from tasks import engine
    from tasks.models import AdminTaskBatch, AdminTaskItem, AdminTaskRun, RunStatus
    from tests.engine_support import TEST_TASK_KEY, make_images

    rng = random.Random(args.seed)
    make_images(args.rows)
    run = engine.create(task_key=TEST_TASK_KEY, scope={})
    env = dict(
        os.environ,
        PICSITE_LEASE_OVERRIDE_S=str(args.lease),
        PICSITE_TEST_ITEM_DELAY=str(args.delay),
        PICSITE_ITEM_RETRY_BASE_S="0.01",
        PYTHONPATH=str(_common.REPO),
    )
    boot = startup_seconds(env)
    _common.log(f"[soak] run #{run.pk}: {args.rows} rows; worker start-up {boot:.2f}s; "
                f"{args.parallel} workers at a time until {args.kills} kills")

    kills = natural_exits = spawned = 0
    slots: list[tuple[subprocess.Popen, float] | None] = [None] * args.parallel
    started = time.monotonic()
    last_report = started
    finished_early = False
    while kills < args.kills:
        for i, slot in enumerate(slots):
            if slot is not None:
                proc, kill_at = slot
                if proc.poll() is not None:
                    natural_exits += 1
                    slots[i] = None
                elif time.monotonic() >= kill_at:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait()
                    kills += 1
                    slots[i] = None
            if slots[i] is None and kills < args.kills:
                proc = subprocess.Popen(worker_cmd(run.pk), cwd=_common.REPO, env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                spawned += 1
                slots[i] = (proc, time.monotonic() + rng.uniform(0.8 * boot, boot + 2.0))
        if AdminTaskRun.objects.filter(pk=run.pk, status__in=RunStatus.active()).count() == 0:
            finished_early = True
            break
        if time.monotonic() - last_report > 15:
            current = AdminTaskRun.objects.get(pk=run.pk)
            _common.log(f"[soak] {kills} kills, {current.processed}/{current.total} processed")
            last_report = time.monotonic()
        time.sleep(0.02)
    for slot in slots:
        if slot is not None:
            slot[0].kill()
            slot[0].wait()
    kill_phase = time.monotonic() - started
    at_last_kill = AdminTaskRun.objects.get(pk=run.pk).processed

    # Drain: wait out the dead workers' leases, then two survivors without the item delay.
    time.sleep(args.lease + 0.2)
    drain_env = dict(env, PICSITE_TEST_ITEM_DELAY="0")
    for _ in range(20):
        survivors = [subprocess.Popen(worker_cmd(run.pk), cwd=_common.REPO, env=drain_env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                     for _ in range(2)]
        codes = [p.wait(600) for p in survivors]
        run.refresh_from_db()
        if run.status not in RunStatus.active():
            break
        if any(codes):
            _common.log(f"[soak] a survivor exited with {codes}")
        time.sleep(args.lease)

    run.refresh_from_db()
    calls = Image.objects.aggregate(total=Sum("variants_attempts"), rows=Count("id"))
    never = Image.objects.filter(variants_attempts=0).count()
    not_ready = Image.objects.filter(variants_ready=False).count()
    reruns = (calls["total"] or 0) - calls["rows"]
    checks = {
        "run succeeded": run.status == RunStatus.SUCCEEDED,
        "processed == total == rows": run.processed == run.total == args.rows,
        "succeeded + skipped + failed == processed": run.succeeded + run.skipped + run.failed == run.processed,
        # Every row counted by a checkpoint, none topped up at the end as "left the scope".
        "succeeded == spent items == rows": run.succeeded == run.spent_items == args.rows,
        "no left_scope top-up": not any(i.get("code") == "left_scope" for i in run.recent_issues),
        "no failed items": run.failed == 0,
        "every row ready": not_ready == 0,
        "every row processed at least once": never == 0,
        "re-runs <= kills": 0 <= reruns <= kills,
        "no batch left": not AdminTaskBatch.objects.filter(run=run).exists(),
        "no retry ledger left": not AdminTaskItem.objects.filter(run=run).exclude(state="succeeded").exists(),
    }
    print("\n=== crash soak")
    print(f"kills: {kills} (target {args.kills}); workers spawned: {spawned}; exited on their own: {natural_exits}")
    if finished_early:
        print("note: the run finished before the kill target; raise --rows or --delay for more kills")
    print(f"kill phase: {kill_phase:.0f}s, {at_last_kill}/{args.rows} items processed by then "
          f"(worker start-up {boot:.2f}s, item delay {args.delay}s, lease {args.lease}s)")
    print(f"run #{run.pk}: {run.status}; total {run.total}, processed {run.processed}, succeeded "
          f"{run.succeeded}, skipped {run.skipped}, failed {run.failed}")
    print(f"processor calls: {calls['total']} for {calls['rows']} rows -> {reruns} re-runs "
          f"(items in flight when a worker died)")
    for name, ok in checks.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")
    return 0 if all(checks.values()) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=200)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--delay", type=float, default=0.15, help="seconds per item in the workers")
    parser.add_argument("--lease", type=float, default=1.0, help="lease override, seconds")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    with _common.temp_media(), _common.bench_database():
        return soak(args)


if __name__ == "__main__":
    sys.exit(main())
