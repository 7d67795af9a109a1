"""The output formats of the variants, as data: one entry a format.

An entry says what the pipeline, the storage, the pages and the API need to know of a format:
its name (the file extension of its keys), MIME type, label, Pillow writer, the save options a
recipe gives it, which recipe settings shape its bytes, and whether it is the fallback every
browser decodes. ``OUTPUT_FORMATS`` is in ``<picture>`` order: browsers take the first
``<source>`` they support, so the format with the smallest files goes first.

Adding a format (say JPEG XL) is one entry here, with an options function if Pillow needs
special ones (and a recipe field plus its setting where a knob should be tunable). The set of
formats is part of the recipe version, so every image is generated again with the new one.
The code reads the entries at call time through the functions below; ``FORMATS`` and
``CONTENT_TYPES`` are snapshots for scripts and tests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gallery.imaging.variants import VariantRecipe

# (recipe, encoder threads) -> keyword arguments of Image.save, beside the format name and
# the metadata-stripping ones every format gets.
SaveOptions = Callable[["VariantRecipe", int], dict[str, Any]]


@dataclass(frozen=True)
class OutputFormat:
    name: str  # key/file extension and the name used everywhere else ("avif")
    mime_type: str
    label: str  # for people ("WebP")
    pillow_format: str  # Pillow's writer ("WEBP")
    save_options: SaveOptions
    # VariantRecipe fields that shape this format's bytes: part of the recipe version. Fixed
    # options in save_options are not: changing one needs a PIPELINE_REVISION bump.
    recipe_fields: tuple[str, ...] = ()
    # The <img src> of a <picture> and the thumbnail: a format every browser decodes.
    fallback: bool = False
    # Content-adaptive quality (``quality``): the recipe field the search sets per image, and
    # the recipe fields of its (floor, ceiling). None: the format has no quality knob.
    quality_field: str | None = None
    quality_bounds: tuple[str, str] | None = None


def _avif_options(recipe: VariantRecipe, threads: int) -> dict[str, Any]:
    return {
        "quality": recipe.avif_quality,
        "speed": recipe.avif_speed,
        "max_threads": threads,
        # libaom's row-based multithreading makes the bitstream depend on the thread count
        # for tall frames (2560x3413: 1 thread != 2); tile threading does not. Keys are
        # immutable and the thread count is not in them, so the bytes must not vary.
        "advanced": {"row-mt": "0"},
    }


def _webp_options(recipe: VariantRecipe, threads: int) -> dict[str, Any]:
    return {"quality": recipe.webp_quality, "method": recipe.webp_method}


# fmt: off
OUTPUT_FORMATS: tuple[OutputFormat, ...] = (
    #            name    MIME type     label   Pillow  save options   recipe fields                 fallback
    OutputFormat("avif", "image/avif", "AVIF", "AVIF", _avif_options, ("avif_quality", "avif_speed"),
                 quality_field="avif_quality", quality_bounds=("avif_quality_floor", "avif_quality_ceiling")),
    OutputFormat("webp", "image/webp", "WebP", "WEBP", _webp_options, ("webp_quality", "webp_method"), True,
                 quality_field="webp_quality", quality_bounds=("webp_quality_floor", "webp_quality_ceiling")),
)
# fmt: on

# The formats of every recipe version made before formats were data: implied, not hashed.
LEGACY_FORMATS = ("avif", "webp")


def output_formats() -> tuple[OutputFormat, ...]:
    """The formats every variant set is made in, in ``<picture>`` order."""
    return OUTPUT_FORMATS


def format_names() -> tuple[str, ...]:
    return tuple(fmt.name for fmt in output_formats())


def output_format(name: str) -> OutputFormat:
    for fmt in output_formats():
        if fmt.name == name:
            return fmt
    raise ValueError(f"unknown variant format {name!r}; expected one of {format_names()}")


def picture_formats(names: Iterable[str]) -> list[OutputFormat]:
    """The known formats among ``names`` (say a variant set's), in ``<picture>`` order."""
    wanted = set(names)
    return [fmt for fmt in output_formats() if fmt.name in wanted]


def fallback_format(names: Iterable[str]) -> OutputFormat | None:
    """The format of a ``<picture>``'s ``<img src>`` among ``names``: the fallback one, else
    the last in ``<picture>`` order; None when none is known."""
    known = picture_formats(names)
    return next((fmt for fmt in known if fmt.fallback), known[-1] if known else None)


# Snapshots taken at import, for scripts and tests.
FORMATS: tuple[str, ...] = format_names()
CONTENT_TYPES: dict[str, str] = {fmt.name: fmt.mime_type for fmt in OUTPUT_FORMATS}
