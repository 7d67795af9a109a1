"""manage.py variants_gc: reclaim variant storage: superseded sets and soft-deleted photos
past PICSITE_VARIANT_GC_GRACE_DAYS, and orphan objects (or --skip-orphans); --dry-run prints
the objects and bytes a run would reclaim.

Creates a variants-gc run (or adopts the active one) and drains it in this process; see
``tasks.cli`` for the behaviour and exit codes.
"""

from __future__ import annotations

from tasks.cli import TaskCommand


class Command(TaskCommand):
    task_key = "variants-gc"
    help = (
        "Delete superseded variant sets and purge soft-deleted photos older than the grace period, and sweep "
        "orphan variant objects (--skip-orphans: no sweep). --dry-run prints what would be reclaimed. "
        "Ctrl-C cancels the run. Exit 0 succeeded, 1 failed/cancelled/paused, 2 usage."
    )
