"""How fast a crashed worker's batch is picked up again, with default settings.

    python bench/bench_recovery.py [--trials 8] [--workers 2] [--delay 0.5] [--seed 1]

In a throwaway database, synthetic rows get one run of the test task (tests/engine_support.py,
each item takes ``--delay`` seconds). ``--workers`` worker processes run the real drain job
(``python -m tests.engine_worker drain RUN_ID``: ``tasks.jobs.drain_run_job`` in a loop, as a
django-q2 backfill worker would), and this script runs ``tick_all_job`` once a minute, as the
schedule does. Leases, heartbeats and batch sizes are the defaults (nothing is overridden).

Each trial picks a batch that a live worker holds, SIGKILLs that worker (its lease owner names
its pid), starts a replacement (django-q2's sentinel would), and measures the time from the kill
until another worker holds the batch (it claims it and starts on its next item: ``adopt_s``)
and until that next item is checkpointed (``next_item_s``). Writes the ``recovery`` key:
``adopt_s_p95`` (goal <= 45 s), ``adopt_s_median``, ``next_item_s_p95``, the lease and the
samples.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402  (puts the repo on sys.path)


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]


def spawn(run_id: int, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.engine_worker", "drain", str(run_id)],
        cwd=_common.REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def owner_pid(owner: str) -> int | None:
    parts = owner.split(":")
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


def bench(args) -> dict:
    from tasks import engine
    from tasks.jobs import tick_all_job
    from tasks.models import AdminTaskBatch, RunStatus
    from tests.engine_support import TEST_TASK_KEY, make_images

    rng = random.Random(args.seed)
    rows = int(args.trials * 60 * args.workers / args.delay) + 400  # work for every trial
    make_images(rows)
    run = engine.create(task_key=TEST_TASK_KEY, scope={})
    lease = engine._lease_seconds(engine._definition(TEST_TASK_KEY))
    env = dict(os.environ, PICSITE_TEST_ITEM_DELAY=str(args.delay), PYTHONPATH=str(_common.REPO))
    env.pop("PICSITE_LEASE_OVERRIDE_S", None)
    workers = {}
    for _ in range(args.workers):
        proc = spawn(run.pk, env)
        workers[proc.pid] = proc
    _common.log(f"[recovery] run #{run.pk}: {rows} rows, {args.workers} drain workers, lease {lease:.0f}s, "
                f"items {args.delay}s; {args.trials} kills")
    adopt, next_item = [], []
    next_tick = time.monotonic() + 60
    try:
        for trial in range(args.trials):
            time.sleep(rng.uniform(1.0, 3.0))  # a random moment in a batch and a heartbeat period
            victim = None
            while victim is None:
                held = [
                    b for b in AdminTaskBatch.objects.filter(run_id=run.pk).order_by("?")
                    if owner_pid(b.lease_owner) in workers and b.position < len(b.item_ids) - 1
                ]
                victim = held[0] if held else None
                if victim is None:
                    time.sleep(0.05)
            pid = owner_pid(victim.lease_owner)
            os.kill(pid, signal.SIGKILL)
            killed_at = time.monotonic()
            workers.pop(pid).wait()
            replacement = spawn(run.pk, env)
            workers[replacement.pid] = replacement
            adopted_at = None
            while True:
                now = time.monotonic()
                if now >= next_tick:  # the django-q2 schedule, once a minute
                    tick_all_job()
                    next_tick = now + 60
                row = AdminTaskBatch.objects.filter(pk=victim.pk).values_list("lease_owner", "position").first()
                if adopted_at is None and (row is None or (row[0] and row[0] != victim.lease_owner)):
                    adopted_at = now
                if row is None or row[1] > victim.position:
                    next_item.append(time.monotonic() - killed_at)
                    adopt.append((adopted_at or time.monotonic()) - killed_at)
                    break
                if now - killed_at > 600:
                    raise SystemExit(f"batch {victim.pk} was not adopted within 600 s")
                time.sleep(0.05)
            _common.log(f"[recovery] trial {trial + 1}: batch {victim.pk} adopted after {adopt[-1]:.1f}s, "
                        f"its next item done after {next_item[-1]:.1f}s")
    finally:
        for proc in workers.values():
            proc.kill()
            proc.wait()
    status = engine._get_run(run.pk).status
    return {
        "adopt_s_p95": round(p95(adopt), 1),
        "adopt_s_median": round(statistics.median(adopt), 1),
        "next_item_s_p95": round(p95(next_item), 1),
        "lease_s": lease,
        "trials": len(adopt),
        "workers": args.workers,
        "item_s": args.delay,
        "adopt_s": [round(a, 1) for a in adopt],
        "run_status_at_end": status if status != RunStatus.RUNNING else "running",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--delay", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    with _common.bench_database(name=os.environ.get("PICSITE_BENCH_DB", "picsite_bench") + "_recovery"):
        result = bench(args)
    _common.merge_result("recovery", result)
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
