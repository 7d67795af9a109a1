"""Content-adaptive quality (issue 14 item 3): the search on one tier (easy images get a lower
quality than hard ones, within the bounds, deterministically), the recipe version, and the
pipeline: the chosen qualities are the set's params and in its key version, they are what the
objects were encoded with, a retry lands in the same set, and they never make an image stale;
the API and the admin show them."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from django.urls import reverse
from PIL import Image

from gallery.imaging import (
    VariantRecipe,
    VariantSource,
    encode_variant,
    quality,
    variant_tiers,
)
from gallery.imaging.quality import quality_choose, quality_search, recipe_with_params
from gallery.models import Image as Photo
from gallery.services import image_ingest, preprocess_image, variant_recipe_current
from gallery.variant_sets import variant_key_version
from tests.perms import grant
from tests.test_variant_sets import FailingFrom

SOURCE = "photos/webp_gallery_tree.webp"  # 1024 px wide: tiers 320..800, searched at 480
AUTO = VariantRecipe(quality_mode="auto", quality_target=70.0, quality_max_drop=2.0, encoder_threads=1)


def _smooth() -> Image.Image:
    """Soft gradients: an encoder keeps them at a low quality."""
    y, x = np.mgrid[0:360, 0:480].astype(np.float32)
    rgb = np.stack([x / 480 * 200 + 30, y / 360 * 180 + 40, 120 + 40 * np.sin(x / 90) * np.cos(y / 70)], axis=-1)
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8), "RGB")


def _noisy() -> Image.Image:
    """Fine random texture on a gradient: it needs a high quality to score well."""
    rng = np.random.default_rng(14)
    base = np.asarray(_smooth(), dtype=np.float32)
    texture = rng.normal(0, 28, size=base.shape[:2])[..., None]
    return Image.fromarray((base + texture).clip(0, 255).astype(np.uint8), "RGB")


def _bounds(recipe: VariantRecipe, fmt: str) -> tuple[int, int]:
    return getattr(recipe, f"{fmt}_quality_floor"), getattr(recipe, f"{fmt}_quality_ceiling")


# --- the search ----------------------------------------------------------------------------


def test_an_easy_image_gets_a_lower_quality_than_a_hard_one():
    easy, hard = quality_search(_smooth(), AUTO), quality_search(_noisy(), AUTO)
    for fmt in ("avif", "webp"):
        assert easy.qualities[fmt] < hard.qualities[fmt], (fmt, easy, hard)
        # Each meets its goal where a probe showed it; the hard one is raised to the target.
        assert easy.probes[fmt][easy.qualities[fmt]] >= easy.goals[fmt]
        assert hard.goals[fmt] == AUTO.quality_target
    # Never more than max_drop below what the fixed quality gives the easy image.
    assert easy.goals["avif"] == pytest.approx(easy.probes["avif"][AUTO.avif_quality] - AUTO.quality_max_drop)


def test_the_chosen_quality_stays_within_the_bounds():
    bounded = replace(AUTO, avif_quality_floor=45, avif_quality_ceiling=60, webp_quality_floor=65, webp_quality_ceiling=80)
    out_of_reach = quality_search(_noisy(), replace(bounded, quality_target=100.0))
    anything_goes = quality_search(_smooth(), replace(bounded, quality_target=-100.0, quality_max_drop=1000.0))
    for fmt in ("avif", "webp"):
        floor, ceiling = _bounds(bounded, fmt)
        assert out_of_reach.qualities[fmt] == ceiling
        assert anything_goes.qualities[fmt] == floor
        for choice in (out_of_reach, anything_goes):
            assert all(floor <= q <= ceiling for q in choice.probes[fmt])
            assert len(choice.probes[fmt]) <= quality.MAX_PROBES


def test_a_tier_too_small_to_score_keeps_the_fixed_qualities_within_the_bounds():
    tiny = Image.new("RGB", (5, 40), (90, 120, 200))  # SSIMULACRA2 needs 8 px on each side
    choice = quality_search(tiny, replace(AUTO, webp_quality_ceiling=70))
    assert choice.qualities == {"avif": AUTO.avif_quality, "webp": 70} and choice.probes == {}


def test_the_search_is_a_pure_function_of_the_pixels_and_the_recipe():
    first = quality_search(_noisy(), AUTO)
    again = quality_search(_noisy(), replace(AUTO, encoder_threads=2))  # threads change speed, not bytes
    assert (again.qualities, again.probes) == (first.qualities, first.probes)


def test_fixed_mode_searches_nothing_and_keeps_its_recipe_version(corpus):
    data = (corpus / SOURCE).read_bytes()
    assert quality_choose(data, recipe=VariantRecipe(), widths=[320, 640], max_pixels=10**8) is None
    # The search settings shape nothing in fixed mode: versions made before them stay valid.
    assert VariantRecipe(quality_target=50.0, avif_quality_floor=10).version == VariantRecipe().version
    assert AUTO.version != VariantRecipe().version
    for change in ({"quality_target": 72.0}, {"quality_max_drop": 1.0}, {"webp_quality_ceiling": 90}):
        assert replace(AUTO, **change).version != AUTO.version, change


# --- the pipeline ----------------------------------------------------------------------------


def _auto_image(corpus, settings) -> Photo:
    settings.PICSITE_QUALITY_MODE = "auto"
    settings.PICSITE_QUALITY_TARGET = 70.0
    path = corpus / SOURCE
    return image_ingest(data=path.read_bytes(), filename=path.name).image


def _serving(image: Photo):
    return Photo.objects.select_related("serving_set").get(pk=image.pk).serving_set


@pytest.mark.django_db(transaction=True)
def test_the_chosen_qualities_are_the_sets_params_its_key_version_and_its_bytes(corpus, settings, local_storage, variant_root):
    image = _auto_image(corpus, settings)
    preprocess_image(image, local_storage)
    vset = _serving(image)
    recipe = variant_recipe_current()
    chosen = vset.params["quality"]
    assert sorted(chosen) == ["avif", "webp"]
    for fmt, q in chosen.items():
        floor, ceiling = _bounds(recipe, fmt)
        assert floor <= q <= ceiling
    key = {"recipe_version": recipe.version, "storage_kind": "local", "folder": vset.folder}
    assert vset.key_version == variant_key_version(**key, params=vset.params) != variant_key_version(**key)
    assert vset.recipe_version == recipe.version  # the recipe records what the settings asked, not the choice
    # The objects are the tiers encoded at the chosen qualities.
    data = (corpus / SOURCE).read_bytes()
    with VariantSource(data, max_pixels=10**8) as source:  # the tiers as the pipeline makes them
        tiers = dict(variant_tiers(source, vset.widths))
    encode_with = recipe_with_params(recipe, vset.params)
    assert (encode_with.avif_quality, encode_with.webp_quality) == (chosen["avif"], chosen["webp"])
    for fmt in ("avif", "webp"):
        (stored,) = variant_root.rglob(f"*{vset.key_version}*_320.{fmt}")
        assert stored.read_bytes() == encode_variant(tiers[320], fmt, encode_with)


@pytest.mark.django_db(transaction=True)
def test_a_retry_chooses_the_same_qualities_and_resumes_the_same_set(corpus, settings, local_storage):
    image = _auto_image(corpus, settings)
    with pytest.raises(Exception):  # noqa: B017 - the injected upload failure, however it is mapped
        preprocess_image(image, FailingFrom(local_storage, 2))  # the 320 tier is stored, then a failure
    first = _serving(image)
    assert first.ready_widths == [320] and first.params["quality"]
    outcome = preprocess_image(image, local_storage)
    assert outcome.tiers_written == [480, 640, 800]
    assert _serving(image).pk == first.pk


@pytest.mark.django_db(transaction=True)
def test_the_chosen_qualities_never_make_an_image_stale(corpus, settings, local_storage, monkeypatch):
    from tasks import engine

    image = _auto_image(corpus, settings)
    preprocess_image(image, local_storage)
    vset = _serving(image)

    # Whatever the search would choose now, a complete set of the current recipe is current:
    # its key is checked against its own params and the search does not even run.
    def search_must_not_run(*args, **kwargs):
        raise AssertionError("the quality search ran for an image that is up to date")

    monkeypatch.setattr(quality, "quality_choose", search_must_not_run)
    monkeypatch.setattr("gallery.imaging.quality_choose", search_must_not_run)
    outcome = preprocess_image(image, local_storage)
    assert outcome.skipped and _serving(image).pk == vset.pk
    with pytest.raises(engine.EmptyScope):
        engine.create(task_key="preprocess-images", scope={"stale": True})
    # A change of the target is a new recipe: stale, as any recipe change.
    settings.PICSITE_QUALITY_TARGET = 75.0
    assert engine.preview_count(task_key="preprocess-images", scope={"stale": True}).count == 1


@pytest.mark.django_db(transaction=True)
def test_the_api_and_the_admin_show_the_chosen_qualities(corpus, settings, local_storage, client, staff_user):
    image = _auto_image(corpus, settings)
    preprocess_image(image, local_storage)
    chosen = _serving(image).params["quality"]
    grant(staff_user, "gallery.view_image")
    client.force_login(staff_user)
    serving = client.get(f"/api/v1/images/{image.pk}").json()["variants"]["serving"]
    assert serving["params"] == {"quality": chosen}
    page = client.get(reverse("admin:gallery_image_change", args=[image.pk])).content.decode()
    assert f"AVIF q{chosen['avif']}" in page and f"WebP q{chosen['webp']}" in page
