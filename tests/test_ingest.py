"""Getting photos in: the upload API, the admin upload form and ``import_photos``."""

from __future__ import annotations

import io
import logging
import shutil
from pathlib import Path

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import DatabaseError, OperationalError, connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django_q.models import OrmQ

from gallery.models import Image
from gallery.services import image_soft_delete
from tests.conftest import CORPUS  # honours PICSITE_CORPUS (a worktree has no ../shared)

BAD_FILES = sorted(p for p in (CORPUS / "bad").iterdir() if p.is_file())
# Small, quick to decode, and different formats.
GOOD = ["flower_exif_icc.webp", "pixel4a_paris_exif_after_idat.png", "canon_g9_clouds_2560x1600.jpg"]
API = "/api/v1/images"


# Fixtures are local to this module (tests/conftest.py belongs to another area).


@pytest.fixture
def gallery_media(settings, tmp_path) -> Path:
    """Fresh MEDIA_ROOT and local variant root for one test."""
    root = tmp_path / "media"
    root.mkdir()
    settings.MEDIA_ROOT = root
    settings.PICSITE_VARIANT_STORAGE = "local"
    settings.PICSITE_VARIANT_LOCAL_ROOT = root / "v"
    return root


@pytest.fixture
def staff(django_user_model):
    from tests.perms import grant

    user = django_user_model.objects.create_user("ingest-staff", password="pw-staff-123", is_staff=True)
    return grant(user, "gallery.add_image")  # what the upload API asks, like the admin upload form


@pytest.fixture
def api_client(staff) -> Client:
    client = Client()
    client.force_login(staff)
    return client


@pytest.fixture
def admin_client_(django_user_model) -> Client:
    admin = django_user_model.objects.create_superuser("ingest-admin", password="pw-admin-123")
    client = Client()
    client.force_login(admin)
    return client


def upload(path: Path) -> SimpleUploadedFile:
    return SimpleUploadedFile(path.name, path.read_bytes())


def photo(name: str) -> Path:
    return CORPUS / "photos" / name


def originals(media: Path) -> list[Path]:
    return [p for p in (media / "originals").rglob("*") if p.is_file()] if (media / "originals").exists() else []


def ormq_inserts(ctx: CaptureQueriesContext) -> int:
    return sum(1 for q in ctx.captured_queries if q["sql"].startswith('INSERT INTO "django_q_ormq"'))


# --- API: happy path ------------------------------------------------------------------------


def test_api_route_name():
    assert reverse("api-images") == API


@pytest.mark.django_db
def test_api_uploads_several_files(api_client, gallery_media, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        response = api_client.post(API, {"file": [upload(photo(n)) for n in GOOD]})

    assert response.status_code == 201, response.content
    body = response.json()
    assert body["rejected"] == []
    assert [img["created"] for img in body["images"]] == [True, True, True]
    assert {img["title"] for img in body["images"]} == {
        "flower exif icc", "pixel4a paris exif after idat", "canon g9 clouds 2560x1600"
    }
    by_title = {img["title"]: img for img in body["images"]}
    assert (by_title["canon g9 clouds 2560x1600"]["width"], by_title["canon g9 clouds 2560x1600"]["height"]) == (2560, 1600)
    assert all(img["image_key"].startswith("variants/") for img in body["images"])
    assert Image.objects.count() == 3
    assert len(originals(gallery_media)) == 3
    assert OrmQ.objects.count() == 3


@pytest.mark.django_db
def test_api_accepts_files_field_too(api_client, gallery_media):
    response = api_client.post(API, {"files": [upload(photo(GOOD[0]))]})
    assert response.status_code == 201
    assert len(response.json()["images"]) == 1


@pytest.mark.django_db
def test_api_duplicate_returns_existing_image(api_client, gallery_media, django_capture_on_commit_callbacks):
    first = api_client.post(API, {"file": upload(photo(GOOD[0]))}).json()["images"][0]
    with django_capture_on_commit_callbacks(execute=True):
        again = api_client.post(API, {"file": upload(photo(GOOD[0]))})

    assert again.status_code == 201
    image = again.json()["images"][0]
    assert image["created"] is False
    assert image["id"] == first["id"]
    assert Image.objects.count() == 1
    assert len(originals(gallery_media)) == 1
    assert OrmQ.objects.count() == 0  # nothing new to generate


@pytest.mark.django_db
def test_api_reupload_of_soft_deleted_photo_restores_and_requeues(
    api_client, gallery_media, django_capture_on_commit_callbacks
):
    first = api_client.post(API, {"file": upload(photo(GOOD[0]))}).json()["images"][0]
    image_soft_delete(image=Image.objects.get(pk=first["id"]))

    with django_capture_on_commit_callbacks(execute=True):
        again = api_client.post(API, {"file": upload(photo(GOOD[0]))}).json()["images"][0]

    assert again["id"] == first["id"] and again["created"] is False
    assert Image.objects.alive().filter(pk=first["id"]).exists()
    assert OrmQ.objects.count() == 1  # its variants were dropped on delete


@pytest.mark.django_db
def test_api_multi_file_upload_enqueues_in_one_insert(api_client, gallery_media, django_capture_on_commit_callbacks):
    with CaptureQueriesContext(connection) as ctx, django_capture_on_commit_callbacks(execute=True) as callbacks:
        response = api_client.post(API, {"file": [upload(photo(n)) for n in GOOD]})

    assert response.status_code == 201
    assert len(callbacks) == 1
    assert ormq_inserts(ctx) == 1
    assert OrmQ.objects.count() == 3


@pytest.mark.django_db
def test_api_mixed_batch_keeps_good_and_reports_bad(api_client, gallery_media):
    files = [upload(photo(GOOD[0])), upload(CORPUS / "bad" / "zero_bytes.jpg"), upload(CORPUS / "bad" / "truncated.png")]
    response = api_client.post(API, {"file": files})

    assert response.status_code == 201
    body = response.json()
    assert [img["title"] for img in body["images"]] == ["flower exif icc"]
    assert [r["file"] for r in body["rejected"]] == ["zero_bytes.jpg", "truncated.png"]
    assert all(r["code"] and r["message"] for r in body["rejected"])
    assert Image.objects.count() == 1


# --- API: rejection -------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("bad", BAD_FILES, ids=lambda p: p.name)
def test_api_rejects_every_bad_corpus_file(api_client, gallery_media, bad):
    response = api_client.post(API, {"file": upload(bad)})

    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["code"] == "all_rejected"
    assert len(error["details"]) == 1
    detail = error["details"][0]
    assert detail["file"] == bad.name
    assert detail["code"] and detail["message"]
    assert Image.objects.count() == 0
    assert originals(gallery_media) == []


@pytest.mark.django_db
def test_api_all_bad_batch_names_each_file(api_client, gallery_media, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        response = api_client.post(API, {"file": [upload(p) for p in BAD_FILES]})

    assert response.status_code == 400
    details = response.json()["error"]["details"]
    assert [d["file"] for d in details] == [p.name for p in BAD_FILES]
    assert Image.objects.count() == 0
    assert originals(gallery_media) == []
    assert OrmQ.objects.count() == 0


@pytest.mark.django_db
def test_api_without_file_is_400(api_client, gallery_media):
    response = api_client.post(API, {"title": "nothing"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "no_file"


@pytest.mark.django_db
@pytest.mark.parametrize("method", ["get", "put", "delete", "patch"])
def test_api_other_methods_are_405_json(api_client, method):
    response = getattr(api_client, method)(API)
    assert response.status_code == 405
    assert response["Content-Type"] == "application/json"
    assert response.json()["error"]["code"] == "method_not_allowed"
    assert response["Allow"] == "POST"


# --- API: auth ------------------------------------------------------------------------------


@pytest.mark.django_db
def test_api_anonymous_gets_401_json(client, gallery_media):
    response = client.post(API, {"file": upload(photo(GOOD[0]))})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "not_authenticated"
    assert Image.objects.count() == 0


@pytest.mark.django_db
def test_api_anonymous_gets_401_even_with_csrf_enforced(gallery_media):
    response = Client(enforce_csrf_checks=True).post(API, {"file": upload(photo(GOOD[0]))})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "not_authenticated"


@pytest.mark.django_db
def test_api_non_staff_gets_403_json(client, django_user_model, gallery_media):
    client.force_login(django_user_model.objects.create_user("visitor", password="pw-visitor-123"))
    response = client.post(API, {"file": upload(photo(GOOD[0]))})
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "forbidden"
    assert Image.objects.count() == 0


@pytest.mark.django_db
def test_api_session_needs_csrf_token(staff, gallery_media):
    client = Client(enforce_csrf_checks=True)
    client.force_login(staff)

    refused = client.post(API, {"file": upload(photo(GOOD[0]))})
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "csrf_failed"
    assert Image.objects.count() == 0

    token = "k" * 32  # any well-formed secret; the cookie and the header must agree
    client.cookies["csrftoken"] = token
    accepted = client.post(API, {"file": upload(photo(GOOD[0]))}, headers={"X-CSRFToken": token})
    assert accepted.status_code == 201, accepted.content
    assert Image.objects.count() == 1


# --- admin upload ---------------------------------------------------------------------------


@pytest.mark.django_db
def test_admin_changelist_links_upload(admin_client_, gallery_media):
    response = admin_client_.get(reverse("admin:gallery_image_changelist"))
    assert response.status_code == 200
    assert reverse("admin:gallery_image_upload").encode() in response.content
    assert b"Upload photos" in response.content


@pytest.mark.django_db
def test_admin_upload_accepts_good_and_lists_bad(admin_client_, gallery_media, django_capture_on_commit_callbacks):
    bad = [CORPUS / "bad" / "zero_bytes.jpg", CORPUS / "bad" / "text_readme.jpg"]
    with CaptureQueriesContext(connection) as ctx, django_capture_on_commit_callbacks(execute=True):
        response = admin_client_.post(
            reverse("admin:gallery_image_upload"),
            {"files": [upload(photo(GOOD[0])), upload(photo(GOOD[1])), *[upload(p) for p in bad]]},
        )

    assert response.status_code == 200
    html = response.content.decode()
    for path in bad:
        assert f"{path.name}: " in html
    assert "2 uploaded, 0 already in the gallery, 2 rejected." in html
    assert Image.objects.count() == 2
    assert ormq_inserts(ctx) == 1
    assert OrmQ.objects.count() == 2


@pytest.mark.django_db
def test_admin_upload_all_good_redirects_to_list(admin_client_, gallery_media):
    response = admin_client_.post(reverse("admin:gallery_image_upload"), {"files": [upload(photo(GOOD[0]))]})
    assert response.status_code == 302
    assert response["Location"] == reverse("admin:gallery_image_changelist")
    assert Image.objects.count() == 1
    assert admin_client_.get(response["Location"]).status_code == 200


@pytest.mark.django_db
def test_admin_soft_delete_action(admin_client_, gallery_media):
    admin_client_.post(reverse("admin:gallery_image_upload"), {"files": [upload(photo(GOOD[0]))]})
    image = Image.objects.get()
    response = admin_client_.post(
        reverse("admin:gallery_image_changelist"),
        {"action": "soft_delete_selected", "_selected_action": [image.pk]},
    )
    assert response.status_code == 302
    image.refresh_from_db()
    assert image.deleted_at is not None
    # Hidden by default, listed under "Deleted".
    change_url = reverse("admin:gallery_image_change", args=[image.pk])
    listing = admin_client_.get(reverse("admin:gallery_image_changelist")).content.decode()
    assert change_url not in listing
    deleted = admin_client_.get(reverse("admin:gallery_image_changelist") + "?status=deleted")
    assert change_url in deleted.content.decode()


# --- import_photos --------------------------------------------------------------------------


@pytest.fixture
def photo_dir(tmp_path) -> Path:
    """Three photos, one in a subfolder, plus a hidden file that must be skipped."""
    root = tmp_path / "incoming"
    (root / "sub").mkdir(parents=True)
    shutil.copy(photo(GOOD[0]), root / GOOD[0])
    shutil.copy(photo(GOOD[1]), root / GOOD[1])
    shutil.copy(photo(GOOD[2]), root / "sub" / GOOD[2])
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    return root


@pytest.mark.django_db
def test_import_photos_reports_and_fails_on_rejects(photo_dir, gallery_media, django_capture_on_commit_callbacks):
    out = io.StringIO()
    total = 3 + len(BAD_FILES)
    with (
        CaptureQueriesContext(connection) as ctx,
        django_capture_on_commit_callbacks(execute=True),
        pytest.raises(CommandError) as excinfo,
    ):
        call_command("import_photos", str(photo_dir), str(CORPUS / "bad"), stdout=out)

    assert excinfo.value.returncode == 1
    text = out.getvalue()
    lines = text.splitlines()
    assert lines[0] == f"[1/{total}] imported {photo_dir / GOOD[0]}"
    assert lines[2] == f"[3/{total}] imported {photo_dir / 'sub' / GOOD[2]}"
    for index, bad in enumerate(BAD_FILES, start=4):
        assert any(line.startswith(f"[{index}/{total}] rejected {bad} (") for line in lines), bad
        assert any(line.startswith(f"  {bad}: ") for line in lines), bad
    assert f"imported 3, duplicate 0, rejected {len(BAD_FILES)}" in text
    assert ".DS_Store" not in text
    assert Image.objects.count() == 3
    assert ormq_inserts(ctx) == 1
    assert OrmQ.objects.count() == 3


@pytest.mark.django_db
def test_import_photos_second_run_is_all_duplicates(photo_dir, gallery_media):
    call_command("import_photos", str(photo_dir), "--no-enqueue", stdout=io.StringIO())
    out = io.StringIO()
    call_command("import_photos", str(photo_dir), stdout=out)  # exit 0: nothing rejected

    assert "imported 0, duplicate 3, rejected 0" in out.getvalue()
    assert "(same as #" in out.getvalue()
    assert Image.objects.count() == 3


@pytest.mark.django_db
def test_import_photos_no_enqueue(photo_dir, gallery_media, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        call_command("import_photos", str(photo_dir), "--no-enqueue", stdout=io.StringIO())
    assert Image.objects.count() == 3
    assert OrmQ.objects.count() == 0


@pytest.mark.django_db
def test_import_photos_missing_path_is_usage_error(photo_dir, gallery_media, tmp_path):
    with pytest.raises(CommandError) as excinfo:
        call_command("import_photos", str(photo_dir), str(tmp_path / "nope"), stdout=io.StringIO())
    assert excinfo.value.returncode == 2
    assert "nope" in str(excinfo.value)
    assert Image.objects.count() == 0  # checked before importing anything


@pytest.mark.django_db
def test_import_photos_enqueues_in_batches_of_200(gallery_media, monkeypatch):
    from gallery import importer

    calls: list[list[int]] = []
    monkeypatch.setattr(importer, "ENQUEUE_BATCH", 2)
    monkeypatch.setattr(importer, "image_variants_enqueue", lambda *, image_ids: calls.append(image_ids))
    importer.import_photos(paths=[photo(n) for n in GOOD])
    assert [len(c) for c in calls] == [2, 1]


# --- one transaction per file; a queue failure after commit touches nothing -----------------


def _fail_row_save_of(monkeypatch, title: str) -> None:
    """Inserting the row titled ``title`` fails the way a lost database connection does."""
    real_save = Image.save

    def save(self, *args, **kwargs):
        if self.pk is None and self.title == title:
            raise DatabaseError("simulated: the database connection was lost")
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(Image, "save", save)


@pytest.mark.django_db(transaction=True)
def test_ingest_uploads_commits_each_file_on_its_own(gallery_media, monkeypatch):
    from gallery.importer import IngestSource, ingest_uploads

    _fail_row_save_of(monkeypatch, "pixel4a paris exif after idat")
    sources = [IngestSource(name=n, read=photo(n).read_bytes) for n in GOOD[:2]]

    with pytest.raises(DatabaseError):
        ingest_uploads(sources=sources)

    saved = Image.objects.get()  # the first file's row is committed, not rolled back
    assert saved.title == "flower exif icc"
    # Its original is kept; the second's, whose row never committed, is not left behind.
    assert originals(gallery_media) == [gallery_media / saved.original.name]
    assert saved.original.read() == photo(GOOD[0]).read_bytes()
    # And the saved image still got its variant job.
    assert OrmQ.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_api_upload_survives_a_queue_failure_after_commit(api_client, gallery_media, monkeypatch, caplog):
    import dispatch.django_q2

    def broken_enqueue(*args, **kwargs):
        raise OperationalError("simulated: the queue table is unreachable")

    monkeypatch.setattr(dispatch.django_q2, "enqueue_many", broken_enqueue)
    with caplog.at_level(logging.ERROR):
        response = api_client.post(API, {"file": [upload(photo(n)) for n in GOOD[:2]]})

    assert response.status_code == 201, response.content
    assert [img["created"] for img in response.json()["images"]] == [True, True]
    images = list(Image.objects.order_by("pk"))
    assert len(images) == 2
    assert sorted(originals(gallery_media)) == sorted(gallery_media / i.original.name for i in images)
    # Pending, not failed: the scheduled tick starts their variants later.
    assert all(not i.variants_ready and i.variants_error == "" for i in images)
    assert OrmQ.objects.count() == 0
    assert any("enqueue" in r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)


@pytest.mark.django_db(transaction=True)
def test_import_photos_survives_a_queue_failure(gallery_media, monkeypatch):
    import dispatch.django_q2
    from gallery import importer

    monkeypatch.setattr(dispatch.django_q2, "enqueue_many", lambda *a, **k: 1 / 0)
    report = importer.import_photos(paths=[photo(n) for n in GOOD[:2]])

    assert [item.status for item in report.items] == ["imported", "imported"]
    assert len(originals(gallery_media)) == 2
    assert Image.objects.filter(variants_ready=False, variants_error="").count() == 2


@pytest.mark.django_db
def test_reupload_restores_a_missing_original(api_client, gallery_media, django_capture_on_commit_callbacks):
    first = api_client.post(API, {"file": upload(photo(GOOD[0]))}).json()["images"][0]
    image = Image.objects.get(pk=first["id"])
    lost = gallery_media / image.original.name
    lost.unlink()

    with django_capture_on_commit_callbacks(execute=True):
        again = api_client.post(API, {"file": upload(photo(GOOD[0]))})

    assert again.status_code == 201
    assert again.json()["images"][0] == {**first, "created": False}
    image.refresh_from_db()
    assert gallery_media / image.original.name == lost  # same name, so the row is right again
    assert lost.read_bytes() == photo(GOOD[0]).read_bytes()
    assert originals(gallery_media) == [lost]
    assert OrmQ.objects.count() == 1  # its variants could not be made without it: try again


@pytest.mark.django_db
def test_reupload_with_original_present_writes_nothing(api_client, gallery_media, django_capture_on_commit_callbacks):
    api_client.post(API, {"file": upload(photo(GOOD[0]))})
    before = {p: p.stat().st_mtime_ns for p in originals(gallery_media)}

    with django_capture_on_commit_callbacks(execute=True):
        api_client.post(API, {"file": upload(photo(GOOD[0]))})

    assert {p: p.stat().st_mtime_ns for p in originals(gallery_media)} == before
    assert OrmQ.objects.count() == 0


@pytest.mark.django_db(transaction=True)
def test_losing_a_concurrent_upload_keeps_the_winners_original(gallery_media, monkeypatch):
    """Two requests store the same bytes under the same key (S3 overwrites rather than
    renaming); the one whose INSERT loses must not delete the file the winner's row uses."""
    from gallery import services

    data = photo(GOOD[0]).read_bytes()
    real_store = services._original_store

    def store_while_another_request_commits(*, name, data, filename):
        stored = real_store(name=name, data=data, filename=filename)
        Image.objects.create(original=stored, title="winner", image_key=services.image_key_for(data))
        return stored

    monkeypatch.setattr(services, "_original_store", store_while_another_request_commits)
    result = services.image_ingest(data=data, filename=GOOD[0])

    assert (result.created, result.image.title) == (False, "winner")
    assert (gallery_media / result.image.original.name).read_bytes() == data
