"""``manage.py import_photos PATH [PATH ...] [--no-enqueue]``: adapter over gallery.importer."""

from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from gallery.importer import ImportPathError, IngestItem, import_photos


class Command(BaseCommand):
    help = (
        "Import photo files and folders (walked recursively, in sorted order) into the gallery. "
        "Exits 1 if any file was rejected, 2 if a path does not exist."
    )

    def add_arguments(self, parser):
        parser.add_argument("paths", nargs="+", metavar="PATH", help="photo file or folder")
        parser.add_argument(
            "--no-enqueue",
            action="store_true",
            help="do not queue variant generation (a backfill task can do it later)",
        )

    def handle(self, *args, paths: list[str], no_enqueue: bool, **options):
        try:
            report = import_photos(paths=paths, enqueue=not no_enqueue, on_item=self._progress)
        except ImportPathError as exc:
            raise CommandError(str(exc), returncode=2) from exc

        rejected = report.rejected
        summary = f"imported {len(report.imported)}, duplicate {len(report.duplicates)}, rejected {len(rejected)}"
        self.stdout.write(self.style.WARNING(summary) if rejected else self.style.SUCCESS(summary))
        for item in rejected:
            self.stdout.write(f"  {item.name}: {item.code}: {item.message}")
        if not no_enqueue and report.variant_image_ids:
            self.stdout.write(f"queued variant generation for {len(report.variant_image_ids)} image(s)")
        if rejected:
            raise CommandError(f"{len(rejected)} file(s) rejected", returncode=1)

    def _progress(self, index: int, total: int, path: Path, item: IngestItem) -> None:
        line = f"[{index}/{total}] {item.status} {path}"
        if item.status == "rejected":
            line += f" ({item.code}: {item.message})"
        elif item.status == "duplicate" and item.image is not None:
            line += f" (same as #{item.image.pk})"
        self.stdout.write(line)
