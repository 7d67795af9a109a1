"""How soon a new upload shows: upload answered -> its smallest tier stored, on one worker.

    python bench/bench_upload.py [--photos N] [--poll-ms 10]

In a throwaway database (``_common.bench_database``) with local variant storage, one django-q2
uploads cluster (``manage.py qcluster``, PICSITE_Q_WORKERS=1, as ``make run`` starts it)
serves the upload jobs. Each corpus photo is uploaded the way the upload view and the API do
it (``image_ingest``, then ``image_variants_enqueue`` after the commit); the moment that
returns is "upload answered". The bench then watches the image's row every ``--poll-ms``:
its claim appearing (the job started), ``ready_max_width`` reaching the smallest tier (the
first tier stored: served from then on) and ``variants_ready`` (every tier stored). Photos
go one at a time, so no job waits behind another. An untimed synthetic upload warms the
worker up first.

Writes the "upload" key of bench/results.json:

- ``first_tier_ms_p50`` / ``first_tier_ms_max``: upload answered -> smallest tier stored
  (goal p50 <= 1000 ms). It includes the queue's pickup (django-q2's ORM broker polls every
  ``Q_CLUSTER["poll"]`` seconds), reported alone as ``queue_wait_ms_*``;
- ``all_tiers_over_pipeline``: the jobs' own time (claimed -> every tier stored: fetching
  the original, the database and storage writes included) over ``bench_variants``' pipeline
  time for the same photos, measured in this run the same way (a fresh process per photo):
  the fast first tier must not slow the whole (goal <= 1.15).
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402  (puts the repo on sys.path)

TARGETS = {
    "first_tier_ms_p50": "<= 1000",
    "all_tiers_over_pipeline": "<= 1.15",
}


def _worker(media: Path, log: Path) -> subprocess.Popen:
    env = dict(
        os.environ,
        PICSITE_Q_WORKERS="1",
        PICSITE_VARIANT_STORAGE="local",
        PICSITE_LOG_LEVEL="INFO",  # its "running." line says it is up
        PYTHONUNBUFFERED="1",
    )
    env.pop("Q_CLUSTER_NAME", None)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "manage.py", "qcluster"],
            cwd=_common.REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + 60
    while "running." not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the upload worker did not start:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # the cluster stops its own workers
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def _upload(data: bytes, name: str) -> tuple[int, float]:
    """Ingest and enqueue as the upload view does; (image id, the moment it answered)."""
    from gallery.services import image_ingest, image_variants_enqueue

    image = image_ingest(data=data, filename=name).image
    image_variants_enqueue(image_ids=[image.pk])  # autocommit: enqueued at once
    return image.pk, time.monotonic()


def _watch(image_id: int, first_width: int, poll_s: float, timeout: float = 180) -> dict[str, float]:
    """Moments (time.monotonic) the job claimed the image, stored the first tier, and all."""
    from gallery.models import Image

    seen: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while "all" not in seen:
        if time.monotonic() > deadline:
            raise SystemExit(f"image {image_id}: not ready after {timeout}s ({seen})")
        row = Image.objects.filter(pk=image_id).values("processing_token", "ready_max_width", "variants_ready", "variants_error").first()
        now = time.monotonic()
        if row["variants_error"]:
            raise SystemExit(f"image {image_id} failed: {row['variants_error']}")
        if row["processing_token"] or row["ready_max_width"]:
            seen.setdefault("claimed", now)
        if row["ready_max_width"] >= first_width:
            seen.setdefault("first", now)
        if row["variants_ready"]:
            seen["all"] = now
        time.sleep(poll_s)
    return seen


def _pipeline_seconds(path: Path) -> float:
    """bench_variants' pipeline on this photo, in a fresh process as bench_variants runs it."""
    from bench_variants import spawn_worker

    with tempfile.TemporaryDirectory(prefix="bench_upload_") as tmp:
        return spawn_worker("pipeline", path, tmp)["seconds"]


def _warm_up(poll_s: float) -> None:
    from PIL import Image as PILImage

    buf = io.BytesIO()
    PILImage.effect_noise((1600, 1200), 40).convert("RGB").save(buf, "JPEG", quality=85)
    image_id, _ = _upload(buf.getvalue(), "warm-up.jpg")
    _watch(image_id, 320, poll_s)


def _ms(values: list[float]) -> dict[str, float]:
    return {"p50": round(statistics.median(values) * 1000, 1), "max": round(max(values) * 1000, 1)}


def bench(args, media: Path) -> dict:
    from gallery.services import variant_recipe_current

    recipe = variant_recipe_current()
    paths = _common.corpus_photos()[: args.photos]
    poll_s = args.poll_ms / 1000
    busy = _common.wait_for_quiet(threshold=0.25, max_wait_s=30)
    load_start = os.getloadavg()[0]
    log = media / "worker.log"
    proc = _worker(media, log)
    rows = []
    try:
        _warm_up(poll_s)
        for path in paths:
            image_id, answered = _upload(path.read_bytes(), path.name)
            from gallery.models import Image

            width = Image.objects.values_list("width", flat=True).get(pk=image_id)
            first_width = recipe.tier_widths(width)[0]
            seen = _watch(image_id, first_width, poll_s)
            row = {
                "photo": path.name,
                "first_tier_ms": round((seen["first"] - answered) * 1000, 1),
                "queue_wait_ms": round((seen["claimed"] - answered) * 1000, 1),
                "job_first_tier_ms": round((seen["first"] - seen["claimed"]) * 1000, 1),
                "all_tiers_ms": round((seen["all"] - answered) * 1000, 1),
                "job_seconds": round(seen["all"] - seen["claimed"], 3),
            }
            rows.append(row)
            _common.log(
                f"{path.name[:38]:38s} first tier {row['first_tier_ms']:7.1f} ms (queue {row['queue_wait_ms']:6.1f}, "
                f"job {row['job_first_tier_ms']:6.1f}) | all tiers {row['all_tiers_ms']:7.1f} ms, job {row['job_seconds']:.3f} s"
            )
    finally:
        _stop(proc)
    load_after_jobs = os.getloadavg()[0]
    for row, path in zip(rows, paths, strict=True):
        row["pipeline_seconds"] = round(_pipeline_seconds(path), 3)
    first = [r["first_tier_ms"] / 1000 for r in rows]
    job_s = sum(r["job_seconds"] for r in rows)
    pipeline_s = sum(r["pipeline_seconds"] for r in rows)
    result = {
        "photos": len(rows),
        "workers": 1,
        "poll_ms": args.poll_ms,
        "queue_poll_s": _queue_poll_s(),
        "machine": {
            "cpus": os.cpu_count(),
            "cpu_busy_before": busy,
            "loadavg_1m_start_after_jobs_end": [round(load_start, 2), round(load_after_jobs, 2), round(os.getloadavg()[0], 2)],
        },
        "targets": TARGETS,
        "first_tier_ms_p50": _ms(first)["p50"],
        "first_tier_ms_max": _ms(first)["max"],
        "queue_wait_ms_p50": _ms([r["queue_wait_ms"] / 1000 for r in rows])["p50"],
        "queue_wait_ms_max": _ms([r["queue_wait_ms"] / 1000 for r in rows])["max"],
        "job_first_tier_ms_p50": _ms([r["job_first_tier_ms"] / 1000 for r in rows])["p50"],
        "job_first_tier_ms_max": _ms([r["job_first_tier_ms"] / 1000 for r in rows])["max"],
        "all_tiers_ms_p50": _ms([r["all_tiers_ms"] / 1000 for r in rows])["p50"],
        "job_seconds": round(job_s, 3),
        "pipeline_seconds": round(pipeline_s, 3),
        "all_tiers_over_pipeline": round(job_s / pipeline_s, 4),
        "per_photo": rows,
    }
    result["targets_met"] = {
        field: float(result[field]) <= float(goal.split()[-1]) for field, goal in TARGETS.items()
    }
    return result


def _queue_poll_s() -> float | None:
    from django.conf import settings

    return settings.Q_CLUSTER.get("poll")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=None, help="only the first N corpus photos")
    parser.add_argument("--poll-ms", type=float, default=10.0, help="how often the row is read")
    args = parser.parse_args()
    with _common.temp_media() as media, _common.bench_database(name=_common.BENCH_DB + "_upload"):
        result = bench(args, media)
    _common.merge_result("upload", result)
    for field in ("first_tier_ms_p50", "first_tier_ms_max", "queue_wait_ms_p50", "job_first_tier_ms_p50",
                  "all_tiers_ms_p50", "all_tiers_over_pipeline"):  # fmt: skip
        goal = TARGETS.get(field, "")
        print(f"upload.{field} = {result[field]} {goal}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
