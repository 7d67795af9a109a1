"""Variant garbage collection (the variants-gc task): deletion and listing throughput.

    python bench/bench_gc.py [--local-objects 20000] [--s3-objects 2000] [--kept-share 0.1]

In a throwaway database, a library of variant objects in the versioned layout
(``gallery/variants/{hh}/{hash}_{version}_{w}.{fmt}``, 8 widths x 2 formats per hash) is put
in a local variant root and in a bucket on moto's standalone S3 server (loopback). A share
of the hashes (``--kept-share``) are photos with a serving set naming 4 of their 16 objects
(so their collection goes through the photo's claim and the set read); every other object
is an orphan. The grace is 0. One ``variants-gc`` run (256 shards) is kicked to the end in
this process, through the task's own path: listing, database read, claims, ``delete_many``.

Writes the "gc" key of bench/results.json:

- ``objects_per_s``: {"local", "s3"}: objects the run deleted / the run's wall time;
- ``list_ms_per_1k``: {"local", "s3"}: listing the whole ``gallery/variants/`` prefix
  (``VariantStore.list``: directory walk / ListObjectsV2 paginator), ms per 1000 objects
  (median of 3);
- ``detail``: per store, objects put, deleted and kept, run seconds, shards, and a check
  that exactly the named objects are left.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402  (puts the repo on sys.path)

WIDTHS = (320, 480, 640, 800, 1080, 1280, 1920, 2560)
FORMATS = ("avif", "webp")
NAMED_WIDTHS = (320, 640)  # what a kept photo's serving set names: 4 of its 16 objects
KEY_VERSION = "0123456789ab"
FOLDER = "gallery"


def digest(i: int, salt: str) -> str:
    return hashlib.sha256(f"{salt}-{i}".encode()).hexdigest()[:32]


def object_key(d: str, width: int, fmt: str) -> str:
    return f"{FOLDER}/variants/{d[:2]}/{d}_{KEY_VERSION}_{width}.{fmt}"


def library(n_objects: int, kept_share: float, salt: str) -> tuple[list[str], list[str], list[str]]:
    """(every key, hashes of the kept photos, hashes of the rest)."""
    per_hash = len(WIDTHS) * len(FORMATS)
    hashes = [digest(i, salt) for i in range(n_objects // per_hash)]
    kept = hashes[: int(len(hashes) * kept_share)]
    keys = [object_key(d, w, f) for d in hashes for w in WIDTHS for f in FORMATS]
    return keys, kept, hashes[len(kept) :]


def make_kept_photos(hashes: list[str], kind: str) -> set[str]:
    """Photos with a serving set (no files needed: nothing reads an original); returns the
    keys their sets name."""
    from gallery.models import Image, VariantSet

    images = Image.objects.bulk_create(
        [Image(original=f"originals/{d}.jpg", image_key=f"variants/{d}", width=4000, height=3000) for d in hashes]
    )
    sets = VariantSet.objects.bulk_create(
        [
            VariantSet(
                image=image, state="serving", recipe_version="bench", key_version=KEY_VERSION, storage_kind=kind,
                folder=FOLDER, widths=list(NAMED_WIDTHS), formats=list(FORMATS), ready_max_width=max(NAMED_WIDTHS),
            )
            for image in images
        ]
    )  # fmt: skip
    for image, vset in zip(images, sets, strict=True):
        Image.objects.filter(pk=image.pk).update(serving_set=vset, variants_ready=True, ready_max_width=max(NAMED_WIDTHS))
    return {object_key(d, w, f) for d in hashes for w in NAMED_WIDTHS for f in FORMATS}


def list_ms_per_1k(store, expected: int) -> float:
    def listing() -> None:
        found = sum(1 for _ in store.list(f"{FOLDER}/variants/"))
        if found != expected:
            raise RuntimeError(f"listed {found} objects, expected {expected}")

    return round(_common.median_ms(listing, repeat=3, warmup=1) * 1000 / expected, 2)


def gc_run() -> tuple[float, object]:
    from tasks import engine

    run = engine.create(task_key="variants-gc", scope={})
    with _common.Stopwatch() as sw:
        while True:
            run = engine.kick(run_id=run.pk)
            if run.status not in ("queued", "running"):
                break
            time.sleep(0.05)  # a shard waits on a retry (a photo was busy)
    if run.status != "succeeded" or run.failed:
        raise RuntimeError(f"gc run {run.pk} ended {run.status}, failed {run.failed}: {run.recent_issues[:3]}")
    return sw.seconds, run


def measure(store, keys: list[str], named: set[str], remaining) -> dict:
    """List, collect, and check what is left (``remaining()`` -> the keys still stored)."""
    from tasks.models import AdminTaskRun

    listing = list_ms_per_1k(store, len(keys))
    seconds, run = gc_run()
    left = remaining()
    if left != named:
        raise RuntimeError(f"after the run {len(left)} objects are left, expected the {len(named)} named ones")
    deleted = len(keys) - len(named)
    if run.spent_writes != deleted:
        raise RuntimeError(f"the run counted {run.spent_writes} deletions, expected {deleted}")
    AdminTaskRun.objects.all().delete()
    _common.log(f"[gc] {store.kind}: {deleted} objects deleted in {seconds:.2f}s, listing {listing} ms/1k")
    return {
        "objects_per_s": round(deleted / seconds, 1),
        "list_ms_per_1k": listing,
        "objects": len(keys),
        "deleted": deleted,
        "kept": len(named),
        "run_s": round(seconds, 2),
        "shards": run.total,
        "left_exactly_the_named": True,
    }


def bench_local(root: Path, n: int, kept_share: float) -> dict:
    from gallery.storage import variant_store_resolve

    keys, kept, _ = library(n, kept_share, "local")
    for key in keys:  # plain files: the bench measures deletion, not put-if-absent's fsyncs
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(key.encode())
    named = make_kept_photos(kept, "local")
    store = variant_store_resolve()

    def remaining() -> set[str]:
        return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}

    return measure(store, keys, named, remaining)


def bench_s3(n: int, kept_share: float) -> dict:
    import boto3
    from django.conf import settings

    from gallery.storage import variant_store_resolve

    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        endpoint = f"http://127.0.0.1:{port}"
        _wait_for_port(port)
        bucket = f"picsite-bench-{uuid.uuid4().hex[:8]}"
        client = boto3.client(
            "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test"
        )
        client.create_bucket(Bucket=bucket)
        for name, value in {
            "PICSITE_VARIANT_STORAGE": "s3", "PICSITE_S3_BUCKET": bucket, "PICSITE_S3_ENDPOINT_URL": endpoint,
            "PICSITE_S3_ACCESS_KEY_ID": "test", "PICSITE_S3_SECRET_ACCESS_KEY": "test", "PICSITE_S3_REGION": "us-east-1",
        }.items():  # fmt: skip
            setattr(settings, name, value)
        keys, kept, _ = library(n, kept_share, "s3")
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda k: client.put_object(Bucket=bucket, Key=k, Body=k.encode()), keys))
        named = make_kept_photos(kept, "s3")
        time.sleep(1.1)  # S3 keeps LastModified in whole seconds: every object in the past
        store = variant_store_resolve()

        def remaining() -> set[str]:
            pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            return {o["Key"] for page in pages for o in page.get("Contents", ())}

        return measure(store, keys, named, remaining)
    finally:
        proc.terminate()
        proc.wait(10)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, timeout: float = 20.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"moto did not listen on {port}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--local-objects", type=int, default=20_000)
    parser.add_argument("--s3-objects", type=int, default=2_000)
    parser.add_argument("--kept-share", type=float, default=0.1)
    args = parser.parse_args()
    os.environ["PICSITE_VARIANT_GC_GRACE_DAYS"] = "0"
    with _common.temp_media(prefix="picsite-bench-gc-") as media:
        with _common.bench_database(name=os.environ.get("PICSITE_BENCH_DB", "picsite_bench") + "_gc"):
            busy = _common.wait_for_quiet()
            local = bench_local(media / "v", args.local_objects, args.kept_share)
            s3 = bench_s3(args.s3_objects, args.kept_share)
    result = {
        "objects_per_s": {"local": local["objects_per_s"], "s3": s3["objects_per_s"]},
        "list_ms_per_1k": {"local": local["list_ms_per_1k"], "s3": s3["list_ms_per_1k"]},
        "detail": {"local": local, "s3": s3},
        "cpu_busy_before": busy,
        "cpu_count": os.cpu_count(),
    }
    _common.merge_result("gc", result)
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
