"""Benchmark the variant pipeline against a libvips ladder at equal encoder settings ("peer").

    python bench/bench_peer.py [--out bench/results.json] [--photos N] [--repeat R] [PHOTO ...]

libvips (pyvips with its binary wheel, the library most image services use) makes the same
ladder as our pipeline for each corpus photo that bench_variants uses: the same tier widths
and heights, shrink-on-load decode (``thumbnail_buffer`` to the largest tier), upright
(autorotate), sRGB through the embedded ICC profile, each smaller tier resized (lanczos3)
from the next larger one as our cascade does, then AVIF (heifsave, AV1) and WebP with our
recipe's encoder settings mapped to libvips' (see ``vips_settings``; the mapping is checked
in libvips and libheif source):

- AVIF quality -> heifsave ``Q`` (libheif's aom plugin and libavif both turn it into the
  same AV1 quantizer); AVIF speed -> ``effort = 9 - speed`` (heifsave passes
  ``speed = 9 - effort`` to libheif, whose aom plugin sets it as aom's cpu-used 0..9;
  libavif clamps our speed 10 to cpu-used 9 too); 4:2:0 chroma (libvips' default below
  Q 90, Pillow's default); auto-tiling on in both.
- WebP quality -> ``Q``, WebP method -> ``effort`` (libvips sets ``config.method = effort``).
- Encoder threads: our ``encoder_threads`` (0 = cores / workers) becomes libvips'
  concurrency, which heifsave hands to libheif's aom encoder as its thread count (and
  which libvips also uses for its own decode/resize thread pool).
- No metadata written (``strip``): our variants carry no EXIF/XMP/ICC either.
- Same pixels: an opaque alpha is dropped (as ours does), 16-bit and grey become 8-bit
  sRGB, and JPEGs load with ``unlimited`` (libvips otherwise fails a JPEG after 100
  decoder warnings, which Pillow decodes).

Both contenders run in this one process, photo by photo, ``--repeat`` times each in
alternating order (median wall and CPU time kept; CPU time counts every thread). The
libvips operation cache is off, so a repeat cannot reuse a previous result. Quality is
bench_variants' measure: mean SSIM of every decoded tier against the same full-resolution
LANCZOS reference; ``quality_delta`` = libvips minus ours (positive: libvips looks better).
An encoders-only pass then encodes our own rendered tiers with both libraries' encoders,
which separates the encoders (libavif vs libheif, each with its own libaom) from the
decode/resize stages. Results go to the "peer" key of bench/results.json; without a
loadable pyvips the key says ``available: false`` and a line says why.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import statistics
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from _common import RESULTS, cpu_busy_fraction, merge_result  # noqa: E402
from bench_variants import (  # noqa: E402
    References,
    make_recipe,
    photo_paths,
    run_pipeline,
    score_blob,
)

from gallery.imaging import (  # noqa: E402
    FORMATS,
    VariantRecipe,
    decode_for_variants,
    default_encoder_threads,
    encode_variant,
    inspect_image,
    render_tiers,
)

MAX_PIXELS = 100_000_000
# Are we still ahead of libvips? (shown by bench/run_all.py)
TARGETS = {
    "vips_time_over_pipeline": ">= 1.0",  # libvips takes at least as long as we do
    "vips_bytes_over_pipeline": ">= 0.95",  # our files at most ~5% larger than libvips'
    "quality_delta": "<= 0.005",  # libvips' tiers no more than 0.005 SSIM better
}
Ladder = list[tuple[int, str, bytes]]


def load_pyvips():
    """(pyvips module, None) when libvips loads and can encode AVIF and WebP, else (None, why)."""
    try:
        import pyvips
    except Exception as exc:  # ImportError, or OSError when no libvips binary can be loaded
        return None, f"pyvips cannot load ({type(exc).__name__}: {exc})"
    try:
        probe = pyvips.Image.black(16, 16, bands=3).cast("uchar").copy(interpretation="srgb")
        probe.heifsave_buffer(compression="av1", Q=50, effort=0, strip=True)
        probe.webpsave_buffer(Q=75, effort=0, strip=True)
    except Exception as exc:  # pyvips.Error: a libvips built without libheif/aom or libwebp
        return None, f"libvips {pyvips.version(0)}.{pyvips.version(1)} cannot encode AVIF/WebP ({exc})"
    return pyvips, None


def vips_settings(recipe: VariantRecipe, threads: int) -> dict:
    """Our recipe as libvips save options, plus the libvips concurrency (= encoder threads)."""
    return {
        "avif": {
            "compression": "av1",
            "encoder": "aom",
            "Q": recipe.avif_quality,
            # heifsave: speed = 9 - effort; aom's cpu-used stops at 9, and libavif clamps
            # our speed 10 to cpu-used 9 as well.
            "effort": 9 - min(recipe.avif_speed, 9),
            "subsample_mode": "auto",  # 4:2:0 below Q 90, as Pillow's default
            "bitdepth": 8,
            "strip": True,
        },
        "webp": {"Q": recipe.webp_quality, "effort": recipe.webp_method, "strip": True},
        "concurrency": threads,
    }


def _tier_sizes(width: int, height: int, widths: list[int]) -> list[tuple[int, int]]:
    """(w, h) largest first, heights exactly as render_tiers computes them."""
    return [(w, max(1, round(w * height / width))) for w in sorted(set(widths), reverse=True)]


def _rgb8(img):
    """8-bit sRGB with or without alpha, as our decode gives (thumbnail can leave 16-bit or
    grey); a fully opaque alpha is dropped as ours drops it, so both encode the same pixels."""
    if img.format != "uchar" or img.bands < 3 or img.interpretation != "srgb":
        img = img.colourspace("srgb")
        if img.format != "uchar":
            img = img.cast("uchar")
    if img.bands == 4 and img.extract_band(3).min() == 255:
        img = img.extract_band(0, n=3)
    return img


def run_vips(pyvips, data: bytes, recipe: VariantRecipe, settings: dict, stages: dict | None = None) -> Ladder:
    """The libvips ladder: shrink-on-load thumbnail to the largest tier, cascade, encode."""
    start = time.perf_counter()
    header = pyvips.Image.new_from_buffer(data, "")
    fields = set(header.get_fields())
    orientation = header.get("orientation") if "orientation" in fields else 1
    width, height = (header.height, header.width) if orientation >= 5 else (header.width, header.height)
    sizes = _tier_sizes(width, height, recipe.tier_widths(width))
    # export_profile only with an embedded profile: without one libvips would go through
    # XYZ and back, which our pipeline does not do either (it assumes sRGB).
    options = {"export_profile": "srgb"} if "icc-profile-data" in fields else {}
    if header.get("vips-loader") == "jpegload_buffer":
        # libvips gives up on a JPEG after 100 decoder warnings; Pillow (ours) decodes such
        # a damaged scan (olympus_u1020 in the corpus), so load the way ours does.
        options["option_string"] = "unlimited"
    w0, h0 = sizes[0]
    # Decode once into memory (each tier is built from it); an image already in memory is
    # not copied again, so the second copy_memory only costs when _rgb8 changed something.
    current = pyvips.Image.thumbnail_buffer(data, w0, height=h0, size="force", **options).copy_memory()
    current = _rgb8(current).copy_memory()
    tiers = [(w0, current)]
    for w, h in sizes[1:]:
        current = current.resize(w / current.width, vscale=h / current.height, kernel="lanczos3")
        current = current.copy_memory()
        tiers.append((w, current))
    for w, tier in tiers:
        if (tier.width, tier.height) != (w, dict(sizes)[w]):
            raise RuntimeError(f"libvips made {tier.width}x{tier.height}, expected {w}x{dict(sizes)[w]}")
    split = {"decode_resize": time.perf_counter() - start, "avif": 0.0, "webp": 0.0}
    out = []
    for w, tier in reversed(tiers):  # smallest first, as ours
        for fmt in FORMATS:
            t0 = time.perf_counter()
            blob = _vips_encode(tier, fmt, settings)
            split[fmt] += time.perf_counter() - t0
            out.append((w, fmt, blob))
    if stages is not None:
        for key, value in split.items():
            stages[key] = stages.get(key, 0.0) + value
    return out


def _vips_encode(img, fmt: str, settings: dict) -> bytes:
    if fmt == "avif":
        return img.heifsave_buffer(**settings["avif"])
    if fmt == "webp":
        return img.webpsave_buffer(**settings["webp"])
    raise ValueError(f"unknown variant format {fmt!r}")


def _timed(fn, *args, **kwargs):
    gc.collect()
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def _score(refs: References, ladder: Ladder) -> dict:
    by_format: dict[str, dict] = {fmt: {"ssim": [], "bytes": 0} for fmt in FORMATS}
    for _w, fmt, blob in ladder:
        by_format[fmt]["ssim"].append(score_blob(refs, blob))
        by_format[fmt]["bytes"] += len(blob)
    scores = [s for f in by_format.values() for s in f["ssim"]]
    return {
        "ssim": sum(scores) / len(scores),
        "bytes": sum(len(blob) for _w, _f, blob in ladder),
        "ssim_by_format": {f: sum(v["ssim"]) / len(v["ssim"]) for f, v in by_format.items()},
        "bytes_by_format": {f: v["bytes"] for f, v in by_format.items()},
    }


def encoders_only(pyvips, data: bytes, recipe: VariantRecipe, settings: dict) -> dict:
    """Encode our own rendered tiers with Pillow's and libvips' encoders: seconds and bytes."""
    meta = inspect_image(data, max_pixels=MAX_PIXELS)
    widths = recipe.tier_widths(meta.width)
    tiers = list(render_tiers(decode_for_variants(data, max_pixels=MAX_PIXELS, target_width=max(widths)), widths))
    out = {side: {fmt: {"seconds": 0.0, "bytes": 0} for fmt in FORMATS} for side in ("pipeline", "vips")}
    for _w, tier in tiers:
        vtier = pyvips.Image.new_from_memory(tier.tobytes(), tier.width, tier.height, len(tier.getbands()), "uchar")
        vtier = vtier.copy(interpretation="srgb")
        for fmt in FORMATS:
            blob, wall, _cpu = _timed(encode_variant, tier, fmt, recipe)
            out["pipeline"][fmt]["seconds"] += wall
            out["pipeline"][fmt]["bytes"] += len(blob)
            blob, wall, _cpu = _timed(_vips_encode, vtier, fmt, settings)
            out["vips"][fmt]["seconds"] += wall
            out["vips"][fmt]["bytes"] += len(blob)
    return out


def versions(pyvips) -> dict:
    """Library versions on both sides, including the libaom each AVIF encoder links."""
    from PIL import Image, features

    info = {
        "pillow": Image.__version__,
        "pillow_libavif": features.version("avif"),
        "pillow_libwebp": features.version("webp"),
        "libvips": ".".join(str(pyvips.version(i)) for i in range(3)),
        "pyvips": getattr(pyvips, "__version__", None),
    }
    try:
        from PIL import _avif

        info["pillow_avif_codecs"] = _avif.codec_versions()
    except (ImportError, AttributeError):
        pass
    info["libvips_aom"] = _bundled_aom_version()
    return info


def _bundled_aom_version() -> str | None:
    """libaom version compiled into the loaded libvips (the binary wheel links it statically)."""
    try:
        paths = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if "libvips" in line}
        for path in paths:
            match = re.search(rb"AOMedia Project AV1 Encoder v?([0-9][0-9A-Za-z.\-]*)", Path(path).read_bytes())
            if match:
                return match.group(1).decode()
    except OSError:
        pass
    return None


def _median(values: list[float]) -> float:
    return statistics.median(values)


def bench(
    out: Path, limit: int | None, repeat: int, encoders: bool = True, paths: list[Path] | None = None
) -> dict:
    pyvips, why = load_pyvips()
    if pyvips is None:
        line = f"peer: libvips peer skipped: {why}. Install the dev extras (pyvips, pyvips-binary)."
        print(line)
        result = {"available": False, "reason": why, "targets": TARGETS}
        merge_result("peer", result, out)
        return result

    import pillow_heif

    pillow_heif.register_heif_opener()  # as bench_variants' workers: HEIC sources decode
    recipe = make_recipe()
    threads = recipe.encoder_threads or default_encoder_threads()
    settings = vips_settings(recipe, threads)
    pyvips.cache_set_max(0)  # no operation cache: every repeat decodes and resizes again
    pyvips.concurrency_set(threads)
    paths = paths or photo_paths(limit)
    if not paths:
        raise SystemExit("peer: no corpus photos found (set PICSITE_CORPUS)")

    # Warm both up (codec initialisation, first-call costs) on the smallest photo, untimed.
    smallest = min(paths, key=lambda p: p.stat().st_size).read_bytes()
    run_pipeline(smallest, recipe)
    run_vips(pyvips, smallest, recipe, settings)

    busy_start = cpu_busy_fraction(1.0)
    load_start = os.getloadavg()[0]
    contenders = {"pipeline": lambda d: run_pipeline(d, recipe)}
    per_photo = []
    totals = {"pipeline_seconds": 0.0, "vips_seconds": 0.0, "pipeline_cpu_seconds": 0.0, "vips_cpu_seconds": 0.0}
    totals.update({"pipeline_bytes": 0, "vips_bytes": 0})
    quality: dict[str, list[float]] = {"pipeline": [], "vips": []}
    by_format = {k: {f: {"ssim": [], "bytes": 0} for f in FORMATS} for k in ("pipeline", "vips")}
    stages: dict[str, float] = {}
    encoder_totals = {side: {f: {"seconds": 0.0, "bytes": 0} for f in FORMATS} for side in ("pipeline", "vips")}

    header = (
        f"{'photo':38s} {'tiers':>5s} | {'ours s':>7s} {'cpu':>6s} {'MB':>6s} {'ssim':>6s} | "
        f"{'vips s':>7s} {'cpu':>6s} {'MB':>6s} {'ssim':>6s} | {'time x':>6s} {'bytes x':>7s} {'dSSIM':>8s}"
    )
    print(header)
    print("-" * len(header))
    for path in paths:
        data = path.read_bytes()
        samples: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": []} for k in ("pipeline", "vips")}
        ladders: dict[str, Ladder] = {}
        photo_stages: dict[str, float] = {}
        contenders["vips"] = lambda d, st=photo_stages: run_vips(pyvips, d, recipe, settings, st)
        for rep in range(repeat):
            order = ("pipeline", "vips") if rep % 2 == 0 else ("vips", "pipeline")
            for kind in order:
                ladders[kind], wall, cpu = _timed(contenders[kind], data)
                samples[kind]["wall"].append(wall)
                samples[kind]["cpu"].append(cpu)
        refs = References(path)
        row: dict = {"photo": path.name, "size": list(refs.original.size)}
        for kind in ("pipeline", "vips"):
            scored = _score(refs, ladders[kind])
            wall, cpu = _median(samples[kind]["wall"]), _median(samples[kind]["cpu"])
            row[kind] = {
                "seconds": round(wall, 3),
                "cpu_seconds": round(cpu, 3),
                "bytes": scored["bytes"],
                "ssim": round(scored["ssim"], 5),
                "ssim_by_format": {f: round(v, 5) for f, v in scored["ssim_by_format"].items()},
                "bytes_by_format": scored["bytes_by_format"],
                "tiers": sorted({w for w, _f, _b in ladders[kind]}),
            }
            totals[f"{kind}_seconds"] += wall
            totals[f"{kind}_cpu_seconds"] += cpu
            totals[f"{kind}_bytes"] += scored["bytes"]
            quality[kind].append(scored["ssim"])
            for fmt in FORMATS:
                by_format[kind][fmt]["ssim"].append(scored["ssim_by_format"][fmt])
                by_format[kind][fmt]["bytes"] += scored["bytes_by_format"][fmt]
        if row["pipeline"]["tiers"] != row["vips"]["tiers"]:
            raise RuntimeError(f"{path.name}: tier widths differ {row['pipeline']['tiers']} vs {row['vips']['tiers']}")
        for key, value in photo_stages.items():
            stages[key] = stages.get(key, 0.0) + value / repeat
        if encoders:
            enc = encoders_only(pyvips, data, recipe, settings)
            for side, fmts in enc.items():
                for fmt, v in fmts.items():
                    encoder_totals[side][fmt]["seconds"] += v["seconds"]
                    encoder_totals[side][fmt]["bytes"] += v["bytes"]
        p, v = row["pipeline"], row["vips"]
        row["vips_time_over_pipeline"] = round(v["seconds"] / p["seconds"], 3)
        row["vips_bytes_over_pipeline"] = round(v["bytes"] / p["bytes"], 3)
        row["quality_delta"] = round(v["ssim"] - p["ssim"], 5)
        print(
            f"{path.name[:38]:38s} {len(p['tiers']):5d} | {p['seconds']:7.3f} {p['cpu_seconds']:6.2f} "
            f"{p['bytes'] / 1e6:6.2f} {p['ssim']:.4f} | {v['seconds']:7.3f} {v['cpu_seconds']:6.2f} "
            f"{v['bytes'] / 1e6:6.2f} {v['ssim']:.4f} | {row['vips_time_over_pipeline']:6.2f} "
            f"{row['vips_bytes_over_pipeline']:7.3f} {row['quality_delta']:+8.4f}",
            flush=True,
        )
        per_photo.append(row)

    q = {k: sum(v) / len(v) for k, v in quality.items()}
    result = {
        "available": True,
        "settings": {
            "recipe": {
                "widths": list(recipe.widths),
                "avif_quality": recipe.avif_quality,
                "avif_speed": recipe.avif_speed,
                "webp_quality": recipe.webp_quality,
                "webp_method": recipe.webp_method,
                "encoder_threads": threads,
            },
            "vips": settings,
        },
        "versions": versions(pyvips),
        "machine": {
            "cpus": os.cpu_count(),
            "cpu_busy_before": round(busy_start, 3),
            "loadavg_1m_start_end": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        },
        "repeat": repeat,
        "photos": len(per_photo),
        "targets": TARGETS,
        "vips_time_over_pipeline": round(totals["vips_seconds"] / totals["pipeline_seconds"], 4),
        "vips_cpu_over_pipeline": round(totals["vips_cpu_seconds"] / totals["pipeline_cpu_seconds"], 4),
        "vips_bytes_over_pipeline": round(totals["vips_bytes"] / totals["pipeline_bytes"], 4),
        "quality_delta": round(q["vips"] - q["pipeline"], 5),
        "pipeline_ssim": round(q["pipeline"], 5),
        "vips_ssim": round(q["vips"], 5),
        "by_format": {
            kind: {
                fmt: {"ssim": round(sum(v["ssim"]) / len(v["ssim"]), 5), "bytes": v["bytes"]}
                for fmt, v in fmts.items()
            }
            for kind, fmts in by_format.items()
        },
        "vips_stage_seconds": {k: round(v, 3) for k, v in stages.items()},
        "totals": {k: round(v, 3) if isinstance(v, float) else v for k, v in totals.items()},
        "per_photo": per_photo,
    }
    if encoders:
        result["encoders_only"] = {
            side: {f: {"seconds": round(v["seconds"], 3), "bytes": v["bytes"]} for f, v in fmts.items()}
            for side, fmts in encoder_totals.items()
        }
        result["encoders_only"]["vips_time_over_pipeline"] = {
            f: round(encoder_totals["vips"][f]["seconds"] / encoder_totals["pipeline"][f]["seconds"], 3)
            for f in FORMATS
        }
        result["encoders_only"]["vips_bytes_over_pipeline"] = {
            f: round(encoder_totals["vips"][f]["bytes"] / encoder_totals["pipeline"][f]["bytes"], 4)
            for f in FORMATS
        }
    result["targets_met"] = {field: _meets(result[field], goal) for field, goal in TARGETS.items()}
    merge_result("peer", result, out)
    _summary(result)
    return result


def _meets(value: float, goal: str) -> bool:
    op, threshold = goal.split()
    return value >= float(threshold) if op == ">=" else value <= float(threshold)


def _summary(result: dict) -> None:
    v = result["versions"]
    print(
        f"\nlibvips {v['libvips']} (aom {v.get('libvips_aom')}) vs Pillow {v['pillow']} "
        f"(libavif {v['pillow_libavif']}: {v.get('pillow_avif_codecs')}; libwebp {v['pillow_libwebp']}), "
        f"{result['photos']} photos, median of {result['repeat']}, "
        f"threads {result['settings']['vips']['concurrency']}"
    )
    for field in ("vips_time_over_pipeline", "vips_cpu_over_pipeline", "vips_bytes_over_pipeline", "quality_delta"):
        goal = TARGETS.get(field)
        verdict = "" if goal is None else f"  (goal {goal}: {'PASS' if result['targets_met'][field] else 'MISS'})"
        print(f"peer.{field} = {result[field]}{verdict}")
    bf = result["by_format"]
    for fmt in FORMATS:
        print(
            f"  {fmt}: bytes vips/ours {bf['vips'][fmt]['bytes'] / bf['pipeline'][fmt]['bytes']:.3f}, "
            f"SSIM vips-ours {bf['vips'][fmt]['ssim'] - bf['pipeline'][fmt]['ssim']:+.5f}"
        )
    print(f"  libvips stage seconds: {result['vips_stage_seconds']}")
    enc = result.get("encoders_only")
    if enc:
        print(
            f"  encoders only (our tiers): vips/ours time {enc['vips_time_over_pipeline']}, "
            f"bytes {enc['vips_bytes_over_pipeline']}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--photos", type=int, default=None, help="only the first N photos")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per contender and photo")
    parser.add_argument("--no-encoders", action="store_true", help="skip the encoders-only pass")
    parser.add_argument("photo", nargs="*", type=Path, help="these photos instead of the corpus set")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    bench(args.out, args.photos, args.repeat, encoders=not args.no_encoders, paths=args.photo)


if __name__ == "__main__":
    main()
