"""Public pages: the grid and the detail page serve ready variants only, never originals."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from gallery.models import Image, VariantSet
from gallery.selectors import VariantStores, gallery_page, image_sources
from gallery.services import image_ingest, variant_recipe_current
from tests.conftest import CORPUS  # honours PICSITE_CORPUS (a worktree has no ../shared)

BLURHASH = "LEHV6nWB2yk8pyo0adR*.7kCMdnj"


# Fixtures are local to this module (tests/conftest.py belongs to another area).


@pytest.fixture
def gallery_media(settings, tmp_path) -> Path:
    root = tmp_path / "media"
    root.mkdir()
    settings.MEDIA_ROOT = root
    settings.MEDIA_URL = "/media/"
    settings.PICSITE_VARIANT_STORAGE = "local"
    settings.PICSITE_VARIANT_LOCAL_ROOT = root / "v"
    settings.PICSITE_VARIANT_LOCAL_URL = "/media/v/"
    settings.PICSITE_VARIANT_FOLDER = "gallery"
    settings.PICSITE_VARIANT_WIDTHS = [320, 480, 640, 800, 1080, 1280, 1920, 2560]
    return root


_serial = iter(range(1, 1_000_000))


def make_image(
    *, ready_max_width: int = 800, width: int = 4000, height: int = 3000, key_version: str = "", **fields
) -> Image:
    """A row serving a (legacy, unless ``key_version``) variant set of the current ladder,
    ready up to ``ready_max_width`` (no set at all when 0)."""
    n = next(_serial)
    recipe = variant_recipe_current()
    defaults = {
        "original": f"originals/2026/01/photo{n}.jpg",
        "title": f"Photo {n}",
        "image_key": f"variants/{n:032x}",
        "width": width,
        "height": height,
        "blurhash": BLURHASH,
        "ready_max_width": ready_max_width,
        "variants_ready": ready_max_width > 0,
        "variants_recipe": recipe.version if ready_max_width else "",
    }
    image = Image.objects.create(**{**defaults, **fields})
    if ready_max_width:
        image.serving_set = VariantSet.objects.create(
            image=image, state="serving", recipe_version=recipe.version, key_version=key_version,
            storage_kind="local", folder="gallery", widths=recipe.tier_widths(width), formats=["avif", "webp"],
            ready_max_width=ready_max_width,
        )  # fmt: skip
        image.save(update_fields=["serving_set"])
    return image


def pictures(html: str) -> list[str]:
    return re.findall(r"<picture>.*?</picture>", html, flags=re.S)


def srcset_widths(html: str, fmt: str) -> list[int]:
    match = re.search(rf'<source type="image/{fmt}" srcset="([^"]*)"', html)
    assert match, f"no {fmt} source"
    return [int(part.rsplit(" ", 1)[1].rstrip("w")) for part in match.group(1).split(", ")]


# --- grid -----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_grid_srcset_stops_at_ready_max_width(client, gallery_media):
    image = make_image(ready_max_width=800)

    response = client.get(reverse("gallery:grid"))

    assert response.status_code == 200
    html = response.content.decode()
    [picture] = pictures(html)
    assert srcset_widths(picture, "avif") == [320, 480, 640, 800]
    assert srcset_widths(picture, "webp") == [320, 480, 640, 800]
    key = image.image_key
    assert f"/media/v/gallery/{key}_800.avif 800w" in picture
    assert f'src="/media/v/gallery/{key}_800.webp"' in picture
    assert 'width="800" height="600"' in picture
    assert 'loading="lazy"' in picture and 'decoding="async"' in picture
    assert f'alt="{image.title}"' in picture
    assert "_1080." not in html
    assert f'data-blurhash="{BLURHASH}"' in html
    assert "aspect-ratio: 4000 / 3000" in html


@pytest.mark.django_db
def test_grid_never_links_originals(client, gallery_media):
    for ready in (0, 320, 2560):
        make_image(ready_max_width=ready)
    html = client.get("/").content.decode()
    assert "/media/originals" not in html
    assert "originals/" not in html


@pytest.mark.django_db
def test_image_without_ready_tier_is_placeholder_only(client, gallery_media):
    pending = make_image(ready_max_width=0, width=3000, height=2000)

    html = client.get("/").content.decode()

    assert pictures(html) == []
    assert "<img" not in html
    assert f'data-blurhash="{BLURHASH}"' in html
    assert "aspect-ratio: 3000 / 2000" in html
    assert reverse("gallery:detail", args=[pending.pk]) in html  # still listed and linked


@pytest.mark.django_db
def test_no_sources_when_variant_storage_is_off(client, gallery_media, settings):
    make_image(ready_max_width=800)
    settings.PICSITE_VARIANT_STORAGE = "none"

    html = client.get("/").content.decode()

    assert pictures(html) == []
    assert "data-blurhash" in html


@pytest.mark.django_db
def test_grid_hides_soft_deleted(client, gallery_media):
    live = make_image()
    gone = make_image(deleted_at=timezone.now())
    html = client.get("/").content.decode()
    assert reverse("gallery:detail", args=[live.pk]) in html
    assert reverse("gallery:detail", args=[gone.pk]) not in html


@pytest.mark.django_db
def test_grid_pages_newest_first_by_keyset(client, gallery_media):
    images = [make_image() for _ in range(50)]  # ascending ids

    first = client.get("/").content.decode()
    ids = [int(i) for i in re.findall(r'href="/photos/(\d+)/"', first)]
    assert ids == [img.pk for img in reversed(images)][:48]
    assert f'href="/?before={ids[-1]}"' in first

    second = client.get(f"/?before={ids[-1]}").content.decode()
    assert [int(i) for i in re.findall(r'href="/photos/(\d+)/"', second)] == [images[1].pk, images[0].pk]
    assert "?before=" not in second  # last page


@pytest.mark.django_db
def test_grid_ignores_malformed_cursor(client, gallery_media):
    make_image()
    assert client.get("/?before=abc").status_code == 200
    assert client.get("/?before=-4").status_code == 200


@pytest.mark.django_db
def test_anonymous_can_view_grid(gallery_media):
    make_image()
    response = Client().get("/")
    assert response.status_code == 200
    assert b"<picture>" in response.content


@pytest.mark.django_db
def test_empty_grid(client, gallery_media):
    response = client.get("/")
    assert response.status_code == 200
    assert b"No photos yet" in response.content


# --- query counts ---------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("page_size", [5, 40])
def test_gallery_page_is_one_query(gallery_media, django_assert_num_queries, page_size):
    for _ in range(page_size + 3):
        make_image()
    with django_assert_num_queries(1):
        page = gallery_page(before_id=None, page_size=page_size)
    assert len(page.images) == page_size
    assert page.has_next


@pytest.mark.django_db
def test_grid_query_count_does_not_grow_with_page(client, gallery_media):
    for _ in range(5):
        make_image()
    with CaptureQueriesContext(connection) as five:
        assert client.get("/").status_code == 200

    for _ in range(35):
        make_image(ready_max_width=0)
    with CaptureQueriesContext(connection) as forty:
        html = client.get("/").content.decode()

    assert html.count('href="/photos/') == 40
    assert len(five) == len(forty) == 1


# --- the grid's pending tiles (polled by tiles.js) ------------------------------------------


@pytest.mark.django_db
def test_grid_marks_tiles_still_being_made_for_polling(client, gallery_media):
    done, partial, empty = make_image(ready_max_width=2560), make_image(ready_max_width=320), make_image(ready_max_width=0)
    Image.objects.filter(pk=partial.pk).update(variants_ready=False)

    html = client.get("/").content.decode()

    pending = re.findall(r'<li [^>]*data-tile="(\d+)"[^>]*data-pending', html)
    assert sorted(int(i) for i in pending) == sorted([partial.pk, empty.pk])
    assert f'data-tile="{done.pk}" data-ready="2560">' in html
    assert f'src="/static/gallery/tiles.js" data-endpoint="{reverse("gallery:tiles")}"' in html


@pytest.mark.django_db
def test_tiles_give_each_live_image_its_grid_picture_and_progress(client, gallery_media):
    """What tiles.js swaps in: the tile's <picture> as the grid renders it (variant URLs
    only: no original, no GPS, no pipeline error), its ready width, and whether it is done.
    Deleted and unknown ids are absent; nothing is cached."""
    waiting = make_image(ready_max_width=0, gps_latitude=48.8584, gps_longitude=2.2945)
    first = make_image(ready_max_width=320, gps_latitude=48.8584, gps_longitude=2.2945, variants_error="decode/corrupt: x")
    Image.objects.filter(pk=first.pk).update(variants_ready=False)
    gone = make_image(ready_max_width=800, deleted_at=timezone.now())

    response = client.get(reverse("gallery:tiles"), {"ids": f"{waiting.pk},{first.pk},{gone.pk},999999"})

    assert response.status_code == 200 and response["Cache-Control"] == "no-store"
    tiles = {tile["id"]: tile for tile in response.json()["tiles"]}
    assert sorted(tiles) == [waiting.pk, first.pk]
    assert (tiles[waiting.pk]["ready_max_width"], tiles[waiting.pk]["complete"]) == (0, False)
    assert pictures(tiles[waiting.pk]["html"]) == [] and "ph--empty" in tiles[waiting.pk]["html"]
    assert (tiles[first.pk]["ready_max_width"], tiles[first.pk]["complete"]) == (320, False)
    [picture] = pictures(tiles[first.pk]["html"])
    assert srcset_widths(picture, "avif") == [320]
    assert f'src="/media/v/gallery/{first.image_key}_320.webp"' in picture
    grid_html = client.get("/").content.decode()
    assert tiles[first.pk]["html"].strip() in grid_html  # the very markup of the grid
    body = response.content.decode()
    assert "originals/" not in body and "48.85" not in body and "2.29" not in body and "corrupt" not in body


@pytest.mark.django_db
@pytest.mark.parametrize("ids", ["", "abc", "1,x", "0", "-3", ",".join(str(i) for i in range(1, 50))])
def test_tiles_refuse_bad_ids_with_a_json_error(client, gallery_media, ids):
    response = client.get(reverse("gallery:tiles"), {"ids": ids})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_ids" and error["message"] and "details" in error


@pytest.mark.django_db
def test_tiles_are_one_query_whatever_their_number(client, gallery_media):
    images = [make_image(ready_max_width=w) for w in (0, 320, 800, 0, 480)]
    with CaptureQueriesContext(connection) as queries:
        response = client.get(reverse("gallery:tiles"), {"ids": ",".join(str(i.pk) for i in images)})
    assert response.status_code == 200 and len(response.json()["tiles"]) == 5
    assert len(queries) == 1


# --- selectors ------------------------------------------------------------------------------


@pytest.mark.django_db
def test_image_sources_tiny_image_has_its_own_width_tier(gallery_media):
    image = make_image(width=200, height=100, ready_max_width=200)
    pic = image_sources(image=image, stores=VariantStores())
    assert pic.srcset("avif") == f"/media/v/gallery/{image.image_key}_200.avif 200w"
    assert (pic.width, pic.height) == (200, 100)


@pytest.mark.django_db
def test_image_sources_full_ladder(gallery_media):
    image = make_image(width=3000, height=2000, ready_max_width=2560)
    pic = image_sources(image=image, stores=VariantStores(), sizes="50vw")
    assert srcset_widths(f'<source type="image/webp" srcset="{pic.srcset("webp")}"', "webp") == [
        320, 480, 640, 800, 1080, 1280, 1920, 2560
    ]
    assert pic.src.endswith("_2560.webp")
    assert (pic.width, pic.height, pic.sizes) == (2560, 1707, "50vw")


@pytest.mark.django_db
def test_image_sources_none_without_store(gallery_media, settings):
    image = make_image(ready_max_width=800)
    settings.PICSITE_VARIANT_STORAGE = "none"
    pic = image_sources(image=image, stores=VariantStores())
    assert not pic.has_sources and pic.blurhash == BLURHASH


@pytest.mark.django_db
def test_srcset_comes_from_the_serving_set_not_from_settings(client, gallery_media, settings):
    """A ladder change must not advertise tiers the image's set does not have: the grid
    used to apply the current ladder to the old ready_max_width."""
    image = make_image(width=3000, height=2000, ready_max_width=2560, key_version="0123456789ab")
    settings.PICSITE_VARIANT_WIDTHS = [320, 480, 640, 800, 960, 1280, 1920, 2560]  # add 960, drop 1080
    settings.PICSITE_AVIF_QUALITY = 40  # and a quality change: a new recipe version
    html = client.get("/").content.decode()
    [picture] = pictures(html)
    assert srcset_widths(picture, "avif") == [320, 480, 640, 800, 1080, 1280, 1920, 2560]
    digest = image.image_key.removeprefix("variants/")
    assert f"/media/v/gallery/variants/{digest[:2]}/{digest}_0123456789ab_1080.avif 1080w" in picture
    assert "_960." not in html


# --- detail ---------------------------------------------------------------------------------


@pytest.mark.django_db
def test_detail_renders_ready_tiers_and_metadata(client, gallery_media):
    image = make_image(
        ready_max_width=1280,
        taken_at=datetime(2021, 6, 5, 14, 30, tzinfo=UTC),
        camera_make="Canon",
        camera_model="Canon PowerShot G9",
        lens="6.0-44.0 mm",
        gps_latitude=48.858370,
        gps_longitude=2.294481,
        variants_error="upload/variant_upload_failed: boom",
    )

    response = client.get(reverse("gallery:detail", args=[image.pk]))

    assert response.status_code == 200
    html = response.content.decode()
    [picture] = pictures(html)
    assert srcset_widths(picture, "avif")[-1] == 1280
    assert "_1920." not in html
    assert "4000 × 3000 px" in html
    assert "5 June 2021" in html
    assert "Canon PowerShot G9" in html and "Canon Canon" not in html
    assert "6.0-44.0 mm" in html
    assert "48.85837" not in html  # GPS is staff-only
    assert "boom" not in html
    assert "/media/originals" not in html


@pytest.mark.django_db
def test_detail_shows_gps_and_error_to_staff(client, django_user_model, gallery_media):
    image = make_image(gps_latitude=48.858370, gps_longitude=2.294481, variants_error="decode/corrupt: boom")
    client.force_login(django_user_model.objects.create_user("pages-staff", password="pw-123456", is_staff=True))

    html = client.get(reverse("gallery:detail", args=[image.pk])).content.decode()

    assert "48.85837, 2.29448" in html
    assert "decode/corrupt: boom" in html


@pytest.mark.django_db
def test_detail_placeholder_only_when_nothing_ready(client, gallery_media):
    image = make_image(ready_max_width=0)
    html = client.get(reverse("gallery:detail", args=[image.pk])).content.decode()
    assert pictures(html) == []
    assert "data-blurhash" in html


@pytest.mark.django_db
def test_detail_404_for_deleted_or_missing(client, gallery_media):
    gone = make_image(deleted_at=timezone.now())
    assert client.get(reverse("gallery:detail", args=[gone.pk])).status_code == 404
    assert client.get(reverse("gallery:detail", args=[gone.pk + 1000])).status_code == 404


@pytest.mark.django_db
def test_ingested_photo_shows_in_grid_as_placeholder(client, gallery_media):
    data = (CORPUS / "photos" / "flower_exif_icc.webp").read_bytes()
    image = image_ingest(data=data, filename="flower_exif_icc.webp").image

    html = client.get("/").content.decode()

    assert image.blurhash and f'data-blurhash="{image.blurhash}"' in html
    assert pictures(html) == []  # no variants yet
    assert "originals/" not in html


def test_static_assets_exist():
    static = Path(__file__).resolve().parents[1] / "gallery" / "static" / "gallery"
    assert "function decode" in (static / "blurhash.js").read_text()
    assert "data-pending" in (static / "tiles.js").read_text()
    assert ".ph" in (static / "site.css").read_text()


@pytest.mark.django_db
def test_originals_are_never_served_but_variants_are(client):
    """Originals may carry GPS: no URL serves them; local variants are served."""
    from django.conf import settings as live

    variants = live.PICSITE_VARIANT_LOCAL_ROOT
    probe = variants / "gallery" / "probe_320.webp"
    probe.parent.mkdir(parents=True, exist_ok=True)
    probe.write_bytes(b"RIFF0000WEBP")
    originals = live.MEDIA_ROOT / "originals"
    originals.mkdir(parents=True, exist_ok=True)
    (originals / "secret.jpg").write_bytes(b"\xff\xd8 gps inside")
    try:
        assert client.get(live.PICSITE_VARIANT_LOCAL_URL + "gallery/probe_320.webp").status_code == 200
        assert client.get(live.MEDIA_URL + "originals/secret.jpg").status_code == 404
    finally:
        probe.unlink()
        (originals / "secret.jpg").unlink()


@pytest.mark.django_db
def test_healthz_checks_the_database(client):
    response = client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"ok": True}


# --- cost of a page: URLs from each set's base, not one storage call per tier ---------------


@pytest.fixture
def count_store_urls(monkeypatch) -> list[str]:
    """Every key a variant store's ``url()`` is asked for, whatever the kind of store."""
    from gallery.storage import LocalVariantStore, S3VariantStore

    asked: list[str] = []
    for cls in (LocalVariantStore, S3VariantStore):
        original = cls.url

        def counted(self, key, _original=original):
            asked.append(key)
            return _original(self, key)

        monkeypatch.setattr(cls, "url", counted)
    return asked


@pytest.mark.django_db
def test_grid_builds_urls_without_a_storage_call_per_tier(client, gallery_media, count_store_urls):
    """A full page of full ladders: one query, and at most one url() call per store (to learn
    its base), not one per tier (17 per photo: 2 x 8 tiers + the <img src>)."""
    for n in range(48):
        make_image(width=4000, height=3000, ready_max_width=2560, key_version="" if n % 4 == 0 else f"{n:012x}")

    with CaptureQueriesContext(connection) as queries:
        html = client.get("/").content.decode()

    assert len(pictures(html)) == 48
    assert html.count(".avif ") == html.count(".webp ") == 48 * 8
    assert len(queries) == 1
    assert len(count_store_urls) <= 1, f"{len(count_store_urls)} url() calls for one store"


def _expected_sources(image: Image, store) -> dict[str, str]:
    """Each srcset (and the src) built the slow way: ``store.url()`` of every tier's key."""
    from gallery.storage import variant_key

    vset = image.serving_set
    widths = vset.ready_widths

    def url(width: int, fmt: str) -> str:
        return store.url(variant_key(folder=vset.folder, image_key=image.image_key, width=width, fmt=fmt, key_version=vset.key_version))

    expected = {fmt: ", ".join(f"{url(w, fmt)} {w}w" for w in widths) for fmt in ("avif", "webp")}
    expected["src"] = url(widths[-1], "webp")
    return expected


def _assert_sources_match_store_urls(images: list[Image], store) -> None:
    stores = VariantStores()
    for image in images:
        image.refresh_from_db()
        pic = image_sources(image=image, stores=stores)
        expected = _expected_sources(image, store)
        assert {"avif": pic.srcset("avif"), "webp": pic.srcset("webp"), "src": pic.src} == expected


@pytest.fixture
def forget_new_stores():
    """Drop the stores a test built from the process-wide cache: each S3 one holds a boto3
    session (~10 MB), and a bucket per test would keep them all for the rest of the run."""
    from gallery import storage

    before = set(storage._STORES)
    yield
    with storage._STORES_LOCK:
        for config in set(storage._STORES) - before:
            del storage._STORES[config]


def _sets_in(folder: str, kind: str) -> list[Image]:
    images = [make_image(ready_max_width=2560, key_version=kv) for kv in ("", "0123456789ab")]
    VariantSet.objects.filter(image__in=images).update(folder=folder, storage_kind=kind)
    return images


@pytest.mark.django_db
@pytest.mark.parametrize("base_url", ["/media/v/", "https://cdn.example.com/v/", "/media/v"])
@pytest.mark.parametrize("folder", ["gallery", "", "nested/site-1", "my photos/été"])
def test_local_urls_are_what_the_store_gives(gallery_media, settings, forget_new_stores, base_url, folder):
    """Building URLs from the store's base gives byte for byte what ``url()`` gives, also
    for a folder whose characters need quoting (which then goes through ``url()``)."""
    from gallery.storage import variant_store_for

    settings.PICSITE_VARIANT_LOCAL_URL = base_url
    images = _sets_in(folder, "local")
    store = variant_store_for(kind="local", folder=folder)
    _assert_sources_match_store_urls(images, store)
    assert store.url_prefix() == (None if " " in folder else base_url.rstrip("/") + "/")


@pytest.mark.django_db
@pytest.mark.parametrize("public_base_url", ["", "https://img.example.com/sub"])
@pytest.mark.parametrize("folder", ["gallery", "my photos"])
def test_s3_urls_are_what_the_store_gives(s3_storage, s3_bucket, settings, forget_new_stores, public_base_url, folder):
    """S3 with a public base URL, and without one (django-storages builds the bucket URL)."""
    from gallery.storage import variant_store_for

    settings.PICSITE_S3_PUBLIC_BASE_URL = public_base_url
    images = _sets_in(folder, "s3")
    store = variant_store_for(kind="s3", folder=folder)
    _assert_sources_match_store_urls(images, store)
    # The fast path was taken where it can be: the bucket's URL learnt once.
    expected_prefix = public_base_url.rstrip("/") + "/" if public_base_url else f"{settings.PICSITE_S3_ENDPOINT_URL}/{s3_bucket}/"
    assert store.url_prefix() == (None if " " in folder else expected_prefix)
