"""Tests for gallery.imaging against the shared real-world corpus (read in place, never copied).

The corpus sits at ../shared/corpus beside the repo; $PICSITE_CORPUS overrides a missing one.
"""

from __future__ import annotations

import io
import os
import random
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image, ImageChops, ImageCms, TiffImagePlugin

from gallery.imaging import (
    CONTENT_TYPES,
    FORMATS,
    SOURCE_SIZE_KEY,
    CancelledError,
    ImageRejected,
    VariantRecipe,
    compute_blurhash,
    decode_for_variants,
    default_encoder_threads,
    encode_variant,
    gps_coordinates,
    inspect_image,
    render_tiers,
    resize_lanczos,
    variant_tiers,
)
from gallery.imaging.blurhash import blurhash_encode
from gallery.imaging.decode import VariantSource


def _corpus() -> Path:
    default = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"
    if default.is_dir():
        return default
    return Path(os.environ.get("PICSITE_CORPUS", default))


CORPUS = _corpus()
MAX_PIXELS = 100_000_000
RECIPE = VariantRecipe()
# Locally a missing corpus skips; in CI (CI=true) it must be there, see test_corpus_present.
needs_corpus = pytest.mark.skipif(
    not CORPUS.is_dir() and not os.environ.get("CI"), reason=f"corpus not found at {CORPUS}"
)


def _files(folder: str) -> list[str]:
    root = CORPUS / folder
    if not root.is_dir():
        return []
    return sorted(str(p.relative_to(CORPUS)) for p in root.rglob("*") if p.is_file())


def _read(rel: str) -> bytes:
    return (CORPUS / rel).read_bytes()


def _open_blob(blob: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(blob))
    im.load()
    return im


def _expected_height(width: int, meta_w: int, meta_h: int) -> int:
    return max(1, round(width * meta_h / meta_w))


def _arr(im: Image.Image) -> np.ndarray:
    # int16 keeps differences exact and 12 Mpx comparisons cheap
    return np.asarray(im, dtype=np.int16)


@needs_corpus
def test_corpus_present() -> None:
    assert (CORPUS / "MANIFEST.tsv").is_file(), f"image corpus missing at {CORPUS}"
    assert len(_files("photos")) >= 18 and len(_files("edge")) >= 48 and len(_files("bad")) >= 16


# ---------------------------------------------------------------------------------------------
# Every valid corpus file goes through the whole pipeline
# ---------------------------------------------------------------------------------------------

VALID = _files("photos") + _files("edge")


@needs_corpus
@pytest.mark.parametrize("rel", VALID)
def test_valid_file_full_pipeline(rel: str) -> None:
    data = _read(rel)
    meta = inspect_image(data, max_pixels=MAX_PIXELS)
    widths = RECIPE.tier_widths(meta.width)
    assert widths == sorted(widths) and max(widths) <= meta.width

    img = decode_for_variants(data, max_pixels=MAX_PIXELS, target_width=max(widths))
    assert img.mode in ("RGB", "RGBA")
    assert not {"exif", "icc_profile", "xmp"} & set(img.info)

    tiers = list(render_tiers(img, widths))
    assert [w for w, _ in tiers] == widths  # ascending, every tier
    for w, tier in tiers:
        assert tier.size == (w, _expected_height(w, meta.width, meta.height))

    # Encoding every tier of every big photo would blow the time budget: encode the two
    # smallest and the largest tier (all of them when there are three or fewer).
    chosen = tiers if len(tiers) <= 3 else tiers[:2] + tiers[-1:]
    for w, tier in chosen:
        for fmt in FORMATS:
            blob = encode_variant(tier, fmt, RECIPE)
            out = _open_blob(blob)
            assert out.format == fmt.upper()
            assert out.size == (w, _expected_height(w, meta.width, meta.height)), (fmt, w)
            exif = out.getexif()
            assert len(exif) == 0, f"{fmt} variant carries EXIF"
            assert not exif.get_ifd(ExifTags.IFD.GPSInfo)
            assert not out.info.get("exif") and not out.info.get("xmp")
            assert not out.info.get("icc_profile")


# ---------------------------------------------------------------------------------------------
# Orientation
# ---------------------------------------------------------------------------------------------


def _upright_small(rel: str) -> np.ndarray:
    data = _read(rel)
    img = decode_for_variants(data, max_pixels=MAX_PIXELS, target_width=256)
    size = (64, 43) if img.width > img.height else (43, 64)
    return _arr(img.convert("RGB").resize(size, Image.Resampling.BOX))


@needs_corpus
@pytest.mark.parametrize("shape", ["Landscape", "Portrait"])
def test_orientation_files_come_out_upright(shape: str) -> None:
    reference = _upright_small(f"edge/orientation/{shape}_1.jpg")
    rotated = reference[::-1, ::-1]  # the same picture upside down
    for n in range(9):  # 0 is an illegal value that must be treated as 1
        rel = f"edge/orientation/{shape}_{n}.jpg"
        meta = inspect_image(_read(rel), max_pixels=MAX_PIXELS)
        assert meta.orientation == (1 if n == 0 else n)
        assert (meta.width, meta.height) == ((1800, 1200) if shape == "Landscape" else (1200, 1800))
        got = _upright_small(rel)
        assert got.shape == reference.shape, rel
        diff = np.abs(got - reference).mean()
        wrong = np.abs(got - rotated).mean()
        assert diff < 6, f"{rel}: mean abs diff {diff:.2f} vs upright reference"
        assert wrong > 4 * diff, f"{rel}: not clearly closer to upright ({diff:.2f} vs {wrong:.2f})"


@needs_corpus
@pytest.mark.parametrize(
    ("rel", "size", "orientation"),
    [
        ("photos/iphone_dog_orientation6.jpg", (3024, 4032), 6),
        ("photos/canon_sx60_orientation6.jpg", (1536, 2048), 6),
        ("edge/avif_irot_imir.avif", (640, 427), 5),
        ("edge/png_orientation_in_xmp_only.png", (326, 268), 3),
        ("edge/png_exif_breaks_exif_transpose.png", (403, 302), 1),
        ("edge/iphone13promax_p3.heic", (3024, 4032), 1),
    ],
)
def test_oriented_dimensions(rel: str, size: tuple[int, int], orientation: int) -> None:
    data = _read(rel)
    meta = inspect_image(data, max_pixels=MAX_PIXELS)
    assert (meta.width, meta.height) == size
    assert meta.orientation == orientation
    img = decode_for_variants(data, max_pixels=MAX_PIXELS, target_width=320)
    assert img.info[SOURCE_SIZE_KEY] == size
    # shrink-on-load never goes below the requested width
    assert img.width >= 320
    assert abs(img.width / img.height - size[0] / size[1]) < 0.02


# ---------------------------------------------------------------------------------------------
# Colour management
# ---------------------------------------------------------------------------------------------

SRGB = ImageCms.createProfile("sRGB")


def _profile_reference(rel: str) -> tuple[np.ndarray, np.ndarray]:
    """(independent ImageCms conversion to sRGB, naive un-converted pixels), both RGB."""
    src = Image.open(CORPUS / rel)
    src.load()
    profile = ImageCms.ImageCmsProfile(io.BytesIO(src.info["icc_profile"]))
    base = src.convert("RGB") if src.mode in ("RGBA", "P") else src
    converted = ImageCms.profileToProfile(base, profile, SRGB, outputMode="RGB")
    assert converted is not None
    return _arr(converted), _arr(src.convert("RGB"))


@needs_corpus
@pytest.mark.parametrize(
    "rel",
    [
        "edge/displayp3_8x8.png",
        "edge/adobergb_canon_t6_2000x1072.jpg",
        "edge/iphone13promax_p3.heic",
        "edge/adobergb_fuji_xt2.tiff",
    ],
)
def test_wide_gamut_converted_to_srgb(rel: str) -> None:
    expected, naive = _profile_reference(rel)
    got = _arr(decode_for_variants(_read(rel), max_pixels=MAX_PIXELS).convert("RGB"))
    assert got.shape == expected.shape
    err = np.abs(got - expected)
    assert err.mean() < 0.5 and (err > 2).mean() < 0.001, (err.mean(), err.max())
    # ...and the conversion really did something, so this test can fail.
    untouched = np.abs(got - naive)
    assert untouched.mean() > 1.0 or untouched.max() >= 20, (untouched.mean(), untouched.max())


@needs_corpus
def test_cmyk_with_profile_uses_the_profile() -> None:
    rel = "edge/cmyk_swop_profile.jpg"
    expected, _ = _profile_reference(rel)
    src = Image.open(CORPUS / rel)
    naive = _arr(src.convert("RGB"))
    got = decode_for_variants(_read(rel), max_pixels=MAX_PIXELS)
    assert got.mode == "RGB"
    err = np.abs(_arr(got) - expected).mean()
    assert err < 1.0, err
    assert np.abs(naive - expected).mean() > 5 * max(err, 1.0)


@needs_corpus
def test_cmyk_without_profile() -> None:
    """Untagged (Adobe, inverted) CMYK: (1-C)(1-K) rule; sanity-checked against the SWOP
    profile from the other CMYK sample as a stand-in press profile (an inverted or
    channel-swapped conversion would be off by 100+ levels)."""
    rel = "edge/cmyk_adobe_no_profile.jpg"
    src = Image.open(CORPUS / rel)
    src.load()
    assert src.mode == "CMYK" and "icc_profile" not in src.info
    got = decode_for_variants(_read(rel), max_pixels=MAX_PIXELS)
    assert got.mode == "RGB"
    c, m, y, k = (ImageChops.invert(b) for b in src.split())
    rule = Image.merge("RGB", [ImageChops.multiply(ch, k) for ch in (c, m, y)])
    assert np.abs(_arr(got) - _arr(rule)).max() == 0
    swop = Image.open(CORPUS / "edge/cmyk_swop_profile.jpg").info["icc_profile"]
    stand_in = ImageCms.profileToProfile(
        src, ImageCms.ImageCmsProfile(io.BytesIO(swop)), SRGB, outputMode="RGB"
    )
    assert np.abs(_arr(got) - _arr(stand_in)).mean() < 8


@needs_corpus
def test_greyscale_with_gray_gamma_profile() -> None:
    got = decode_for_variants(_read("edge/greyscale_concert.jpg"), max_pixels=MAX_PIXELS)
    assert got.mode == "RGB"
    a = _arr(got)
    assert np.abs(a[..., 0] - a[..., 1]).max() <= 1 and np.abs(a[..., 1] - a[..., 2]).max() <= 1


@needs_corpus
def test_16bit_grey_is_scaled_not_clipped() -> None:
    rel = "edge/png16_grey.png"
    src = np.asarray(Image.open(CORPUS / rel), dtype=np.float64)
    got = decode_for_variants(_read(rel), max_pixels=MAX_PIXELS)
    a = _arr(got)[..., 0]
    assert len(np.unique(a)) > 16 and (a < 255).mean() > 0.5
    assert np.abs(a - np.round(src / 257)).max() <= 1


# ---------------------------------------------------------------------------------------------
# Alpha
# ---------------------------------------------------------------------------------------------


@needs_corpus
@pytest.mark.parametrize(
    "rel",
    [
        "edge/png16_rgba.png",
        "edge/palette_trns.png",
        "edge/grey_alpha_la.png",
        "edge/rgba_mostly_transparent_2048x1536.png",
        "edge/palette_fully_transparent.png",
    ],
)
def test_alpha_is_kept(rel: str) -> None:
    data = _read(rel)
    meta = inspect_image(data, max_pixels=MAX_PIXELS)
    widths = RECIPE.tier_widths(meta.width)
    img = decode_for_variants(data, max_pixels=MAX_PIXELS, target_width=widths[0])
    assert img.mode == "RGBA"
    _w, tier = next(render_tiers(img, widths[:1]))
    for fmt in FORMATS:
        out = _open_blob(encode_variant(tier, fmt, RECIPE))
        assert out.mode == "RGBA", fmt
        assert out.getchannel("A").getextrema()[0] < 255, fmt


@needs_corpus
def test_fully_opaque_alpha_becomes_rgb() -> None:
    rel = "photos/embedgravitybird_rgba.png"
    assert Image.open(CORPUS / rel).mode == "RGBA"
    img = decode_for_variants(_read(rel), max_pixels=MAX_PIXELS, target_width=320)
    assert img.mode == "RGB"
    _w, tier = next(render_tiers(img, [320]))
    for fmt in FORMATS:
        assert _open_blob(encode_variant(tier, fmt, RECIPE)).mode == "RGB"


# ---------------------------------------------------------------------------------------------
# Rejections
# ---------------------------------------------------------------------------------------------

BAD_CODES = {
    "bad/bomb_avif_17000x17000.avif": "too_many_pixels",
    "bad/bomb_gif_4gpx.gif": "too_many_pixels",
    "bad/bomb_gif_frame_extents.gif": "too_many_pixels",
    "bad/bomb_jpeg_280mpx.jpg": "too_many_pixels",
    "bad/bomb_png_65536x65536.png": "too_many_pixels",
    "bad/bomb_png_ztxt.png": "corrupt",
    "bad/corrupt_header.jpg": "corrupt",
    "bad/html_error_page.png": "not_an_image",
    "bad/png_bad_idat_crc.png": "corrupt",
    "bad/png_bad_ihdr_crc.png": "corrupt",
    "bad/png_bad_signature.png": "corrupt",
    "bad/png_missing_idat.png": "corrupt",
    "bad/text_readme.jpg": "not_an_image",
    "bad/truncated.png": "truncated",
    "bad/truncated_photo.jpg": "truncated",
    "bad/zero_bytes.jpg": "empty_file",
}


@needs_corpus
def test_bad_table_covers_every_bad_file() -> None:
    assert set(_files("bad")) == set(BAD_CODES)


@needs_corpus
@pytest.mark.parametrize(("rel", "code"), sorted(BAD_CODES.items()))
def test_bad_files_rejected(rel: str, code: str) -> None:
    data = _read(rel)
    with pytest.raises(ImageRejected) as info:
        inspect_image(data, max_pixels=MAX_PIXELS)
    assert info.value.code == code
    assert info.value.message.strip()
    # The worker path must refuse them the same way, never with a raw decoder error.
    with pytest.raises(ImageRejected) as info:
        decode_for_variants(data, max_pixels=MAX_PIXELS, target_width=2560)
    assert info.value.code == code


@needs_corpus
@pytest.mark.parametrize(
    "rel",
    [
        "edge/progressive_nikon_d300.jpg",
        "edge/palette_trns.png",
        "edge/animated_rotating_squares.gif",
        "edge/animated_rotating_squares.webp",
        "edge/avif_irot_imir.avif",
        "edge/cmyk_adobe_no_profile.jpg",
        "photos/flower_exif_icc.webp",
    ],
)
def test_damaged_inputs_only_raise_image_rejected(rel: str) -> None:
    """Truncations, byte flips and cut-outs: accepted or ImageRejected, never a raw error."""
    rng = random.Random(rel)
    data = _read(rel)
    for trial in range(15):
        blob = bytearray(data)
        if trial % 3 == 0:
            del blob[rng.randrange(1, len(blob)) :]
        elif trial % 3 == 1:
            for _ in range(rng.randrange(1, 16)):
                blob[rng.randrange(len(blob))] = rng.randrange(256)
        else:
            start = rng.randrange(len(blob))
            del blob[start : start + rng.randrange(1, 64)]
        for call in (inspect_image, decode_for_variants):
            try:
                call(bytes(blob), max_pixels=MAX_PIXELS)
            except ImageRejected as exc:
                assert exc.code and exc.message


def test_unsupported_and_limits() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (20, 10), "red").save(buf, "BMP")
    with pytest.raises(ImageRejected) as info:
        inspect_image(buf.getvalue(), max_pixels=MAX_PIXELS)
    assert info.value.code == "unsupported_format"

    buf = io.BytesIO()
    Image.new("RGB", (200, 100), "red").save(buf, "PNG")
    data = buf.getvalue()
    with pytest.raises(ImageRejected) as info:
        inspect_image(data, max_pixels=19_999)
    assert info.value.code == "too_many_pixels"
    with pytest.raises(ImageRejected) as info:
        inspect_image(data, max_pixels=MAX_PIXELS, max_bytes=len(data) - 1)
    assert info.value.code == "too_large"
    assert inspect_image(data, max_pixels=20_000, max_bytes=len(data)).width == 200


def test_cancel_stops_decoding() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "blue").save(buf, "JPEG")

    def cancel() -> None:
        raise CancelledError

    with pytest.raises(CancelledError):
        decode_for_variants(buf.getvalue(), max_pixels=MAX_PIXELS, cancel=cancel)


# ---------------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------------


@needs_corpus
def test_metadata_from_camera_files() -> None:
    meta = inspect_image(_read("photos/olympus_ep3_4032x3024.jpg"), max_pixels=MAX_PIXELS)
    assert (meta.format, meta.mime_type) == ("JPEG", "image/jpeg")
    assert meta.camera_make == "OLYMPUS IMAGING CORP." and meta.camera_model == "E-P3"
    assert meta.taken_at == datetime(2014, 8, 23, 13, 5, 43, tzinfo=UTC)

    meta = inspect_image(_read("photos/nokia83_harbour_4608x1976.jpg"), max_pixels=MAX_PIXELS)
    assert meta.gps_latitude == pytest.approx(60.1467, abs=1e-3)
    assert meta.gps_longitude == pytest.approx(24.9068, abs=1e-3)

    meta = inspect_image(_read("photos/iphone6_wisteria_hdr.jpg"), max_pixels=MAX_PIXELS)
    assert meta.gps_longitude is not None and meta.gps_longitude < 0  # "W" applied
    assert meta.lens.startswith("iPhone 6 back camera")

    meta = inspect_image(_read("edge/iphone13promax_p3.heic"), max_pixels=MAX_PIXELS)
    assert (meta.format, meta.mime_type) == ("HEIF", "image/heif")
    assert meta.camera_model == "iPhone 13 Pro Max"
    assert meta.taken_at is not None and meta.taken_at.tzinfo is not None

    meta = inspect_image(_read("edge/mpo_3ds_stereo.mpo"), max_pixels=MAX_PIXELS)
    assert (meta.format, meta.mime_type, meta.width) == ("MPO", "image/jpeg", 640)

    meta = inspect_image(_read("edge/png_exif_breaks_exif_transpose.png"), max_pixels=MAX_PIXELS)
    assert meta.orientation == 1 and meta.camera_make == "Google"


def _jpeg_with_exif(gps: dict[int, object] | None = None, **tags: object) -> bytes:
    exif = Image.Exif()
    ifd = exif.get_ifd(ExifTags.IFD.Exif)
    for name, value in tags.items():
        ifd[getattr(ExifTags.Base, name)] = value
    if gps is not None:
        exif.get_ifd(ExifTags.IFD.GPSInfo).update(gps)
    buf = io.BytesIO()
    Image.new("RGB", (16, 8), "green").save(buf, "JPEG", exif=exif)
    return buf.getvalue()


def _r(value: float) -> TiffImagePlugin.IFDRational:
    return TiffImagePlugin.IFDRational(value)


def test_taken_at_uses_offset_when_present() -> None:
    data = _jpeg_with_exif(DateTimeOriginal="2021:06:01 12:30:00", OffsetTimeOriginal="+02:00")
    assert inspect_image(data, max_pixels=MAX_PIXELS).taken_at == datetime(
        2021, 6, 1, 10, 30, tzinfo=UTC
    )
    data = _jpeg_with_exif(DateTimeOriginal="2021:06:01 12:30:00")
    assert inspect_image(data, max_pixels=MAX_PIXELS).taken_at == datetime(
        2021, 6, 1, 12, 30, tzinfo=UTC
    )
    data = _jpeg_with_exif(DateTimeOriginal="0000:00:00 00:00:00")
    assert inspect_image(data, max_pixels=MAX_PIXELS).taken_at is None


def test_gps_in_crafted_exif_is_validated() -> None:
    good = {1: "N", 2: (_r(48), _r(51), _r(29.5)), 3: "W", 4: (_r(2), _r(17), _r(40.2))}
    meta = inspect_image(_jpeg_with_exif(good), max_pixels=MAX_PIXELS)
    assert meta.gps_latitude == pytest.approx(48.85819, abs=1e-4)
    assert meta.gps_longitude == pytest.approx(-2.29450, abs=1e-4)

    bad = {**good, 2: (_r(91), _r(0), _r(0))}
    meta = inspect_image(_jpeg_with_exif(bad), max_pixels=MAX_PIXELS)
    assert (meta.gps_latitude, meta.gps_longitude) == (None, None)


@pytest.mark.parametrize(
    ("gps", "expected"),
    [
        ({1: "S", 2: (33.0, 52.0, 4.8), 3: "E", 4: (151.0, 12.0, 36.0)}, (-33.868, 151.21)),
        ({1: b"N\x00", 2: (10.5,), 3: b"E\x00", 4: (20.25,)}, (10.5, 20.25)),
        ({1: "N", 2: (91.0, 0.0, 0.0), 3: "E", 4: (10.0, 0.0, 0.0)}, (None, None)),
        ({1: "N", 2: (10.0, 0.0, 0.0), 3: "E", 4: (181.0, 0.0, 0.0)}, (None, None)),
        ({1: "N", 2: (0.0, 0.0, 0.0), 3: "E", 4: (0.0, 0.0, 0.0)}, (None, None)),
        ({1: "X", 2: (10.0, 0.0, 0.0), 3: "E", 4: (10.0, 0.0, 0.0)}, (None, None)),
        ({1: "N", 2: (float("nan"), 0.0, 0.0), 3: "E", 4: (1.0,)}, (None, None)),
        (
            {1: "N", 2: (TiffImagePlugin.IFDRational(1, 0), 0.0, 0.0), 3: "E", 4: (1.0,)},
            (None, None),
        ),
        ({1: "N", 2: (-10.0, 0.0, 0.0), 3: "E", 4: (10.0, 0.0, 0.0)}, (None, None)),
        ({1: "N", 2: "garbage", 3: "E", 4: (10.0, 0.0, 0.0)}, (None, None)),
        ({2: (10.0, 0.0, 0.0)}, (None, None)),
        ({}, (None, None)),
    ],
)
def test_gps_coordinates(gps: dict[int, object], expected: tuple) -> None:
    lat, lon = gps_coordinates(gps)
    if expected[0] is None:
        assert (lat, lon) == (None, None)
    else:
        assert lat == pytest.approx(expected[0], abs=1e-3)
        assert lon == pytest.approx(expected[1], abs=1e-3)


# ---------------------------------------------------------------------------------------------
# Recipe, tiers, encoding, blurhash
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source_width", "expected"),
    [
        (4032, [320, 480, 640, 800, 1080, 1280, 1920, 2560]),
        (2560, [320, 480, 640, 800, 1080, 1280, 1920, 2560]),
        (1800, [320, 480, 640, 800, 1080, 1280]),
        (1080, [320, 480, 640, 800, 1080]),
        (321, [320]),
        (320, [320]),
        (319, [319]),
        (49, [49]),
        (1, [1]),
    ],
)
def test_tier_widths(source_width: int, expected: list[int]) -> None:
    assert RECIPE.tier_widths(source_width) == expected


def test_recipe_version() -> None:
    base = VariantRecipe()
    assert len(base.version) == 12 and base.version == VariantRecipe().version
    assert VariantRecipe(encoder_threads=3).version == base.version
    for changed in (
        VariantRecipe(avif_quality=base.avif_quality + 1),
        VariantRecipe(webp_quality=base.webp_quality + 1),
        VariantRecipe(avif_speed=base.avif_speed - 1),
        VariantRecipe(webp_method=base.webp_method - 1),
        VariantRecipe(widths=base.widths[:-1]),
    ):
        assert changed.version != base.version
    assert set(FORMATS) == set(CONTENT_TYPES) == {"avif", "webp"}
    with pytest.raises(ValueError):
        VariantRecipe(widths=())


def test_render_tiers_cascade_order_and_identity() -> None:
    img = Image.new("RGB", (1000, 501), "red")
    tiers = list(render_tiers(img, [480, 320, 1000]))
    assert [w for w, _ in tiers] == [320, 480, 1000]
    assert [t.height for _, t in tiers] == [160, 240, 501]
    assert tiers[-1][1] is img  # a tier at the source width is the source itself
    with pytest.raises(ValueError):
        list(render_tiers(img, [1200]))


@needs_corpus
@pytest.mark.parametrize(
    ("rel", "size"),
    [
        ("photos/iphone_dog_orientation6.jpg", (2560, 3413)),  # 12 MP, both passes
        ("photos/olympus_ep3_4032x3024.jpg", (1919, 1441)),  # odd sizes
        ("photos/olympus_ep3_4032x3024.jpg", (4032, 1000)),  # vertical pass only
        ("photos/nokia83_harbour_4608x1976.jpg", (1000, 1976)),  # horizontal pass only
        ("edge/rgba_mostly_transparent_2048x1536.png", (1280, 960)),  # RGBA: premultiplied
    ],
)
def test_resize_in_parallel_strips_gives_the_pixels_of_one_call(rel: str, size: tuple[int, int]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    img = decode_for_variants(_read(rel), max_pixels=MAX_PIXELS)
    expected = img.resize(size, Image.Resampling.LANCZOS)
    with ThreadPoolExecutor(3) as pool:
        got = resize_lanczos(img, size, pool=pool)
    assert (got.mode, got.size) == (expected.mode, expected.size)
    assert got.tobytes() == expected.tobytes()


@needs_corpus
@pytest.mark.parametrize(
    "rel", ["photos/iphone_dog_orientation6.jpg", "photos/weld_16bit_rgb.png", "edge/grey_alpha_la.png", "photos/flower_exif_icc.webp"]
)
def test_variant_tiers_are_the_recipes_pixels(rel: str) -> None:
    """The smallest tier from its own shrink-on-load decode, the others cascaded from one
    decode at the largest tier's scale; threads change nothing."""
    data = _read(rel)
    meta = inspect_image(data, max_pixels=MAX_PIXELS)
    widths = RECIPE.tier_widths(meta.width)
    small = decode_for_variants(data, max_pixels=MAX_PIXELS, target_width=widths[0])
    first_h = _expected_height(widths[0], meta.width, meta.height)
    expected = [small if small.size == (widths[0], first_h) else small.resize((widths[0], first_h), Image.Resampling.LANCZOS)]
    if len(widths) > 1:
        big = decode_for_variants(data, max_pixels=MAX_PIXELS, target_width=widths[-1])
        expected += [tier for _w, tier in render_tiers(big, widths[1:])]
    for threads in (1, 2):
        with VariantSource(data, max_pixels=MAX_PIXELS) as source:
            assert source.oriented_size == (meta.width, meta.height)
            got = list(variant_tiers(source, widths, threads=threads))
        assert [w for w, _t in got] == widths
        for (w, tier), want in zip(got, expected, strict=True):
            assert tier.size == (w, _expected_height(w, meta.width, meta.height))
            assert tier.tobytes() == want.tobytes(), (threads, w)


def test_encode_strips_metadata_even_if_image_carries_it() -> None:
    exif = Image.Exif()
    exif[ExifTags.Base.Make] = "Leaky"
    exif.get_ifd(ExifTags.IFD.GPSInfo).update({1: "N", 2: (_r(1), _r(2), _r(3))})
    img = Image.new("RGB", (40, 30), "orange")
    img.info.update(exif=exif.tobytes(), icc_profile=ImageCms.ImageCmsProfile(SRGB).tobytes())
    img.info["xmp"] = b"<x:xmpmeta/>"
    for fmt in FORMATS:
        out = _open_blob(encode_variant(img, fmt, RECIPE))
        assert len(out.getexif()) == 0 and not out.info.get("icc_profile")
        assert not out.info.get("xmp")


def test_encode_rejects_unknown_format() -> None:
    with pytest.raises(ValueError):
        encode_variant(Image.new("RGB", (4, 4)), "jpeg", RECIPE)


BASE83 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz#$%*+,-.:;=?@[]^_{|}~"


def _is_blurhash(value: str) -> bool:
    """Decode-free: 4x3 components (size flag "L"), 1 + 1 + 4 + 11 * 2 base-83 digits."""
    return len(value) == 28 and value[0] == "L" and set(value) <= set(BASE83)


def _blurhash_pixels(value: str, width: int, height: int) -> np.ndarray:
    """A (height, width, 3) sRGB rendering of a hash, after the reference decoder."""

    def number(digits: str) -> int:
        return sum(BASE83.index(c) * 83**i for i, c in enumerate(reversed(digits)))

    def linear(srgb: np.ndarray) -> np.ndarray:
        v = srgb / 255
        return np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)

    size = number(value[0])
    nx, ny = size % 9 + 1, size // 9 + 1
    maximum = (number(value[1]) + 1) / 166
    dc = number(value[2:6])
    colours = [linear(np.array([dc >> 16, dc >> 8 & 255, dc & 255], dtype=float))]
    for i in range(1, nx * ny):
        ac = number(value[4 + 2 * i : 6 + 2 * i])
        quant = np.array([ac // 361, ac // 19 % 19, ac % 19], dtype=float)
        colours.append(np.sign(quant - 9) * ((quant - 9) / 9) ** 2 * maximum)
    xs, ys = np.arange(width), np.arange(height)
    out = np.zeros((height, width, 3))
    for j in range(ny):
        for i in range(nx):
            basis = np.outer(np.cos(np.pi * j * ys / height), np.cos(np.pi * i * xs / width))
            out += basis[..., None] * colours[i + j * nx]
    v = np.clip(out, 0, 1)
    srgb = np.where(v <= 0.0031308, v * 12.92, 1.055 * v ** (1 / 2.4) - 0.055)
    return np.floor(srgb * 255 + 0.5).astype(np.uint8)


@needs_corpus
def test_blurhash_on_photo() -> None:
    img = decode_for_variants(
        _read("photos/canon_g9_clouds_2560x1600.jpg"), max_pixels=MAX_PIXELS, target_width=320
    )
    assert _is_blurhash(compute_blurhash(img))


@pytest.mark.parametrize(
    "img",
    [
        Image.new("RGB", (1, 1), (10, 20, 30)),
        Image.new("RGBA", (300, 300), (0, 0, 0, 0)),
        Image.new("RGBA", (7, 500), (255, 0, 0, 128)),
        Image.new("L", (100, 3), 128),
    ],
    ids=["1x1", "transparent", "tall-rgba", "grey"],
)
def test_blurhash_edge_inputs(img: Image.Image) -> None:
    value = compute_blurhash(img)
    assert _is_blurhash(value)
    # the blurhash library closes the image it is given: ours must still be usable
    assert img.getpixel((0, 0)) is not None


def test_blurhash_fully_transparent_is_white() -> None:
    value = compute_blurhash(Image.new("RGBA", (30, 20), (0, 0, 0, 0)))
    pixels = _blurhash_pixels(value, 4, 4)
    assert pixels.min() > 240


def test_blurhash_of_the_reference_example() -> None:
    # The example of github.com/woltapp/blurhash Algorithm.md, whose input is blurhash-python's
    # tests/pic2.png (see tests/data/README.md), encoded whole as its tests do.
    with Image.open(Path(__file__).parent / "data" / "blurhash_pic2.webp") as img:
        rgb = np.asarray(img.convert("RGB"))
    assert blurhash_encode(rgb, 4, 3) == "LlMF%n00%#MwS|WCWEM{R*bbWBbH"


# Known hashes: what blurhash-python 1.2.2 (Wolt's C encoder, which made every hash stored so
# far) returned from compute_blurhash on the starting commit (150dae3), for
# compute_blurhash(decode_for_variants(data, max_pixels=100_000_000, target_width=64)) as
# image_ingest calls it; the transparent ones exercise the white background.
KNOWN_CORPUS_HASHES = {
    "photos/canon_g9_clouds_2560x1600.jpg": "LLD]xZIU4o%M_4WBIUt70Lxt%LRj",
    "photos/iphone_dog_orientation6.jpg": "LFF={sEJ.7NI0J9sW8WF-;t79F-;",
    "photos/embedgravitybird_rgba.png": "LFFi70~p%N%2E0t7xuxu?IxuInWB",
    "photos/weld_16bit_rgb.png": "LB7,[PtR0}M{-=kXW?s+KjXA=y$%",
    "edge/palette_trns.png": "LuMtjjo[_MsZa0j[SfbE~WnnNGo]",
    "edge/grey_alpha_la.png": "LCSPX_?b~qxu-;t7RjRj~qWBD%of",
    "edge/greyscale_concert.jpg": "LB7w?19F4n_3~qD%9F?bt7WBWBt7",
    "edge/rgba_mostly_transparent_2048x1536.png": "L7T9L#_3of_3~qayayay?bRjWBM{",
    "edge/cmyk_adobe_no_profile.jpg": "LF94yCwxWpo1,ZwxsUsU1^sU$5wx",
}


@needs_corpus
@pytest.mark.parametrize(
    ("rel", "expected"), KNOWN_CORPUS_HASHES.items(), ids=list(KNOWN_CORPUS_HASHES)
)
def test_blurhash_matches_the_known_hashes_of_corpus_photos(rel: str, expected: str) -> None:
    img = decode_for_variants(_read(rel), max_pixels=MAX_PIXELS, target_width=64)
    assert compute_blurhash(img) == expected


@pytest.mark.parametrize(
    ("img", "expected"),
    [
        # Known hashes from blurhash-python 1.2.2, as above.
        (Image.new("RGB", (1, 1), (10, 20, 30)), "L31C={%%%%%%%%%%%%%%%%%%%%%%"),
        (Image.new("RGBA", (300, 300), (0, 0, 0, 0)), "L4TSUA~qfQ~q~qj[fQj[fQfQfQfQ"),
        (Image.new("RGBA", (7, 500), (255, 0, 0, 128)), "L~TNm*~W~W~WoLoLoLoLfQfQfQfQ"),
        (Image.new("L", (100, 3), 128), "LZEyb[offQof~qj[fQj[fQfQfQfQ"),
        (Image.new("RGBA", (30, 20), (0, 0, 0, 0)), "LGTSUA?bfQ?b~qoffQoffQfQfQfQ"),
    ],
    ids=["1x1", "transparent", "tall-rgba", "grey", "transparent-30x20"],
)
def test_blurhash_matches_the_known_hashes_of_synthetic_images(
    img: Image.Image, expected: str
) -> None:
    assert compute_blurhash(img) == expected


def test_blurhash_rejects_component_counts_outside_the_format() -> None:
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    for x_components, y_components in ((0, 3), (4, 10)):
        with pytest.raises(ValueError):
            blurhash_encode(rgb, x_components, y_components)


def test_default_encoder_threads() -> None:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert default_encoder_threads() == cpus
    assert default_encoder_threads(cpus) == 1
    assert default_encoder_threads(cpus * 4) == 1
