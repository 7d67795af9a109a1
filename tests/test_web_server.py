"""The production web server: ``python -m picsite.web`` (the Docker image's CMD) runs uvicorn
with one worker process per CPU it may use, or PICSITE_WEB_WORKERS of them."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.request

import psutil
import pytest

from tests.live_server import REPO, free_port, server_env


def test_docker_cmd_is_the_production_launcher():
    text = (REPO / "Dockerfile").read_text()
    [cmd] = re.findall(r"^CMD\s+(\[.*\])\s*$", text, flags=re.M)
    assert json.loads(cmd) == ["python", "-m", "picsite.web"]


def _command(monkeypatch, **environ) -> list[str]:
    from picsite import web

    for name in ("PICSITE_WEB_WORKERS", "HOST", "PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    return web.uvicorn_command()


def _option(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def test_one_worker_per_cpu_by_default(monkeypatch):
    from picsite import web

    monkeypatch.setattr(web.os, "sched_getaffinity", lambda pid: {0, 1, 2})
    monkeypatch.setattr(web, "_cgroup_cpu_limit", lambda: None)
    cmd = _command(monkeypatch)
    assert cmd[:4] == [sys.executable, "-m", "uvicorn", "picsite.asgi:application"]
    assert (_option(cmd, "--workers"), _option(cmd, "--host"), _option(cmd, "--port")) == ("3", "0.0.0.0", "8000")

    # A container limited to 1.5 CPUs (cgroup cpu.max) of a bigger host: 2 workers.
    monkeypatch.setattr(web, "_cgroup_cpu_limit", lambda: 1.5)
    assert _option(_command(monkeypatch), "--workers") == "2"


def test_workers_setting_wins(monkeypatch):
    cmd = _command(monkeypatch, PICSITE_WEB_WORKERS="5", HOST="127.0.0.1", PORT="9001")
    assert (_option(cmd, "--workers"), _option(cmd, "--host"), _option(cmd, "--port")) == ("5", "127.0.0.1", "9001")


@pytest.mark.parametrize("value", ["-1", "two"])
def test_bad_workers_setting_stops_with_its_name(monkeypatch, value):
    from environs import EnvValidationError

    with pytest.raises(EnvValidationError, match="PICSITE_WEB_WORKERS"):
        _command(monkeypatch, PICSITE_WEB_WORKERS=value)


def test_cgroup_cpu_limit_parses_cpu_max(tmp_path, monkeypatch):
    from picsite import web

    cpu_max = tmp_path / "cpu.max"
    monkeypatch.setattr(web, "CGROUP_CPU_MAX", cpu_max)
    assert web._cgroup_cpu_limit() is None  # no cgroup v2 file
    cpu_max.write_text("max 100000\n")
    assert web._cgroup_cpu_limit() is None
    cpu_max.write_text("150000 100000\n")
    assert web._cgroup_cpu_limit() == 1.5


def _get(url: str) -> int:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status


@pytest.mark.django_db(transaction=True)
def test_production_command_serves_with_n_worker_processes(tmp_path):
    """The launcher execs uvicorn (one process tree, signals reach it) with N workers that
    all come up and answer; SIGTERM stops them all."""
    port = free_port()
    env = server_env(media_root=tmp_path / "media", extra={"PICSITE_WEB_WORKERS": "2", "HOST": "127.0.0.1", "PORT": str(port)})
    (tmp_path / "media").mkdir()
    log = tmp_path / "web.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "picsite.web"], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        workers: list[psutil.Process] = []
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            workers = [c for c in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(c.cmdline())]
            try:
                if len(workers) == 2 and _get(f"http://127.0.0.1:{port}/healthz") == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        assert "uvicorn" in " ".join(psutil.Process(proc.pid).cmdline())  # exec'd, not a wrapper
        assert len(workers) == 2, log.read_text()[-3000:]
        assert all(_get(f"http://127.0.0.1:{port}/healthz") == 200 for _ in range(10))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    assert not [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]


def test_devserver_keeps_one_web_process_unless_told(monkeypatch):
    from picsite import devserver

    monkeypatch.delenv("PICSITE_WEB_WORKERS", raising=False)
    assert _option(devserver.web_command(), "--workers") == "1"
    monkeypatch.setenv("PICSITE_WEB_WORKERS", "3")
    assert _option(devserver.web_command(), "--workers") == "3"


def test_bench_runs_the_docker_cmd():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import bench_pages
    finally:
        sys.path.remove(str(REPO / "bench"))
    assert bench_pages.production_command(port=1234) == [sys.executable, "-m", "picsite.web"]
