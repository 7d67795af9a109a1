"""Decoding an original for variants: the first frame, upright, in sRGB, shrunk on load where
the target width allows, with no metadata left on it.

``VariantSource`` opens an original once for a whole generation: the structural checks run
when it opens (the same sniffing, chunk/box walks and pixel/frame limits as at ingest, but
not ingest's validation decode, which that upload already passed), and it then decodes at
whatever scale a target width needs. A JPEG shrinks on load (libjpeg's DCT scaling), so each
scale is its own decode and a small one is cheap; any other format is decoded once and every
scale is derived from that one frame.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from PIL import Image

from gallery.imaging.colour import normalise_reduced, to_srgb
from gallery.imaging.errors import ImageRejected, decoder_errors
from gallery.imaging.metadata import orientation_from, safe_exif
from gallery.imaging.sniffing import check_frames, open_image

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

_SHRINK_ON_LOAD = ("JPEG", "MPO")


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


def _reduce_factor(oriented_w: int, target_width: int | None) -> int:
    """Cheap box reduction before the real resize, keeping >= 2x the target so LANCZOS still
    has detail to work with."""
    if target_width and oriented_w >= 4 * target_width:
        return oriented_w // (2 * target_width)
    return 1


class VariantSource:
    """An original opened for variant generation; see the module docstring.

    ``decode(target_width)`` gives upright sRGB pixels shrunk on load for that target.
    Decoding the same scale twice reuses the first result (callers must not modify what
    ``decode`` returns); ``last=True`` says no decode follows, so the source may hand over
    its own buffers and forget them. Raises ImageRejected (and the caller's cancel error).
    """

    def __init__(self, data: bytes, *, max_pixels: int, cancel: Callable[[], None] | None = None):
        if not data:
            raise ImageRejected("empty_file", "The file is empty.")
        self._data, self._max_pixels, self._cancel = data, max_pixels, cancel
        im, self.kind = open_image(data, max_pixels)
        try:
            check_frames(im, self.kind, max_pixels)
            self.format: str = im.format or ""
            self.stored_size: tuple[int, int] = im.size
            self._icc = im.info.get("icc_profile") or None
            self._orientation: int | None = None
            if self.format in _SHRINK_ON_LOAD:
                # JPEG EXIF sits before the scan: the orientation is known before decoding.
                self._orientation = orientation_from(safe_exif(im))
        except BaseException:
            im.close()
            raise
        # The one frame of a format that cannot shrink on load, decoded on first use.
        self._frame: Image.Image | None = None if self.shrinks_on_load else im
        if self.shrinks_on_load:
            im.close()
        self._last: tuple[tuple, Image.Image] | None = None  # (scale key, decoded image)

    @property
    def shrinks_on_load(self) -> bool:
        return self.format in _SHRINK_ON_LOAD

    @property
    def pixels(self) -> int:
        return self.stored_size[0] * self.stored_size[1]

    @property
    def orientation(self) -> int:
        """EXIF orientation (1..8). Other formats than JPEG may carry EXIF after the pixel
        data (PNG eXIf after IDAT), so asking decodes their frame (the one decode they get)."""
        if self._orientation is None:
            self._load_frame()
        assert self._orientation is not None
        return self._orientation

    @property
    def oriented_size(self) -> tuple[int, int]:
        w, h = self.stored_size
        return (h, w) if self.orientation >= 5 else (w, h)

    def _check(self) -> None:
        if self._cancel is not None:
            self._cancel()

    def _load_frame(self) -> Image.Image:
        frame = self._frame
        if frame is None:
            raise RuntimeError("this source has handed over its decoded frame already")
        if self._orientation is None:
            with decoder_errors("decode", self.kind):
                frame.load()
                # PNG may carry eXIf after IDAT: read it only once the pixels are in.
                self._orientation = orientation_from(safe_exif(frame))
            self._check()
        return frame

    def decode(self, target_width: int | None = None, *, last: bool = False) -> Image.Image:
        """Upright sRGB RGB/RGBA pixels, shrunk on load but never below ``target_width`` (the
        widest tier rendered from them), the oriented source size in
        ``img.info[SOURCE_SIZE_KEY]`` and no other metadata."""
        self._check()
        if self.shrinks_on_load:
            im, _ = open_image(self._data, self._max_pixels)
            owned = True  # a fresh decoder of its own
        else:
            im, owned = self._load_frame(), last
        try:
            with decoder_errors("decode", self.kind):
                if self.shrinks_on_load and target_width:
                    _jpeg_draft(im, target_width, self.orientation)
                oriented_w = im.height if self.orientation >= 5 else im.width
                key = (im.size, _reduce_factor(oriented_w, target_width))
                if self._last is not None and self._last[0] == key:
                    img = self._last[1]  # this very scale was decoded already
                else:
                    if self.shrinks_on_load:
                        im.load()
                        self._check()
                    img = self._finish(im, key[1], owned=owned)
        finally:
            if owned:
                im.close()
        if last:
            self._last = None
            self._frame = None
            self._data = b""  # nothing more to decode: let the original's bytes go
        else:
            self._last = (key, img)
        return img

    def _finish(self, im: Image.Image, factor: int, *, owned: bool) -> Image.Image:
        """Mode, reduction, colour and orientation, with at most two full-size buffers alive."""
        # Normalise the mode and reduce tile by tile: no full-size converted copy.
        img = normalise_reduced(im, factor, self._check)
        self._check()
        shared = img is im and not owned
        if img is not im and owned:
            im.close()  # free the full-size decode before the next copy
        # Colour first (in place for RGB unless the frame is still needed), then rotate.
        img = to_srgb(img, self._icc, in_place=not shared)
        self._check()
        if self.orientation in _TRANSPOSE:
            upright = img.transpose(_TRANSPOSE[self.orientation])
            if img is not im or owned:
                img.close()
            img = upright
            self._check()
        if img is im:
            # Plain Image sharing the decoded pixels (no copy), detached from the file object.
            img = im._new(im.im)
        # Fresh info dict: no EXIF/XMP/ICC can leak into encoders.
        img.info = {SOURCE_SIZE_KEY: self.oriented_size}
        return img

    def close(self) -> None:
        if self._frame is not None:
            self._frame.close()
        self._frame = None
        self._last = None

    def __enter__(self) -> VariantSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
    with VariantSource(data, max_pixels=max_pixels, cancel=cancel) as source:
        return source.decode(target_width, last=True)
