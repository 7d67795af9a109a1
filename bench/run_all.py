"""Run every benchmark, then print bench/results.json and a PASS/MISS table of the targets.

    python bench/run_all.py [--only engine,scale] [--strict]      (``make bench``)

Each bench runs as its own subprocess, in order, and merges its key into bench/results.json:
bench_variants.py ("variants": pipeline vs naive and vs its floor, per-stage profile, CPU beside
wall), bench_upload.py ("upload": upload answered -> first tier stored on one worker, and the
upload jobs' time over the pipeline's), bench_peer.py ("peer": the same ladder through libvips at
equal encoder settings; skipped with a line when pyvips cannot load), bench_engine.py
("engine"), bench_scale.py ("scale"), bench_parallel.py ("parallel", reusing bench_engine's
W=1/W=2 measurement), bench_memory.py ("memory"), bench_recovery.py ("recovery": SIGKILLed
workers' batches taken over), bench_switch.py (adds variants.switch_gap_ms: advertised URLs
during a regeneration), bench_gc.py ("gc": the variants-gc task deleting 20,000 local and
2,000 moto objects, and listing), bench_batch.py ("batch": a batch beside a busy backfill,
memory of a 100-photo batch), bench_quality.py ("quality": content-adaptive quality against
fixed: bytes, SSIMULACRA2 and time per photo), bench_pages.py ("pages": the grid's
server-side ms and, with Debian's wrk installed, requests/s of the production server command
against a static file), bench_push.py ("push": a backfill pushed through the QStash stand-in over
two workers, and no-op items/s of the push path). A bench that crashes is reported and the rest still run. Exit
status: 1 if a bench crashed, or with --strict if a target was missed; else 0.
"""

from __future__ import annotations

import argparse
import json
import operator
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results.json"

BENCHES: list[tuple[str, list[str]]] = [
    ("variants", ["bench_variants.py"]),
    ("upload", ["bench_upload.py"]),
    ("peer", ["bench_peer.py"]),
    ("engine", ["bench_engine.py"]),
    ("scale", ["bench_scale.py"]),
    ("parallel", ["bench_parallel.py", "--reuse-engine"]),
    ("memory", ["bench_memory.py"]),
    ("recovery", ["bench_recovery.py"]),
    ("switch", ["bench_switch.py"]),
    ("gc", ["bench_gc.py"]),
    ("batch", ["bench_batch.py"]),
    ("quality", ["bench_quality.py"]),
    ("pages", ["bench_pages.py"]),
    ("push", ["bench_push.py"]),
]

# (results key, field, comparison, threshold, note); the peer goals are bench_peer.TARGETS.
TARGETS: list[tuple[str, str, str, object, str]] = [
    ("upload", "first_tier_ms_p50", "<=", 1000, "upload answered -> smallest tier stored, 1 worker"),
    ("upload", "all_tiers_over_pipeline", "<=", 1.15, "upload jobs' time / bench_variants pipeline"),
    ("peer", "vips_time_over_pipeline", ">=", 1.0, "libvips ladder time / ours (still ahead?)"),
    ("peer", "vips_bytes_over_pipeline", ">=", 0.95, "libvips ladder bytes / ours"),
    ("peer", "quality_delta", "<=", 0.005, "libvips SSIM - ours"),
    ("engine", "noop_items_per_s", ">=", 1000, "engine bookkeeping, no-op items/s"),
    ("engine", "noop_over_bare", ">=", 0.5, "no-op kick vs bare UPDATE loop"),
    ("engine", "two_over_one_worker", ">=", 1.7, "preprocess backfill, 2 workers / 1"),
    ("scale", "within_20pct", "==", True, "no-op items/s at 10k/100k/1M within 20%"),
    ("scale", "preview_ms_1m", "<", 50, "preview count at 1M rows"),
    ("scale", "runs_ms_1m", "<", 50, "GET runs work at 1M rows"),
    ("scale", "seq_scan_on_image", "==", False, "no Seq Scan on gallery_image"),
    ("scale", "next_batch_preprocess_ms_1m", "<", 50, "(extra) preprocess keyset claim at 1M"),
    ("parallel", "efficiency", ">=", 0.85, "T(W=2) / (min(2,C) * T(W=1)); 0.85 = 1.7 on 2 cores"),
    ("memory", "within_bound", "==", True, "every peak RSS <= bound_mb"),
    ("recovery", "adopt_s_p95", "<=", 45, "SIGKILLed worker's batch taken over (s, default lease)"),
    ("variants", "switch_gap_ms", "==", 0, "longest an advertised URL failed during a regeneration"),
    ("batch", "latency_ratio", "<=", 1.3, "20-item batch beside a busy backfill / alone"),
    ("batch", "within_bound", "==", True, "100-photo batch, 2 workers: peak RSS <= PICSITE_WORKER_MEMORY_MB"),
    ("batch", "sse_p95_ms", "<=", 250, "item change committed -> SSE client event, p95 ms (see sse_load_avg_1m)"),
    ("quality", "bytes_over_fixed", "<=", 0.85, "auto quality ladder bytes / fixed, same run"),
    ("quality", "time_over_fixed", "<=", 1.3, "auto quality ladder time / fixed (search included)"),
    ("quality", "mean_score_delta", ">=", 0, "mean SSIMULACRA2 per photo, auto - fixed"),
    ("quality", "worst_photo_delta", ">=", -2, "lowest per-photo SSIMULACRA2 auto - fixed"),
    ("pages", "grid_ms_p50", "<=", 8, "grid view, 48 photos x 17 URLs, server side (ms)"),
    ("push", "over_worker", ">=", 0.9, "backfill via QStash stand-in (8 deliveries) / 2 workers"),
]

# Figures shown beside the targets, without a goal of their own.
INFO: list[tuple[str, str, str]] = [
    ("upload", "first_tier_ms_max", "slowest first tier (ms)"),
    ("upload", "queue_wait_ms_p50", "of which the queue's pickup (ms)"),
    ("variants", "pipeline_cpu_over_floor_cpu", "CPU seconds: pipeline / floor"),
    ("variants", "pipeline_over_encode_only", "wall: pipeline / encodes alone (the old floor)"),
    ("variants", "pipeline_cpu_over_naive_cpu", "CPU seconds: pipeline / naive"),
    ("push", "noop_items_per_s", "push path, no-op items/s (per-request overhead)"),
    ("batch", "sse_load_avg_1m", "load average (1 min) while sse_p95_ms was measured"),
]

OPS = {">=": operator.ge, "<=": operator.le, "<": operator.lt, ">": operator.gt, "==": operator.eq}


def run(only: set[str] | None) -> dict[str, str]:
    status = {}
    for key, cmd in BENCHES:
        if only and key not in only:
            continue
        print(f"\n=== {key}: {' '.join(cmd)}", flush=True)
        started = time.monotonic()
        proc = subprocess.run([sys.executable, str(BENCH / cmd[0]), *cmd[1:]], check=False)
        took = time.monotonic() - started
        status[key] = f"ok ({took:.0f}s)" if proc.returncode == 0 else f"CRASHED (exit {proc.returncode}, {took:.0f}s)"
        print(f"=== {key}: {status[key]}", flush=True)
    return status


def table(results: dict) -> tuple[list[str], int]:
    lines = [f"{'target':44s} {'value':>14s}  {'goal':>10s}  result"]
    misses = 0
    for key, field, op, threshold, note in TARGETS:
        value = results.get(key, {}).get(field)
        if results.get(key, {}).get("available") is False:
            verdict, shown = "SKIPPED", "-"  # e.g. pyvips cannot load: the bench said why
        elif value is None:
            verdict, shown = "MISSING", "-"
        else:
            ok = OPS[op](value, threshold)
            verdict = "PASS" if ok else "MISS"
            misses += not ok
            shown = str(value)
        lines.append(f"{key + '.' + field:44s} {shown:>14s}  {op + ' ' + str(threshold):>10s}  {verdict}   {note}")
    pages = results.get("pages")
    if isinstance(pages, dict):
        if pages.get("load_available"):
            info = {k: pages.get(k) for k in ("grid_rps", "static_rps", "grid_over_static", "server_workers", "loadavg_1m")}
            lines.append(f"pages under load ({pages.get('wrk')}, no goal): {info}")
        else:
            lines.append(f"pages under load: SKIPPED ({pages.get('load_skipped_reason', 'not measured')})")
    for key, field, note in INFO:
        value = results.get(key, {}).get(field)
        shown = "-" if value is None else str(value)
        lines.append(f"{key + '.' + field:44s} {shown:>14s}  {'(info)':>10s}          {note}")
    variants = results.get("variants")
    if isinstance(variants, dict):
        for field, goal in (variants.get("targets") or {}).items():
            lines.append(f"{'variants.' + field:44s} {str(variants.get(field)):>14s}  {str(goal):>10s}  (see bench_variants)")
        if not variants.get("targets"):
            info = {k: variants.get(k) for k in ("pipeline_over_naive", "quality_delta", "bytes_over_naive", "peak_rss_mb")}
            lines.append(f"variants (no targets recorded): {info}")
    return lines, misses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated subset: " + ",".join(k for k, _ in BENCHES))
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    started = time.monotonic()
    status = run(only)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    print("\n=== bench/results.json")
    print(json.dumps(results, indent=2))
    lines, misses = table(results)
    print(f"\n=== targets (total {time.monotonic() - started:.0f}s)")
    for name, state in status.items():
        print(f"  {name}: {state}")
    print("\n".join(lines))
    crashed = any(not s.startswith("ok") for s in status.values())
    return 1 if crashed or (args.strict and misses) else 0


if __name__ == "__main__":
    sys.exit(main())
