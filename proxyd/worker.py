"""A worker process: one asyncio event loop, its client connections and its pools.

Workers share nothing mutable: each has its own SSLContext, pools and counters, and talks
to the master through a pipe (``ready``, later periodic stats).
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import resource
import select
import signal
import socket
import ssl
import time
from typing import Any

from .access import Access, load_users
from .accesslog import AccessLog
from .client import ClientConnection, ClientState
from .config import (Config, ConfigError, OriginConfig, check_ca_file, check_client_cert,
                     parse_hostport)
from .exchanges import ExchangeLog
from .headers import via_entry
from .http1 import ParserLimits
from .metrics import WorkerStats, merge
from .policy import DestinationPolicy
from .pool import Pool
from .router import OriginKey, Route, Router
from .transport import SocketTransport, new_event_loop
from .upstream import Connector, make_ssl_context

log = logging.getLogger("proxyd.worker")

_TICK = 0.25          # seconds between housekeeping passes (deadlines, pool upkeep)
_STATS_EVERY = 1.0    # seconds between stats reports to the master
# Connections accepted per wake-up: one, so that workers share a burst and each accept is
# followed by the reads of clients already accepted (taking up to 16 per pass made the
# first ones wait for their requests to be read: the after-idle WAN burst of bench/run went
# from 1.4 to 2.0 RTT).
_ACCEPT_BATCH = 1
_DRAIN_GRACE = 1.0    # seconds a quiet connection may still send a request when draining
# How long a worker leaves new connections to the others when its warm pools are spoken for
# (see _has_warm_capacity): about one round trip to the origins, estimated from the warm
# connections' TLS handshakes, within these bounds; then it accepts anyway and the request
# queues in its pool. _DEFER_MAX is also the estimate before any handshake was measured.
_DEFER_MIN = 0.002
_DEFER_MAX = 0.01
_DEFER_CAP = 0.1
_OVERFLOW = 0.1       # after a deferral ran out, accept freely this long


class Worker:
    """Serves client connections accepted on the shared listening socket."""

    def __init__(self, cfg: Config, listen_sock: socket.socket, report_fd: int | None) -> None:
        self.cfg = cfg
        self.sock = listen_sock
        self.report_fd = report_fd
        self._report_pending = b""  # the part of the reports the pipe has not taken yet
        if report_fd is not None:
            os.set_blocking(report_fd, False)
        self.timeouts = cfg.timeouts
        self.limits = cfg.limits
        lim = cfg.limits
        self.parser_limits = ParserLimits(lim.request_line, lim.head_size, lim.header_count,
                                          lim.chunk_line, lim.trailer_size)
        self.router = Router(cfg)
        acc = cfg.access
        self.access = Access(acc.allow_clients,
                             load_users(acc.users_file) if acc.users_file else {}, acc.realm)
        self.stats = WorkerStats(max_learned=cfg.metrics_max_origins)
        self.clients: set[ClientConnection] = set()
        self.pools: dict[OriginKey, Pool] = {}
        self.draining = False
        self.access_log = AccessLog(cfg.access_log)
        self.exchanges = ExchangeLog(self.stats, cfg.metrics, self.access_log)
        self._via10 = via_entry(10, cfg.via)
        self._via11 = via_entry(11, cfg.via)
        ctx, self._cert_contexts = _tls_contexts(cfg)
        dest = cfg.destinations
        policy = DestinationPolicy(dest.deny_networks, dest.allow_networks,
                                   own=_own_addresses(listen_sock, cfg.metrics_listen),
                                   deny_hosts=dest.deny_hosts, allow_hosts=dest.allow_hosts)
        self.connector = Connector(ctx, cfg.timeouts.connect, cfg.timeouts.tls_handshake,
                                   policy)
        self.host_rules = bool(dest.deny_hosts or dest.allow_hosts)
        self._stop = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None  # set by run()
        self.accepting = False
        # Accept balancing across workers (only with more than one worker).
        self.fresh_clients = 0  # accepted clients whose first request has not begun
        self._balance = cfg.worker_count > 1
        self._warm_pools: list[Pool] = []
        self._deferred: asyncio.TimerHandle | None = None
        self._overflow_until = 0.0
        self._exclusive = False  # the listener wakes this worker alone (EPOLLEXCLUSIVE)
        self._nodelay_inherited = False  # accepted sockets get TCP_NODELAY from the listener
        self._parent = os.getppid()

    def via(self, version: int) -> bytes:
        """This hop's Via entry for a message of ``version`` (10 or 11)."""
        return self._via10 if version == 10 else self._via11

    # -- pools --------------------------------------------------------------------------------
    def pool_for(self, route: Route) -> Pool:
        """The pool of the route's origin, created on first use (a learned origin)."""
        pool = self.pools.get(route.origin)
        if pool is None:
            learned = route.settings is None
            if learned:
                self._make_room_for_learned()
            settings = route.settings or self._learned_settings(route.origin)
            pool = self._make_pool(route.origin, settings, learned=learned)
        return pool

    def _make_room_for_learned(self) -> None:
        """At most ``pool.learned_max`` learned origins: one client naming ever new origins
        must not make this worker hold a warm connection (a descriptor) to each. The least
        recently used one with nothing in flight goes; with all in use, none does (those
        are bounded by the client connections that use them)."""
        learned = [p for p in self.pools.values() if p.learned]
        if len(learned) < self.cfg.pool.learned_max:
            return
        spare = [p for p in learned if p.quiet]
        if spare:
            victim = min(spare, key=lambda p: p.last_used)
            victim.close()
            del self.pools[victim.key]

    def _learned_settings(self, key: OriginKey) -> OriginConfig:
        p = self.cfg.pool
        return OriginConfig(host=key.host, port=key.port, tls=key.tls, warm=p.learned_warm,
                            max_connections=p.max_connections, idle_ttl=p.idle_ttl,
                            lifetime=p.lifetime, max_requests=p.max_requests)

    def _make_pool(self, key: OriginKey, settings: OriginConfig, learned: bool) -> Pool:
        pool = Pool(key, settings, self.connector, self.stats, self.parser_limits,
                    self.timeouts.pool_wait, self.limits.pool_waiters, learned=learned,
                    learned_ttl=self.cfg.pool.learned_ttl,
                    ssl_context=self._cert_contexts.get(settings))
        self.pools[key] = pool
        return pool

    def _start_configured_pools(self) -> None:
        for o in self.cfg.origin:
            key = OriginKey(o.host.lower(), o.port, o.tls)
            pool = self._make_pool(key, o, learned=False)
            if o.warm > 0 and self._balance:
                self._warm_pools.append(pool)
                pool.on_idle = self.warm_capacity_changed
            pool._refill()

    def _warm(self) -> bool:
        """True when every configured pool reached its floor or has given up for now."""
        return all(len(p.idle) >= p.settings.warm or p.failures
                   for p in self.pools.values() if not p.learned)

    # -- life cycle ---------------------------------------------------------------------------
    async def run(self) -> None:
        """Serve until SIGTERM, then drain."""
        loop = self._loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGQUIT, lambda: os._exit(0))
        self.sock.setblocking(False)
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited
        except OSError:
            pass  # not a TCP listener
        self._start_accepting()
        self._start_configured_pools()
        housekeeping = asyncio.ensure_future(self._housekeeping())
        await self._report_ready()
        await self._stop.wait()
        await self._drain()
        housekeeping.cancel()

    # -- accepting ----------------------------------------------------------------------------
    # Our own accept loop rather than loop.create_server(): asyncio accepts up to `backlog`
    # connections per wake-up, so one worker swallowed whole bursts while the warm pools of
    # the others sat unused; it also gives the per-worker connection limit a place to act
    # (further clients wait in the kernel's accept queue).
    def _start_accepting(self) -> None:
        if not self.accepting and not self.draining:
            self.accepting = True
            loop = asyncio.get_running_loop()
            loop.add_reader(self.sock.fileno(), self._accept)
            if self._balance:
                self._exclusive = _wake_alone(loop, self.sock.fileno())

    def _stop_accepting(self) -> None:
        if self.accepting:
            self.accepting = False
            asyncio.get_running_loop().remove_reader(self.sock.fileno())

    def _accept(self) -> None:
        # The loop run() saved: asyncio.get_running_loop() makes a getpid() syscall on every
        # call (its fork check), and without EPOLLEXCLUSIVE every worker wakes for every new
        # connection.
        loop = self._loop or asyncio.get_running_loop()
        for _ in range(_ACCEPT_BATCH):
            if len(self.clients) >= self.limits.client_connections:
                self._stop_accepting()  # resumed by client_closed()
                return
            if not self._exclusive and self._spoken_for():
                self._defer_accepting()  # the other workers were woken too
                return
            try:
                conn, peer = self.sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                self._accept_failed(exc)
                return
            self._attach(loop, conn, peer)
            # Stop as soon as the spare warm connections are spoken for, not at the next
            # client's wake-up: with EPOLLEXCLUSIVE that wake-up is this worker's alone, and
            # a client left in the queue then would wait with no worker told about it.
            if self._spoken_for():
                self._defer_accepting()
                return
            if len(self.clients) >= self.limits.client_connections:
                self._stop_accepting()  # resumed by client_closed()
                return

    def _accept_queued(self) -> None:
        """Take the clients already queued (a drain with exclusive wake-ups: one of them may
        have woken only this worker); they are served like any client while draining."""
        if not self._exclusive:
            return
        loop = self._loop or asyncio.get_running_loop()
        while len(self.clients) < self.limits.client_connections:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return  # none left (or the listener was shut down: stopping)
            self._attach(loop, conn, peer)

    def _attach(self, loop: asyncio.AbstractEventLoop, conn: socket.socket, peer: Any) -> None:
        """Serve an accepted client; its request is read at once if it has arrived."""
        conn.setblocking(False)
        if not self._nodelay_inherited:
            self._set_nodelay(conn)
        # Attached synchronously: no Task and no connect_accepted_socket() round trip, so a
        # connection is in self.clients (and counts against the limit) at once.
        SocketTransport(loop, conn, ClientConnection(self), peer).start(read_now=True)

    def _set_nodelay(self, conn: socket.socket) -> None:
        # Without TCP_NODELAY a response head and body written apart wait for a delayed ACK.
        # Linux copies it from the listening socket (set in run()); checked on the first
        # connection, and set on each one where it is not inherited.
        try:
            if conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY):
                self._nodelay_inherited = True
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # not TCP (e.g. a Unix socket), or already reset: reading will tell

    # Accept balancing. Workers share one listening socket and the kernel hands a burst of
    # new connections to whichever wakes first, so one worker could take 23 of 32 first
    # requests while the warm connections of another sat idle, and the excess waited a
    # round trip for a connection to come back. Like nginx's accept_disabled, a worker whose
    # idle warm connections are all spoken for by the new clients it already holds leaves
    # the next connection in the queue for a worker that has one, for at most _DEFER_MAX.
    def _spoken_for(self) -> bool:
        """True when a new client here would find no spare warm connection (and no recent
        deferral ran out): the next one is better left to another worker."""
        return bool(self._warm_pools) and not self._has_warm_capacity() and not self._overflowing()

    def _has_warm_capacity(self) -> bool:
        idle = 0
        gating = False
        for pool in self._warm_pools:
            if pool.failures:
                continue  # an origin that fails to connect has nothing warm to balance
            gating = True
            idle += len(pool.idle)
        return not gating or idle > self.fresh_clients

    def _overflowing(self) -> bool:
        # After a deferral ran out, the other workers are as busy: accept without holding
        # back for a while (holding back again would add _DEFER_MAX per queued client).
        return time.monotonic() < self._overflow_until

    def _defer_accepting(self) -> None:
        self._stop_accepting()
        if self._deferred is None:
            self._deferred = asyncio.get_running_loop().call_later(
                self._defer_time(), self._deferral_over)

    def _defer_time(self) -> float:
        # A client accepted here instead would wait about one round trip for a connection
        # to come back; a TLS 1.3 handshake takes about one round trip too.
        total = 0.0
        count = 0
        for pool in self._warm_pools:
            hist = pool.ostats.handshake
            total += hist.total
            count += hist.count
        if not count:
            return _DEFER_MAX
        return min(_DEFER_CAP, max(_DEFER_MIN, total / count))

    def _deferral_over(self) -> None:
        self._deferred = None
        self._overflow_until = time.monotonic() + _OVERFLOW
        self._undefer()

    def _undefer(self) -> None:
        if self._deferred is not None:
            self._deferred.cancel()
            self._deferred = None
        if len(self.clients) < self.limits.client_connections:
            self._start_accepting()

    def warm_capacity_changed(self) -> None:
        """A warm connection became idle, or a new client's first request began or it left."""
        if self._deferred is not None and self._has_warm_capacity():
            self._undefer()

    def _accept_failed(self, exc: OSError) -> None:
        self._stop_accepting()
        if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
            log.warning("cannot accept: %s; pausing accepts for 0.5 s", exc.strerror)
            asyncio.get_running_loop().call_later(0.5, self._start_accepting)
        # Otherwise (EINVAL) the master shut the listener down: it is stopping.

    def client_closed(self) -> None:
        """A client connection ended: accept again if the limit had stopped us."""
        if not self.accepting and not self.draining and (
                len(self.clients) < self.limits.client_connections):
            self._start_accepting()

    async def _report_ready(self) -> None:
        deadline = time.monotonic() + self.timeouts.connect + self.timeouts.tls_handshake + 1
        while not self._warm() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        self._report({"event": "ready", "pid": os.getpid(),
                      "warm": sum(len(p.idle) for p in self.pools.values())})

    def _report(self, message: dict[str, object], final: bool = False) -> None:
        """Send ``message`` to the master, one JSON line.

        The pipe is non-blocking: a master that does not run for a while (a frozen process
        group, a reload blocked reading its file) must not stop this worker serving once the
        pipe's 64 KiB are full. A stats report that finds the pipe still full is dropped —
        the next one carries the same absolute counts; other messages wait their turn, and
        a line is never split. ``final`` (the last report before exit) waits for room."""
        if self.report_fd is None:
            return
        if self._report_pending:
            self._flush_reports(final)
            if self._report_pending and message.get("event") == "stats" and not final:
                return
        self._report_pending += json.dumps(message).encode() + b"\n"
        self._flush_reports(final)

    def _flush_reports(self, block: bool) -> None:
        fd = self.report_fd
        assert fd is not None
        if block:
            os.set_blocking(fd, True)
        try:
            while self._report_pending:
                sent = os.write(fd, self._report_pending)
                self._report_pending = self._report_pending[sent:]
        except BlockingIOError:
            pass  # the master has not read yet: the rest goes with the next report
        except OSError:
            self._report_pending = b""
            self._stop.set()  # the master is gone
        finally:
            if block:
                os.set_blocking(fd, False)

    async def _housekeeping(self) -> None:
        last_stats = 0.0
        while True:
            await asyncio.sleep(_TICK)
            now = time.monotonic()
            self.exchanges.flush()
            self.access_log.flush()
            for client in list(self.clients):
                client.check_deadline(now)
            for key, pool in list(self.pools.items()):
                pool.sweep(now)
                if pool.unused:
                    pool.close()
                    del self.pools[key]
            if os.getppid() != self._parent:
                log.warning("master process is gone; worker stopping")
                self._stop.set()
            if now - last_stats >= _STATS_EVERY:
                last_stats = now
                self._report_stats()

    def _report_stats(self, final: bool = False) -> None:
        self.exchanges.flush()
        pools: dict[str, dict[str, int]] = {}
        recent: dict[str, str] = {}
        for pool in self.pools.values():
            label = pool.ostats.label
            merge(pools.setdefault(label, {}), pool.gauges())
            if pool.last_error:
                recent[str(pool.key)] = pool.last_error
        snapshot = self.stats.snapshot()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        snapshot["counters"]["cpu_seconds"] = usage.ru_utime + usage.ru_stime
        self._report({"event": "stats", "pid": os.getpid(), **snapshot,
                      "gauges": {"client_connections": len(self.clients), "pools": pools,
                                 "resident_memory_bytes": _resident_bytes()},
                      "recent_errors": recent}, final)

    async def _drain(self) -> None:
        """Stop accepting, let in-flight exchanges finish, close the rest."""
        self._stop_accepting()  # the listening socket stays open in the master
        self.draining = True
        self._accept_queued()
        deadline = time.monotonic() + self.timeouts.shutdown
        while time.monotonic() < deadline:
            now = time.monotonic()
            for client in list(self.clients):
                # Close connections between requests once they have been quiet for a moment.
                # Closing at once would race with a request already on its way (a new
                # connection's first, or a keep-alive client's next: about 60 failed requests
                # per reload in a chaos run); within the grace the request is answered, with
                # Connection: close (HAProxy's idle-close-on-response).
                if (client.state is ClientState.HEAD and not client.head_started
                        and now - client.quiet_since() > _DRAIN_GRACE):
                    client.check_deadline(float("inf"))
            if not self.clients:
                break
            await asyncio.sleep(0.05)
        cut = [client for client in self.clients if client.busy()]
        if cut:
            log.warning("shutdown timeout: closing the connections with a request in flight",
                        extra={"fields": {"connections": len(cut),
                                          "timeout": self.timeouts.shutdown}})
        for client in list(self.clients):
            client.abort_for_shutdown()
        for pool in self.pools.values():
            pool.close()
        self.exchanges.flush()
        self.access_log.flush()
        self._report_stats(final=True)  # final counters, so the master's totals lose nothing


def _wake_alone(loop: asyncio.AbstractEventLoop, fd: int) -> bool:
    """Re-register the listening socket in the loop's epoll with EPOLLEXCLUSIVE (Linux 4.5+):
    a new connection then wakes one worker that is waiting, not every worker — each woken
    loser cost about 40 µs of CPU and added about 35 µs to the winner's latency per new
    connection with 2 workers (``bench/fresh_conn_cpu.py --workers 2``). asyncio has no
    flag for it, so this reaches its epoll object (a private attribute); where that is not
    there, every worker wakes as before. Returns True when the entry is exclusive."""
    exclusive = getattr(select, "EPOLLEXCLUSIVE", 0)
    ep = getattr(getattr(loop, "_selector", None), "_selector", None)
    if not exclusive or not isinstance(ep, select.epoll):
        return False
    try:
        ep.unregister(fd)
    except OSError:
        return False
    try:
        ep.register(fd, select.EPOLLIN | exclusive)
        return True
    except OSError:
        ep.register(fd, select.EPOLLIN)  # as asyncio had it
        return False


def _tls_contexts(cfg: Config) -> tuple[ssl.SSLContext, dict[OriginConfig, ssl.SSLContext]]:
    """The shared upstream TLS context, and one per origin with a client certificate (only
    that origin is ever sent it, not another that merely asks for one).

    The files were checked when the configuration loaded; one gone since (rotated, a
    package half-upgraded) is a ConfigError naming the key, not a traceback."""
    tls = cfg.tls
    try:
        shared = make_ssl_context(tls.verify, tls.ca_file, tls.min_version)
    except (OSError, ssl.SSLError) as exc:
        if tls.ca_file:
            check_ca_file(tls.ca_file, cfg.source)  # says what is wrong with the file
        raise ConfigError(f"{cfg.source}: tls.ca_file: cannot load {tls.ca_file!r}: "
                          f"{exc}") from None
    own: dict[OriginConfig, ssl.SSLContext] = {}
    for i, o in enumerate(cfg.origin):
        if not o.cert_file:
            continue
        try:
            own[o] = make_ssl_context(tls.verify, tls.ca_file, tls.min_version,
                                      o.cert_file, o.key_file)
        except (OSError, ssl.SSLError, ValueError) as exc:
            check_client_cert(o, f"origin[{i}]", cfg.source)  # names the key that failed
            raise ConfigError(f"{cfg.source}: origin[{i}].cert_file: cannot load "
                              f"{o.cert_file!r}: {exc}") from None
    return shared, own


def _own_addresses(sock: socket.socket, metrics_listen: str) -> frozenset[tuple[str, int]]:
    """proxyd's own listeners: connecting there would loop (RFC 9110 §7.6.3)."""
    own = set()
    try:
        own.add(tuple(sock.getsockname()[:2]))
    except OSError:
        pass
    host, port = parse_hostport(metrics_listen, 9128, "metrics_listen", "config")
    if port:  # port 0 is only known to the master
        own.add((host, port))
    return frozenset(own)  # type: ignore[arg-type]


def _raise_fd_limit(clients: int) -> None:
    """Lift the soft open-files limit towards what the connection limit needs (a client and
    an upstream socket each), within the hard limit; warn once if even the clients alone
    would not fit."""
    wanted = clients * 2 + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < clients + 256:
        log.warning("open-files limit %d is below limits.client_connections (%d) + 256; "
                    "raise LimitNOFILE / ulimit -n or lower the limit", soft, clients)


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def _resident_bytes() -> int:
    """This process's resident set now (proc(5): statm's second field, in pages)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return 0


def worker_main(cfg: Config, listen_sock: socket.socket, report_fd: int | None) -> int:
    """Entry point of a forked worker; returns the exit status."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the master decides how to stop
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _raise_fd_limit(cfg.limits.client_connections)
    worker = Worker(cfg, listen_sock, report_fd)
    # The transports are served from the loop's own epoll wait (transport.ReactorSelector).
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(worker.run())
    return 0
