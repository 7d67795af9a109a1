"""Where variants live: local filesystem (default) or an S3-compatible bucket.

Resolved from settings on every call so a configuration change (or removal)
is seen by a running worker at its next item.
"""

from __future__ import annotations

import mimetypes
import re
from dataclasses import dataclass
from typing import Protocol

from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import FileSystemStorage

CACHE_CONTROL = "public, max-age=31536000, immutable"

# Python 3.11's mimetypes table has no AVIF.
mimetypes.add_type("image/avif", ".avif")
mimetypes.add_type("image/webp", ".webp")


class VariantStorageNotConfigured(Exception):
    """The variant pipeline is off: no usable variant storage in settings."""


class VariantStorageError(Exception):
    """A put/exists against the variant storage failed (network, 5xx, timeout)."""


class VariantStore(Protocol):
    kind: str
    folder: str

    def put(self, key: str, data: bytes, content_type: str) -> None: ...
    def probe(self) -> None: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def url(self, key: str) -> str: ...


# Written by probes while the storage is thought to be down: always the same bytes.
PROBE_NAME = ".picsite-probe"
PROBE_BYTES = b"picsite storage probe\n"


def _probe_key(folder: str) -> str:
    return f"{folder.strip('/')}/{PROBE_NAME}" if folder.strip("/") else PROBE_NAME


def variant_key(*, folder: str, image_key: str, width: int, fmt: str, key_version: str = "") -> str:
    """Object key of one tier of one variant set.

    Versioned sets: ``{folder}/variants/{hh}/{hash}_{key_version}_{width}.{fmt}`` (``hh``, the
    hash's first two hex digits, shards a directory and the collector's sweep). The legacy
    set (``key_version`` ""): ``{folder}/{image_key}_{width}.{fmt}``. ``image_key`` is
    ``variants/<32 hex>``; the folder namespaces a bucket shared with other apps (empty
    folder = bucket root).
    """
    if key_version:
        digest = image_key.removeprefix("variants/")
        name = f"variants/{digest[:2]}/{digest}_{key_version}_{width}.{fmt}"
    else:
        name = f"{image_key}_{width}.{fmt}"
    return f"{folder.strip('/')}/{name}" if folder.strip("/") else name


# Our keys under a folder, versioned or legacy (anything else in a shared bucket is not ours).
VARIANT_KEY_PATTERN = re.compile(
    r"^variants/(?:(?P<shard>[0-9a-f]{2})/)?(?P<digest>[0-9a-f]{32})"
    r"(?:_(?P<key_version>[0-9a-f]{12}))?_(?P<width>[1-9][0-9]{0,5})\.(?P<fmt>avif|webp)$"
)


def variant_key_parse(*, folder: str, key: str) -> dict | None:
    """The parts of one of our keys (digest, key_version, width, fmt), or None if the key
    is not one of ours (outside the folder, or not our pattern, or a shard that does not
    match its digest)."""
    prefix = f"{folder.strip('/')}/" if folder.strip("/") else ""
    if not key.startswith(prefix):
        return None
    match = VARIANT_KEY_PATTERN.match(key[len(prefix) :])
    if match is None:
        return None
    parts = match.groupdict()
    if bool(parts["shard"]) != bool(parts["key_version"]) or (parts["shard"] and parts["shard"] != parts["digest"][:2]):
        return None
    return {
        "digest": parts["digest"],
        "key_version": parts["key_version"] or "",
        "width": int(parts["width"]),
        "fmt": parts["fmt"],
    }


@dataclass
class LocalVariantStore:
    root: str
    base_url: str
    folder: str
    kind: str = "local"

    def __post_init__(self) -> None:
        self._fs = FileSystemStorage(location=self.root, base_url=self.base_url, allow_overwrite=True)

    def put(self, key: str, data: bytes, content_type: str) -> None:
        try:
            self._fs.save(key, ContentFile(data))
        except OSError as exc:
            raise VariantStorageError(f"local write of {key} failed: {exc}") from exc

    def probe(self) -> None:
        """Raise VariantStorageError unless a small object can be written."""
        self.put(_probe_key(self.folder), PROBE_BYTES, "text/plain")

    def exists(self, key: str) -> bool:
        return self._fs.exists(key)

    def delete(self, key: str) -> None:
        self._fs.delete(key)

    def url(self, key: str) -> str:
        return self._fs.url(key)


@dataclass
class S3VariantStore:
    bucket: str
    region: str
    endpoint_url: str | None
    public_base_url: str
    folder: str
    access_key: str | None = None
    secret_key: str | None = None
    timeout_s: float = 20
    kind: str = "s3"

    def __post_init__(self) -> None:
        from storages.backends.s3 import S3Storage

        self._storage = S3Storage(
            **s3_storage_options(
                bucket=self.bucket,
                region=self.region,
                endpoint_url=self.endpoint_url,
                access_key=self.access_key,
                secret_key=self.secret_key,
                timeout_s=self.timeout_s,
            ),
            file_overwrite=True,  # content-addressed keys: a rewrite is the same object
            querystring_auth=False,
        )

    def put(self, key: str, data: bytes, content_type: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._storage.bucket.Object(key).put(
                Body=data, ContentType=content_type, CacheControl=CACHE_CONTROL
            )
        except (BotoCoreError, ClientError) as exc:
            raise VariantStorageError(f"S3 put of {key} failed: {exc}") from exc

    def probe(self) -> None:
        """Raise VariantStorageError unless a small object can be written."""
        self.put(_probe_key(self.folder), PROBE_BYTES, "text/plain")

    def exists(self, key: str) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self._storage.exists(key)
        except (BotoCoreError, ClientError) as exc:
            raise VariantStorageError(f"S3 head of {key} failed: {exc}") from exc

    def delete(self, key: str) -> None:
        self._storage.delete(key)

    def url(self, key: str) -> str:
        if self.public_base_url:
            return self.public_base_url.rstrip("/") + "/" + key
        return self._storage.url(key)


def variant_store_resolve() -> VariantStore:
    """The configured variant store, or VariantStorageNotConfigured with the reason."""
    return variant_store_for(kind=settings.PICSITE_VARIANT_STORAGE, folder=settings.PICSITE_VARIANT_FOLDER)


def variant_store_for(*, kind: str, folder: str) -> VariantStore:
    """The store of ``kind`` ("local" or "s3", configured from settings) under ``folder``:
    where a recorded variant set lives, which may differ from where new sets go."""
    kind = (kind or "").strip().lower()
    if kind == "local":
        return LocalVariantStore(
            root=str(settings.PICSITE_VARIANT_LOCAL_ROOT),
            base_url=settings.PICSITE_VARIANT_LOCAL_URL,
            folder=folder,
        )
    if kind == "s3":
        if not settings.PICSITE_S3_BUCKET:
            raise VariantStorageNotConfigured(
                "PICSITE_VARIANT_STORAGE=s3 but PICSITE_S3_BUCKET is empty; variant generation is off."
            )
        return S3VariantStore(
            bucket=settings.PICSITE_S3_BUCKET,
            region=settings.PICSITE_S3_REGION,
            endpoint_url=settings.PICSITE_S3_ENDPOINT_URL,
            public_base_url=settings.PICSITE_S3_PUBLIC_BASE_URL,
            folder=folder,
            access_key=settings.PICSITE_S3_ACCESS_KEY_ID,
            secret_key=settings.PICSITE_S3_SECRET_ACCESS_KEY,
            timeout_s=settings.PICSITE_S3_TIMEOUT_S,
        )
    raise VariantStorageNotConfigured(
        f"PICSITE_VARIANT_STORAGE={kind or '(empty)'!s}: variant generation is off. "
        "Set it to 'local' or 's3' (with PICSITE_S3_BUCKET)."
    )


def s3_storage_options(
    *,
    bucket: str,
    region: str,
    endpoint_url: str | None,
    access_key: str | None,
    secret_key: str | None,
    timeout_s: float,
) -> dict:
    """django-storages ``S3Storage`` options shared by the variant and originals buckets:
    django-storages builds the boto3 session (credentials chain, endpoint, region); an
    endpoint URL (R2, MinIO, moto) gets path-style addressing."""
    from botocore.config import Config

    return {
        "bucket_name": bucket,
        "region_name": region,
        "endpoint_url": endpoint_url,
        "access_key": access_key,
        "secret_key": secret_key,
        "client_config": Config(
            connect_timeout=min(timeout_s, 10),
            read_timeout=timeout_s,
            retries={"max_attempts": 3, "mode": "standard"},
            s3={"addressing_style": "path"} if endpoint_url else {},
        ),
    }
