"""Refuse oversized request bodies before Django reads them (a pure ASGI middleware).

Django's ASGIHandler reads the whole body before routing (spooling it to a temp file
past ``FILE_UPLOAD_MAX_MEMORY_SIZE``) and uvicorn has no body limit, so without this
an anonymous client could stream gigabytes to disk before any view said no.

Each request gets a limit from its route (``request_body_limit``): upload routes
``PICSITE_MAX_UPLOAD_REQUEST_BYTES``, GET/HEAD a few KiB, everything else
``PICSITE_MAX_REQUEST_BYTES``. A declared ``Content-Length`` above it is refused before
one byte is read; a chunked body is counted as it arrives and cut off at the limit
(Django sees a client disconnect and sends nothing). Either way the client gets a 413
``{"error": {"code": "request_too_large", ...}}`` with ``Connection: close``, so the
server does not go on reading the rest.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from django.conf import settings
from django.urls import Resolver404, resolve

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# A GET or HEAD has no business carrying a body; a few KiB tolerate odd clients.
BODYLESS_METHODS = frozenset({"GET", "HEAD"})
BODYLESS_METHOD_MAX_BYTES = 8 * 1024
# Routes that take multipart photo uploads (URL names, so they follow urls.py).
UPLOAD_VIEW_NAMES = frozenset({"api-images", "admin:gallery_image_upload"})


def request_body_limit(*, method: str, path: str) -> int:
    """The largest body, in bytes, accepted for ``method path`` (path without root_path)."""
    if method in BODYLESS_METHODS:
        return BODYLESS_METHOD_MAX_BYTES
    try:
        view_name = resolve(path).view_name
    except Resolver404:
        view_name = ""
    if view_name in UPLOAD_VIEW_NAMES:
        return settings.PICSITE_MAX_UPLOAD_REQUEST_BYTES
    return settings.PICSITE_MAX_REQUEST_BYTES


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name.lower() == b"content-length":
            return int(value) if value.strip().isdigit() else None
    return None


def _too_large_response(limit: int) -> tuple[Message, Message]:
    body = json.dumps(
        {
            "error": {
                "code": "request_too_large",
                "message": f"The request body is larger than the {limit} bytes this route accepts.",
                "details": {"limit_bytes": limit},
            }
        }
    ).encode()
    start = {
        "type": "http.response.start",
        "status": 413,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            # The rest of the body is still on its way: close instead of reading it.
            (b"connection", b"close"),
        ],
    }
    return start, {"type": "http.response.body", "body": body, "more_body": False}


class BodyLimitMiddleware:
    """Wraps an ASGI app; ``limit_for(method=, path=)`` picks the limit per request."""

    def __init__(self, app: ASGIApp, *, limit_for: Callable[..., int] = request_body_limit):
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        root_path = scope.get("root_path", "")
        path = scope["path"]
        if root_path and path.startswith(root_path):
            path = path[len(root_path) :] or "/"
        limit = self.limit_for(method=scope["method"], path=path)

        declared = _declared_length(scope)
        if declared is not None and declared > limit:
            for message in _too_large_response(limit):
                await send(message)
            return

        received = 0
        over_limit = False
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received, over_limit
            if over_limit:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # Django turns a disconnect into RequestAborted and answers nothing.
                    over_limit = True
                    return {"type": "http.disconnect"}
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        await self.app(scope, limited_receive, tracking_send)
        if over_limit and not response_started:
            for message in _too_large_response(limit):
                await send(message)
