"""The engine's SQL by name, read once at import from the ``.sql`` files in ``sql/``, and
the shapes of the rows it returns.

A file holds statements (``-- name: x``) and fragments (``-- fragment: x``): ``{x}`` in a
statement or fragment stands for fragment ``x``, spliced in here, once. Full-line comments
document the SQL in the file and are not sent to the server.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from importlib.resources import files
from types import MappingProxyType
from typing import Any, NamedTuple

_HEADER = re.compile(r"^--\s*(name|fragment):\s*(\w+)\s*$")
_SPLICE = re.compile(r"\{(\w+)\}")


def _parse(text: str, source: str) -> tuple[dict[str, str], dict[str, str]]:
    """(statements, fragments) of one file; text before the first header is its preamble."""
    found: dict[str, dict[str, str]] = {"name": {}, "fragment": {}}
    kind = name = None
    lines: list[str] = []

    def close() -> None:
        if name is not None:
            found[kind][name] = "\n".join(lines).strip()

    for line in text.splitlines():
        header = _HEADER.match(line.strip())
        if header:
            close()
            kind, name, lines = header.group(1), header.group(2), []
            if name in found["name"] or name in found["fragment"]:
                raise ValueError(f"{source}: {name!r} defined twice")
        elif name is not None and not line.lstrip().startswith("--"):
            lines.append(line.rstrip())
    close()
    return found["name"], found["fragment"]


def _splice(text: str, fragments: dict[str, str], seen: tuple[str, ...] = ()) -> str:
    def one(match: re.Match) -> str:
        ref = match.group(1)
        if ref in seen:
            raise ValueError(f"fragment {ref!r} includes itself")
        if ref not in fragments:
            raise KeyError(f"no SQL fragment named {ref!r}")
        return _splice(fragments[ref], fragments, (*seen, ref))

    return _SPLICE.sub(one, text)


def load(package: str = "tasks.engine", folder: str = "sql") -> Mapping[str, str]:
    """Every statement of ``package/folder/*.sql`` by name, fragments spliced in."""
    statements: dict[str, str] = {}
    fragments: dict[str, str] = {}
    for entry in sorted(files(package).joinpath(folder).iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".sql"):
            continue
        named, frags = _parse(entry.read_text(encoding="utf-8"), entry.name)
        for name in {*named, *frags} & {*statements, *fragments}:
            raise ValueError(f"{entry.name}: {name!r} is defined in another file too")
        statements.update(named)
        fragments.update(frags)
    return MappingProxyType({name: _splice(text, fragments) for name, text in statements.items()})


SQL = load()


# --- rows ---------------------------------------------------------------------------------


class CheckpointRow(NamedTuple):
    """What a checkpoint statement returns."""

    locked: bool  # the run's try-lock was free (else nothing ran: try again)
    status: str | None  # the run's status; None: the batch is not this worker's any more
    budget: Any  # jsonb (Django registers a loader that hands back text)
    spent_items: int | None
    spent_seconds: float | None
    spent_bytes: int | None
    spent_writes: int | None
    notified: Any = None  # folds only: the NOTIFY call's result


class AdoptedBatch(NamedTuple):
    id: int
    item_ids: Any  # jsonb list (or its text)
    position: int
    is_retry: bool


class PendingCounters(NamedTuple):
    """A batch's counters not yet folded into its run (``counters.PENDING_INTO_RUN``)."""

    processed: int
    succeeded: int
    skipped: int
    seconds: float
    bytes: int
    writes: int


class LiveCounters(NamedTuple):
    processed: int
    succeeded: int
    skipped: int
    failed: int
    spent_items: int
    spent_seconds: float
    spent_bytes: int
    spent_writes: int
