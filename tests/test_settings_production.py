"""Production settings fail closed; development defaults belong to a checkout only.

Each case runs Django in a subprocess with an environment built from scratch (nothing
inherited from the test runner but PATH and HOME), because the rules are about what the
environment does and does not say:

- a checkout in development (``.git`` beside manage.py, ``DJANGO_DEBUG`` not false): DEBUG
  on, the embedded Postgres, a generated secret kept in a git-ignored file;
- ``DJANGO_DEBUG=0``, or no ``.git`` (the Docker image): a missing ``DJANGO_SECRET_KEY`` or
  ``DATABASE_URL`` stops start-up with an error naming the variable;
- the Dockerfile's ``ENV`` plus the production variables docs/deployment.md lists pass
  ``manage.py check --deploy`` at warning level.
"""

from __future__ import annotations

import http.client
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest

from picsite.embedded_pg import pgdata_dir
from tests.live_server import live_uvicorn

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
DEPLOYMENT_DOC = REPO / "docs" / "deployment.md"
PRODUCTION_BLOCK_MARKER = "<!-- production-env -->"

# Printed by a subprocess: what settings decided.
SHOW_SETTINGS = """
import json
import django
django.setup()
from django.conf import settings
db = settings.DATABASES["default"]
print(json.dumps({
    "DEBUG": settings.DEBUG,
    "SECRET_KEY": settings.SECRET_KEY,
    "HOST": db["HOST"],
    "NAME": db["NAME"],
}))
"""


def base_env(**extra: str) -> dict[str, str]:
    """A clean environment: no DJANGO_*, DATABASE_URL or PICSITE_* from the test runner."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}
    env.update(DJANGO_SETTINGS_MODULE="picsite.settings", PYTHONDONTWRITEBYTECODE="1")
    env.update(extra)
    return env


def run_django(args: list[str], env: dict[str, str], cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False
    )


def test_database_url() -> str:
    """A DATABASE_URL for the test database on the embedded server (a unix socket)."""
    from django.db import connection

    db = connection.settings_dict
    host = quote(db["HOST"], safe="")
    return f"postgres://{db['USER']}@{host}:{db['PORT']}/{db['NAME']}"


test_database_url.__test__ = False  # a helper, not a test


def production_secret() -> str:
    return secrets.token_urlsafe(50)


# --- the documented production environment ---------------------------------------------------


def dockerfile_env(base: dict[str, str]) -> dict[str, str]:
    """The ``ENV`` of the Dockerfile's final stage, ``$VAR`` expanded as Docker does."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    final_stage = re.split(r"(?m)^FROM\s", text)[-1]
    env = dict(base)
    for line in final_stage.splitlines():
        if line.startswith("ENV "):
            env.update(_expand_env_pairs(line[4:], dict(env)))
    return env


def _expand_env_pairs(args: str, before: dict[str, str]) -> dict[str, str]:
    """``KEY=value`` pairs of one ENV instruction; ``$VAR`` is the value before it."""
    pairs = {}
    for pair in shlex.split(args):
        key, _, value = pair.partition("=")
        pairs[key] = re.sub(r"\$\{?(\w+)\}?", lambda m: before.get(m.group(1), ""), value)
    return pairs


def documented_production_vars() -> dict[str, str]:
    """The one fenced block of docs/deployment.md after the production-env marker."""
    text = DEPLOYMENT_DOC.read_text()
    assert text.count(PRODUCTION_BLOCK_MARKER) == 1, f"{DEPLOYMENT_DOC} needs exactly one {PRODUCTION_BLOCK_MARKER}"
    after = text.split(PRODUCTION_BLOCK_MARKER, 1)[1]
    block = re.search(r"```[^\n]*\n(.*?)```", after, re.S)
    assert block, "no fenced block after the production-env marker"
    values = {}
    for line in block.group(1).splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"not KEY=VALUE: {line!r}"
            values[key] = value
    return values


@pytest.mark.django_db
def test_check_deploy_is_clean_with_the_image_env_and_documented_production_vars():
    documented = documented_production_vars()
    # The docs can only show placeholders for these two; the rest is used as written.
    assert {"DATABASE_URL", "DJANGO_SECRET_KEY"} <= set(documented)
    env = dockerfile_env(base_env())
    assert env.get("DJANGO_DEBUG") == "0", "the image must run with DEBUG off"
    env.update(documented, DATABASE_URL=test_database_url(), DJANGO_SECRET_KEY=production_secret())
    proc = run_django(["manage.py", "check", "--deploy", "--fail-level", "WARNING"], env)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- fail closed -----------------------------------------------------------------------------


@pytest.mark.django_db
def test_debug_off_without_secret_key_stops_naming_it():
    env = base_env(DJANGO_DEBUG="0", DATABASE_URL=test_database_url())
    proc = run_django(["manage.py", "check"], env)
    assert proc.returncode != 0, f"check passed with DJANGO_DEBUG=0 and no secret key:\n{proc.stdout}"
    assert "DJANGO_SECRET_KEY is not set" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.django_db
def test_debug_off_with_a_weak_secret_key_stops_naming_it():
    env = base_env(DJANGO_DEBUG="0", DATABASE_URL=test_database_url(), DJANGO_SECRET_KEY="change-me")
    proc = run_django(["manage.py", "check"], env)
    assert proc.returncode != 0, f"check passed with a 9-character secret key:\n{proc.stdout}"
    assert "DJANGO_SECRET_KEY is too weak" in proc.stderr, proc.stderr[-2000:]


def test_debug_off_without_database_url_stops_naming_it():
    env = base_env(DJANGO_DEBUG="0", DJANGO_SECRET_KEY=production_secret())
    proc = run_django(["manage.py", "check"], env)
    assert proc.returncode != 0, f"check passed with DJANGO_DEBUG=0 and no DATABASE_URL:\n{proc.stdout}"
    assert "DATABASE_URL is not set" in proc.stderr, proc.stderr[-2000:]


def copy_without_git(dest: Path) -> Path:
    """The application as the Docker image has it: no .git (.dockerignore), no dev secret."""
    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()]
    assert ".git" in ignored and ".secret_key" in ignored, ".dockerignore must keep .git and .secret_key out"
    for name in ("picsite", "api", "dispatch", "gallery", "tasks", "templates"):
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy2(REPO / "manage.py", dest / "manage.py")
    return dest


@pytest.mark.django_db
def test_outside_a_checkout_nothing_defaults_to_development(tmp_path):
    app = copy_without_git(tmp_path / "app")
    secret_file = tmp_path / "secret"
    # No DJANGO_DEBUG at all: without .git that is production, not development. (The test's
    # own embedded server, should settings wrongly reach for one: no new server in tmp.)
    env = base_env(PICSITE_SECRET_KEY_FILE=str(secret_file), PICSITE_PGDATA=str(pgdata_dir()))
    proc = run_django(["manage.py", "check"], env, cwd=app)
    assert proc.returncode != 0 and "DJANGO_SECRET_KEY is not set" in proc.stderr, proc.stdout + proc.stderr[-2000:]
    assert not secret_file.exists(), "a development secret was generated outside a checkout"

    proc = run_django(["manage.py", "check"], dict(env, DJANGO_SECRET_KEY=production_secret()), cwd=app)
    assert proc.returncode != 0 and "DATABASE_URL is not set" in proc.stderr, proc.stdout + proc.stderr[-2000:]

    env.update(DJANGO_SECRET_KEY=production_secret(), DATABASE_URL=test_database_url())
    proc = run_django(["-c", SHOW_SETTINGS], env, cwd=app)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert '"DEBUG": false' in proc.stdout


# --- development in a checkout -------------------------------------------------------------


def test_checkout_without_debug_setting_uses_dev_defaults_and_keeps_its_generated_secret(tmp_path):
    import json

    from picsite.embedded_pg import ensure_running

    assert (REPO / ".git").exists(), "these tests run in a checkout"
    secret_file = tmp_path / "dev" / ".secret_key"
    env = base_env(PICSITE_SECRET_KEY_FILE=str(secret_file))  # no DJANGO_DEBUG, DATABASE_URL, secret

    first = run_django(["-c", SHOW_SETTINGS], env)
    assert first.returncode == 0, first.stderr[-2000:]
    shown = json.loads(first.stdout.strip().splitlines()[-1])
    assert shown["DEBUG"] is True
    assert shown["HOST"] == ensure_running()["HOST"], "not the embedded Postgres"
    assert secret_file.read_text().strip() == shown["SECRET_KEY"]
    assert len(shown["SECRET_KEY"]) >= 50
    assert secret_file.stat().st_mode & 0o777 == 0o600

    second = run_django(["-c", SHOW_SETTINGS], env)
    assert second.returncode == 0, second.stderr[-2000:]
    assert json.loads(second.stdout.strip().splitlines()[-1])["SECRET_KEY"] == shown["SECRET_KEY"]


def test_dev_secret_file_is_ignored_by_git():
    proc = subprocess.run(
        ["git", "check-ignore", "-q", ".secret_key"], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, "the default development secret file .secret_key is not git-ignored"


# --- DEBUG off over HTTP: real server --------------------------------------------------------


def _request(
    base_url: str, method: str, path: str, headers: dict[str, str] | None = None, body: str | None = None
) -> http.client.HTTPResponse:
    host, port = base_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    response.text = response.read().decode(errors="replace")
    conn.close()
    return response


def _cookie(response: http.client.HTTPResponse, name: str) -> str | None:
    """The whole Set-Cookie line of ``name`` (value and attributes)."""
    found = [c for c in response.headers.get_all("Set-Cookie") or [] if c.startswith(name + "=")]
    return found[0] if found else None


@pytest.mark.django_db(transaction=True)
def test_debug_off_serves_https_only_with_secure_cookies_and_hsts(tmp_path, django_user_model):
    django_user_model.objects.create_user("boss", "boss@example.com", "pw-boss-123", is_staff=True)
    env = {
        "DJANGO_DEBUG": "0",
        "DJANGO_SECRET_KEY": production_secret(),
        "DATABASE_URL": test_database_url(),
        "PICSITE_PROXY_SSL_HEADER": "X-Forwarded-Proto",
        "PICSITE_HSTS_SECONDS": "600",
    }
    with live_uvicorn(media_root=tmp_path / "media", env=env) as base_url:
        # Plain http is redirected to https, except the container HEALTHCHECK's /healthz.
        plain = _request(base_url, "GET", "/admin/login/")
        assert plain.status == 301 and plain.getheader("Location", "").startswith("https://"), plain.status
        assert _request(base_url, "GET", "/healthz").status == 200

        # Behind the TLS proxy (X-Forwarded-Proto: https) the request is secure: HSTS and
        # cookies that a browser only sends back over https.
        https = {"X-Forwarded-Proto": "https"}
        login_page = _request(base_url, "GET", "/admin/login/", https)
        assert login_page.status == 200, login_page.status
        assert login_page.getheader("Strict-Transport-Security", "").startswith("max-age=600")
        csrf_cookie = _cookie(login_page, "csrftoken")
        assert csrf_cookie and "; Secure" in csrf_cookie, csrf_cookie

        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', login_page.text).group(1)
        origin = "https://" + base_url.removeprefix("http://")
        login = _request(
            base_url,
            "POST",
            "/admin/login/?next=/admin/",
            {
                **https,
                "Origin": origin,
                "Cookie": csrf_cookie.split(";", 1)[0],
                "Content-Type": "application/x-www-form-urlencoded",
            },
            f"csrfmiddlewaretoken={token}&username=boss&password=pw-boss-123&next=/admin/",
        )
        assert login.status == 302, (login.status, login.text[-500:])
        session_cookie = _cookie(login, "sessionid")
        assert session_cookie and "; Secure" in session_cookie, session_cookie


# --- database connections under ASGI -------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_asgi_requests_leave_no_database_connections_behind(tmp_path):
    """Each request runs its sync code on a thread of its own (asgiref), so a persistent
    connection (CONN_MAX_AGE > 0) is never reused: it lingers, open and idle, until the
    garbage collector finds it, and under load they pile up towards max_connections."""
    import time
    import urllib.request
    import uuid

    from django.db import connection

    app_name = f"picsite-conn-{uuid.uuid4().hex[:8]}"
    env = {"DATABASE_URL": f"{test_database_url()}?application_name={app_name}"}

    def server_backends() -> int:
        with connection.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", [app_name])
            return cur.fetchone()[0]

    with live_uvicorn(media_root=tmp_path / "media", env=env) as base_url:
        for _ in range(20):
            with urllib.request.urlopen(base_url + "/healthz", timeout=10) as response:
                assert response.status == 200
        # A closed connection's backend exits a moment after the request; a kept one stays.
        deadline = time.monotonic() + 10
        while (left := server_backends()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert left == 0, f"{left} connections of the ASGI server still open after 20 requests"
