"""What an image advertises, for tests: the keys of its serving set's ready tiers."""

from __future__ import annotations

from gallery.models import Image
from gallery.variant_sets import variant_set_keys


def served_keys(image: Image) -> list[str]:
    """Keys of the ready tiers of the image's serving set ([] when it serves nothing)."""
    image = Image.objects.select_related("serving_set").get(pk=image.pk)
    vset = image.serving_set
    if vset is None:
        return []
    vset.image = image
    return variant_set_keys(vset, ready_only=True)


def served_key(image: Image, *, width: int, fmt: str) -> str:
    """The serving set's key of one tier (whether or not it is ready)."""
    image = Image.objects.select_related("serving_set").get(pk=image.pk)
    vset = image.serving_set
    vset.image = image
    (key,) = [k for k in variant_set_keys(vset) if k.endswith(f"_{width}.{fmt}")]
    return key


def serve_set(image: Image, *, ready_max_width: int, key_version: str = "", folder: str = "gallery") -> Image:
    """Make ``image`` serve a set of the current ladder (legacy keys unless ``key_version``),
    ready up to ``ready_max_width``: what a finished generation leaves, without objects."""
    from gallery.models import VariantSet
    from gallery.services import variant_recipe_current

    recipe = variant_recipe_current()
    widths = recipe.tier_widths(image.width)
    vset = VariantSet.objects.create(
        image=image, state="serving", recipe_version=recipe.version, key_version=key_version,
        storage_kind="local", folder=folder, widths=widths, formats=["avif", "webp"],
        ready_max_width=ready_max_width,
    )  # fmt: skip
    Image.objects.filter(pk=image.pk).update(
        serving_set=vset, ready_max_width=ready_max_width, variants_recipe=recipe.version,
        variants_ready=ready_max_width >= widths[-1],
    )  # fmt: skip
    image.refresh_from_db()
    return image
