"""manage.py metadata_refresh: re-read EXIF for all, --missing-only, or --ids images.

Creates a metadata-refresh run (or adopts the active one) and drains it in this
process; see ``tasks.cli`` for the behaviour and exit codes.
"""

from __future__ import annotations

from django.core.management.base import BaseCommand

from tasks import cli


class Command(BaseCommand):
    help = (
        "Re-read EXIF metadata (dimensions, date, camera, lens, GPS) of every live image, or --missing-only, "
        "or --ids. Ctrl-C cancels the run. Exit 0 succeeded, 1 failed/cancelled/paused, 2 usage."
    )

    def add_arguments(self, parser):
        parser.add_argument("--missing-only", action="store_true", help="only images with no date and no camera")
        cli.add_ids_flag(parser)
        cli.add_common_flags(parser)
        cli.add_budget_flags(parser)

    def handle(self, *args, **options):
        try:
            ids = cli.parse_ids(options.get("ids"))
        except cli.UsageError as exc:
            cli.usage_exit(self, str(exc))
        scope = {"missing_only": True} if options.get("missing_only") else {}
        if ids is not None:
            scope["image_ids"] = ids
        cli.run_command(
            self, task_key="metadata-refresh", scope=scope, budget=cli.budget_from_options(options), options=options
        )
