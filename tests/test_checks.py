"""Start-up checks: ``manage.py check`` fails when this Pillow cannot encode a variant format."""

from __future__ import annotations

import pytest
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from PIL import Image

from gallery import imaging


@pytest.fixture
def fresh_encoder_probe():
    """encoder_problems() caches its answer per process: start and end with a fresh one."""
    imaging.encoder_problems.cache_clear()
    yield
    imaging.encoder_problems.cache_clear()


def test_check_passes_when_avif_and_webp_encode(fresh_encoder_probe, capsys):
    assert imaging.encoder_problems() == ()
    call_command("check")  # raises SystemCheckError on any error
    assert "gallery.E001" not in capsys.readouterr().err


@pytest.mark.parametrize("missing", ["AVIF", "WEBP"])
def test_check_fails_for_a_pillow_without_an_encoder(fresh_encoder_probe, monkeypatch, missing):
    Image.init()  # load every plugin first, so nothing registers the encoder again
    monkeypatch.delitem(Image.SAVE, missing)  # what a Pillow built without it looks like

    with pytest.raises(SystemCheckError) as info:
        call_command("check")

    text = str(info.value)
    assert "gallery.E001" in text
    assert missing.replace("WEBP", "WebP") in text
    assert len(imaging.encoder_problems()) == 1  # the other format still works
