"""Batches of given images: latency beside a busy backfill, and memory under load.

    python bench/bench_batch.py [--item-s 0.5] [--skip-memory] [--only-sse]

Writes the "batch" key of bench/results.json:

- ``latency_ratio``: wall time of a 20-item batch run while a backfill keeps both workers
  busy, over the same batch alone (goal <= 1.3). Items take ``--item-s`` (0.5 s; the
  test-batch task of tests/engine_support.py); two worker processes run the real drain job
  (``python -m tests.engine_worker drain``): on the backfill in the first case — between
  two of its batches a worker serves any runnable batch run first — and on the batch itself
  in the second.
- ``peak_rss_mb`` (and per worker): a 100-image batch of preprocess-images (100 distinct
  photos derived from the corpus's five largest) through two worker processes, their peak
  RSS (VmHWM) against PICSITE_WORKER_MEMORY_MB (``within_bound``).
- ``sse_p95_ms``: a 100-image metadata-refresh batch worked by two worker processes while a
  client reads its event stream from a real uvicorn server: for every ``item`` event, the
  time from the state change's commit (its AdminTaskEvent row's time, written in the
  committing transaction) to the client reading it, p95 in ms (goal <= 250; an absolute
  figure, so printed with the machine's load average, ``sse_load_avg_1m``).
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402  (puts the repo on sys.path)

BATCH_ITEMS = 20


def _workers(run_id: int, env: dict, n: int = 2) -> list[subprocess.Popen]:
    return [
        subprocess.Popen([sys.executable, "-m", "tests.engine_worker", "drain", str(run_id)], cwd=_common.REPO, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        for _ in range(n)
    ]


def _wait(run_id: int, timeout: float = 900, *, from_first_item: bool = False) -> float:
    """Seconds until the run finished: from now, or (``from_first_item``) from its first
    item starting, so worker start-up is not counted."""
    from tasks.models import AdminTaskEvent, AdminTaskRun, RunStatus

    started = time.monotonic()
    first = None
    while time.monotonic() - started < timeout:
        if from_first_item and first is None and AdminTaskEvent.objects.filter(run_id=run_id).exists():
            first = time.monotonic()
        if AdminTaskRun.objects.filter(pk=run_id, status__in=RunStatus.finished()).exists():
            return time.monotonic() - (first or started)
        time.sleep(0.02)
    raise SystemExit(f"run {run_id} did not finish in {timeout}s")


def latency(args) -> dict:
    from tasks import engine
    from tests.engine_support import TEST_BATCH_TASK_KEY, make_images

    env = dict(os.environ, PICSITE_TEST_ITEM_DELAY=str(args.item_s), PYTHONPATH=str(_common.REPO))
    # Alone: two workers on the batch.
    alone_ids = [i.pk for i in make_images(BATCH_ITEMS)]
    run = engine.create(task_key=TEST_BATCH_TASK_KEY, scope={"image_ids": alone_ids})
    procs = _workers(run.pk, env)
    alone_s = _wait(run.pk, from_first_item=True)  # ready workers, nothing else to do
    for p in procs:
        p.wait(60)
    # Beside a backfill that keeps both workers busy.
    make_images(400)  # the library run's backlog (not ready)
    library = engine.create(task_key=TEST_BATCH_TASK_KEY, scope={})
    procs = _workers(library.pk, env)
    time.sleep(3 * args.item_s * 4)  # both workers well into their backfill batches
    busy_ids = [i.pk for i in make_images(BATCH_ITEMS)]
    run = engine.create(task_key=TEST_BATCH_TASK_KEY, scope={"image_ids": busy_ids})
    busy_s = _wait(run.pk)
    engine.cancel(run_id=library.pk)
    for p in procs:
        p.kill()
        p.wait()
    _common.log(f"[batch] {BATCH_ITEMS} items of {args.item_s}s: alone {alone_s:.2f}s, beside a backfill {busy_s:.2f}s")
    return {"latency_ratio": round(busy_s / alone_s, 3), "alone_s": round(alone_s, 2), "beside_backfill_s": round(busy_s, 2),
            "items": BATCH_ITEMS, "item_s": args.item_s}  # fmt: skip


def _derived_photos(n: int) -> list[bytes]:
    """``n`` distinct JPEGs from the corpus's five largest photos (a crop and a tint each)."""
    from PIL import Image as PILImage

    largest = sorted(_common.corpus_photos(), key=lambda p: _pixels(p), reverse=True)[:5]
    out = []
    for i in range(n):
        with PILImage.open(largest[i % 5]) as im:
            im = im.convert("RGB")
            w, h = im.size
            crop = im.crop((i % 7, i % 5, w - (i % 3), h - (i % 4)))
            crop.putpixel((0, 0), (i % 256, (i * 7) % 256, (i * 13) % 256))
            buf = io.BytesIO()
            crop.save(buf, "JPEG", quality=90)
            out.append(buf.getvalue())
    return out


def _pixels(path: Path) -> int:
    from PIL import Image as PILImage

    with PILImage.open(path) as im:
        return im.width * im.height


def memory(args) -> dict:
    from django.conf import settings

    from gallery.services import image_ingest
    from tasks import engine

    ids = [image_ingest(data=data, filename=f"derived-{i}.jpg").image.pk for i, data in enumerate(_derived_photos(100))]
    run = engine.create(task_key="preprocess-images", scope={"image_ids": ids})
    env = dict(os.environ, PYTHONPATH=str(_common.REPO))
    procs = _workers(run.pk, env)
    peaks = {p.pid: 0 for p in procs}
    started = time.monotonic()
    while any(p.poll() is None for p in procs):
        for p in procs:
            peaks[p.pid] = max(peaks[p.pid], _vm_hwm_mb(p.pid))
        time.sleep(0.2)
        if time.monotonic() - started > 1800:
            raise SystemExit("the 100-image batch did not finish in 30 minutes")
    took = time.monotonic() - started
    run.refresh_from_db()
    bound = settings.PICSITE_WORKER_MEMORY_MB
    peak = max(peaks.values())
    _common.log(f"[batch] 100 photos in {took:.0f}s ({run.status}, {run.succeeded} succeeded); worker peaks {sorted(peaks.values())} MB, bound {bound}")
    return {"peak_rss_mb": round(peak, 1), "worker_peaks_mb": sorted(round(v, 1) for v in peaks.values()),
            "bound_mb": bound, "within_bound": peak <= bound, "memory_run_s": round(took, 1),
            "memory_run_status": run.status, "memory_run_succeeded": run.succeeded}  # fmt: skip


def _vm_hwm_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


SSE_ITEMS = 100


def sse(args) -> dict:
    """Item change committed -> SSE client has the event (see the module docstring)."""
    import http.client
    import json
    import threading

    from django.conf import settings
    from django.contrib.auth import get_user_model
    from PIL import Image as PILImage

    from api.auth import api_token_create
    from tasks import engine
    from tasks.models import AdminTaskEvent
    from tests.engine_support import make_images
    from tests.live_server import live_uvicorn

    media = Path(settings.MEDIA_ROOT)
    ids = []
    for image in make_images(SSE_ITEMS):
        path = media / image.original.name
        path.parent.mkdir(parents=True, exist_ok=True)
        PILImage.new("RGB", (640, 480), (image.pk % 256, 90, 40)).save(path, "JPEG")
        ids.append(image.pk)
    user = get_user_model().objects.create_superuser("bench-sse", "bench@example.com", "pw-bench-sse-1")
    token = api_token_create(user=user, name="bench-sse")[1]
    run = engine.create(task_key="metadata-refresh", scope={"image_ids": ids})
    received: dict[int, float] = {}
    with live_uvicorn(media_root=media.parent / "sse-server-media") as base_url:
        host, port = base_url.split("//")[1].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        conn.request("GET", f"/api/v1/tasks/runs/{run.pk}/events", headers={"Authorization": f"Bearer {token}"})
        response = conn.getresponse()
        ready = threading.Event()

        def read() -> None:
            name = ""
            for raw in response:
                line = raw.decode().rstrip("\r\n")
                if line.startswith("event:"):
                    name = line[6:].strip()
                elif line.startswith("data:") and name == "item":
                    received[json.loads(line[5:])["id"]] = time.time()
                elif line.startswith("data:") and name == "items":
                    ready.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        if not ready.wait(30):
            raise SystemExit("the event stream sent no items snapshot")
        env = dict(os.environ, PYTHONPATH=str(_common.REPO))
        procs = _workers(run.pk, env)
        took = _wait(run.pk, timeout=600)
        for p in procs:
            p.wait(60)
        reader.join(30)
        conn.close()
    load = os.getloadavg()
    committed = {pk: at.timestamp() for pk, at in AdminTaskEvent.objects.filter(run_id=run.pk).values_list("pk", "at")}
    missing = sorted(set(committed) - set(received))
    latencies = sorted((received[pk] - committed[pk]) * 1000 for pk in committed if pk in received)
    if not latencies:
        raise SystemExit("no item events received")

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))]

    _common.log(
        f"[batch] SSE: {len(latencies)} item events of {SSE_ITEMS} items in {took:.1f}s: p50 {pct(0.5):.1f} ms, "
        f"p95 {pct(0.95):.1f} ms, max {latencies[-1]:.1f} ms; {len(missing)} not received; "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs"
    )
    return {
        "sse_p95_ms": round(pct(0.95), 1),
        "sse_p50_ms": round(pct(0.5), 1),
        "sse_max_ms": round(latencies[-1], 1),
        "sse_events": len(latencies),
        "sse_events_missed": len(missing),
        "sse_load_avg_1m": round(load[0], 2),
        "sse_cpus": os.cpu_count(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--item-s", type=float, default=0.5)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--only-sse", action="store_true", help="measure sse_p95_ms only")
    args = parser.parse_args()
    result: dict = {}
    with _common.temp_media(), _common.bench_database(name=_common.BENCH_DB + "_batch"):
        import tests.engine_support  # noqa: F401  (registers the test tasks)

        result.update(sse(args))
        if not args.only_sse:
            result.update(latency(args))
            if not args.skip_memory:
                result.update(memory(args))
    _common.merge_result("batch", {**_common.load_results().get("batch", {}), **result})
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
