"""Pure image-processing core for the variant pipeline.

No Django, no database, no storage: bytes in, metadata / Pillow images / encoded bytes out.
Everything a decoder can throw becomes :class:`ImageRejected` (see ``errors``).

Rejection codes: empty_file, too_large (max_bytes), not_an_image, unsupported_format,
truncated, corrupt (incl. bad PNG CRCs and zTXt text bombs), too_many_pixels (any frame over
max_pixels, declared decompression bombs, > 1000 TIFF/MPO/HEIF frames).

Modules, in the order an original goes through them:

- ``inputs``: the source formats we accept (data);
- ``sniffing``: content sniffing and structural checks before Pillow decodes anything;
- ``metadata``: EXIF, orientation, capture time, GPS; ``inspect_image``;
- ``colour``: pixel modes and ICC/Lab/CMYK to sRGB;
- ``decode``: ``VariantSource`` (an original opened once, decoded per scale) and
  ``decode_for_variants``: upright sRGB pixels shrunk on load;
- ``formats``: the output formats (data: MIME, encoder options, ``<picture>`` order);
- ``variants``: the recipe, the tier ladder (``variant_tiers``: the smallest tier from its own
  small decode, the rest cascaded from one big decode), encoding (``TierEncoder``);
- ``quality``: content-adaptive quality (the per-image quality search, SSIMULACRA2);
- ``profile``: wall and CPU seconds per stage, for the benchmarks;
- ``blurhash``: the placeholder hash.
"""

from __future__ import annotations

import pillow_heif

from gallery.imaging.blurhash import compute_blurhash
from gallery.imaging.decode import SOURCE_SIZE_KEY, VariantSource, decode_for_variants
from gallery.imaging.errors import CancelledError, ImageRejected
from gallery.imaging.formats import (
    CONTENT_TYPES,
    FORMATS,
    OUTPUT_FORMATS,
    OutputFormat,
    fallback_format,
    format_names,
    output_format,
    output_formats,
    picture_formats,
)
from gallery.imaging.metadata import PhotoMetadata, gps_coordinates, inspect_image
from gallery.imaging.profile import StageTimes
from gallery.imaging.quality import QualityChoice, quality_choose, recipe_with_params
from gallery.imaging.variants import (
    PIPELINE_REVISION,
    TierEncoder,
    VariantRecipe,
    default_encoder_threads,
    encode_variant,
    encoder_problems,
    render_tiers,
    resize_lanczos,
    tier_height,
    variant_tiers,
)

# HEIC/HEIF is not built into Pillow; registering is idempotent.
pillow_heif.register_heif_opener()

__all__ = [
    "CONTENT_TYPES",
    "FORMATS",
    "OUTPUT_FORMATS",
    "PIPELINE_REVISION",
    "SOURCE_SIZE_KEY",
    "CancelledError",
    "ImageRejected",
    "OutputFormat",
    "PhotoMetadata",
    "QualityChoice",
    "StageTimes",
    "TierEncoder",
    "VariantRecipe",
    "VariantSource",
    "compute_blurhash",
    "decode_for_variants",
    "default_encoder_threads",
    "encode_variant",
    "encoder_problems",
    "fallback_format",
    "format_names",
    "gps_coordinates",
    "inspect_image",
    "output_format",
    "output_formats",
    "picture_formats",
    "quality_choose",
    "recipe_with_params",
    "render_tiers",
    "resize_lanczos",
    "tier_height",
    "variant_tiers",
]
