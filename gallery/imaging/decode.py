"""Decoding an original for variants: the first frame, upright, in sRGB, shrunk on load where
the largest tier allows, with no metadata left on it."""

from __future__ import annotations

import math
from collections.abc import Callable

from PIL import Image

from gallery.imaging.colour import normalise_reduced, to_srgb
from gallery.imaging.errors import ImageRejected, decoder_errors
from gallery.imaging.metadata import orientation_from, safe_exif
from gallery.imaging.sniffing import open_image

# Key under which decode_for_variants records the oriented source size, so tier heights follow
# the original aspect even when shrink-on-load rounded the decoded size.
SOURCE_SIZE_KEY = "picsite_source_size"

_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _jpeg_draft(im: Image.Image, oriented_target: int, orientation: int) -> None:
    """Shrink-on-load: let libjpeg decode at 1/2, 1/4 or 1/8 scale, never below the target.

    Pillow only scales when asked for a size that fits both axes, so ask with the source
    aspect; the target is in oriented (display) pixels, so swap for 90-degree rotations.
    """
    stored_w, stored_h = im.size
    oriented_w = stored_h if orientation >= 5 else stored_w
    if oriented_target >= oriented_w:
        return
    scale = oriented_target / oriented_w
    request = (max(1, math.ceil(stored_w * scale)), max(1, math.ceil(stored_h * scale)))
    im.draft(im.mode, request)


def decode_for_variants(
    data: bytes,
    *,
    max_pixels: int,
    target_width: int | None = None,
    cancel: Callable[[], None] | None = None,
) -> Image.Image:
    """Decode the first frame upright, in sRGB, as RGB or RGBA, with no metadata.

    target_width is the largest tier that will be rendered; the decode may shrink on load but
    never below it. The oriented source size is kept in ``img.info[SOURCE_SIZE_KEY]`` so
    render_tiers() computes tier heights from the true aspect ratio.
    """

    def check() -> None:
        if cancel is not None:
            cancel()

    if not data:
        raise ImageRejected("empty_file", "The file is empty.")
    im, kind = open_image(data, max_pixels)
    try:
        check()
        icc = im.info.get("icc_profile") or None
        stored_w, stored_h = im.size
        with decoder_errors("decode", kind):
            if im.format in ("JPEG", "MPO"):
                # JPEG EXIF sits before the scan, so orientation is known before decoding.
                orientation = orientation_from(safe_exif(im))
                if target_width:
                    _jpeg_draft(im, target_width, orientation)
            im.load()
            if im.format not in ("JPEG", "MPO"):
                # PNG may carry eXIf after IDAT: read it only once the pixels are in.
                orientation = orientation_from(safe_exif(im))
            check()
            oriented_w = im.height if orientation >= 5 else im.width
            factor = 1
            if target_width and oriented_w >= 4 * target_width:
                # Cheap box reduction, keeping >= 2x the target so LANCZOS still has detail.
                factor = oriented_w // (2 * target_width)
            # Normalise the mode and reduce tile by tile: no full-size converted copy.
            img = normalise_reduced(im, factor, check)
            check()
            if img is not im:
                im.close()  # free the full-size decode before the next copy
            # Colour first (in place for RGB), then rotate: at most two full-size buffers.
            img = to_srgb(img, icc)
            check()
            if orientation in _TRANSPOSE:
                upright = img.transpose(_TRANSPOSE[orientation])
                img.close()
                img = upright
                check()
        if img is im:
            # Plain Image sharing the decoded pixels (no copy), detached from the file object.
            img = im._new(im.im)
    finally:
        im.close()
    source = (stored_h, stored_w) if orientation >= 5 else (stored_w, stored_h)
    # Fresh info dict: no EXIF/XMP/ICC can leak into encoders.
    img.info = {SOURCE_SIZE_KEY: source}
    return img
