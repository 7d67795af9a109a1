"""Metadata of an original: EXIF (tolerant of damage), orientation, capture time, GPS, and the
validating ``inspect_image`` that reads them."""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from PIL import ExifTags, Image

from gallery.imaging.errors import ImageRejected, decoder_errors
from gallery.imaging.inputs import MIME_TYPES
from gallery.imaging.sniffing import check_frames, open_image


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


def safe_exif(im: Image.Image) -> Image.Exif:
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


def orientation_from(exif: Mapping[int, Any]) -> int:
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
    exif = safe_exif(im)
    orientation = orientation_from(exif)
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
    mime = MIME_TYPES.get(fmt, "application/octet-stream")
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


def inspect_image(data: bytes, *, max_pixels: int, max_bytes: int | None = None) -> PhotoMetadata:
    """Validate by content (never by extension) and read metadata. Raises ImageRejected."""
    if not data:
        raise ImageRejected("empty_file", "The file is empty.")
    if max_bytes is not None and len(data) > max_bytes:
        raise ImageRejected(
            "too_large",
            f"The file is {len(data) / 1e6:.1f} MB; the limit is {max_bytes / 1e6:.1f} MB.",
        )
    im, kind = open_image(data, max_pixels)
    with im:
        check_frames(im, kind, max_pixels)
        stored = im.size
        with decoder_errors("decode", kind):
            if im.format in ("JPEG", "MPO"):
                # Validation pass at 1/8 scale: every entropy-coded byte is still parsed, so
                # truncation is caught, but memory is 1/64 of a full decode.
                im.draft(im.mode, (max(1, stored[0] // 8), max(1, stored[1] // 8)))
            im.load()
        return _metadata(im, *stored)
