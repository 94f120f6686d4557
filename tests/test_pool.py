"""Pool and worker integration over real sockets against a trustme TLS origin.

The worker runs in-process on an asyncio loop; the origin (tests/origin.py) runs in threads
and records every handshake, connection and request it sees.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import ssl
import threading
from collections.abc import AsyncIterator

import pytest

from origin import OriginServer, id_body, listen_in_thread, server_context
from proxyd import config, errors
from proxyd.pool import Pool
from proxyd.router import OriginKey
from proxyd.worker import Worker

TIMEOUT = 10.0


def run_async(fn):
    """Run an async test on a fresh event loop (no pytest-asyncio dependency)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return asyncio.run(asyncio.wait_for(fn(*args, **kwargs), 60))
    return wrapper


def make_cfg(ca_pem: str, origin: OriginServer | None = None, **origin_kw: object) -> config.Config:
    data: dict = {"tls": {"ca_file": str(ca_pem)}, "pool": {"learned_warm": 0},
                  "timeouts": {"pool_wait": 0.5}}
    if origin is not None:
        data["origin"] = [{"host": "localhost", "port": origin.port, **origin_kw}]
    return config.from_mapping(data, "test.toml")


@contextlib.asynccontextmanager
async def running_worker(cfg: config.Config) -> AsyncIterator[tuple[Worker, int]]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.setblocking(False)
    worker = Worker(cfg, sock, None)
    task = asyncio.ensure_future(worker.run())
    try:
        await wait_until(lambda: worker.pools or not cfg.origin)
        yield worker, sock.getsockname()[1]
    finally:
        worker._stop.set()
        await asyncio.wait_for(task, TIMEOUT)
        sock.close()


async def wait_until(predicate, timeout: float = TIMEOUT) -> None:
    """Poll a condition on the event loop (the worker runs on the same loop)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


async def fetch(port: int, method: str, url: str, body: bytes = b"") -> tuple[int, dict, bytes]:
    """One request on a new client connection; returns status, headers, body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    host = url.split("/")[2]
    head = f"{method} {url} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
    if body:
        head += f"Content-Length: {len(body)}\r\n"
    writer.write(head.encode() + b"\r\n" + body)
    data = await asyncio.wait_for(reader.read(), TIMEOUT)
    writer.close()
    head_b, _, rest = data.partition(b"\r\n\r\n")
    lines = head_b.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return int(lines[0].split()[1]), headers, rest


class FakeWaiter:
    """Records what the pool hands out (the client side of an acquire)."""

    def __init__(self) -> None:
        self.conn = None
        self.reused: bool | None = None
        self.error: errors.ProxyError | None = None
        self.event = asyncio.Event()

    def on_connection(self, conn, reused: bool) -> None:
        self.conn, self.reused = conn, reused
        self.event.set()

    def on_pool_error(self, exc: errors.ProxyError) -> None:
        self.error = exc
        self.event.set()


def pool_of(worker: Worker, origin: OriginServer) -> Pool:
    return worker.pools[OriginKey("localhost", origin.port, True)]


@run_async
async def test_warm_floor_is_filled_before_requests_and_serves_them(tls_origin, ca_pem):
    cfg = make_cfg(ca_pem, tls_origin, warm=3)
    async with running_worker(cfg) as (worker, port):
        pool = pool_of(worker, tls_origin)
        await wait_until(lambda: len(pool.idle) == 3)
        # TLS 1.3: the client finishes its side just before the origin counts it
        assert tls_origin.wait_handshakes(3, 5) and tls_origin.handshakes == 3
        assert repr(pool) == f"<Pool localhost:{tls_origin.port} idle=3 busy=0 connecting=0 waiting=0>"
        warm_conns = {id(c) for c in pool.idle}
        status, _, body = await fetch(port, "GET", tls_origin.url("/id/a?size=100"))
        assert status == 200 and body == id_body("a", 100)
        assert worker.stats.warm_hits == 1 and worker.stats.pool_misses == 0
        # the request ran on one of the pre-handshaked connections
        assert any(id(c) in warm_conns for c in pool.idle)
        # the taken connection was refilled in the background: floor of 3 idle again
        await wait_until(lambda: len(pool.idle) >= 3 and pool.connecting == 0)


@run_async
async def test_lifo_reuse_of_most_recent_connection(tls_origin, ca_pem):
    cfg = make_cfg(ca_pem, tls_origin, warm=3)
    async with running_worker(cfg) as (worker, _):
        pool = pool_of(worker, tls_origin)
        await wait_until(lambda: len(pool.idle) == 3)
        w1 = FakeWaiter()
        pool.acquire(w1)
        assert w1.reused is True
        newest = pool.idle[-1]
        w2 = FakeWaiter()
        pool.acquire(w2)
        assert w2.conn is newest, "LIFO: the most recently idle connection goes first"
        pool.release(w1.conn, reusable=True)
        w3 = FakeWaiter()
        pool.acquire(w3)
        assert w3.conn is w1.conn
        pool.release(w2.conn, reusable=True)
        pool.release(w3.conn, reusable=True)


@run_async
async def test_limit_queues_fifo_then_503(tls_origin, ca_pem):
    cfg = make_cfg(ca_pem, tls_origin, warm=1, max_connections=1)
    async with running_worker(cfg) as (worker, _):
        pool = pool_of(worker, tls_origin)
        await wait_until(lambda: len(pool.idle) == 1)
        holder, first, second = FakeWaiter(), FakeWaiter(), FakeWaiter()
        pool.acquire(holder)
        pool.acquire(first)
        pool.acquire(second)
        assert repr(pool).endswith("idle=0 busy=1 connecting=0 waiting=2>")
        pool.release(holder.conn, reusable=True)
        assert first.conn is holder.conn and second.conn is None, "FIFO order"
        await asyncio.wait_for(second.event.wait(), TIMEOUT)  # pool_wait = 0.5 s
        assert isinstance(second.error, errors.ConnectionLimitReached)
        assert second.error.status == 503
        pool.release(first.conn, reusable=True)


@run_async
async def test_queued_post_is_not_written_into_a_connection_the_origin_closed(tls_origin, ca_pem):
    """The origin closes right after a keep-alive response, and a POST waits in the queue
    for that very connection: its FIN is in the socket before epoll has said so. A POST
    is never retried (RFC 9112 §9.3.1), so the pool must not hand it over: the POST goes
    on a fresh connection instead of failing with 502."""
    cfg = make_cfg(ca_pem, tls_origin, warm=1, max_connections=1)
    async with running_worker(cfg) as (worker, port):
        pool = pool_of(worker, tls_origin)
        await wait_until(lambda: len(pool.idle) == 1)
        first = asyncio.ensure_future(fetch(port, "GET", tls_origin.url("/late-close/0.3")))
        await wait_until(lambda: len(pool.busy) == 1)
        second = asyncio.ensure_future(fetch(port, "POST", tls_origin.url("/echo"), b"data"))
        await wait_until(lambda: len(pool.waiters) == 1)
        assert (await first)[0] == 200
        status, _, body = await second
        assert (status, body) == (200, b"data")
        assert pool.ostats.closed["origin_closed"] >= 1
        assert [r.method for r in tls_origin.requests] == ["GET", "POST"]


@run_async
async def test_failed_open_leaves_a_waiter_to_a_busy_connection(tls_origin, ca_pem):
    """An origin slow to take new handshakes under load still serves the connections it
    has: a waiter whose new connection failed keeps waiting for a busy one (up to
    pool_wait) instead of getting the handshake's error at once."""
    cfg = make_cfg(ca_pem, tls_origin, warm=1, max_connections=2)
    async with running_worker(cfg) as (worker, _):
        pool = pool_of(worker, tls_origin)
        await wait_until(lambda: len(pool.idle) == 1)
        holder = FakeWaiter()
        pool.acquire(holder)

        async def failing_open(_pool: Pool) -> None:
            raise errors.ConnectionTimeout("TLS handshake to localhost timed out")

        pool.connector.open = failing_open  # type: ignore[method-assign]
        waiter = FakeWaiter()
        pool.acquire(waiter)
        await wait_until(lambda: pool.failures >= 1 and pool.connecting == 0)
        assert waiter.conn is None and waiter.error is None
        pool.release(holder.conn, reusable=True)
        assert waiter.conn is holder.conn
        # With nothing busy, the failure is the answer: no waiting for pool_wait.
        pool.release(waiter.conn, reusable=True)
        pool.idle.pop().close("test")
        late = FakeWaiter()
        pool.acquire(late)
        await asyncio.wait_for(late.event.wait(), TIMEOUT)
        assert isinstance(late.error, errors.ConnectionTimeout)


def test_running_out_of_descriptors_is_not_blamed_on_the_origin():
    """EMFILE while opening an upstream socket is this proxy's limit: a 503 with
    proxy_internal_error (RFC 9209 §2.3.30), not destination_unavailable."""
    import errno as errno_

    from proxyd.upstream import map_connect_error
    exc = map_connect_error(OSError(errno_.EMFILE, "Too many open files"), "h", 443, "connect")
    assert isinstance(exc, errors.ProxyResourceError) and not isinstance(exc, errors.UpstreamError)
    assert (exc.status, exc.error_type) == (503, "proxy_internal_error")
    assert "Too many open files" in exc.reason and "h:443" in exc.reason


@run_async
async def test_a_local_limit_does_not_count_as_an_origin_failure(tls_origin, ca_pem):
    """No backoff, no 'origin unreachable' for a failure that was proxyd's own; the waiter
    still gets the error at once."""
    cfg = make_cfg(ca_pem, tls_origin, warm=0)
    async with running_worker(cfg) as (worker, _):
        pool = pool_of(worker, tls_origin)

        async def emfile(_pool: Pool) -> None:
            raise errors.ProxyResourceError("cannot open a connection: Too many open files")

        pool.connector.open = emfile  # type: ignore[method-assign]
        waiter = FakeWaiter()
        pool.acquire(waiter)
        await asyncio.wait_for(waiter.event.wait(), TIMEOUT)
        assert isinstance(waiter.error, errors.ProxyResourceError)
        assert (pool.failures, pool.retry_at, pool.last_error) == (0, 0.0, "")


@run_async
async def test_learned_origins_are_capped_least_recently_used_first(ca_pem):
    """A client naming ever new origins must not make a worker keep a pool (and a warm
    connection, a descriptor) for each: past pool.learned_max the least recently used one
    with nothing in flight is closed."""
    from proxyd.router import Route

    cfg = config.from_mapping({"tls": {"ca_file": str(ca_pem)},
                               "pool": {"learned_max": 3, "learned_warm": 0}}, "test.toml")
    async with running_worker(cfg) as (worker, _):
        def route(port: int) -> Route:
            return Route(OriginKey("127.0.0.1", port, True), b"/", b"127.0.0.1:%d" % port, None)

        pools = [worker.pool_for(route(1000 + i)) for i in range(3)]
        pools[0].last_used = pools[2].last_used + 1.0  # the first is the most recent now
        worker.pool_for(route(2000))
        assert sorted(k.port for k in worker.pools) == [1000, 1002, 2000]
        assert pools[1].closed, "the least recently used learned pool is closed"
        pools[2].busy.add(object())  # type: ignore[arg-type]  # one in flight: not a victim
        worker.pool_for(route(3000))
        assert 1002 in {k.port for k in worker.pools} and len(worker.pools) == 3
        pools[2].busy.clear()


@run_async
async def test_idle_ttl_closes_and_floor_refills(tls_origin, ca_pem):
    cfg = make_cfg(ca_pem, tls_origin, warm=1, idle_ttl=0.3)
    async with running_worker(cfg) as (worker, _):
        pool = pool_of(worker, tls_origin)
        await wait_until(lambda: len(pool.idle) == 1)
        first = pool.idle[0]
        await wait_until(lambda: first.close_reason == "idle_ttl")
        await wait_until(lambda: len(pool.idle) == 1 and pool.idle[0] is not first)
        assert tls_origin.wait_handshakes(2, 5)


@run_async
async def test_origin_keep_alive_timeout_shortens_ttl(origin_factory, ca_pem):
    origin = origin_factory(keep_alive_header="timeout=3, max=2")
    cfg = make_cfg(ca_pem, origin, warm=0)
    async with running_worker(cfg) as (worker, port):
        status, _, _ = await fetch(port, "GET", origin.url("/bytes/10"))
        assert status == 200
        pool = pool_of(worker, origin)
        conn = pool.idle[-1]
        assert conn.ttl == 2.0, "idle TTL is one second under the origin's Keep-Alive timeout"
        assert conn.max_requests == 3, "max=2 more requests after the first"
        await fetch(port, "GET", origin.url("/bytes/10"))
        await fetch(port, "GET", origin.url("/bytes/10"))
        assert conn.close_reason == "max_requests"


@run_async
async def test_max_requests_and_lifetime(tls_origin, ca_pem):
    cfg = make_cfg(ca_pem, tls_origin, warm=0, max_requests=2)
    async with running_worker(cfg) as (worker, port):
        for _ in range(4):
            assert (await fetch(port, "GET", tls_origin.url("/bytes/1")))[0] == 200
        assert tls_origin.wait_handshakes(2, 5) and tls_origin.handshakes == 2
        pool = pool_of(worker, tls_origin)
        conn = pool.idle[-1] if pool.idle else None
        assert conn is None or conn.requests < 2


@run_async
async def test_idle_connection_closed_by_origin_is_dropped_at_once(origin_factory, ca_pem):
    origin = origin_factory(idle_close_after=0.2)
    cfg = make_cfg(ca_pem, origin, warm=2, idle_ttl=60.0)
    async with running_worker(cfg) as (worker, port):
        pool = pool_of(worker, origin)
        await wait_until(lambda: origin.idle_closes >= 2)
        # dropped on EOF long before the 60 s TTL, and the floor is refilled
        await wait_until(lambda: all(c.close_reason == "" for c in pool.idle)
                         and worker.stats.upstream_closed >= 2)
        for i in range(10):
            status, _, body = await fetch(port, "GET", origin.url(f"/id/r{i}?size=50"))
            assert status == 200 and body == id_body(f"r{i}", 50)


class ThreadedTLSOrigin:
    """A test origin on a loopback socket whose accept loop hands each connection to
    `_accepted` in the accepting thread; `close` stops the loop."""

    name = "origin"

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        self.handshakes = 0
        self.sock, self.port, accepting = listen_in_thread(self._accept, self.name,
                                                           backlog=16)
        accepting.start()

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            self._accepted(raw)

    def _accepted(self, raw: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.sock.close()


class FlakyOrigin(ThreadedTLSOrigin):
    """A TLS origin whose every connection answers one request, then hangs up on the next
    without a response byte: the classic stale keep-alive race."""

    name = "flaky"

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.requests: list[bytes] = []
        super().__init__(ctx)

    def _accepted(self, raw: socket.socket) -> None:
        threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        try:
            conn = self.ctx.wrap_socket(raw, server_side=True)
            self.handshakes += 1
            f = conn.makefile("rb")
            for n in range(2):
                head = b""
                while not head.endswith(b"\r\n\r\n"):
                    line = f.readline()
                    if not line:
                        return
                    head += line
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                f.read(length)
                self.requests.append(head.split(b"\r\n")[0])
                if n == 1:
                    return  # hang up on the second request without answering
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        except OSError:
            pass
        finally:
            raw.close()


class HandshakeOnlyOrigin(ThreadedTLSOrigin):
    """Completes every TLS handshake, then closes at once: what an origin that requires a
    client certificate looks like under TLS 1.3 (its alert comes after the handshake)."""

    name = "handshake-only"

    def _accepted(self, raw: socket.socket) -> None:
        try:
            self.ctx.wrap_socket(raw, server_side=True).close()
            self.handshakes += 1
        except OSError:
            raw.close()


@run_async
async def test_an_origin_that_closes_new_connections_at_once_is_backed_off(ca, ca_pem):
    """Found by a sweep: each warm connection the origin closed right after its handshake
    was refilled at once — 4 handshakes a second, forever (1,195 for one curl request)."""
    origin = HandshakeOnlyOrigin(server_context(ca))
    try:
        cfg = config.apply_flags(make_cfg(ca_pem), origins=[f"localhost:{origin.port}"],
                                 warm=1)
        async with running_worker(cfg) as (worker, _):
            pool = worker.pools[OriginKey("localhost", origin.port, True)]
            await wait_until(lambda: pool.early_closes >= 1)
            await asyncio.sleep(3.0)  # what happens over time is what is tested
            assert origin.handshakes <= 4, f"{origin.handshakes} handshakes in ~3 s"
            assert pool.failures and "before any request" in pool.last_error
            assert "client certificate" in pool.last_error
    finally:
        origin.close()


@pytest.fixture
def flaky_origin(ca):
    o = FlakyOrigin(server_context(ca))
    yield o
    o.close()


@run_async
async def test_idempotent_request_retried_once_on_fresh_connection(flaky_origin, ca_pem):
    cfg = make_cfg(ca_pem)
    cfg = config.apply_flags(cfg, origins=[f"localhost:{flaky_origin.port}"], warm=0)
    async with running_worker(cfg) as (worker, port):
        url = f"http://localhost:{flaky_origin.port}/x"
        assert (await fetch(port, "GET", url))[0] == 200
        status, _, body = await fetch(port, "GET", url)  # reused conn hangs up -> retry
        assert (status, body) == (200, b"ok")
        assert worker.stats.retries == 1
        assert flaky_origin.handshakes == 2


@run_async
async def test_non_idempotent_request_not_retried(flaky_origin, ca_pem):
    cfg = make_cfg(ca_pem)
    cfg = config.apply_flags(cfg, origins=[f"localhost:{flaky_origin.port}"], warm=0)
    async with running_worker(cfg) as (worker, port):
        url = f"http://localhost:{flaky_origin.port}/x"
        assert (await fetch(port, "POST", url, b"a"))[0] == 200
        status, headers, _ = await fetch(port, "POST", url, b"b")
        assert status == 502
        assert "error=http_response_incomplete" in headers["proxy-status"]
        assert worker.stats.retries == 0
        assert [r for r in flaky_origin.requests if r.startswith(b"POST")] == [b"POST /x HTTP/1.1"] * 2


@run_async
async def test_connect_errors_map_to_proxy_status(ca_pem):
    cfg = make_cfg(ca_pem)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port_closed = closed.getsockname()[1]
    closed.close()
    async with running_worker(cfg) as (_, port):
        status, headers, body = await fetch(port, "GET", f"http://127.0.0.1:{port_closed}/")
        assert status == 502 and "error=connection_refused" in headers["proxy-status"]
        assert b"refused" in body


# --------------------------------------------------------------------------------------------
# TLS session reuse: reading a session costs ~170 µs, so the pool keeps one ticket
# --------------------------------------------------------------------------------------------

class FakeSession:
    def __init__(self, lifetime: int = 300) -> None:
        self.timeout = 7200
        self.ticket_lifetime_hint = lifetime


class FakeConn:
    def __init__(self, session: FakeSession | None) -> None:
        self.session = session
        self.reads = 0
        self.requests = 1  # it served: its close is no early close

    def tls_session(self) -> FakeSession | None:
        self.reads += 1
        return self.session


def session_pool() -> Pool:
    from proxyd.config import OriginConfig
    from proxyd.http1 import ParserLimits
    from proxyd.metrics import WorkerStats
    return Pool(OriginKey("origin.test", 443, True), OriginConfig(host="origin.test"),
                None, WorkerStats(), ParserLimits(), 1.0, 10)  # type: ignore[arg-type]


def test_pool_keeps_one_ticket_for_half_its_lifetime(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr("proxyd.pool.time.monotonic", lambda: now[0])
    pool = session_pool()
    ticket = FakeSession(lifetime=300)
    conns = [FakeConn(None) for _ in range(10)] + [FakeConn(ticket)]
    pool.idle.extend(conns)  # the ticket holder is on top (LIFO): looked at first
    assert pool.tls_session() is ticket
    reads = sum(c.reads for c in conns)
    for _ in range(20):
        assert pool.tls_session() is ticket
    assert sum(c.reads for c in conns) == reads == 1  # no session read while it is kept
    now[0] += 151  # past half of the 300 s lifetime: looked up again
    newer = FakeSession()
    conns[-1].session = newer
    assert pool.tls_session() is newer


def test_pool_looks_for_a_ticket_in_few_connections_and_not_on_every_open(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr("proxyd.pool.time.monotonic", lambda: now[0])
    pool = session_pool()
    conns = [FakeConn(None) for _ in range(32)]  # tickets not arrived yet
    pool.idle.extend(conns)
    for _ in range(16):  # a burst of refills
        assert pool.tls_session() is None
    assert sum(c.reads for c in conns) <= 4
    now[0] += 1.5
    conns[-1].session = FakeSession()
    assert pool.tls_session() is conns[-1].session


def test_closing_connection_leaves_its_ticket_only_when_none_is_kept(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr("proxyd.pool.time.monotonic", lambda: now[0])
    pool = session_pool()
    first, second = FakeConn(FakeSession()), FakeConn(FakeSession())
    pool.on_closed(first, "max_requests")  # type: ignore[arg-type]
    assert pool.tls_session() is first.session
    pool.on_closed(second, "max_requests")  # type: ignore[arg-type]
    assert second.reads == 0 and pool.tls_session() is first.session


def test_refill_waits_about_one_handshake_time(monkeypatch):
    """Refills start after the burst that took the warm connections, about one handshake
    (one round trip) later, within 5-100 ms: taken connections usually come back by then."""
    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        delays: list[float] = []
        monkeypatch.setattr(loop, "call_later", lambda delay, cb, *a: delays.append(delay))
        for mean in (None, 0.001, 0.04, 3.0):
            pool = session_pool()
            if mean is not None:
                pool.ostats.handshake.observe(mean)
            pool._schedule_refill()
        return delays
    assert asyncio.run(main()) == [0.005, 0.005, 0.04, 0.1]
