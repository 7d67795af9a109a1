"""The one exception type for bad uploads, and the mapping of decoder failures onto it.

Everything a decoder can throw is turned into :class:`ImageRejected` with a machine code and a
sentence a person can read, so callers only ever handle one exception type for bad uploads.

Thread notes: decoder warnings are silenced with warnings.catch_warnings(), which swaps a
process-global filter list; under threads that is harmless (a warning may print) but not
strictly isolated. Worker processes, not threads, are the intended way to parallelise.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from PIL import Image

from gallery.imaging.inputs import LABELS


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


def _pixels_message(width: int, height: int, max_pixels: int, what: str = "Image") -> str:
    return (
        f"{what} is {width}x{height} pixels ({width * height / 1e6:.1f} megapixels); "
        f"the limit is {max_pixels / 1e6:.1f} megapixels."
    )


def check_pixels(width: int, height: int, max_pixels: int, what: str = "Image") -> None:
    if width < 1 or height < 1:
        raise ImageRejected("corrupt", f"{what} has an invalid size of {width}x{height} pixels.")
    if width * height > max_pixels:
        raise ImageRejected("too_many_pixels", _pixels_message(width, height, max_pixels, what))


@contextmanager
def decoder_errors(stage: str, kind: str | None) -> Iterator[None]:
    """Map anything Pillow/pillow-heif/zlib throws to ImageRejected.

    stage is "open" (header parsing) or "decode" (pixel data). A file whose header cannot even
    be parsed is "corrupt"; running out of data while decoding pixels is "truncated".
    """
    label = LABELS.get(kind or "", "image")
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
