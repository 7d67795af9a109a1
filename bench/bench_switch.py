"""The longest moment during a regeneration when an advertised URL did not answer 200.

    python bench/bench_switch.py [--photos N]

In a throwaway database the corpus photos are ingested and given their variants, then a real
uvicorn (the site, local variant storage) is started with a changed recipe: 960 added to the
ladder, 1080 dropped, another AVIF quality. While one worker process regenerates every photo
(a preprocess-images run, default scope: every image is stale), a watcher
(``tests.advertised_urls``) fetches every URL the grid, every photo page and the API
advertise, in a loop, and checks each answers 200 with an image of the declared width.

Writes ``variants.switch_gap_ms`` (the longest time any advertised URL kept failing: must be
0), ``variants.switch_checks`` (URL fetches made during the regeneration) and
``variants.switch_failures``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402  (puts the repo on sys.path)

NEW_WIDTHS = "320,480,640,800,960,1280,1920,2560"
NEW_AVIF_QUALITY = "45"


def bench(args, media: Path) -> dict:
    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import Permission

    from api.auth import api_token_create
    from gallery.models import Image
    from gallery.services import preprocess_image
    from gallery.storage import variant_store_resolve
    from tests.advertised_urls import AdvertisedUrlWatcher
    from tests.live_server import live_uvicorn

    ids = _common.ingest_corpus()[: args.photos]
    store = variant_store_resolve()
    for image in Image.objects.filter(pk__in=ids):
        preprocess_image(image, store)
    user = get_user_model().objects.create_user("bench-watcher", is_staff=True)
    user.user_permissions.add(Permission.objects.get(content_type__app_label="gallery", codename="view_image"))
    token = api_token_create(user=user, name="bench", scopes=["read"])[1]

    env = {"PICSITE_VARIANT_WIDTHS": NEW_WIDTHS, "PICSITE_AVIF_QUALITY": NEW_AVIF_QUALITY,
           "PICSITE_VARIANT_STORAGE": "local", "PICSITE_VARIANT_LOCAL_URL": "/media/v/"}  # fmt: skip
    with live_uvicorn(media_root=media, env=env) as base_url:
        watcher = AdvertisedUrlWatcher(base_url=base_url, image_ids=ids, token=token)
        watcher.check_once()
        before_failures = list(watcher.failures)
        worker_env = dict(os.environ, **env, PYTHONPATH=str(_common.REPO))
        started = time.monotonic()
        watcher.start()
        proc = subprocess.run(
            [sys.executable, "-c", _REGENERATE], cwd=_common.REPO, env=worker_env, capture_output=True, text=True
        )
        regen_s = time.monotonic() - started
        watcher.stop()
        if proc.returncode != 0:
            raise SystemExit(f"regeneration failed:\n{proc.stderr[-3000:]}")
        _common.log(f"[switch] {len(ids)} photos regenerated in {regen_s:.1f}s; {proc.stdout.strip()}")
        watcher.check_once()
    return {
        "switch_gap_ms": round(watcher.longest_gap_s * 1000, 1),
        "switch_checks": watcher.checked,
        "switch_rounds": watcher.rounds,
        "switch_failures": len(watcher.failures) + len(before_failures),
        "switch_failure_examples": (before_failures + watcher.failures)[:5],
        "switch_photos": len(ids),
        "switch_regeneration_s": round(regen_s, 1),
    }


_REGENERATE = """
import os, django
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "picsite.settings")
django.setup()
from tasks import engine
run = engine.create(task_key="preprocess-images", scope={})
run = engine.kick(run_id=run.pk)
print(run.status, run.succeeded, "succeeded of", run.total)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=8)
    args = parser.parse_args()
    with _common.temp_media() as media, _common.bench_database(name=_common.BENCH_DB + "_switch"):
        result = bench(args, media)
    _common.merge_result("variants", {**_common.load_results().get("variants", {}), **result})
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
