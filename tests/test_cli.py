"""The task commands: ``tasks.cli.run_cli`` directly, and the management commands
(``preprocess_backfill``, ``metadata_refresh``, ``taskrun``) for argument parsing.

Synthetic rows drive the test task ("test-mark-ready"); the real preprocess and
metadata tasks run over three small corpus photos on a temporary MEDIA_ROOT.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection

from gallery.models import Image
from gallery.services import image_ingest
from tasks import cli, engine, registry
from tasks.models import AdminTaskItem, AdminTaskRun, ItemState, RunStatus
from tests.engine_support import TEST_TASK_KEY, make_images

pytestmark = pytest.mark.django_db(transaction=True)

REPO = Path(__file__).resolve().parents[1]
CORPUS = Path(os.environ.get("PICSITE_CORPUS", REPO.parent / "shared" / "corpus"))
SMALL_PHOTOS = ["flower_exif_icc.webp", "pixel4a_paris_exif_after_idat.png", "canon_g9_clouds_2560x1600.jpg"]


@pytest.fixture(autouse=True)
def fast_retries(settings):
    settings.PICSITE_ITEM_RETRY_BASE_S = 0.01
    settings.PICSITE_ITEM_RETRY_CAP_S = 0.05
    settings.PICSITE_ITEM_MAX_ATTEMPTS = 3


def run(task_key=TEST_TASK_KEY, *, scope=None, budget=None, dry_run=False, is_tty=False, **kwargs):
    """run_cli with captured output: (exit code, stdout text, stderr text)."""
    out, err = io.StringIO(), io.StringIO()
    code = cli.run_cli(
        task_key=task_key,
        scope=scope if scope is not None else {},
        budget=budget,
        dry_run=dry_run,
        stdout=out,
        stderr=err,
        is_tty=is_tty,
        **kwargs,
    )
    return code, out.getvalue(), err.getvalue()


def command(name: str, *args: str) -> tuple[int, str, str]:
    """call_command with captured output; SystemExit becomes the exit code."""
    out, err = io.StringIO(), io.StringIO()
    try:
        call_command(name, *args, stdout=out, stderr=err)
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, out.getvalue(), err.getvalue()


# --- run_cli: outcomes and exit codes -----------------------------------------------------------


def test_dry_run_prints_count_and_estimate_and_creates_nothing():
    make_images(4)
    code, out, err = run(dry_run=True)
    assert code == 0, err
    assert "4 items would be processed" in out
    assert "estimate:" in out and "object writes" in out
    assert "Nothing was created." in out
    assert AdminTaskRun.objects.count() == 0


def test_success_exit_0_with_plain_lines_when_not_a_tty():
    images = make_images(6)
    code, out, err = run()
    assert code == 0, err
    run_obj = AdminTaskRun.objects.get()
    assert run_obj.status == RunStatus.SUCCEEDED
    assert f"Created run #{run_obj.pk} of {TEST_TASK_KEY}: 6 items" in out
    assert "\r" not in out  # no bar redraws in a log file
    assert f"run #{run_obj.pk} queued: 0/6 (0.0%)" in out  # the first plain progress line
    assert f"Run #{run_obj.pk} succeeded: 6/6 processed" in out
    assert "succeeded 6, skipped 0, failed 0." in out
    assert Image.objects.filter(pk__in=[i.pk for i in images], variants_ready=True).count() == 6


def test_tty_draws_one_updating_bar_line():
    make_images(3)
    code, out, _ = run(is_tty=True)
    assert code == 0
    bar_updates = out.count("\r[")
    assert bar_updates >= 2
    first_bar = out.index("\r[")
    # All bar frames share one line: no newline until the bar is closed.
    bar_part = out[first_bar : out.index("\n", first_bar)]
    assert bar_part.count("\r[") == bar_updates
    assert "3/3 100.0%" in bar_part and "items/s" in bar_part and "ETA" in bar_part
    assert "Run #" in out.split("\n", 2)[-1]


def test_plain_progress_is_printed_at_most_every_two_seconds():
    t = [100.0]
    out = io.StringIO()
    bar = cli._Progress(out, is_tty=False, clock=lambda: t[0])
    make_images(1)
    run_obj = engine.create(task_key=TEST_TASK_KEY, scope={})
    for _ in range(20):  # 10 s in half-second steps
        bar.update(run_obj)
        t[0] += 0.5
    lines = out.getvalue().splitlines()
    assert len(lines) == 5  # t = 100, 102, 104, 106, 108
    bar.update(run_obj, force=True)
    assert len(out.getvalue().splitlines()) == 6


def test_failed_items_are_listed_with_codes_and_the_run_still_succeeds():
    images = make_images(3, titles={1: "fail-always"})
    code, out, _ = run()
    assert code == 0
    assert "succeeded 2, skipped 0, failed 1." in out
    assert "Failed items:" in out
    assert f"item {images[1].pk}: process/boom - this item always fails (after 3 attempts)" in out


def test_failed_run_exits_1_with_the_error():
    make_images(3, titles={0: "fatal"})
    code, out, _ = run()
    assert code == 1
    assert AdminTaskRun.objects.get().status == RunStatus.FAILED
    assert "failed:" in out and "Error: storage configuration removed" in out


def test_budget_pause_exits_1_and_says_how_to_raise_it():
    make_images(5)
    code, out, _ = run(budget={"items": 2})
    assert code == 1
    run_obj = AdminTaskRun.objects.get()
    assert run_obj.status == RunStatus.PAUSED and run_obj.processed == 2
    assert f"Run #{run_obj.pk} is paused" in out
    assert "--budget-items" in out and f"adopts run #{run_obj.pk}" in out

    # Running again with a larger budget adopts the paused run and finishes it.
    code, out, _ = run(budget={"items": 50})
    assert code == 0
    assert f"Adopting active run #{run_obj.pk}" in out and "budget set to" in out
    run_obj.refresh_from_db()
    assert run_obj.status == RunStatus.SUCCEEDED and run_obj.processed == 5
    assert AdminTaskRun.objects.count() == 1


def test_adopted_paused_run_without_a_new_budget_stays_paused():
    make_images(3)
    run(budget={"items": 1})
    code, out, _ = run()
    assert code == 1
    assert "Adopting active run" in out and "is paused" in out


def test_adopts_the_active_run_instead_of_creating_one():
    make_images(4)
    existing = engine.create(task_key=TEST_TASK_KEY, scope={})
    code, out, _ = run()
    assert code == 0
    assert f"Adopting active run #{existing.pk} of {TEST_TASK_KEY} (queued, 0/4 done" in out
    assert AdminTaskRun.objects.count() == 1
    existing.refresh_from_db()
    assert existing.status == RunStatus.SUCCEEDED


def test_nothing_to_do_exits_0():
    code, out, _ = run()
    assert code == 0
    assert "Nothing to do" in out
    assert AdminTaskRun.objects.count() == 0


@pytest.mark.parametrize(
    ("task_key", "scope", "budget", "message"),
    [
        ("no-such-task", {}, None, "unknown task 'no-such-task'"),
        (TEST_TASK_KEY, {"nope": 1}, None, "unknown scope key 'nope'"),
        (TEST_TASK_KEY, {}, {"items": 0}, "budget items must be a positive number"),
        (TEST_TASK_KEY, {}, {"coins": 3}, "unknown budget key 'coins'"),
        ("preprocess-images", {"force": True, "stale": True}, None, "choose one of"),
        ("preprocess-images", {"image_ids": [1, -2]}, None, "positive integer ids"),
    ],
)
def test_usage_errors_exit_2_on_stderr(task_key, scope, budget, message):
    make_images(1)
    code, out, err = run(task_key, scope=scope, budget=budget)
    assert code == 2
    assert message in err
    assert AdminTaskRun.objects.count() == 0


def test_storage_not_configured_exits_1(settings):
    settings.PICSITE_VARIANT_STORAGE = "none"
    make_images(1)
    code, _, err = run("preprocess-images")
    assert code == 1, err
    assert "error:" in err


# --- stalls and backoff ---------------------------------------------------------------------------


def test_a_run_held_by_a_stuck_worker_is_reported_as_stalled():
    make_images(3)
    run_obj = engine.create(task_key=TEST_TASK_KEY, scope={})
    # Another worker claims every item under a long lease and then never moves.
    claim = engine._claim_batch(run_obj.pk, registry.get(TEST_TASK_KEY), "stuck-worker")
    assert claim is not None and len(claim.item_ids) == 3
    connection.close()  # commit/leave nothing open for the CLI's own kicks
    started = time.monotonic()
    code, out, err = run(stall_seconds=1.0, kick_seconds=0.2, idle_sleep=0.1)
    assert code == 1
    assert time.monotonic() - started < 10
    assert f"Adopting active run #{run_obj.pk}" in out
    assert f"run #{run_obj.pk} made no progress for 1s (stuck at 0/3" in err
    assert "leased by 'stuck-worker'" in err
    run_obj.refresh_from_db()
    assert run_obj.status == RunStatus.RUNNING  # left for the lease to expire / another worker


def test_waiting_on_retry_backoff_is_not_a_stall(settings):
    settings.PICSITE_ITEM_RETRY_BASE_S = 1.0
    settings.PICSITE_ITEM_RETRY_CAP_S = 1.5  # first retry 0.5-1.0 s later
    make_images(3, titles={2: "fail-once"})
    code, out, err = run(stall_seconds=0.3, kick_seconds=0.5, idle_sleep=0.05)
    assert code == 0, err
    assert "made no progress" not in err
    run_obj = AdminTaskRun.objects.get()
    assert run_obj.succeeded == 3 and run_obj.failed == 0
    assert AdminTaskItem.objects.get(run=run_obj).state == ItemState.SUCCEEDED


# --- Ctrl-C -------------------------------------------------------------------------------------------


def test_keyboard_interrupt_cancels_the_run(monkeypatch):
    monkeypatch.setenv("PICSITE_TEST_ITEM_DELAY", "0.05")
    make_images(30)
    real_kick = engine.kick
    calls = []

    def kick_then_ctrl_c(**kwargs):
        calls.append(kwargs)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_kick(**kwargs)

    monkeypatch.setattr(cli.engine, "kick", kick_then_ctrl_c)
    code, out, _ = run(kick_seconds=0.2)
    assert code == 1
    run_obj = AdminTaskRun.objects.get()
    assert run_obj.status == RunStatus.CANCELLED
    assert 0 < run_obj.processed < 30
    assert f"cancelled run #{run_obj.pk}" in out


CTRL_C_SCRIPT = """
import os, signal, sys
# As in a terminal: a shell that starts a job in the background (CI harnesses do) makes it
# ignore SIGINT, and the child would inherit that and never see the Ctrl-C.
signal.signal(signal.SIGINT, signal.default_int_handler)
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "picsite.settings")
import django
django.setup()
import tests.engine_support  # registers test-mark-ready
from tasks import cli
sys.exit(cli.run_cli(task_key="test-mark-ready", scope={}, budget=None, dry_run=False,
                     stdout=sys.stdout, stderr=sys.stderr, is_tty=False))
"""


def test_real_sigint_during_an_item_cancels_cleanly():
    make_images(100)  # 20 s of items: the run cannot end between its first checkpoint and the signal
    env = dict(os.environ, PICSITE_DB_NAME=connection.settings_dict["NAME"], PICSITE_TEST_ITEM_DELAY="0.2")
    proc = subprocess.Popen(
        [sys.executable, "-c", CTRL_C_SCRIPT], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 90  # a loaded CI machine starts Django slowly
        while time.monotonic() < deadline and not AdminTaskRun.objects.filter(processed__gte=2).exists():
            time.sleep(0.1)
        started = AdminTaskRun.objects.filter(processed__gte=2).exists()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert started, "the command checkpointed no item within 90 s"
    assert proc.returncode == 1, err
    run_obj = AdminTaskRun.objects.get()
    assert run_obj.status == RunStatus.CANCELLED, (out, err)
    assert f"cancelled run #{run_obj.pk}" in out
    assert run_obj.processed < 100


# --- management commands: argument parsing --------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "args", "message"),
    [
        ("preprocess_backfill", ["--ids", "1,x"], "positive integer ids"),
        ("preprocess_backfill", ["--ids", "0"], "positive integer ids"),
        ("preprocess_backfill", ["--force", "--stale"], "choose one of force, stale"),
        ("preprocess_backfill", ["--failed-only", "--ids", "3"], "choose one of"),
        ("preprocess_backfill", ["--new-only", "--stale"], "(got stale, new_only)"),
        ("metadata_refresh", ["--missing-only", "--ids", "1,2"], "choose one of missing_only, image_ids"),
        ("taskrun", ["no-such-task"], "unknown task"),
        ("taskrun", [TEST_TASK_KEY, "--scope", "{nope"], "--scope is not valid JSON"),
        ("taskrun", [TEST_TASK_KEY, "--scope", "[1]"], "--scope must be a JSON object"),
        ("taskrun", [TEST_TASK_KEY, "--budget", '{"items": -3}'], "budget items must be a positive number"),
    ],
)
def test_command_usage_errors_exit_2(name, args, message):
    code, _, err = command(name, *args)
    assert code == 2
    assert message in err
    assert AdminTaskRun.objects.count() == 0


def test_command_rejects_a_non_numeric_budget():
    with pytest.raises(CommandError, match="--budget-items: not a whole number"):
        call_command("preprocess_backfill", "--budget-items", "lots", stdout=io.StringIO())


def test_taskrun_runs_a_task_by_key_and_exits_0():
    make_images(3)
    code, out, _ = command("taskrun", TEST_TASK_KEY, "--scope", "{}")
    assert code == 0
    assert "succeeded 3, skipped 0, failed 0." in out


def test_taskrun_budget_json_pauses_and_exits_1():
    make_images(3)
    code, out, _ = command("taskrun", TEST_TASK_KEY, "--budget", '{"items": 1}')
    assert code == 1
    assert "is paused" in out


def test_ids_may_be_repeated_and_comma_separated():
    assert cli.parse_ids(["1,2", "3", "2 , 4"]) == [1, 2, 3, 4]
    assert cli.parse_ids(None) is None
    with pytest.raises(cli.UsageError):
        cli.parse_ids([","])


# --- the real tasks over corpus photos -------------------------------------------------------------


@pytest.fixture
def photos(settings, local_storage, variant_root):
    settings.PICSITE_VARIANT_WIDTHS = [320, 640]  # two tiers keep the encode short
    images = []
    for name in SMALL_PHOTOS:
        path = CORPUS / "photos" / name
        images.append(image_ingest(data=path.read_bytes(), filename=name).image)
    return images


def test_preprocess_backfill_over_corpus_photos(photos, variant_root):
    code, out, err = command("preprocess_backfill", "--dry-run")
    assert code == 0, err
    assert "3 items would be processed" in out and "Nothing was created." in out
    assert AdminTaskRun.objects.count() == 0

    code, out, err = command("preprocess_backfill")
    assert code == 0, out + err
    assert "succeeded 3, skipped 0, failed 0." in out
    assert Image.objects.filter(variants_ready=True).count() == 3
    written = [p for p in variant_root.rglob("*") if p.is_file()]
    avif = [p for p in written if p.suffix == ".avif"]
    assert len(avif) >= 3  # one or two tiers per image, each in both formats
    assert len([p for p in written if p.suffix == ".webp"]) == len(avif)

    code, out, _ = command("preprocess_backfill")
    assert code == 0 and "Nothing to do" in out

    code, out, _ = command("preprocess_backfill", "--force", "--ids", f"{photos[0].pk}", "--dry-run")
    assert code == 2  # force and ids conflict

    code, out, _ = command("preprocess_backfill", "--ids", f"{photos[0].pk},{photos[1].pk}")
    assert code == 0
    assert "2/2 processed" in out and "succeeded 2, skipped 0" in out  # named images are regenerated


def test_preprocess_backfill_lists_undecodable_originals(photos, media_root):
    bad = CORPUS / "bad" / "truncated_photo.jpg"
    (media_root / "originals").mkdir(exist_ok=True)
    shutil.copy(bad, media_root / "originals" / "broken.jpg")
    broken = Image.objects.create(original="originals/broken.jpg", image_key="variants/" + "b" * 32, title="broken")
    code, out, err = command("preprocess_backfill")
    assert code == 0, out + err
    assert "succeeded 3, skipped 0, failed 1." in out
    assert f"item {broken.pk}: decode/" in out
    item = AdminTaskItem.objects.get(item_id=broken.pk)
    assert item.state == ItemState.FAILED and item.attempts == 1  # a decode error is not retried


def test_metadata_refresh_over_corpus_photos(photos):
    code, out, err = command("metadata_refresh", "--dry-run")
    assert code == 0 and "3 items would be processed" in out
    Image.objects.filter(pk=photos[2].pk).update(camera_make="", camera_model="", taken_at=None)
    code, out, err = command("metadata_refresh", "--missing-only")
    assert code == 0, out + err
    assert "1/1 processed" in out
    assert Image.objects.get(pk=photos[2].pk).camera_make  # re-read from the EXIF


def test_backfill_flags_follow_the_scope_fields(photos):
    """Every scope field of preprocess-images is a flag of the command (TaskCommand)."""
    from tasks import registry

    names = {f.name for f in registry.get("preprocess-images").scope_fields}
    assert names == {"force", "stale", "failed_only", "new_only", "image_ids"}
    Image.objects.filter(pk=photos[0].pk).update(variants_error="decode/truncated: x")
    code, out, _ = command("preprocess_backfill", "--new-only", "--dry-run")
    assert code == 0 and "2 items would be processed" in out  # never attempted: not the failed one
    code, out, _ = command("preprocess_backfill", "--failed-only", "--dry-run")
    assert code == 0 and "1 items would be processed" in out


# --- batches (--ids): their own run, a table of items, exit 1 on a failed item -----------------


def table_rows(out: str, run_id: int) -> list[list[str]]:
    """The rows of the item table printed for run ``run_id`` (header first)."""
    lines = out.splitlines()
    start = lines.index(f"Items of run #{run_id} (in the order given):") + 1
    rows = []
    for line in lines[start:]:
        if not line.startswith("  ") or line.strip().endswith("were not processed."):
            break
        rows.append(line.split())
    return rows


def test_ids_create_their_own_run_beside_active_runs_and_print_an_item_table():
    from tests.engine_support import TEST_BATCH_TASK_KEY

    a, b, c = make_images(3)
    library = engine.create(task_key=TEST_BATCH_TASK_KEY, scope={})
    other = engine.create(task_key=TEST_BATCH_TASK_KEY, scope={"image_ids": [c.pk]})
    code, out, err = run(TEST_BATCH_TASK_KEY, scope={"image_ids": [b.pk, 987654321, a.pk, b.pk]})
    assert code == 0, out + err
    assert "Adopting" not in out
    mine = AdminTaskRun.objects.exclude(pk__in=[library.pk, other.pk]).get()
    assert mine.scope["image_ids"] == [b.pk, 987654321, a.pk] and mine.status == RunStatus.SUCCEEDED
    assert f"Created run #{mine.pk}" in out
    rows = table_rows(out, mine.pk)
    assert rows[0] == ["id", "state", "error", "seconds"]
    assert [r[:3] for r in rows[1:]] == [
        [str(b.pk), "succeeded", "-"],
        ["987654321", "missing", "-"],
        [str(a.pk), "succeeded", "-"],
    ]
    assert float(rows[1][3]) >= 0 and rows[2][3] == "-"
    assert "1 ids did not exist" in out
    library.refresh_from_db()
    assert library.status == RunStatus.QUEUED and library.processed == 0  # left alone


def test_a_batch_with_a_failed_item_exits_1_after_its_table():
    from tests.engine_support import TEST_BATCH_TASK_KEY

    ok, bad = make_images(2, titles={1: "fail-always"})
    code, out, _ = run(TEST_BATCH_TASK_KEY, scope={"image_ids": [bad.pk, ok.pk]})
    assert code == 1
    mine = AdminTaskRun.objects.get()
    assert mine.status == RunStatus.SUCCEEDED and (mine.succeeded, mine.failed) == (1, 1)
    rows = table_rows(out, mine.pk)
    assert [r[:3] for r in rows[1:]] == [[str(bad.pk), "failed", "boom"], [str(ok.pk), "succeeded", "-"]]
    assert f"item {bad.pk}: process/boom - this item always fails (after 3 attempts)" in out


def test_preprocess_backfill_ids_never_adopts_the_backfill(photos, media_root):
    (media_root / "originals").mkdir(exist_ok=True)
    shutil.copy(CORPUS / "bad" / "truncated_photo.jpg", media_root / "originals" / "broken.jpg")
    broken = Image.objects.create(original="originals/broken.jpg", image_key="variants/" + "c" * 32, title="broken")
    backfill = engine.create(task_key="preprocess-images", scope={})
    code, out, err = command("preprocess_backfill", "--ids", f"{photos[0].pk},{broken.pk}")
    assert code == 1, out + err  # an item failed
    assert "Adopting" not in out
    mine = AdminTaskRun.objects.exclude(pk=backfill.pk).get()
    rows = table_rows(out, mine.pk)
    assert [r[:2] for r in rows[1:]] == [[str(photos[0].pk), "succeeded"], [str(broken.pk), "failed"]]
    assert rows[2][2] == AdminTaskItem.objects.get(run=mine, item_id=broken.pk).last_error_code != ""
    backfill.refresh_from_db()
    assert backfill.status == RunStatus.QUEUED and backfill.processed == 0
