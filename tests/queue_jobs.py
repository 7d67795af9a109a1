"""Jobs the tests enqueue on a real django-q2 cluster (``manage.py qcluster``)."""

from __future__ import annotations

import os
import resource

_held: list[bytes] = []  # what hold_memory keeps alive for the rest of the worker's life


def worker_pid() -> dict:
    """This worker's pid and its peak RSS so far."""
    return {"pid": os.getpid(), "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}


def hold_memory(megabytes: int) -> dict:
    """Allocate ``megabytes`` (written, so resident) and keep them; then as worker_pid."""
    _held.append(b"\x01" * (megabytes << 20))
    return worker_pid()
