"""manage.py preprocess_backfill: make missing/stale AVIF/WebP tiers from the shell.

Creates a preprocess-images run (or adopts the active one) and drains it in this
process; see ``tasks.cli`` for the behaviour and exit codes.
"""

from __future__ import annotations

from django.core.management.base import BaseCommand

from tasks import cli


class Command(BaseCommand):
    help = (
        "Generate image variants for images that miss them (default), or --stale, --force (all), "
        "--failed-only, or --ids (regenerated). Ctrl-C cancels the run. Exit 0 succeeded, 1 failed/cancelled/paused, 2 usage."
    )

    def add_arguments(self, parser):
        parser.add_argument("--force", action="store_true", help="every live image, regenerated even when ready (a wiped or restored bucket)")
        parser.add_argument("--stale", action="store_true", help="only images made with an older recipe")
        parser.add_argument("--failed-only", action="store_true", help="only images whose last attempt failed")
        cli.add_ids_flag(parser)
        cli.add_common_flags(parser)
        cli.add_budget_flags(parser)

    def handle(self, *args, **options):
        try:
            ids = cli.parse_ids(options.get("ids"))
        except cli.UsageError as exc:
            cli.usage_exit(self, str(exc))
        scope = {name: True for name in ("force", "stale", "failed_only") if options.get(name)}
        if ids is not None:
            scope["image_ids"] = ids
        cli.run_command(
            self, task_key="preprocess-images", scope=scope, budget=cli.budget_from_options(options), options=options
        )
