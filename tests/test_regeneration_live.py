"""A recipe change on a live site breaks nothing at any moment.

Before the fix, the gallery applied the current ladder to each image's old progress: after
adding 960 to the ladder every image not yet regenerated advertised ``…_960`` objects that
did not exist, and a regeneration overwrote URLs that browsers cache as immutable. Here a
real uvicorn serves the gallery while the ladder changes (960 added, 1080 dropped) and the
AVIF quality changes, and a backfill regenerates every photo; a watcher fetches every URL
the grid, the photo pages and the API advertise, before, during and after, and checks each
answers 200 with an image of the declared width. Old URLs keep answering after the switch.
"""

from __future__ import annotations

import time

import pytest

from api.auth import api_token_create
from gallery.models import Image, VariantSetState
from gallery.services import image_ingest, preprocess_image
from tasks import engine
from tasks.models import RunStatus
from tests.advertised_urls import AdvertisedUrlWatcher, fetch
from tests.live_server import live_uvicorn
from tests.perms import grant

pytestmark = pytest.mark.django_db(transaction=True)

PHOTOS = [
    "photos/canon_g9_clouds_2560x1600.jpg",
    "photos/casio_exz750_car_2164x1626.jpg",
    "photos/reconyx_trailcam_2048x1536.jpg",
    "photos/webp_gallery_tree.webp",
]


def test_recipe_change_leaves_no_broken_image_at_any_moment(corpus, settings, media_root, local_storage, staff_user):
    images = [image_ingest(data=(corpus / rel).read_bytes(), filename=rel).image for rel in PHOTOS]
    for image in images:
        preprocess_image(image, local_storage)
    grant(staff_user, "gallery.view_image")
    token = api_token_create(user=staff_user, name="watcher", scopes=["read"])[1]
    # The operator changes the recipe (960 added, 1080 dropped, another AVIF quality) and
    # restarts the site: pages must follow the stored sets, not the new settings.
    new_widths = [320, 480, 640, 800, 960, 1280, 1920, 2560]
    env = {
        "PICSITE_VARIANT_LOCAL_URL": "/media/v/",
        "PICSITE_VARIANT_STORAGE": "local",
        "PICSITE_VARIANT_WIDTHS": ",".join(map(str, new_widths)),
        "PICSITE_AVIF_QUALITY": "45",
    }
    with live_uvicorn(media_root=media_root, env=env) as base_url:
        watcher = AdvertisedUrlWatcher(base_url=base_url, image_ids=[i.pk for i in images], token=token)
        watcher.check_once()  # before the backfill: the old sets, whole
        assert watcher.failures == [], watcher.failures[:5]
        before = dict(watcher.seen_urls)
        assert any(w == 1080 for w in before.values()) and not any(w == 960 for w in before.values())
        settings.PICSITE_VARIANT_WIDTHS = new_widths  # the workers (this process) have it too
        settings.PICSITE_AVIF_QUALITY = 45

        watcher.start()  # during: the backfill regenerates every photo as a candidate set
        run = engine.create(task_key="preprocess-images", scope={})
        rounds_at_start = watcher.rounds
        while run.status in RunStatus.runnable():
            run = engine.kick(run_id=run.pk, max_batches=1)
            time.sleep(0.2)  # let the watcher look between batches too
        rounds_during = watcher.rounds - rounds_at_start
        watcher.stop()
        assert run.status == RunStatus.SUCCEEDED and run.succeeded == len(images), run.recent_issues[:3]

        watcher.check_once()  # after: every photo serves its new set, 960 and no 1080
        after = {url: w for url, w in watcher.seen_urls.items() if url not in before}
        assert watcher.failures == [], watcher.failures[:5]
        assert rounds_during >= 1
        assert any(w == 960 for w in after.values()) and not any(w == 1080 for w in after.values())
        for image in images:
            image = Image.objects.select_related("serving_set").get(pk=image.pk)
            assert image.serving_set.state == VariantSetState.SERVING and image.variants_ready
            assert image.variant_sets.filter(state=VariantSetState.SUPERSEDED).count() == 1

        # Old URLs (cached pages, CDNs) still answer: the superseded sets stay until the
        # collector's grace has passed.
        for url in before:
            status, _ = fetch(base_url + url)
            assert status == 200, url
