"""manage.py taskrun KEY [--scope JSON] [--budget JSON] [--dry-run]: any registered task.

Example: ``manage.py taskrun preprocess-images --scope '{"stale": true}' --budget '{"items": 100}'``.
See ``tasks.cli`` for the behaviour and exit codes.
"""

from __future__ import annotations

from django.core.management.base import BaseCommand

from tasks import cli


class Command(BaseCommand):
    help = "Run a registered task by key, draining it in this process. Exit 0 succeeded, 1 failed/cancelled/paused, 2 usage."

    def add_arguments(self, parser):
        parser.add_argument("task_key", metavar="KEY", help=f"the task ({cli.known_task_keys()})")
        parser.add_argument("--scope", metavar="JSON", help='scope object, e.g. \'{"force": true}\' (default {})')
        parser.add_argument(
            "--budget",
            metavar="JSON",
            help='budget object, e.g. \'{"items": 100, "seconds": 600, "bytes": 1000000000}\'; '
            "for an adopted run it replaces the run's budget ('{}' removes it)",
        )
        cli.add_common_flags(parser)

    def handle(self, *args, **options):
        try:
            scope = cli.parse_json_object(options.get("scope"), what="--scope") or {}
            budget = cli.parse_json_object(options.get("budget"), what="--budget")
        except cli.UsageError as exc:
            cli.usage_exit(self, str(exc))
        cli.run_command(self, task_key=options["task_key"], scope=scope, budget=budget, options=options)
