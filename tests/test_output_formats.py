"""Output formats are data (gallery.imaging.formats): each entry is what Pillow really writes,
and the recipe version follows the set of formats."""

from __future__ import annotations

import dataclasses
import io
import re

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


def test_recipe_version_is_unchanged_for_the_historic_formats(monkeypatch):
    # VariantRecipe().version on the starting commit (150dae3), before formats were data:
    # every stored set's key version is derived from it, so only a pixel change may move
    # it. Revision 2 (issue 14: the smallest tier from its own shrink-on-load decode) did,
    # on purpose; the formats data still hashes as before for revision 1.
    from gallery.imaging import variants

    assert variants.PIPELINE_REVISION == 2
    assert VariantRecipe().version == "50fc239ed05f"
    monkeypatch.setattr(variants, "PIPELINE_REVISION", 1)
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


@pytest.mark.django_db
def test_a_new_format_entry_flows_to_storage_pages_and_api(
    corpus, local_storage, monkeypatch, admin_client
):
    """Nothing outside the formats data names a format: with one more entry, generation,
    storage, the collector's key parser, the <picture> and the API all carry it."""
    from gallery.services import image_ingest, preprocess_image
    from gallery.storage import variant_key_parse
    from tests.variants_support import served_key

    path = corpus / "photos/flower_exif_icc.webp"  # 300 px wide: one tier at its own width
    image = image_ingest(data=path.read_bytes(), filename=path.name).image
    monkeypatch.setattr(formats, "OUTPUT_FORMATS", (JPEG, *OUTPUT_FORMATS))
    content_types = {}
    put = local_storage.put

    def recording_put(key, data, content_type):
        content_types[key.rsplit(".", 1)[-1]] = content_type
        return put(key, data, content_type)

    monkeypatch.setattr(local_storage, "put", recording_put)
    assert preprocess_image(image, local_storage).variants_ready

    image.refresh_from_db()
    assert image.serving_set.formats == ["jpeg", "avif", "webp"]
    assert content_types == {"jpeg": "image/jpeg", "avif": "image/avif", "webp": "image/webp"}
    key = served_key(image, width=300, fmt="jpeg")
    assert variant_key_parse(folder=local_storage.folder, key=key)["fmt"] == "jpeg"

    html = admin_client.get("/").content.decode()
    picture = html[html.index("<picture>") : html.index("</picture>")]
    assert re.findall(r'<source type="([^"]+)"', picture) == [
        "image/jpeg",
        "image/avif",
        "image/webp",
    ]
    assert '.webp" width="300"' in picture  # the <img> stays on the fallback format

    urls = admin_client.get(f"/api/v1/images/{image.pk}").json()["variants"]["serving"]["urls"]
    assert set(urls) == {"jpeg", "avif", "webp"}
    served = admin_client.get(urls["jpeg"]["300"])
    assert served.status_code == 200 and served["Content-Type"] == "image/jpeg"
    assert b"".join(served.streaming_content).startswith(b"\xff\xd8\xff")
