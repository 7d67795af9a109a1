"""Engine overhead and multi-worker scaling.

    python bench/bench_engine.py [--items N] [--copies K] [--rounds R] [--skip-parallel] [--profile]

Writes the "engine" key of bench/results.json:

- ``noop_items_per_s``: ``engine.kick`` over N (5000) synthetic Image rows with a bench-only
  no-op task (lock id 49100, batch size 100; the processor returns
  ``ItemResult("succeeded")`` without touching the database), so what is measured is the
  engine's own bookkeeping: claims, the per-item thread hand-off and one checkpoint
  statement per item (prepared server-side; a fast one that writes the batch row, and a
  folding one into the run row at least every ``FOLD_EVERY_S`` and at each batch end);
- ``bare_updates_per_s``: the same number of bare autocommit
  ``UPDATE gallery_image SET updated_at = now() WHERE id = %s`` on the same connection: the
  floor for "one durable write per item" on this database;
- ``noop_over_bare``: the ratio (target >= 0.5; noop target >= 1000 items/s). The two loops
  alternate over 10 slices of 500 rows (a no-op run per slice, then that slice's bare
  updates) because this disk's flush latency drifts by up to 10x within minutes;
- ``diagnostics``: the no-op rate with every checkpoint folding into the run row
  (``FOLD_EVERY_S = 0``: the fast batch-row-only checkpoint switched off), and both loops
  with the whole session at ``synchronous_commit = off`` (no WAL flush at all);
- ``two_over_one_worker``: items/s of the real preprocess-images backfill over the corpus
  with 2 worker processes / with 1 (target >= 1.7); the measurement is
  bench_parallel.py's (raw figures under ``two_over_one_detail``).

``--profile`` runs one more no-op kick under cProfile and stores the top entries (it is
also done automatically when a no-op target is missed).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402  (puts the repo on sys.path)

NOOP_KEY = "bench-noop"
NOOP_LOCK_ID = 49100
NOOP_BATCH = 100
DEFAULT_ITEMS = 5000
ROUNDS = 10
TARGET_NOOP = 1000
TARGET_NOOP_OVER_BARE = 0.5
TARGET_TWO_OVER_ONE = 1.7


def noop_definition():
    """Register (once) and return the bench-only no-op task."""
    from gallery.models import Image
    from tasks import registry
    from tasks.registry import CostModel, ItemResult, TaskDefinition, reject_unknown_keys

    try:
        return registry.get(NOOP_KEY)
    except registry.UnknownTask:
        pass

    def normalize(raw: dict) -> dict:
        reject_unknown_keys(raw, set())
        return {}

    def process(image, cancel, scope) -> ItemResult:
        return ItemResult("succeeded")

    return registry.register(
        TaskDefinition(
            key=NOOP_KEY,
            title="Bench: no-op",
            lock_id=NOOP_LOCK_ID,
            batch_size=NOOP_BATCH,
            lease_seconds=300,
            scope_fields=(),
            normalize_scope=normalize,
            scope_queryset=lambda scope: Image.objects.alive().filter(variants_ready=False),
            item_queryset=lambda: Image.objects.all(),
            process=process,
            cost=CostModel(seconds_per_item=0.0001),
        )
    )


def noop_kick() -> tuple[float, int, int]:
    """Create a no-op run over the not-ready rows and kick it to the end in this process.

    Returns (seconds of the kick, items processed, run id).
    """
    from tasks import engine

    noop_definition()
    run = engine.create(task_key=NOOP_KEY, scope={})
    with _common.Stopwatch() as sw:
        run = engine.kick(run_id=run.pk)
    if run.status != "succeeded" or run.processed != run.total:
        raise RuntimeError(f"no-op run {run.pk} ended {run.status} at {run.processed}/{run.total}")
    return sw.seconds, run.processed, run.pk


def bare_updates(ids: list[int]) -> float:
    from django.db import connection

    with connection.cursor() as cur, _common.Stopwatch() as sw:
        for pk in ids:
            cur.execute("UPDATE gallery_image SET updated_at = now() WHERE id = %s", [pk])
    return sw.seconds


def profile_noop(top: int = 25) -> tuple[str, dict]:
    """cProfile of one more no-op kick: the top entries by own and cumulative time, and a
    breakdown (seconds) of where the kick's wall time went."""
    _set_ready(None, False)
    profiler = cProfile.Profile()
    profiler.enable()
    seconds, items, _ = noop_kick()
    profiler.disable()
    out = io.StringIO()
    out.write(f"no-op kick under cProfile: {items} items in {seconds:.2f}s\n")
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)

    def cum(file_end: str, func: str, key: int = 3) -> float:
        return sum(
            v[key] for (f, _line, name), v in stats.stats.items() if f.endswith(file_end) and name == func
        )

    checkpoint = cum("tasks/engine/checkpoint.py", "checkpoint")
    claim = cum("tasks/engine/claims.py", "claim_batch")
    process = cum("tasks/engine/runner.py", "process_one")
    settle = cum("tasks/engine/lifecycle.py", "settle")
    breakdown = {
        "kick_s": round(seconds, 3),
        "checkpoint_s": round(checkpoint, 3),
        # Inside the checkpoints: waiting on the server (round trip + the commit's WAL flush).
        "server_wait_s": round(cum("psycopg/connection.py", "wait", key=2), 3),
        "item_thread_handoff_s": round(process, 3),
        "claim_batches_s": round(claim, 3),
        "settle_s": round(settle, 3),
        "other_s": round(seconds - checkpoint - claim - process - settle, 3),
        "items": items,
    }
    return out.getvalue(), breakdown


def _set_ready(ids: list[int] | None, ready: bool) -> None:
    from gallery.models import Image

    qs = Image.objects.all() if ids is None else Image.objects.filter(pk__in=ids)
    qs.update(variants_ready=ready)


def bench_noop(items: int, profile: bool, rounds: int = ROUNDS) -> dict:
    """No-op kicks and bare updates, interleaved in ``rounds`` slices of the rows.

    The disk's WAL flush latency wanders by 10x from one minute to the next on a shared
    machine, so the two loops run alternately over the same slices (each slice: a fresh
    no-op run over just those rows, kicked to the end; then the bare updates of the same
    ids) and the totals are compared.
    """
    from django.db import connection

    from tasks.engine import checkpoint
    from tests.engine_support import make_images

    make_images(items)
    noop_definition()
    ids = list(_all_ids())
    background = _common.wait_for_quiet()
    _set_ready(None, True)
    size = -(-len(ids) // rounds)
    noop_s = bare_s = 0.0
    noop_items = 0
    per_round = []
    for i in range(rounds):
        part = ids[i * size : (i + 1) * size]
        if not part:
            break
        _set_ready(part, False)
        s, n, _ = noop_kick()
        _set_ready(part, True)
        b = bare_updates(part)
        noop_s, bare_s, noop_items = noop_s + s, bare_s + b, noop_items + n
        per_round.append([round(n / s, 1), round(len(part) / b, 1)])
    noop_rate = noop_items / noop_s
    bare_rate = len(ids) / bare_s
    result = {
        "items": noop_items,
        "rounds": rounds,
        "batch_size": NOOP_BATCH,
        "noop_seconds": round(noop_s, 3),
        "noop_items_per_s": round(noop_rate, 1),
        "bare_seconds": round(bare_s, 3),
        "bare_updates_per_s": round(bare_rate, 1),
        "noop_over_bare": round(noop_rate / bare_rate, 4),
        "per_item_ms": {
            "noop": round(1000 * noop_s / noop_items, 4),
            "bare": round(1000 * bare_s / len(ids), 4),
        },
        "per_round_noop_bare_per_s": per_round,
        "cpu_busy_before_start": background,
    }
    _common.log(f"[engine] {result}")

    # Diagnostics (one 5000-item kick each):
    # 1. every checkpoint folding into the run row (what each item cost before the fast
    #    checkpoint, which writes only the batch row);
    _set_ready(None, False)
    fold_every = checkpoint.FOLD_EVERY_S
    checkpoint.FOLD_EVERY_S = 0.0  # read by checkpoint() at each item
    try:
        s, n, _ = noop_kick()
    finally:
        checkpoint.FOLD_EVERY_S = fold_every
    folding = round(n / s, 1)
    # 2. the whole session without synchronous commits: the engine's cost without WAL flushes.
    with connection.cursor() as cur:
        cur.execute("SET synchronous_commit = off")
    try:
        async_s, async_items, _ = noop_kick()
        bare_async_s = bare_updates(ids)
    finally:
        with connection.cursor() as cur:
            cur.execute("RESET synchronous_commit")
    result["diagnostics"] = {
        "noop_items_per_s_every_checkpoint_folds": folding,
        "noop_items_per_s_session_sync_commit_off": round(async_items / async_s, 1),
        "bare_updates_per_s_session_sync_commit_off": round(len(ids) / bare_async_s, 1),
    }
    _common.log(f"[engine] diagnostics: {result['diagnostics']}")
    if profile or noop_rate < TARGET_NOOP or noop_rate / bare_rate < TARGET_NOOP_OVER_BARE:
        text, breakdown = profile_noop()
        result["profile"] = text
        result["profile_breakdown_s"] = breakdown
        _common.log(text)
        _common.log(f"[engine] breakdown: {breakdown}")
    return result


def _all_ids():
    from gallery.models import Image

    return Image.objects.order_by("pk").values_list("pk", flat=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=DEFAULT_ITEMS)
    parser.add_argument("--copies", type=int, default=None, help="bench_parallel --copies")
    parser.add_argument("--rounds", type=int, default=None, help="bench_parallel --rounds")
    parser.add_argument("--skip-parallel", action="store_true", help="no two_over_one_worker")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)

    import bench_parallel

    copies = args.copies or bench_parallel.DEFAULT_COPIES
    with _common.temp_media() as media, _common.bench_database():
        result = bench_noop(args.items, args.profile)
        result["targets"] = {
            "noop_items_per_s": TARGET_NOOP,
            "noop_over_bare": TARGET_NOOP_OVER_BARE,
            "two_over_one_worker": TARGET_TWO_OVER_ONE,
        }
        if not args.skip_parallel:
            from gallery.models import Image
            from tasks.models import AdminTaskRun

            AdminTaskRun.objects.all().delete()
            Image.objects.all().delete()
            raw = bench_parallel.run_measurements(media, copies, args.rounds or bench_parallel.DEFAULT_ROUNDS)
            result["two_over_one_worker"] = raw["two_over_one"]
            result["two_over_one_detail"] = raw
    result["machine"] = {"cpus": os.cpu_count()}
    _common.merge_result("engine", result)
    print(json.dumps({k: v for k, v in result.items() if k != "profile"}, indent=2))


if __name__ == "__main__":
    main()
