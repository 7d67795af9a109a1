"""Content-adaptive quality: per image and format, the lowest encoder quality whose output
meets an SSIMULACRA2 target (``gallery.ssimulacra2``), searched on one mid-size tier and then
applied to every tier of that format.

The recipe asks for it (``VariantRecipe.quality_mode == "auto"``); the choice is a pure
function of the image bytes and the recipe (no clock, no thread count: the AVIF bytes do not
depend on threads, see ``formats``), so a retry chooses the same qualities and lands in the
same variant set. The chosen qualities are the set's ``params`` and thereby part of its key
version, not of the recipe version: a different choice never makes an image stale.

The search, per format with a quality knob (``OutputFormat.quality_field``):

1. encode the search tier at the recipe's fixed quality (clamped to the bounds) and score it;
2. the goal is ``max(quality_target, that score - quality_max_drop)``: hard images are raised
   to the target, easy ones lowered towards it but never more than ``quality_max_drop``
   points below what the fixed quality gives them;
3. interpolate (secant on the probes so far, else a per-format slope) to the quality predicted
   to just meet the goal, probe it, and narrow the bracket, at most ``MAX_PROBES`` encodes;
4. the answer is the lowest probed quality that met the goal; when none did, the quality the
   probes predict for it (capped by the ceiling). Always within [floor, ceiling].

Pure: no Django, no database, no storage.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from PIL import Image

from gallery.imaging.decode import decode_for_variants
from gallery.imaging.formats import OutputFormat, output_formats
from gallery.imaging.variants import VariantRecipe, encode_variant, render_tiers
from gallery.ssimulacra2 import MIN_SIDE, Ssimulacra2Reference

# The search tier: the image's tier nearest this width. A probe is an encode, a decode and a
# score (~75 ms per megapixel). Measured on the corpus (CPU time, 1 encoder thread) the search
# adds 26% to the fixed ladder at 480 px, 42% at 640 and 62% at 800, and 480 chooses about as
# 640 does (bytes 1.05x vs 1.05x, mean score +1.2 vs +1.3 at target 70): docs/encoder-settings.md.
SEARCH_WIDTH = 480
MAX_PROBES = 3  # encodes per format, the first at the fixed quality
# SSIMULACRA2 points per quality step near the defaults (corpus, 800 px tiers), used until
# two probes give a measured slope.
_SLOPE_GUESS = {"avif": 0.9, "webp": 0.5}
_MIN_SLOPE = 0.1  # a flatter measured slope is noise: fall back to the guess

PARAMS_KEY = "quality"  # VariantSet.params[PARAMS_KEY] = {format name: chosen quality}

CancelCheck = Callable[[], None]


@dataclass(frozen=True)
class QualityChoice:
    """What the search chose for one image: quality per format, and how it got there."""

    width: int  # the search tier's width
    qualities: dict[str, int]
    # Per format: {quality: SSIMULACRA2 score} of every probe, and the goal it searched for.
    probes: dict[str, dict[int, float]] = field(default_factory=dict)
    goals: dict[str, float] = field(default_factory=dict)

    @property
    def params(self) -> dict:
        """The variant set's per-image parameters (part of its key version)."""
        return {PARAMS_KEY: dict(sorted(self.qualities.items()))}


def quality_formats() -> list[OutputFormat]:
    return [fmt for fmt in output_formats() if fmt.quality_field and fmt.quality_bounds]


def search_width(widths: list[int]) -> int:
    """The tier the search runs on: the one nearest SEARCH_WIDTH (the smaller on a tie)."""
    return min(widths, key=lambda w: (abs(w - SEARCH_WIDTH), w))


def recipe_with_params(recipe: VariantRecipe, params: dict | None) -> VariantRecipe:
    """The recipe to encode a set with: its chosen qualities in place of the fixed ones."""
    chosen = (params or {}).get(PARAMS_KEY) or {}
    fields = {fmt.quality_field: chosen[fmt.name] for fmt in quality_formats() if fmt.name in chosen}
    return replace(recipe, **fields) if fields else recipe


def quality_choose(
    data: bytes, *, recipe: VariantRecipe, widths: list[int], max_pixels: int, cancel: CancelCheck | None = None
) -> QualityChoice | None:
    """The qualities of one image under ``recipe``; None in fixed mode. Decodes the original
    shrunk on load to the search tier only. Raises ImageRejected like decode_for_variants."""
    if recipe.quality_mode != "auto":
        return None
    width = search_width(widths)
    source = decode_for_variants(data, max_pixels=max_pixels, target_width=width, cancel=cancel)
    ((_, tier),) = list(render_tiers(source, [width]))
    del source
    return quality_search(tier, recipe, cancel=cancel)


def quality_search(tier: Image.Image, recipe: VariantRecipe, *, cancel: CancelCheck | None = None) -> QualityChoice:
    """Search every format's quality on ``tier`` (see the module docstring)."""
    cancel = cancel or (lambda: None)
    formats = quality_formats()
    if min(tier.size) < MIN_SIDE:  # too small to score: the fixed qualities, within bounds
        return QualityChoice(tier.width, {fmt.name: _clamp(recipe, fmt, getattr(recipe, fmt.quality_field)) for fmt in formats})
    if tier.mode not in ("RGB", "RGBA"):
        tier = tier.convert("RGBA" if tier.has_transparency_data else "RGB")
    reference = Ssimulacra2Reference(tier)
    qualities, probes, goals = {}, {}, {}
    for fmt in formats:

        def score_at(quality: int, fmt: OutputFormat = fmt) -> float:
            cancel()
            payload = encode_variant(tier, fmt.name, replace(recipe, **{fmt.quality_field: quality}))
            with Image.open(io.BytesIO(payload)) as decoded:
                decoded.load()
                return reference.score(decoded.convert(tier.mode))

        floor, ceiling = (getattr(recipe, name) for name in fmt.quality_bounds)
        qualities[fmt.name], probes[fmt.name], goals[fmt.name] = _search_one(
            score_at,
            start=getattr(recipe, fmt.quality_field),
            floor=floor,
            ceiling=ceiling,
            target=recipe.quality_target,
            max_drop=recipe.quality_max_drop,
            slope_guess=_SLOPE_GUESS.get(fmt.name, 0.7),
        )
    return QualityChoice(tier.width, qualities, probes, goals)


def _clamp(recipe: VariantRecipe, fmt: OutputFormat, quality: int) -> int:
    floor, ceiling = (getattr(recipe, name) for name in fmt.quality_bounds)
    return min(max(quality, floor), ceiling)


def _search_one(
    score_at: Callable[[int], float],
    *,
    start: int,
    floor: int,
    ceiling: int,
    target: float,
    max_drop: float,
    slope_guess: float,
) -> tuple[int, dict[int, float], float]:
    """(chosen quality, {quality: score} probed, goal) for one format."""
    scores: dict[int, float] = {}
    first = min(max(start, floor), ceiling)
    scores[first] = score_at(first)
    goal = max(target, scores[first] - max_drop)
    while True:
        passed = sorted(q for q, s in scores.items() if s >= goal)
        lowest_pass = passed[0] if passed else None
        below = [q for q, s in scores.items() if s < goal and (lowest_pass is None or q < lowest_pass)]
        highest_fail = max(below) if below else None
        if lowest_pass is not None and (lowest_pass == floor or (highest_fail is not None and lowest_pass - highest_fail == 1)):
            return lowest_pass, scores, goal  # bracketed to one step, or at the floor
        if lowest_pass is None and highest_fail == ceiling:
            return ceiling, scores, goal  # the target is out of reach: the ceiling is the bound
        guess = _next_quality(scores, goal, lowest_pass, highest_fail, floor, ceiling, slope_guess)
        if len(scores) >= MAX_PROBES or guess in scores:
            return (lowest_pass if lowest_pass is not None else guess), scores, goal
        scores[guess] = score_at(guess)


def _next_quality(
    scores: dict[int, float],
    goal: float,
    lowest_pass: int | None,
    highest_fail: int | None,
    floor: int,
    ceiling: int,
    slope_guess: float,
) -> int:
    """The integer quality predicted to just meet ``goal``, strictly inside what is known."""
    if lowest_pass is not None and highest_fail is not None:  # bracketed: secant between the two
        slope = (scores[lowest_pass] - scores[highest_fail]) / (lowest_pass - highest_fail)
        guess = highest_fail + (goal - scores[highest_fail]) / max(slope, 1e-9)
        return min(max(math.ceil(guess), highest_fail + 1), lowest_pass - 1)
    anchor = lowest_pass if lowest_pass is not None else highest_fail
    slope = _measured_slope(scores, anchor) or slope_guess
    guess = math.ceil(anchor + (goal - scores[anchor]) / slope - 1e-9)
    if lowest_pass is not None:  # everything probed passes: go lower
        return min(max(guess, floor), lowest_pass - 1)
    return max(min(guess, ceiling), highest_fail + 1)  # everything probed fails: go higher


def _measured_slope(scores: dict[int, float], anchor: int) -> float | None:
    """Score per quality step between ``anchor`` and its nearest other probe, if sensible."""
    others = [q for q in scores if q != anchor]
    if not others:
        return None
    near = min(others, key=lambda q: (abs(q - anchor), q))
    slope = (scores[anchor] - scores[near]) / (anchor - near)
    return slope if slope >= _MIN_SLOPE else None
