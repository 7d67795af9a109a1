"""Serverless push against workers (issue 13): the same backfill driven by QStash deliveries.

    python bench/bench_push.py [--copies K] [--noop-items N]

In a throwaway database and MEDIA_ROOT, the corpus photos are ingested (``--copies`` rows per
photo, as bench_parallel.py). Then, for the same rows and the same run:

- **worker**: a prepress-images run worked by two worker processes (``engine.kick``, what a
  django-q2 drain job runs; bench_parallel.py's W=2 phase), one encoder thread each;
- **push**: the variants reset, a live site (uvicorn, 2 processes, PICSITE_DISPATCH=qstash,
  one encoder thread each) and the QStash stand-in of the tests (``tests/qstash_server.py``:
  the official SDK publishes to it, it delivers signed, 8 deliveries at once); the run is
  created through the API and timed from the create to its end.

``push.over_worker`` = push items/s / worker items/s (goal >= 0.9: pushing must not be the
bottleneck on real work). ``push.noop_items_per_s``: the same push path on ``--noop-items``
synthetic rows of the test task, whose processor does almost nothing: the per-request
overhead (claim, checkpoint, settle, window publish, HTTP and signature both ways).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402  (puts the repo on sys.path)
import bench_parallel  # noqa: E402

TOKEN, KEY = "bench-qstash-token", "sig_" + "b" * 32
logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per delivery otherwise
CONCURRENCY = 8
WINDOW = 16


def _wait_finished(run_id: int, timeout: float = 1800) -> float:
    from tasks.models import AdminTaskRun, RunStatus

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        run = AdminTaskRun.objects.get(pk=run_id)
        if run.status in RunStatus.finished():
            if run.status != RunStatus.SUCCEEDED:
                raise RuntimeError(f"run {run_id} ended {run.status}: {run.last_error} {run.recent_issues[:3]}")
            return time.time()
        time.sleep(0.05)
    raise RuntimeError(f"run {run_id} did not end in {timeout}s")


def _reset_all_variants(media: Path) -> None:
    """As before the worker phase: no variant set at all, so the push phase encodes every
    tier of every row again (a current serving set would make the item a skip)."""
    from gallery.models import Image, VariantSet

    bench_parallel.reset_variants(media)
    Image.objects.update(serving_set=None)
    VariantSet.objects.all().delete()


def push_phase(media: Path, *, task_key: str, api_prefix: str, token: str) -> dict:
    import httpx

    from tasks.models import AdminTaskRun
    from tests.live_server import free_port, live_uvicorn
    from tests.qstash_server import QStashStandIn

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with QStashStandIn(token=TOKEN, signing_key=KEY, concurrency=CONCURRENCY) as qstash:
        env = {
            "PICSITE_DISPATCH": "qstash",
            "QSTASH_URL": qstash.base_url,
            "QSTASH_TOKEN": TOKEN,
            "QSTASH_CURRENT_SIGNING_KEY": KEY,
            "QSTASH_NEXT_SIGNING_KEY": KEY,
            "PICSITE_PUBLIC_URL": base,
            "PICSITE_QSTASH_WINDOW": str(WINDOW),
            "PICSITE_QSTASH_PARALLELISM": str(CONCURRENCY),
            "PICSITE_ENCODER_THREADS": "1",
            "PICSITE_VARIANT_STORAGE": "local",
        }
        with live_uvicorn(media_root=media, env=env, app="tests.push_asgi:application", port=port, workers=2):
            auth = {"Authorization": f"Bearer {token}"}
            for _ in range(6):  # both server processes load the URLconf before the clock starts
                httpx.get(f"{base}/api/v1/{api_prefix}/runs", headers=auth, timeout=60).raise_for_status()
            _common.wait_for_quiet()
            with _common.CpuMeter() as meter:
                start = time.time()
                created = httpx.post(f"{base}/api/v1/{api_prefix}/runs", json={"scope": {}}, headers=auth, timeout=60)
                created.raise_for_status()
                run_id = created.json()["id"]
                end = _wait_finished(run_id)
            qstash.wait_idle(60)
    run = AdminTaskRun.objects.get(pk=run_id)
    seconds = end - start
    deliveries = [d for d in qstash.deliveries if f"/runs/{run_id}/items/" in d.url]
    return {
        "task": task_key,
        "items": run.processed,
        "succeeded": run.succeeded,
        "failed": run.failed,
        "skipped": run.skipped,
        "issues": run.recent_issues[:3],
        "seconds": round(seconds, 3),
        "items_per_s": round(run.processed / seconds, 3),
        "deliveries": len(deliveries),
        "published": sum(1 for m in qstash.published if f"/runs/{run_id}/items/" in m.url),
        "batch_calls": len(qstash.batch_calls),
        "max_concurrent_per_key": max(qstash.max_active.values(), default=0),
        "machine_busy_cpu_s": round(meter.busy_cpu_s, 2),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=bench_parallel.DEFAULT_COPIES)
    parser.add_argument("--noop-items", type=int, default=400)
    args = parser.parse_args(argv)
    with _common.temp_media() as media, _common.bench_database():
        import django

        django.setup()
        from django.contrib.auth import get_user_model

        import tests.engine_support as support
        from api.auth import api_token_create
        from gallery.models import Image
        from tasks import registry

        rows = bench_parallel.prepare_corpus(args.copies)
        worker = bench_parallel.measure_once(2, media)
        _common.log(f"[push] 2 workers: {worker['items_per_s']} items/s")
        user = get_user_model().objects.create_superuser("bench-push", "b@example.com", "pw-bench-push-1")
        token = api_token_create(user=user, name="bench")[1]
        _reset_all_variants(media)
        pre = registry.get(bench_parallel.TASK_KEY)
        push = push_phase(media, task_key=pre.key, api_prefix=pre.api_prefix, token=token)
        if push["succeeded"] != rows:
            raise RuntimeError(f"the push phase did not encode every row: {push}")
        _common.log(f"[push] push, {CONCURRENCY} deliveries: {push['items_per_s']} items/s")
        Image.objects.update(variants_ready=True)  # the no-op task's scope: the synthetic rows only
        support.make_images(args.noop_items)
        noop = push_phase(media, task_key=support.TEST_TASK_KEY, api_prefix=support.DEFINITION.api_prefix, token=token)
        _common.log(f"[push] no-op push: {noop['items_per_s']} items/s")
        if noop["items"] != args.noop_items:
            raise RuntimeError(f"the no-op phase ran {noop['items']} items, not {args.noop_items}")
    result = {
        "rows": rows,
        "cpus": os.cpu_count(),
        "concurrency": CONCURRENCY,
        "window": WINDOW,
        "server_processes": 2,
        "worker_items_per_s": worker["items_per_s"],
        "push_items_per_s": push["items_per_s"],
        "over_worker": round(push["items_per_s"] / worker["items_per_s"], 4),
        "noop_items_per_s": noop["items_per_s"],
        "target_over_worker": 0.9,
        "detail": {"worker": {k: v for k, v in worker.items() if k != "phase_detail"}, "push": push, "noop": noop},
    }
    _common.merge_result("push", result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
