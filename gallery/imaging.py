"""Pure image-processing core for the variant pipeline.

No Django, no database, no storage: bytes in, metadata / Pillow images / encoded bytes out.
Everything a decoder can throw is turned into :class:`ImageRejected` with a machine code and a
sentence a person can read, so callers only ever handle one exception type for bad uploads.

Rejection codes: empty_file, too_large (max_bytes), not_an_image, unsupported_format,
truncated, corrupt (incl. bad PNG CRCs and zTXt text bombs), too_many_pixels (any frame over
max_pixels, declared decompression bombs, > 1000 TIFF/MPO/HEIF frames).

Thread notes: decoder warnings are silenced with warnings.catch_warnings(), which swaps a
process-global filter list; under threads that is harmless (a warning may print) but not
strictly isolated. Worker processes, not threads, are the intended way to parallelise.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import struct
import warnings
import zlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from functools import lru_cache
from typing import Any

import blurhash
import pillow_heif
from PIL import ExifTags, Image, ImageChops, ImageCms

# HEIC/HEIF is not built into Pillow; registering is idempotent.
pillow_heif.register_heif_opener()

__all__ = [
    "CONTENT_TYPES",
    "FORMATS",
    "CancelledError",
    "ImageRejected",
    "PhotoMetadata",
    "VariantRecipe",
    "compute_blurhash",
    "decode_for_variants",
    "default_encoder_threads",
    "encode_variant",
    "encoder_problems",
    "gps_coordinates",
    "inspect_image",
    "render_tiers",
]

# Bump when the pixels this module produces change for the same recipe (resize/colour logic),
# so VariantRecipe.version changes and stored variants get regenerated.
PIPELINE_REVISION = 1

FORMATS = ("avif", "webp")
CONTENT_TYPES = {"avif": "image/avif", "webp": "image/webp"}

# Key under which decode_for_variants records the oriented source size, so tier heights follow
# the original aspect even when shrink-on-load rounded the decoded size.
SOURCE_SIZE_KEY = "picsite_source_size"

# Formats where checking every frame means seeking with Pillow (cheap: no pixel decode).
# GIF and PNG frames are checked by our own chunk/block walkers instead.
_MAX_SEEK_FRAMES = 1000

_ACCEPTED = {
    # sniffed kind -> Pillow formats to try, in order
    "JPEG": ["JPEG", "MPO"],
    "PNG": ["PNG"],
    "GIF": ["GIF"],
    "WEBP": ["WEBP"],
    "TIFF": ["TIFF"],
    "AVIF": ["AVIF", "HEIF"],
    "HEIF": ["HEIF", "AVIF"],
}

_LABELS = {
    "JPEG": "JPEG",
    "MPO": "JPEG",
    "PNG": "PNG",
    "GIF": "GIF",
    "WEBP": "WebP",
    "TIFF": "TIFF",
    "AVIF": "AVIF",
    "HEIF": "HEIC/HEIF",
}

_MIME = {
    "JPEG": "image/jpeg",
    "MPO": "image/jpeg",  # an MPO is a JPEG with extra frames; browsers treat it as one
    "PNG": "image/png",
    "GIF": "image/gif",
    "WEBP": "image/webp",
    "TIFF": "image/tiff",
    "AVIF": "image/avif",
    "HEIF": "image/heif",
}

_HEIC_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs"}
_HEIF_BRANDS = _HEIC_BRANDS | {b"mif1", b"msf1", b"mif2"}
_AVIF_BRANDS = {b"avif", b"avis"}

# Recognisable image formats we deliberately do not accept (so the user hears "unsupported"
# rather than "not an image").
_OTHER_IMAGE_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"BM", "BMP"),
    (b"8BPS", "Photoshop PSD"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"\x00\x00\x02\x00", "CUR"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEG XL"),
    (b"\xff\x0a", "JPEG XL"),
    (b"qoif", "QOI"),
    (b"DDS ", "DDS"),
    (b"icns", "ICNS"),
    (b"v/1\x01", "OpenEXR"),
    (b"#?RADIANCE", "Radiance HDR"),
    (b"#?RGBE", "Radiance HDR"),
    (b"gimp xcf", "GIMP XCF"),
    (b"SIMPLE  =", "FITS"),
    (b"%PDF", "PDF"),
    (b"%!PS", "PostScript"),
    (b"\xc5\xd0\xd3\xc6", "EPS"),
    (b"FORM", "IFF/ILBM"),
)

_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


# --------------------------------------------------------------------------------------------
# Public types
# --------------------------------------------------------------------------------------------


class ImageRejected(Exception):
    """An upload we refuse. ``code`` is for machines, ``message`` for people."""

    code: str
    message: str

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class CancelledError(BaseException):
    """Raised by a cancel callback to stop work between stages.

    A BaseException (like asyncio.CancelledError): a stop is never a verdict on the file, so
    no ``except Exception`` error mapping anywhere may turn it into one."""


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

    @property
    def version(self) -> str:
        # encoder_threads is excluded: it changes speed, not the bytes we store.
        payload = {
            "rev": PIPELINE_REVISION,
            "widths": sorted(set(self.widths)),
            "avif_quality": self.avif_quality,
            "avif_speed": self.avif_speed,
            "webp_quality": self.webp_quality,
            "webp_method": self.webp_method,
        }
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def tier_widths(self, source_width: int) -> list[int]:
        if source_width < 1:
            raise ValueError("source_width must be positive")
        fit = sorted({w for w in self.widths if w <= source_width})
        # Never upscale; a tiny source gets exactly one tier at its own width.
        return fit or [source_width]


@dataclass(frozen=True)
class PhotoMetadata:
    width: int
    height: int
    format: str
    mime_type: str
    taken_at: datetime | None
    camera_make: str
    camera_model: str
    lens: str
    gps_latitude: float | None
    gps_longitude: float | None
    orientation: int


# --------------------------------------------------------------------------------------------
# Error mapping
# --------------------------------------------------------------------------------------------


def _pixels_message(width: int, height: int, max_pixels: int, what: str = "Image") -> str:
    return (
        f"{what} is {width}x{height} pixels ({width * height / 1e6:.1f} megapixels); "
        f"the limit is {max_pixels / 1e6:.1f} megapixels."
    )


def _check_pixels(width: int, height: int, max_pixels: int, what: str = "Image") -> None:
    if width < 1 or height < 1:
        raise ImageRejected("corrupt", f"{what} has an invalid size of {width}x{height} pixels.")
    if width * height > max_pixels:
        raise ImageRejected("too_many_pixels", _pixels_message(width, height, max_pixels, what))


@contextmanager
def _decoder_errors(stage: str, kind: str | None) -> Iterator[None]:
    """Map anything Pillow/pillow-heif/zlib throws to ImageRejected.

    stage is "open" (header parsing) or "decode" (pixel data). A file whose header cannot even
    be parsed is "corrupt"; running out of data while decoding pixels is "truncated".
    """
    label = _LABELS.get(kind or "", "image")
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check replaces Pillow's DecompressionBombWarning; other
            # decoder warnings (odd EXIF etc.) are not the uploader's problem.
            warnings.simplefilter("ignore")
            yield
    except (ImageRejected, CancelledError):
        raise
    except Image.DecompressionBombError as exc:
        raise ImageRejected(
            "too_many_pixels",
            f"The {label} file declares an enormous image (a decompression bomb); "
            "it was not decoded.",
        ) from exc
    except MemoryError as exc:
        raise ImageRejected(
            "too_many_pixels", f"The {label} file needs more memory to decode than allowed."
        ) from exc
    except Exception as exc:
        text = str(exc).lower()
        if isinstance(exc, Image.UnidentifiedImageError) and kind is None:
            raise ImageRejected("not_an_image", "The file is not an image.") from exc
        if "max_text_chunk" in text or "decompressed data too large" in text:
            raise ImageRejected(
                "corrupt",
                f"The {label} file has a compressed text chunk that expands to an unreasonable "
                "size (a decompression bomb).",
            ) from exc
        if stage == "decode" and (
            "truncated" in text or "premature end" in text or isinstance(exc, EOFError)
        ):
            raise ImageRejected(
                "truncated",
                f"The {label} file is truncated: its image data ends before the picture is "
                "complete. Please upload the whole file again.",
            ) from exc
        raise ImageRejected(
            "corrupt", f"The {label} file is damaged and cannot be decoded."
        ) from exc


# --------------------------------------------------------------------------------------------
# Content sniffing and structural checks (run before Pillow sees the bytes)
# --------------------------------------------------------------------------------------------


def _isobmff_brands(data: bytes) -> set[bytes]:
    size = struct.unpack(">I", data[:4])[0]
    end = min(max(size, 16), len(data), 4096)
    brands = {data[8:12]}
    brands.update(data[i : i + 4] for i in range(16, end - 3, 4))
    return brands


def _sniff(data: bytes) -> str:
    head = data[:64]
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[1:8] == b"PNG\r\n\x1a\n" or head[:4] == b"\x89PNG":
        raise ImageRejected("corrupt", "The PNG file's signature is damaged.")
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        if head[:4] == b"II*\x00" and head[8:10] == b"CR":
            raise ImageRejected("unsupported_format", "Canon RAW (CR2) files are not supported.")
        return "TIFF"
    if head[:4] in (b"II+\x00", b"MM\x00+"):
        raise ImageRejected("unsupported_format", "BigTIFF files are not supported.")
    if len(head) >= 12 and head[4:8] == b"ftyp":
        brands = _isobmff_brands(data)
        if brands & _AVIF_BRANDS and head[8:12] not in _HEIC_BRANDS:
            return "AVIF"
        if brands & _HEIF_BRANDS:
            return "HEIF"
        brand = head[8:12].decode("latin-1").strip()
        raise ImageRejected(
            "unsupported_format",
            f"Files of type '{brand}' (an ISO media container) are not supported; "
            "upload a JPEG, PNG, WebP, AVIF, HEIC, GIF or TIFF image.",
        )
    for magic, name in _OTHER_IMAGE_MAGIC:
        if head.startswith(magic):
            raise ImageRejected(
                "unsupported_format",
                f"{name} files are not supported; upload a JPEG, PNG, WebP, AVIF, HEIC, GIF "
                "or TIFF image.",
            )
    if re.match(rb"P[1-7]\s", head):
        raise ImageRejected("unsupported_format", "Netpbm (PBM/PGM/PPM) files are not supported.")
    stripped = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if stripped.startswith((b"<svg", b"<?xml")) and b"<svg" in data[:4096].lower():
        raise ImageRejected("unsupported_format", "SVG files are not supported.")
    raise ImageRejected("not_an_image", "The file is not an image in any format we recognise.")


def _check_png_chunks(data: bytes, max_pixels: int) -> None:
    """Walk the chunks: verify every CRC (Pillow skips IDAT's), size limits and completeness."""
    pos = 8
    n = len(data)
    seen_ihdr = seen_idat = False
    while True:
        if pos + 8 > n:
            raise ImageRejected(
                "truncated", "The PNG file is truncated: it ends before its final IEND chunk."
            )
        length, ctype = struct.unpack(">I4s", data[pos : pos + 8])
        if length > 0x7FFFFFFF or not ctype.isalpha():
            raise ImageRejected("corrupt", "The PNG file has a damaged chunk header.")
        end = pos + 12 + length
        if end > n:
            raise ImageRejected(
                "truncated", "The PNG file is truncated: a chunk runs past the end of the file."
            )
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[end - 4 : end])
        if zlib.crc32(body, zlib.crc32(ctype)) != crc:
            name = ctype.decode("ascii")
            raise ImageRejected(
                "corrupt", f"The PNG file is damaged: the checksum of its {name} chunk is wrong."
            )
        if not seen_ihdr:
            if ctype != b"IHDR" or length != 13:
                raise ImageRejected("corrupt", "The PNG file does not start with an IHDR chunk.")
            seen_ihdr = True
            width, height = struct.unpack(">II", body[:8])
            _check_pixels(width, height, max_pixels)
        elif ctype == b"IDAT":
            seen_idat = True
        elif ctype == b"fcTL" and length >= 20:
            # APNG frame: check its size too, without decoding anything.
            fw, fh, fx, fy = struct.unpack(">IIII", body[4:20])
            _check_pixels(fw, fh, max_pixels, "An animation frame")
            _check_pixels(max(fx + fw, 1), max(fy + fh, 1), max_pixels, "An animation frame")
        elif ctype == b"IEND":
            break
        pos = end
    if not seen_idat:
        raise ImageRejected("corrupt", "The PNG file contains no image data (no IDAT chunk).")


def _check_gif_frames(data: bytes, max_pixels: int) -> None:
    """Walk GIF blocks and check every frame's extent without decoding (bombs hide in frame 2)."""
    n = len(data)
    if n < 13:
        raise ImageRejected("truncated", "The GIF file is truncated.")
    sw, sh, flags = struct.unpack("<HHB", data[6:11])
    _check_pixels(sw, sh, max_pixels)
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    frames = 0

    def skip_sub_blocks(p: int) -> int:
        while p < n:
            size = data[p]
            p += 1 + size
            if size == 0:
                return p
        return n + 1  # ran off the end

    while pos < n:
        marker = data[pos]
        if marker == 0x3B:  # trailer
            break
        if marker == 0x21:  # extension
            pos = skip_sub_blocks(pos + 2)
        elif marker == 0x2C:  # image descriptor
            if pos + 10 > n:
                break
            x, y, w, h, fflags = struct.unpack("<HHHHB", data[pos + 1 : pos + 10])
            frames += 1
            _check_pixels(w, h, max_pixels, f"Frame {frames}")
            # Pillow grows the canvas to cover frames that stick out of the screen.
            _check_pixels(max(sw, x + w), max(sh, y + h), max_pixels, f"Frame {frames}")
            pos += 10
            if fflags & 0x80:
                pos += 3 << ((fflags & 7) + 1)
            pos = skip_sub_blocks(pos + 1)
        else:
            break  # junk after the last frame; Pillow ignores it too
    if frames == 0:
        raise ImageRejected("corrupt", "The GIF file contains no image.")


def _iter_boxes(data: bytes, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    pos = start
    while pos + 8 <= end:
        size, btype = struct.unpack(">I4s", data[pos : pos + 8])
        header = 8
        if size == 1:
            if pos + 16 > end:
                return
            size = struct.unpack(">Q", data[pos + 8 : pos + 16])[0]
            header = 16
        elif size == 0:
            size = end - pos
        if size < header or pos + size > end:
            return
        yield btype, pos + header, pos + size
        pos += size


def _check_isobmff_sizes(data: bytes, max_pixels: int) -> None:
    """Read every 'ispe' (image spatial extent) in meta/iprp/ipco: catches AVIF/HEIC bombs that
    the decoders refuse with an unhelpful "cannot identify"."""
    for btype, start, end in _iter_boxes(data, 0, len(data)):
        if btype != b"meta":
            continue
        for itype, istart, iend in _iter_boxes(data, start + 4, end):  # meta is a FullBox
            if itype != b"iprp":
                continue
            for ptype, pstart, pend in _iter_boxes(data, istart, iend):
                if ptype != b"ipco":
                    continue
                for ctype, cstart, cend in _iter_boxes(data, pstart, pend):
                    if ctype == b"ispe" and cend - cstart >= 12:
                        w, h = struct.unpack(">II", data[cstart + 4 : cstart + 12])
                        _check_pixels(w, h, max_pixels)


def _open(data: bytes, max_pixels: int) -> tuple[Image.Image, str]:
    kind = _sniff(data)
    with _decoder_errors("open", kind):
        if kind == "PNG":
            _check_png_chunks(data, max_pixels)
        elif kind == "GIF":
            _check_gif_frames(data, max_pixels)
        elif kind in ("AVIF", "HEIF"):
            _check_isobmff_sizes(data, max_pixels)
        im = Image.open(io.BytesIO(data), formats=_ACCEPTED[kind])
    try:
        _check_pixels(im.width, im.height, max_pixels)
        if im.format == "TIFF":
            _reject_raw_tiff(im)
    except ImageRejected:
        im.close()
        raise
    return im, kind


def _reject_raw_tiff(im: Image.Image) -> None:
    tags = getattr(im, "tag_v2", {})
    # DNG/NEF-style camera raw files are TIFF containers; Pillow would show a thumbnail or fail.
    if 50706 in tags or tags.get(262) in (32803, 34892):
        raise ImageRejected("unsupported_format", "Camera RAW files are not supported.")


def _check_frames(im: Image.Image, kind: str, max_pixels: int) -> None:
    """Check every frame's size. GIF/PNG were walked already; WebP/AVIF frames share one
    canvas. TIFF pages, MPO frames and HEIF images can differ, and seeking them is cheap.

    Never asks for ``n_frames``: for TIFF that walks the whole IFD chain, and a small file can
    hold tens of thousands of IFDs. Seeking one frame at a time stops at the limit."""
    if im.format not in ("TIFF", "MPO", "HEIF"):
        return
    with _decoder_errors("open", kind):
        frame = 0
        while True:
            try:
                im.seek(frame + 1)
            except EOFError:
                break  # that was the last frame
            frame += 1
            if frame >= _MAX_SEEK_FRAMES:
                raise ImageRejected(
                    "too_many_pixels",
                    f"The file holds more than {_MAX_SEEK_FRAMES} images; at most "
                    f"{_MAX_SEEK_FRAMES} are allowed.",
                )
            _check_pixels(im.width, im.height, max_pixels, f"Frame {frame + 1}")
        if frame:
            im.seek(0)


# --------------------------------------------------------------------------------------------
# Metadata helpers
# --------------------------------------------------------------------------------------------


def _raw_profile_bytes(text: Any) -> bytes | None:
    """Decode an ImageMagick "Raw profile type X" PNG text chunk, tolerating trailing junk."""
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    if not isinstance(text, str):
        return None
    lines = text.split("\n")
    if len(lines) < 4:
        return None
    try:
        length = int(lines[2].strip())
    except ValueError:
        return None
    hexdigits = "".join("".join(lines[3:]).split())[: 2 * length]
    try:
        return bytes.fromhex(hexdigits)
    except ValueError:
        return None


def _safe_exif(im: Image.Image) -> Image.Exif:
    """im.getexif(), but never raising: Pillow throws on some damaged EXIF (e.g. a bad PNG
    raw-profile chunk). Falls back to a lenient parse, then XMP orientation, then empty."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return im.getexif()
    except Exception:
        pass
    exif = Image.Exif()
    raw = _raw_profile_bytes(im.info.get("Raw profile type exif"))
    if raw:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                exif.load(raw[6:] if raw.startswith(b"Exif\x00\x00") else raw)
        except Exception:
            exif = Image.Exif()
    if ExifTags.Base.Orientation not in exif:
        xmp = (
            im.info.get("XML:com.adobe.xmp")
            or im.info.get("xmp")
            or _raw_profile_bytes(im.info.get("Raw profile type xmp"))
        )
        if isinstance(xmp, str):
            xmp = xmp.encode("utf-8", "replace")
        if isinstance(xmp, bytes):
            match = re.search(rb'tiff:Orientation(="|>)([0-9])', xmp)
            if match:
                exif[ExifTags.Base.Orientation] = int(match[2])
    return exif


def _orientation_from(exif: Mapping[int, Any]) -> int:
    try:
        value = exif.get(ExifTags.Base.Orientation, 1)
        if isinstance(value, tuple | list):
            value = value[0]
        value = int(value)
    except Exception:
        return 1
    return value if 1 <= value <= 8 else 1


def _safe_ifd(exif: Image.Exif, ifd: int) -> Mapping[int, Any]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return exif.get_ifd(ifd)
    except Exception:
        return {}


def _text(value: Any, limit: int = 255) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, tuple | list):
        return ""
    text = str(value).replace("\x00", " ")
    text = "".join(ch for ch in text if ch.isprintable())
    return " ".join(text.split())[:limit]


_DT_RE = re.compile(r"^\s*(\d{4})[:\-](\d{2})[:\-](\d{2})[ T](\d{2}):(\d{2}):(\d{2})")
_TZ_RE = re.compile(r"^\s*([+-])(\d{2}):?(\d{2})\s*$")


def _exif_datetime(value: Any, offset: Any = None, subsec: Any = None) -> datetime | None:
    match = _DT_RE.match(_text(value))
    if not match:
        return None
    try:
        dt = datetime(*(int(g) for g in match.groups()))
    except ValueError:  # "0000:00:00 00:00:00" and friends
        return None
    sub = _text(subsec)
    if sub.isdigit():
        dt = dt.replace(microsecond=int((sub + "000000")[:6]))
    tz_match = _TZ_RE.match(_text(offset))
    if tz_match:
        sign = -1 if tz_match[1] == "-" else 1
        delta = timedelta(hours=int(tz_match[2]), minutes=int(tz_match[3]))
        if delta <= timedelta(hours=14):
            return dt.replace(tzinfo=timezone(sign * delta)).astimezone(UTC)
    # No offset recorded: the camera clock's local time, stored as if it were UTC.
    return dt.replace(tzinfo=UTC)


def _dms_to_degrees(
    value: Any, ref: Any, positive: str, negative: str, limit: float
) -> float | None:
    if value is None:
        return None
    try:
        parts = [float(v) for v in value] if isinstance(value, tuple | list) else [float(value)]
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    if not 1 <= len(parts) <= 3 or not all(math.isfinite(p) and p >= 0 for p in parts):
        return None
    parts += [0.0] * (3 - len(parts))
    deg, minutes, seconds = parts
    if minutes > 60 or seconds > 60:
        return None
    result = deg + minutes / 60 + seconds / 3600
    ref_text = _text(ref).upper()[:1]
    if ref_text == negative:
        result = -result
    elif ref_text not in ("", positive):
        return None
    if not math.isfinite(result) or abs(result) > limit:
        return None
    return result


def gps_coordinates(gps: Mapping[int, Any]) -> tuple[float | None, float | None]:
    """(latitude, longitude) from an EXIF GPS IFD, or (None, None) if absent or invalid.

    Both must be valid; (0, 0) is what broken phones write when they have no fix.
    """
    try:
        lat = _dms_to_degrees(gps.get(2), gps.get(1), "N", "S", 90.0)
        lon = _dms_to_degrees(gps.get(4), gps.get(3), "E", "W", 180.0)
    except Exception:
        return None, None
    if lat is None or lon is None or (lat == 0 and lon == 0):
        return None, None
    return lat, lon


def _metadata(im: Image.Image, width: int, height: int) -> PhotoMetadata:
    exif = _safe_exif(im)
    orientation = _orientation_from(exif)
    if orientation >= 5:
        width, height = height, width
    try:
        return _describe(im, exif, width, height, orientation)
    except Exception:
        # Odd EXIF must never cost the upload: keep what is certain, drop the optional bits.
        return _describe(im, Image.Exif(), width, height, orientation)


def _describe(
    im: Image.Image, exif: Image.Exif, width: int, height: int, orientation: int
) -> PhotoMetadata:
    sub = _safe_ifd(exif, ExifTags.IFD.Exif)
    taken_at = _exif_datetime(
        sub.get(ExifTags.Base.DateTimeOriginal),
        sub.get(ExifTags.Base.OffsetTimeOriginal),
        sub.get(ExifTags.Base.SubsecTimeOriginal),
    ) or _exif_datetime(
        exif.get(ExifTags.Base.DateTime),
        sub.get(ExifTags.Base.OffsetTime),
        sub.get(ExifTags.Base.SubsecTime),
    )
    lat, lon = gps_coordinates(_safe_ifd(exif, ExifTags.IFD.GPSInfo))
    fmt = im.format or "UNKNOWN"
    mime = _MIME.get(fmt, "application/octet-stream")
    return PhotoMetadata(
        width=width,
        height=height,
        format=fmt,
        mime_type=mime,
        taken_at=taken_at,
        camera_make=_text(exif.get(ExifTags.Base.Make)),
        camera_model=_text(exif.get(ExifTags.Base.Model)),
        lens=_text(sub.get(ExifTags.Base.LensModel)),
        gps_latitude=lat,
        gps_longitude=lon,
        orientation=orientation,
    )


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


# --------------------------------------------------------------------------------------------
# Public: inspection
# --------------------------------------------------------------------------------------------


def inspect_image(data: bytes, *, max_pixels: int, max_bytes: int | None = None) -> PhotoMetadata:
    """Validate by content (never by extension) and read metadata. Raises ImageRejected."""
    if not data:
        raise ImageRejected("empty_file", "The file is empty.")
    if max_bytes is not None and len(data) > max_bytes:
        raise ImageRejected(
            "too_large",
            f"The file is {len(data) / 1e6:.1f} MB; the limit is {max_bytes / 1e6:.1f} MB.",
        )
    im, kind = _open(data, max_pixels)
    with im:
        _check_frames(im, kind, max_pixels)
        stored = im.size
        with _decoder_errors("decode", kind):
            if im.format in ("JPEG", "MPO"):
                # Validation pass at 1/8 scale: every entropy-coded byte is still parsed, so
                # truncation is caught, but memory is 1/64 of a full decode.
                im.draft(im.mode, (max(1, stored[0] // 8), max(1, stored[1] // 8)))
            im.load()
        return _metadata(im, *stored)


# --------------------------------------------------------------------------------------------
# Public: decoding to sRGB
# --------------------------------------------------------------------------------------------


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
    """Already in a mode _normalise_mode() returns unchanged (and that reduce() may average)."""
    return img.mode in _NORMAL_MODES and not (
        img.mode in ("L", "RGB") and "transparency" in img.info
    )


def _normalise_mode(img: Image.Image, grey_range: tuple[float, float] | None = None) -> Image.Image:
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


# Tile side for _normalise_reduced: converting a 512x512 tile (I;16 -> I -> F -> L, four
# copies at up to 4 B/px) takes a few MB, whatever the size of the frame.
_TILE_SIDE = 512


def _normalise_reduced(
    img: Image.Image, factor: int, check: Callable[[], None] | None = None
) -> Image.Image:
    """``_normalise_mode(img).reduce(factor)`` without a full-size converted copy.

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
            part = _normalise_mode(tile, grey_range)
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


def _to_srgb(img: Image.Image, icc: bytes | None) -> Image.Image:
    """Convert to sRGB RGB/RGBA. RGB->RGB profile transforms run in place (one fewer
    full-size copy), so the caller must own ``img``."""
    img = _normalise_mode(img)
    alpha = None
    if img.mode in ("LA", "RGBA"):
        alpha = img.getchannel("A")
        if alpha.getextrema()[0] == 255:
            alpha = None  # fully opaque alpha channel: drop it (smaller, faster encodes)
        img = img.convert(img.mode[:-1])
    transform = _srgb_transform(icc, img.mode) if icc else None
    if transform is not None and img.mode == "RGB":
        if img.readonly:  # e.g. memory-mapped: never write into the source buffer
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
    im, kind = _open(data, max_pixels)
    try:
        check()
        icc = im.info.get("icc_profile") or None
        stored_w, stored_h = im.size
        with _decoder_errors("decode", kind):
            if im.format in ("JPEG", "MPO"):
                # JPEG EXIF sits before the scan, so orientation is known before decoding.
                orientation = _orientation_from(_safe_exif(im))
                if target_width:
                    _jpeg_draft(im, target_width, orientation)
            im.load()
            if im.format not in ("JPEG", "MPO"):
                # PNG may carry eXIf after IDAT: read it only once the pixels are in.
                orientation = _orientation_from(_safe_exif(im))
            check()
            oriented_w = im.height if orientation >= 5 else im.width
            factor = 1
            if target_width and oriented_w >= 4 * target_width:
                # Cheap box reduction, keeping >= 2x the target so LANCZOS still has detail.
                factor = oriented_w // (2 * target_width)
            # Normalise the mode and reduce tile by tile: no full-size converted copy.
            img = _normalise_reduced(im, factor, check)
            check()
            if img is not im:
                im.close()  # free the full-size decode before the next copy
            # Colour first (in place for RGB), then rotate: at most two full-size buffers.
            img = _to_srgb(img, icc)
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


# --------------------------------------------------------------------------------------------
# Public: tiers, encoding, blurhash
# --------------------------------------------------------------------------------------------

# bench/bench_variants.py --cascade-check on the 18 corpus photos: cascading costs 0.0011 SSIM
# on average (worst 0.0023) against resizing every tier from the decoded source, well under
# the 0.005 budget, and renders the ladder 2-3x faster. False = every tier from the source.
_CASCADE = True


def render_tiers(img: Image.Image, widths: list[int]) -> Iterator[tuple[int, Image.Image]]:
    """Yield (width, image) smallest first; each tier is resized (LANCZOS) from the next larger
    one, which costs < 0.003 SSIM against resizing each from the source (bench --cascade-check)
    and is 2-3x faster.

    Heights follow the source aspect recorded by decode_for_variants (else img.size):
    round(w * H / W), at least 1. A tier as wide as img is img itself. All tiers exist before
    the first is yielded (the cascade needs the big ones first), but each is released once
    yielded, so by the time the largest (most memory-hungry) tier is encoded the smaller ones
    are gone; drop your own reference to img before iterating and it is freed too.
    """
    src_w, src_h = img.info.get(SOURCE_SIZE_KEY, img.size)
    ordered = sorted(set(widths), reverse=True)
    if ordered and ordered[0] > img.width:
        raise ValueError(f"tier {ordered[0]} is wider than the decoded image ({img.width})")
    pending: list[tuple[int, Image.Image]] = []  # largest first, so pop() gives the smallest
    current = img
    for w in ordered:
        h = max(1, round(w * src_h / src_w))
        base = current if _CASCADE else img
        tier = base if base.size == (w, h) else base.resize((w, h), Image.Resampling.LANCZOS)
        pending.append((w, tier))
        current = tier
    del img, current, base  # only the tiers stay alive
    while pending:
        yield pending.pop()


def default_encoder_threads(workers: int | None = None) -> int:
    """Threads per AVIF encode so that N workers on N cores do not oversubscribe."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, cpus // max(1, workers or 1))


def encode_variant(img: Image.Image, fmt: str, recipe: VariantRecipe) -> bytes:
    """Encode one tier as AVIF or WebP, with no EXIF/XMP/ICC (pixels are already sRGB)."""
    if img.mode not in ("RGB", "RGBA"):
        img = img.convert("RGBA" if img.has_transparency_data else "RGB")
    buf = io.BytesIO()
    if fmt == "avif":
        threads = recipe.encoder_threads or default_encoder_threads()
        img.save(
            buf,
            "AVIF",
            quality=recipe.avif_quality,
            speed=recipe.avif_speed,
            max_threads=threads,
            # libaom's row-based multithreading makes the bitstream depend on the thread count
            # for tall frames (2560x3413: 1 thread != 2); tile threading does not. Keys are
            # immutable and the thread count is not in them, so the bytes must not vary.
            advanced={"row-mt": "0"},
            icc_profile=b"",
            exif=b"",
            xmp=b"",
        )
    elif fmt == "webp":
        img.save(
            buf,
            "WEBP",
            quality=recipe.webp_quality,
            method=recipe.webp_method,
            icc_profile=b"",
            exif=b"",
            xmp=b"",
        )
    else:
        raise ValueError(f"unknown variant format {fmt!r}; expected one of {FORMATS}")
    return buf.getvalue()


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
    for fmt in FORMATS:
        try:
            if not encode_variant(probe, fmt, recipe):
                raise ValueError("the encoder wrote nothing")
        except Exception as exc:
            label = "WebP" if fmt == "webp" else fmt.upper()
            problems.append(
                f"This Pillow ({Image.__version__}) cannot encode {label} "
                f"({type(exc).__name__}: {exc}), so no {label} variant can be made."
            )
    return tuple(problems)


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
