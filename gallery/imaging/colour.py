"""Pixel modes and colour: any Pillow mode to L/LA/RGB/RGBA/CMYK (tile by tile when a reduce
follows), then embedded ICC profiles, Lab and untagged CMYK to sRGB."""

from __future__ import annotations

import io
from collections.abc import Callable
from functools import lru_cache

from PIL import Image, ImageChops, ImageCms

_SRGB = ImageCms.createProfile("sRGB")
_PROFILE_SPACES = {"RGB": "RGB ", "L": "GRAY", "CMYK": "CMYK"}


@lru_cache(maxsize=32)
def _srgb_transform(icc: bytes, mode: str) -> ImageCms.ImageCmsTransform | None:
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if profile.profile.xcolor_space != _PROFILE_SPACES[mode]:
            return None  # profile does not describe these pixels: ignore it
        # NOCACHE: cached transforms are shared between threads, and lcms's one-pixel cache
        # is not thread-safe.
        return ImageCms.buildTransform(
            profile,
            _SRGB,
            mode,
            "RGB",
            renderingIntent=ImageCms.Intent.PERCEPTUAL,
            flags=ImageCms.Flags.NOCACHE,
        )
    except Exception:
        return None  # unreadable profile: treat pixels as sRGB rather than reject the photo


@lru_cache(maxsize=1)
def _lab_transform() -> ImageCms.ImageCmsTransform:
    lab = ImageCms.createProfile("LAB")
    return ImageCms.buildTransform(lab, _SRGB, "LAB", "RGB", flags=ImageCms.Flags.NOCACHE)


def _grey_range(img: Image.Image) -> tuple[float, float]:
    """The sample range of an I;16 / I / F image that maps to 0..255 (of the whole frame, so
    that every tile of it is scaled alike)."""
    if img.mode.startswith("I;16"):
        return 0.0, 65535.0
    lo, hi = img.getextrema()
    if lo >= 0 and hi <= 255:
        return 0.0, 255.0
    if lo >= 0 and hi <= 65535:
        return 0.0, 65535.0
    return float(lo), float(max(hi, lo + 1))


def _to_8bit_grey(img: Image.Image, value_range: tuple[float, float] | None = None) -> Image.Image:
    """I;16 / I / F -> L by scaling the real range; Pillow's convert("L") clips at 255."""
    low, high = value_range or _grey_range(img)
    if img.mode.startswith("I;16"):
        img = img.convert("I")
    scale = 255.0 / (high - low)
    src = img.convert("F") if img.mode != "F" else img
    # +0.5 because F -> L truncates
    return src.point(lambda v: v * scale - low * scale + 0.5).convert("L")


_NORMAL_MODES = ("L", "LA", "RGB", "RGBA", "CMYK")


def _is_normal(img: Image.Image) -> bool:
    """Already in a mode normalise_mode() returns unchanged (and that reduce() may average)."""
    return img.mode in _NORMAL_MODES and not (
        img.mode in ("L", "RGB") and "transparency" in img.info
    )


def normalise_mode(img: Image.Image, grey_range: tuple[float, float] | None = None) -> Image.Image:
    """Bring any Pillow mode to one of L, LA, RGB, RGBA, CMYK.

    grey_range: for I;16 / I / F, the range to scale from (default: this image's own)."""
    mode = img.mode
    if _is_normal(img):
        return img
    if mode == "1":
        return img.convert("L")
    if mode.startswith("I") or mode == "F":
        return _to_8bit_grey(img, grey_range)
    if mode in ("P", "PA"):
        return img.convert("RGBA" if img.has_transparency_data else "RGB")
    if mode == "L":  # with a transparent grey value
        return img.convert("LA")
    if mode == "RGB":  # with a transparent colour
        return img.convert("RGBA")
    if mode in ("La", "RGBa"):
        return img.convert(mode[:-1] + "A")
    if mode == "LAB":  # Pillow cannot convert() Lab; LittleCMS can
        return ImageCms.applyTransform(img, _lab_transform()) or img
    return img.convert("RGBA" if img.has_transparency_data else "RGB")


# Tile side for normalise_reduced: converting a 512x512 tile (I;16 -> I -> F -> L, four
# copies at up to 4 B/px) takes a few MB, whatever the size of the frame.
_TILE_SIDE = 512


def normalise_reduced(
    img: Image.Image, factor: int, check: Callable[[], None] | None = None
) -> Image.Image:
    """``normalise_mode(img).reduce(factor)`` without a full-size converted copy.

    Palette indices, 1-bit and 16-bit samples cannot be box-averaged, so they must be
    converted before reducing; converting the whole frame cost a 194 KB 16-bit PNG of
    10000x10000 px +1.4 GB. Tiles are converted and reduced one at a time instead; they are
    aligned to the reduction boxes, so the pixels equal the whole-frame route's.
    """
    if _is_normal(img):
        return img.reduce(factor) if factor > 1 else img
    grey_range = _grey_range(img) if img.mode.startswith("I") or img.mode == "F" else None
    side = max(1, _TILE_SIDE // factor) * factor
    width, height = img.size
    out: Image.Image | None = None
    for top in range(0, height, side):
        for left in range(0, width, side):
            tile = img.crop((left, top, min(left + side, width), min(top + side, height)))
            part = normalise_mode(tile, grey_range)
            if factor > 1:
                part = part.reduce(factor)
            if out is None:
                out = Image.new(part.mode, (-(-width // factor), -(-height // factor)))
            out.paste(part, (left // factor, top // factor))
        if check is not None:
            check()
    assert out is not None  # an image has at least one pixel
    return out


def _cmyk_to_rgb(img: Image.Image) -> Image.Image:
    # Untagged CMYK: no press profile can be assumed, so use the (1-C)(1-K) rule browsers use.
    c, m, y, k = (ImageChops.invert(b) for b in img.split())
    return Image.merge(
        "RGB", [ImageChops.multiply(c, k), ImageChops.multiply(m, k), ImageChops.multiply(y, k)]
    )


def to_srgb(img: Image.Image, icc: bytes | None, *, in_place: bool = True) -> Image.Image:
    """Convert to sRGB RGB/RGBA. RGB->RGB profile transforms run in place (one fewer
    full-size copy), so the caller must own ``img``, or pass ``in_place=False``."""
    img = normalise_mode(img)
    alpha = None
    if img.mode in ("LA", "RGBA"):
        alpha = img.getchannel("A")
        if alpha.getextrema()[0] == 255:
            alpha = None  # fully opaque alpha channel: drop it (smaller, faster encodes)
        img = img.convert(img.mode[:-1])
    transform = _srgb_transform(icc, img.mode) if icc else None
    if transform is not None and img.mode == "RGB":
        if img.readonly or not in_place:  # e.g. memory-mapped: never write into the source
            img = img.copy()
        transform.apply_in_place(img)
        rgb = img
    elif transform is not None:
        rgb = transform.apply(img)
    elif img.mode == "CMYK":
        rgb = _cmyk_to_rgb(img)
    else:
        rgb = img.convert("RGB") if img.mode != "RGB" else img
    if alpha is not None:
        rgb.putalpha(alpha)
    return rgb
