"""`make run`: the whole site on one machine.

Starts the embedded Postgres (unless DATABASE_URL is set), migrates, creates a
staff account on first run (credentials printed once), installs the tick schedule,
then runs the ASGI server and two django-q2 clusters (uploads + backfill). Ctrl-C
stops all of them.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time

PORT = os.environ.get("PORT", "8000")
HOST = os.environ.get("HOST", "127.0.0.1")


def _setup() -> None:
    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "picsite.settings")
    django.setup()
    from django.contrib.auth import get_user_model
    from django.core.management import call_command

    call_command("migrate", interactive=False, verbosity=0)
    User = get_user_model()
    if not User.objects.filter(is_staff=True).exists():
        password = secrets.token_urlsafe(12)
        User.objects.create_superuser("admin", "admin@localhost", password)
        print("\n" + "=" * 60)
        print("  Staff account created (shown once):")
        print("    username: admin")
        print(f"    password: {password}")
        print("  Change it in the admin, or: manage.py changepassword admin")
        print("=" * 60 + "\n", flush=True)
    from tasks.jobs import ensure_tick_schedule

    ensure_tick_schedule()


def web_command() -> list[str]:
    """uvicorn as in production, with one process unless PICSITE_WEB_WORKERS says more (a
    development site has one user; more processes cost start-up time and memory)."""
    from picsite.web import uvicorn_command, web_workers

    return uvicorn_command(host=HOST, port=PORT, workers=web_workers(default=1))


def main() -> int:
    _setup()
    python = sys.executable
    env = dict(os.environ, DJANGO_SETTINGS_MODULE="picsite.settings")
    commands = {
        "web": web_command(),
        "worker": [python, "manage.py", "qcluster"],
        "backfill": [python, "manage.py", "qcluster"],
    }
    procs: dict[str, subprocess.Popen] = {}
    for name, cmd in commands.items():
        proc_env = dict(env, Q_CLUSTER_NAME="backfill") if name == "backfill" else env
        procs[name] = subprocess.Popen(cmd, env=proc_env, start_new_session=True)
    print(f"picsite on http://{HOST}:{PORT}/  (admin: /admin/, tasks: /admin/tasks/) — Ctrl-C stops", flush=True)

    stopping = False

    def stop(*_args) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    exit_code = 0
    while not stopping:
        for name, proc in procs.items():
            if proc.poll() is not None:
                print(f"{name} exited with {proc.returncode}; stopping the rest", flush=True)
                exit_code = proc.returncode or 1
                stopping = True
                break
        time.sleep(0.3)
    for proc in procs.values():
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
    deadline = time.monotonic() + 15
    for proc in procs.values():
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    print("stopped.", flush=True)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
