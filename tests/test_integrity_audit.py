"""The integrity audit log (gallery.audit): JSON lines appended by every process that
shares PICSITE_INTEGRITY_AUDIT_LOG, and the suite-wide fixture that reads them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_audit_lines_from_several_processes_stay_whole(integrity_audit, caplog):
    from gallery.audit import audit_record

    # Subprocesses find the log through the environment they inherit, as workers do.
    script = "from gallery.audit import audit_record\nfor i in range(200): audit_record('test_probe', n=i, pad='x' * 3000)"
    procs = [
        subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stderr=subprocess.DEVNULL) for _ in range(3)
    ]
    with caplog.at_level("ERROR", logger="gallery.audit"):
        audit_record("test_probe", n=-1, where="parent")
    assert all(p.wait(60) == 0 for p in procs)

    entries = integrity_audit.take()  # every line parses: appends never interleave
    assert len(entries) == 601
    assert {e["kind"] for e in entries} == {"test_probe"}
    assert len({e["pid"] for e in entries}) == 4
    assert sorted(e["details"]["n"] for e in entries) == sorted([-1, *range(200), *range(200), *range(200)])
    assert "test_probe" in caplog.text and "parent" in caplog.text
    assert integrity_audit.take() == []  # taken once


def test_audit_is_a_no_op_without_a_log_path(settings, monkeypatch, integrity_audit, tmp_path):
    from gallery.audit import audit_record

    settings.PICSITE_INTEGRITY_AUDIT_LOG = ""
    monkeypatch.delenv("PICSITE_INTEGRITY_AUDIT_LOG")
    audit_record("test_probe", n=1)
    assert integrity_audit.take() == []

    own = tmp_path / "own.jsonl"
    settings.PICSITE_INTEGRITY_AUDIT_LOG = str(own)
    audit_record("test_probe", n=2)
    assert [json.loads(line)["details"] for line in own.read_text().splitlines()] == [{"n": 2}]
