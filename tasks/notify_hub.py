"""One LISTEN connection per process, fanned out to every event stream (SSE).

A stream subscribes to one run; the hub LISTENs on the engine's channel with a single
psycopg connection (opened with the first subscriber, closed shortly after the last
one leaves) and puts each NOTIFY for that run on the stream's queue. So N streams
cost one Postgres connection, not N, and the number of streams is capped per user
and per process (``TooManyStreams``).

Guarantees the streams rely on:

- ``wait_listening`` returns only once LISTEN is active, so a snapshot taken after
  it misses no change (the change is in the snapshot or comes as a NOTIFY).
- If the connection drops, the hub reconnects with backoff; after LISTEN is active
  again every subscriber gets ``RESYNC`` (a NOTIFY may have been lost meanwhile:
  take a fresh snapshot). A subscriber whose queue overflows gets ``RESYNC`` too.

Hubs are per event loop (uvicorn runs one per process).
"""

from __future__ import annotations

import asyncio
import json
import logging
import weakref
from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, Final

import psycopg
from psycopg import sql

logger = logging.getLogger(__name__)

# Queue marker: events may have been missed, take a snapshot (and, for item events,
# replay them from the table).
RESYNC: Final = "resync"
# The engine's NOTIFYs a stream forwards: counters, status, and a batch run's item
# changes (each carrying its AdminTaskEvent id).
DISPATCHED_EVENTS = ("progress", "status", "item")
QUEUE_LIMIT = 1000
IDLE_CLOSE_S = 1.0  # keep the connection briefly for a stream that reconnects at once
PING_EVERY_S = 60.0  # re-run LISTEN on a quiet connection: proves it is alive
PING_TIMEOUT_S = 10.0
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 10.0


class TooManyStreams(Exception):
    def __init__(self, *, scope: str, limit: int):
        super().__init__(f"{limit} event streams are open {'for this user' if scope == 'user' else 'on this server'}")
        self.scope = scope  # "user" or "server"
        self.limit = limit


class EventsUnavailable(Exception):
    """The hub could not LISTEN (Postgres unreachable) within the time asked."""


@dataclass(eq=False)
class Subscription:
    run_id: int
    user_key: Hashable
    hub: NotifyHub
    queue: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(QUEUE_LIMIT))
    closed: bool = False

    def close(self) -> None:
        """Leave the hub (idempotent). Also called by the garbage collector for a stream
        dropped before it started, which may happen on another thread."""
        loop = self.hub._loop
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            self._close_now()
        elif not loop.is_closed():
            loop.call_soon_threadsafe(self._close_now)

    def _close_now(self) -> None:
        if not self.closed:
            self.closed = True
            self.hub._unsubscribe(self)

    def put(self, item: dict[str, Any] | str) -> None:
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            # A stalled client: drop what it has not read, it will take a snapshot instead.
            while not self.queue.empty():
                self.queue.get_nowait()
            self.queue.put_nowait(RESYNC)


class NotifyHub:
    def __init__(self, *, channel: str, conninfo: str, loop: asyncio.AbstractEventLoop):
        self.channel = channel
        self.conninfo = conninfo
        # Every hub operation runs on this loop (see Subscription.close).
        self._loop = loop
        self._by_run: dict[int, set[Subscription]] = {}
        self._per_user: Counter[Hashable] = Counter()
        self._total = 0
        self._listening = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._idle_close: asyncio.TimerHandle | None = None

    def subscribe(self, *, run_id: int, user_key: Hashable, max_total: int, max_per_user: int) -> Subscription:
        """Register a stream for ``run_id`` or raise TooManyStreams (no await: the check
        and the registration cannot interleave with another stream's)."""
        if self._per_user[user_key] >= max_per_user:
            raise TooManyStreams(scope="user", limit=max_per_user)
        if self._total >= max_total:
            raise TooManyStreams(scope="server", limit=max_total)
        sub = Subscription(run_id=run_id, user_key=user_key, hub=self)
        self._by_run.setdefault(run_id, set()).add(sub)
        self._per_user[user_key] += 1
        self._total += 1
        if self._idle_close is not None:
            self._idle_close.cancel()
            self._idle_close = None
        if self._task is None or self._task.done():
            self._task = self._loop.create_task(self._listen(), name="sse-notify-hub")
        return sub

    async def wait_listening(self, *, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._listening.wait(), timeout)
        except TimeoutError:
            raise EventsUnavailable(f"no LISTEN connection after {timeout:g} s") from None

    def _unsubscribe(self, sub: Subscription) -> None:
        subs = self._by_run.get(sub.run_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._by_run[sub.run_id]
        self._per_user[sub.user_key] -= 1
        if self._per_user[sub.user_key] <= 0:
            del self._per_user[sub.user_key]
        self._total -= 1
        if self._total == 0 and self._task is not None:
            self._idle_close = self._loop.call_later(IDLE_CLOSE_S, self._close_if_idle)

    def _close_if_idle(self) -> None:
        self._idle_close = None
        if self._total == 0 and self._task is not None:
            self._task.cancel()
            self._task = None
            self._listening.clear()

    def _dispatch(self, payload_text: str) -> None:
        try:
            payload = json.loads(payload_text)
        except ValueError:
            return
        if not isinstance(payload, dict) or payload.get("event") not in DISPATCHED_EVENTS:
            return
        run_id = payload.get("run")
        if not isinstance(run_id, int):
            return  # anyone with database access can NOTIFY: junk must not stop the hub
        for sub in list(self._by_run.get(run_id, ())):
            sub.put(payload)

    def _resync_all(self) -> None:
        for subs in list(self._by_run.values()):
            for sub in list(subs):
                sub.put(RESYNC)

    async def _listen(self) -> None:
        """Hold the LISTEN connection while there are subscribers; reconnect with backoff."""
        backoff = BACKOFF_FIRST_S
        connected_before = False
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True)
            except Exception as exc:
                logger.warning("event hub cannot connect (%r); retrying in %.1f s", exc, backoff)
            else:
                try:
                    await self._listen_on(conn, resync=connected_before)
                except Exception as exc:  # psycopg.Error, OSError, a ping TimeoutError...: start over
                    logger.warning("event hub lost its LISTEN connection (%r); reconnecting", exc)
                    backoff = BACKOFF_FIRST_S  # it did work: start the backoff over
                finally:
                    self._listening.clear()
                    await conn.close()  # no rollback or other round trip: the peer may be gone
                connected_before = True
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _listen_on(self, conn: psycopg.AsyncConnection, *, resync: bool) -> None:
        listen = sql.SQL("LISTEN {}").format(sql.Identifier(self.channel))
        await conn.execute(listen)
        self._listening.set()
        if resync:
            self._resync_all()
        while True:
            async for notify in conn.notifies(timeout=PING_EVERY_S):
                self._dispatch(notify.payload)
            # Quiet for a while: the same statement again proves the connection alive
            # (and keeps pg_stat_activity showing what this connection is for).
            await asyncio.wait_for(conn.execute(listen), PING_TIMEOUT_S)


_hubs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, NotifyHub] = weakref.WeakKeyDictionary()


def notify_hub_for_loop(*, channel: str, conninfo: str) -> NotifyHub:
    """This event loop's hub (created on first use)."""
    loop = asyncio.get_running_loop()
    hub = _hubs.get(loop)
    if hub is None:
        hub = _hubs[loop] = NotifyHub(channel=channel, conninfo=conninfo, loop=loop)
    return hub
