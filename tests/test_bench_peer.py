"""bench/bench_peer.py: the libvips ladder at our encoder settings, and its skip line.

The bench runs as `make bench` runs it (a subprocess), on a few corpus photos that take
each of its paths: EXIF rotation, 16-bit PNG, opaque RGBA, embedded ICC, a JPEG that libvips
refuses by default (too many decoder warnings) but our pipeline decodes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gallery.imaging import VariantRecipe

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
PHOTOS = (
    "edge/orientation/Landscape_6.jpg",  # stored 1200x1800, EXIF orientation 6
    "photos/weld_16bit_rgb.png",
    "photos/embedgravitybird_rgba.png",
    "photos/flower_exif_icc.webp",
    "photos/olympus_u1020_3648x2736.jpg",  # damaged scan: > 100 libjpeg warnings
)


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCH))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


def _run(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCH / "bench_peer.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
        check=False,
    )


def test_recipe_maps_to_libvips_settings():
    peer = _load("bench_peer")
    for speed in range(11):
        recipe = VariantRecipe(avif_quality=61, avif_speed=speed, webp_quality=72, webp_method=5)
        settings = peer.vips_settings(recipe, threads=3)
        # heifsave passes speed = 9 - effort to libheif's aom plugin (cpu-used 0..9); libavif
        # clamps speed 10 to cpu-used 9 as well.
        assert settings["avif"]["effort"] == 9 - min(speed, 9)
        assert settings["avif"]["Q"] == 61
        assert settings["avif"]["compression"] == "av1"
        assert settings["webp"] == {"Q": 72, "effort": 5, "strip": True}
        assert settings["concurrency"] == 3


def test_peer_bench_measures_the_libvips_ladder(corpus, tmp_path):
    pytest.importorskip("pyvips")
    out = tmp_path / "results.json"
    out.write_text(json.dumps({"variants": {"kept": True}}))
    proc = _run(["--out", str(out), "--repeat", "1", *(str(corpus / p) for p in PHOTOS)])
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())
    assert results["variants"] == {"kept": True}  # only the "peer" key is written
    peer = results["peer"]
    assert peer["available"] is True
    assert [row["photo"] for row in peer["per_photo"]] == [Path(p).name for p in PHOTOS]
    recipe = VariantRecipe()
    rotated = peer["per_photo"][0]
    assert rotated["size"] == [1800, 1200]
    assert rotated["vips"]["tiers"] == recipe.tier_widths(1800)
    for row in peer["per_photo"]:
        assert row["vips"]["tiers"] == row["pipeline"]["tiers"]
        # Same pixels in, same encoders' settings: a sideways, colour-shifted or mis-sized
        # libvips tier would score far below ours.
        assert abs(row["quality_delta"]) < 0.01, row
        assert row["vips"]["ssim"] > 0.9, row
    for key in ("vips_time_over_pipeline", "vips_cpu_over_pipeline", "vips_bytes_over_pipeline"):
        assert peer[key] > 0
    assert 0.8 < peer["vips_bytes_over_pipeline"] < 1.25
    assert peer["quality_delta"] == pytest.approx(peer["vips_ssim"] - peer["pipeline_ssim"], abs=2e-5)
    assert peer["settings"]["vips"]["avif"]["effort"] == 9 - min(recipe.avif_speed, 9)
    for line in ("peer.vips_time_over_pipeline = ", "peer.vips_bytes_over_pipeline = ", "peer.quality_delta = "):
        assert line in proc.stdout
    assert "weld_16bit_rgb.png" in proc.stdout  # the per-photo table


def test_peer_bench_without_pyvips_says_so_and_run_all_skips_it(corpus, tmp_path):
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    # What pyvips raises when neither the binary wheel nor a system libvips is there.
    (shadow / "pyvips.py").write_text("raise OSError(\"cannot load library 'libvips.so.42'\")\n")
    out = tmp_path / "results.json"
    proc = _run(["--out", str(out), str(corpus / PHOTOS[0])], env={"PYTHONPATH": str(shadow)})
    assert proc.returncode == 0, proc.stderr
    assert "libvips peer skipped: pyvips cannot load (OSError: cannot load library" in proc.stdout
    peer = json.loads(out.read_text())["peer"]
    assert peer["available"] is False and "libvips.so.42" in peer["reason"]

    lines, misses = _load("run_all").table({"peer": peer})
    peer_rows = [line for line in lines if line.startswith("peer.")]
    assert len(peer_rows) == 3 and all("SKIPPED" in line for line in peer_rows)
    assert misses == 0
