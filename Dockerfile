# picsite: Django photo gallery + task-run engine, as one image for web and workers.
#
# Build:
#   docker build -t picsite .
#
# Configure everything through the environment (see docs/configuration.md). The image runs
# with DEBUG off and has no .git, so no development default applies: without
# DJANGO_SECRET_KEY (50+ random characters) or DATABASE_URL start-up stops with an error
# naming the variable.
#
# Web (uvicorn, ASGI, port 8000), behind a TLS-terminating proxy:
#   docker run -d -p 8000:8000 --env-file picsite.env -v picsite-media:/app/media picsite
#   picsite.env: the production variables of docs/deployment.md ("Production environment"):
#                DATABASE_URL, DJANGO_SECRET_KEY, DJANGO_ALLOWED_HOSTS, PICSITE_PROXY_SSL_HEADER...
#   (keep 127.0.0.1 in DJANGO_ALLOWED_HOSTS: the HEALTHCHECK requests /healthz (a database
#   round trip) on it over plain http, which is exempt from the https redirect)
#
# Migrations, once per release (they also install the engine's tick schedule):
#   docker run --rm --env-file picsite.env picsite python manage.py migrate
#
# Workers (same image, no web server, so no healthcheck):
#   uploads cluster:  docker run -d --no-healthcheck --env-file picsite.env \
#                         -v picsite-media:/app/media picsite python manage.py qcluster
#   backfill cluster: docker run -d --no-healthcheck --env-file picsite.env -e Q_CLUSTER_NAME=backfill \
#                         -v picsite-media:/app/media picsite python manage.py qcluster
#   Run as many of each as you like, on any number of hosts: batches + leases keep them
#   from doing an item twice (docs/deployment.md). Web and workers read and write the
#   originals under /app/media, so every container needs the same media: one volume on one
#   host; across hosts S3 for both (PICSITE_ORIGINALS_STORAGE=s3 with a private
#   PICSITE_ORIGINALS_S3_BUCKET, PICSITE_VARIANT_STORAGE=s3) or a shared filesystem.
#
# Serverless (no worker): run only the web container and have a scheduler POST a signed
# tick to /api/v1/preprocess-tasks/tick every minute (docs/deployment.md).

FROM python:3.11-slim AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
# The runtime-only lock (no pytest, moto, playwright...): `make lock` writes it.
COPY requirements.prod.lock /tmp/requirements.prod.lock
# Every pinned dependency ships a manylinux wheel: no compiler or apt packages needed.
RUN /opt/venv/bin/pip install --no-cache-dir -r /tmp/requirements.prod.lock


FROM python:3.11-slim

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DJANGO_SETTINGS_MODULE=picsite.settings \
    DJANGO_DEBUG=0 \
    PICSITE_MEDIA_ROOT=/app/media \
    PICSITE_STATIC_ROOT=/app/staticfiles \
    PICSITE_LOG_LEVEL=INFO

RUN groupadd --system --gid 10001 picsite \
    && useradd --system --no-log-init --uid 10001 --gid picsite --home-dir /app --shell /usr/sbin/nologin picsite

WORKDIR /app
COPY --from=builder /opt/venv /opt/venv
# Application code stays owned by root (read-only for the app user); see .dockerignore.
COPY . /app

# Static files are collected at build time and served by WhiteNoise. collectstatic touches
# neither the database nor signing, but settings require both variables: a dummy URL and a
# throwaway key that lives only for this command (never in a layer).
RUN DATABASE_URL=postgres://build@127.0.0.1:5432/build \
        DJANGO_SECRET_KEY="$(python -c 'import secrets; print(secrets.token_urlsafe(50))')" \
        python manage.py collectstatic --noinput --verbosity 0 \
    && mkdir -p /app/media \
    && chown picsite:picsite /app/media

USER 10001:10001

EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; r = urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4); sys.exit(0 if r.status == 200 else 1)"]

# uvicorn with one worker process per CPU the container may use (PICSITE_WEB_WORKERS to
# choose; HOST/PORT default to 0.0.0.0:8000): picsite/web.py.
CMD ["python", "-m", "picsite.web"]
