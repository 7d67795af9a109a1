"""End to end in Debian's chromium (Playwright, sync API) against the real processes
``make run`` starts: uvicorn plus both django-q2 clusters, on the test database.

A staff user logs in, uploads photos (bad files are rejected), starts a preprocess
backfill on /admin/tasks/ and watches the worker drive the bar to 100 %, sees the
undecodable originals listed as failed items with codes, retries them, starts and
cancels a metadata refresh, and finds AVIF ``<picture>`` sources on the public
gallery. A non-staff user gets neither the page nor the API. Screenshots of each
step go to ``test-artifacts/``.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from django.db import connection
from django.utils import timezone

from gallery.models import Image, VariantSet
from tasks.models import AdminTaskRun, RunStatus
from tests.live_processes import LiveSite, start_site
from tests.perms import grant

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

REPO = Path(__file__).resolve().parents[1]
CORPUS = Path(os.environ.get("PICSITE_CORPUS", REPO.parent / "shared" / "corpus"))
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
GOOD_PHOTOS = ["flower_exif_icc.webp", "pixel4a_paris_exif_after_idat.png", "canon_g9_clouds_2560x1600.jpg"]
BAD_UPLOADS = ["zero_bytes.jpg", "html_error_page.png"]
BROKEN_ORIGINALS = ["truncated_photo.jpg", "corrupt_header.jpg"]  # would be rejected at upload
STAFF_PW = "pw-staff-browser-1"
PLAIN_PW = "pw-plain-browser-1"
SYNTHETIC_ROWS = 60


def _require_chromium() -> None:
    if Path(CHROMIUM).exists():
        return
    if os.environ.get("CI"):
        pytest.fail(f"{CHROMIUM} is missing; CI must install Debian's chromium (.ci/run does)")
    pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium); browser tests run in CI")


def wait_until(predicate: Callable[[], object], *, timeout: float, what: str, site: LiveSite | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if site is not None:
            site.check_alive()
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{site.logs() if site else ''}")


@pytest.fixture
def site(transactional_db, tmp_path, settings, monkeypatch):
    """uvicorn + uploads cluster + backfill cluster on the test DB (stopped before the flush)."""
    _require_chromium()
    # Playwright's sync API keeps an event loop in this thread; the test's own ORM calls are fine.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    media = tmp_path / "media"
    variants = media / "v"
    settings.MEDIA_ROOT = media
    settings.PICSITE_VARIANT_STORAGE = "local"
    settings.PICSITE_VARIANT_LOCAL_ROOT = variants
    settings.PICSITE_VARIANT_WIDTHS = [320, 640]
    live = start_site(
        db_name=connection.settings_dict["NAME"],
        media_root=media,
        variant_root=variants,
        log_dir=tmp_path / "logs",
        extra_env={
            "PICSITE_ADMIN_PAGE_DRIVES_KICKS": "false",  # the bar must be driven by the worker
            "PICSITE_VARIANT_WIDTHS": "320,640",  # two tiers: quick encodes
            "PICSITE_Q_WORKERS": "1",
            "PICSITE_Q_BACKFILL_WORKERS": "2",
            "PICSITE_DRAIN_PARALLELISM": "2",
            # Drain jobs return instead of sleeping through a long retry backoff.
            "PICSITE_DRAIN_SLICE_S": "8",
            # Retryable failures (missing originals) wait long enough to cancel the run.
            "PICSITE_ITEM_RETRY_BASE_S": "20",
            "PICSITE_ITEM_RETRY_CAP_S": "40",
        },
    )
    try:
        yield live
    finally:
        live.stop()


@pytest.fixture
def browser(site):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def shot():
    ARTIFACTS.mkdir(exist_ok=True)
    taken: list[Path] = []

    def take(page, name: str) -> Path:
        path = ARTIFACTS / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        taken.append(path)
        return path

    take.taken = taken
    return take


def login(page, base: str, username: str, password: str) -> None:
    page.goto(base + "/admin/login/?next=/admin/")
    page.fill("#id_username", username)
    page.fill("#id_password", password)
    page.click("input[type=submit]")


def test_admin_tasks_end_to_end(site, browser, shot, django_user_model, settings):
    from django.contrib.auth.models import Permission
    from playwright.sync_api import expect

    started = time.monotonic()
    base = site.base_url
    staff = django_user_model.objects.create_user("browser-staff", password=STAFF_PW, is_staff=True)
    staff.user_permissions.set(
        Permission.objects.filter(content_type__app_label="gallery", codename__in=["add_image", "view_image", "change_image"])
        | Permission.objects.filter(content_type__app_label="tasks", codename__in=["view_admintaskrun", "run_tasks"])
    )
    plain = django_user_model.objects.create_user("browser-plain", password=PLAIN_PW)

    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(20_000)
    js_errors: list[str] = []
    page.on("pageerror", lambda exc: js_errors.append(str(exc)))

    # 1. Staff logs in through the admin login form; the index links to the task page.
    login(page, base, staff.username, STAFF_PW)
    page.wait_for_url(base + "/admin/")
    expect(page.get_by_test_id("task-runs-link")).to_be_visible()
    shot(page, "01-admin-index")

    # 2. Upload 3 photos + 2 bad files: the bad ones are rejected by name.
    page.goto(base + "/admin/gallery/image/upload/")
    page.set_input_files(
        "input[type=file]",
        [str(CORPUS / "photos" / n) for n in GOOD_PHOTOS] + [str(CORPUS / "bad" / n) for n in BAD_UPLOADS],
    )
    page.click("input[type=submit]")
    errors = page.locator("ul.errorlist")
    for name in BAD_UPLOADS:
        expect(errors).to_contain_text(name)
    expect(page.locator("ul.messagelist")).to_contain_text("3 uploaded")
    shot(page, "02-upload-bad-files-rejected")

    # The upload's own jobs (uploads cluster) make the variants; wait, then make the
    # photos need work again so the backfill has something to do.
    wait_until(
        lambda: Image.objects.filter(variants_ready=True).count() == 3,
        timeout=60,
        what="the upload jobs to make variants",
        site=site,
    )
    photo_ids = sorted(Image.objects.values_list("pk", flat=True))
    Image.objects.filter(pk__in=photo_ids).update(
        serving_set=None, variants_ready=False, ready_max_width=0, variants_recipe="", variants_bytes=0
    )
    VariantSet.objects.filter(image_id__in=photo_ids).delete()
    # Two originals that never went through ingest: they fail to decode in the backfill.
    media_root = Path(settings.MEDIA_ROOT)  # the site's media root (set by the fixture)
    (media_root / "originals").mkdir(parents=True, exist_ok=True)
    broken_ids = []
    for name in BROKEN_ORIGINALS:
        stored = f"originals/broken-{uuid.uuid4().hex[:8]}-{name}"
        shutil.copy(CORPUS / "bad" / name, media_root / stored)
        broken_ids.append(
            Image.objects.create(original=stored, image_key="variants/" + uuid.uuid4().hex, title=f"broken {name}").pk
        )

    # 3. The task page: live count per scope.
    page.goto(base + "/admin/tasks/")
    pre = page.get_by_test_id("panel-preprocess-images")
    meta = page.get_by_test_id("panel-metadata-refresh")
    expect(pre).to_be_visible()
    expect(meta).to_be_visible()
    expect(pre.get_by_test_id("count")).to_have_text("5")
    expect(pre.get_by_test_id("start")).to_be_enabled()
    pre.get_by_test_id("scope-stale").check()
    expect(pre.get_by_test_id("count")).to_have_text("0")
    expect(pre.get_by_test_id("start")).to_be_disabled()
    pre.get_by_test_id("ids").fill(f"{broken_ids[0]}, {photo_ids[0]}")
    expect(pre.get_by_test_id("count")).to_have_text("2")
    pre.get_by_test_id("ids").fill("12, x")
    expect(pre.get_by_test_id("start")).to_be_disabled()
    pre.get_by_test_id("scope-default").check()
    expect(pre.get_by_test_id("count")).to_have_text("5")
    expect(pre.get_by_test_id("estimate")).to_contain_text("object writes")
    expect(pre.get_by_test_id("start")).to_be_enabled()
    shot(page, "03-tasks-page")

    # 4. Start the backfill; the backfill cluster drives the bar to 100 %.
    pre.get_by_test_id("start").click()
    expect(pre.get_by_test_id("status")).to_have_text(re.compile(r"queued|running|succeeded"))
    expect(pre.get_by_test_id("start")).to_be_disabled()
    shot(page, "04-preprocess-started")
    expect(pre.get_by_test_id("progress-bar")).to_have_attribute("aria-valuenow", "100", timeout=60_000)
    expect(pre.get_by_test_id("status")).to_have_text("succeeded", timeout=15_000)
    assert "stream" in (pre.get_attribute("data-live-seen") or "").split()  # live over SSE
    run = AdminTaskRun.objects.get(task_key="preprocess-images")
    assert run.status == RunStatus.SUCCEEDED and run.created_by_id == staff.pk
    assert (run.succeeded, run.failed) == (3, 2), site.logs()
    expect(pre.get_by_test_id("succeeded")).to_have_text("3")
    expect(pre.get_by_test_id("failed")).to_have_text("2")
    expect(pre.get_by_test_id("processed")).to_have_text("5 / 5")
    expect(pre.get_by_test_id("percent")).to_have_text("100%")
    assert pre.get_by_test_id("chart").get_attribute("data-points") is not None

    # ... and lists the two undecodable originals as failed items, with their codes.
    failed_rows = pre.get_by_test_id("failed-items").locator("tbody tr[data-item-id]")
    expect(failed_rows).to_have_count(2)
    for item_id in broken_ids:
        row = pre.get_by_test_id(f"failed-item-{item_id}")
        expect(row).to_be_visible()
        expect(row).to_have_attribute("data-state", "failed")
        assert row.get_attribute("data-code"), "failed item without a code"
        expect(row.locator("td").nth(5)).to_have_text("decode")
    expect(pre.get_by_test_id("issues")).to_contain_text("decode/")
    expect(pre.get_by_test_id("recent-runs").locator(f"[data-testid=run-row-{run.pk}]")).to_contain_text("succeeded")
    expect(pre.get_by_test_id("retry")).to_be_enabled()
    expect(pre.get_by_test_id("cancel")).to_be_disabled()
    shot(page, "05-preprocess-done-failed-items")

    # Retry failed: the run reopens, the two fail again (a decode error is final).
    pre.get_by_test_id("retry").click()
    wait_until(
        lambda: AdminTaskRun.objects.filter(pk=run.pk, status=RunStatus.SUCCEEDED, failed=2).exists()
        and AdminTaskRun.objects.get(pk=run.pk).updated_at > run.updated_at,
        timeout=30,
        what="the retried run to finish",
        site=site,
    )
    expect(pre.get_by_test_id("status")).to_have_text("succeeded", timeout=15_000)
    expect(pre.get_by_test_id("failed")).to_have_text("2")
    expect(pre.get_by_test_id("progress-bar")).to_have_attribute("aria-valuenow", "100")

    # 5. Metadata refresh over many rows whose originals are missing (they wait on
    # retry backoff), so the run is still going when we cancel it.
    synthetic = Image.objects.bulk_create(
        Image(original=f"originals/missing-{i}.jpg", image_key=f"variants/missing{uuid.uuid4().hex[:20]}{i}", title=f"missing {i}")
        for i in range(SYNTHETIC_ROWS)
    )
    meta.get_by_test_id("scope-default").check()
    page.reload()
    meta = page.get_by_test_id("panel-metadata-refresh")
    expect(meta.get_by_test_id("count")).to_have_text(str(5 + SYNTHETIC_ROWS))
    # One processed photo loses its original: it fails (and waits to retry) with a thumbnail.
    lost = Image.objects.get(pk=photo_ids[0])
    (media_root / lost.original.name).unlink()
    meta.get_by_test_id("start").click()
    expect(meta.get_by_test_id("status")).to_have_text(re.compile(r"queued|running"))
    lost_row = meta.get_by_test_id(f"failed-item-{lost.pk}")
    expect(lost_row).to_have_attribute("data-code", "missing_original", timeout=20_000)
    expect(lost_row.locator("img.tp-thumb")).to_have_attribute("src", re.compile(r"/media/v/.+\.webp$"))
    expect(meta.get_by_test_id("cancel")).to_be_enabled()
    shot(page, "06-metadata-running")
    meta.get_by_test_id("cancel").click()
    expect(meta.get_by_test_id("status")).to_have_text("cancelled", timeout=30_000)
    expect(meta.get_by_test_id("cancel")).to_be_disabled()
    expect(meta.get_by_test_id("start")).to_be_enabled()
    meta_run = AdminTaskRun.objects.get(task_key="metadata-refresh")
    assert meta_run.status == RunStatus.CANCELLED
    expect(meta.get_by_test_id(f"run-row-{meta_run.pk}")).to_contain_text("cancelled")
    shot(page, "07-metadata-cancelled")

    # 6. The public gallery serves AVIF/WebP <picture>s for the processed photos.
    Image.objects.filter(pk__in=[i.pk for i in synthetic]).update(deleted_at=timezone.now())
    page.goto(base + "/")
    avif = page.locator("picture source[type='image/avif']")
    expect(avif).to_have_count(3)
    srcsets = [avif.nth(i).get_attribute("srcset") for i in range(3)]
    assert all(".avif" in s for s in srcsets), srcsets
    first_url = srcsets[0].split(",")[0].strip().split(" ")[0]
    variant = page.request.get(first_url if first_url.startswith("http") else base + first_url)
    assert variant.status == 200 and variant.headers["content-type"] == "image/avif"
    page.locator("picture img").first.scroll_into_view_if_needed()
    shot(page, "08-gallery-avif")
    assert js_errors == [], js_errors
    context.close()

    # 7. A non-staff user: the admin login refuses them, and with a session anyway
    # they get neither the task page nor the API.
    other = browser.new_context()
    page = other.new_page()
    login(page, base, plain.username, PLAIN_PW)
    expect(page.locator(".errornote")).to_contain_text("staff account")
    shot(page, "09-nonstaff-login-refused")
    other.add_cookies([{"name": "sessionid", "value": _session_for(plain), "url": base}])
    page.goto(base + "/admin/tasks/")
    assert "/admin/login/" in page.url
    expect(page.locator("body")).not_to_contain_text("Preprocess images")
    shot(page, "10-nonstaff-no-task-page")
    assert other.request.get(base + "/api/v1/preprocess-tasks/runs").status == 403
    assert other.request.get(base + "/api/v1/tasks/preview-count").status == 403
    assert other.request.post(base + "/api/v1/tasks/runs", data={"scope": {}}).status in (401, 403)
    other.close()
    anon = browser.new_context()
    assert anon.request.get(base + "/api/v1/preprocess-tasks/runs").status == 401
    anon.close()

    assert len(shot.taken) == 10
    assert time.monotonic() - started < 90, f"browser scenario took {time.monotonic() - started:.0f}s"


def _session_for(user) -> str:
    from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
    from django.contrib.sessions.backends.db import SessionStore

    session = SessionStore()
    session[SESSION_KEY] = str(user.pk)
    session[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
    session[HASH_SESSION_KEY] = user.get_session_auth_hash()
    session.create()
    return session.session_key


def _uvicorn_only_site(tmp_path, settings, monkeypatch, *, page_drives_kicks: bool) -> Iterator:
    """uvicorn and no workers, two tiers (320, 640) in local storage."""
    _require_chromium()
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    media = tmp_path / "media"
    variants = media / "v"
    settings.MEDIA_ROOT = media
    settings.PICSITE_VARIANT_STORAGE = "local"
    settings.PICSITE_VARIANT_LOCAL_ROOT = variants
    settings.PICSITE_VARIANT_WIDTHS = [320, 640]
    live = start_site(
        db_name=connection.settings_dict["NAME"],
        media_root=media,
        variant_root=variants,
        log_dir=tmp_path / "logs",
        workers=False,
        extra_env={
            "PICSITE_ADMIN_PAGE_DRIVES_KICKS": "true" if page_drives_kicks else "false",
            "PICSITE_VARIANT_WIDTHS": "320,640",
        },
    )
    try:
        yield live
    finally:
        live.stop()


@pytest.fixture
def kick_site(transactional_db, tmp_path, settings, monkeypatch):
    """uvicorn only (no workers), with the page driving the kicks, as on a bare host."""
    yield from _uvicorn_only_site(tmp_path, settings, monkeypatch, page_drives_kicks=True)


def test_page_drives_kicks_without_a_worker(kick_site, shot, django_user_model):
    """With no worker running, the open page's kicks (one at a time) finish the run,
    and with the event stream blocked the page polls instead."""
    from playwright.sync_api import expect, sync_playwright

    from gallery.services import image_ingest

    for name in GOOD_PHOTOS:
        image_ingest(data=(CORPUS / "photos" / name).read_bytes(), filename=name)
    staff = django_user_model.objects.create_user("kick-staff", password=STAFF_PW, is_staff=True)
    grant(staff, "tasks.view_admintaskrun", "tasks.run_tasks")
    base = kick_site.base_url
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = chromium.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(20_000)
            in_flight, overlaps, kicks = [0], [0], []

            def on_request(request):
                if request.url.endswith("/kick"):
                    kicks.append(time.monotonic())
                    in_flight[0] += 1
                    overlaps[0] = max(overlaps[0], in_flight[0])

            def on_done(request):
                if request.url.endswith("/kick"):
                    in_flight[0] -= 1

            page.on("request", on_request)
            page.on("requestfinished", on_done)
            page.on("requestfailed", on_done)
            # No event stream here (a proxy that buffers it, say): the page must fall back to polling.
            page.route(re.compile(r".*/runs/\d+/events$"), lambda route: route.abort())
            login(page, base, staff.username, STAFF_PW)
            page.wait_for_url(base + "/admin/")
            page.goto(base + "/admin/tasks/")
            pre = page.get_by_test_id("panel-preprocess-images")
            expect(page.get_by_test_id("tasks-page")).to_have_attribute("data-drives-kicks", "true")
            expect(pre.get_by_test_id("count")).to_have_text("3")
            pre.get_by_test_id("budget-items").fill("100")
            pre.get_by_test_id("start").click()
            expect(pre.get_by_test_id("progress-bar")).to_have_attribute("aria-valuenow", "100", timeout=45_000)
            assert "polling" in (pre.get_attribute("data-live-seen") or "").split()
            expect(pre.get_by_test_id("status")).to_have_text("succeeded")
            shot(page, "11-page-driven-kicks-done")
        finally:
            chromium.close()
    run = AdminTaskRun.objects.get(task_key="preprocess-images")
    assert run.status == RunStatus.SUCCEEDED and run.succeeded == 3
    assert run.budget == {"items": 100}
    assert kicks, "the page never kicked"
    assert overlaps[0] == 1, "kicks overlapped"
    assert Image.objects.filter(variants_ready=True).count() == 3


def test_view_only_user_watches_without_controls_or_kicks(kick_site, shot, django_user_model):
    """A staff user with only tasks.view_admintaskrun sees the runs but no start/cancel/retry
    controls, and the open page never kicks the active run (the setting says it should)."""
    from playwright.sync_api import expect, sync_playwright

    from tasks import engine
    from tests.engine_support import make_images

    make_images(2)
    run = engine.create(task_key="metadata-refresh", scope={})
    viewer = django_user_model.objects.create_user("view-staff", password=STAFF_PW, is_staff=True)
    grant(viewer, "tasks.view_admintaskrun")
    base = kick_site.base_url
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = chromium.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(20_000)
            js_errors: list[str] = []
            kicks: list[str] = []
            page.on("pageerror", lambda exc: js_errors.append(str(exc)))
            page.on("request", lambda request: kicks.append(request.url) if request.url.endswith("/kick") else None)
            login(page, base, viewer.username, STAFF_PW)
            page.wait_for_url(base + "/admin/")
            page.goto(base + "/admin/tasks/")
            expect(page.get_by_test_id("tasks-page")).to_have_attribute("data-can-run", "false")
            expect(page.get_by_test_id("view-only")).to_be_visible()
            meta = page.get_by_test_id("panel-metadata-refresh")
            expect(meta.get_by_test_id("status")).to_have_text("queued")
            expect(meta).to_have_attribute("data-active-run", str(run.pk))
            expect(meta).to_have_attribute("data-live", re.compile("stream|polling"))  # following the run (SSE works)
            expect(meta.get_by_test_id("count")).to_have_text("2")  # preview counts still work
            for control in ("start", "cancel", "retry", "budget-items"):
                expect(page.get_by_test_id(control)).to_have_count(0)
            page.wait_for_timeout(1500)  # a page that kicks would have sent one at once (delay 0)
            shot(page, "12-view-only-task-page")
        finally:
            chromium.close()
    assert kicks == [], kicks
    assert js_errors == [], js_errors
    run.refresh_from_db()
    assert run.status == "queued" and run.processed == 0


def test_a_new_upload_replaces_its_placeholder_without_a_reload(site, browser, shot):
    """The grid is open when a photo is uploaded: its tile is a placeholder until the
    upload's job (on the site's worker) stores the first tier, then the page, polling its
    pending tiles, swaps the picture in: same document, no reload. Once every tier is in,
    the tile stops being polled."""
    from playwright.sync_api import expect

    from gallery.services import image_ingest, image_variants_enqueue

    path = CORPUS / "photos" / "canon_g9_clouds_2560x1600.jpg"
    image = image_ingest(data=path.read_bytes(), filename=path.name).image  # not enqueued yet
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    page.set_default_timeout(20_000)
    js_errors: list[str] = []
    page.on("pageerror", lambda exc: js_errors.append(str(exc)))
    polls: list[str] = []
    page.on("request", lambda request: polls.append(request.url) if "/tiles?" in request.url else None)
    page.goto(site.base_url + "/")
    tile = page.locator(f'li:has(a[href="/photos/{image.pk}/"])')
    expect(tile.locator(".ph.ph--empty")).to_have_count(1)
    expect(tile.locator("img")).to_have_count(0)
    page.evaluate("window.__sameDocument = 'still here'")
    shot(page, "12-grid-placeholder")

    image_variants_enqueue(image_ids=[image.pk])  # what the upload view does after its commit
    img = tile.locator("picture img")
    expect(img).to_have_count(1, timeout=45_000)
    page.wait_for_function("el => el.complete && el.naturalWidth > 0", arg=img.element_handle(), timeout=20_000)
    assert page.evaluate("window.__sameDocument") == "still here"
    assert polls and f"ids={image.pk}" in polls[0]
    expect(tile.locator("picture source[type='image/avif']")).to_have_attribute("srcset", re.compile(r"_320\.avif 320w"))
    page.wait_for_function("el => !el.hasAttribute('data-pending')", arg=tile.element_handle(), timeout=60_000)
    expect(tile.locator("picture source[type='image/avif']")).to_have_attribute("srcset", re.compile(r"_640\.avif 640w"))
    shot(page, "13-grid-tile-swapped-in")
    polled = len(polls)
    page.wait_for_timeout(2500)
    assert len(polls) == polled, "the page kept polling a finished tile"
    assert js_errors == [], js_errors
    context.close()


@pytest.fixture
def quiet_site(transactional_db, tmp_path, settings, monkeypatch):
    """uvicorn only: no workers and no page kicks, so the test decides when items move."""
    yield from _uvicorn_only_site(tmp_path, settings, monkeypatch, page_drives_kicks=False)


def test_batch_runs_show_a_live_item_grid_with_errors_and_deliveries(quiet_site, shot, django_user_model, settings):
    """Beside an active library run, a batch gets a card on /admin/tasks with a tile per
    requested id in submission order (missing ids marked), tiles that change live as this
    process works the batch, the failed item's error on hover and click, thumbnails of the
    items made ready, and the callback deliveries; a second batch starts from the page."""
    from playwright.sync_api import expect, sync_playwright

    from gallery.services import image_ingest
    from tasks import engine
    from tasks.models import AdminTaskItem
    from tests.engine_support import make_images
    from tests.test_batch_runs import SECRET, Receiver

    settings.PICSITE_ITEM_MAX_ATTEMPTS = 1
    settings.PICSITE_WEBHOOK_SECRET = SECRET
    settings.PICSITE_WEBHOOK_ALLOWED_HOSTS = ["127.0.0.1"]
    settings.PICSITE_WEBHOOK_RETRY_BASE_S = 0.2
    good = [image_ingest(data=(CORPUS / "photos" / n).read_bytes(), filename=n).image.pk for n in GOOD_PHOTOS[:2]]
    (broken,) = make_images(1)  # its original does not exist: the item fails
    library = engine.create(task_key="preprocess-images", scope={})
    receiver = Receiver(fail_first=1)
    requested = [good[0], 987654321, broken.pk, good[1]]
    batch = engine.create(task_key="preprocess-images", scope={"image_ids": requested}, callback_url=receiver.url)
    staff = django_user_model.objects.create_user("batch-staff", password=STAFF_PW, is_staff=True)
    grant(staff, "tasks.view_admintaskrun", "tasks.run_tasks")
    base = quiet_site.base_url
    try:
        with sync_playwright() as pw:
            chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            try:
                page = chromium.new_page(viewport={"width": 1400, "height": 1200})
                page.set_default_timeout(20_000)
                js_errors: list[str] = []
                page.on("pageerror", lambda exc: js_errors.append(str(exc)))
                login(page, base, staff.username, STAFF_PW)
                page.wait_for_url(base + "/admin/")
                page.goto(base + "/admin/tasks/")
                pre = page.get_by_test_id("panel-preprocess-images")
                expect(pre).to_have_attribute("data-active-run", str(library.pk))  # the library run, as before
                card = pre.get_by_test_id(f"batch-{batch.pk}")
                expect(card).to_be_visible()
                tiles = card.locator(".tp-tile")
                expect(tiles).to_have_count(4)
                assert [int(t.get_attribute("data-item-id")) for t in tiles.all()] == requested
                expect(card.get_by_test_id("batch-item-987654321")).to_have_attribute("data-state", "missing")
                expect(card.get_by_test_id(f"batch-item-{good[0]}")).to_have_attribute("data-state", "pending")
                expect(card).to_have_attribute("data-live", "stream")
                shot(page, "13-batch-card-pending")

                worked = engine.kick(run_id=batch.pk)  # this process is the worker; the page follows live
                assert worked.status in RunStatus.finished()
                for pk in good:
                    expect(card.get_by_test_id(f"batch-item-{pk}")).to_have_attribute("data-state", "succeeded")
                failed_tile = card.get_by_test_id(f"batch-item-{broken.pk}")
                expect(failed_tile).to_have_attribute("data-state", "failed")
                code = AdminTaskItem.objects.get(run=batch, item_id=broken.pk).last_error_code
                assert code and code in failed_tile.get_attribute("title")  # the error on hover
                failed_tile.click()
                detail = card.get_by_test_id(f"batch-item-detail-{batch.pk}")
                expect(detail).to_be_visible()
                expect(detail).to_contain_text(code)
                expect(card.get_by_test_id(f"batch-status-{batch.pk}")).to_have_text(worked.status)
                expect(card.get_by_test_id(f"batch-item-{good[0]}").locator("img")).to_have_count(1)  # its thumbnail

                delivery = card.get_by_test_id(f"delivery-{batch.pk}-1")
                expect(delivery).to_be_visible()
                deadline = time.monotonic() + 20
                while len(receiver.received) < 2 and time.monotonic() < deadline:
                    engine.finishes_process(run_id=batch.pk)  # the retry after the receiver's 500
                    time.sleep(0.3)
                expect(delivery).to_have_attribute("data-state", "delivered", timeout=15_000)
                expect(delivery).to_contain_text("HTTP 204")
                shot(page, "14-batch-card-finished")

                # A batch starts from the page while the library run is active.
                pre.get_by_test_id("scope-image_ids").check()
                pre.get_by_test_id("ids").fill(str(good[1]))
                expect(pre.get_by_test_id("count")).to_have_text("1")
                expect(pre.get_by_test_id("start")).to_be_enabled()
                pre.get_by_test_id("start").click()
                second = pre.locator(".tp-batch").first
                expect(second).not_to_have_attribute("data-run-id", str(batch.pk))
                expect(second.locator(".tp-tile")).to_have_count(1)
            finally:
                chromium.close()
    finally:
        receiver.close()
    assert js_errors == [], js_errors
    assert len(receiver.received) == 2
    started = AdminTaskRun.objects.filter(kind="batch").exclude(pk=batch.pk).get()
    assert started.scope["image_ids"] == [good[1]] and started.status == RunStatus.QUEUED
    assert AdminTaskRun.objects.get(pk=library.pk).status == RunStatus.QUEUED
