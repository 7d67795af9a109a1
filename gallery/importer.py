"""Many files in, one variant-job INSERT out.

Shared by the upload API, the admin upload form and ``manage.py import_photos``:
each file goes through ``image_ingest``; a file that is refused becomes a
``rejected`` entry instead of failing the batch, and the variant jobs of all new
images are enqueued together.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from django.conf import settings

from gallery.imaging import ImageRejected
from gallery.models import Image
from gallery.services import (
    OriginalStorageError,
    image_ingest,
    image_key_for,
    image_variants_enqueue,
)

ENQUEUE_BATCH = 200

Status = Literal["imported", "duplicate", "rejected"]


@dataclass
class IngestSource:
    """One file to ingest: a display name, its size if known, and how to read it."""

    name: str
    read: Callable[[], bytes]
    size: int | None = None


@dataclass
class IngestItem:
    name: str
    status: Status
    image: Image | None = None
    code: str = ""
    message: str = ""
    # New row, a soft-deleted one brought back (its variants were deleted), or one whose
    # missing original this upload restored before its variants were made.
    needs_variants: bool = False


@dataclass
class IngestReport:
    items: list[IngestItem] = field(default_factory=list)

    def _with(self, status: Status) -> list[IngestItem]:
        return [item for item in self.items if item.status == status]

    @property
    def imported(self) -> list[IngestItem]:
        return self._with("imported")

    @property
    def duplicates(self) -> list[IngestItem]:
        return self._with("duplicate")

    @property
    def rejected(self) -> list[IngestItem]:
        return self._with("rejected")

    @property
    def accepted(self) -> list[IngestItem]:
        return [item for item in self.items if item.status != "rejected"]

    @property
    def variant_image_ids(self) -> list[int]:
        ids = [item.image.pk for item in self.items if item.needs_variants and item.image]
        return list(dict.fromkeys(ids))  # one job per image even if sent twice


def ingest_one(*, source: IngestSource, uploaded_by=None) -> IngestItem:
    """Ingest one file; refusal is returned as a ``rejected`` item, not raised."""
    limit = settings.PICSITE_MAX_UPLOAD_BYTES
    if source.size is not None and source.size > limit:
        # Refuse before reading a huge file into memory.
        return IngestItem(
            source.name, "rejected", code="too_large",
            message=f"{source.size} bytes is over the {limit}-byte upload limit.",
        )
    try:
        data = source.read()
    except OSError as exc:
        return IngestItem(source.name, "rejected", code="unreadable", message=f"could not read the file: {exc}")
    # image_ingest restores a soft-deleted twin without saying so; we need to know,
    # because soft delete removed its variants.
    was_deleted = Image.objects.filter(image_key=image_key_for(data), deleted_at__isnull=False).exists()
    try:
        result = image_ingest(data=data, filename=source.name, uploaded_by=uploaded_by)
    except (ImageRejected, OriginalStorageError) as exc:
        return IngestItem(source.name, "rejected", code=exc.code, message=exc.message)
    # A restored original lets variants that failed for want of it be made.
    restored = result.original_restored and not result.image.variants_ready
    return IngestItem(
        source.name,
        "imported" if result.created else "duplicate",
        image=result.image,
        needs_variants=result.created or was_deleted or restored,
    )


def ingest_many(
    *,
    sources: Iterable[IngestSource],
    uploaded_by=None,
    on_item: Callable[[int, IngestItem], None] | None = None,
) -> IngestReport:
    """Ingest each source in turn. Does not enqueue and opens no transaction."""
    report = IngestReport()
    for index, source in enumerate(sources, start=1):
        item = ingest_one(source=source, uploaded_by=uploaded_by)
        report.items.append(item)
        if on_item is not None:
            on_item(index, item)
    return report


def ingest_uploads(*, sources: Sequence[IngestSource], uploaded_by=None) -> IngestReport:
    """One request's files, each committed on its own, then ONE enqueue call.

    A file that fails, even with an unexpected error, never undoes the files before it,
    and those still get their variant jobs. Used by the API and the admin upload form.
    """
    report = IngestReport()
    try:
        for source in sources:
            report.items.append(ingest_one(source=source, uploaded_by=uploaded_by))
    finally:
        image_variants_enqueue(image_ids=report.variant_image_ids)  # never raises
    return report


# --- import from the filesystem ---------------------------------------------------------


class ImportPathError(Exception):
    """A path given to the importer does not exist (a usage error)."""


def import_paths_collect(*, paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Files named, and files under the folders named (recursively, sorted).

    Hidden files and folders (".DS_Store", ".git") are skipped.
    """
    missing = [str(p) for p in paths if not Path(p).exists()]
    if missing:
        raise ImportPathError("no such file or directory: " + ", ".join(missing))
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files.extend(sorted(_walk(path)))
        else:
            files.append(path)
    return files


def _walk(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith("."):
                yield Path(dirpath) / name


def import_photos(
    *,
    paths: Sequence[str | os.PathLike],
    enqueue: bool = True,
    uploaded_by=None,
    on_item: Callable[[int, int, Path, IngestItem], None] | None = None,
) -> IngestReport:
    """Import files and folders; enqueue new images' variant jobs, 200 per INSERT.

    Each file commits on its own, so a long import that stops half way keeps what
    it did. Raises ImportPathError before touching anything if a path is missing.
    """
    files = import_paths_collect(paths=paths)
    total = len(files)
    # Full paths as names: the report names them, and the title comes from the basename.
    sources = (IngestSource(name=str(path), read=path.read_bytes, size=_size_or_none(path)) for path in files)

    def progress(index: int, item: IngestItem) -> None:
        if on_item is not None:
            on_item(index, total, files[index - 1], item)

    report = ingest_many(sources=sources, uploaded_by=uploaded_by, on_item=progress)
    if enqueue:
        ids = report.variant_image_ids
        for start in range(0, len(ids), ENQUEUE_BATCH):
            image_variants_enqueue(image_ids=ids[start : start + ENQUEUE_BATCH])
    return report


def _size_or_none(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None
