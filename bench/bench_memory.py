"""Peak memory of one preprocess_image call, against the worker memory bound.

    python bench/bench_memory.py [--keep-images DIR]

Each measurement runs in a fresh subprocess (``--child IMAGE_ID``) that sets Django up, loads
the Image row and calls ``gallery.services.preprocess_image`` with the local variant store;
its peak RSS is ``ru_maxrss`` (the interpreter, Django and Pillow included: the child's RSS
after imports is reported as ``baseline_rss_mb``). On Linux a process's ru_maxrss starts at
its parent's RSS (fork copies it and execve keeps the high-water mark), so the children are
started by a tiny launcher process spawned before this script loads anything big; the
child's VmHWM (per-address-space peak, reset by execve) is recorded as a cross-check. Measured: the 3 largest corpus photos (by
pixels) and a generated ~100 MP JPEG (smooth gradient + noise, Pillow quality 90), baseline and
progressive. The 100 MP file is 12000x8333 = 99,996,000 px: 12000x8334 is 100,008,000 px,
over PICSITE_MAX_PIXELS (100,000,000), and would be refused at upload, never processed.
A baseline JPEG that big decodes at 1/4 scale through draft() (shrink-on-load); a
progressive one needs libjpeg's whole-image coefficient buffer, so it is measured too.

Writes the "memory" key of bench/results.json: ``bound_mb`` (PICSITE_WORKER_MEMORY_MB from
settings, or the environment, default 512), ``peak_rss_mb_largest_photo``, ``peak_rss_mb_100mp``,
``peak_rss_mb_100mp_progressive``, ``within_bound``, and per-image details.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402  (puts the repo on sys.path)

BIG_SIZE = (12000, 8333)
QUALITY = 90


def bound_mb() -> tuple[int, str]:
    """settings.PICSITE_WORKER_MEMORY_MB when settings define it, else the environment's."""
    from django.conf import settings

    if hasattr(settings, "PICSITE_WORKER_MEMORY_MB"):
        return int(settings.PICSITE_WORKER_MEMORY_MB), "settings.PICSITE_WORKER_MEMORY_MB"
    return int(os.environ.get("PICSITE_WORKER_MEMORY_MB", 512)), "env PICSITE_WORKER_MEMORY_MB (default 512)"


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _vm_hwm_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def launcher_main() -> int:
    """Start one child per request line ({"id", "env"}); answer with the child's last line."""
    for line in sys.stdin:
        request = json.loads(line)
        proc = subprocess.run(
            [sys.executable, __file__, "--child", str(request["id"])],
            capture_output=True, text=True, check=False, timeout=600, env=request["env"],
            cwd=str(_common.REPO),
        )
        if proc.returncode != 0:
            reply = json.dumps({"error": proc.stderr[-3000:]})
        else:
            reply = proc.stdout.strip().splitlines()[-1]
        print(reply, flush=True)
    return 0


class Launcher:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--launcher"],
            cwd=_common.REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env=dict(os.environ, PYTHONPATH=str(_common.REPO)),
        )

    def measure(self, image_id: int) -> dict:
        env = dict(os.environ, PYTHONPATH=str(_common.REPO))
        self.proc.stdin.write(json.dumps({"id": image_id, "env": env}) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        if "error" in reply:
            raise RuntimeError(f"child for image {image_id} failed:\n{reply['error']}")
        return reply

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


def child_main(image_id: int) -> int:
    import django

    django.setup()
    from gallery.models import Image
    from gallery.services import preprocess_image
    from gallery.storage import variant_store_resolve

    image = Image.objects.get(pk=image_id)
    store = variant_store_resolve()
    baseline = _rss_mb()
    started = time.perf_counter()
    outcome = preprocess_image(image, store, force=True)
    seconds = time.perf_counter() - started
    print(json.dumps({
        "baseline_rss_mb": round(baseline, 1),
        "peak_rss_mb": round(_rss_mb(), 1),
        "vm_hwm_mb": round(_vm_hwm_mb(), 1),
        "seconds": round(seconds, 2),
        "tiers": outcome.tiers_written,
        "ready": outcome.variants_ready,
    }), flush=True)
    return 0


def make_big_jpegs(folder: Path) -> dict[str, Path]:
    """~100 MP smooth gradient + mild noise, saved baseline and progressive."""
    from PIL import Image, ImageChops

    w, h = BIG_SIZE
    horizontal = Image.linear_gradient("L").rotate(90).resize((w, h), Image.Resampling.BILINEAR)
    vertical = Image.linear_gradient("L").resize((w, h), Image.Resampling.BILINEAR)
    noise = Image.effect_noise((w, h), 6)
    red = ImageChops.add(horizontal, noise, scale=1.0, offset=-128)
    green = ImageChops.add(vertical, noise, scale=1.0, offset=-128)
    blue = ImageChops.add(ImageChops.invert(horizontal), vertical, scale=2.0)
    del horizontal, vertical, noise
    img = Image.merge("RGB", (red, green, blue))
    del red, green, blue
    out = {}
    for name, progressive in (("baseline", False), ("progressive", True)):
        path = folder / f"gradient_{w}x{h}_{name}.jpg"
        img.save(path, "JPEG", quality=QUALITY, progressive=progressive, optimize=progressive)
        out[name] = path
    return out


def largest_photos(n: int = 3) -> list[Path]:
    from PIL import Image

    sizes = []
    for path in _common.corpus_photos():
        with Image.open(path) as im:
            sizes.append((im.width * im.height, path))
    return [p for _, p in sorted(sizes, reverse=True)[:n]]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--launcher", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--keep-images", type=Path, help="write the generated JPEGs here and keep them")
    args = parser.parse_args(argv)
    if args.child:
        sys.exit(child_main(args.child))
    if args.launcher:
        sys.exit(launcher_main())

    # The generated 100 MP files may be over the default 50 MB upload cap, which is not
    # what this bench is about: raise it for the ingest in this process.
    os.environ["PICSITE_MAX_UPLOAD_BYTES"] = str(512 * 1024 * 1024)
    os.environ["PICSITE_MAX_UPLOAD_REQUEST_BYTES"] = str(512 * 1024 * 1024)  # settings require >= the file cap
    result: dict = {}
    # Started while this process is still small; each request carries the environment.
    launcher = Launcher()
    with tempfile.TemporaryDirectory(prefix="picsite-bench-big-") as tmp, _common.temp_media(), \
            _common.bench_database():
        bound, source = bound_mb()
        result.update(bound_mb=bound, bound_source=source)
        folder = args.keep_images or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        big = make_big_jpegs(folder)
        _common.log(f"[memory] generated 100 MP JPEGs in {time.perf_counter() - started:.1f}s")
        from gallery.services import image_ingest

        photos = {}
        for path in largest_photos():
            image = image_ingest(data=path.read_bytes(), filename=path.name).image
            photos[path.name] = launcher.measure(image.pk) | {"size": [image.width, image.height]}
            _common.log(f"[memory] {path.name}: {photos[path.name]}")
        bigs = {}
        for name, path in big.items():
            image = image_ingest(data=path.read_bytes(), filename=path.name).image
            bigs[name] = launcher.measure(image.pk) | {
                "size": [image.width, image.height], "file_mb": round(path.stat().st_size / 2**20, 1)
            }
            _common.log(f"[memory] 100 MP {name}: {bigs[name]}")
        launcher.close()
    largest = max(photos.items(), key=lambda kv: kv[1]["peak_rss_mb"])
    result.update({
        "peak_rss_mb_largest_photo": largest[1]["peak_rss_mb"],
        "largest_photo": largest[0],
        "peak_rss_mb_100mp": bigs["baseline"]["peak_rss_mb"],
        "peak_rss_mb_100mp_progressive": bigs["progressive"]["peak_rss_mb"],
        "photos": photos,
        "generated_100mp": bigs,
    })
    peaks = [v["peak_rss_mb"] for v in (*photos.values(), *bigs.values())]
    result["within_bound"] = max(peaks) <= bound
    _common.merge_result("memory", result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
