"""Originals in a private S3 bucket (PICSITE_ORIGINALS_STORAGE=s3), against moto's
standalone server on loopback: upload, both tasks reading them back, a lost object, an
unreachable bucket, and the settings switch itself."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client

from gallery.models import Image
from gallery.services import image_ingest
from tasks import engine
from tasks.models import AdminTaskItem, ItemState, RunStatus
from tests.conftest import REPO, free_port

pytestmark = pytest.mark.django_db(transaction=True)

PHOTO = "photos/canon_g9_clouds_2560x1600.jpg"


@pytest.fixture
def s3_originals(settings, media_root, moto_server, s3_client, s3_bucket) -> str:
    """Originals go to their own bucket on the moto server; returns the bucket name."""
    settings.PICSITE_ORIGINALS_S3_BUCKET = s3_bucket
    settings.PICSITE_S3_ENDPOINT_URL = moto_server
    settings.PICSITE_S3_ACCESS_KEY_ID = "test"
    settings.PICSITE_S3_SECRET_ACCESS_KEY = "test"
    settings.PICSITE_S3_REGION = "us-east-1"
    settings.PICSITE_ITEM_RETRY_BASE_S = 0.01
    settings.PICSITE_ITEM_RETRY_CAP_S = 0.05
    settings.STORAGES = {**settings.STORAGES, "default": {"BACKEND": "gallery.originals_storage.OriginalsS3Storage"}}
    return s3_bucket


def drain(run_id: int) -> engine.AdminTaskRun:
    for _ in range(300):
        run = engine.kick(run_id=run_id)
        if run.status not in RunStatus.runnable():
            return run
        time.sleep(0.02)
    raise AssertionError("run did not finish")


def test_originals_live_in_the_private_bucket_and_both_tasks_read_them(
    s3_originals, s3_client, local_storage, media_root, corpus
):
    image = image_ingest(data=(corpus / PHOTO).read_bytes(), filename="clouds.jpg").image
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=s3_originals).get("Contents", [])]
    assert keys == [image.original.name] and image.original.name.startswith("originals/")
    assert not (media_root / "originals").exists()  # nothing on the local disk
    grants = s3_client.get_object_acl(Bucket=s3_originals, Key=keys[0])["Grants"]
    assert all("AllUsers" not in str(g.get("Grantee", {})) for g in grants)  # not public

    run = drain(engine.create(task_key="preprocess-images", scope={}).pk)
    assert (run.status, run.succeeded) == (RunStatus.SUCCEEDED, 1)
    image.refresh_from_db()
    assert image.variants_ready and image.ready_max_width == 2560

    Image.objects.filter(pk=image.pk).update(camera_make="", camera_model="", taken_at=None)
    run = drain(engine.create(task_key="metadata-refresh", scope={"missing_only": True}).pk)
    assert (run.status, run.succeeded) == (RunStatus.SUCCEEDED, 1)
    assert Image.objects.get(pk=image.pk).camera_make == "Canon"


def test_an_original_lost_from_the_bucket_is_a_coded_failed_item(s3_originals, s3_client, local_storage, corpus):
    image = image_ingest(data=(corpus / PHOTO).read_bytes(), filename="clouds.jpg").image
    s3_client.delete_object(Bucket=s3_originals, Key=image.original.name)
    run = drain(engine.create(task_key="preprocess-images", scope={}).pk)
    assert (run.status, run.failed) == (RunStatus.SUCCEEDED, 1)
    item = AdminTaskItem.objects.get(run=run, item_id=image.pk)
    assert (item.state, item.last_error_stage, item.last_error_code) == (ItemState.FAILED, "fetch", "missing_original")


def test_reupload_puts_an_original_lost_from_the_bucket_back(s3_originals, s3_client, corpus):
    data = (corpus / PHOTO).read_bytes()
    image = image_ingest(data=data, filename="clouds.jpg").image
    s3_client.delete_object(Bucket=s3_originals, Key=image.original.name)

    again = image_ingest(data=data, filename="clouds.jpg")

    assert (again.image.pk, again.created, again.original_restored) == (image.pk, False, True)
    assert s3_client.get_object(Bucket=s3_originals, Key=image.original.name)["Body"].read() == data
    assert image_ingest(data=data, filename="clouds.jpg").original_restored is False  # present now


def test_upload_to_an_unreachable_bucket_is_503_and_saves_nothing(s3_originals, settings, staff_user, corpus):
    settings.PICSITE_S3_ENDPOINT_URL = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    settings.PICSITE_S3_TIMEOUT_S = 2
    settings.STORAGES = {**settings.STORAGES}  # a fresh storage object with the new endpoint
    client = Client()
    client.force_login(staff_user)
    upload = SimpleUploadedFile("clouds.jpg", (corpus / PHOTO).read_bytes(), content_type="image/jpeg")
    response = client.post("/api/v1/images", {"file": [upload]})
    assert response.status_code == 503, response.content
    error = response.json()["error"]
    assert error["code"] == "storage_unavailable"
    assert error["details"][0]["file"] == "clouds.jpg" and error["details"][0]["code"] == "storage_unavailable"
    assert not Image.objects.exists()


@pytest.mark.parametrize(
    ("env", "expect"),
    [
        ({"PICSITE_ORIGINALS_STORAGE": "s3", "PICSITE_ORIGINALS_S3_BUCKET": "photos-private"}, "gallery.originals_storage.OriginalsS3Storage"),
        ({"PICSITE_ORIGINALS_STORAGE": "s3"}, "needs PICSITE_ORIGINALS_S3_BUCKET"),
        ({"PICSITE_ORIGINALS_STORAGE": "ftp"}, "must be 'local' or 's3'"),
        ({}, "django.core.files.storage.FileSystemStorage"),
    ],
)
def test_settings_switch_originals_storage(env, expect):
    code = "from django.conf import settings; print(settings.STORAGES['default']['BACKEND'])"
    base = {k: v for k, v in os.environ.items() if not k.startswith("PICSITE_ORIGINALS_")}
    proc = subprocess.run(
        [sys.executable, "-c", f"import django; django.setup(); {code}"],
        cwd=REPO,
        env={**base, "DJANGO_SETTINGS_MODULE": "picsite.settings", **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert expect in proc.stdout + proc.stderr
    assert (proc.returncode == 0) == (not expect.startswith(("needs", "must")))
