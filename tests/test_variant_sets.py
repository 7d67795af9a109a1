"""Versioned variant sets on real storage: a new image serves its tiers as they land; a new
recipe builds a candidate beside the serving set and switches in only once complete; a
failed or forced regeneration never blanks an image; the recipe going back revives the old
set; deletes remove every set; the legacy migration adopts unversioned objects; and
``GET /api/v1/images/<id>`` shows the sets. (The suite's integrity audit also checks, after
every commit that changes what an image advertises, that each advertised object exists.)"""

from __future__ import annotations

import threading

import pytest
from django.db import connection

from gallery.models import Image, VariantSet, VariantSetState
from gallery.services import (
    image_ingest,
    image_soft_delete,
    preprocess_image,
    variant_recipe_current,
)
from gallery.storage import VariantStorageError, variant_key
from gallery.variant_sets import variant_set_keys
from tests.perms import grant
from tests.variants_support import served_keys

pytestmark = pytest.mark.django_db(transaction=True)

SOURCE = "photos/webp_gallery_tree.webp"  # 1024 px wide: tiers 320, 480, 640, 800


def _ingest(corpus, rel: str = SOURCE) -> Image:
    path = corpus / rel
    return image_ingest(data=path.read_bytes(), filename=path.name).image


def _serving(image: Image) -> VariantSet | None:
    return Image.objects.select_related("serving_set").get(pk=image.pk).serving_set


class PauseAtTier:
    """A cancel callback that blocks once, when the target set has stored ``tiers`` tiers,
    and records what the image served at that moment."""

    def __init__(self, image: Image, *, tiers: int = 1, target: VariantSet | None = None):
        self.image, self.tiers, self.target = image, tiers, target
        self.after = VariantSet.objects.filter(image_id=image.pk).order_by("-id").values_list("id", flat=True).first() or 0
        self.paused, self.resume = threading.Event(), threading.Event()
        self.seen: dict | None = None

    def __call__(self) -> None:
        if self.seen is not None:
            return
        if self.target is not None:  # a set that already exists (a repair)
            newest = VariantSet.objects.get(pk=self.target.pk)
        else:  # the set this generation creates
            newest = VariantSet.objects.filter(image_id=self.image.pk, id__gt=self.after).order_by("-id").first()
        if newest is not None and len(newest.ready_widths) >= self.tiers:
            image = Image.objects.select_related("serving_set").get(pk=self.image.pk)
            self.seen = {
                "serving_id": image.serving_set_id,
                "serving_ready": image.serving_set.ready_widths if image.serving_set else [],
                "newest_id": newest.pk,
                "newest_state": newest.state,
                "keys": served_keys(image),
            }
            self.paused.set()
            assert self.resume.wait(60)


def _in_thread(fn, *args, **kwargs) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def target() -> None:
        try:
            result["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - inspected by the test
            result["error"] = exc
        finally:
            connection.close()

    thread = threading.Thread(target=target)
    thread.start()
    return thread, result


class FailingFrom:
    """A real store whose puts fail from the ``position``-th on (0-based)."""

    def __init__(self, inner, position: int):
        self.inner, self.position, self.calls = inner, position, 0
        self.kind, self.folder = inner.kind, inner.folder

    def put(self, key, data, content_type):
        index, self.calls = self.calls, self.calls + 1
        if index >= self.position:
            raise VariantStorageError(f"injected failure at put #{index}")
        return self.inner.put(key, data, content_type)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_new_image_serves_its_tiers_as_they_land(corpus, local_storage):
    image = _ingest(corpus)
    pause = PauseAtTier(image, tiers=1)
    worker, result = _in_thread(preprocess_image, image, local_storage, pause)
    assert pause.paused.wait(60), result
    assert pause.seen["newest_state"] == VariantSetState.SERVING  # nothing to keep serving: it is served
    assert pause.seen["serving_id"] == pause.seen["newest_id"] and pause.seen["serving_ready"] == [320]
    pause.resume.set()
    worker.join(60)
    vset = _serving(image)
    assert vset.is_complete and vset.widths == [320, 480, 640, 800] and vset.completed_at
    assert all(local_storage.exists(key) for key in served_keys(image))


def test_a_new_recipe_is_built_beside_the_serving_set_and_switched_in_when_complete(corpus, local_storage, settings):
    image = _ingest(corpus)
    preprocess_image(image, local_storage)
    old = _serving(image)
    old.image = image
    old_keys = variant_set_keys(old)
    settings.PICSITE_AVIF_QUALITY = 40  # a new recipe version
    pause = PauseAtTier(image, tiers=2)
    worker, result = _in_thread(preprocess_image, image, local_storage, pause)
    assert pause.paused.wait(60), result
    # Half-built: the candidate is not advertised; the old set is, whole.
    assert pause.seen["newest_state"] == VariantSetState.CANDIDATE and pause.seen["newest_id"] != old.pk
    assert pause.seen["serving_id"] == old.pk and pause.seen["serving_ready"] == [320, 480, 640, 800]
    assert sorted(pause.seen["keys"]) == sorted(old_keys)
    pause.resume.set()
    worker.join(60)
    new = _serving(image)
    assert new.pk == pause.seen["newest_id"] and new.is_complete and new.state == VariantSetState.SERVING
    assert new.recipe_version == variant_recipe_current().version != old.recipe_version
    old.refresh_from_db()
    assert old.state == VariantSetState.SUPERSEDED and old.superseded_at is not None
    new.image = image
    assert not set(variant_set_keys(new)) & set(old_keys)  # a new version never reuses a key
    assert all(local_storage.exists(key) for key in old_keys)  # old URLs answer until the collector's grace


def test_a_failed_regeneration_keeps_serving_the_old_set(corpus, local_storage, settings):
    """A recipe change used to reset ready_max_width to 0 before the original was even
    fetched: one failed regeneration left the image blank."""
    image = _ingest(corpus)
    preprocess_image(image, local_storage)
    old = _serving(image)
    settings.PICSITE_AVIF_QUALITY = 40
    with pytest.raises(Exception):  # noqa: B017 - the upload failure, whichever way it is mapped
        preprocess_image(image, FailingFrom(local_storage, 3))
    image.refresh_from_db()
    assert image.serving_set_id == old.pk and image.variants_ready and image.ready_max_width == 800
    candidate = VariantSet.objects.get(image=image, state=VariantSetState.CANDIDATE)
    assert candidate.ready_widths == [320]  # kept for the retry, never advertised
    outcome = preprocess_image(image, local_storage)  # the retry resumes the candidate
    assert outcome.tiers_written == [480, 640, 800]
    assert _serving(image).pk == candidate.pk


def test_a_forced_run_never_blanks_the_image(corpus, local_storage):
    """A forced run used to reset ready_max_width to 0 before fetching the original."""
    image = _ingest(corpus)
    preprocess_image(image, local_storage)
    serving = _serving(image)
    pause = PauseAtTier(image, tiers=1, target=serving)  # the serving set is the target
    worker, result = _in_thread(preprocess_image, image, local_storage, pause, force=True)
    assert pause.paused.wait(60), result
    assert pause.seen["serving_id"] == serving.pk and pause.seen["serving_ready"] == [320, 480, 640, 800]
    pause.resume.set()
    worker.join(60)
    assert "error" not in result and _serving(image).pk == serving.pk


def test_going_back_to_a_recipe_revives_its_set_without_rewriting_it(corpus, local_storage, settings):
    image = _ingest(corpus)
    preprocess_image(image, local_storage)
    first = _serving(image)
    settings.PICSITE_AVIF_QUALITY = 40
    preprocess_image(image, local_storage)
    settings.PICSITE_AVIF_QUALITY = 55  # back to the first recipe
    outcome = preprocess_image(image, local_storage)
    assert _serving(image).pk == first.pk and outcome.objects_written == 0  # every object was still there
    states = dict(VariantSet.objects.filter(image=image).values_list("pk", "state"))
    assert sorted(states.values()) == [VariantSetState.SERVING, VariantSetState.SUPERSEDED]


def test_stale_means_the_serving_set_was_made_with_another_recipe(corpus, local_storage, settings):
    from tasks import engine

    image = _ingest(corpus)
    preprocess_image(image, local_storage)
    with pytest.raises(engine.EmptyScope):
        engine.create(task_key="preprocess-images", scope={"stale": True})
    settings.PICSITE_WEBP_QUALITY = 70
    assert engine.preview_count(task_key="preprocess-images", scope={"stale": True}).count == 1
    preprocess_image(image, local_storage)
    assert engine.preview_count(task_key="preprocess-images", scope={"stale": True}).count == 0


def test_soft_delete_removes_every_set(corpus, local_storage, settings, variant_root):
    image = _ingest(corpus)
    preprocess_image(image, local_storage)
    settings.PICSITE_AVIF_QUALITY = 40
    preprocess_image(image, local_storage)  # now a serving and a superseded set
    assert VariantSet.objects.filter(image=image).count() == 2
    image_soft_delete(image=image)
    assert not VariantSet.objects.filter(image=image).exists()
    digest = image.image_key.removeprefix("variants/")
    assert [p for p in variant_root.rglob(f"{digest}*") if p.is_file()] == []


def test_legacy_objects_become_serving_sets_without_reencoding(corpus, local_storage, settings):
    """The migration adopts unversioned objects: the current ladder where the recipe is the
    current one, the storage's own listing otherwise, and never an object the storage lacks."""
    import importlib

    from django.apps import apps

    migration = importlib.import_module("gallery.migrations.0004_adopt_legacy_variants")
    recipe = variant_recipe_current()
    current, stale, gone, half = (_ingest(corpus, rel) for rel in (
        SOURCE, "photos/flower_exif_icc.webp", "photos/pixel4a_paris_exif_after_idat.png", "photos/embedgravitybird_rgba.png",
    ))  # fmt: skip

    def legacy(image: Image, widths: list[int], fmts=("avif", "webp")) -> None:
        for w in widths:
            for fmt in fmts:
                local_storage.put(variant_key(folder="gallery", image_key=image.image_key, width=w, fmt=fmt), b"x" * w, "image/" + fmt)

    legacy(current, [320, 480])  # current recipe, half done
    Image.objects.filter(pk=current.pk).update(variants_recipe=recipe.version, ready_max_width=480)
    legacy(stale, [300])  # an old recipe: the widths come from the listing
    Image.objects.filter(pk=stale.pk).update(variants_recipe="0ld0ld0ld0ld", ready_max_width=300, variants_ready=True)
    Image.objects.filter(pk=gone.pk).update(variants_recipe="0ld0ld0ld0ld", ready_max_width=640, variants_ready=True)
    legacy(half, [320], fmts=("avif",))  # an old recipe whose tier lost its WebP
    Image.objects.filter(pk=half.pk).update(variants_recipe="0ld0ld0ld0ld", ready_max_width=320, variants_ready=True)

    migration.adopt_legacy_sets(apps, None)
    migration.adopt_legacy_sets(apps, None)  # re-running adds nothing

    by_image = {s.image_id: s for s in VariantSet.objects.all()}
    assert set(by_image) == {current.pk, stale.pk}
    assert (by_image[current.pk].widths, by_image[current.pk].ready_widths) == ([320, 480, 640, 800], [320, 480])
    assert (by_image[stale.pk].widths, by_image[stale.pk].ready_widths) == ([300], [300])
    assert all(s.key_version == "" and s.state == VariantSetState.SERVING for s in by_image.values())
    for image in (current, stale):
        assert all(local_storage.exists(k) for k in served_keys(image))
    for image in (gone, half):  # nothing recorded that the storage lacks: placeholders, "missing"
        image.refresh_from_db()
        assert (image.serving_set_id, image.ready_max_width, image.variants_ready) == (None, 0, False)


def test_image_api_shows_serving_and_candidate_sets(corpus, local_storage, settings, client, staff_user, staff_user_no_perms):
    image = _ingest(corpus)
    preprocess_image(image, local_storage)
    settings.PICSITE_AVIF_QUALITY = 40
    with pytest.raises(Exception):  # noqa: B017 - leaves a one-tier candidate
        preprocess_image(image, FailingFrom(local_storage, 2))
    client.force_login(staff_user_no_perms)
    assert client.get(f"/api/v1/images/{image.pk}").status_code == 403
    grant(staff_user, "gallery.view_image")
    client.force_login(staff_user)
    body = client.get(f"/api/v1/images/{image.pk}").json()
    variants = body["variants"]
    assert variants["stale"] is True and variants["ready"] is True
    assert variants["serving"]["ready_widths"] == [320, 480, 640, 800] and variants["serving"]["complete"]
    assert sorted(variants["serving"]["urls"]["avif"]) == ["320", "480", "640", "800"]
    (candidate,) = variants["candidates"]
    assert candidate["ready_widths"] == [320] and not candidate["complete"]
    assert candidate["key_version"] != variants["serving"]["key_version"]
    for url in variants["serving"]["urls"]["webp"].values():
        assert client.get(url).status_code == 200
    missing = client.get("/api/v1/images/987654321")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "image_not_found"
