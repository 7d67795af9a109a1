"""Where variants live: local filesystem (default) or an S3-compatible bucket.

Resolved from settings on every call so a configuration change (or removal)
is seen by a running worker at its next item.
"""

from __future__ import annotations

import hashlib
import logging
import mimetypes
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from itertools import islice
from pathlib import Path
from typing import Protocol

from django.conf import settings
from django.core.exceptions import SuspiciousFileOperation
from django.core.files.storage import FileSystemStorage

from gallery.audit import audit_record
from gallery.imaging.formats import format_names, output_formats

logger = logging.getLogger(__name__)

CACHE_CONTROL = "public, max-age=31536000, immutable"

# Python 3.11's mimetypes table has no AVIF.
for _fmt in output_formats():
    mimetypes.add_type(_fmt.mime_type, f".{_fmt.name}")


class VariantStorageNotConfigured(Exception):
    """The variant pipeline is off: no usable variant storage in settings."""


class VariantStorageError(Exception):
    """A put/exists against the variant storage failed (network, 5xx, timeout)."""


class VariantOverwriteRefused(Exception):
    """A put found its key holding different bytes: variant objects are immutable.

    Deliberately not a VariantStorageError: the storage works (it must not count towards
    outage detection); the caller broke the rule that a key has one content only.
    """

    def __init__(self, *, key: str, store: str, existing_sha256: str, new_sha256: str):
        super().__init__(
            f"refused to overwrite {key} ({store}): it holds sha256 {existing_sha256}, "
            f"the new bytes are sha256 {new_sha256}"
        )
        self.key = key
        self.store = store
        self.existing_sha256 = existing_sha256
        self.new_sha256 = new_sha256


@dataclass(frozen=True, slots=True)
class StoredObject:
    key: str
    size: int
    last_modified: datetime  # aware, UTC


# Called with (key, message) for each key delete_many could not delete.
DeleteErrorHandler = Callable[[str, str], None]


class VariantStore(Protocol):
    kind: str
    folder: str

    def put(self, key: str, data: bytes, content_type: str) -> bool: ...
    def probe(self) -> None: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def delete_many(self, keys: Iterable[str], *, on_error: DeleteErrorHandler | None = None) -> int: ...
    def list(self, prefix: str) -> Iterator[StoredObject]: ...
    def url(self, key: str) -> str: ...
    def url_prefix(self) -> str | None:
        """P such that ``url(key) == P + key`` for every URL-safe key (``key_is_url_safe``),
        or None when ``url()`` must be asked key by key (say it signs each URL)."""
        ...


# Written by probes while the storage is thought to be down: always the same bytes.
PROBE_NAME = ".picsite-probe"
PROBE_BYTES = b"picsite storage probe\n"


def _probe_key(folder: str) -> str:
    return f"{folder.strip('/')}/{PROBE_NAME}" if folder.strip("/") else PROBE_NAME


def _refuse(*, key: str, store: str, existing: bytes, new: bytes, **details: object) -> VariantOverwriteRefused:
    """Audit a refused overwrite and build the exception for the caller to raise."""
    refused = VariantOverwriteRefused(
        key=key, store=store, existing_sha256=hashlib.sha256(existing).hexdigest(), new_sha256=hashlib.sha256(new).hexdigest()
    )
    audit_record(
        "variant_overwrite_refused",
        key=key,
        store=store,
        existing_sha256=refused.existing_sha256,
        new_sha256=refused.new_sha256,
        existing_size=len(existing),
        new_size=len(new),
        **details,
    )
    return refused


def _log_delete_error(key: str, message: str) -> None:
    logger.warning("could not delete variant object %s: %s", key, message)


def _chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def variant_key(*, folder: str, image_key: str, width: int, fmt: str, key_version: str = "") -> str:
    """Object key of one tier of one variant set.

    Versioned sets: ``{folder}/variants/{hh}/{hash}_{key_version}_{width}.{fmt}`` (``hh``, the
    hash's first two hex digits, shards a directory and the collector's sweep). The legacy
    set (``key_version`` ""): ``{folder}/{image_key}_{width}.{fmt}``. ``image_key`` is
    ``variants/<32 hex>``; the folder namespaces a bucket shared with other apps (empty
    folder = bucket root).
    """
    return f"{variant_key_stem(folder=folder, image_key=image_key, key_version=key_version)}{width}.{fmt}"


def variant_key_stem(*, folder: str, image_key: str, key_version: str = "") -> str:
    """What the keys of one set's tiers share: ``variant_key`` is this + ``{width}.{fmt}``
    (a page builds it once per set, not once per tier)."""
    if key_version:
        digest = image_key.removeprefix("variants/")
        name = f"variants/{digest[:2]}/{digest}_{key_version}_"
    else:
        name = f"{image_key}_"
    folder = folder.strip("/")
    return f"{folder}/{name}" if folder else name


# Keys whose URL is the store's prefix + the key unchanged: RFC 3986 unreserved characters
# and "/" only (nothing to percent-encode), and no empty, "." or ".." segment (which
# storages normalise away).
_URL_SAFE_KEY = re.compile(r"[A-Za-z0-9_~-][A-Za-z0-9._~-]*(?:/[A-Za-z0-9_~-][A-Za-z0-9._~-]*)*")


def key_is_url_safe(key: str) -> bool:
    """Whether ``url_prefix() + key`` is the URL of ``key`` (see ``VariantStore.url_prefix``)."""
    return _URL_SAFE_KEY.fullmatch(key) is not None


# Any key of a versioned set: what url_prefix() asks url() for.
_URL_PROBE_KEY = variant_key(folder="", image_key="variants/" + "0" * 32, width=320, fmt="webp", key_version="0" * 12)


def _url_prefix_probe(store: VariantStore) -> str | None:
    """``url_prefix`` learnt from ``url()`` of one key under the store's folder: whatever is
    before that key in the URL (the base URL, the bucket's endpoint, a custom domain).
    None if the folder needs quoting or the URL carries more than the key (a signature)."""
    folder = store.folder.strip("/")
    key = f"{folder}/{_URL_PROBE_KEY}" if folder else _URL_PROBE_KEY
    if not key_is_url_safe(key):
        return None
    url = store.url(key)
    if not url.endswith(key) or "?" in url or "#" in url:
        return None
    return url[: -len(key)]


@lru_cache(maxsize=4)
def _variant_key_pattern(fmts: tuple[str, ...]) -> re.Pattern[str]:
    """Our keys under a folder, versioned or legacy, in one of the output formats (anything
    else in a shared bucket is not ours)."""
    return re.compile(
        r"^variants/(?:(?P<shard>[0-9a-f]{2})/)?(?P<digest>[0-9a-f]{32})"
        r"(?:_(?P<key_version>[0-9a-f]{12}))?_(?P<width>[1-9][0-9]{0,5})"
        rf"\.(?P<fmt>{'|'.join(map(re.escape, fmts))})$"
    )


def variant_key_parse(*, folder: str, key: str) -> dict | None:
    """The parts of one of our keys (digest, key_version, width, fmt), or None if the key
    is not one of ours (outside the folder, or not our pattern, or a shard that does not
    match its digest)."""
    prefix = f"{folder.strip('/')}/" if folder.strip("/") else ""
    if not key.startswith(prefix):
        return None
    match = _variant_key_pattern(format_names()).match(key[len(prefix) :])
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


_PUT_ATTEMPTS = 5  # a key deleted by a sweep between our check and our read is written again

# In-flight writes: a temp file beside the final name, linked into place when complete.
# list() skips them; they never carry a key's name, so readers never see a partial file.
TMP_PREFIX = ".picsite-tmp-"


@dataclass
class LocalVariantStore:
    root: str
    base_url: str
    folder: str
    kind: str = "local"

    def __post_init__(self) -> None:
        self._fs = FileSystemStorage(location=self.root, base_url=self.base_url)

    def put(self, key: str, data: bytes, content_type: str) -> bool:
        """Put-if-absent: True if written, False if the key already holds these bytes.

        Raises VariantOverwriteRefused if it holds other bytes, VariantStorageError if the
        disk fails. Atomic: the bytes go to a temp file that ``os.link`` gives the final
        name, which fails if the name exists, so two writers never both win.
        """
        path = Path(self._fs.path(key))  # refuses keys that escape the root
        try:
            self._make_dirs(path.parent)
            tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{uuid.uuid4().hex}")
            try:
                self._write_new(tmp, data)
                existing = self._link_or_read(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
        except OSError as exc:
            raise VariantStorageError(f"local write of {key} failed: {exc}") from exc
        if existing is None:
            return True
        if existing == data:
            return False
        raise _refuse(key=key, store=self.kind, existing=existing, new=data, root=self.root)

    @staticmethod
    def _link_or_read(tmp: Path, path: Path) -> bytes | None:
        """Give ``tmp`` the name ``path`` (None) unless that name exists: then its bytes."""
        for _ in range(_PUT_ATTEMPTS):
            try:
                os.link(tmp, path)
                return None
            except FileExistsError:
                pass
            try:
                return path.read_bytes()
            except FileNotFoundError:
                continue  # deleted since (a sweep): link again
        raise OSError(f"{path} keeps appearing and vanishing")

    def _write_new(self, tmp: Path, data: bytes) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        with open(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            # Durable before it gets its name: after a host crash a key never names a
            # short file, which put-if-absent would then refuse to repair.
            os.fsync(fh.fileno())
            if self._fs.file_permissions_mode is not None:
                os.fchmod(fh.fileno(), self._fs.file_permissions_mode)

    def _make_dirs(self, directory: Path) -> None:
        mode = self._fs.directory_permissions_mode
        if mode is None:
            directory.mkdir(parents=True, exist_ok=True)
            return
        old_umask = os.umask(0o777 & ~mode)  # as FileSystemStorage does
        try:
            directory.mkdir(mode=mode, parents=True, exist_ok=True)
        finally:
            os.umask(old_umask)

    def probe(self) -> None:
        """Raise VariantStorageError unless a small object can be written."""
        self.put(_probe_key(self.folder), PROBE_BYTES, "text/plain")

    def exists(self, key: str) -> bool:
        return self._fs.exists(key)

    def delete(self, key: str) -> None:
        self._fs.delete(key)

    def delete_many(self, keys: Iterable[str], *, on_error: DeleteErrorHandler | None = None) -> int:
        """Unlink each key; returns how many are gone (a key already missing counts, as on
        S3). A key that cannot be deleted goes to ``on_error`` (default: a warning)."""
        report = on_error or _log_delete_error
        deleted = 0
        for key in keys:
            try:
                os.unlink(self._fs.path(key))
            except FileNotFoundError:
                pass
            except (OSError, SuspiciousFileOperation) as exc:
                report(key, f"{type(exc).__name__}: {exc}")
                continue
            deleted += 1
        return deleted

    def list(self, prefix: str) -> Iterator[StoredObject]:
        """Every object whose key starts with ``prefix`` (a string match, as on S3), found
        by walking the prefix's directory; in no particular order. Keys are relative to
        the root with forward slashes; files still being written are skipped."""
        base = prefix.rpartition("/")[0]
        pending = [(Path(self._fs.path(base)) if base else Path(self.root), base)]
        while pending:
            directory, dir_key = pending.pop()
            try:
                with os.scandir(directory) as entries:
                    for entry in entries:
                        key = f"{dir_key}/{entry.name}" if dir_key else entry.name
                        if entry.is_dir(follow_symlinks=False):
                            if key.startswith(prefix) or prefix.startswith(key + "/"):
                                pending.append((Path(entry.path), key))
                        elif key.startswith(prefix) and not entry.name.startswith(TMP_PREFIX):
                            found = self._stored(entry, key)
                            if found is not None:
                                yield found
            except (FileNotFoundError, NotADirectoryError):
                continue  # no such directory (yet), or removed while we walked
            except OSError as exc:
                raise VariantStorageError(f"local listing of {directory} failed: {exc}") from exc

    @staticmethod
    def _stored(entry: os.DirEntry, key: str) -> StoredObject | None:
        try:
            if not entry.is_file(follow_symlinks=False):
                return None
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            return None  # deleted between the directory read and the stat
        return StoredObject(key=key, size=st.st_size, last_modified=datetime.fromtimestamp(st.st_mtime, UTC))

    def url(self, key: str) -> str:
        return self._fs.url(key)

    def url_prefix(self) -> str | None:
        if not hasattr(self, "_url_prefix"):
            self._url_prefix = _url_prefix_probe(self)
        return self._url_prefix


_S3_DELETE_CHUNK = 1000  # DeleteObjects takes at most this many keys


def _s3_error(exc) -> tuple[str, int]:
    """(error code, HTTP status) of a botocore ClientError."""
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", "")), int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


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
            file_overwrite=True,  # unused by put(), which is put-if-absent on its own
            querystring_auth=False,
        )

    def _client(self):
        """The boto3 S3 client of the django-storages connection (one per thread)."""
        return self._storage.connection.meta.client

    def put(self, key: str, data: bytes, content_type: str) -> bool:
        """Put-if-absent: True if written, False if the key already holds these bytes.

        A conditional write (``If-None-Match: *``) so the check and the write are one
        atomic step on the server. Raises VariantOverwriteRefused if the key holds other
        bytes, VariantStorageError if the storage fails.
        """
        from botocore.exceptions import BotoCoreError, ClientError

        client = self._client()
        for attempt in range(_PUT_ATTEMPTS):
            try:
                client.put_object(
                    Bucket=self.bucket,
                    Key=key,
                    Body=data,
                    ContentType=content_type,
                    CacheControl=CACHE_CONTROL,
                    IfNoneMatch="*",
                )
                return True
            except ClientError as exc:
                code, status = _s3_error(exc)
                if status == 409 and code == "ConditionalRequestConflict":
                    # Another conditional write of this key is in flight (real S3): its
                    # outcome decides ours, so ask again shortly.
                    time.sleep(0.05 * (attempt + 1))
                    continue
                if status != 412 and code != "PreconditionFailed":
                    raise VariantStorageError(f"S3 put of {key} failed: {exc}") from exc
            except BotoCoreError as exc:
                raise VariantStorageError(f"S3 put of {key} failed: {exc}") from exc
            if self._holds(key, data):
                return False
            # None: deleted since our put was refused (a sweep); write it again.
        raise VariantStorageError(f"S3 put of {key} failed: still conflicting after {_PUT_ATTEMPTS} attempts")

    def _holds(self, key: str, data: bytes) -> bool | None:
        """After a refused conditional put: True if ``key`` holds ``data``, None if it is
        gone again; raises VariantOverwriteRefused if it holds anything else."""
        from botocore.exceptions import BotoCoreError, ClientError

        client = self._client()
        try:
            head = client.head_object(Bucket=self.bucket, Key=key)
            # A single-part put's ETag is the MD5 of its bytes; variants are never multipart.
            if head["ETag"].strip('"') == hashlib.md5(data, usedforsecurity=False).hexdigest():
                return True
            # Other ETag: other bytes, or an ETag that is no MD5 (SSE-KMS); the bytes decide.
            existing = client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except ClientError as exc:
            code, status = _s3_error(exc)
            if status == 404 or code in ("404", "NoSuchKey", "NotFound"):
                return None
            raise VariantStorageError(f"S3 read-back of {key} failed: {exc}") from exc
        except BotoCoreError as exc:
            raise VariantStorageError(f"S3 read-back of {key} failed: {exc}") from exc
        if existing == data:
            return True
        raise _refuse(key=key, store=self.kind, existing=existing, new=data, bucket=self.bucket, etag=head["ETag"])

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

    def delete_many(self, keys: Iterable[str], *, on_error: DeleteErrorHandler | None = None) -> int:
        """DeleteObjects in chunks of 1000 (the S3 maximum); returns how many keys were
        deleted (S3 counts a missing key as deleted). A per-key error goes to ``on_error``
        (default: a warning); a failed request raises VariantStorageError."""
        from botocore.exceptions import BotoCoreError, ClientError

        report = on_error or _log_delete_error
        client = self._client()
        deleted = 0
        for chunk in _chunks(keys, _S3_DELETE_CHUNK):
            try:
                response = client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": key} for key in chunk], "Quiet": True}
                )
            except (BotoCoreError, ClientError) as exc:
                raise VariantStorageError(
                    f"S3 delete of {len(chunk)} objects failed ({deleted} deleted before): {exc}"
                ) from exc
            errors = response.get("Errors", [])
            for error in errors:
                report(error.get("Key", "?"), f"{error.get('Code', '?')}: {error.get('Message', '')}")
            deleted += len(chunk) - len(errors)
        return deleted

    def list(self, prefix: str) -> Iterator[StoredObject]:
        """Every object whose key starts with ``prefix``, in key order (ListObjectsV2
        through the boto3 paginator, 1000 per page)."""
        from botocore.exceptions import BotoCoreError, ClientError

        paginator = self._client().get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for obj in page.get("Contents", ()):
                    yield StoredObject(key=obj["Key"], size=obj["Size"], last_modified=obj["LastModified"].astimezone(UTC))
        except (BotoCoreError, ClientError) as exc:
            raise VariantStorageError(f"S3 listing of {prefix!r} failed: {exc}") from exc

    def url(self, key: str) -> str:
        if self.public_base_url:
            return self.public_base_url.rstrip("/") + "/" + key
        return self._storage.url(key)

    def url_prefix(self) -> str | None:
        # Without a public base URL each url() is a botocore call (~0.1 ms): learnt once.
        if not hasattr(self, "_url_prefix"):
            self._url_prefix = _url_prefix_probe(self)
        return self._url_prefix


def variant_store_resolve() -> VariantStore:
    """The configured variant store, or VariantStorageNotConfigured with the reason."""
    return variant_store_for(kind=settings.PICSITE_VARIANT_STORAGE, folder=settings.PICSITE_VARIANT_FOLDER)


def variant_store_for(*, kind: str, folder: str) -> VariantStore:
    """The store of ``kind`` ("local" or "s3", configured from settings) under ``folder``:
    where a recorded variant set lives, which may differ from where new sets go. Stores are
    reused while their settings are unchanged (an S3 store builds a boto3 session and client,
    about 50 ms; its client is per thread inside django-storages)."""
    kind = (kind or "").strip().lower()
    if kind == "local":
        config: tuple = ("local", folder, str(settings.PICSITE_VARIANT_LOCAL_ROOT), settings.PICSITE_VARIANT_LOCAL_URL)
    elif kind == "s3":
        if not settings.PICSITE_S3_BUCKET:
            raise VariantStorageNotConfigured(
                "PICSITE_VARIANT_STORAGE=s3 but PICSITE_S3_BUCKET is empty; variant generation is off."
            )
        config = (
            "s3", folder, settings.PICSITE_S3_BUCKET, settings.PICSITE_S3_REGION, settings.PICSITE_S3_ENDPOINT_URL,
            settings.PICSITE_S3_PUBLIC_BASE_URL, settings.PICSITE_S3_ACCESS_KEY_ID,
            settings.PICSITE_S3_SECRET_ACCESS_KEY, settings.PICSITE_S3_TIMEOUT_S,
        )  # fmt: skip
    else:
        raise VariantStorageNotConfigured(
            f"PICSITE_VARIANT_STORAGE={kind or '(empty)'!s}: variant generation is off. "
            "Set it to 'local' or 's3' (with PICSITE_S3_BUCKET)."
        )
    with _STORES_LOCK:
        store = _STORES.get(config)
        if store is None:
            store = _STORES[config] = _build_store(config)
        return store


_STORES: dict[tuple, VariantStore] = {}
_STORES_LOCK = threading.Lock()


def _build_store(config: tuple) -> VariantStore:
    if config[0] == "local":
        _, folder, root, base_url = config
        return LocalVariantStore(root=root, base_url=base_url, folder=folder)
    _, folder, bucket, region, endpoint_url, public_base_url, access_key, secret_key, timeout_s = config
    return S3VariantStore(
        bucket=bucket,
        region=region,
        endpoint_url=endpoint_url,
        public_base_url=public_base_url,
        folder=folder,
        access_key=access_key,
        secret_key=secret_key,
        timeout_s=timeout_s,
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
