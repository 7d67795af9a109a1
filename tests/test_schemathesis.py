"""Property-based check of the live API against its own OpenAPI document.

schemathesis reads ``GET /api/v1/schema`` from a real uvicorn server (test database,
tmp media) and fires generated requests (valid and invalid) at every operation as a
staff bearer-token caller: no response may be a 5xx, and every response must match
the documented schema for its status code.

The SSE operation is left out: a generated id that hits an active run would hold a
stream open for up to 10 minutes (tests/test_sse.py covers it).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image as PILImage

from api.auth import api_token_create
from tasks import engine
from tests.engine_support import make_images
from tests.live_server import live_uvicorn

pytestmark = pytest.mark.django_db(transaction=True)

SCHEMATHESIS = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or "schemathesis"


def seed(media_root: Path) -> None:
    """A few images with real originals (so kicks and ticks do real work) and runs."""
    images = make_images(6)
    for image in images:
        path = media_root / image.original.name
        path.parent.mkdir(parents=True, exist_ok=True)
        PILImage.new("RGB", (48, 32), (200, 100, 50)).save(path, "JPEG")
    finished = engine.create(task_key="metadata-refresh", scope={"image_ids": [images[0].pk]})
    engine.cancel(run_id=finished.pk)


def test_api_conforms_to_its_openapi_document(tmp_path, staff_user):
    media = tmp_path / "server-media"
    media.mkdir()
    seed(media)
    token = api_token_create(user=staff_user, name="schemathesis")[1]
    server_env = {
        "PICSITE_PUSH_TICK_BUDGET_S": "2",
        "PICSITE_ADMIN_PAGE_DRIVES_KICKS": "true",
        "PICSITE_PUSH_SECRET": "schemathesis-secret",
        "PICSITE_VARIANT_STORAGE": "local",
        "PICSITE_ITEM_TIME_LIMIT_S": "10",
    }
    with live_uvicorn(media_root=media, env=server_env) as base_url:
        cmd = [
            SCHEMATHESIS, "run", f"{base_url}/api/v1/schema",
            "--checks", "not_a_server_error,response_schema_conformance",
            "-H", f"Authorization: Bearer {token}",
            "--max-examples", "20",
            "--exclude-path-regex", "/events$",
            "--request-timeout", "30",
            "--suppress-health-check", "all",
            "--seed", "20251122",
            "--max-failures", "10",
        ]  # fmt: skip
        result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    report = result.stdout[-12000:] + result.stderr[-3000:]
    assert result.returncode == 0, report
