"""Tiny uploads that declare huge work stay cheap in the web process.

The files are generated here (never committed): a ~200 KB 16-bit 10000x10000 PNG, and
TIFFs with thousands of 1x1 pages (IFDs). Peak RSS is measured in a fresh subprocess
that runs the real ``image_ingest`` against the test database.
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms, TiffImagePlugin

from gallery import imaging
from gallery.imaging import ImageRejected, colour, decode_for_variants, inspect_image, sniffing

REPO = Path(__file__).resolve().parents[1]
MAX_PIXELS = 100_000_000
SLACK_MB = 150  # allowed on top of one decoded frame


# --- generated files ------------------------------------------------------------------------


def _png_chunk(ctype: bytes, body: bytes) -> bytes:
    return (
        struct.pack(">I", len(body))
        + ctype
        + body
        + struct.pack(">I", zlib.crc32(body, zlib.crc32(ctype)))
    )


def png_grey16(width: int, height: int) -> bytes:
    """A 16-bit greyscale PNG of a smooth ramp, compressed row by row (never held whole)."""
    row = b"\x00" + np.linspace(0, 65535, width).astype(">u2").tobytes()  # filter 0 + samples
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def tiff_with_pages(pages: int) -> bytes:
    """A little-endian TIFF whose IFD chain holds ``pages`` 1x1 8-bit grey images."""
    # (tag, type, value): type 3 = SHORT, 4 = LONG; the one pixel sits at offset 8.
    entries = [(256, 3, 1), (257, 3, 1), (258, 3, 8), (259, 3, 1), (262, 3, 1),
               (273, 4, 8), (277, 3, 1), (278, 3, 1), (279, 4, 1)]  # fmt: skip
    ifd_size = 2 + 12 * len(entries) + 4
    first = 10
    out = bytearray(b"II*\x00" + struct.pack("<I", first) + b"\x80\x00")
    for page in range(pages):
        following = first + (page + 1) * ifd_size if page < pages - 1 else 0
        out += struct.pack("<H", len(entries))
        for tag, kind, value in entries:
            packed = struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
            out += struct.pack("<HHI", tag, kind, 1) + packed
        out += struct.pack("<I", following)
    return bytes(out)


# --- peak RSS of the real ingest, in a fresh process -------------------------------------------

_MEASURE = r"""
import json, sys
import django

django.setup()
from django.db import connection
from gallery.imaging import ImageRejected
from gallery.services import image_ingest


def status_kb(field):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])


data = open(sys.argv[1], "rb").read()
connection.ensure_connection()
try:  # reset the high-water mark to the current RSS (Linux >= 4.0)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
except OSError:
    pass  # then the peak may include start-up, which only makes the check stricter
baseline = status_kb("VmRSS")
try:
    result = image_ingest(data=data, filename=sys.argv[1])
    outcome = {"created": result.created, "width": result.image.width, "blurhash": result.image.blurhash}
except ImageRejected as exc:
    outcome = {"code": exc.code}
outcome["growth_mb"] = (status_kb("VmHWM") - baseline) / 1024
print(json.dumps(outcome))
"""


def ingest_peak(path: Path, media_root: Path) -> dict:
    from tests.live_server import server_env

    env = server_env(media_root=media_root)
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.django_db(transaction=True)
def test_ingest_of_16bit_10000px_png_peaks_under_one_frame_plus_slack(tmp_path):
    path = tmp_path / "grey16_10000.png"
    path.write_bytes(png_grey16(10_000, 10_000))
    assert path.stat().st_size < 2_000_000  # a tiny upload...
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", Image.DecompressionBombWarning
        )  # 100 MP: only the header is read
        with Image.open(path) as im:
            assert (im.mode, im.size) == ("I;16", (10_000, 10_000))
    # ...whose one decoded frame is 200 MB: PNG has no shrink-on-load, Pillow keeps I;16 at 2 B/px.
    frame_mb = 10_000 * 10_000 * 2 / 2**20

    outcome = ingest_peak(path, tmp_path / "media")

    assert outcome.get("created") is True, outcome
    assert outcome["width"] == 10_000 and outcome["blurhash"]
    assert outcome["growth_mb"] <= frame_mb + SLACK_MB, outcome


@pytest.mark.django_db(transaction=True)
def test_ingest_of_30000_page_tiff_is_refused_cheaply(tmp_path):
    path = tmp_path / "pages.tif"
    path.write_bytes(tiff_with_pages(30_000))

    outcome = ingest_peak(path, tmp_path / "media")

    assert outcome.get("code") == "too_many_pixels", outcome
    assert outcome["growth_mb"] <= 1 / 2**20 + SLACK_MB, outcome


# --- TIFF frame walking is bounded ------------------------------------------------------------


@pytest.fixture
def tiff_seeks(monkeypatch) -> list[int]:
    """Every IFD Pillow reads (TiffImageFile._seek), n_frames included."""
    seen: list[int] = []
    original = TiffImagePlugin.TiffImageFile._seek

    def counting(self, frame: int) -> None:
        seen.append(frame)
        original(self, frame)

    monkeypatch.setattr(TiffImagePlugin.TiffImageFile, "_seek", counting)
    return seen


def test_tiff_with_30000_pages_is_rejected_after_walking_at_most_the_limit(tiff_seeks):
    with pytest.raises(ImageRejected) as info:
        inspect_image(tiff_with_pages(30_000), max_pixels=MAX_PIXELS)

    assert info.value.code == "too_many_pixels"
    assert "1000" in info.value.message
    # Page 0 on open, then pages 1..limit: never the whole chain.
    assert max(tiff_seeks) <= sniffing.MAX_SEEK_FRAMES
    assert len(tiff_seeks) <= sniffing.MAX_SEEK_FRAMES + 2


def test_tiff_page_limit_boundary():
    limit = sniffing.MAX_SEEK_FRAMES
    assert inspect_image(tiff_with_pages(limit), max_pixels=MAX_PIXELS).format == "TIFF"
    with pytest.raises(ImageRejected) as info:
        inspect_image(tiff_with_pages(limit + 1), max_pixels=MAX_PIXELS)
    assert info.value.code == "too_many_pixels"


def test_tiff_later_page_over_the_pixel_limit_is_still_caught():
    first, second = Image.new("L", (10, 10)), Image.new("L", (300, 300))
    buf = io.BytesIO()
    first.save(buf, "TIFF", save_all=True, append_images=[second])
    with pytest.raises(ImageRejected) as info:
        inspect_image(buf.getvalue(), max_pixels=10_000)
    assert info.value.code == "too_many_pixels"
    assert "Frame 2" in info.value.message


# --- tile-wise normalisation gives exactly the pixels of the whole-frame route -------------------


def _lab_image(size: tuple[int, int]) -> Image.Image:
    rgb = Image.fromarray(_noise(size, 3))
    to_lab = ImageCms.buildTransform(
        ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB"
    )
    return ImageCms.applyTransform(rgb, to_lab)


def _noise(size: tuple[int, int], bands: int, dtype=np.uint8, high: int = 256) -> np.ndarray:
    rng = np.random.default_rng(9)
    shape = (size[1], size[0], bands) if bands > 1 else (size[1], size[0])
    return rng.integers(0, high, shape, dtype=np.int64).astype(dtype)


def _odd_mode_images(size: tuple[int, int]) -> dict[str, Image.Image]:
    palette = Image.fromarray(_noise(size, 1, high=16)).convert("P")
    palette.putpalette([v for i in range(256) for v in (i * 7 % 256, i * 13 % 256, i * 29 % 256)])
    trns = palette.copy()
    trns.info["transparency"] = 3
    grey_trns = Image.fromarray(_noise(size, 1))
    grey_trns.info["transparency"] = 17
    i16 = Image.fromarray(_noise(size, 1, np.uint16, 65536))
    wide = Image.fromarray(_noise(size, 1, np.int32, 70_000) - 3000)
    return {
        "1": Image.fromarray(_noise(size, 1, high=2).astype(bool)),
        "P": palette,
        "P+trns": trns,
        "L+trns": grey_trns,
        "I;16": i16,
        "I": wide,
        "F": wide.convert("F"),
        "LAB": _lab_image(size),
        "RGB": Image.fromarray(_noise(size, 3)),
    }


@pytest.mark.parametrize("factor", [1, 3, 7])
def test_tilewise_normalise_and_reduce_matches_whole_frame(monkeypatch, factor):
    size = (131, 97)  # not a multiple of any factor, so edge boxes are partial
    monkeypatch.setattr(colour, "_TILE_SIDE", 13)  # force many tiles
    for name, img in _odd_mode_images(size).items():
        assert img.mode == name.split("+")[0]
        whole = colour.normalise_mode(img)
        expected = whole.reduce(factor) if factor > 1 else whole
        got = colour.normalise_reduced(img, factor)
        assert got.mode == expected.mode, name
        assert got.size == expected.size, name
        assert np.array_equal(np.asarray(got), np.asarray(expected)), name


def test_16bit_png_decode_is_correct_at_reduced_size():
    data = png_grey16(1200, 300)
    got = decode_for_variants(data, max_pixels=MAX_PIXELS, target_width=100)
    assert got.info[imaging.SOURCE_SIZE_KEY] == (1200, 300)
    assert got.mode == "RGB" and got.size == (200, 50)  # reduced by 6: still >= 2x the target
    ramp = np.linspace(0, 65535, 1200) * 255 / 65535
    expected = np.floor(ramp + 0.5).reshape(-1, 6).mean(axis=1)  # 8-bit, then 6-px boxes
    row = np.asarray(got, dtype=np.float64)[25, :, 0]
    assert np.abs(row - expected).max() <= 1
