"""Settings read the environment through one library (environs): a value that does not
parse stops start-up with an error that names the variable, never a bare ValueError or a
silent fallback.

Each case runs Django in a subprocess with an environment built from scratch (the helpers
of test_settings_production), DEBUG off with a secret and a database URL, so that
nothing but the variable under test can stop start-up; the same run with a good value is
the control.
"""

from __future__ import annotations

import json

import pytest

from tests.test_settings_production import base_env, production_secret, run_django

# Prints one setting as settings parsed it (settings import only: no database is reached).
SHOW_SETTING = """
import json, sys
import django
django.setup()
from django.conf import settings
print(json.dumps(getattr(settings, sys.argv[1])))
"""

# (variable, a value that does not parse, a value that does, the setting it gives)
CASES = [
    pytest.param("PICSITE_ITEM_MAX_ATTEMPTS", "abc", "7", 7, id="int"),
    pytest.param("PICSITE_ITEM_TIME_LIMIT_S", "ten", "2.5", 2.5, id="float"),
    pytest.param("PICSITE_ADMIN_PAGE_DRIVES_KICKS", "maybe", "off", False, id="bool"),
    pytest.param("PICSITE_VARIANT_WIDTHS", "320,wide", "320, 640", [320, 640], id="list"),
    pytest.param("PICSITE_QUALITY_MODE", "best", "auto", "auto", id="choice"),
    pytest.param("PICSITE_AVIF_QUALITY_FLOOR", "90", "40", 40, id="floor-above-ceiling"),
]


def production_env(**extra: str) -> dict[str, str]:
    # DEBUG off: no development default (no embedded server, no generated secret) applies.
    return base_env(
        DJANGO_DEBUG="0",
        DJANGO_SECRET_KEY=production_secret(),
        DATABASE_URL="postgres://picsite@127.0.0.1:5432/picsite",
        **extra,
    )


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


@pytest.mark.parametrize(("name", "bad", "good", "parsed"), CASES)
def test_an_invalid_value_stops_start_up_naming_the_variable(name, bad, good, parsed):
    proc = run_django(["-c", SHOW_SETTING, name], production_env(**{name: bad}))
    assert proc.returncode != 0, f"{name}={bad!r} was accepted: {proc.stdout}"
    # The error itself (not merely a traceback line of settings source) names the variable.
    error = last_line(proc.stderr)
    assert name in error, proc.stderr[-2000:]

    control = run_django(["-c", SHOW_SETTING, name], production_env(**{name: good}))
    assert control.returncode == 0, control.stderr[-2000:]
    assert json.loads(last_line(control.stdout)) == parsed


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1", True), ("true", True), ("YES", True), (" On ", True),
        ("0", False), ("false", False), ("No", False), ("off", False), ("", False),
    ],
)
def test_booleans_keep_the_values_settings_always_took(raw, expected, monkeypatch):
    from picsite.env import env

    monkeypatch.setenv("PICSITE_TEST_FLAG", raw)
    assert env.flag("PICSITE_TEST_FLAG", not expected) is expected


@pytest.mark.parametrize("raw", ["maybe", "t", "y", "2", "enabled"])
def test_a_boolean_outside_the_known_words_is_refused(raw, monkeypatch):
    from environs import EnvValidationError

    from picsite.env import env

    monkeypatch.setenv("PICSITE_TEST_FLAG", raw)
    with pytest.raises(EnvValidationError, match="PICSITE_TEST_FLAG"):
        env.flag("PICSITE_TEST_FLAG", False)


def test_an_empty_variant_ladder_is_refused():
    proc = run_django(["-c", SHOW_SETTING, "PICSITE_VARIANT_WIDTHS"], production_env(PICSITE_VARIANT_WIDTHS=""))
    assert proc.returncode != 0, proc.stdout
    assert "PICSITE_VARIANT_WIDTHS" in last_line(proc.stderr), proc.stderr[-2000:]
