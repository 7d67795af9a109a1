"""The whole site as real processes, for browser tests: uvicorn plus the two
django-q2 clusters that ``make run`` starts (uploads, and ``Q_CLUSTER_NAME=backfill``).

All join the *test* database (PICSITE_DB_NAME with the embedded Postgres, or a
rewritten DATABASE_URL) and use the given media/variant roots, so the tests must be
``django_db(transaction=True)``: the processes only see committed rows. Stop the
site before the test database is flushed (``LiveSite.stop``, or use ``live_site``
as a context manager inside a fixture that depends on ``transactional_db``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def site_env(
    *, db_name: str, media_root: Path, variant_root: Path, extra: dict[str, str] | None = None
) -> dict[str, str]:
    """``live_server.server_env`` (test database, media) plus what the whole site needs."""
    from tests.live_server import server_env

    env = server_env(
        media_root=media_root,
        extra={
            "PICSITE_DB_NAME": db_name,
            "PICSITE_MEDIA_URL": "/media/",
            "PICSITE_VARIANT_STORAGE": "local",
            "PICSITE_VARIANT_LOCAL_ROOT": str(variant_root),
            "PICSITE_VARIANT_LOCAL_URL": "/media/v/",
            "DJANGO_DEBUG": "true",  # app static files via whitenoise finders
            "PICSITE_LOG_LEVEL": "INFO",  # the readiness checks read the clusters' "running." lines
            **(extra or {}),
        },
    )
    env.pop("Q_CLUSTER_NAME", None)
    return env


@dataclass
class LiveSite:
    base_url: str
    log_dir: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def logs(self, tail: int = 3000) -> str:
        """The end of every process's output (for assertion messages)."""
        parts = []
        for name in self.procs:
            path = self.log_path(name)
            text = path.read_text(errors="replace") if path.exists() else ""
            parts.append(f"----- {name} (exit {self.procs[name].poll()}) -----\n{text[-tail:]}")
        return "\n".join(parts)

    def check_alive(self) -> None:
        dead = {name: p.returncode for name, p in self.procs.items() if p.poll() is not None}
        if dead:
            raise RuntimeError(f"site processes exited: {dead}\n{self.logs()}")

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM each main process, then SIGKILL whatever is left of its group.

        Only the main process is signalled: a django-q2 cluster stops its own workers,
        and hangs if they are killed under it."""
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the group, if any
            proc.wait(5)

    def __enter__(self) -> LiveSite:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _spawn(name: str, cmd: list[str], env: dict[str, str], log_dir: Path) -> subprocess.Popen:
    with (log_dir / f"{name}.log").open("wb") as out:
        return subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _wait_http(site: LiveSite, path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        site.check_alive()
        try:
            with urllib.request.urlopen(site.base_url + path, timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            last = exc
        time.sleep(0.2)
    raise RuntimeError(f"{site.base_url}{path} not answering after {timeout}s ({last})\n{site.logs()}")


def _wait_log(site: LiveSite, name: str, needle: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    path = site.log_path(name)
    while time.monotonic() < deadline:
        site.check_alive()
        if path.exists() and needle in path.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise RuntimeError(f"{name}: no {needle!r} in its output after {timeout}s\n{site.logs()}")


def start_site(
    *,
    db_name: str,
    media_root: Path,
    variant_root: Path,
    log_dir: Path,
    workers: bool = True,
    extra_env: dict[str, str] | None = None,
    timeout: float = 45.0,
) -> LiveSite:
    """Start uvicorn (and, with ``workers``, both django-q2 clusters); wait until all are up."""
    media_root.mkdir(parents=True, exist_ok=True)
    variant_root.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    env = site_env(db_name=db_name, media_root=media_root, variant_root=variant_root, extra=extra_env)
    port = free_port()
    site = LiveSite(base_url=f"http://127.0.0.1:{port}", log_dir=log_dir)
    python = sys.executable
    try:
        site.procs["web"] = _spawn(
            "web",
            [python, "-m", "uvicorn", "picsite.asgi:application", "--host", "127.0.0.1", "--port", str(port),
             "--lifespan", "off", "--no-access-log", "--log-level", "warning", "--timeout-graceful-shutdown", "2"],
            {**env, "PICSITE_LOG_LEVEL": env.get("PICSITE_LOG_LEVEL", "WARNING")},
            log_dir,
        )  # fmt: skip
        if workers:
            worker_env = {**env, "PICSITE_LOG_LEVEL": "INFO"}
            site.procs["worker"] = _spawn("worker", [python, "manage.py", "qcluster"], worker_env, log_dir)
            site.procs["backfill"] = _spawn(
                "backfill", [python, "manage.py", "qcluster"], {**worker_env, "Q_CLUSTER_NAME": "backfill"}, log_dir
            )
        _wait_http(site, "/admin/login/", timeout)
        if workers:
            _wait_log(site, "worker", "running.", timeout)
            _wait_log(site, "backfill", "[backfill] running.", timeout)
    except BaseException:
        site.stop()
        raise
    return site
