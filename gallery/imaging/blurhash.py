"""BlurHash placeholders (https://github.com/woltapp/blurhash), encoded with numpy.

The arithmetic follows Wolt's reference C encoder, which blurhash-python wrapped and which
made every hash stored so far: samples, basis values and sums in float32, summed in pixel
order, with the same rounding of each step. So the same thumbnail gives the same characters
(float64 sums move a DC digit on about 2 in 10,000 thumbnails). Transcendentals are computed
in float64 and rounded to float32, i.e. correctly rounded like the C library's.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz#$%*+,-.:;=?@[]^_{|}~"
_F32 = np.float32


def _f32(values: np.ndarray | float) -> np.ndarray:
    """float64 results rounded to float32, as C stores a float."""
    return np.asarray(values, dtype=np.float64).astype(_F32)


def _srgb_to_linear_table() -> np.ndarray:
    v = np.arange(256, dtype=_F32) / _F32(255)
    x = v.astype(np.float64)
    base = _f32((x + 0.055) / 1.055).astype(np.float64)
    return np.where(x <= 0.04045, _f32(x / 12.92), _f32(base ** float(_F32(2.4))))


_LINEAR = _srgb_to_linear_table()  # sRGB byte -> linear light


def _linear_to_srgb(value: np.float32) -> int:
    v = float(min(max(value, _F32(0)), _F32(1)))
    if v <= 0.0031308:
        return int(v * 12.92 * 255 + 0.5)
    return int((1.055 * float(_f32(v ** float(_F32(1 / 2.4)))) - 0.055) * 255 + 0.5)


def _base83(value: int, length: int) -> str:
    return "".join(_ALPHABET[value // 83**i % 83] for i in range(length - 1, -1, -1))


def _cosines(components: int, size: int) -> np.ndarray:
    """cos(pi * c * i / size) for each component c and pixel i, in float32."""
    angles = np.pi * np.arange(components)[:, None] * np.arange(size)[None, :] / size
    return _f32(np.cos(_f32(angles).astype(np.float64)))


def blurhash_encode(rgb: np.ndarray, x_components: int = 4, y_components: int = 3) -> str:
    """BlurHash of an sRGB ``(height, width, 3)`` uint8 array."""
    if not (1 <= x_components <= 9 and 1 <= y_components <= 9):
        raise ValueError("blurhash components must be within 1..9")
    height, width, _ = rgb.shape
    linear = _LINEAR[rgb.reshape(-1, 3)]  # pixels in row order, as the C loops visit them
    cos_x, cos_y = _cosines(x_components, width), _cosines(y_components, height)
    # One basis row per component, ordered by x first, then y (the order of the hash).
    basis = (cos_y[:, None, :, None] * cos_x[None, :, None, :]).reshape(-1, height * width)
    # cumsum adds in order with a float32 running total, like the C loop (sum() would not).
    sums = np.cumsum(basis[:, :, None] * linear[None, :, :], axis=1, dtype=_F32)[:, -1]
    normalisation = np.full(len(basis), _F32(2))
    normalisation[0] = 1  # the DC component
    factors = sums * (normalisation / _F32(width * height))[:, None]
    dc, ac = factors[0], factors[1:]

    quantised_max, maximum = 0, _F32(1)
    if len(ac):
        scaled_max = float(np.abs(ac).max() * _F32(166))
        quantised_max = int(max(0, min(82, math.floor(_f32(scaled_max - 0.5)))))
        maximum = (_F32(quantised_max) + _F32(1)) / _F32(166)
    r, g, b = (_linear_to_srgb(c) for c in dc)
    parts = [
        _base83((x_components - 1) + (y_components - 1) * 9, 1),
        _base83(quantised_max, 1),
        _base83((r << 16) + (g << 8) + b, 4),
    ]
    scaled = ac / maximum
    root = np.copysign(_f32(np.sqrt(np.abs(scaled).astype(np.float64))), scaled)
    steps = np.floor(_f32((root * _F32(9)).astype(np.float64) + 9.5))
    for qr, qg, qb in np.clip(steps, 0, 18).astype(int).tolist():
        parts.append(_base83(qr * 19 * 19 + qg * 19 + qb, 2))
    return "".join(parts)


def compute_blurhash(img: Image.Image) -> str:
    """4x3-component BlurHash of a <= 64 px thumbnail; transparency is shown over white."""
    thumb = img.copy()
    thumb.thumbnail((64, 64), Image.Resampling.BILINEAR)
    if thumb.mode not in ("RGB", "RGBA"):
        thumb = thumb.convert("RGBA" if thumb.has_transparency_data else "RGB")
    if thumb.mode == "RGBA":
        white = Image.new("RGBA", thumb.size, (255, 255, 255, 255))
        thumb = Image.alpha_composite(white, thumb).convert("RGB")
    return blurhash_encode(np.asarray(thumb), x_components=4, y_components=3)
