"""Content sniffing and structural checks, run before Pillow sees the bytes.

The kind of a file comes from its content, never its name. PNG chunks, GIF blocks and the
ISO-BMFF boxes of AVIF/HEIC are walked without decoding, so bombs and damage are refused
with a clear reason before any pixel buffer exists.
"""

from __future__ import annotations

import io
import re
import struct
import zlib
from collections.abc import Iterator

from PIL import Image

from gallery.imaging.errors import ImageRejected, check_pixels, decoder_errors
from gallery.imaging.inputs import ACCEPTED

# Formats where checking every frame means seeking with Pillow (cheap: no pixel decode).
# GIF and PNG frames are checked by our own chunk/block walkers instead.
MAX_SEEK_FRAMES = 1000

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
            check_pixels(width, height, max_pixels)
        elif ctype == b"IDAT":
            seen_idat = True
        elif ctype == b"fcTL" and length >= 20:
            # APNG frame: check its size too, without decoding anything.
            fw, fh, fx, fy = struct.unpack(">IIII", body[4:20])
            check_pixels(fw, fh, max_pixels, "An animation frame")
            check_pixels(max(fx + fw, 1), max(fy + fh, 1), max_pixels, "An animation frame")
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
    check_pixels(sw, sh, max_pixels)
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
            check_pixels(w, h, max_pixels, f"Frame {frames}")
            # Pillow grows the canvas to cover frames that stick out of the screen.
            check_pixels(max(sw, x + w), max(sh, y + h), max_pixels, f"Frame {frames}")
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
                        check_pixels(w, h, max_pixels)


def open_image(data: bytes, max_pixels: int) -> tuple[Image.Image, str]:
    kind = _sniff(data)
    with decoder_errors("open", kind):
        if kind == "PNG":
            _check_png_chunks(data, max_pixels)
        elif kind == "GIF":
            _check_gif_frames(data, max_pixels)
        elif kind in ("AVIF", "HEIF"):
            _check_isobmff_sizes(data, max_pixels)
        im = Image.open(io.BytesIO(data), formats=ACCEPTED[kind])
    try:
        check_pixels(im.width, im.height, max_pixels)
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


def check_frames(im: Image.Image, kind: str, max_pixels: int) -> None:
    """Check every frame's size. GIF/PNG were walked already; WebP/AVIF frames share one
    canvas. TIFF pages, MPO frames and HEIF images can differ, and seeking them is cheap.

    Never asks for ``n_frames``: for TIFF that walks the whole IFD chain, and a small file can
    hold tens of thousands of IFDs. Seeking one frame at a time stops at the limit."""
    if im.format not in ("TIFF", "MPO", "HEIF"):
        return
    with decoder_errors("open", kind):
        frame = 0
        while True:
            try:
                im.seek(frame + 1)
            except EOFError:
                break  # that was the last frame
            frame += 1
            if frame >= MAX_SEEK_FRAMES:
                raise ImageRejected(
                    "too_many_pixels",
                    f"The file holds more than {MAX_SEEK_FRAMES} images; at most "
                    f"{MAX_SEEK_FRAMES} are allowed.",
                )
            check_pixels(im.width, im.height, max_pixels, f"Frame {frame + 1}")
        if frame:
            im.seek(0)
