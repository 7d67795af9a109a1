"""Output formats are data (gallery.imaging.formats): each entry is what Pillow really writes,
and the recipe version follows the set of formats."""

from __future__ import annotations

import dataclasses
import io

import pytest
from PIL import Image

from gallery.imaging import formats
from gallery.imaging.formats import OUTPUT_FORMATS, OutputFormat, fallback_format, picture_formats
from gallery.imaging.variants import VariantRecipe, encode_variant

# A stand-in for a new format such as JPEG XL (which this Pillow cannot write): one entry.
JPEG = OutputFormat(
    name="jpeg",
    mime_type="image/jpeg",
    label="JPEG",
    pillow_format="JPEG",
    save_options=lambda recipe, threads: {"quality": 80},
)


def test_every_entry_is_what_pillow_writes():
    recipe_fields = {field.name for field in dataclasses.fields(VariantRecipe)}
    probe = Image.new("RGBA", (24, 16), (200, 40, 40, 128))
    for fmt in OUTPUT_FORMATS:
        data = encode_variant(probe, fmt.name, VariantRecipe(encoder_threads=1))
        with Image.open(io.BytesIO(data)) as written:
            assert written.format == fmt.pillow_format
            assert Image.MIME[written.format] == fmt.mime_type
        assert set(fmt.recipe_fields) <= recipe_fields, fmt.name
    assert len({fmt.name for fmt in OUTPUT_FORMATS}) == len(OUTPUT_FORMATS)
    assert [fmt.name for fmt in OUTPUT_FORMATS if fmt.fallback] == ["webp"]
    assert formats.FORMATS == formats.format_names() == ("avif", "webp")


def test_picture_order_and_fallback_come_from_the_data():
    assert [f.name for f in picture_formats(["webp", "avif", "gif"])] == ["avif", "webp"]
    assert fallback_format(["avif", "webp"]).name == "webp"
    assert fallback_format(["avif"]).name == "avif"  # no fallback in the set: its last format
    assert fallback_format(["gif"]) is None


def test_recipe_version_is_unchanged_for_the_historic_formats():
    # VariantRecipe().version on the starting commit (150dae3), before formats were data:
    # every stored set's key version is derived from it, so it must not move.
    assert VariantRecipe().version == "2866e01fd68c"


def test_adding_a_format_is_one_entry(monkeypatch):
    before = VariantRecipe().version
    monkeypatch.setattr(formats, "OUTPUT_FORMATS", (JPEG, *OUTPUT_FORMATS))
    # The new format is encoded, listed first, and every image is made again for it.
    data = encode_variant(Image.new("RGB", (8, 8), "blue"), "jpeg", VariantRecipe())
    assert data.startswith(b"\xff\xd8\xff")
    assert formats.format_names() == ("jpeg", "avif", "webp")
    assert VariantRecipe().version != before
    with pytest.raises(ValueError, match="unknown variant format 'gif'"):
        encode_variant(Image.new("RGB", (8, 8)), "gif", VariantRecipe())
