"""Name resolution for upstream connections: a short-lived cache, one lookup per name.

asyncio runs every ``getaddrinfo`` in a thread of its default executor. A burst that takes
16 warm connections starts 16 refills at once, and 16 threads handing the GIL back and forth
with the event loop stalled it by several milliseconds (5–9 ms between accepts under a
burst). So a worker resolves a name once, shares the lookup with every connect that asks
while it runs, and reuses the answer for a few seconds, as Envoy's ``STRICT_DNS`` clusters
re-resolve on a timer (nginx and HAProxy resolve upstream names once, at start, by
default). Numeric addresses are never sent to a thread.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

AddrInfo = tuple[Any, ...]  # (family, type, proto, canonname, sockaddr), as getaddrinfo gives

DNS_TTL = 5.0          # seconds an answer is reused
_CACHE_SIZE = 1024     # names kept; CONNECT targets come from clients, so the cache is bounded


class Resolver:
    """``getaddrinfo`` for TCP with a per-worker cache (failures are not cached)."""

    def __init__(self, ttl: float = DNS_TTL) -> None:
        self.ttl = ttl
        self._cache: dict[tuple[str, int], tuple[float, list[AddrInfo]]] = {}
        self._pending: dict[tuple[str, int], asyncio.Future[list[AddrInfo]]] = {}
        self.lookups = 0  # lookups sent to the executor (for tests and debugging)

    async def resolve(self, loop: asyncio.AbstractEventLoop, host: str,
                      port: int) -> list[AddrInfo]:
        """The addresses of ``host:port``; raises :class:`socket.gaierror` like getaddrinfo."""
        key = (host, port)
        cached = self._cache.get(key)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        numeric = _numeric(host, port)
        if numeric is not None:
            self._store(key, numeric, float("inf"))
            return numeric
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = asyncio.ensure_future(self._lookup(loop, key))
            pending.add_done_callback(_retrieve)
        # shield: a connect that times out must not cancel the lookup the others wait on.
        return await asyncio.shield(pending)

    async def _lookup(self, loop: asyncio.AbstractEventLoop,
                      key: tuple[str, int]) -> list[AddrInfo]:
        self.lookups += 1
        try:
            infos = await loop.getaddrinfo(key[0], key[1], type=socket.SOCK_STREAM)
        finally:
            del self._pending[key]
        self._store(key, infos, time.monotonic() + self.ttl)
        return infos

    def _store(self, key: tuple[str, int], infos: list[AddrInfo], expires: float) -> None:
        if len(self._cache) >= _CACHE_SIZE:
            self._cache.clear()
        self._cache[key] = (expires, infos)


def _numeric(host: str, port: int) -> list[AddrInfo] | None:
    """getaddrinfo's answer for an IP literal (no DNS, so no thread), else None."""
    try:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                  flags=socket.AI_NUMERICHOST)
    except (socket.gaierror, UnicodeError):
        return None


def _retrieve(future: asyncio.Future[list[AddrInfo]]) -> None:
    # Every waiter may have given up (timeouts); mark a failure seen so asyncio does not log
    # "exception was never retrieved" for it.
    if not future.cancelled():
        future.exception()
