"""gallery.ssimulacra2 against published scores of the reference C++ tool, and its invariants.

Published scores: the fast-ssim2 Rust port (github.com/imazen/ssimulacra2, BSD-2-Clause) keeps
scores captured from the C++ `ssimulacra2` binary for synthetic image pairs, together with the
SHA-256 of each image's raw RGB bytes (src/reference_data.rs, 2026-01-04). The pairs are
simple recipes (uniform grey, gradients, an LCG noise, box blur, sharpen, a YUV round trip),
so they are regenerated here and the hashes prove the pixels are the very ones the C++ tool
scored; no image file is committed.

Tolerances, from docs/ssimulacra2.md: textured pairs agree within 0.04 (asserted 0.1). Pairs
dominated by flat areas are decided by float32 rounding: in a flat region the local variances
are differences of nearly equal numbers, and the error maps clamp that rounding noise to
positive values. The reference accumulates more of it in its recursive blur than our exact
9-tap filter does, so its scores there are lower by a margin no implementation reproduces
short of copying its arithmetic bit for bit (four arithmetic variants of ours spread by up to
3 points on these pairs; the Rust port allows 0.5 and 10 points). Those are held to 1.0 and
2.5 points: a check on the algorithm's structure (scales, weights, mapping), not on digits.
"""

from __future__ import annotations

import hashlib
import io
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from gallery.ssimulacra2 import MIN_SIDE, Ssimulacra2Reference, ssimulacra2

PHOTO = "photos/jolla_leaf_3264x2448.jpg"


@pytest.fixture(scope="module")
def photo(corpus: Path) -> Image.Image:
    image = ImageOps.exif_transpose(Image.open(corpus / PHOTO)).convert("RGB")
    image.thumbnail((800, 800), Image.Resampling.LANCZOS)
    return image


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    decoded = Image.open(io.BytesIO(buffer.getvalue()))
    decoded.load()
    return decoded


# -- the published synthetic pairs, regenerated ------------------------------------------------


def _grey(values: np.ndarray) -> np.ndarray:
    return np.repeat(values[:, :, None], 3, axis=2).astype(np.uint8)


def _uniform(size: int, value: int) -> np.ndarray:
    return np.full((size, size, 3), value, dtype=np.uint8)


def _gradient_h(size: int) -> np.ndarray:
    return _grey(np.tile(np.arange(size) * 255 // (size - 1), (size, 1)))


def _gradient_diagonal(size: int) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size]
    return _grey((x + y) * 255 // (2 * size - 2))


def _edge(size: int) -> np.ndarray:
    _, x = np.mgrid[0:size, 0:size]
    return _grey(np.where(x < size // 2, 0, 255))


def _noise(size: int, seed: int) -> np.ndarray:
    """64-bit LCG (Knuth's MMIX constants), bits 33..40 of each state: R, G, B per pixel."""
    state, out = seed, bytearray()
    for _ in range(size * size * 3):
        state = (state * 6364136223846793005 + 1442695040888963407) % 2**64
        out.append((state >> 33) & 0xFF)
    return np.frombuffer(bytes(out), dtype=np.uint8).reshape(size, size, 3)


def _box_blur_8x8(image: np.ndarray) -> np.ndarray:
    """Mean of the 8x8 window x-4..x+3, y-4..y+3 (edges clamped), truncated to an integer."""
    size = image.shape[0]
    padded = np.pad(image.astype(np.uint32), ((4, 3), (4, 3), (0, 0)), mode="edge")
    total = sum(padded[dy : dy + size, dx : dx + size] for dy in range(8) for dx in range(8))
    return (total // 64).astype(np.uint8)


def _sharpen(image: np.ndarray) -> np.ndarray:
    """5 x centre minus the 4 neighbours (edges clamped), clamped to 0..255."""
    size = image.shape[0]
    centre = image.astype(np.int32)
    padded = np.pad(centre, ((1, 1), (1, 1), (0, 0)), mode="edge")
    neighbours = (
        padded[:size, 1 : size + 1]
        + padded[2:, 1 : size + 1]
        + padded[1 : size + 1, :size]
        + padded[1 : size + 1, 2:]
    )
    return np.clip(5 * centre - neighbours, 0, 255).astype(np.uint8)


def _yuv_round_trip(image: np.ndarray) -> np.ndarray:
    """RGB -> YUV (BT.601 analogue) -> RGB in float32, truncated to integers."""
    f = np.float32
    r, g, b = (image[:, :, i].astype(np.float32) for i in range(3))
    y = f(0.299) * r + f(0.587) * g + f(0.114) * b
    u = f(-0.14713) * r - f(0.28886) * g + f(0.436) * b + f(128)
    v = f(0.615) * r - f(0.51499) * g - f(0.10001) * b + f(128)
    channels = (
        y + f(1.13983) * (v - f(128)),
        y - f(0.39465) * (u - f(128)) - f(0.58060) * (v - f(128)),
        y + f(2.03211) * (u - f(128)),
    )
    return np.stack([np.clip(c, 0, 255).astype(np.uint8) for c in channels], axis=2)


def _pair(name: str) -> tuple[np.ndarray, np.ndarray]:
    if name.startswith("uniform_shift_"):
        _, _, shift, size = name.split("_")
        side = int(size.split("x")[0])
        return _uniform(side, 128), _uniform(side, 128 + int(shift))
    recipes = {
        "gradient_vs_uniform_64x64": lambda: (_gradient_h(64), _uniform(64, 128)),
        "noise_vs_uniform_64x64": lambda: (_noise(64, 42), _uniform(64, 128)),
        "gradient_vs_boxblur8x8_64x64": lambda: (_gradient_h(64), _box_blur_8x8(_gradient_h(64))),
        "noise_vs_sharpen_64x64": lambda: (_noise(64, 999), _sharpen(_noise(64, 999))),
        "gradient_vs_yuv_roundtrip_64x64": lambda: (
            _gradient_diagonal(64),
            _yuv_round_trip(_gradient_diagonal(64)),
        ),
        "edge_vs_boxblur8x8_64x64": lambda: (_edge(64), _box_blur_8x8(_edge(64))),
    }
    return recipes[name]()


# name: (C++ score, SHA-256 prefix of the reference's RGB bytes, of the distorted's)
TEXTURED = {
    "gradient_vs_uniform_64x64": (-64.56872148, "bfcfaa0618d28284", "2203a98fd84adfbd"),
    "noise_vs_uniform_64x64": (-47.33572558, "7f6be7f433ccb0a0", "2203a98fd84adfbd"),
    "noise_vs_sharpen_64x64": (-5.81017556, "53f592ab5678b4f4", "4ad3cfe3e5b8138c"),
    "edge_vs_boxblur8x8_64x64": (24.27333552, "f0d003b6007c958d", "cbe40f4a1c43e661"),
}
FLAT_GRADIENTS = {
    "gradient_vs_boxblur8x8_64x64": (94.34090315, "bfcfaa0618d28284", "cceefcd9fb78f029"),
    "gradient_vs_yuv_roundtrip_64x64": (97.26010964, "e7644fe3f111f9ea", "08f6523635ec5e8f"),
}
UNIFORM_GREY = {
    "uniform_shift_1_32x32": (97.7492143, "753412db29fc2970", "9bfd6cf255ab3483"),
    "uniform_shift_5_32x32": (98.80827382, "753412db29fc2970", "51b9f0ae4323fb70"),
    "uniform_shift_10_32x32": (96.5311409, "753412db29fc2970", "264e5cfb60a64f9b"),
    "uniform_shift_20_32x32": (93.7982322, "753412db29fc2970", "2fcac1467f36ff01"),
    "uniform_shift_50_32x32": (85.01409588, "753412db29fc2970", "1cfe56369e044182"),
    "uniform_shift_1_64x64": (97.98672126, "2203a98fd84adfbd", "ba72ca16b1a20d73"),
    "uniform_shift_5_64x64": (91.52357693, "2203a98fd84adfbd", "5b0e43ac49bd5fb3"),
    "uniform_shift_10_64x64": (80.24289393, "2203a98fd84adfbd", "e802fe3a49ace0c2"),
    "uniform_shift_20_64x64": (56.05855584, "2203a98fd84adfbd", "fe8a663ebc8cead5"),
    "uniform_shift_50_64x64": (-8.75942256, "2203a98fd84adfbd", "e67286008fa164d1"),
    "uniform_shift_1_128x128": (96.78920738, "2af5ead05032faaf", "43ebfa035c41a640"),
    "uniform_shift_5_128x128": (88.54070876, "2af5ead05032faaf", "bc6f35e8fbe58efe"),
    "uniform_shift_10_128x128": (77.84296299, "2af5ead05032faaf", "8a688a547f7bb470"),
    "uniform_shift_20_128x128": (54.27883917, "2af5ead05032faaf", "22a45cbe1683df60"),
    "uniform_shift_50_128x128": (-9.82383315, "2af5ead05032faaf", "768e019eb1e7b74a"),
    "uniform_shift_1_256x256": (96.15027098, "83ab53863cf746ef", "1c0cfab02575aaff"),
    "uniform_shift_5_256x256": (89.73209436, "83ab53863cf746ef", "90526676d3846e7e"),
    "uniform_shift_10_256x256": (80.29149136, "83ab53863cf746ef", "2019b05026c860a3"),
    "uniform_shift_20_256x256": (59.77892918, "83ab53863cf746ef", "2aebb5647caa208a"),
    "uniform_shift_50_256x256": (-0.39085784, "83ab53863cf746ef", "ebf9afb21c244788"),
}


def _published_score_error(name: str, published: tuple[float, str, str]) -> float:
    expected, reference_hash, distorted_hash = published
    reference, distorted = _pair(name)
    # The same bytes the C++ tool was given, or the comparison would mean nothing.
    assert hashlib.sha256(reference.tobytes()).hexdigest().startswith(reference_hash), name
    assert hashlib.sha256(distorted.tobytes()).hexdigest().startswith(distorted_hash), name
    return ssimulacra2(Image.fromarray(reference), Image.fromarray(distorted)) - expected


@pytest.mark.parametrize("name", sorted(TEXTURED))
def test_textured_published_pairs_match_the_cpp_scores_within_0_1(name):
    error = _published_score_error(name, TEXTURED[name])
    assert abs(error) < 0.1, f"{name}: {error:+.4f} from the C++ score"


@pytest.mark.parametrize(
    ("name", "tolerance"),
    [(name, 1.0) for name in sorted(FLAT_GRADIENTS)]
    + [(name, 2.5) for name in sorted(UNIFORM_GREY)],
)
def test_flat_published_pairs_stay_within_the_rounding_spread(name, tolerance):
    error = _published_score_error(name, (FLAT_GRADIENTS | UNIFORM_GREY)[name])
    assert abs(error) < tolerance, f"{name}: {error:+.4f} from the C++ score"


# -- invariants on real photos -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "mode"),
    [((800, 600), "RGB"), ((801, 603), "RGB"), ((MIN_SIDE, MIN_SIDE), "RGB"), ((9, 13), "RGB"),
     ((320, 240), "L"), ((320, 240), "P"), ((320, 240), "RGBA")],
)  # fmt: skip
def test_identical_images_score_100(photo, size, mode):
    image = photo.resize(size, Image.Resampling.LANCZOS).convert(mode)
    if mode == "RGBA":  # a real alpha channel: transparent left part, opaque right part
        alpha = np.zeros((size[1], size[0]), dtype=np.uint8)
        alpha[:, size[0] // 2 :] = 255
        image.putalpha(Image.fromarray(alpha))
    assert ssimulacra2(image, image.copy()) == pytest.approx(100.0, abs=1e-6)


def test_identical_16_bit_grey_images_score_100(corpus):
    image = Image.open(corpus / "edge" / "png16_grey.png")
    assert image.mode.startswith("I")
    image.thumbnail((400, 400))
    assert ssimulacra2(image, image.copy()) == pytest.approx(100.0, abs=1e-6)


def test_more_jpeg_compression_scores_lower(photo):
    tier = photo.resize((640, 480), Image.Resampling.LANCZOS)
    reference = Ssimulacra2Reference(tier)
    q90, q50, q20 = (reference.score(_jpeg(tier, quality)) for quality in (90, 50, 20))
    assert q90 > q50 + 5 > q20 + 10, (q90, q50, q20)
    # The published calibration: libjpeg-turbo q90 is "very high quality" (80-90), q20 "low"
    # (about 30); Pillow's 4:2:0 q20 lands lower than q90 by far more than rounding.
    assert 80 < q90 < 95 and q20 < 55, (q90, q50, q20)


def test_prepared_reference_gives_the_one_off_scores(photo):
    tier = photo.resize((400, 300), Image.Resampling.LANCZOS)
    reference = Ssimulacra2Reference(tier)
    for quality in (85, 40):
        distorted = _jpeg(tier, quality)
        assert reference.score(distorted) == ssimulacra2(tier, distorted)


def _composite(rgba: np.ndarray, background: float) -> Image.Image:
    alpha = rgba[:, :, 3:] / 255.0
    blended = alpha * rgba[:, :, :3] + (1 - alpha) * background * 255
    return Image.fromarray(np.rint(blended).astype(np.uint8))


def test_alpha_counts_where_visible_and_the_worse_background_wins(photo):
    pixels = np.asarray(photo.resize((320, 240), Image.Resampling.LANCZOS).convert("RGBA")).copy()
    pixels[:, :160, 3] = 0  # left half fully transparent
    reference = Image.fromarray(pixels)

    hidden_change = pixels.copy()
    hidden_change[:, :160, :3] = 255 - hidden_change[:, :160, :3]
    assert ssimulacra2(reference, Image.fromarray(hidden_change)) == pytest.approx(100, abs=1e-6)

    # The distorted image paints a square of the transparent half opaque black: a mild change
    # over the reference tool's dark background (0.1), a glaring one over its light one (0.9).
    blackened = pixels.copy()
    blackened[100:140, 60:100] = (0, 0, 0, 255)
    over_dark = ssimulacra2(_composite(pixels, 0.1), _composite(blackened, 0.1))
    over_light = ssimulacra2(_composite(pixels, 0.9), _composite(blackened, 0.9))
    assert over_dark > over_light + 20, (over_dark, over_light)
    # 8-bit compositing above rounds where the module blends in float: hence the 0.5.
    assert ssimulacra2(reference, Image.fromarray(blackened)) == pytest.approx(over_light, abs=0.5)


def test_mismatched_or_tiny_images_are_refused(photo):
    with pytest.raises(ValueError, match="sizes differ"):
        ssimulacra2(photo.resize((64, 48)), photo.resize((64, 49)))
    with pytest.raises(ValueError, match="at least 8x8"):
        ssimulacra2(photo.resize((7, 40)), photo.resize((7, 40)))
    with pytest.raises(ValueError, match="sizes differ"):
        Ssimulacra2Reference(photo.resize((64, 48))).score(photo.resize((48, 64)))


def test_an_800x600_pair_needs_under_80_mb(photo):
    tier = photo.resize((800, 600), Image.Resampling.LANCZOS)
    distorted = _jpeg(tier, 70)
    tracemalloc.start()
    try:
        ssimulacra2(tier, distorted)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 80 * 2**20, f"peak {peak / 2**20:.1f} MiB"
