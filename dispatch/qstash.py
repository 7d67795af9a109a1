"""Publishing to QStash through the official SDK (``PICSITE_DISPATCH=qstash``).

A message is a path on this site (``PICSITE_PUBLIC_URL`` + path), a JSON body, a
deduplication id and a flow-control key; QStash delivers it signed (``Upstash-Signature``)
with at most ``PICSITE_QSTASH_PARALLELISM`` deliveries of one key at once, retrying a 5xx
``PICSITE_QSTASH_RETRIES`` times. Windows go out with the SDK's batch publish: one HTTP call
per 100 messages (QStash's batch limit).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.conf import settings
from qstash import QStash

BATCH_LIMIT = 100  # messages per batch call (QStash's limit)
_clients: dict[tuple[str, str], QStash] = {}
_clients_lock = threading.Lock()


@dataclass(frozen=True)
class Message:
    path: str
    body: dict[str, Any]
    deduplication_id: str
    flow_control_key: str
    not_before: datetime | None = None


def dispatch_is_qstash() -> bool:
    return settings.PICSITE_DISPATCH == "qstash"


def qstash_client() -> QStash:
    """One SDK client per token and base URL (its HTTP connection pool is reused)."""
    key = (settings.QSTASH_TOKEN, settings.QSTASH_URL)
    with _clients_lock:
        if key not in _clients:
            # Two quick retries: a publish runs inside a request (an upload, a delivery), and
            # whatever is not published is picked up by the tick anyway.
            retry = {"retries": 2, "backoff": lambda attempt: 100 * 2**attempt}
            _clients[key] = QStash(settings.QSTASH_TOKEN, base_url=settings.QSTASH_URL or None, retry=retry)
        return _clients[key]


def _request(message: Message) -> dict[str, Any]:
    request: dict[str, Any] = {
        "url": settings.PICSITE_PUBLIC_URL.rstrip("/") + message.path,
        "body": message.body,
        "method": "POST",
        "deduplication_id": message.deduplication_id,
        "retries": settings.PICSITE_QSTASH_RETRIES,
        "flow_control": {"key": message.flow_control_key, "parallelism": settings.PICSITE_QSTASH_PARALLELISM},
    }
    if message.not_before is not None:
        request["not_before"] = int(message.not_before.timestamp())
    return request


def publish_messages(messages: Sequence[Message]) -> int:
    """Publish every message, at most BATCH_LIMIT per HTTP call; returns how many.
    Raises what the SDK raises (the caller decides what a failed publish means)."""
    if not messages:
        return 0
    if not settings.PICSITE_PUBLIC_URL:
        raise RuntimeError("PICSITE_PUBLIC_URL is not set: QStash needs the site's public URL")
    client = qstash_client()
    for start in range(0, len(messages), BATCH_LIMIT):
        client.message.batch_json([_request(m) for m in messages[start : start + BATCH_LIMIT]])
    return len(messages)
