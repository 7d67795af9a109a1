"""manage.py preprocess_backfill: AVIF/WebP tiers for the images that miss them (default),
or --stale, --force, --failed-only, --new-only, --ids (flags from the task's scope fields).

Creates a preprocess-images run (or adopts the active one) and drains it in this
process; see ``tasks.cli`` for the behaviour and exit codes.
"""

from __future__ import annotations

from tasks.cli import TaskCommand


class Command(TaskCommand):
    task_key = "preprocess-images"
    help = (
        "Generate image variants for images that miss them (default), or --stale, --force (all, regenerated), "
        "--failed-only, --new-only or --ids (regenerated). Ctrl-C cancels the run. "
        "Exit 0 succeeded, 1 failed/cancelled/paused, 2 usage."
    )
