"""SocketTransport on real loopback sockets, plain TCP and TLS (certificates from trustme).

Every wait is on an event (bytes arrived, a callback ran, a descriptor became readable),
bounded by TIMEOUT; nothing depends on how long something takes.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import os
import select
import socket
import ssl
import struct
from typing import Any, Callable

import pytest
import trustme

from types import SimpleNamespace

from proxyd import errors
from proxyd.http1 import ParserLimits
from proxyd.router import OriginKey
from proxyd.transport import SocketTransport, new_event_loop
from proxyd.upstream import Connector, UpstreamConnection, _tls_handshake

TIMEOUT = 20.0


def run(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run an async test twice, on a fresh loop each time (no pytest-asyncio dependency):
    asyncio's own loop, where the transports keep an epoll set of their own, and a worker's
    loop (``new_event_loop``), where its selector serves them."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        for factory in (None, new_event_loop):
            with asyncio.Runner(loop_factory=factory) as runner:
                runner.run(asyncio.wait_for(fn(*args, **kwargs), 60))
    return wrapper


class Rec(asyncio.Protocol):
    """Records every callback; ``until(pred)`` waits for a state."""

    def __init__(self, keep_open_on_eof: bool = False,
                 on_data: Callable[[Rec, bytes], None] | None = None) -> None:
        self.keep_open_on_eof = keep_open_on_eof
        self.on_data = on_data
        self.transport: SocketTransport | None = None
        self.data = bytearray()
        self.calls = 0
        self.eofs = 0
        self.pauses = 0
        self.resumes = 0
        self.lost = 0
        self.lost_exc: BaseException | None = None
        self.events: list[str] = []
        self.changed = asyncio.Event()

    def _note(self, what: str) -> None:
        self.events.append(what)
        self.changed.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._note("made")

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.calls += 1
        self._note("data")
        if self.on_data is not None:
            self.on_data(self, data)

    def eof_received(self) -> bool:
        self.eofs += 1
        self._note("eof")
        return self.keep_open_on_eof

    def pause_writing(self) -> None:
        self.pauses += 1
        self._note("pause")

    def resume_writing(self) -> None:
        self.resumes += 1
        self._note("resume")

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost += 1
        self.lost_exc = exc
        self._note("lost")

    async def until(self, pred: Callable[[], bool], timeout: float = TIMEOUT) -> None:
        async def wait() -> None:
            while not pred():
                self.changed.clear()
                await self.changed.wait()
        await asyncio.wait_for(wait(), timeout)


# -- socket pairs -----------------------------------------------------------------------------
def tcp_socks() -> tuple[socket.socket, socket.socket]:
    """A connected loopback TCP pair (client, server), both non-blocking."""
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        c = socket.create_connection(lsock.getsockname(), timeout=TIMEOUT)
        s, _ = lsock.accept()
    for x in (c, s):
        x.setblocking(False)
        x.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return c, s


@pytest.fixture(scope="module")
def tls_contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = trustme.CA()
    sctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(sctx)
    cctx = ssl.create_default_context()
    ca.configure_trust(cctx)
    cctx.minimum_version = ssl.TLSVersion.TLSv1_3  # session tickets after the handshake
    return cctx, sctx


async def tls_socks(ctxs: tuple[ssl.SSLContext, ssl.SSLContext]
                    ) -> tuple[ssl.SSLSocket, ssl.SSLSocket]:
    """A loopback TLS pair (client, server) handshaked the way Connector.open does it."""
    cctx, sctx = ctxs
    c, s = tcp_socks()
    cs = cctx.wrap_socket(c, server_hostname="localhost", do_handshake_on_connect=False,
                          suppress_ragged_eofs=False)
    ss = sctx.wrap_socket(s, server_side=True, do_handshake_on_connect=False,
                          suppress_ragged_eofs=False)
    loop = asyncio.get_running_loop()
    await asyncio.wait_for(asyncio.gather(_tls_handshake(loop, cs), _tls_handshake(loop, ss)),
                           TIMEOUT)
    return cs, ss


def attach(sock: socket.socket, proto: Rec) -> SocketTransport:
    return SocketTransport(asyncio.get_running_loop(), sock, proto).start()


async def read_all(sock: socket.socket, until_eof: bool = True, n: int = 0) -> bytes:
    """Read a raw socket through the loop: up to EOF, or ``n`` bytes."""
    loop = asyncio.get_running_loop()
    out = bytearray()
    while until_eof or len(out) < n:
        try:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), TIMEOUT)
        except ConnectionResetError:
            break
        if not chunk:
            break
        out += chunk
    return bytes(out)


async def spin(n: int = 20) -> None:
    """Let the loop run ``n`` iterations (callbacks scheduled with call_soon get to run)."""
    for _ in range(n):
        await asyncio.sleep(0)


def readable(sock: socket.socket, timeout: float) -> bool:
    return bool(select.select([sock], [], [], timeout)[0])


async def fill(transport: SocketTransport, proto: Rec, chunk: bytes, limit: int) -> int:
    """Write ``chunk`` until the protocol is told to pause; returns bytes written."""
    written = 0
    while not proto.pauses:
        assert written < limit, "never paused: the peer's buffers did not fill"
        transport.write(chunk)
        written += len(chunk)
    return written


def small_buffers(*socks: socket.socket) -> None:
    for s in socks:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32768)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)


# -- plain TCP --------------------------------------------------------------------------------
@run
async def test_data_both_ways_and_extra_info() -> None:
    c, s = tcp_socks()
    pc, ps = Rec(), Rec()
    tc, ts = attach(c, pc), attach(s, ps)
    assert pc.events == ["made"] and pc.transport is tc  # connection_made runs in start()
    tc.write(b"ping")
    ts.writelines([b"po", b"", b"ng"])
    await pc.until(lambda: pc.data == b"pong")
    await ps.until(lambda: ps.data == b"ping")
    assert tc.get_extra_info("socket") is c
    assert tc.get_extra_info("peername") == s.getsockname()
    assert tc.get_extra_info("sockname") == c.getsockname()
    assert tc.get_extra_info("ssl_object") is None
    assert tc.get_extra_info("nope", 7) == 7
    assert tc.can_write_eof() and tc.get_write_buffer_size() == 0 and not tc.is_closing()
    tc.close()
    ts.close()
    await pc.until(lambda: pc.lost == 1)
    await ps.until(lambda: ps.lost == 1)


@run
async def test_partial_writes_pause_and_resume_writing() -> None:
    c, s = tcp_socks()
    small_buffers(c, s)
    pc = Rec()
    tc = attach(c, pc)
    chunk = os.urandom(65536)
    written = await fill(tc, pc, chunk, 64 << 20)
    assert pc.pauses == 1 and tc.get_write_buffer_size() > 65536
    tc.write(chunk)  # more while paused is buffered, not refused
    written += len(chunk)
    got = await read_all(s, until_eof=False, n=written)
    assert got == chunk * (written // len(chunk))
    await pc.until(lambda: pc.resumes == 1)
    assert tc.get_write_buffer_size() == 0 and pc.pauses == 1
    tc.close()
    s.close()


@run
async def test_set_write_buffer_limits() -> None:
    c, s = tcp_socks()
    tc = attach(c, Rec())
    assert tc.get_write_buffer_limits() == (16384, 65536)
    tc.set_write_buffer_limits(high=1000)
    assert tc.get_write_buffer_limits() == (250, 1000)
    tc.set_write_buffer_limits(low=100)
    assert tc.get_write_buffer_limits() == (100, 400)
    with pytest.raises(ValueError):
        tc.set_write_buffer_limits(high=1, low=2)
    tc.abort()
    s.close()


@run
async def test_pause_and_resume_reading() -> None:
    c, s = tcp_socks()
    pc = Rec()
    tc = attach(c, pc)
    tc.pause_reading()
    s.send(b"while paused")
    assert readable(c, TIMEOUT)  # the bytes are in c's receive queue
    await spin()
    assert pc.calls == 0
    tc.resume_reading()
    await pc.until(lambda: pc.data == b"while paused")
    tc.close()
    s.close()


@run
async def test_close_flushes_buffered_data() -> None:
    c, s = tcp_socks()
    small_buffers(c, s)
    pc = Rec()
    tc = attach(c, pc)
    chunk = os.urandom(65536)
    written = await fill(tc, pc, chunk, 64 << 20)
    tc.close()
    assert tc.is_closing() and pc.lost == 0
    tc.write(b"dropped")  # after close: silently dropped
    got = await read_all(s)  # up to EOF: everything, then the FIN
    assert len(got) == written and got == chunk * (written // len(chunk))
    await pc.until(lambda: pc.lost == 1)
    assert pc.lost_exc is None
    s.close()


@run
async def test_abort_drops_buffered_data() -> None:
    c, s = tcp_socks()
    small_buffers(c, s)
    pc = Rec()
    tc = attach(c, pc)
    written = await fill(tc, pc, os.urandom(65536), 64 << 20)
    buffered = tc.get_write_buffer_size()
    tc.abort()
    assert tc.is_closing() and pc.lost == 0 and tc.get_write_buffer_size() == 0
    got = await read_all(s)
    assert len(got) <= written - buffered
    await pc.until(lambda: pc.lost == 1)
    assert pc.lost_exc is None
    s.close()


@run
async def test_close_lingering_sends_fin_and_drops_the_peers_bytes() -> None:
    c, s = tcp_socks()
    pc = Rec()
    tc = attach(c, pc)
    tc.pause_reading()
    s.sendall(b"u" * 100000)  # the peer is still sending: unread bytes at close time
    tc.write(b"answer")
    tc.close_lingering()
    # The peer reads the answer and then a clean FIN, not a reset ...
    assert await read_all(s) == b"answer"
    # ... while the transport keeps reading (and dropping) until the peer closes.
    await spin()
    assert pc.lost == 0
    s.close()
    await pc.until(lambda: pc.lost == 1)
    assert pc.lost_exc is None and pc.data == b""


@run
async def test_close_lingering_is_bounded() -> None:
    import proxyd.transport as transport_mod
    c, s = tcp_socks()
    pc = Rec()
    tc = attach(c, pc)
    s.sendall(b"u" * 1000)
    old, transport_mod._LINGER_TIME = transport_mod._LINGER_TIME, 0.05
    try:
        tc.close_lingering()
        await pc.until(lambda: pc.lost == 1)  # the peer never closes: the time limit ends it
    finally:
        transport_mod._LINGER_TIME = old
    s.close()


@run
async def test_eof_closes_unless_protocol_keeps_it_open() -> None:
    c, s = tcp_socks()
    pc = Rec()
    tc = attach(c, pc)
    s.shutdown(socket.SHUT_WR)
    await pc.until(lambda: pc.lost == 1)
    assert pc.eofs == 1 and tc.is_closing()
    assert await read_all(s) == b""  # the transport closed its side too
    s.close()


@run
async def test_half_close_keeps_writing_possible() -> None:
    c, s = tcp_socks()
    pc = Rec(keep_open_on_eof=True)
    tc = attach(c, pc)
    s.sendall(b"request")
    s.shutdown(socket.SHUT_WR)
    await pc.until(lambda: pc.eofs == 1)
    assert pc.data == b"request" and not tc.is_closing() and pc.lost == 0
    tc.write(b"answer after the peer's EOF")
    tc.write_eof()
    tc.write(b"dropped after write_eof")
    assert await read_all(s) == b"answer after the peer's EOF"
    tc.close()
    await pc.until(lambda: pc.lost == 1)
    s.close()


@run
async def test_write_eof_waits_for_the_buffer() -> None:
    c, s = tcp_socks()
    small_buffers(c, s)
    pc = Rec()
    tc = attach(c, pc)
    chunk = os.urandom(65536)
    written = await fill(tc, pc, chunk, 64 << 20)
    tc.write_eof()  # the FIN goes after the buffered bytes
    got = await read_all(s)
    assert len(got) == written
    assert not tc.is_closing()
    s.sendall(b"the other direction still works")
    await pc.until(lambda: pc.data == b"the other direction still works")
    tc.close()
    s.close()


@run
async def test_connection_lost_exactly_once_and_never_reentrant() -> None:
    c, s = tcp_socks()
    pc = Rec()
    tc = attach(c, pc)
    tc.close()
    tc.abort()
    tc.close()
    tc.write(b"x")
    assert pc.lost == 0  # scheduled, not called from inside close()/abort()
    await pc.until(lambda: pc.lost == 1)
    await spin()
    assert pc.lost == 1 and pc.events == ["made", "lost"]
    s.close()


@run
async def test_reset_is_fatal_and_reported() -> None:
    c, s = tcp_socks()
    pc = Rec()
    attach(c, pc)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()  # RST
    await pc.until(lambda: pc.lost == 1)
    assert isinstance(pc.lost_exc, ConnectionResetError)


@run
async def test_exception_in_data_received_aborts_and_is_logged(caplog) -> None:
    def boom(rec: Rec, data: bytes) -> None:
        raise RuntimeError("protocol bug")

    c, s = tcp_socks()
    pc = Rec(on_data=boom)
    tc = attach(c, pc)
    with caplog.at_level(logging.ERROR, logger="proxyd"):
        s.sendall(b"trigger")
        await pc.until(lambda: pc.lost == 1)
    assert tc.is_closing() and isinstance(pc.lost_exc, RuntimeError)
    assert any("data_received" in r.getMessage() and r.exc_info for r in caplog.records)
    assert await read_all(s) == b""  # aborted: the peer sees the connection end
    s.close()


@run
async def test_a_transport_closed_by_another_in_the_same_batch_gets_no_event() -> None:
    # Both sockets are readable before the loop runs, so one epoll.poll() returns both;
    # whichever is served first aborts the other, whose event must then be dropped.
    (c1, s1), (c2, s2) = tcp_socks(), tcp_socks()
    transports: list[SocketTransport] = []

    def abort_the_other(rec: Rec, data: bytes) -> None:
        for t in transports:
            if t is not rec.transport:
                t.abort()

    p1, p2 = Rec(on_data=abort_the_other), Rec(on_data=abort_the_other)
    transports += [attach(c1, p1), attach(c2, p2)]
    s1.sendall(b"one")
    s2.sendall(b"two")
    assert readable(c1, TIMEOUT) and readable(c2, TIMEOUT)
    await spin()  # one poll serves both: an abort and its connection_lost
    assert p1.lost + p2.lost == 1
    assert p1.calls + p2.calls == 1  # the aborted one never saw its bytes
    assert sorted([p1.lost, p2.lost]) == [0, 1]
    for t in transports:
        t.abort()
    s1.close()
    s2.close()


@run
async def test_descriptor_reused_after_close_is_watched_anew() -> None:
    # A transport unregisters before closing its socket, so a new socket that gets the same
    # descriptor number is watched for itself alone.
    c, s = tcp_socks()
    first = Rec()
    tc = attach(c, first)
    fd = c.fileno()
    tc.abort()
    other, s2 = tcp_socks()
    if other.fileno() == fd:
        c2 = other  # it got the number by itself
    else:
        os.dup2(other.fileno(), fd)  # the new connection on the number just closed
        other.close()
        c2 = socket.socket(fileno=fd)
    second = Rec()
    attach(c2, second)
    s2.sendall(b"for the new one")
    await second.until(lambda: bytes(second.data) == b"for the new one")
    assert first.calls == 0 and first.lost == 1
    s.close()
    s2.close()


def test_a_failure_inside_one_transport_does_not_stop_the_others(caplog, monkeypatch) -> None:
    original = SocketTransport._on_events
    broken: list[SocketTransport] = []

    def on_events(self: SocketTransport, events: int) -> None:
        if self in broken:
            raise RuntimeError("transport bug")
        original(self, events)

    monkeypatch.setattr(SocketTransport, "_on_events", on_events)
    _failure_does_not_stop_the_others(caplog, broken)


@run
async def _failure_does_not_stop_the_others(caplog, broken: list[SocketTransport]) -> None:
    (c1, s1), (c2, s2) = tcp_socks(), tcp_socks()
    p1, p2 = Rec(), Rec()
    t1, t2 = attach(c1, p1), attach(c2, p2)
    broken.append(t1)
    with caplog.at_level(logging.ERROR, logger="proxyd"):
        s1.sendall(b"x")
        s2.sendall(b"y")
        await p2.until(lambda: p2.calls == 1)
        await p1.until(lambda: p1.lost == 1)
    assert any("event handling failed" in r.getMessage() for r in caplog.records)
    t2.abort()
    s1.close()
    s2.close()


@run
async def test_abort_in_connection_made() -> None:
    class Refuse(Rec):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            transport.abort()

    c, s = tcp_socks()
    pc = Refuse()
    attach(c, pc)
    await pc.until(lambda: pc.lost == 1)
    assert await read_all(s) == b""
    s.close()


# -- TLS --------------------------------------------------------------------------------------
@run
async def test_tls_data_both_ways(tls_contexts) -> None:
    cs, ss = await tls_socks(tls_contexts)
    pc, ps = Rec(), Rec()
    tc, ts = attach(cs, pc), attach(ss, ps)
    assert tc.get_extra_info("ssl_object") is cs and not tc.can_write_eof()
    with pytest.raises(NotImplementedError):
        tc.write_eof()
    tc.writelines([b"GET / HTTP/1.1\r\n", b"\r\n"])
    await ps.until(lambda: ps.data == b"GET / HTTP/1.1\r\n\r\n")
    ts.write(b"HTTP/1.1 204 No Content\r\n\r\n")
    await pc.until(lambda: pc.data == b"HTTP/1.1 204 No Content\r\n\r\n")
    tc.abort()
    ts.abort()


@run
async def test_tls_clean_close_notify(tls_contexts) -> None:
    cs, ss = await tls_socks(tls_contexts)
    pc, ps = Rec(), Rec()
    tc, ts = attach(cs, pc), attach(ss, ps)
    ts.write(b"body up to the close")
    ts.close()  # flushes, then one non-blocking SSL_shutdown: close_notify
    await pc.until(lambda: pc.lost == 1)
    assert pc.data == b"body up to the close" and pc.eofs == 1
    assert tc.tls_clean_eof is True and pc.lost_exc is None
    await ps.until(lambda: ps.lost == 1)


@run
async def test_tls_ragged_eof(tls_contexts) -> None:
    cs, ss = await tls_socks(tls_contexts)
    pc, ps = Rec(), Rec()
    tc, ts = attach(cs, pc), attach(ss, ps)
    assert tc.tls_clean_eof is None
    ts.write(b"truncated bo")
    await pc.until(lambda: pc.data == b"truncated bo")
    ts.abort()  # bare TCP FIN, no close_notify
    await pc.until(lambda: pc.lost == 1)
    assert pc.eofs == 1 and tc.tls_clean_eof is False


@run
async def test_tls_large_transfers_both_ways(tls_contexts) -> None:
    cs, ss = await tls_socks(tls_contexts)
    up = os.urandom(5 << 20)
    down = os.urandom((4 << 20) + 12345)
    pc, ps = Rec(), Rec()
    tc, ts = attach(cs, pc), attach(ss, ps)
    tc.write(up)  # one write above the piece cap
    for i in range(0, len(down), 100000):  # many writes, most of them buffered
        ts.write(down[i:i + 100000])
    await ps.until(lambda: len(ps.data) >= len(up))
    await pc.until(lambda: len(pc.data) >= len(down))
    assert hashlib.sha256(ps.data).digest() == hashlib.sha256(up).digest()
    assert hashlib.sha256(pc.data).digest() == hashlib.sha256(down).digest()
    await pc.until(lambda: tc.get_write_buffer_size() == 0 and ts.get_write_buffer_size() == 0)
    assert pc.pauses == pc.resumes and ps.pauses == ps.resumes
    ts.close()
    await pc.until(lambda: pc.lost == 1)
    assert tc.tls_clean_eof is True


@run
async def test_tls_pause_writing_against_a_paused_reader(tls_contexts) -> None:
    cs, ss = await tls_socks(tls_contexts)
    small_buffers(cs, ss)
    pc, ps = Rec(), Rec()
    tc, ts = attach(cs, pc), attach(ss, ps)
    ts.pause_reading()
    chunk = os.urandom(50000)  # not a multiple of a record: pieces split records oddly
    written = await fill(tc, pc, chunk, 64 << 20)
    assert tc.get_write_buffer_size() > 65536
    await spin()
    assert ps.calls == 0
    ts.resume_reading()
    await ps.until(lambda: len(ps.data) >= written)
    assert ps.data == chunk * (written // len(chunk))
    await pc.until(lambda: pc.resumes == 1)
    # close while data is still buffered: flushed, then close_notify
    tc.write(chunk * 40)
    tc.close()
    await ps.until(lambda: ps.eofs == 1)
    assert len(ps.data) == written + 40 * len(chunk) and ts.tls_clean_eof is True


@run
async def test_tls13_session_tickets_on_an_idle_connection(tls_contexts) -> None:
    cs, ss = await tls_socks(tls_contexts)
    assert cs.version() == "TLSv1.3"
    # The server's NewSessionTicket messages follow its handshake: bytes on the wire that
    # carry no application data.
    assert readable(cs, TIMEOUT)
    pc = Rec()
    tc = attach(cs, pc)
    loop = asyncio.get_running_loop()
    for _ in range(1000):  # until the transport has consumed them
        if not readable(cs, 0):
            break
        await asyncio.sleep(0)
    assert not readable(cs, 0)
    await spin()
    assert pc.calls == 0 and pc.eofs == 0 and pc.lost == 0 and not tc.is_closing()
    ss.setblocking(True)
    ss.sendall(b"real data")
    ss.setblocking(False)
    await pc.until(lambda: pc.data == b"real data")
    tc.abort()
    ss.close()
    assert loop.is_running()


@run
async def test_tls_exception_in_data_received(tls_contexts, caplog) -> None:
    def boom(rec: Rec, data: bytes) -> None:
        raise ValueError("bad parser state")

    cs, ss = await tls_socks(tls_contexts)
    pc, ps = Rec(on_data=boom), Rec()
    tc, ts = attach(cs, pc), attach(ss, ps)
    with caplog.at_level(logging.ERROR, logger="proxyd"):
        ts.write(b"x")
        await pc.until(lambda: pc.lost == 1)
    assert isinstance(pc.lost_exc, ValueError) and tc.is_closing()
    assert any("data_received" in r.getMessage() for r in caplog.records)
    await ps.until(lambda: ps.lost == 1)  # the peer saw the connection end
    assert ts.tls_clean_eof is False  # aborted: no close_notify


@run
async def test_tls_eof_read_while_paused_waits_for_resume(tls_contexts) -> None:
    def pause(rec: Rec, data: bytes) -> None:
        rec.transport.pause_reading()  # type: ignore[union-attr]

    cs, ss = await tls_socks(tls_contexts)
    ps = Rec()
    ts = attach(ss, ps)
    ts.write(b"last bytes")
    ts.close()  # data and close_notify both reach the client's receive queue now
    await ps.until(lambda: ps.lost == 1)
    pc = Rec(on_data=pause)
    tc = attach(cs, pc)  # one read pass finds both: data, then EOF
    await pc.until(lambda: pc.calls == 1)
    await spin()
    assert pc.data == b"last bytes" and pc.eofs == 0 and pc.lost == 0
    tc.resume_reading()
    await pc.until(lambda: pc.lost == 1)
    assert pc.eofs == 1 and tc.tls_clean_eof is True


@run
async def test_exception_in_connection_made_aborts(caplog) -> None:
    class Broken(Rec):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            raise RuntimeError("cannot start")

    c, s = tcp_socks()
    pc = Broken()
    with caplog.at_level(logging.ERROR, logger="proxyd"):
        tc = attach(c, pc)
        await pc.until(lambda: pc.lost == 1)
    assert tc.is_closing() and isinstance(pc.lost_exc, RuntimeError)
    assert any("connection_made" in r.getMessage() for r in caplog.records)
    assert await read_all(s) == b""
    s.close()


# -- Connector.open: the handshake proxyd drives itself -------------------------------------
def fake_pool(port: int, tls: bool = True) -> Any:
    return SimpleNamespace(key=OriginKey("127.0.0.1", port, tls), server_hostname="localhost",
                           parser_limits=ParserLimits(),
                           settings=SimpleNamespace(idle_ttl=30.0, max_requests=100),
                           on_closed=lambda conn, reason: None, tls_session=lambda: None,
                           ssl_context=None)


async def serve_once(handler: Callable[[socket.socket], Any]) -> tuple[int, asyncio.Task[Any]]:
    """A loopback listener that hands its first connection to ``handler``."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    lsock.setblocking(False)
    loop = asyncio.get_running_loop()

    async def accept() -> Any:
        with lsock:
            conn, _ = await loop.sock_accept(lsock)
        conn.setblocking(False)
        return await handler(conn)
    return lsock.getsockname()[1], asyncio.ensure_future(accept())


@run
async def test_connector_opens_tls_on_a_socket_transport(tls_contexts) -> None:
    cctx, sctx = tls_contexts

    async def origin(conn: socket.socket) -> bytes:
        ss = sctx.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        await _tls_handshake(asyncio.get_running_loop(), ss)
        ps = Rec()
        ts = attach(ss, ps)
        await ps.until(lambda: ps.data.endswith(b"\r\n\r\n"))
        ts.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        ts.close()
        return bytes(ps.data)

    port, task = await serve_once(origin)
    conn, took = await Connector(cctx, 5.0, 5.0).open(fake_pool(port))  # type: ignore[arg-type]
    assert isinstance(conn, UpstreamConnection) and took > 0
    t = conn.transport
    assert isinstance(t, SocketTransport)
    sock = t.get_extra_info("ssl_object")
    assert sock is t.get_extra_info("socket") and sock.version() == "TLSv1.3"
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    conn.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert await asyncio.wait_for(task, TIMEOUT) == b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"
    conn.close("test")


@run
async def test_connector_plain_origin() -> None:
    async def origin(conn: socket.socket) -> None:
        conn.close()

    port, task = await serve_once(origin)
    conn, _ = await Connector(ssl.create_default_context(), 5.0, 5.0).open(
        fake_pool(port, tls=False))  # type: ignore[arg-type]
    t = conn.transport
    assert isinstance(t, SocketTransport) and t.get_extra_info("ssl_object") is None
    assert t.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    await task
    conn.close("test")


@run
async def test_connector_untrusted_certificate(tls_contexts) -> None:
    _, sctx = tls_contexts
    other = ssl.create_default_context()
    trustme.CA().configure_trust(other)  # trusts some other CA only

    async def origin(conn: socket.socket) -> None:
        ss = sctx.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        try:
            await _tls_handshake(asyncio.get_running_loop(), ss)
        except (ssl.SSLError, OSError):
            pass
        ss.close()

    port, task = await serve_once(origin)
    with pytest.raises(errors.TlsCertificateError):
        await Connector(other, 5.0, 5.0).open(fake_pool(port))  # type: ignore[arg-type]
    await task


@run
async def test_connector_origin_closes_during_handshake(tls_contexts) -> None:
    async def origin(conn: socket.socket) -> None:
        await asyncio.get_running_loop().sock_recv(conn, 65536)  # the ClientHello, read: a FIN
        conn.close()

    port, task = await serve_once(origin)
    with pytest.raises(errors.TlsProtocolError, match="closed the connection during the TLS"):
        await Connector(tls_contexts[0], 5.0, 5.0).open(fake_pool(port))  # type: ignore[arg-type]
    await task


@run
async def test_connector_handshake_timeout(tls_contexts) -> None:
    held: list[socket.socket] = []

    async def origin(conn: socket.socket) -> None:
        held.append(conn)  # accepted, never answers

    port, task = await serve_once(origin)
    loop = asyncio.get_running_loop()
    before = len(loop._selector.get_map())  # type: ignore[attr-defined]
    with pytest.raises(errors.ConnectionTimeout, match="TLS handshake"):
        await Connector(tls_contexts[0], 5.0, 0.2).open(fake_pool(port))  # type: ignore[arg-type]
    await task
    assert len(loop._selector.get_map()) <= before  # type: ignore[attr-defined]
    held[0].close()


@run
async def test_connector_resumes_the_tls_session_of_a_live_connection(tls_contexts) -> None:
    """A new connection resumes the session of one already open (proxy_ssl_session_reuse):
    no certificate chain or signature on either side."""
    cctx, sctx = tls_contexts
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(4)
    lsock.setblocking(False)
    loop = asyncio.get_running_loop()
    served: list[ssl.SSLSocket] = []

    async def origin() -> None:
        for _ in range(2):
            conn, _ = await loop.sock_accept(lsock)
            conn.setblocking(False)
            ss = sctx.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
            await _tls_handshake(loop, ss)
            served.append(ss)
    task = asyncio.ensure_future(origin())
    pool = fake_pool(lsock.getsockname()[1])
    pool.session = None
    pool.tls_session = lambda: pool.session
    connector = Connector(cctx, 5.0, 5.0)
    first, _ = await connector.open(pool)
    # TLS 1.3 tickets come after the handshake; the idle connection reads them.
    deadline = loop.time() + TIMEOUT
    while first.tls_session() is None:
        assert loop.time() < deadline, "no session ticket arrived"
        await asyncio.sleep(0.005)
    pool.session = first.tls_session()
    second, _ = await connector.open(pool)
    await asyncio.wait_for(task, TIMEOUT)
    assert second.transport.get_extra_info("ssl_object").session_reused
    assert not first.transport.get_extra_info("ssl_object").session_reused
    assert served[1].session_reused
    for conn in (first, second):
        conn.transport.abort()
    for ss in served:
        ss.close()
    lsock.close()


def test_tunnel_half_close_on_a_target_that_reset_aborts_quietly():
    """A client's half-close passed on to a target that reset at the same moment: asyncio's
    write_eof raises ENOTCONN, which surfaced as an error-level traceback from eof_received
    (found by a client-matrix sweep, 5 of 300 tunnels). The tunnel is aborted instead."""
    import errno

    from proxyd.tunnel import _half_close

    class Target:
        aborted = False

        def can_write_eof(self) -> bool:
            return True

        def write_eof(self) -> None:
            raise OSError(errno.ENOTCONN, "Transport endpoint is not connected")

        def abort(self) -> None:
            self.aborted = True

    t = Target()
    _half_close(t)  # type: ignore[arg-type]
    assert t.aborted
