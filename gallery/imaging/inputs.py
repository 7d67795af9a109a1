"""The source formats we accept, as data: what a sniffed kind may be opened as, what to call
it in messages, and the MIME type recorded for the original."""

from __future__ import annotations

ACCEPTED = {
    # sniffed kind -> Pillow formats to try, in order
    "JPEG": ["JPEG", "MPO"],
    "PNG": ["PNG"],
    "GIF": ["GIF"],
    "WEBP": ["WEBP"],
    "TIFF": ["TIFF"],
    "AVIF": ["AVIF", "HEIF"],
    "HEIF": ["HEIF", "AVIF"],
}

LABELS = {
    "JPEG": "JPEG",
    "MPO": "JPEG",
    "PNG": "PNG",
    "GIF": "GIF",
    "WEBP": "WebP",
    "TIFF": "TIFF",
    "AVIF": "AVIF",
    "HEIF": "HEIC/HEIF",
}

MIME_TYPES = {
    "JPEG": "image/jpeg",
    "MPO": "image/jpeg",  # an MPO is a JPEG with extra frames; browsers treat it as one
    "PNG": "image/png",
    "GIF": "image/gif",
    "WEBP": "image/webp",
    "TIFF": "image/tiff",
    "AVIF": "image/avif",
    "HEIF": "image/heif",
}
