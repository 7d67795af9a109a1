"""What an image advertises, for tests: the keys of its serving set's ready tiers; and the
decodes and puts of a generation, in order."""

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


class PipelineEvents:
    """Pixel decodes and variant puts, in the order they happen (install with ``install``).

    A decode is a Pillow load that ran a decoder: ("decode", format, decoded size); a put is
    ("put", "<width>.<format>") for a LocalVariantStore put. ``on_decode`` (optional) runs at
    each decode, before the pixels are read.
    """

    def __init__(self):
        self.log: list[tuple] = []
        self.on_decode = None

    def install(self, monkeypatch) -> PipelineEvents:
        from PIL import ImageFile

        from gallery.storage import LocalVariantStore

        real_load, real_put = ImageFile.ImageFile.load, LocalVariantStore.put
        events = self

        def load(im):
            if im.tile:
                events.log.append(("decode", im.format, im.size))
                if events.on_decode is not None:
                    events.on_decode(im)
            return real_load(im)

        def put(store, key, data, content_type):
            events.log.append(("put", key.rsplit("_", 1)[-1]))
            return real_put(store, key, data, content_type)

        monkeypatch.setattr(ImageFile.ImageFile, "load", load)
        monkeypatch.setattr(LocalVariantStore, "put", put)
        return self

    def decodes(self) -> list[tuple]:
        return [event[1:] for event in self.log if event[0] == "decode"]
