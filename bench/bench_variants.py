"""Benchmark the variant pipeline against a naive Pillow baseline and against its own floor, on
the real photo corpus.

    python bench/bench_variants.py [--out bench/results.json] [--photos N]
    python bench/bench_variants.py --sweep [--photos N]        # encoder settings table
    python bench/bench_variants.py --cascade-check [--photos N]

Contenders, each in its own fresh subprocess per photo (wall time excludes interpreter
start-up and imports; peak RSS is that child's; CPU is the child's process time, every
thread included, so parallel work shows as CPU above wall):

- pipeline: ``variant_tiers`` (the smallest tier from its own shrink-on-load decode, the rest
  cascaded from one decode at the largest tier's scale) and ``TierEncoder`` (the formats of
  a tier side by side when the thread budget allows), as the worker runs them;
- floor: the physical minimum of that work: one decode at the scale the largest tier needs,
  plus the same encodes (same encoder, same scheduling) on tiers resized beforehand;
  ``pipeline_over_floor`` is the goal. ``encode_only`` is those encodes alone (the old
  floor), for information as ``pipeline_over_encode_only``;
- naive: decode, exif_transpose, LANCZOS each tier from the full image, Pillow's default
  encoder speeds, one thing at a time;
- profile: the pipeline once more on one thread with every stage timed (wall and CPU, exact
  because nothing overlaps): where the work goes, per stage and per photo.

Quality is the mean SSIM (luminance, 8x8 uniform window) of every decoded tier against an
exact LANCZOS downscale of the full-resolution, upright, sRGB original, averaged over tiers
and formats. The corpus is read in place: ../shared/corpus beside the repo, or
$PICSITE_CORPUS. --avif-speed/--webp-method/... override the recipe for both contenders.

Measured on the 2-core dev box (shared, load 4.1-4.7), default recipe (AVIF q55 speed 9, WebP
q75 method 2, two threads), 18 photos: pipeline/naive time 0.18, pipeline/floor CPU 1.40 (wall
1.02 in that run, 1.4-1.6 in others: read the CPU figure on a shared machine), quality delta
0.0037, bytes 1.071x, peak RSS 497 MB (296 MB on one thread; both on the 3024x4032 portrait).
Cascaded tiers cost 0.0011 SSIM. docs/encoder-settings.md says where the time goes.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from PIL import Image, ImageCms, ImageOps  # noqa: E402

from gallery.imaging import (  # noqa: E402
    FORMATS,
    StageTimes,
    TierEncoder,
    VariantRecipe,
    VariantSource,
    decode_for_variants,
    default_encoder_threads,
    encode_variant,
    render_tiers,
    variant_tiers,
)

MAX_PIXELS = 100_000_000
# Goals for the default recipe (shown by bench/run_all.py).
TARGETS = {
    "pipeline_over_naive": "<= 0.30",
    "pipeline_over_floor": "<= 1.10",  # floor: one decode at the largest tier's scale + encodes
    "quality_delta": "<= 0.01",
    "bytes_over_naive": "<= 1.15",
    "peak_rss_mb": "<= 400",
}
NAIVE_AVIF_SPEED = 6
NAIVE_WEBP_METHOD = 4


def make_recipe() -> VariantRecipe:
    """The default recipe, or one overridden by --avif-speed etc. (passed to workers in env)."""
    return VariantRecipe(**json.loads(os.environ.get("BENCH_RECIPE", "{}")))


def corpus_dir() -> Path:
    default = REPO.parent / "shared" / "corpus"
    return default if default.is_dir() else Path(os.environ.get("PICSITE_CORPUS", default))


def photo_paths(limit: int | None = None) -> list[Path]:
    paths = sorted(p for p in (corpus_dir() / "photos").iterdir() if p.is_file())
    return paths[:limit] if limit else paths


def peak_rss_mb() -> float:
    """Peak RSS of this process's own address space.

    ru_maxrss is preserved across fork+exec, so a child spawned by a big parent would report
    the parent's size; VmHWM belongs to the address space exec created.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ---------------------------------------------------------------------------------------------
# The two contenders (each run inside a worker subprocess)
# ---------------------------------------------------------------------------------------------


Ladder = list[tuple[int, str, bytes]]


def _threads(recipe: VariantRecipe) -> int:
    return recipe.encoder_threads or default_encoder_threads()


def run_pipeline(data: bytes, recipe: VariantRecipe, stages: StageTimes | None = None) -> Ladder:
    """What the worker does for one photo, minus storage: the ladder, smallest tier first."""
    out = []
    with VariantSource(data, max_pixels=MAX_PIXELS) as source, TierEncoder(recipe, stages=stages) as encoder:
        widths = recipe.tier_widths(source.oriented_size[0])
        for w, tier in variant_tiers(source, widths, threads=_threads(recipe), stages=stages):
            out += [(w, fmt, blob) for fmt, blob in encoder.encode(tier).items()]
    return out


def run_naive(data: bytes, recipe: VariantRecipe) -> Ladder:
    im = Image.open(io.BytesIO(data))
    im.load()
    with contextlib.suppress(Exception):  # broken EXIF: keep the stored orientation
        im = ImageOps.exif_transpose(im)
    im = im.convert("RGB")
    out = []
    for w in recipe.tier_widths(im.width):
        tier = im.resize((w, max(1, round(w * im.height / im.width))), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        tier.save(buf, "AVIF", quality=recipe.avif_quality, speed=NAIVE_AVIF_SPEED)
        out.append((w, "avif", buf.getvalue()))
        buf = io.BytesIO()
        tier.save(buf, "WEBP", quality=recipe.webp_quality, method=NAIVE_WEBP_METHOD)
        out.append((w, "webp", buf.getvalue()))
    return out


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> dict:
    return {"seconds": time.perf_counter() - start[0], "cpu_seconds": time.process_time() - start[1]}


def run_floor(data: bytes, recipe: VariantRecipe) -> tuple[Ladder, dict, dict]:
    """The floor: one decode at the scale the largest tier needs, plus the pipeline's own
    encodes (same TierEncoder) of its own tiers, resized beforehand (untimed). Returns the
    ladder, the floor's time and the encodes' time alone (each wall and CPU seconds)."""
    with VariantSource(data, max_pixels=MAX_PIXELS) as source:
        widths = recipe.tier_widths(source.oriented_size[0])
        tiers = list(variant_tiers(source, widths, threads=_threads(recipe)))
    start = _clock()
    with VariantSource(data, max_pixels=MAX_PIXELS) as source:
        source.decode(max(widths), last=True)
    decode = _since(start)
    start = _clock()
    with TierEncoder(recipe) as encoder:
        out = [(w, fmt, blob) for w, tier in tiers for fmt, blob in encoder.encode(tier).items()]
    encodes = _since(start)
    floor = {k: decode[k] + encodes[k] for k in decode}
    return out, floor, encodes


def worker(kind: str, path: str, outdir: str) -> None:
    import pillow_heif

    pillow_heif.register_heif_opener()
    recipe = make_recipe()
    data = Path(path).read_bytes()
    extra: dict = {}
    if kind == "floor":
        results, timing, extra["encode_only"] = run_floor(data, recipe)
    elif kind == "profile":
        # One thread, nothing overlapping: each stage's CPU is its own.
        stages = StageTimes()
        start = _clock()
        results = run_pipeline(data, replace(recipe, encoder_threads=1), stages)
        timing = _since(start)
        extra["stages"] = stages.as_dict()
    else:
        start = _clock()
        results = (run_pipeline if kind == "pipeline" else run_naive)(data, recipe)
        timing = _since(start)
    rss = peak_rss_mb()
    files = []
    for w, fmt, blob in results:
        target = Path(outdir) / f"{kind}_{w}.{fmt}"
        target.write_bytes(blob)
        files.append({"width": w, "format": fmt, "path": str(target), "bytes": len(blob)})
    print(json.dumps({**timing, **extra, "peak_rss_mb": rss, "files": files}))


def spawn_worker(kind: str, path: Path, outdir: str) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", kind, str(path), outdir],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} worker failed on {path.name}:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# Quality: reference downscales and SSIM
# ---------------------------------------------------------------------------------------------


def _flatten(im: Image.Image) -> Image.Image:
    if im.mode in ("RGBA", "LA", "PA") or im.has_transparency_data:
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im).convert("RGB")
    return im.convert("RGB")


def reference_original(path: Path) -> Image.Image:
    """Full-resolution, upright, sRGB, white-flattened original (no shortcuts)."""
    im = Image.open(path)
    im.load()
    icc = im.info.get("icc_profile")
    with contextlib.suppress(Exception):  # broken EXIF: keep the stored orientation
        im = ImageOps.exif_transpose(im)
    if icc and im.mode in ("RGB", "RGBA", "CMYK", "L"):
        try:
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            srgb = ImageCms.createProfile("sRGB")
            alpha = im.getchannel("A") if im.mode == "RGBA" else None
            base = im.convert("RGB") if im.mode == "RGBA" else im
            conv = ImageCms.profileToProfile(base, src, srgb, outputMode="RGB")
            if conv is not None:
                if alpha is not None:
                    conv.putalpha(alpha)
                im = conv
        except ImageCms.PyCMSError:
            pass
    return _flatten(im)


def luma(im: Image.Image):
    import numpy as np

    a = np.asarray(_flatten(im), dtype=np.float32)
    return a[..., 0] * 0.299 + a[..., 1] * 0.587 + a[..., 2] * 0.114


def _box_mean(a, k: int):
    import numpy as np

    s = np.pad(a, ((1, 0), (1, 0))).cumsum(0, dtype=np.float64).cumsum(1)
    return (s[k:, k:] - s[:-k, k:] - s[k:, :-k] + s[:-k, :-k]) / (k * k)


def ssim(x, y, window: int = 8) -> float:
    """Mean SSIM of two luminance arrays (uniform window, Wang et al. constants)."""
    if x.shape != y.shape:
        raise ValueError(f"shape mismatch {x.shape} vs {y.shape}")
    k = max(1, min(window, *x.shape))
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = _box_mean(x, k), _box_mean(y, k)
    sxx = _box_mean(x * x, k) - mx * mx
    syy = _box_mean(y * y, k) - my * my
    sxy = _box_mean(x * y, k) - mx * my
    num = (2 * mx * my + c1) * (2 * sxy + c2)
    den = (mx * mx + my * my + c1) * (sxx + syy + c2)
    return float((num / den).mean())


class References:
    """Reference luminance per tier size for one photo (computed once, reused)."""

    def __init__(self, path: Path):
        self.original = reference_original(path)
        self._cache: dict[tuple[int, int], object] = {}

    def at(self, size: tuple[int, int]):
        if size not in self._cache:
            im = self.original
            if im.size != size:
                im = im.resize(size, Image.Resampling.LANCZOS)
            self._cache[size] = luma(im)
        return self._cache[size]


def score_blob(refs: References, blob: bytes) -> float:
    im = Image.open(io.BytesIO(blob))
    im.load()
    return ssim(refs.at(im.size), luma(im))


# ---------------------------------------------------------------------------------------------
# Modes
# ---------------------------------------------------------------------------------------------


def merge_variants(out: Path, variants: dict) -> None:
    """Update only the "variants" key of results.json (other benches own the other keys)."""
    try:
        from _common import RESULTS, merge_result  # bench/_common.py: locked, atomic write

        if out.resolve() == RESULTS.resolve():
            merge_result("variants", variants, out)
            return
    except ImportError:
        pass
    results = {}
    if out.exists():
        try:
            results = json.loads(out.read_text())
        except json.JSONDecodeError:
            results = {}
    results["variants"] = variants
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, out)


STAGES = ("first_decode", "first_resize", "decode", "resize", "encode_avif", "encode_webp")


def _cpu_busy(seconds: float = 1.0) -> float | None:
    try:
        from _common import cpu_busy_fraction

        return round(cpu_busy_fraction(seconds), 3)
    except ImportError:
        return None


def _ratio(a: float, b: float) -> float:
    return round(a / b, 4) if b else float("nan")


def bench(out: Path, limit: int | None) -> dict:
    recipe = make_recipe()
    busy_start = _cpu_busy()
    load_start = os.getloadavg()[0]
    per_photo = []
    kinds = ("pipeline", "floor", "encode_only", "naive", "profile")
    totals: dict = {f"{k}_{unit}": 0.0 for k in kinds for unit in ("seconds", "cpu_seconds")}
    totals.update({"pipeline_bytes": 0, "naive_bytes": 0})
    stage_totals = {name: {"wall": 0.0, "cpu": 0.0} for name in STAGES}
    quality = {"pipeline": [], "naive": []}
    rss = {"pipeline": 0.0, "naive": 0.0}
    by_format = {k: {f: {"ssim": [], "bytes": 0} for f in FORMATS} for k in ("pipeline", "naive")}
    identical = True
    print(
        f"{'photo':34s} {'pipeline s':>10s} {'cpu':>6s} | {'floor s':>7s} {'cpu':>6s} {'enc s':>6s} | "
        f"{'naive s':>7s} {'cpu':>6s} | {'p/floor':>7s} {'ssim p':>6s} {'ssim n':>6s} {'MB':>6s}",
        file=sys.stderr,
    )
    for path in photo_paths(limit):
        with tempfile.TemporaryDirectory(prefix="bench_variants_") as tmp:
            runs = {kind: spawn_worker(kind, path, tmp) for kind in ("pipeline", "naive")}
            floor = spawn_worker("floor", path, tmp)
            profile = spawn_worker("profile", path, tmp)
            # The same bytes on one thread as on the pipeline's threads (put-if-absent needs it).
            same = {(f["width"], f["format"]): Path(f["path"]).read_bytes() for f in profile["files"]}
            identical &= all(same.get((f["width"], f["format"])) == Path(f["path"]).read_bytes() for f in runs["pipeline"]["files"])
            refs = References(path)
            row: dict = {
                "photo": path.name,
                "size": list(refs.original.size),
                "floor": {"seconds": round(floor["seconds"], 3), "cpu_seconds": round(floor["cpu_seconds"], 3)},
                "encode_only": {k: round(v, 3) for k, v in floor["encode_only"].items()},
                "profile": {"seconds": round(profile["seconds"], 3), "cpu_seconds": round(profile["cpu_seconds"], 3)},
                "stages": profile["stages"],
            }
            for unit in ("seconds", "cpu_seconds"):
                totals[f"floor_{unit}"] += floor[unit]
                totals[f"encode_only_{unit}"] += floor["encode_only"][unit]
                totals[f"profile_{unit}"] += profile[unit]
            for name, times in profile["stages"].items():
                stage_totals.setdefault(name, {"wall": 0.0, "cpu": 0.0})
                stage_totals[name]["wall"] += times["wall"]
                stage_totals[name]["cpu"] += times["cpu"]
            for kind, run in runs.items():
                scores = [score_blob(refs, Path(f["path"]).read_bytes()) for f in run["files"]]
                q = sum(scores) / len(scores)
                nbytes = sum(f["bytes"] for f in run["files"])
                fmt_scores: dict[str, list[float]] = {}
                fmt_bytes: dict[str, int] = {}
                for f, score in zip(run["files"], scores, strict=True):
                    fmt_scores.setdefault(f["format"], []).append(score)
                    fmt_bytes[f["format"]] = fmt_bytes.get(f["format"], 0) + f["bytes"]
                row[kind] = {
                    "seconds": round(run["seconds"], 3),
                    "cpu_seconds": round(run["cpu_seconds"], 3),
                    "peak_rss_mb": round(run["peak_rss_mb"], 1),
                    "bytes": nbytes,
                    "ssim": round(q, 5),
                    "ssim_by_format": {k: round(sum(v) / len(v), 5) for k, v in fmt_scores.items()},
                    "bytes_by_format": fmt_bytes,
                    "tiers": sorted({f["width"] for f in run["files"]}),
                }
                if kind == "pipeline":  # the smallest tier comes from a decode of its own
                    first = min(f["width"] for f in run["files"])
                    row[kind]["first_tier_ssim"] = round(
                        sum(s for f, s in zip(run["files"], scores, strict=True) if f["width"] == first) / len(FORMATS), 5
                    )
                for fmt, values in fmt_scores.items():
                    by_format[kind][fmt]["ssim"].append(sum(values) / len(values))
                    by_format[kind][fmt]["bytes"] += fmt_bytes[fmt]
                totals[f"{kind}_seconds"] += run["seconds"]
                totals[f"{kind}_cpu_seconds"] += run["cpu_seconds"]
                totals[f"{kind}_bytes"] += nbytes
                quality[kind].append(q)
                rss[kind] = max(rss[kind], run["peak_rss_mb"])
        p, n = row["pipeline"], row["naive"]
        print(
            f"{path.name[:34]:34s} {p['seconds']:10.3f} {p['cpu_seconds']:6.2f} | {row['floor']['seconds']:7.3f} "
            f"{row['floor']['cpu_seconds']:6.2f} {row['encode_only']['seconds']:6.3f} | {n['seconds']:7.3f} "
            f"{n['cpu_seconds']:6.2f} | {p['seconds'] / row['floor']['seconds']:7.3f} {p['ssim']:.4f} "
            f"{n['ssim']:.4f} {p['peak_rss_mb']:6.1f}",
            file=sys.stderr,
        )
        per_photo.append(row)
    q_pipe = sum(quality["pipeline"]) / len(quality["pipeline"])
    q_naive = sum(quality["naive"]) / len(quality["naive"])
    variants = {
        "recipe": {
            "widths": list(recipe.widths),
            "avif_quality": recipe.avif_quality,
            "avif_speed": recipe.avif_speed,
            "webp_quality": recipe.webp_quality,
            "webp_method": recipe.webp_method,
            "encoder_threads": recipe.encoder_threads,
            "threads_used": _threads(recipe),
            "version": recipe.version,
        },
        "naive": {"avif_speed": NAIVE_AVIF_SPEED, "webp_method": NAIVE_WEBP_METHOD},
        "machine": {
            "cpus": os.cpu_count(),
            "cpu_busy_before": busy_start,
            "loadavg_1m_start_end": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        },
        "targets": TARGETS,
        "photos": len(per_photo),
        "pipeline_over_naive": _ratio(totals["pipeline_seconds"], totals["naive_seconds"]),
        # Same run: the pipeline against one decode at the largest tier's scale plus its own
        # encodes (same encoder, same scheduling) on tiers resized beforehand.
        "pipeline_over_floor": _ratio(totals["pipeline_seconds"], totals["floor_seconds"]),
        "pipeline_cpu_over_floor_cpu": _ratio(totals["pipeline_cpu_seconds"], totals["floor_cpu_seconds"]),
        # For information: against the encodes alone (the floor before issue 14).
        "pipeline_over_encode_only": _ratio(totals["pipeline_seconds"], totals["encode_only_seconds"]),
        "pipeline_cpu_over_encode_only_cpu": _ratio(totals["pipeline_cpu_seconds"], totals["encode_only_cpu_seconds"]),
        "pipeline_cpu_over_naive_cpu": _ratio(totals["pipeline_cpu_seconds"], totals["naive_cpu_seconds"]),
        "quality_delta": round(q_naive - q_pipe, 5),
        "pipeline_ssim": round(q_pipe, 5),
        "naive_ssim": round(q_naive, 5),
        "bytes_over_naive": _ratio(totals["pipeline_bytes"], totals["naive_bytes"]),
        "bytes_identical_across_threads": identical,
        "peak_rss_mb": round(rss["pipeline"], 1),
        "naive_peak_rss_mb": round(rss["naive"], 1),
        "by_format": {
            kind: {
                fmt: {"ssim": round(sum(v["ssim"]) / len(v["ssim"]), 5), "bytes": v["bytes"]}
                for fmt, v in fmts.items()
            }
            for kind, fmts in by_format.items()
        },
        "stages": {k: {unit: round(v, 3) for unit, v in t.items()} for k, t in stage_totals.items()},
        "totals": {k: round(v, 3) if isinstance(v, float) else v for k, v in totals.items()},
        "per_photo": per_photo,
    }
    variants["targets_met"] = {
        field: float(variants[field]) <= float(goal.split()[-1]) for field, goal in TARGETS.items()
    }
    merge_variants(out, variants)
    print(json.dumps(variants, indent=2))
    _print_profile(variants)
    return variants


def _print_profile(variants: dict) -> None:
    """Where the work goes: CPU seconds per stage and photo (the one-thread profile run),
    then the totals with wall beside CPU for every contender."""
    names = [name for name in variants["stages"] if variants["stages"][name]["cpu"] or name in STAGES]
    print(f"\n{'CPU s per stage (1 thread)':34s} " + " ".join(f"{n[:12]:>12s}" for n in names) + f" {'total':>8s}")
    for row in variants["per_photo"]:
        cells = [row["stages"].get(n, {}).get("cpu", 0.0) for n in names]
        print(f"{row['photo'][:34]:34s} " + " ".join(f"{c:12.3f}" for c in cells) + f" {sum(cells):8.3f}")
    cells = [variants["stages"][n]["cpu"] for n in names]
    total = sum(cells) or 1.0
    print(f"{'all photos':34s} " + " ".join(f"{c:12.3f}" for c in cells) + f" {sum(cells):8.3f}")
    print(f"{'share':34s} " + " ".join(f"{c / total:12.1%}" for c in cells))
    t = variants["totals"]
    print(f"\n{'totals':12s} {'wall s':>8s} {'CPU s':>8s}")
    for kind in ("pipeline", "floor", "encode_only", "naive", "profile"):
        print(f"{kind:12s} {t[kind + '_seconds']:8.3f} {t[kind + '_cpu_seconds']:8.3f}")
    for field in ("pipeline_over_floor", "pipeline_cpu_over_floor_cpu", "pipeline_over_encode_only", "pipeline_over_naive"):
        goal = variants["targets"].get(field, "")
        print(f"variants.{field} = {variants[field]} {goal}")


def _prepared(limit: int | None):
    """(path, References, the big decode, [(width, tier image)]) per photo, as the pipeline
    makes them."""
    recipe = make_recipe()
    for path in photo_paths(limit):
        data = path.read_bytes()
        with VariantSource(data, max_pixels=MAX_PIXELS) as source:
            widths = recipe.tier_widths(source.oriented_size[0])
            tiers = list(variant_tiers(source, widths))
        img = decode_for_variants(data, max_pixels=MAX_PIXELS, target_width=max(widths))
        yield path, References(path), img, tiers


def sweep(limit: int | None, qualities: bool) -> None:
    base = make_recipe()
    settings: list[tuple[str, VariantRecipe]] = []
    settings += [(f"avif speed {s}", replace(base, avif_speed=s)) for s in (6, 7, 8, 9, 10)]
    settings += [(f"webp method {m}", replace(base, webp_method=m)) for m in (2, 3, 4, 5, 6)]
    if qualities:
        settings += [
            (f"avif q{q} speed {base.avif_speed}", replace(base, avif_quality=q))
            for q in (50, 55, 60, 65)
        ]
        settings += [
            (f"webp q{q} method {base.webp_method}", replace(base, webp_quality=q))
            for q in (70, 75, 80)
        ]
    stats = {name: {"seconds": 0.0, "bytes": 0, "ssim": []} for name, _ in settings}
    for path, refs, _img, tiers in _prepared(limit):
        print(f"sweep: {path.name}", file=sys.stderr)
        for name, recipe in settings:
            fmt = "avif" if name.startswith("avif") else "webp"
            for _w, tier in tiers:
                start = time.perf_counter()
                blob = encode_variant(tier, fmt, recipe)
                stats[name]["seconds"] += time.perf_counter() - start
                stats[name]["bytes"] += len(blob)
                stats[name]["ssim"].append(score_blob(refs, blob))
    print("| setting | encode s | bytes | bytes vs first | mean SSIM |")
    print("|---|---:|---:|---:|---:|")
    firsts: dict[str, int] = {}
    for name, _ in settings:
        st = stats[name]
        fmt = name.split()[0]
        firsts.setdefault(fmt, st["bytes"])
        print(
            f"| {name} | {st['seconds']:.2f} | {st['bytes']:,} | "
            f"{st['bytes'] / firsts[fmt]:.3f} | {sum(st['ssim']) / len(st['ssim']):.5f} |"
        )


def cascade_check(limit: int | None) -> None:
    """Cascaded tiers (each from the next larger) vs each tier from the shared intermediate."""
    from gallery.imaging import variants

    diffs = []
    print("| photo | cascade SSIM | direct SSIM | direct - cascade | cascade s | direct s |")
    print("|---|---:|---:|---:|---:|---:|")
    for path, refs, img, _tiers in _prepared(limit):
        widths = make_recipe().tier_widths(refs.original.width)
        out = {}
        for cascade in (True, False):
            variants._CASCADE = cascade
            start = time.perf_counter()
            tiers = list(render_tiers(img, widths))
            took = time.perf_counter() - start
            scores = [ssim(refs.at(t.size), luma(t)) for _w, t in tiers]
            out[cascade] = (sum(scores) / len(scores), took)
        variants._CASCADE = True
        diff = out[False][0] - out[True][0]
        diffs.append(diff)
        print(
            f"| {path.name} | {out[True][0]:.5f} | {out[False][0]:.5f} | {diff:+.5f} | "
            f"{out[True][1]:.3f} | {out[False][1]:.3f} |"
        )
    print(f"\nmean SSIM cost of cascading: {sum(diffs) / len(diffs):+.5f}, worst {max(diffs):+.5f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results.json")
    parser.add_argument("--photos", type=int, default=None, help="only the first N photos")
    parser.add_argument("--sweep", action="store_true", help="encoder settings table")
    parser.add_argument("--qualities", action="store_true", help="with --sweep: quality rows")
    parser.add_argument("--cascade-check", action="store_true")
    parser.add_argument(
        "--worker", nargs=3, metavar=("KIND", "PATH", "OUTDIR"), help=argparse.SUPPRESS
    )
    for name in ("avif_quality", "avif_speed", "webp_quality", "webp_method", "encoder_threads"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, dest=name)
    args = parser.parse_args(argv)
    overrides = {
        name: getattr(args, name)
        for name in ("avif_quality", "avif_speed", "webp_quality", "webp_method", "encoder_threads")
        if getattr(args, name) is not None
    }
    if overrides:
        os.environ["BENCH_RECIPE"] = json.dumps(overrides)
    if args.worker:
        worker(*args.worker)
    elif args.sweep:
        sweep(args.photos, args.qualities)
    elif args.cascade_check:
        cascade_check(args.photos)
    else:
        bench(args.out, args.photos)


if __name__ == "__main__":
    main()
