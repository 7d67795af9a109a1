"""Run a task from the command line: create a run (or adopt the active one) and drain
it in this process with ``engine.kick``. A scope of explicit ids (``--ids``) always creates
its own *batch* run, beside whatever else runs, never adopting another, and ends with a
table of its items in the order given (id, state, error code, seconds).

The management commands only parse arguments and call ``run_cli``: ``taskrun KEY`` runs
any registered task, and a definition that declares a ``command`` gets one of its own
(``preprocess_backfill``, ``metadata_refresh``, ``variants_gc``: ``task_command``). Exit codes:

0  the run succeeded (in a library-wide run individual items may still have failed; they
   are listed), or there was nothing to do, or a dry run
1  the run failed, was cancelled (Ctrl-C cancels it), paused on its budget, stalled,
   or the task cannot run here (e.g. variant storage not configured); or a batch (--ids)
   had an item that failed (ids that do not exist are reported as missing, not failed)
2  usage error: unknown task, bad ids, conflicting flags, invalid scope or budget
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
import uuid
from collections.abc import Callable
from typing import TextIO

from django.core.management.base import BaseCommand
from django.utils import timezone

from tasks import engine, registry, selectors
from tasks.models import AdminTaskRun, ItemState, RunKind, RunStatus
from tasks.registry import ScopeFieldType
from tasks.text import format_bytes, format_duration

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
PLAIN_EVERY_S = 2.0
TTY_BAR_WIDTH = 28
MAX_FAILED_LISTED = 50


class UsageError(ValueError):
    """Bad command-line input (exit code 2)."""


# --- argument helpers (shared by the management commands) --------------------------------


def parse_ids(values: list[str] | str | None) -> list[int] | None:
    """``["1,2", "3"]`` or ``"1, 2 3"`` -> [1, 2, 3]; None when not given."""
    if values is None:
        return None
    if isinstance(values, str):
        values = [values]
    ids: list[int] = []
    for value in values:
        for token in value.replace(",", " ").split():
            if not token.isdigit() or int(token) <= 0:
                raise UsageError(f"--ids takes positive integer ids separated by commas, not {token!r}")
            ids.append(int(token))
    if not ids:
        raise UsageError("--ids needs at least one id")
    return list(dict.fromkeys(ids))


def parse_json_object(text: str | None, *, what: str) -> dict | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{what} is not valid JSON: {exc.msg} (at character {exc.pos})") from None
    if not isinstance(value, dict):
        raise UsageError(f"{what} must be a JSON object, e.g. '{{}}'")
    return value


def budget_from_flags(*, items: int | None, seconds: float | None, bytes_: int | None) -> dict | None:
    budget = {k: v for k, v in (("items", items), ("seconds", seconds), ("bytes", bytes_)) if v is not None}
    return budget or None


# --- output -----------------------------------------------------------------------------


def _write(stream: TextIO, text: str) -> None:
    # Django's OutputWrapper appends a newline unless told not to; progress needs \r.
    try:
        stream.write(text, ending="")  # type: ignore[call-arg]
    except TypeError:
        stream.write(text)
    with contextlib.suppress(AttributeError, ValueError):
        stream.flush()


def _line(stream: TextIO, text: str) -> None:
    _write(stream, text + "\n")


class _Progress:
    """One updating bar line on a TTY; plain lines at most every 2 s otherwise."""

    def __init__(self, stdout: TextIO, *, is_tty: bool, clock: Callable[[], float]):
        self.stdout = stdout
        self.is_tty = is_tty
        self.clock = clock
        self.last_plain = None
        self.bar_open = False
        self.width = 0

    def update(self, run: AdminTaskRun, *, force: bool = False) -> dict:
        """Show the run's live counters; returns them."""
        c = engine.live_counters(run)
        p = engine.progress(run, processed=c["processed"])
        rate = p["items_per_second"]
        eta = format_duration(p["eta_seconds"]) if run.status in RunStatus.runnable() else "--:--"
        counts = f"{c['processed']}/{run.total}"
        if self.is_tty:
            filled = int(TTY_BAR_WIDTH * min(p["percent"], 100.0) / 100)
            bar = "#" * filled + "-" * (TTY_BAR_WIDTH - filled)
            text = f"[{bar}] {counts} {p['percent']:5.1f}%  {rate:.2f} items/s  ETA {eta}"
            if c["failed"]:
                text += f"  failed {c['failed']}"
            pad = max(0, self.width - len(text))
            self.width = len(text)
            _write(self.stdout, "\r" + text + " " * pad)
            self.bar_open = True
            return c
        now = self.clock()
        if force or self.last_plain is None or now - self.last_plain >= PLAIN_EVERY_S:
            self.last_plain = now
            _line(
                self.stdout,
                f"run #{run.pk} {run.status}: {counts} ({p['percent']:.1f}%), {rate:.2f} items/s, ETA {eta}"
                f" - succeeded {c['succeeded']}, skipped {c['skipped']}, failed {c['failed']}",
            )
        return c

    def close(self) -> None:
        if self.bar_open:
            _write(self.stdout, "\n")
            self.bar_open = False


# --- the command ------------------------------------------------------------------------


def run_cli(
    *,
    task_key: str,
    scope: dict | None,
    budget: dict | None,
    dry_run: bool,
    stdout: TextIO,
    stderr: TextIO,
    is_tty: bool,
    stall_seconds: float = 60.0,
    kick_seconds: float = 2.0,
    idle_sleep: float = 0.5,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Create (or adopt) a run of ``task_key`` and drain it here. Returns the exit code.

    ``budget`` None means "not given" (an adopted run keeps its own); ``{}`` clears it.
    """
    scope = {} if scope is None else scope
    try:
        defn = registry.get(task_key)
    except registry.UnknownTask:
        _line(stderr, f"error: unknown task {task_key!r} (known: {known_task_keys()})")
        return EXIT_USAGE
    try:
        preview = engine.preview_count(task_key=task_key, scope=scope)
        clean_budget = engine.normalize_budget(budget) if budget is not None else None
    except (engine.InvalidScope, engine.InvalidBudget) as exc:
        _line(stderr, f"error: {exc.message}")
        return EXIT_USAGE
    except engine.EngineError as exc:
        _line(stderr, f"error: {exc.message}")
        return EXIT_USAGE

    # A batch of explicit ids is a run of its own: it never adopts the library run.
    batch = defn.batch_ids(preview.scope) is not None
    active = None if batch else selectors.run_active(task_key=task_key)
    if dry_run:
        return _dry_run(defn, preview, clean_budget, active, stdout)

    run, code = _create_or_adopt(task_key, scope, preview, clean_budget, active, stdout, stderr)
    if run is None:
        return code
    return _drain(
        run,
        stdout=stdout,
        stderr=stderr,
        is_tty=is_tty,
        stall_seconds=stall_seconds,
        kick_seconds=kick_seconds,
        idle_sleep=idle_sleep,
        clock=clock,
        sleep=sleep,
    )


def _dry_run(defn, preview: engine.Preview, budget: dict | None, active, stdout) -> int:
    est = preview.estimate
    _line(stdout, f"Dry run: {defn.title} ({defn.key})")
    _line(stdout, f"  scope: {json.dumps(preview.scope)}")
    _line(stdout, f"  {preview.count} items would be processed")
    if preview.batch and preview.batch["missing"]:
        _line(stdout, f"  {preview.batch['missing']} ids do not exist: {_id_list(preview.batch['missing_ids'])}")
    if preview.count:
        parts = [f"about {format_duration(est.get('cpu_seconds'))} of processing"]
        if est.get("bytes"):
            parts.append(f"{format_bytes(est['bytes'])} written")
        if est.get("object_writes"):
            parts.append(f"{est['object_writes']} object writes")
        if "money" in est:
            parts.append(f"about ${est['money']:.4f}")
        basis = "recent runs" if est.get("basis") == "history" else "default per-item costs"
        _line(stdout, f"  estimate: {', '.join(parts)} (from {basis})")
    if preview.details:
        # The definition's own figures (variants-gc: what a run would reclaim).
        summary = preview.details.get("summary")
        _line(stdout, f"  {summary}" if summary else f"  details: {json.dumps(preview.details)}")
    if budget:
        _line(stdout, f"  budget: {json.dumps(budget)}")
    if active is not None:
        _line(stdout, f"  note: run #{active.pk} is {active.status}; a real run would adopt it")
    _line(stdout, "Nothing was created.")
    return EXIT_OK


def _create_or_adopt(task_key, scope, preview, budget, active, stdout, stderr) -> tuple[AdminTaskRun | None, int]:
    for _ in range(2):
        if active is None:
            try:
                run = engine.create(task_key=task_key, scope=scope, budget=budget)
            except engine.EmptyScope as exc:
                if exc.details.get("missing"):
                    _line(stdout, f"Nothing to do: none of the ids exist ({_id_list(exc.details['missing'])}).")
                else:
                    _line(stdout, f"Nothing to do: no items match the scope {json.dumps(preview.scope)}.")
                return None, EXIT_OK
            except engine.StorageNotConfigured as exc:
                _line(stderr, f"error: {exc.message}")
                return None, EXIT_FAILED
            except engine.RunAlreadyActive:
                # Someone started one between our look and our create: adopt it.
                active = selectors.run_active(task_key=task_key)
                continue
            except engine.EngineError as exc:
                _line(stderr, f"error: {exc.message}")
                return None, EXIT_USAGE
            _line(stdout, f"Created run #{run.pk} of {task_key}: {run.total} items, scope {json.dumps(run.scope)}"
                  + (f", budget {json.dumps(run.budget)}" if run.budget else ""))
            return run, EXIT_OK
        run = active
        _line(
            stdout,
            f"Adopting active run #{run.pk} of {task_key} ({run.status}, "
            f"{engine.live_counters(run)['processed']}/{run.total} done, "
            f"scope {json.dumps(run.scope)}); it keeps its own scope.",
        )
        if preview.scope != run.scope:
            _line(stdout, f"  note: the scope you asked for ({json.dumps(preview.scope)}) is not used.")
        if budget is not None and budget != (run.budget or {}):
            try:
                run = engine.set_budget(run_id=run.pk, budget=budget)
            except engine.EngineError as exc:
                _line(stderr, f"error: {exc.message}")
                return None, EXIT_USAGE
            _line(stdout, f"  budget set to {json.dumps(run.budget) if run.budget else 'none'} (was {json.dumps(active.budget or {})})")
        return run, EXIT_OK
    _line(stderr, f"error: could not create or adopt a run of {task_key}")
    return None, EXIT_FAILED


def _waiting_on_backoff(run: AdminTaskRun) -> float | None:
    """Seconds until the next retry is due, when the run only waits on retry backoff."""
    if run.status not in RunStatus.runnable():
        return None
    now = timezone.now()
    nxt = selectors.run_next_retry_at(run=run, after=now)
    if nxt is None:
        return None
    return max(0.0, (nxt - now).total_seconds())


def _drain(
    run: AdminTaskRun,
    *,
    stdout,
    stderr,
    is_tty: bool,
    stall_seconds: float,
    kick_seconds: float,
    idle_sleep: float,
    clock,
    sleep,
) -> int:
    owner = f"cli-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    bar = _Progress(stdout, is_tty=is_tty, clock=clock)
    last_change = clock()
    try:
        last_processed = bar.update(run, force=True)["processed"]
        while True:
            started = clock()
            run = engine.kick(run_id=run.pk, time_budget_s=kick_seconds, owner=owner)
            processed = bar.update(run)["processed"]  # live: other workers' pending items count too
            if run.status in RunStatus.finished() or run.status == RunStatus.PAUSED:
                break
            now = clock()
            if processed != last_processed:
                last_processed, last_change = processed, now
                continue
            wait = _waiting_on_backoff(run)
            if wait is not None and not selectors.run_has_work_besides_retries(run=run):
                # Retries are due later: not a stall, just wait for the earliest one.
                last_change = now
                sleep(min(max(wait, 0.05), 1.0))
                continue
            if now - last_change >= stall_seconds:
                bar.close()
                _stalled(run, now - last_change, stderr)
                return EXIT_FAILED
            if now - started < idle_sleep:
                sleep(idle_sleep)  # nothing claimable right now (another worker holds it)
    except KeyboardInterrupt:
        bar.close()
        return _interrupted(run.pk, owner, stdout, stderr)
    bar.close()
    return _summary(run, stdout)


def _stalled(run: AdminTaskRun, seconds: float, stderr) -> None:
    holder = selectors.run_lease_holder(run=run)
    _line(
        stderr,
        f"run #{run.pk} made no progress for {seconds:.0f}s (stuck at {run.processed}/{run.total}, status {run.status}).",
    )
    if holder is not None:
        _line(
            stderr,
            f"  a batch is leased by {holder.lease_owner!r} until {holder.lease_expires_at:%Y-%m-%d %H:%M:%S} UTC; "
            "if that worker is dead the run resumes once the lease expires.",
        )
    _line(stderr, f"  the run was left {run.status}; run this command again to adopt it, or cancel it from /admin/tasks/.")


def _interrupted(run_id: int, owner: str, stdout, stderr) -> int:
    _line(stdout, f"Interrupted: cancelling run #{run_id} ...")
    try:
        # Hand our unfinished batches back so the cancel can finish at once.
        engine.release_worker_batches(run_id=run_id, owner=owner)
        run = engine.cancel(run_id=run_id)
    except engine.InvalidTransition:
        run = selectors.run_get(run_id=run_id)
        _line(stdout, f"run #{run_id} had already {run.status}.")
        return _summary(run, stdout)
    if run.status == RunStatus.CANCELLED:
        _line(stdout, f"cancelled run #{run_id} ({run.processed}/{run.total} processed).")
    else:
        _line(stdout, f"cancelled run #{run_id}: it is {run.status}; other workers stop at their next check.")
    return EXIT_FAILED


def _summary(run: AdminTaskRun, stdout) -> int:
    run = selectors.run_get(run_id=run.pk)
    c = engine.live_counters(run)  # a paused run's batches may still hold pending items
    p = engine.progress(run, processed=c["processed"])
    _line(
        stdout,
        f"Run #{run.pk} {run.status}: {c['processed']}/{run.total} processed in {format_duration(p['elapsed_seconds'])} - "
        f"succeeded {c['succeeded']}, skipped {c['skipped']}, failed {c['failed']}.",
    )
    if run.kind == RunKind.BATCH:
        _item_table(run, stdout)
    failed = selectors.run_failed_items(run=run, limit=MAX_FAILED_LISTED + 1)
    if failed:
        _line(stdout, "Failed items:")
        for item in failed[:MAX_FAILED_LISTED]:
            _line(
                stdout,
                f"  item {item.item_id}: {item.last_error_stage}/{item.last_error_code} - {item.last_error_message[:200]}"
                f" (after {item.attempts} attempt{'s' if item.attempts != 1 else ''})",
            )
        if len(failed) > MAX_FAILED_LISTED:
            _line(stdout, f"  ... and more; see /admin/tasks/ for run #{run.pk}.")
    if run.status == RunStatus.SUCCEEDED:
        if run.failed:
            _line(stdout, "Some items failed: retry them from /admin/tasks/ (Retry failed) or with a failed-only scope.")
            if run.kind == RunKind.BATCH:
                return EXIT_FAILED  # a batch is done only when every item it names is
        return EXIT_OK
    if run.status == RunStatus.PAUSED:
        reason = next((i.get("message") for i in run.recent_issues or [] if i.get("code") == "budget"), "")
        _line(
            stdout,
            f"Run #{run.pk} is paused: its budget {json.dumps(run.budget)} is reached"
            + (f" ({reason})" if reason else "")
            + ".",
        )
        _line(
            stdout,
            "  To go on, raise the budget: run this command again with a larger --budget-items/--budget-seconds/"
            f"--budget-bytes (or `manage.py taskrun {run.task_key} --budget '{{...}}'`); it adopts run #{run.pk} "
            "and resumes it. Or cancel it from /admin/tasks/.",
        )
        return EXIT_FAILED
    if run.last_error:
        _line(stdout, f"Error: {run.last_error}")
    return EXIT_FAILED


def _id_list(ids: list[int], limit: int = 20) -> str:
    shown = ", ".join(str(i) for i in ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def _item_table(run: AdminTaskRun, stdout) -> None:
    """Every item of a batch run in the order given: id, state, error code, seconds."""
    rows = [
        (
            str(item.item_id),
            engine.public_state(item.state),
            item.last_error_code or "-",
            f"{item.seconds:.2f}" if item.started_at else "-",
        )
        for item in selectors.run_items_all(run_id=run.pk)
    ]
    header = ("id", "state", "error", "seconds")
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=False)]
    _line(stdout, f"Items of run #{run.pk} (in the order given):")
    for cells in (header, *rows):
        _line(stdout, "  " + "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip())
    missing = [row[0] for row in rows if row[1] == ItemState.MISSING]
    if missing:
        _line(stdout, f"  {len(missing)} ids did not exist (or were deleted) and were not processed.")


# --- glue for the management commands ------------------------------------------------------


def _positive(convert: Callable[[str], float], what: str) -> Callable[[str], float]:
    """An argparse ``type`` taking a positive number (NaN is not positive)."""

    def parse(text: str) -> float:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
        return value

    return parse


_positive_int = _positive(int, "a whole number")
_positive_float = _positive(float, "a number")


def add_budget_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("budget (the run pauses when the next item would exceed it)")
    group.add_argument("--budget-items", type=_positive_int, metavar="N", help="process at most N items")
    group.add_argument("--budget-seconds", type=_positive_float, metavar="S", help="at most S seconds of processing")
    group.add_argument("--budget-bytes", type=_positive_int, metavar="B", help="write at most B bytes")


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true", help="print the item count and estimate; create nothing")
    parser.add_argument(
        "--stall-seconds",
        type=_positive_float,
        default=60.0,
        metavar="S",
        help="give up (exit 1) when the run makes no progress for S seconds (default 60)",
    )


class TaskCommand(BaseCommand):
    """``manage.py <command>`` for one task: a flag per scope field of its definition
    (``force`` -> ``--force``, ``image_ids`` -> its declared ``--ids 1,2,3``), budget flags,
    ``--dry-run`` and ``--stall-seconds``. Made by ``task_command``."""

    task_key: str

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        for scope_field in registry.get(self.task_key).scope_fields:
            flag = scope_field.flag
            if scope_field.type == ScopeFieldType.BOOL:
                parser.add_argument(flag, dest=scope_field.name, action="store_true", help=scope_field.help)
            elif scope_field.type == ScopeFieldType.INT_LIST:
                parser.add_argument(
                    flag,
                    dest=scope_field.name,
                    action="append",
                    metavar="1,2,3",
                    help=f"{scope_field.help} (comma-separated; may be given more than once)",
                )
            else:
                parser.add_argument(flag, dest=scope_field.name, choices=scope_field.choices, help=scope_field.help)
        add_common_flags(parser)
        add_budget_flags(parser)

    def handle(self, *args, **options) -> None:
        scope: dict = {}
        try:
            for scope_field in registry.get(self.task_key).scope_fields:
                value = options.get(scope_field.name)
                if scope_field.type == ScopeFieldType.INT_LIST:
                    value = parse_ids(value)
                if value not in (None, False):
                    scope[scope_field.name] = value
        except UsageError as exc:
            usage_exit(self, str(exc))
        run_command(self, task_key=self.task_key, scope=scope, budget=budget_from_options(options), options=options)


def task_command(command: str) -> type[TaskCommand]:
    """The ``Command`` class of the task that declares ``command`` (its module in
    ``tasks/management/commands/`` is this one call: Django finds commands by file name)."""
    defn = registry.by_command(command)
    return type("Command", (TaskCommand,), {"task_key": defn.key, "help": defn.command_help or defn.title})


def known_task_keys() -> str:
    return ", ".join(d.key for d in registry.all_definitions() if d.listed)


def budget_from_options(options: dict) -> dict | None:
    return budget_from_flags(
        items=options.get("budget_items"), seconds=options.get("budget_seconds"), bytes_=options.get("budget_bytes")
    )


def run_command(command, *, task_key: str, scope: dict, budget: dict | None, options: dict) -> None:
    """Run and turn a non-zero result into SystemExit (manage.py exits with it)."""
    code = run_cli(
        task_key=task_key,
        scope=scope,
        budget=budget,
        dry_run=bool(options.get("dry_run")),
        stdout=command.stdout,
        stderr=command.stderr,
        is_tty=command.stdout.isatty(),
        stall_seconds=options.get("stall_seconds") or 60.0,
    )
    if code:
        raise SystemExit(code)


def usage_exit(command, message: str) -> None:
    _line(command.stderr, f"error: {message}")
    raise SystemExit(EXIT_USAGE)
