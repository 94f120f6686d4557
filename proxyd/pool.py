"""The per-origin connection pool of one worker: warm floor, LIFO reuse, bounded FIFO wait.

The pool does the bookkeeping; connections do their own I/O. Decisions:

* **warm floor** — keep ``warm`` idle handshaked connections ready from start-up on and
  refill as they are taken, so a request never pays TCP + TLS set-up on its path;
* **LIFO** — the most recently used idle connection is the least likely to have been closed
  by the origin, and the rest age out by ``idle_ttl``;
* **limit** — at most ``max_connections``; further requests queue FIFO until ``pool_wait``,
  then get 503 ``connection_limit_reached``;
* **freshness** — idle TTL (shortened by the origin's ``Keep-Alive: timeout``), lifetime and
  a request budget; idle connections the origin closes are dropped at once.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import ssl
import time
from typing import Callable, Protocol

from . import errors, logs
from .config import OriginConfig
from .http1 import ParserLimits
from .metrics import WorkerStats
from .router import OriginKey
from .upstream import Connector, ConnState, UpstreamConnection

log = logging.getLogger("proxyd.pool")
_local_limits = logs.RateLimited(log)

_MAX_BACKOFF = 30.0
_SESSION_SCAN_EVERY = 1.0  # seconds between looks for a TLS ticket in live connections
_SESSION_SCAN_MAX = 4      # connections looked at per look
_REFILL_AFTER = 0.005      # least and most seconds from taking a warm connection to
_REFILL_MAX = 0.1          # refilling the floor (the mean handshake time, within these)


class Waiter(Protocol):
    """A request waiting for a connection."""

    def on_connection(self, conn: UpstreamConnection, reused: bool) -> None: ...
    def on_pool_error(self, exc: errors.ProxyError) -> None: ...


# Why a connection closed when the origin ended it (not proxyd's own decision).
_ORIGIN_CLOSES = frozenset({"origin_closed", "error", "unexpected_data"})
_EARLY_CLOSE = 1.0  # seconds after its handshake within which such a close is a failure


class Pool:
    """Connections to one origin (scheme, host, port) within one worker."""

    def __init__(self, key: OriginKey, settings: OriginConfig, connector: Connector,
                 stats: WorkerStats, parser_limits: ParserLimits, pool_wait: float,
                 max_waiters: int, learned: bool = False, learned_ttl: float = 300.0,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.key = key
        self.name = str(key)  # host:port, for logs
        self.settings = settings
        self.server_hostname = settings.server_hostname
        self.connector = connector
        # This origin's own TLS context (one with its client certificate), else None: the
        # connector's shared one.
        self.ssl_context = ssl_context
        self.stats = stats
        self.parser_limits = parser_limits
        self.pool_wait = pool_wait
        self.max_waiters = max_waiters
        self.learned = learned
        self.learned_ttl = learned_ttl
        self.idle: list[UpstreamConnection] = []
        self.busy: set[UpstreamConnection] = set()
        # Private to one client between its requests (NTLM, Negotiate): see set_aside().
        self.private: set[UpstreamConnection] = set()
        self.connecting = 0
        self.waiters: collections.deque[tuple[float, Waiter]] = collections.deque()
        self.last_used = time.monotonic()
        self.failures = 0          # consecutive failed opens, for back-off
        # New connections the origin closed before any request since one last served: the
        # origin takes handshakes but not requests (it wants a client certificate, say).
        self.early_closes = 0
        self.retry_at = 0.0        # no background refill before this time
        self.last_error = ""
        self.closed = False
        self._refill_scheduled = False
        self.ostats = stats.origin(str(key), configured=not learned)
        # Called when a connection joins the idle list (the worker's accept balancing).
        self.on_idle: Callable[[], None] | None = None
        self._session: ssl.SSLSession | None = None  # a ticket to resume with
        self._session_until = 0.0  # monotonic time until which _session is used as it is
        self._session_scan_after = 0.0  # no scan for a ticket before this (see tls_session)

    def __repr__(self) -> str:
        return (f"<Pool {self.key} idle={len(self.idle)} busy={len(self.busy)} "
                f"connecting={self.connecting} waiting={len(self.waiters)}>")

    @property
    def total(self) -> int:
        """Connections open or opening."""
        return len(self.idle) + len(self.busy) + self.connecting

    @property
    def warm_floor(self) -> int:
        """Idle connections to keep ready now (learned origins only while in use)."""
        if self.closed:
            return 0
        if self.learned and (self.failures or time.monotonic() - self.last_used > self.learned_ttl):
            return 0  # a learned origin that fails is only retried when a request asks
        return self.settings.warm

    # -- acquire / release --------------------------------------------------------------------
    def acquire(self, waiter: Waiter, fresh: bool = False) -> None:
        """Give ``waiter`` a connection now, or queue it until one is ready.

        ``fresh`` skips idle connections: used for the one retry after a reused
        connection failed, when the other idle ones may be just as stale.
        """
        now = time.monotonic()
        self.last_used = now
        idle = self.idle
        while idle and not fresh:
            conn = idle.pop()  # LIFO: the most recently used
            reason = conn.expired(now)
            if reason:
                conn.close(reason)
            else:
                self._hand(conn, waiter, reused=True)
                if len(idle) + self.connecting < self.settings.warm:
                    self._schedule_refill()  # below the floor (warm_floor <= settings.warm)
                return
        if len(self.waiters) >= self.max_waiters:
            waiter.on_pool_error(errors.ConnectionLimitReached(
                f"too many requests waiting for a connection to {self.key}"))
            return
        self.waiters.append((now + self.pool_wait, waiter))
        self._open_for_waiters()

    def _hand(self, conn: UpstreamConnection, waiter: Waiter, reused: bool) -> None:
        conn.state = ConnState.BUSY
        self.busy.add(conn)
        if reused:
            self.stats.upstream_reused += 1
        waiter.on_connection(conn, reused)

    def cancel(self, waiter: Waiter) -> None:
        """Forget a waiter whose client went away."""
        for i, (_, w) in enumerate(self.waiters):
            if w is waiter:
                del self.waiters[i]
                return

    def release(self, conn: UpstreamConnection, reusable: bool) -> None:
        """Return a connection after an exchange; closes it unless it is clean and fresh."""
        if conn.state is ConnState.CLOSED:
            return
        if reusable and self.early_closes:
            self.early_closes = 0  # the origin serves requests after all
            self.failures = 0
            self.retry_at = 0.0
        now = time.monotonic()
        reason = "" if reusable else "not_reusable"
        reason = reason or conn.expired(now) or ("pool_closed" if self.closed else "")
        if reason:
            conn.close(reason)
            return
        self.busy.discard(conn)
        if self.waiters:
            _, waiter = self.waiters.popleft()
            self._hand(conn, waiter, reused=True)
            return
        conn.state = ConnState.IDLE
        conn.idle_since = now
        self.idle.append(conn)
        if self.on_idle is not None:
            self.on_idle()

    def set_aside(self, conn: UpstreamConnection) -> None:
        """Take ``conn`` out of the pool's reckoning while it is private to one client between
        that client's requests (authenticated as it: NTLM, Negotiate). It is nobody else's to
        use, so an idle one must not hold a place under ``max_connections`` (HAProxy too
        counts only what is in flight); it still closes after ``idle_ttl`` or the origin's
        Keep-Alive timeout, as an idle connection does."""
        self.busy.discard(conn)
        self.private.add(conn)
        conn.state = ConnState.IDLE
        conn.idle_since = time.monotonic()
        if self.waiters:
            self._open_for_waiters()  # a place under max_connections came free

    def take_back(self, conn: UpstreamConnection) -> bool:
        """The client of a private connection has its next request for this origin: True
        (the connection is busy again) unless it closed or expired meanwhile."""
        self.private.discard(conn)
        if conn.state is ConnState.CLOSED:
            return False
        reason = conn.expired(time.monotonic())
        if reason:
            conn.close(reason)
            return False
        conn.state = ConnState.BUSY
        self.busy.add(conn)
        self.last_used = time.monotonic()
        return True

    def on_closed(self, conn: UpstreamConnection, reason: str) -> None:
        """Called by a connection when it closes, whatever the cause."""
        self.busy.discard(conn)
        self.private.discard(conn)
        try:
            self.idle.remove(conn)
        except ValueError:
            pass
        self.stats.upstream_closed += 1
        self.ostats.closed[reason] += 1
        if (not conn.requests and reason in _ORIGIN_CLOSES and not self.closed
                and time.monotonic() - conn.created < _EARLY_CLOSE):
            # The origin took the handshake, then closed at once, before any request (one
            # that requires a client certificate does so under TLS 1.3, after the
            # handshake): a failure for the back-off, or the refill would reopen it at
            # once, forever. (An origin's idle timeout closing a spare later is no failure.)
            self.early_closes += 1
            if reason == "unexpected_data":
                why = "origin sent bytes on a new connection before any request"
            else:
                why = f"origin closed a new connection before any request ({reason})"
                if self.key.tls and not self.settings.cert_file:
                    why += "; it may require a client certificate (origin cert_file)"
            self._origin_failed(errors.UpstreamError(why))
        if self.key.tls and time.monotonic() >= self._session_until:
            # Keep its ticket: with max_requests = 1, or after a quiet spell, no live
            # connection may be left to take one from when the next one is opened.
            self._keep_session(conn.tls_session())
        log.debug("closed %r reason=%s", conn, reason)

    # -- opening ------------------------------------------------------------------------------
    def tls_session(self) -> ssl.SSLSession | None:
        """A session to resume for the next new connection (nginx's proxy_ssl_session_reuse).

        Resumption skips the certificate chain and the signature on both sides; the ticket
        of any live connection will do (TLS 1.3 tickets arrive after the handshake, so they
        are looked up when a connection is opened, off the per-request path).

        Reading a connection's session costs ~170 µs (CPython copies it through its DER
        form, peer certificate included), about what resumption saves this side, so one
        ticket is kept for half its lifetime, and looked for at most once a second in at
        most a few connections: 16 refills scanning 32 connections each stalled a worker
        for milliseconds in the middle of a burst.
        """
        if not self.key.tls:
            return None
        now = time.monotonic()
        if now < self._session_until or now < self._session_scan_after:
            return self._session
        self._session_scan_after = now + _SESSION_SCAN_EVERY
        for conn in itertools.islice(itertools.chain(reversed(self.idle), self.busy),
                                     _SESSION_SCAN_MAX):
            if self._keep_session(conn.tls_session()):
                break
        return self._session

    def _keep_session(self, session: ssl.SSLSession | None) -> bool:
        if session is None:
            return False
        # RFC 8446 §4.6.1: the server's ticket_lifetime (hint) bounds how long it is valid.
        lifetime = min(session.timeout, session.ticket_lifetime_hint or session.timeout)
        self._session = session
        self._session_until = time.monotonic() + max(1.0, lifetime / 2)
        return True

    def _open_for_waiters(self) -> None:
        while self.connecting < len(self.waiters) and self.total < self.settings.max_connections:
            self._start_open()

    def _schedule_refill(self) -> None:
        # Requests before refills: a burst that takes the warm connections is accepted and
        # sent upstream first, and the refills (each a socket, an SSLSocket and a
        # ClientHello: ~0.3 ms of this worker's CPU, and a TLS handshake at the origin)
        # start about one handshake time later. Taken connections usually come back
        # within that round trip anyway; refilling sooner only competed with the burst
        # (the WAN cold burst of bench/run: 1.58 -> 1.38 RTT at p99).
        if not self._refill_scheduled:
            self._refill_scheduled = True
            delay = self.ostats.handshake.mean()
            asyncio.get_running_loop().call_later(
                min(_REFILL_MAX, max(_REFILL_AFTER, delay)), self._refill)

    def _refill(self) -> None:
        self._refill_scheduled = False
        if time.monotonic() < self.retry_at:
            return
        need = self.warm_floor - len(self.idle) - self.connecting
        room = self.settings.max_connections - self.total
        for _ in range(max(0, min(need, room))):
            self._start_open()

    def _start_open(self) -> None:
        self.connecting += 1
        asyncio.ensure_future(self._open())

    async def _open(self) -> None:
        try:
            conn, handshake = await self.connector.open(self)
        except errors.ProxyError as exc:
            self.connecting -= 1
            self._open_failed(exc)
            return
        except BaseException:
            self.connecting -= 1
            raise
        self.connecting -= 1
        self._opened(conn, handshake)

    def _opened(self, conn: UpstreamConnection, handshake: float) -> None:
        stats = self.stats
        stats.upstream_opened += 1
        self.ostats.opened += 1
        if self.key.tls:
            stats.handshakes += 1
            stats.handshake_seconds += handshake
            self.ostats.handshakes_ok += 1
            self.ostats.handshake.observe(handshake)
        if self.failures and not self.early_closes:
            log.info("origin %s reachable again after %d failed attempts", self.key, self.failures)
            self.failures = 0
            self.retry_at = 0.0
        if self.closed:
            conn.close("pool_closed")
        elif self.waiters:
            _, waiter = self.waiters.popleft()
            self._hand(conn, waiter, reused=False)
        else:
            # A spare goes to the bottom of the LIFO stack: the connection that just served
            # stays on top, so sequential traffic keeps using one connection.
            conn.idle_since = time.monotonic()
            self.idle.insert(0, conn)
            if self.on_idle is not None:
                self.on_idle()

    def _open_failed(self, exc: errors.ProxyError) -> None:
        if isinstance(exc, errors.ProxyResourceError):
            # A limit of this proxy (e.g. RLIMIT_NOFILE) says nothing about the origin.
            _local_limits.warning("%s", exc.reason, fields={"origin": str(self.key)})
        else:
            self._origin_failed(exc)
        # The failure is the answer for the oldest waiter not covered by another
        # connection still being opened — unless connections are busy: one of them
        # may come back before pool_wait (an origin slow to take new handshakes under load
        # still serves the ones it has; failing at once gave 504s after 11 ms of waiting).
        if self.waiters and len(self.waiters) > self.connecting and not self.busy:
            _, waiter = self.waiters.popleft()
            waiter.on_pool_error(exc)

    def _origin_failed(self, exc: errors.ProxyError) -> None:
        self.failures += 1
        self.last_error = exc.reason
        if isinstance(exc, (errors.TlsCertificateError, errors.TlsProtocolError)) or (
                isinstance(exc, errors.ConnectionTimeout) and "TLS" in exc.reason):
            self.stats.handshake_failures += 1
            self.ostats.handshakes_error += 1
        backoff = min(_MAX_BACKOFF, 0.5 * 2 ** min(self.failures, 8))
        self.retry_at = time.monotonic() + backoff
        if self.failures == 1:  # log once per outage, not once per attempt
            log.warning("cannot open connection to %s: %s (retrying in the background)",
                        self.key, exc.reason)

    # -- housekeeping -------------------------------------------------------------------------
    def sweep(self, now: float) -> None:
        """Periodic upkeep: expire idle (and set-aside private) connections and waiters,
        refill the warm floor."""
        for conn in [c for c in (*self.idle, *self.private) if c.expired(now)]:
            conn.close(conn.expired(now))
        while self.waiters and self.waiters[0][0] <= now:
            _, waiter = self.waiters.popleft()
            waiter.on_pool_error(self._wait_error())
        self._open_for_waiters()
        self._refill()

    def _wait_error(self) -> errors.ProxyError:
        if self.total >= self.settings.max_connections:
            return errors.ConnectionLimitReached(
                f"all {self.settings.max_connections} connections to {self.key} are busy "
                f"and none became free within {self.pool_wait:g} s")
        last = f" (last attempt: {self.last_error})" if self.failures else ""
        return errors.ConnectionTimeout(
            f"no connection to {self.key} could be opened within {self.pool_wait:g} s{last}")

    def gauges(self) -> dict[str, int]:
        """Connection counts by state, for the metrics."""
        return {"idle": len(self.idle), "busy": len(self.busy), "connecting": self.connecting,
                "private": len(self.private), "waiting": len(self.waiters)}

    @property
    def quiet(self) -> bool:
        """True when nothing is in flight or held: no busy connection, no waiter, none
        opening, none set aside for a client (closing that pool would undo the client's
        NTLM/Negotiate authentication)."""
        return not self.busy and not self.waiters and not self.connecting and not self.private

    @property
    def unused(self) -> bool:
        """True for a learned pool that is idle and past its TTL (can be dropped)."""
        return (self.learned and self.quiet
                and time.monotonic() - self.last_used > self.learned_ttl)

    def close(self) -> None:
        """Stop refilling and close idle connections; busy ones close on release."""
        self.closed = True
        for conn in list(self.idle) + list(self.private):
            conn.close("pool_closed")
