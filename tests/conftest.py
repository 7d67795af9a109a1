"""Shared fixtures. They compose: ``variant_root`` -> ``local_storage`` / ``s3_storage``
(-> ``moto_server``), ``staff_user`` -> ``staff_client``; ``staff_user_no_perms``.

Every test fails if an integrity violation (gallery.audit) was recorded while it ran, in
this process or any subprocess (they inherit PICSITE_INTEGRITY_AUDIT_LOG); a test that
provokes one on purpose takes it with the ``integrity_audit`` fixture.

Everything runs against the real Postgres (embedded by default) and real servers on
loopback; nothing is mocked in-process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CORPUS = Path(os.environ.get("PICSITE_CORPUS", REPO.parent / "shared" / "corpus"))


@pytest.fixture(scope="session")
def integrity_audit_log(tmp_path_factory) -> Path:
    """The session's integrity audit log, set in the environment (so servers and workers
    started by tests inherit it) and in this process's settings."""
    from django.conf import settings

    path = tmp_path_factory.mktemp("integrity") / "audit.jsonl"
    path.touch()
    previous = os.environ.get("PICSITE_INTEGRITY_AUDIT_LOG")
    os.environ["PICSITE_INTEGRITY_AUDIT_LOG"] = str(path)
    previous_setting = getattr(settings, "PICSITE_INTEGRITY_AUDIT_LOG", "")
    settings.PICSITE_INTEGRITY_AUDIT_LOG = str(path)
    yield path
    settings.PICSITE_INTEGRITY_AUDIT_LOG = previous_setting
    if previous is None:
        os.environ.pop("PICSITE_INTEGRITY_AUDIT_LOG", None)
    else:
        os.environ["PICSITE_INTEGRITY_AUDIT_LOG"] = previous


class IntegrityAudit:
    """Reads the entries appended to the audit log since the test began."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = path.stat().st_size

    def take(self) -> list[dict]:
        """New entries (whole lines only), which count as expected from now on."""
        with self.path.open("rb") as fh:
            fh.seek(self.offset)
            chunk = fh.read()
        whole = chunk[: chunk.rfind(b"\n") + 1]
        self.offset += len(whole)
        return [json.loads(line) for line in whole.splitlines()]


@pytest.fixture(autouse=True)
def _no_integrity_violations(integrity_audit_log):
    audit = IntegrityAudit(integrity_audit_log)
    yield audit
    unexpected = audit.take()
    if unexpected:
        pytest.fail(
            f"{len(unexpected)} integrity violation(s) recorded during this test "
            f"(PICSITE_INTEGRITY_AUDIT_LOG={integrity_audit_log}): {unexpected[:3]}",
            pytrace=False,
        )


@pytest.fixture
def integrity_audit(_no_integrity_violations) -> IntegrityAudit:
    """For a test that provokes an integrity violation on purpose: ``take()`` returns the
    entries recorded so far and marks them expected."""
    return _no_integrity_violations


@pytest.fixture(autouse=True)
def _test_process_is_not_a_worker(settings):
    """The engine hands a batch back after an item once its process is over
    PICSITE_WORKER_MEMORY_MB (so django-q2 can recycle a worker). The test process is not a
    worker, and its RSS grows over the suite: a test that wants the bound sets it itself."""
    settings.PICSITE_WORKER_MEMORY_MB = 1_000_000


@pytest.fixture(scope="session")
def corpus() -> Path:
    if not CORPUS.exists():
        pytest.fail(f"image corpus not found at {CORPUS} (set PICSITE_CORPUS)")
    return CORPUS


@pytest.fixture
def media_root(settings, tmp_path) -> Path:
    root = tmp_path / "media"
    root.mkdir()
    settings.MEDIA_ROOT = root
    return root


@pytest.fixture
def variant_root(settings, media_root) -> Path:
    root = media_root / "v"
    settings.PICSITE_VARIANT_LOCAL_ROOT = root
    return root


@pytest.fixture
def local_storage(settings, variant_root):
    settings.PICSITE_VARIANT_STORAGE = "local"
    from gallery.storage import variant_store_resolve

    return variant_store_resolve()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


@pytest.fixture(scope="session")
def moto_server():
    """moto's standalone S3 server on loopback for the whole session."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def s3_bucket(moto_server) -> str:
    import boto3

    name = f"picsite-{uuid.uuid4().hex[:12]}"
    client = boto3.client(
        "s3", endpoint_url=moto_server, region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test"
    )
    client.create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_client(moto_server):
    import boto3

    return boto3.client(
        "s3", endpoint_url=moto_server, region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test"
    )


@pytest.fixture
def s3_storage(settings, media_root, moto_server, s3_bucket):
    """Variant storage pointed at the moto server; returns the resolved store."""
    settings.PICSITE_VARIANT_STORAGE = "s3"
    settings.PICSITE_S3_BUCKET = s3_bucket
    settings.PICSITE_S3_ENDPOINT_URL = moto_server
    settings.PICSITE_S3_ACCESS_KEY_ID = "test"
    settings.PICSITE_S3_SECRET_ACCESS_KEY = "test"
    settings.PICSITE_S3_REGION = "us-east-1"
    from gallery.storage import variant_store_resolve

    return variant_store_resolve()


# What the task page, the task API and the upload API need (superusers need nothing).
STAFF_PERMISSIONS = ("tasks.view_admintaskrun", "tasks.run_tasks", "gallery.add_image")


@pytest.fixture
def staff_user(django_user_model):
    """A staff user allowed to watch and run tasks and to upload photos."""
    from tests.perms import grant

    user = django_user_model.objects.create_user("staff", "staff@example.com", "pw-staff-123", is_staff=True)
    return grant(user, *STAFF_PERMISSIONS)


@pytest.fixture
def staff_user_no_perms(django_user_model):
    """Staff (may log in to the admin) but granted no permission at all."""
    return django_user_model.objects.create_user("staff-np", "staff-np@example.com", "pw-staff-123", is_staff=True)


@pytest.fixture
def plain_user(django_user_model):
    return django_user_model.objects.create_user("plain", "plain@example.com", "pw-plain-123")


@pytest.fixture
def staff_client(client, staff_user):
    client.force_login(staff_user)
    return client


@pytest.fixture(scope="session", autouse=True)
def _drop_stray_connections(django_db_setup, django_db_blocker):
    """Crash tests SIGKILL workers and abandon threads; end their backends so the
    test database can be dropped at teardown."""
    yield
    from django.db import connection

    with django_db_blocker.unblock(), connection.cursor() as cur:
        cur.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
