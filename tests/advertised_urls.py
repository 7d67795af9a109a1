"""A watcher that fetches, over and over, every variant URL a live site advertises — in the
grid, on each photo's page and in ``GET /api/v1/images/<id>`` — and checks each answers 200
with an image of the width it was declared at. Used by the regeneration test and by the
switch-gap bench (``bench/bench_switch.py``)."""

from __future__ import annotations

import html
import io
import re
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from PIL import Image as PILImage

_SRCSET = re.compile(r'srcset="([^"]*)"')
_SRC = re.compile(r'<img[^>]* src="([^"]+)"[^>]* width="(\d+)"')


def fetch(url: str, headers: dict[str, str] | None = None, timeout: float = 30) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def advertised_in_html(page: str) -> dict[str, int]:
    """URL -> declared width, from every srcset and every <img src width> of a page."""
    found: dict[str, int] = {}
    for srcset in _SRCSET.findall(page):
        for part in html.unescape(srcset).split(","):
            url, _, width = part.strip().rpartition(" ")
            if url and width.endswith("w"):
                found[url] = int(width[:-1])
    for url, width in _SRC.findall(page):
        found[html.unescape(url)] = int(width)
    return found


def advertised_in_api(body: dict) -> dict[str, int]:
    """URL -> width, from the serving set of ``GET /api/v1/images/<id>`` (the URLs a client
    would use; candidates are not advertised)."""
    serving = body["variants"]["serving"] or {}
    return {url: int(width) for tiers in serving.get("urls", {}).values() for width, url in tiers.items()}


@dataclass
class AdvertisedUrlWatcher:
    """Fetch every advertised URL of ``image_ids`` on the site at ``base_url`` in a loop
    (``start``/``stop``); record each failure and the longest stretch a URL kept failing."""

    base_url: str
    image_ids: list[int]
    token: str
    pause_s: float = 0.0
    rounds: int = 0
    checked: int = 0
    failures: list[str] = field(default_factory=list)
    seen_urls: dict[str, int] = field(default_factory=dict)
    longest_gap_s: float = 0.0
    _failing_since: dict[str, float] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def advertised(self) -> dict[str, int]:
        found: dict[str, int] = {}
        status, body = fetch(self.base_url + "/")
        assert status == 200, status
        found.update(advertised_in_html(body.decode()))
        for image_id in self.image_ids:
            status, body = fetch(f"{self.base_url}/photos/{image_id}/")
            assert status == 200, status
            found.update(advertised_in_html(body.decode()))
            status, body = fetch(f"{self.base_url}/api/v1/images/{image_id}", {"Authorization": f"Bearer {self.token}"})
            assert status == 200, (status, body[:300])
            import json

            found.update(advertised_in_api(json.loads(body)))
        return found

    def check_once(self) -> None:
        for url, width in self.advertised().items():
            absolute = url if url.startswith("http") else self.base_url + url
            status, body = fetch(absolute)
            problem = None
            if status != 200:
                problem = f"{url}: HTTP {status}"
            else:
                try:
                    with PILImage.open(io.BytesIO(body)) as im:
                        if im.width != width:
                            problem = f"{url}: declared {width}w, is {im.width} px wide"
                except Exception as exc:  # noqa: BLE001 - any unreadable body is a failure
                    problem = f"{url}: not an image ({exc})"
            now = time.monotonic()
            if problem:
                self.failures.append(problem)
                started = self._failing_since.setdefault(url, now)
                self.longest_gap_s = max(self.longest_gap_s, now - started)
            else:
                self._failing_since.pop(url, None)
            self.seen_urls[url] = width
            self.checked += 1
        self.rounds += 1

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.check_once()
            except Exception as exc:  # noqa: BLE001 - a broken page is a failure too
                self.failures.append(f"page: {exc!r}")
            self._stop.wait(self.pause_s)

    def start(self) -> AdvertisedUrlWatcher:
        self._thread = threading.Thread(target=self._loop, name="url-watcher", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(120)
