"""A real uvicorn (ASGI) server in a subprocess, on the *test* database.

Use from tests marked ``django_db(transaction=True)`` (the server is another process:
it only sees committed rows)::

    with live_uvicorn(media_root=tmp_path / "media") as base_url:
        urllib.request.urlopen(base_url + "/api/v1/schema")

The server joins the test database via PICSITE_DB_NAME (embedded Postgres) or a
rewritten DATABASE_URL, and writes media under ``media_root``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"uvicorn exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"uvicorn not listening on {port} after {timeout}s:\n{log.read_text()[-4000:]}")


def server_env(*, media_root: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a subprocess that must use this test run's database and media."""
    from django.db import connection

    db_name = connection.settings_dict["NAME"]
    env = dict(os.environ)
    env.update(
        DJANGO_SETTINGS_MODULE="picsite.settings",
        PICSITE_DB_NAME=db_name,
        PICSITE_MEDIA_ROOT=str(media_root),
        PICSITE_VARIANT_LOCAL_ROOT=str(media_root / "v"),
        PICSITE_LOG_LEVEL=os.environ.get("PICSITE_TEST_SERVER_LOG_LEVEL", "WARNING"),
        PYTHONUNBUFFERED="1",
    )
    if env.get("DATABASE_URL"):
        parts = urlsplit(env["DATABASE_URL"])
        env["DATABASE_URL"] = urlunsplit(parts._replace(path="/" + db_name))
    env.update(extra or {})
    return env


@contextmanager
def live_uvicorn(
    *, media_root: Path, env: dict[str, str] | None = None, app: str = "picsite.asgi:application",
    port: int | None = None, workers: int = 1,
) -> Iterator[str]:
    """Start ``uvicorn picsite.asgi:application`` (or ``app``) on a free loopback port (or
    ``port``); yield its base URL.

    The server's output goes to ``media_root.parent / "uvicorn-<port>.log"``.
    """
    with live_uvicorn_process(media_root=media_root, env=env, app=app, port=port, workers=workers) as (base_url, _proc):
        yield base_url


@contextmanager
def live_uvicorn_process(
    *, media_root: Path, env: dict[str, str] | None = None, app: str = "picsite.asgi:application",
    port: int | None = None, workers: int = 1,
) -> Iterator[tuple[str, subprocess.Popen]]:
    """``live_uvicorn``, also yielding the server process (its pid for /proc checks)."""
    media_root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log = media_root.parent / f"uvicorn-{port}.log"
    cmd = [
        sys.executable, "-m", "uvicorn", app,
        "--host", "127.0.0.1", "--port", str(port), *(["--workers", str(workers)] if workers > 1 else []),
        "--lifespan", "off", "--no-access-log", "--log-level", "warning", "--timeout-graceful-shutdown", "2",
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=server_env(media_root=media_root, extra=env), stdout=out, stderr=subprocess.STDOUT
        )
    try:
        _wait_for_port(port, proc, log)
        yield f"http://127.0.0.1:{port}", proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
