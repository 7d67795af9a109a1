"""SSIMULACRA 2.1 perceptual image-quality score in numpy (groundwork for content-adaptive quality).

``ssimulacra2(reference, distorted)`` returns the score of libjxl's ``tools/ssimulacra2`` (Jon
Sneyers, Cloudinary, 2022-2023): 100 for identical pixels, about 90 "visually lossless", 70 "high
quality", 50 "medium", 30 "low", negative for extreme distortion. The reference algorithm:

1. sRGB -> linear RGB (the transparent parts first blended onto a grey background *in sRGB*).
2. Linear RGB -> XYB (libjxl opsin: absorbance matrix, bias 0.0037930732552754493, cube root,
   bias cube root subtracted), then SSIMULACRA's rescaling into about 0..1:
   ``X' = 14 X + 0.42``, ``Y' = Y + 0.01``, ``B' = B - Y + 0.55``.
3. Six scales (1:1 .. 1:32); each next scale is a 2x2 box average of the previous one *in linear
   RGB* (odd edges replicate the last row/column), converted to XYB again. As in the reference a
   scale is only computed while the previous one is at least 8 px on both sides, and the weights
   are consumed in order, so images under 256 px on a side use "shifted" weights exactly like the
   reference does.
4. Per scale and XYB channel, with a Gaussian blur of sigma 1.5 (mu = blur(img), sigma = blur of
   the products minus the mu products): the SSIM error map without the luminance denominator,
   ``max(0, 1 - (1 - (mu1 - mu2)^2) * (2 s12 + C2) / (s11 + s22 + C2))`` with C2 = 0.0009, and
   the edge-difference map ``d = (1 + |img2 - mu2|) / (1 + |img1 - mu1|) - 1`` split into
   "artifact" ``max(d, 0)`` (ringing, blocking, banding) and "detail lost" ``max(-d, 0)``
   (blur, smearing).
5. Each of the 6 x 3 x 3 = 54 maps is pooled by its 1-norm (mean) and 4-norm; the 108 numbers
   are weighted with the published SSIMULACRA 2.1 weights, scaled, passed through the published
   cubic and mapped to ``100 - 10 x^0.6276...``.

Deviations from the reference:

* Blur: the reference uses a recursive "FastGaussian" (Charalampidis 2016, truncated cosines,
  radius round(3.2795 sigma + 0.2546) = 5, zero padding outside the image). In exact arithmetic
  that IIR filter *is* an FIR filter: its impulse response is sum_k beta_k cos(omega_k m) for
  ``|m| < 5`` and exactly zero beyond. We apply that very 9-tap kernel (derived at import from
  the same formulas, not a sampled Gaussian) as a zero-padded separable convolution whose
  float32 operations are the same for every pixel, so identical images score exactly 100.
  What differs is rounding: the recursion's poles sit on the unit circle, so its float32
  errors accumulate along rows and columns (a few 1e-7 of the signal), ours do not.
* That rounding matters where the error maps are nearly zero: a local variance is a difference
  of nearly equal numbers, the SSIM map divides it by C2 = 0.0009, and the clamp max(0, .)
  turns rounding noise into a small positive error. The reference's noisier blur therefore
  scores near-perfect encodes a little lower than we do: versus an emulation of its blur
  arithmetic on 36 corpus encodes at 800 px, ours is within 0.07 below JPEG q90 (most within
  0.03) and 0.03..0.27 higher at JPEG q90 (scores 83-88).
* sRGB decoding uses the exact sRGB formula (the reference uses a rational-polynomial fit of it,
  equal to about 1e-6); the cube root is numpy's (the reference's Newton iteration agrees to
  float precision).
* Inputs are taken as sRGB: an embedded ICC profile is *not* applied (the reference colour-
  manages). Callers compare a tier against its own re-decoded encoding, both already in sRGB.
  Pixels are scored at 8 bits per channel; 16-bit greyscale ("I;16", "I") keeps its precision.
* Alpha is handled like the reference command line tool: when the reference image has alpha,
  both images are blended onto a dark (0.1) and a light (0.9) background and the worse score is
  returned; a distorted image with alpha against an opaque reference is blended onto 0.5.

Accuracy against published C++ scores (tests/test_ssimulacra2.py, docs/ssimulacra2.md):
textured synthetic pairs within 0.04 (test tolerance 0.1); four real JPEG pairs of a photo
(q20..q90) within +0.02..+0.19; pairs that are mostly flat (grey fields, smooth gradients)
only within 0.5..2.0, because there float32 rounding decides the score.

Cost, 800x600 on one core of the 2-core AMD EPYC CI machine: about 60 ms CPU for a one-off
ssimulacra2() (about 120 ms per megapixel), 34 ms per Ssimulacra2Reference.score() once the
reference is prepared (18 ms); peak numpy memory 57 MiB. All linear in the pixel count.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator

import numpy as np
from PIL import Image

__all__ = ["MIN_SIDE", "Ssimulacra2Reference", "ssimulacra2"]

MIN_SIDE = 8  # the reference refuses smaller images
_NUM_SCALES = 6
_C2 = np.float32(0.0009)
_SIGMA = 1.5

# Opsin absorbance (libjxl lib/jxl/cms/opsin_params.h), rows give the mixed L, M, S responses.
_OPSIN = np.array(
    [
        [0.30, 1.0 - 0.078 - 0.30, 0.078],
        [0.23, 1.0 - 0.078 - 0.23, 0.078],
        [0.24342268924547819, 0.20476744424496821, 1.0 - 0.24342268924547819 - 0.20476744424496821],
    ],
    dtype=np.float32,
)
_OPSIN_BIAS = np.float32(0.0037930732552754493)
_OPSIN_BIAS_CBRT = np.cbrt(_OPSIN_BIAS)

# SSIMULACRA 2.1 weights, in the reference's order: channel (X, Y, B) > scale > norm (1, 4) >
# map (ssim, artifact, detail lost).
_WEIGHTS = np.array(
    [
        0.0, 0.0007376606707406586, 0.0, 0.0, 0.0007793481682867309, 0.0,
        0.0, 0.0004371155730107379, 0.0, 1.1041726426657346, 0.00066284834129271,
        0.00015231632783718752, 0.0, 0.0016406437456599754, 0.0, 1.8422455520539298,
        11.441172603757666, 0.0, 0.0007989109436015163, 0.000176816438078653, 0.0,
        1.8787594979546387, 10.94906990605142, 0.0, 0.0007289346991508072,
        0.9677937080626833, 0.0, 0.00014003424285435884, 0.9981766977854967,
        0.00031949755934435053, 0.0004550992113792063, 0.0, 0.0, 0.0013648766163243398,
        0.0, 0.0, 0.0, 0.0, 0.0, 7.466890328078848, 0.0, 17.445833984131262,
        0.0006235601634041466, 0.0, 0.0, 6.683678146179332, 0.00037724407979611296,
        1.027889937768264, 225.20515300849274, 0.0, 0.0, 19.213238186143016,
        0.0011401524586618361, 0.001237755635509985, 176.39317598450694, 0.0, 0.0,
        24.43300999870476, 0.28520802612117757, 0.0004485436923833408, 0.0, 0.0, 0.0,
        34.77906344483772, 44.835625328877896, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
        0.0008680556573291698, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0005313191874358747, 0.0,
        0.00016533814161379112, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0004179171803251336,
        0.0017290828234722833, 0.0, 0.0020827005846636437, 0.0, 0.0, 8.826982764996862,
        23.19243343998926, 0.0, 95.1080498811086, 0.9863978034400682, 0.9834382792465353,
        0.0012286405048278493, 171.2667255897307, 0.9807858872435379, 0.0, 0.0, 0.0,
        0.0005130064588990679, 0.0, 0.00010854057858411537,
    ]
)  # fmt: skip


def _recursive_gaussian_kernel(sigma: float) -> np.ndarray:
    """The impulse response of libjxl's CreateRecursiveGaussian(sigma) IIR filter.

    Same equations (numbers refer to Charalampidis 2016) as tools/gauss_blur.cc; the recursion
    y[n] = n2 (x[n-N-1] + x[n+N-1]) - d1 y[n-1] - y[n-2] summed over k = 1, 3, 5 responds to an
    impulse with sum_k beta_k cos(omega_k m) for |m| < N and zero elsewhere.
    """
    radius = round(3.2795 * sigma + 0.2546)  # (57)
    omega = np.array([1.0, 3.0, 5.0]) * math.pi / (2.0 * radius)
    p = np.array([1.0, -1.0, 1.0]) / np.tan(0.5 * omega)  # (37)
    r = np.array([1.0, -1.0, 1.0]) * p * p / np.sin(omega)  # (44)
    rho = np.exp(-0.5 * sigma * sigma * omega * omega) / radius  # (50)
    d_13 = p[0] * r[1] - r[0] * p[1]
    d_35 = p[1] * r[2] - r[1] * p[2]
    d_51 = p[2] * r[0] - r[2] * p[0]
    zeta_15, zeta_35 = d_35 / d_13, d_51 / d_13  # (52)
    system = np.array([p, r, [zeta_15, zeta_35, 1.0]])  # (56)
    gamma = np.array(
        [1.0, radius * radius - sigma * sigma, zeta_15 * rho[0] + zeta_35 * rho[1] + rho[2]]
    )
    beta = np.linalg.solve(system, gamma)  # (53)
    taps = np.arange(-(radius - 1), radius)
    return (beta[None, :] * np.cos(omega[None, :] * taps[:, None])).sum(axis=1)


_KERNEL = _recursive_gaussian_kernel(_SIGMA)
_RADIUS = len(_KERNEL) // 2
_TAPS = _KERNEL[_RADIUS:].astype(np.float32)  # centre tap, then distance 1 .. radius
# Elements per block of the blur and of the per-pixel error maps: about 256 KB of float32 a
# temporary, so a block's working set stays in the L2 cache.
_BLOCK_ELEMENTS = 65536


def _convolve(shifted: Callable[[int], np.ndarray], out: np.ndarray, pair: np.ndarray) -> None:
    """out = sum over m of kernel[m] * shifted(m), shifted(m) being the input moved by m - radius.

    Every output element gets the very same sequence of float32 operations, whatever its
    position or the array it belongs to, so identical inputs blur to identical outputs and the
    error maps of identical images are exactly zero (a BLAS product does not promise that, and
    this metric turns sub-ulp asymmetries into tenths of a point near 100).
    """
    np.add(shifted(0), shifted(2 * _RADIUS), out=pair)
    np.multiply(pair, _TAPS[_RADIUS], out=out)
    for distance in range(_RADIUS - 1, 0, -1):  # small taps first
        np.add(shifted(_RADIUS - distance), shifted(_RADIUS + distance), out=pair)
        pair *= _TAPS[distance]
        out += pair
    np.multiply(shifted(_RADIUS), _TAPS[0], out=pair)
    out += pair


class _Blur:
    """Blurs (H, P, W) float32 stacks of one shape, zero outside the image; reusable buffers.

    Rows first (the stack seen as H*P rows of W), then columns (H rows of P*W), like the
    reference; each pass in blocks of rows so the temporaries stay in cache. The row pass
    writes straight into the middle of a buffer with radius zero rows above and below, which
    the column pass reads.
    """

    def __init__(self, height: int, count: int, width: int) -> None:
        self.shape = (height, count, width)
        self.padded_columns = np.zeros((height + 2 * _RADIUS, count * width), dtype=np.float32)
        self.row_block = max(1, _BLOCK_ELEMENTS // (width + 2 * _RADIUS))
        self.padded_rows = np.zeros((self.row_block, width + 2 * _RADIUS), dtype=np.float32)
        self.column_block = max(1, _BLOCK_ELEMENTS // (count * width))
        self.pair = np.empty(
            max(self.row_block * width, self.column_block * count * width), np.float32
        )

    def __call__(self, planes: np.ndarray, out: np.ndarray) -> np.ndarray:
        height, count, width = self.shape
        total_rows = height * count
        rows = planes.reshape(total_rows, width)
        rows_out = self.padded_columns[_RADIUS : _RADIUS + height].reshape(total_rows, width)
        for top in range(0, total_rows, self.row_block):
            n = min(self.row_block, total_rows - top)
            source = self.padded_rows[:n]
            source[:, _RADIUS : _RADIUS + width] = rows[top : top + n]
            _convolve(
                lambda m, source=source: source[:, m : m + width],
                rows_out[top : top + n],
                self.pair[: n * width].reshape(n, width),
            )
        padded, columns_out = self.padded_columns, out.reshape(height, count * width)
        for top in range(0, height, self.column_block):
            n = min(self.column_block, height - top)
            _convolve(
                lambda m, top=top, n=n: padded[top + m : top + m + n],
                columns_out[top : top + n],
                self.pair[: n * count * width].reshape(n, count * width),
            )
        return out


def _srgb_to_linear(encoded: np.ndarray) -> np.ndarray:
    return np.where(encoded <= 0.04045, encoded / 12.92, ((encoded + 0.055) / 1.055) ** 2.4)


_SRGB8_TO_LINEAR = _srgb_to_linear(np.arange(256, dtype=np.float64) / 255.0).astype(np.float32)


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )


def _linear_rgb(image: Image.Image, background: float) -> np.ndarray:
    """(H, 3, W) float32 linear RGB; transparent pixels blended onto `background` in sRGB."""
    if image.mode.startswith("I;16") or image.mode == "I":
        grey = np.clip(np.asarray(image, dtype=np.float64) / 65535.0, 0.0, 1.0)
        linear = _srgb_to_linear(grey).astype(np.float32)
        return np.repeat(linear[:, None, :], 3, axis=1)
    if _has_alpha(image):
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / np.float32(255.0)
        alpha = rgba[:, :, 3:]
        blended = alpha * rgba[:, :, :3] + (np.float32(1.0) - alpha) * np.float32(background)
        linear = _srgb_to_linear(blended).astype(np.float32)
    else:
        linear = _SRGB8_TO_LINEAR[
            np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
        ]
    return np.ascontiguousarray(linear.transpose(0, 2, 1))


def _downsample(linear: np.ndarray) -> np.ndarray:
    """2x2 box average of an (H, 3, W) image; an odd last row/column is repeated (as reference)."""
    height, _, width = linear.shape
    if height % 2:
        linear = np.concatenate([linear, linear[-1:]], axis=0)
    if width % 2:
        linear = np.concatenate([linear, linear[:, :, -1:]], axis=2)
    rows = linear[0::2] + linear[1::2]
    return (rows[:, :, 0::2] + rows[:, :, 1::2]) * np.float32(0.25)


def _positive_xyb(linear: np.ndarray) -> np.ndarray:
    """(H, 3, W) linear sRGB -> XYB rescaled by SSIMULACRA 2 to about 0..1 (X', Y', B - Y')."""
    mixed = np.matmul(_OPSIN, linear)  # broadcast over rows: (3, 3) @ (H, 3, W)
    mixed += _OPSIN_BIAS
    np.maximum(mixed, 0.0, out=mixed)
    np.cbrt(mixed, out=mixed)
    mixed -= _OPSIN_BIAS_CBRT
    long_, medium, short = mixed[:, 0], mixed[:, 1], mixed[:, 2]
    xyb = np.empty_like(mixed)
    luma = np.add(long_, medium, out=xyb[:, 1])
    luma *= np.float32(0.5)
    np.subtract(short, luma, out=xyb[:, 2])
    xyb[:, 2] += np.float32(0.55)
    np.subtract(long_, medium, out=xyb[:, 0])
    xyb[:, 0] *= np.float32(0.5 * 14.0)
    xyb[:, 0] += np.float32(0.42)
    luma += np.float32(0.01)
    return xyb


class _ReferenceScale:
    """What one scale of the reference contributes to every comparison, computed once."""

    __slots__ = ("edge", "mean", "variance", "xyb")

    def __init__(self, xyb: np.ndarray) -> None:
        blur = _Blur(*xyb.shape)
        self.xyb = xyb
        self.mean = blur(xyb, np.empty_like(xyb))
        squares = np.square(xyb)
        # sigma11 = blur(x^2) - mu^2, rounded like the reference (mu^2 to float32 first).
        self.variance = blur(squares, np.empty_like(xyb))
        np.square(self.mean, out=squares)
        self.variance -= squares
        # 1 + |x - mu|, the denominator of the edge-difference ratio.
        self.edge = np.subtract(xyb, self.mean, out=squares)
        np.abs(self.edge, out=self.edge)
        self.edge += np.float32(1.0)


def _reference_scales(linear: np.ndarray) -> Iterator[_ReferenceScale]:
    """The reference's scales, made one at a time (a one-off comparison keeps one in memory)."""
    for scale in range(_NUM_SCALES):
        height, _, width = linear.shape
        # As in the reference: the size test is on the previous scale, before downsampling.
        if height < MIN_SIDE or width < MIN_SIDE:
            return
        if scale:
            linear = _downsample(linear)
        yield _ReferenceScale(_positive_xyb(linear))


def _add_norms(error: np.ndarray, sums: np.ndarray, index: int) -> None:
    """sums[index] += sum(error), sums[index + 1] += sum(error^4); overwrites error."""
    sums[index] += float(error.sum())
    np.square(error, out=error)
    flat = error.reshape(-1)
    sums[index + 1] += float(np.dot(flat, flat))


def _channel_sums(
    ref: _ReferenceScale, channel: int, img2: np.ndarray, blurred: np.ndarray, sums: np.ndarray
) -> None:
    """Accumulate the six error sums of one channel (see _compare_scale for the layout)."""
    height, width = img2.shape
    block = max(1, _BLOCK_ELEMENTS // width)
    work = np.empty((4, min(block, height), width), dtype=np.float32)
    one, two, c2 = np.float32(1.0), np.float32(2.0), _C2
    for top in range(0, height, block):
        rows = slice(top, min(top + block, height))
        count = rows.stop - rows.start
        mu1, var1, edge1 = (
            ref.mean[rows, channel],
            ref.variance[rows, channel],
            ref.edge[rows, channel],
        )
        mu2, sigma22, sigma12 = blurred[rows, 0], blurred[rows, 1], blurred[rows, 2]
        num_s, denom_s, ssim, edge2 = (plane[:count] for plane in work)

        # SSIM without the luminance denominator:
        # 1 - (1 - (mu1 - mu2)^2) * (2 (s12 - mu1 mu2) + C2) / (s11 - mu1^2 + s22 - mu2^2 + C2)
        np.multiply(mu1, mu2, out=num_s)
        np.subtract(sigma12, num_s, out=num_s)
        num_s *= two
        num_s += c2
        np.square(mu2, out=denom_s)
        np.subtract(sigma22, denom_s, out=denom_s)
        denom_s += var1
        denom_s += c2
        np.subtract(mu1, mu2, out=ssim)
        np.square(ssim, out=ssim)
        np.subtract(one, ssim, out=ssim)
        ssim *= num_s
        ssim /= denom_s
        np.subtract(one, ssim, out=ssim)
        np.maximum(ssim, 0.0, out=ssim)
        _add_norms(ssim, sums, 0)

        # Edge difference d = (1 + |img2 - mu2|) / (1 + |img1 - mu1|) - 1: d > 0 means ringing
        # or blocking ("artifact"), d < 0 lost detail (blur); max(-d, 0) = max(d, 0) - d.
        np.subtract(img2[rows], mu2, out=edge2)
        np.abs(edge2, out=edge2)
        edge2 += one
        edge2 /= edge1
        edge2 -= one
        artifact, detail_lost = num_s, denom_s
        np.maximum(edge2, 0.0, out=artifact)
        np.subtract(artifact, edge2, out=detail_lost)
        _add_norms(artifact, sums, 2)
        _add_norms(detail_lost, sums, 4)


def _compare_scale(ref: _ReferenceScale, xyb2: np.ndarray) -> np.ndarray:
    """(3, 6) per channel: ssim 1-norm, 4-norm, artifact 1-, 4-norm, detail-lost 1-, 4-norm."""
    height, _, width = xyb2.shape
    stack = np.empty((height, 3, width), dtype=np.float32)
    blurred = np.empty_like(stack)
    blur = _Blur(height, 3, width)
    norms = np.zeros((3, 6))
    for channel in range(3):
        img1, img2 = ref.xyb[:, channel], xyb2[:, channel]
        stack[:, 0] = img2
        np.square(img2, out=stack[:, 1])
        np.multiply(img1, img2, out=stack[:, 2])
        blur(stack, blurred)  # mu2, sigma22 + mu2^2, sigma12 + mu1 mu2
        sums = np.zeros(6)
        _channel_sums(ref, channel, img2, blurred, sums)
        sums /= height * width
        sums[1::2] **= 0.25
        norms[channel] = sums
    return norms


def _score(pyramid: Iterable[_ReferenceScale], linear: np.ndarray) -> float:
    per_scale = []
    for scale, ref in enumerate(pyramid):
        if scale:
            linear = _downsample(linear)
        per_scale.append(_compare_scale(ref, _positive_xyb(linear)))

    # The reference walks channel > scale > norm > map and consumes the weights in that order
    # even when fewer than six scales were computed (images under 256 px on a side).
    ordered = [
        per_scale[scale][channel, [norm, 2 + norm, 4 + norm]]
        for channel in range(3)
        for scale in range(len(per_scale))
        for norm in range(2)
    ]
    values = np.abs(np.concatenate(ordered))
    weighted = float(np.dot(_WEIGHTS[: len(values)], values))

    weighted *= 0.9562382616834844
    weighted = (
        2.326765642916932 * weighted
        - 0.020884521182843837 * weighted**2
        + 6.248496625763138e-05 * weighted**3
    )
    if weighted <= 0:
        return 100.0
    return 100.0 - 10.0 * weighted**0.6276336467831387


def _backgrounds(reference: Image.Image) -> tuple[float, ...]:
    # Like the reference tool: transparency is judged over a dark and a light background
    # (the worse score counts); an opaque reference means one grey background.
    return (0.1, 0.9) if _has_alpha(reference) else (0.5,)


def _check_sizes(reference_size: tuple[int, int], distorted_size: tuple[int, int]) -> None:
    if reference_size != distorted_size:
        raise ValueError(f"image sizes differ: {reference_size} vs {distorted_size}")
    if min(reference_size) < MIN_SIDE:
        raise ValueError(
            f"images must be at least {MIN_SIDE}x{MIN_SIDE} pixels, got {reference_size}"
        )


class Ssimulacra2Reference:
    """A reference image prepared once, for scoring several distorted versions of it.

    Keeps four float32 copies of the image at every scale (XYB, its blur, local variance,
    edge strength): 29 MiB for 800x600, twice that when the reference has alpha. Each score()
    then costs about 55% of a one-off ssimulacra2() call.
    """

    def __init__(self, reference: Image.Image) -> None:
        _check_sizes(reference.size, reference.size)
        self.size = reference.size
        self._pyramids = {
            background: list(_reference_scales(_linear_rgb(reference, background)))
            for background in _backgrounds(reference)
        }

    def score(self, distorted: Image.Image) -> float:
        """SSIMULACRA 2.1 score of `distorted` against this reference (100 = same pixels)."""
        _check_sizes(self.size, distorted.size)
        return min(
            _score(pyramid, _linear_rgb(distorted, background))
            for background, pyramid in self._pyramids.items()
        )


def ssimulacra2(reference: Image.Image, distorted: Image.Image) -> float:
    """SSIMULACRA 2.1 score of `distorted` against `reference` (100 = identical pixels).

    Both images must have the same size, at least 8x8; ValueError otherwise. To score several
    candidates against one reference, build a Ssimulacra2Reference once and call its score().
    """
    _check_sizes(reference.size, distorted.size)
    return min(
        _score(
            _reference_scales(_linear_rgb(reference, background)),
            _linear_rgb(distorted, background),
        )
        for background in _backgrounds(reference)
    )
