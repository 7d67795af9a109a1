"""Shared helpers for the benchmarks in bench/.

- ``merge_result(key, value)``: update one top-level key of bench/results.json (locked,
  written atomically, other keys untouched);
- ``bench_database()``: a throwaway database ``picsite_bench`` on the embedded server (or on
  DATABASE_URL's server), migrated, dropped at the end. The environment is pointed at it
  (PICSITE_DB_NAME, or a rewritten DATABASE_URL) *before* Django reads its settings, so worker
  subprocesses started by a bench join the same database;
- timing helpers: ``Stopwatch``, ``median_ms``.

Import this module before anything Django: it puts the repository on sys.path.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RESULTS = REPO / "bench" / "results.json"
BENCH_DB = os.environ.get("PICSITE_BENCH_DB", "picsite_bench")
CORPUS = Path(os.environ.get("PICSITE_CORPUS", REPO.parent / "shared" / "corpus"))

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "picsite.settings")


# --- results.json ---------------------------------------------------------------------------


def merge_result(key: str, value: Any, path: Path = RESULTS) -> None:
    """Set ``results[key] = value`` in ``path``, keeping every other key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]  # stable across processes
    lock_path = Path(tempfile.gettempdir()) / f"picsite-bench-results-{digest}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results: dict = {}
        if path.exists():
            try:
                results = json.loads(path.read_text())
            except json.JSONDecodeError:
                results = {}
        results[key] = value
        fd, tmp = tempfile.mkstemp(prefix=".results-", dir=path.parent)
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(results, indent=2, default=str) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; results.json is an ordinary file
        os.replace(tmp, path)


def load_results(path: Path = RESULTS) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


# --- timing ---------------------------------------------------------------------------------


class Stopwatch:
    """``with Stopwatch() as sw: ...`` then ``sw.seconds``."""

    def __enter__(self) -> Stopwatch:
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start


def median_ms(fn: Callable[[], Any], repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in milliseconds (after ``warmup`` untimed calls)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    return round(statistics.median(samples), 2)


def log(*parts: Any) -> None:
    print(*parts, file=sys.stderr, flush=True)


# --- the throwaway database -----------------------------------------------------------------


def _server() -> tuple[dict, str]:
    """Connection options for the server, and the maintenance database to connect to."""
    url = os.environ.get("PICSITE_BENCH_SERVER_URL") or os.environ.get("DATABASE_URL")
    if url:
        import dj_database_url

        cfg = dj_database_url.parse(url)
        os.environ["PICSITE_BENCH_SERVER_URL"] = url  # remembered across the rewrite below
        return cfg, cfg["NAME"] or "postgres"
    from picsite.embedded_pg import ensure_running

    return ensure_running(), "postgres"


def _connect(cfg: dict, dbname: str):
    import psycopg

    return psycopg.connect(
        host=cfg.get("HOST") or None,
        port=cfg.get("PORT") or None,
        user=cfg.get("USER") or None,
        password=cfg.get("PASSWORD") or None,
        dbname=dbname,
        autocommit=True,
    )


def _drop(cfg: dict, maintenance: str, name: str) -> None:
    with _connect(cfg, maintenance) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _point_env_at(name: str) -> None:
    os.environ["PICSITE_DB_NAME"] = name
    url = os.environ.get("PICSITE_BENCH_SERVER_URL")
    if url:
        parts = urlsplit(url)
        os.environ["DATABASE_URL"] = urlunsplit(parts._replace(path="/" + name))


@contextlib.contextmanager
def bench_database(*, name: str = BENCH_DB, migrate: bool = True) -> Iterator[str]:
    """Create, migrate and (at the end) drop a fresh database; Django is set up inside.

    A session advisory lock on the server guards the name, so a second bench (or soak)
    started meanwhile stops with a message instead of dropping this one's database.
    """
    cfg, maintenance = _server()
    guard = _connect(cfg, maintenance)
    got = guard.execute("SELECT pg_try_advisory_lock(hashtext(%s))", [f"picsite-bench:{name}"]).fetchone()[0]
    if not got:
        guard.close()
        raise SystemExit(
            f"another benchmark is using the database {name!r} on this server; wait for it, "
            "or set PICSITE_BENCH_DB to another name"
        )
    _drop(cfg, maintenance, name)
    with _connect(cfg, maintenance) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    _point_env_at(name)
    try:
        import django

        django.setup()
        if migrate:
            from django.core.management import call_command

            started = time.perf_counter()
            call_command("migrate", interactive=False, verbosity=0)
            log(f"[bench] database {name} migrated in {time.perf_counter() - started:.1f}s")
        yield name
    finally:
        with contextlib.suppress(Exception):
            from django.db import connections

            connections.close_all()
        try:
            _drop(cfg, maintenance, name)
        finally:
            guard.close()  # releases the advisory lock


@contextlib.contextmanager
def temp_media(prefix: str = "picsite-bench-media-") -> Iterator[Path]:
    """A temporary MEDIA_ROOT (variants go to MEDIA_ROOT/v); set before Django starts."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        os.environ["PICSITE_MEDIA_ROOT"] = tmp
        os.environ["PICSITE_VARIANT_STORAGE"] = "local"
        os.environ.pop("PICSITE_VARIANT_LOCAL_ROOT", None)
        yield Path(tmp)


def corpus_photos() -> list[Path]:
    photos = CORPUS / "photos"
    if not photos.is_dir():
        raise SystemExit(f"corpus not found at {photos} (set PICSITE_CORPUS)")
    return sorted(p for p in photos.iterdir() if p.is_file())


def ingest_corpus(paths: list[Path] | None = None) -> list[int]:
    """Ingest the corpus photos through image_ingest (Django must be set up)."""
    from gallery.services import image_ingest

    ids = []
    for path in paths or corpus_photos():
        ids.append(image_ingest(data=path.read_bytes(), filename=path.name).image.pk)
    return ids


# --- background load (benches that need the whole machine) ----------------------------------


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs from /proc/stat."""
    with open("/proc/stat") as fh:
        fields = [int(v) for v in fh.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    total = sum(fields[:8])
    return total - idle, total


def cpu_busy_fraction(seconds: float = 1.0) -> float:
    """Share of all CPUs busy over ``seconds`` (0..1)."""
    b0, t0 = _cpu_jiffies()
    time.sleep(seconds)
    b1, t1 = _cpu_jiffies()
    return (b1 - b0) / max(t1 - t0, 1)


def wait_for_quiet(threshold: float = 0.2, max_wait_s: float = 30) -> float:
    """Wait (up to max_wait_s) until other processes leave the CPUs mostly idle.

    Returns the last measured busy fraction so a result can say it was taken on a busy box.
    """
    deadline = time.monotonic() + max_wait_s
    busy = cpu_busy_fraction()
    warned = False
    while busy > threshold and time.monotonic() < deadline:
        if not warned:
            log(f"[bench] CPUs {busy:.0%} busy with other work; waiting up to {max_wait_s:.0f}s")
            warned = True
        busy = cpu_busy_fraction(2.0)
    return round(busy, 3)


class CpuMeter:
    """Machine-wide busy CPU-seconds during a block (all processes, all cores)."""

    def __enter__(self) -> CpuMeter:
        self._b0, self._t0 = _cpu_jiffies()
        self.busy_cpu_s = 0.0
        return self

    def __exit__(self, *exc) -> None:
        b1, _t1 = _cpu_jiffies()
        self.busy_cpu_s = (b1 - self._b0) / os.sysconf("SC_CLK_TCK")
