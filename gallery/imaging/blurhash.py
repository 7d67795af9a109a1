"""The BlurHash placeholder of an image."""

from __future__ import annotations

import warnings

import blurhash
from PIL import Image


def compute_blurhash(img: Image.Image) -> str:
    """4x3-component BlurHash of a <= 64 px thumbnail; transparency is shown over white."""
    thumb = img.copy()
    thumb.thumbnail((64, 64), Image.Resampling.BILINEAR)
    if thumb.mode not in ("RGB", "RGBA"):
        thumb = thumb.convert("RGBA" if thumb.has_transparency_data else "RGB")
    if thumb.mode == "RGBA":
        white = Image.new("RGBA", thumb.size, (255, 255, 255, 255))
        thumb = Image.alpha_composite(white, thumb).convert("RGB")
    with warnings.catch_warnings():
        # blurhash-python uses Image.getdata(), deprecated in Pillow 13
        warnings.simplefilter("ignore", DeprecationWarning)
        return blurhash.encode(thumb, x_components=4, y_components=3)
