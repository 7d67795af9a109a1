"""Originals in a private S3 bucket (``PICSITE_ORIGINALS_STORAGE=s3``).

Its own module so that only a configuration that names it (STORAGES["default"]) pays
for importing boto3 and django-storages' S3 backend (about 0.6 s at start-up).
"""

from __future__ import annotations

from django.conf import settings
from storages.backends.s3 import S3Storage

from gallery.storage import s3_storage_options


class OriginalsS3Storage(S3Storage):
    """Originals may carry GPS and are never served, so the bucket should not be public;
    ``url()`` would only ever give short-lived signed URLs. Names never collide
    (content-addressed), so ``file_overwrite`` stays off as a guard."""

    def __init__(self, **overrides):
        options = s3_storage_options(
            bucket=settings.PICSITE_ORIGINALS_S3_BUCKET,
            region=settings.PICSITE_S3_REGION,
            endpoint_url=settings.PICSITE_S3_ENDPOINT_URL,
            access_key=settings.PICSITE_S3_ACCESS_KEY_ID,
            secret_key=settings.PICSITE_S3_SECRET_ACCESS_KEY,
            timeout_s=settings.PICSITE_S3_TIMEOUT_S,
        )
        super().__init__(**{**options, "file_overwrite": False, "querystring_auth": True, **overrides})
