"""SECRET_KEY for settings: the operator's, checked, or a development checkout's own.

Imported by settings before Django is configured: nothing here may touch
``django.conf.settings``.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

# The thresholds of Django's own `check --deploy` (security.W009), so a key accepted
# here never draws that warning.
from django.core.checks.security.base import (
    SECRET_KEY_INSECURE_PREFIX,
    SECRET_KEY_MIN_LENGTH,
    SECRET_KEY_MIN_UNIQUE_CHARACTERS,
)
from django.core.exceptions import ImproperlyConfigured


def secret_key_weakness(key: str) -> str | None:
    """Why ``key`` is unfit for production, or None."""
    if key.startswith(SECRET_KEY_INSECURE_PREFIX):
        return f"it starts with {SECRET_KEY_INSECURE_PREFIX!r} (Django's throwaway keys)"
    if len(key) < SECRET_KEY_MIN_LENGTH:
        return f"it has {len(key)} characters, fewer than {SECRET_KEY_MIN_LENGTH}"
    if len(set(key)) < SECRET_KEY_MIN_UNIQUE_CHARACTERS:
        return f"it has fewer than {SECRET_KEY_MIN_UNIQUE_CHARACTERS} distinct characters"
    return None


def dev_secret_key_get_or_create(*, path: Path) -> str:
    """The key kept in ``path``; generated there (mode 0600) on first use.

    Concurrent first starts (``make run`` forks web and workers) agree on one key: each
    writes a private temporary file and hard-links it into place, and only the first
    link succeeds.
    """
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_urlsafe(50) + "\n")
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    key = path.read_text().strip()
    if not key:
        raise ImproperlyConfigured(f"{path} is empty: delete it and a new development secret is generated.")
    return key
