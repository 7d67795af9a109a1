"""Existing variants become each image's serving *legacy* set, without re-encoding.

Objects stored before variant sets have unversioned keys (``{folder}/{image_key}_{w}.{fmt}``);
they stay served (key version "") until a backfill replaces them. Widths cannot be recovered
from a recipe hash, so:

- where ``variants_recipe`` is the current recipe's version, the current ladder (capped at
  the image's width) is the set's tier list and ``ready_max_width`` says how far it got — one
  set-based INSERT per batch of ids;
- for other recipes the storage is asked (one listing of the image's key prefix); only
  widths whose every format is present are recorded, never an object the storage lacks. If
  the storage cannot be listed, those images get no set (placeholders) and stay "stale" for
  the next backfill.

Not atomic: each batch commits, and a re-run skips images that already have a serving set.
"""

import logging

from django.db import connection, migrations

logger = logging.getLogger(__name__)

BATCH = 50_000
FORMATS = ("avif", "webp")

_INSERT_CURRENT = """
INSERT INTO gallery_variantset
       (image_id, state, recipe_version, key_version, storage_kind, folder, widths, formats,
        ready_max_width, bytes, params, created_at, completed_at)
SELECT i.id, 'serving', i.variants_recipe, '', %(kind)s, %(folder)s,
       to_jsonb(CASE WHEN cardinality(l.ws) = 0 THEN ARRAY[i.width] ELSE l.ws END),
       %(formats)s::jsonb, i.ready_max_width, i.variants_bytes, '{}'::jsonb, now(),
       CASE WHEN i.variants_ready THEN now() END
  FROM gallery_image i
 CROSS JOIN LATERAL (SELECT coalesce(array_agg(w ORDER BY w), '{}'::int[]) AS ws
                       FROM unnest(%(ladder)s::int[]) AS w WHERE w <= i.width) AS l
 WHERE i.id > %(after)s AND i.id <= %(upto)s AND i.serving_set_id IS NULL
   AND i.deleted_at IS NULL AND i.ready_max_width > 0 AND i.variants_recipe = %(version)s
ON CONFLICT DO NOTHING
"""

_LINK = """
UPDATE gallery_image AS i SET serving_set_id = s.id
  FROM gallery_variantset AS s
 WHERE s.image_id = i.id AND s.key_version = '' AND i.serving_set_id IS NULL
   AND i.id > %(after)s AND i.id <= %(upto)s
"""

# What serves nothing now says so (placeholders; the default backfill scope regenerates it).
_RESET_UNSERVED = """
UPDATE gallery_image SET ready_max_width = 0, variants_ready = false
 WHERE serving_set_id IS NULL AND (ready_max_width > 0 OR variants_ready)
   AND id > %(after)s AND id <= %(upto)s
"""


def adopt_legacy_sets(apps, schema_editor):
    import json

    from gallery.services import variant_recipe_current
    from gallery.storage import VariantStorageNotConfigured, variant_store_resolve

    Image = apps.get_model("gallery", "Image")
    VariantSet = apps.get_model("gallery", "VariantSet")
    try:
        store = variant_store_resolve()
    except VariantStorageNotConfigured:
        return  # the pipeline is off: nothing was served, nothing to adopt
    recipe = variant_recipe_current()
    top = Image.objects.order_by("-id").values_list("id", flat=True).first() or 0
    params = {
        "kind": store.kind,
        "folder": store.folder,
        "formats": json.dumps(list(FORMATS)),
        "ladder": sorted(set(recipe.widths)),
        "version": recipe.version,
    }
    for after in range(0, top, BATCH):
        window = {**params, "after": after, "upto": after + BATCH}
        with connection.cursor() as cur:
            cur.execute(_INSERT_CURRENT, window)
            _adopt_other_recipes(Image, VariantSet, store, recipe.version, window)
            cur.execute(_LINK, window)
            cur.execute(_RESET_UNSERVED, window)


def _adopt_other_recipes(Image, VariantSet, store, version, window) -> None:
    from gallery.storage import variant_key_parse

    stale = (
        Image.objects.filter(id__gt=window["after"], id__lte=window["upto"], serving_set__isnull=True)
        .filter(deleted_at__isnull=True, ready_max_width__gt=0)
        .exclude(variants_recipe=version)
        .values_list("id", "image_key", "variants_recipe", "variants_bytes")
    )
    sets = []
    for image_id, image_key, recipe_version, variants_bytes in stale.iterator(chunk_size=2000):
        prefix = (f"{store.folder.strip('/')}/" if store.folder.strip("/") else "") + f"{image_key}_"
        try:
            found: dict[int, set[str]] = {}
            for obj in store.list(prefix):
                parts = variant_key_parse(folder=store.folder, key=obj.key)
                if parts and not parts["key_version"]:
                    found.setdefault(parts["width"], set()).add(parts["fmt"])
        except Exception as exc:  # unreachable storage: record nothing we cannot see
            logger.warning("could not list %s (%s): image %s gets no legacy set", prefix, exc, image_id)
            continue
        widths = sorted(w for w, fmts in found.items() if set(FORMATS) <= fmts)
        if not widths:
            continue
        sets.append(
            VariantSet(
                image_id=image_id, state="serving", recipe_version=recipe_version, key_version="",
                storage_kind=store.kind, folder=store.folder, widths=widths, formats=list(FORMATS),
                ready_max_width=widths[-1], bytes=variants_bytes,
            )
        )  # fmt: skip
    VariantSet.objects.bulk_create(sets, ignore_conflicts=True)
    for vset in sets:  # the mirror says what this set really holds
        Image.objects.filter(pk=vset.image_id).update(ready_max_width=vset.widths[-1], variants_ready=True)


class Migration(migrations.Migration):
    atomic = False

    dependencies = [("gallery", "0003_variant_sets")]

    operations = [migrations.RunPython(adopt_legacy_sets, migrations.RunPython.noop, elidable=True)]
