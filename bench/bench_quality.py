"""Content-adaptive quality against fixed quality on the real photo corpus (key "quality").

    python bench/bench_quality.py [--photos N] [--threads 1] [--target 70] [--max-drop 2]
                                  [--search-width 640] [--sweep] [--out bench/results.json]

Per corpus photo, in this one process and the same run: the fixed recipe's ladder (every tier
in every format at the recipe's qualities) and the auto recipe's (the quality search on one
tier, then every tier at the chosen qualities), each timed from the original's bytes to the
last encode. Every decoded tier is scored with SSIMULACRA2 against the same references as
bench_variants.py: an exact LANCZOS downscale of the full-resolution, upright, sRGB original.
A photo's score is the mean over its tiers and formats.

Figures: ``bytes_over_fixed`` (sum of auto bytes / fixed), ``time_over_fixed`` (sum of auto
pipeline seconds / fixed), ``mean_score_delta`` (mean photo score, auto - fixed),
``worst_photo_delta`` (the lowest per-photo auto - fixed), and the per-photo table.
``--sweep`` also scores auto at several targets and max-drops (bytes and scores only: the
ladders are cached per quality, so a sweep row costs no new encode for a quality seen before).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

import _common  # noqa: F401  (puts the repository on sys.path)
import pillow_heif  # noqa: E402
from _common import corpus_photos, log, merge_result
from bench_variants import _flatten, reference_original  # noqa: E402
from PIL import Image  # noqa: E402

from gallery.imaging import (  # noqa: E402
    VariantRecipe,
    decode_for_variants,
    encode_variant,
    inspect_image,
    quality,
    quality_choose,
    recipe_with_params,
    render_tiers,
)
from gallery.ssimulacra2 import MIN_SIDE, Ssimulacra2Reference  # noqa: E402

pillow_heif.register_heif_opener()

MAX_PIXELS = 100_000_000
TARGETS = {
    "bytes_over_fixed": "<= 0.85",
    "time_over_fixed": "<= 1.3",
    "mean_score_delta": ">= 0",
    "worst_photo_delta": ">= -2",
}
SWEEP = [(target, drop) for target in (66.0, 68.0, 70.0, 72.0) for drop in (2.0, 100.0)]


# --- the two pipelines (timed) -------------------------------------------------------------


def ladder(data: bytes, recipe: VariantRecipe) -> tuple[dict, dict]:
    """({(width, fmt): payload}, chosen params) of one photo under ``recipe``."""
    meta = inspect_image(data, max_pixels=MAX_PIXELS)
    widths = recipe.tier_widths(meta.width)
    choice = quality_choose(data, recipe=recipe, widths=widths, max_pixels=MAX_PIXELS)
    params = choice.params if choice else {}
    encode_with = recipe_with_params(recipe, params)
    img = decode_for_variants(data, max_pixels=MAX_PIXELS, target_width=max(widths))
    tiers = render_tiers(img, widths)
    del img
    out = {(w, fmt.name): encode_variant(tier, fmt.name, encode_with) for w, tier in tiers for fmt in quality.quality_formats()}
    return out, params


def timed_ladder(data: bytes, recipe: VariantRecipe) -> tuple[dict, dict, float]:
    start = time.perf_counter()
    out, params = ladder(data, recipe)
    return out, params, time.perf_counter() - start


# --- scoring ---------------------------------------------------------------------------------


class Scorer:
    """SSIMULACRA2 of a photo's decoded tiers against exact downscales of its original, with
    the prepared references and every (format, quality) ladder's result cached."""

    def __init__(self, path: Path, data: bytes, recipe: VariantRecipe):
        self.data, self.recipe = data, recipe
        self.original = reference_original(path)
        self.widths = recipe.tier_widths(inspect_image(data, max_pixels=MAX_PIXELS).width)
        self._refs: dict[tuple[int, int], Ssimulacra2Reference] = {}
        self._tiers: list[tuple[int, Image.Image]] | None = None
        self._ladders: dict[tuple[str, int], tuple[int, list[float]]] = {}

    def reference(self, size: tuple[int, int]) -> Ssimulacra2Reference:
        if size not in self._refs:
            im = self.original if self.original.size == size else self.original.resize(size, Image.Resampling.LANCZOS)
            self._refs[size] = Ssimulacra2Reference(im)
        return self._refs[size]

    def score_payload(self, payload: bytes) -> float | None:
        with Image.open(io.BytesIO(payload)) as im:
            im.load()
            decoded = _flatten(im)
        if min(decoded.size) < MIN_SIDE:
            return None
        return self.reference(decoded.size).score(decoded)

    def ladder_result(self, fmt: str, q: int, payloads: dict | None = None) -> tuple[int, list[float]]:
        """(bytes, per-tier scores) of the ladder of ``fmt`` at quality ``q``."""
        key = (fmt, q)
        if key not in self._ladders:
            if payloads is None:
                if self._tiers is None:
                    img = decode_for_variants(self.data, max_pixels=MAX_PIXELS, target_width=max(self.widths))
                    self._tiers = list(render_tiers(img, self.widths))
                field = quality.quality_formats()[[f.name for f in quality.quality_formats()].index(fmt)].quality_field
                recipe = replace(self.recipe, **{field: q})
                payloads = {(w, fmt): encode_variant(t, fmt, recipe) for w, t in self._tiers}
            blobs = [b for (w, f), b in sorted(payloads.items()) if f == fmt]
            scores = [s for s in (self.score_payload(b) for b in blobs) if s is not None]
            self._ladders[key] = (sum(len(b) for b in blobs), scores)
        return self._ladders[key]


def photo_result(scorer: Scorer, qualities: dict[str, int], payloads: dict | None = None) -> dict:
    per_fmt = {fmt: scorer.ladder_result(fmt, q, payloads) for fmt, q in qualities.items()}
    scores = [s for _b, ss in per_fmt.values() for s in ss]
    return {
        "qualities": qualities,
        "bytes": sum(b for b, _ss in per_fmt.values()),
        "score": round(statistics.fmean(scores), 3),
        "score_by_format": {fmt: round(statistics.fmean(ss), 3) for fmt, (_b, ss) in per_fmt.items()},
        "bytes_by_format": {fmt: b for fmt, (b, _ss) in per_fmt.items()},
    }


def fixed_qualities(recipe: VariantRecipe) -> dict[str, int]:
    return {fmt.name: getattr(recipe, fmt.quality_field) for fmt in quality.quality_formats()}


def summary(rows: list[dict], fixed_key: str, auto_key: str) -> dict:
    fixed_bytes = sum(r[fixed_key]["bytes"] for r in rows)
    auto_bytes = sum(r[auto_key]["bytes"] for r in rows)
    deltas = [r[auto_key]["score"] - r[fixed_key]["score"] for r in rows]
    out = {
        "bytes_over_fixed": round(auto_bytes / fixed_bytes, 4),
        "fixed_mean_score": round(statistics.fmean(r[fixed_key]["score"] for r in rows), 3),
        "auto_mean_score": round(statistics.fmean(r[auto_key]["score"] for r in rows), 3),
        "mean_score_delta": round(statistics.fmean(deltas), 3),
        "worst_photo_delta": round(min(deltas), 3),
        "by_format": {},
    }
    for fmt in rows[0][fixed_key]["score_by_format"]:
        fb = sum(r[fixed_key]["bytes_by_format"][fmt] for r in rows)
        ab = sum(r[auto_key]["bytes_by_format"][fmt] for r in rows)
        fd = [r[auto_key]["score_by_format"][fmt] - r[fixed_key]["score_by_format"][fmt] for r in rows]
        out["by_format"][fmt] = {
            "bytes_over_fixed": round(ab / fb, 4),
            "fixed_mean_score": round(statistics.fmean(r[fixed_key]["score_by_format"][fmt] for r in rows), 3),
            "mean_score_delta": round(statistics.fmean(fd), 3),
            "worst_photo_delta": round(min(fd), 3),
        }
    return out


# --- the best any per-image quality could do (--bound) ------------------------------------------


def tier_curves(data: bytes, recipe: VariantRecipe, step: int) -> dict[str, dict[int, tuple[float, int]]]:
    """{format: {quality: (SSIMULACRA2, bytes)}} of the search tier over each format's bounds."""
    widths = recipe.tier_widths(inspect_image(data, max_pixels=MAX_PIXELS).width)
    width = quality.search_width(widths)
    ((_, tier),) = list(render_tiers(decode_for_variants(data, max_pixels=MAX_PIXELS, target_width=width), [width]))
    tier = tier.convert("RGB")
    reference = Ssimulacra2Reference(tier)
    curves: dict[str, dict[int, tuple[float, int]]] = {}
    for fmt in quality.quality_formats():
        floor, ceiling = (getattr(recipe, b) for b in fmt.quality_bounds)
        fixed_q = getattr(recipe, fmt.quality_field)
        grid = sorted({*range(floor, ceiling + 1, step), fixed_q, ceiling})
        curves[fmt.name] = {}
        for q in grid:
            payload = encode_variant(tier, fmt.name, replace(recipe, **{fmt.quality_field: q}))
            with Image.open(io.BytesIO(payload)) as im:
                im.load()
                curves[fmt.name][q] = (reference.score(im.convert("RGB")), len(payload))
    return curves


def best_allocation(curves: list[dict[int, tuple[float, int]]], fixed_q: int, max_drop: float) -> dict:
    """The least total bytes any choice of one quality per photo reaches with a mean score no
    worse than fixed and no photo more than ``max_drop`` below its fixed score (Lagrangian
    relaxation: each photo minimises bytes - lambda * score; the smallest lambda that keeps the
    mean wins)."""
    fixed = [c[fixed_q] for c in curves]
    allowed = [[(s, b) for s, b in c.values() if s >= f[0] - max_drop] for c, f in zip(curves, fixed, strict=True)]
    fixed_mean, fixed_bytes = statistics.fmean(f[0] for f in fixed), sum(f[1] for f in fixed)
    lo, hi = 0.0, 1e7
    for _ in range(60):  # bisect lambda
        lam = (lo + hi) / 2
        pick = [min(opts, key=lambda o: o[1] - lam * o[0]) for opts in allowed]
        if statistics.fmean(p[0] for p in pick) >= fixed_mean:
            hi = lam
        else:
            lo = lam
    pick = [min(opts, key=lambda o: o[1] - hi * o[0]) for opts in allowed]
    return {
        "bytes_over_fixed": round(sum(p[1] for p in pick) / fixed_bytes, 4),
        "mean_score_delta": round(statistics.fmean(p[0] for p in pick) - fixed_mean, 3),
    }


def bound(args: argparse.Namespace) -> dict:
    """Search-tier figures: the best per-image allocation against what auto chose."""
    quality.SEARCH_WIDTH = args.search_width
    fixed = VariantRecipe(encoder_threads=args.threads)
    auto = replace(fixed, quality_mode="auto", quality_target=args.target, quality_max_drop=args.max_drop)
    paths = corpus_photos()[: args.photos] if args.photos else corpus_photos()
    per_fmt: dict[str, list] = {fmt.name: [] for fmt in quality.quality_formats()}
    chosen: dict[str, list[int]] = {fmt.name: [] for fmt in quality.quality_formats()}
    for path in paths:
        data = path.read_bytes()
        curves = tier_curves(data, replace(auto, **{b: q for b, q in _wide_bounds()}), args.step)
        widths = auto.tier_widths(inspect_image(data, max_pixels=MAX_PIXELS).width)
        choice = quality_choose(data, recipe=auto, widths=widths, max_pixels=MAX_PIXELS)
        for fmt, curve in curves.items():
            per_fmt[fmt].append(curve)
            chosen[fmt].append(choice.qualities[fmt])
        log(f"{path.name:38s} curves done, auto chose {choice.qualities}")
    out = {}
    for fmt in quality.quality_formats():
        fixed_q = getattr(fixed, fmt.quality_field)
        curves = per_fmt[fmt.name]
        fixed_bytes = sum(c[fixed_q][1] for c in curves)
        fixed_mean = statistics.fmean(c[fixed_q][0] for c in curves)

        def at(curve: dict, q: int) -> tuple[float, int]:
            return curve[q] if q in curve else _encode_score_missing(curve, q)

        auto_pts = [at(c, q) for c, q in zip(curves, chosen[fmt.name], strict=True)]
        out[fmt.name] = {
            "fixed_quality": fixed_q,
            "fixed_mean_score": round(fixed_mean, 3),
            "auto": {
                "bytes_over_fixed": round(sum(p[1] for p in auto_pts) / fixed_bytes, 4),
                "mean_score_delta": round(statistics.fmean(p[0] for p in auto_pts) - fixed_mean, 3),
            },
            "best_within_2": best_allocation(curves, fixed_q, 2.0),
            "best_unbounded": best_allocation(curves, fixed_q, 1000.0),
        }
    return out


def _wide_bounds() -> list[tuple[str, int]]:
    """Every quality a curve may need: 20..95 for every format."""
    return [(b, q) for fmt in quality.quality_formats() for b, q in zip(fmt.quality_bounds, (20, 95), strict=True)]


def _encode_score_missing(curve: dict, q: int) -> tuple[float, int]:
    """Linear interpolation between the grid's neighbours (a chosen quality off the grid)."""
    below = max(k for k in curve if k <= q)
    above = min(k for k in curve if k >= q)
    if below == above:
        return curve[q]
    t = (q - below) / (above - below)
    (s0, b0), (s1, b1) = curve[below], curve[above]
    return s0 + t * (s1 - s0), round(b0 + t * (b1 - b0))


# --- main --------------------------------------------------------------------------------------


def bench(args: argparse.Namespace) -> dict:
    quality.SEARCH_WIDTH = args.search_width
    fixed = VariantRecipe(encoder_threads=args.threads)
    auto = replace(fixed, quality_mode="auto", quality_target=args.target, quality_max_drop=args.max_drop)
    load_start = os.getloadavg()
    paths = corpus_photos()[: args.photos] if args.photos else corpus_photos()
    rows = []
    sweep_rows: dict[str, list[dict]] = {}
    fixed_s = auto_s = search_s = 0.0
    for path in paths:
        data = path.read_bytes()
        timed = {"fixed": [], "auto": []}
        for _ in range(args.repeat):  # alternate, so drifting load hits both alike
            for kind, recipe in (("fixed", fixed), ("auto", auto)):
                payloads, params, seconds = timed_ladder(data, recipe)
                timed[kind].append(seconds)
                if kind == "auto":
                    auto_payloads, auto_params = payloads, params
                else:
                    fixed_payloads = payloads
        meta = inspect_image(data, max_pixels=MAX_PIXELS)
        widths = auto.tier_widths(meta.width)
        started = time.perf_counter()
        quality_choose(data, recipe=auto, widths=widths, max_pixels=MAX_PIXELS)
        search_s += time.perf_counter() - started
        scorer = Scorer(path, data, fixed)
        row = {
            "photo": path.name,
            "search_width": quality.search_width(widths),
            "fixed": photo_result(scorer, fixed_qualities(fixed), fixed_payloads),
            "auto": photo_result(scorer, auto_params["quality"], auto_payloads),
        }
        row["fixed"]["seconds"] = round(min(timed["fixed"]), 3)
        row["auto"]["seconds"] = round(min(timed["auto"]), 3)
        row["score_delta"] = round(row["auto"]["score"] - row["fixed"]["score"], 3)
        fixed_s += row["fixed"]["seconds"]
        auto_s += row["auto"]["seconds"]
        if args.sweep:
            for target, drop in SWEEP:
                choice = quality_choose(
                    data, recipe=replace(auto, quality_target=target, quality_max_drop=drop), widths=widths, max_pixels=MAX_PIXELS
                )
                sweep_rows.setdefault(f"target {target:g} max_drop {drop:g}", []).append(
                    {"fixed": row["fixed"], "auto": photo_result(scorer, choice.qualities)}
                )
        rows.append(row)
        log(
            f"{path.name:38s} fixed {row['fixed']['seconds']:5.2f}s {row['fixed']['bytes']:>9,} B "
            f"{row['fixed']['score']:6.2f} {row['fixed']['qualities']} | auto {row['auto']['seconds']:5.2f}s "
            f"{row['auto']['bytes']:>9,} B {row['auto']['score']:6.2f} {row['auto']['qualities']} | "
            f"delta {row['score_delta']:+.2f}"
        )
    result = {
        "recipe": {
            "fixed": fixed_qualities(fixed),
            "target": args.target,
            "max_drop": args.max_drop,
            "bounds": {f.name: [getattr(auto, b) for b in f.quality_bounds] for f in quality.quality_formats()},
            "search_width": args.search_width,
            "max_probes": quality.MAX_PROBES,
            "encoder_threads": args.threads,
            "repeat": args.repeat,
        },
        "machine": {"cpus": os.cpu_count(), "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
        "targets": TARGETS,
        "photos": len(rows),
        **summary(rows, "fixed", "auto"),
        "time_over_fixed": round(auto_s / fixed_s, 4),
        "fixed_seconds": round(fixed_s, 3),
        "auto_seconds": round(auto_s, 3),
        "search_seconds": round(search_s, 3),
        "per_photo": rows,
    }
    if sweep_rows:
        result["sweep"] = {name: summary(srows, "fixed", "auto") for name, srows in sweep_rows.items()}
    ops = {"<=": lambda a, b: a <= b, ">=": lambda a, b: a >= b}
    result["targets_met"] = {k: ops[g.split()[0]](result[k], float(g.split()[1])) for k, g in TARGETS.items()}
    return result


def print_tables(result: dict) -> None:
    print("| photo | search px | fixed q | auto q | fixed bytes | auto bytes | auto/fixed | fixed score | auto score | delta | fixed s | auto s |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in result["per_photo"]:
        fq = "/".join(str(v) for v in r["fixed"]["qualities"].values())
        aq = "/".join(str(v) for v in r["auto"]["qualities"].values())
        print(
            f"| {r['photo']} | {r['search_width']} | {fq} | {aq} | {r['fixed']['bytes']:,} | {r['auto']['bytes']:,} | "
            f"{r['auto']['bytes'] / r['fixed']['bytes']:.3f} | {r['fixed']['score']:.2f} | {r['auto']['score']:.2f} | "
            f"{r['score_delta']:+.2f} | {r['fixed']['seconds']:.2f} | {r['auto']['seconds']:.2f} |"
        )
    keys = ("bytes_over_fixed", "time_over_fixed", "fixed_mean_score", "auto_mean_score", "mean_score_delta", "worst_photo_delta")
    print("\n" + "  ".join(f"{k} {result[k]}" for k in keys))
    for fmt, v in result["by_format"].items():
        print(f"  {fmt}: {v}")
    if "sweep" in result:
        print("\n| auto setting | bytes/fixed | mean score delta | worst photo delta | AVIF bytes/fixed | WebP bytes/fixed |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, v in result["sweep"].items():
            bf = v["by_format"]
            print(
                f"| {name} | {v['bytes_over_fixed']:.3f} | {v['mean_score_delta']:+.2f} | {v['worst_photo_delta']:+.2f} | "
                f"{bf['avif']['bytes_over_fixed']:.3f} | {bf['webp']['bytes_over_fixed']:.3f} |"
            )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=None, help="only the first N photos")
    parser.add_argument("--threads", type=int, default=1, help="encoder threads (1: one worker per core)")
    parser.add_argument("--target", type=float, default=VariantRecipe.quality_target)
    parser.add_argument("--max-drop", type=float, default=VariantRecipe.quality_max_drop)
    parser.add_argument("--search-width", type=int, default=quality.SEARCH_WIDTH)
    parser.add_argument("--repeat", type=int, default=1, help="timed runs per photo and mode (the fastest counts)")
    parser.add_argument("--sweep", action="store_true", help="also score auto at several targets")
    parser.add_argument("--bound", action="store_true", help="search-tier curves: the best per-image allocation")
    parser.add_argument("--step", type=int, default=1, help="with --bound: quality grid step")
    parser.add_argument("--out", type=Path, default=_common.RESULTS)
    parser.add_argument("--no-save", action="store_true", help="print only; leave results.json alone")
    args = parser.parse_args(argv)
    if args.bound:
        print(json.dumps(bound(args), indent=2))
        return
    result = bench(args)
    if not args.no_save:
        merge_result("quality", result, args.out)
    print_tables(result)


if __name__ == "__main__":
    main()
