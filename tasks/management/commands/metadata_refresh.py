"""manage.py metadata_refresh: re-read EXIF for all, --missing-only, or --ids images.

Creates a metadata-refresh run (or adopts the active one) and drains it in this
process; see ``tasks.cli`` for the behaviour and exit codes.
"""

from __future__ import annotations

from tasks.cli import TaskCommand


class Command(TaskCommand):
    task_key = "metadata-refresh"
    help = (
        "Re-read EXIF metadata (dimensions, date, camera, lens, GPS) of every live image, or --missing-only, "
        "or --ids. Ctrl-C cancels the run. Exit 0 succeeded, 1 failed/cancelled/paused, 2 usage."
    )
