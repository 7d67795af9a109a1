"""Variants: the recipe (what makes the bytes), the tier ladder, and encoding each tier.

The pixels of a recipe (``PIPELINE_REVISION`` 2): the smallest tier is resized (LANCZOS) from
a decode of its own at the smallest scale shrink-on-load allows, so a new upload's first tier
can be stored before the big decode starts; every other tier is cascaded from one decode at
the largest tier's scale, each resized (LANCZOS) from the next larger one. ``variant_tiers``
is that definition; threads and strips change the speed, never a pixel.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import io
import json
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image

from gallery.imaging.decode import SOURCE_SIZE_KEY, VariantSource
from gallery.imaging.formats import LEGACY_FORMATS, format_names, output_format, output_formats
from gallery.imaging.profile import StageTimes, timed

# Bump when the pixels this module produces change for the same recipe (resize/colour logic,
# a format's fixed encoder options), so VariantRecipe.version changes and stored variants get
# regenerated. 2: the smallest tier comes from its own shrink-on-load decode (issue 14).
PIPELINE_REVISION = 2
# Bump when the quality search (``quality``) would choose differently for the same recipe.
QUALITY_SEARCH_REVISION = 1
QUALITY_MODES = ("fixed", "auto")

_LANCZOS = Image.Resampling.LANCZOS


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

# Below this many source pixels a resize is not worth cutting into strips.
_STRIP_MIN_PIXELS = 1 << 20


def resize_lanczos(img: Image.Image, size: tuple[int, int], *, pool: ThreadPoolExecutor | None = None) -> Image.Image:
    """``img.resize(size, LANCZOS)``, cut into strips on ``pool``'s threads: the same pixels.

    Pillow resamples horizontally, then vertically, with 8-bit results in between (RGBA
    premultiplied throughout). Each pass is independent per row (horizontal) or per column
    (vertical), with weights that depend only on the two sizes, so a pass cut into strips
    gives every pixel exactly as one call does, and the strips run in parallel (Pillow
    releases the GIL while it resamples).
    """
    if pool is None or img.mode not in ("RGB", "RGBA") or img.width * img.height < _STRIP_MIN_PIXELS:
        return img.resize(size, _LANCZOS)
    work = img.convert("RGBa") if img.mode == "RGBA" else img
    core = work.im
    if size[0] != core.size[0]:
        core = _resample_pass(core, (size[0], core.size[1]), pool)
    if size[1] != core.size[1]:
        core = _resample_pass(core, size, pool)
    out = img._new(core)
    return out.convert("RGBA") if img.mode == "RGBA" else out


def _resample_pass(core, size: tuple[int, int], pool: ThreadPoolExecutor):
    """One pass of ``resize_lanczos``: horizontal when the width changes (cut into bands of
    rows), else vertical (cut into bands of columns)."""
    width, height = core.size
    horizontal = size[0] != width
    extent = height if horizontal else width
    count = min(extent, 4 * max(1, pool._max_workers))  # a few per thread: even finishing times
    bounds = [(extent * i // count, extent * (i + 1) // count) for i in range(count)]

    def strip(lo: int, hi: int):
        if horizontal:
            return core.crop((0, lo, width, hi)).resize((size[0], hi - lo), _LANCZOS, (0, 0, width, hi - lo))
        return core.crop((lo, 0, hi, height)).resize((hi - lo, size[1]), _LANCZOS, (0, 0, hi - lo, height))

    out = Image.core.new(core.mode, size)
    futures = [(lo, hi, pool.submit(strip, lo, hi)) for lo, hi in bounds if hi > lo]
    for lo, hi, future in futures:
        box = (0, lo, size[0], hi) if horizontal else (lo, 0, hi, size[1])
        out.paste(future.result(), box)
    return out


def render_tiers(
    img: Image.Image,
    widths: list[int],
    *,
    pool: ThreadPoolExecutor | None = None,
    stages: StageTimes | None = None,
) -> Iterator[tuple[int, Image.Image]]:
    """Yield (width, image) smallest first; each tier is resized (LANCZOS) from the next larger
    one, which costs < 0.003 SSIM against resizing each from the source (bench --cascade-check)
    and is 2-3x faster.

    Heights follow the source aspect recorded by decode_for_variants (else img.size):
    round(w * H / W), at least 1. A tier as wide as img is img itself. All tiers exist before
    the first is yielded (the cascade needs the big ones first), but each is released once
    yielded, so by the time the largest (most memory-hungry) tier is encoded the smaller ones
    are gone; drop your own reference to img before iterating and it is freed too. ``pool``
    cuts each resize into strips (``resize_lanczos``: same pixels).
    """
    src_w, src_h = img.info.get(SOURCE_SIZE_KEY, img.size)
    ordered = sorted(set(widths), reverse=True)
    if ordered and ordered[0] > img.width:
        raise ValueError(f"tier {ordered[0]} is wider than the decoded image ({img.width})")
    pending: list[tuple[int, Image.Image]] = []  # largest first, so pop() gives the smallest
    current = base = img
    with timed(stages, "resize"):
        for w in ordered:
            h = tier_height(w, (src_w, src_h))
            base = current if _CASCADE else img
            tier = base if base.size == (w, h) else resize_lanczos(base, (w, h), pool=pool)
            pending.append((w, tier))
            current = tier
    del img, current, base  # only the tiers stay alive
    while pending:
        yield pending.pop()


def tier_height(width: int, source_size: tuple[int, int]) -> int:
    """A tier's height: the oriented source's aspect, rounded, at least 1."""
    src_w, src_h = source_size
    return max(1, round(width * src_h / src_w))


def variant_tiers(
    source: VariantSource,
    widths: Sequence[int],
    *,
    threads: int = 1,
    stages: StageTimes | None = None,
) -> Iterator[tuple[int, Image.Image]]:
    """Every tier of ``widths``, smallest first: the recipe's pixels (see the module docstring).

    The smallest tier is made and yielded before the big decode starts (a JPEG's 1/8-scale
    decode costs a few per cent of the full one), so a caller can store it first; the big
    decode happens when the second tier is asked for. ``threads`` > 1 cuts each resize into
    parallel strips (same pixels).
    """
    ordered = sorted(set(widths))
    if not ordered:
        return
    first, rest = ordered[0], ordered[1:]
    pool = ThreadPoolExecutor(threads, thread_name_prefix="resize") if threads > 1 else None
    try:
        with timed(stages, "first_decode"):
            small = source.decode(first, last=not rest)
        with timed(stages, "first_resize"):
            size = (first, tier_height(first, small.info.get(SOURCE_SIZE_KEY, small.size)))
            tier = small if small.size == size else resize_lanczos(small, size, pool=pool)
        del small
        yield first, tier
        del tier
        if not rest:
            return
        with timed(stages, "decode"):
            big = source.decode(rest[-1], last=True)
        tiers = render_tiers(big, rest, pool=pool, stages=stages)
        del big  # the cascade holds the decode only until the tiers exist
        yield from tiers
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


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
    else:
        # save() keeps its options on the Image object (encoderinfo) while it runs, so two
        # formats of one tier encoded at once would read each other's quality: each encode
        # saves through an object of its own, sharing the pixels (no copy).
        img = img._new(img.im)
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


Encode = Callable[[Image.Image, str, VariantRecipe], bytes]


# Above this many pixels a tier's formats encode one after another even with threads to
# spare: side by side, the encoders of an 8.7 MP tier hold ~240 MB at once (AVIF ~190, WebP
# ~48), which put a two-thread worker over its 512 MB bound; one after another the largest
# is what counts. Smaller tiers, most of a ladder's count, still overlap.
SIDE_BY_SIDE_MAX_PIXELS = 4_000_000


def _limit_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives each encoder and resize thread a malloc arena of its own and keeps what the
    threads free in it, so a two-thread worker's peak RSS sat ~100 MB above one thread's
    (measured: 12 MP photo, 2 threads, 495-504 MB; with two arenas and the limit above,
    350 MB). Equivalent to MALLOC_ARENA_MAX=2, which an operator's own setting overrides;
    it must run before the first encoder thread starts (this module's import)."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return
    if mallopt is not None:
        m_arena_max = -8
        mallopt(m_arena_max, arenas)


_limit_malloc_arenas()


class TierEncoder:
    """Encodes tiers in every output format: the formats of a tier side by side on threads of
    their own when the recipe's thread budget is over one (and the tier is at most
    ``SIDE_BY_SIDE_MAX_PIXELS``), else one after another.

    The bytes are the same either way (AVIF's row-mt is off, so its bitstream does not
    depend on threads; WebP encodes on one thread). ``submit`` returns a future per format at
    once, so a caller can store the previous tier while this one encodes. ``encode`` is
    looked up by the caller (tests wrap ``gallery.imaging.encode_variant``).
    """

    def __init__(
        self,
        recipe: VariantRecipe,
        *,
        formats: Sequence[str] | None = None,
        encode: Encode | None = None,
        stages: StageTimes | None = None,
    ):
        self.recipe = recipe
        self.formats = tuple(formats or format_names())
        self._encode = encode or encode_variant
        self._stages = stages
        budget = recipe.encoder_threads or default_encoder_threads()
        parallel = budget > 1 and len(self.formats) > 1
        self._pool = ThreadPoolExecutor(len(self.formats), thread_name_prefix="encode") if parallel else None

    @property
    def parallel(self) -> bool:
        return self._pool is not None

    def _one(self, tier: Image.Image, fmt: str) -> bytes:
        with timed(self._stages, f"encode_{fmt}"):
            return self._encode(tier, fmt, self.recipe)

    def submit(self, tier: Image.Image) -> dict[str, Future[bytes]]:
        """A future per format of ``tier`` (already done when encodes run inline)."""
        futures: dict[str, Future[bytes]] = {}
        side_by_side = self._pool is not None and tier.width * tier.height <= SIDE_BY_SIDE_MAX_PIXELS
        for fmt in self.formats:
            if side_by_side:
                futures[fmt] = self._pool.submit(self._one, tier, fmt)
                continue
            future: Future[bytes] = Future()
            try:
                future.set_result(self._one(tier, fmt))
            except Exception as exc:
                future.set_exception(exc)
            futures[fmt] = future
        return futures

    def encode(self, tier: Image.Image) -> dict[str, bytes]:
        return {fmt: future.result() for fmt, future in self.submit(tier).items()}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> TierEncoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
