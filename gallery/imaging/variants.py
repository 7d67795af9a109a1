"""Variants: the recipe (what makes the bytes), the tier ladder, and encoding each tier."""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image

from gallery.imaging.decode import SOURCE_SIZE_KEY
from gallery.imaging.formats import LEGACY_FORMATS, format_names, output_format, output_formats

# Bump when the pixels this module produces change for the same recipe (resize/colour logic,
# a format's fixed encoder options), so VariantRecipe.version changes and stored variants get
# regenerated.
PIPELINE_REVISION = 1
# Bump when the quality search (``quality``) would choose differently for the same recipe.
QUALITY_SEARCH_REVISION = 1
QUALITY_MODES = ("fixed", "auto")


@dataclass(frozen=True)
class VariantRecipe:
    """How variants are made. Defaults chosen with bench/bench_variants.py --sweep on the 18
    corpus photos (2 cores): AVIF speed 9 encodes ~10x faster than speed 6 for +10% bytes and
    -0.003 SSIM (speed 10 gives identical output with aom); WebP method 2 is ~2.5x faster than
    method 3/4 for +5% bytes and -0.0025 SSIM. Encoding dominates the pipeline's time."""

    widths: tuple[int, ...] = (320, 480, 640, 800, 1080, 1280, 1920, 2560)
    avif_quality: int = 55
    avif_speed: int = 9
    webp_quality: int = 75
    webp_method: int = 2
    encoder_threads: int = 0  # 0 = auto
    # Content-adaptive quality (``quality``): "fixed" encodes with the qualities above; "auto"
    # searches per image and format for the lowest quality within [floor, ceiling] whose
    # encode scores at least quality_target in SSIMULACRA2 (and at most quality_max_drop
    # below the fixed quality's own score). Only "auto" puts these fields in the version.
    quality_mode: str = "fixed"
    quality_target: float = 68.0
    quality_max_drop: float = 2.0
    avif_quality_floor: int = 35
    avif_quality_ceiling: int = 80
    webp_quality_floor: int = 50
    webp_quality_ceiling: int = 92

    def __post_init__(self) -> None:
        if not self.widths or any(not isinstance(w, int) or w < 1 for w in self.widths):
            raise ValueError("widths must be a non-empty tuple of positive ints")
        if not 0 <= self.avif_quality <= 100 or not 0 <= self.webp_quality <= 100:
            raise ValueError("quality must be within 0..100")
        if not 0 <= self.avif_speed <= 10:
            raise ValueError("avif_speed must be within 0..10")
        if not 0 <= self.webp_method <= 6:
            raise ValueError("webp_method must be within 0..6")
        if self.encoder_threads < 0:
            raise ValueError("encoder_threads must be >= 0")
        if self.quality_mode not in QUALITY_MODES:
            raise ValueError(f"quality_mode must be one of {QUALITY_MODES}, not {self.quality_mode!r}")
        for fmt in output_formats():
            if fmt.quality_bounds:
                floor, ceiling = (getattr(self, field) for field in fmt.quality_bounds)
                if not 0 <= floor <= ceiling <= 100:
                    raise ValueError(f"{fmt.label} quality bounds must satisfy 0 <= floor <= ceiling <= 100")
        if self.quality_max_drop < 0:
            raise ValueError("quality_max_drop must be >= 0")

    @property
    def version(self) -> str:
        # encoder_threads is excluded: it changes speed, not the bytes we store.
        payload = {"rev": PIPELINE_REVISION, "widths": sorted(set(self.widths))}
        for fmt in output_formats():
            payload.update({field: getattr(self, field) for field in fmt.recipe_fields})
        if sorted(format_names()) != sorted(LEGACY_FORMATS):
            payload["formats"] = sorted(format_names())
        if self.quality_mode == "auto":  # absent in fixed mode: existing versions stay as they were
            payload["quality"] = {
                "mode": "auto",
                "rev": QUALITY_SEARCH_REVISION,
                "target": self.quality_target,
                "max_drop": self.quality_max_drop,
                "bounds": {f.name: [getattr(self, b) for b in f.quality_bounds] for f in output_formats() if f.quality_bounds},
            }
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def tier_widths(self, source_width: int) -> list[int]:
        if source_width < 1:
            raise ValueError("source_width must be positive")
        fit = sorted({w for w in self.widths if w <= source_width})
        # Never upscale; a tiny source gets exactly one tier at its own width.
        return fit or [source_width]


# bench/bench_variants.py --cascade-check on the 18 corpus photos: cascading costs 0.0011 SSIM
# on average (worst 0.0023) against resizing every tier from the decoded source, well under
# the 0.005 budget, and renders the ladder 2-3x faster. False = every tier from the source.
_CASCADE = True


def render_tiers(img: Image.Image, widths: list[int]) -> Iterator[tuple[int, Image.Image]]:
    """Yield (width, image) smallest first; each tier is resized (LANCZOS) from the next larger
    one, which costs < 0.003 SSIM against resizing each from the source (bench --cascade-check)
    and is 2-3x faster.

    Heights follow the source aspect recorded by decode_for_variants (else img.size):
    round(w * H / W), at least 1. A tier as wide as img is img itself. All tiers exist before
    the first is yielded (the cascade needs the big ones first), but each is released once
    yielded, so by the time the largest (most memory-hungry) tier is encoded the smaller ones
    are gone; drop your own reference to img before iterating and it is freed too.
    """
    src_w, src_h = img.info.get(SOURCE_SIZE_KEY, img.size)
    ordered = sorted(set(widths), reverse=True)
    if ordered and ordered[0] > img.width:
        raise ValueError(f"tier {ordered[0]} is wider than the decoded image ({img.width})")
    pending: list[tuple[int, Image.Image]] = []  # largest first, so pop() gives the smallest
    current = img
    for w in ordered:
        h = max(1, round(w * src_h / src_w))
        base = current if _CASCADE else img
        tier = base if base.size == (w, h) else base.resize((w, h), Image.Resampling.LANCZOS)
        pending.append((w, tier))
        current = tier
    del img, current, base  # only the tiers stay alive
    while pending:
        yield pending.pop()


def default_encoder_threads(workers: int | None = None) -> int:
    """Threads per AVIF encode so that N workers on N cores do not oversubscribe."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, cpus // max(1, workers or 1))


def encode_variant(img: Image.Image, fmt: str, recipe: VariantRecipe) -> bytes:
    """Encode one tier in output format ``fmt`` (see ``formats``), with no EXIF/XMP/ICC
    (pixels are already sRGB)."""
    spec = output_format(fmt)
    if img.mode not in ("RGB", "RGBA"):
        img = img.convert("RGBA" if img.has_transparency_data else "RGB")
    threads = recipe.encoder_threads or default_encoder_threads()
    buf = io.BytesIO()
    img.save(
        buf,
        spec.pillow_format,
        **spec.save_options(recipe, threads),
        icc_profile=b"",
        exif=b"",
        xmp=b"",
    )
    return buf.getvalue()


@lru_cache(maxsize=1)
def encoder_problems() -> tuple[str, ...]:
    """One sentence per variant format this Pillow cannot encode; empty when all work.

    Tries a tiny encode in each format with the real settings, once per process
    (``encoder_problems.cache_clear()`` to ask again). A Pillow built without libavif has no
    AVIF writer at all, which would otherwise fail every image at its encode stage.
    """
    probe = Image.new("RGB", (16, 16), (200, 40, 40))
    recipe = VariantRecipe(encoder_threads=1)
    problems = []
    for fmt in output_formats():
        try:
            if not encode_variant(probe, fmt.name, recipe):
                raise ValueError("the encoder wrote nothing")
        except Exception as exc:
            problems.append(
                f"This Pillow ({Image.__version__}) cannot encode {fmt.label} "
                f"({type(exc).__name__}: {exc}), so no {fmt.label} variant can be made."
            )
    return tuple(problems)
