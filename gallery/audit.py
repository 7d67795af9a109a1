"""Integrity audit log: every integrity violation (today: a refused overwrite of a variant
object) is logged at ERROR and appended as one JSON line to PICSITE_INTEGRITY_AUDIT_LOG.

Several processes (web server, workers) share the file: each line is one ``write`` on an
``O_APPEND`` descriptor, so lines never interleave. The test suite points the log at a
file of its own and fails any test during which a line appeared.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from datetime import UTC, datetime

logger = logging.getLogger(__name__)

ENV_VAR = "PICSITE_INTEGRITY_AUDIT_LOG"


def audit_log_path() -> str:
    """The configured audit log file, or "" when auditing only logs."""
    from django.conf import settings

    if settings.configured:
        return getattr(settings, ENV_VAR, "") or ""
    return os.environ.get(ENV_VAR, "")


def audit_record(kind: str, **details: object) -> None:
    """Record one integrity violation. Never raises: the violation is the news, not the log."""
    logger.error("integrity violation %s: %s", kind, json.dumps(details, default=str, sort_keys=True))
    path = audit_log_path()
    if not path:
        return
    entry = {
        "ts": datetime.now(UTC).isoformat(),
        "kind": kind,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "details": details,
    }
    line = (json.dumps(entry, default=str, sort_keys=True) + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, line)  # one write per line: whole lines under concurrent appends
        finally:
            os.close(fd)
    except OSError:
        logger.exception("could not append to the integrity audit log %s", path)
