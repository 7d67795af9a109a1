"""A worker process for crash and cross-process tests.

``python -m tests.engine_worker kick RUN_ID`` drains a run; ``drain RUN_ID`` runs the real
django-q2 drain job in a loop until the run ends (what a backfill worker does); ``cancel
RUN_ID`` cancels it. Joins the test database named by PICSITE_DB_NAME.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "picsite.settings")


def main() -> int:
    import django

    django.setup()
    import tests.engine_support  # noqa: F401  (registers the test task)
    from tasks import engine

    command, run_id = sys.argv[1], int(sys.argv[2])
    if command == "kick":
        run = engine.kick(run_id=run_id)
        print(run.status, flush=True)
    elif command == "drain":
        import time

        from tasks.jobs import drain_run_job
        from tasks.models import RunStatus

        while (status := drain_run_job(run_id)) not in (*RunStatus.finished(), "gone"):
            if status != "continued":
                time.sleep(1)  # waiting on retries or on other workers: the schedule's job
        print(status, flush=True)
    elif command == "cancel":
        print(engine.cancel(run_id=run_id).status, flush=True)
    else:
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
