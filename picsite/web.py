"""The production web server: uvicorn with one worker process per CPU.

    python -m picsite.web        (the Docker image's CMD)

Execs ``uvicorn picsite.asgi:application --workers N`` (so signals reach uvicorn, which
starts, watches and stops the workers). N is ``PICSITE_WEB_WORKERS``, or with 0 (the
default) the CPUs this process may use: its CPU affinity, capped by a cgroup v2 CPU limit
(``docker run --cpus``). One process runs Python on one core at a time, so a single process
left every other core idle (docs/configuration.md, "Web server", has the figures). It binds
``HOST`` (0.0.0.0) and ``PORT`` (8000).
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

from environs import validate

from picsite.env import env

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def web_workers(*, default: int = 0) -> int:
    """``PICSITE_WEB_WORKERS``, else ``default``; 0 means one per CPU available."""
    workers = env.int("PICSITE_WEB_WORKERS", default, validate=validate.Range(min=0))
    return workers or cpus_available()


def cpus_available() -> int:
    """CPUs this process may run on: its affinity (taskset, cpusets), capped by the cgroup's
    CPU quota rounded up (a container limited to 1.5 CPUs of a 64-core host gets 2)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    limit = _cgroup_cpu_limit()
    if limit is not None:
        cpus = min(cpus, math.ceil(limit))
    return max(1, cpus)


def _cgroup_cpu_limit() -> float | None:
    """The cgroup v2 CPU quota in CPUs ("150000 100000" = 1.5), None when unlimited or unknown."""
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return int(quota) / int(period)
    except (ValueError, ZeroDivisionError):
        return None


def uvicorn_command(*, host: str | None = None, port: str | None = None, workers: int | None = None) -> list[str]:
    """The uvicorn command line: HOST, PORT and ``web_workers()`` unless given."""
    return [
        sys.executable, "-m", "uvicorn", "picsite.asgi:application",
        "--host", host or env.str("HOST", "0.0.0.0"),
        "--port", port or env.str("PORT", "8000"),
        "--workers", str(workers if workers is not None else web_workers()),
    ]  # fmt: skip


def main() -> None:
    cmd = uvicorn_command()
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
