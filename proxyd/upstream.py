"""One upstream connection: its protocol, state, freshness, and connect-error mapping.

An idle connection keeps reading (its transport always reads unless paused), so EOF or stray
bytes from the origin drop it at once instead of failing the next request. TLS 1.3 session
tickets are consumed by the SSL object and never surface as data, so they do not count as
stray. Connections run on :class:`~proxyd.transport.SocketTransport` over an ``SSLSocket``
whose handshake :class:`Connector` drives itself, not on asyncio's SSL transport.
"""

from __future__ import annotations

import asyncio
import errno
import re
import socket
import ssl
import time
from typing import TYPE_CHECKING, ClassVar, Protocol

from . import errors
from .config import load_client_cert
from .policy import DestinationPolicy
from .resolver import Resolver
from .http1 import (CLOSED, NEED_DATA, PAUSED, Constant, EndOfMessage, ParseError,
                    ResponseHead, ResponseParser)
from .transport import SocketTransport

if TYPE_CHECKING:
    from .pool import Pool

_KEEP_ALIVE_TIMEOUT = re.compile(rb"(?:^|[,;\s])timeout\s*=\s*([0-9]+)", re.I)
_KEEP_ALIVE_MAX = re.compile(rb"(?:^|[,;\s])max\s*=\s*([0-9]+)", re.I)


class ConnState(Constant):
    """Where a connection is in its life."""

    __slots__ = ()
    IDLE: ClassVar[ConnState]
    BUSY: ClassVar[ConnState]
    CLOSED: ClassVar[ConnState]


ConnState.IDLE = ConnState("idle")
ConnState.BUSY = ConnState("busy")
ConnState.CLOSED = ConnState("closed")


class Exchange(Protocol):
    """What an upstream connection reports to the request using it."""

    def on_response_head(self, head: ResponseHead) -> None: ...
    def on_whole_response(self, head: ResponseHead, body: bytes) -> None: ...
    def on_response_data(self, data: bytes) -> None: ...
    def on_response_end(self, trailers: list[tuple[bytes, bytes]]) -> None: ...
    def on_upstream_error(self, exc: errors.ProxyError, retryable: bool) -> None: ...
    def pause_request_body(self) -> None: ...
    def cork(self) -> None: ...
    def uncork(self) -> None: ...
    def resume_request_body(self) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    """An HTTP/1.1 connection to one origin, owned by a :class:`Pool`."""

    __slots__ = ("pool", "transport", "parser", "state", "exchange", "created", "idle_since",
                 "requests", "ttl", "max_requests", "close_reason", "writing_paused",
                 "reading_paused", "from_idle", "private")

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = ResponseParser(pool.parser_limits)
        self.state = ConnState.IDLE
        self.exchange: Exchange | None = None
        self.created = time.monotonic()
        self.private = False  # authenticated as one client: never handed to another
        self.idle_since = self.created
        self.requests = 0
        self.ttl = pool.settings.idle_ttl
        self.max_requests = pool.settings.max_requests
        self.close_reason = ""
        self.writing_paused = False
        self.reading_paused = False
        self.from_idle = False  # the current request took this connection from the idle list

    def __repr__(self) -> str:
        return f"<UpstreamConnection {self.pool.key} {self.state.value} requests={self.requests}>"

    # -- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            # Bytes on an idle connection: the origin broke framing or is about to close.
            self.close("unexpected_data")
            return
        parser = self.parser
        parser.feed(data)
        try:
            whole = parser.whole_response()
        except ParseError as exc:
            self._fail(exchange, exc)
            return
        if whole is None:
            self._deliver(exchange)
            return
        head, body = whole
        ka = head.keep_alive_field if head.plain else head.get(b"keep-alive")
        if ka is not None:
            self._note_keep_alive(ka)
        if body is not None:
            exchange.on_whole_response(head, body)
            return
        exchange.cork()
        try:
            exchange.on_response_head(head)
            self._deliver_events(exchange)
        finally:
            exchange.uncork()

    def eof_received(self) -> bool:
        exchange = self.exchange
        if exchange is None:
            self.close("origin_closed")
            return False
        if self.parser.close_delimited and not self._clean_close():
            # RFC 9112 §9.8: over TLS a close-delimited body is complete only with a
            # close_notify; a bare TCP close may be a truncation (attack or crash).
            self._fail(exchange, errors.ResponseIncomplete(
                "origin closed the connection without TLS close_notify; body may be truncated"))
            return False
        self.parser.feed(b"")
        self._deliver(exchange)
        return False

    def _clean_close(self) -> bool:
        """True unless TLS ended without close_notify."""
        if not self.pool.key.tls or self.transport is None:
            return True
        # SocketTransport tells a close_notify from a bare TCP FIN as it reads the EOF.
        clean = getattr(self.transport, "tls_clean_eof", None)
        if clean is not None:
            return clean
        sslobj = self.transport.get_extra_info("ssl_object")
        if sslobj is None:
            return True
        try:
            # Fallback for transports without the attribute (asyncio's SSL transport reports
            # both as EOF): after close_notify the SSL object reads b""; after a bare TCP FIN
            # it still wants data (asyncio never signals EOF to the BIO).
            return sslobj.read(1) == b""
        except ssl.SSLError:
            return False

    def connection_lost(self, exc: Exception | None) -> None:
        exchange = self.exchange
        self.exchange = None
        if self.state is not ConnState.CLOSED:
            self.state = ConnState.CLOSED
            self.pool.on_closed(self, self.close_reason or ("error" if exc else "origin_closed"))
        if exchange is not None:
            err = errors.ResponseIncomplete("origin closed the connection before the response was complete")
            exchange.on_upstream_error(err, self._retryable())

    def pause_writing(self) -> None:
        self.writing_paused = True
        if self.exchange is not None:
            self.exchange.pause_request_body()

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.exchange is not None:
            self.exchange.resume_request_body()

    # -- response events ----------------------------------------------------------------------
    def _deliver(self, exchange: Exchange) -> None:
        exchange.cork()
        try:
            self._deliver_events(exchange)
        finally:
            exchange.uncork()

    def _deliver_events(self, exchange: Exchange) -> None:
        parser = self.parser
        while self.exchange is exchange:
            try:
                event = parser.next_event()
            except ParseError as exc:
                self._fail(exchange, exc)
                return
            if event is NEED_DATA or event is PAUSED:
                return
            if type(event) is bytes:
                exchange.on_response_data(event)
            elif type(event) is ResponseHead:
                if event.status >= 200:
                    ka = event.get(b"keep-alive")
                    if ka is not None:
                        self._note_keep_alive(ka)
                exchange.on_response_head(event)
            elif type(event) is EndOfMessage:
                exchange.on_response_end(event.trailers)
            elif event is CLOSED:
                self._fail(exchange, errors.ResponseIncomplete(
                    "origin closed the connection without a response"))
                return

    def _fail(self, exchange: Exchange, exc: errors.ProxyError) -> None:
        if isinstance(exc, ParseError) and not isinstance(exc, errors.UpstreamError):
            kind = errors.ResponseIncomplete if "closed" in exc.reason else errors.UpstreamError
            exc = kind(f"invalid response from origin: {exc.reason}")
        retryable = self._retryable()
        self.exchange = None
        self.close("error")
        exchange.on_upstream_error(exc, retryable)

    def _retryable(self) -> bool:
        """A request may be retried if it ran on a connection that had sat idle (the origin
        may have closed it meanwhile) and no byte of a response arrived."""
        return self.from_idle and not self.parser.seen_bytes

    def _note_keep_alive(self, ka: bytes) -> None:
        # Honour the origin's Keep-Alive parameters (RFC 2068 §19.7.1.1, still widely sent):
        # close before the origin's idle timeout, and not beyond its request budget.
        m = _KEEP_ALIVE_TIMEOUT.search(ka)
        if m:
            origin_timeout = int(m.group(1))
            self.ttl = min(self.ttl, max(0.5, origin_timeout - 1.0))
        m = _KEEP_ALIVE_MAX.search(ka)
        if m:
            self.max_requests = min(self.max_requests, self.requests + int(m.group(1)))

    # -- use by the pool and the exchange -----------------------------------------------------
    def start(self, exchange: Exchange, method: bytes, from_idle: bool) -> None:
        """Attach a request; its response will be reported to ``exchange``."""
        self.exchange = exchange
        self.from_idle = from_idle
        self.state = ConnState.BUSY
        self.requests += 1
        self.parser.expect(method)

    def write(self, data: bytes) -> None:
        """Send request bytes."""
        self.transport.write(data)  # type: ignore[union-attr]

    def writelines(self, parts: list[bytes]) -> None:
        """Send several pieces of request bytes."""
        self.transport.writelines(parts)  # type: ignore[union-attr]

    def finish(self) -> bool:
        """Detach the exchange after a complete response; True if reusable.

        Reusable only when both messages reached their end cleanly and nothing unread is
        buffered (HAProxy's rule): anything else could hand one client's bytes to another.
        """
        self.exchange = None
        return self.parser.clean_end()

    def peer_closing(self) -> bool:
        """True when the origin sent something since the last response (on an idle
        connection, its close): a request written now would be lost."""
        waiting = getattr(self.transport, "input_waiting", None)  # a SocketTransport's
        return self.transport is None or (waiting is not None and waiting())

    def expired(self, now: float) -> str:
        """The reason this connection must not be reused now, or ""."""
        if self.requests >= self.max_requests:
            return "max_requests"
        if now - self.created >= self.pool.settings.lifetime:
            return "lifetime"
        if self.state is ConnState.IDLE and now - self.idle_since >= self.ttl:
            return "idle_ttl"
        return ""

    def tls_session(self) -> ssl.SSLSession | None:
        """The TLS session of this connection, if it holds a ticket to resume with."""
        transport = self.transport
        sock = transport.get_extra_info("ssl_object") if transport is not None else None
        if not isinstance(sock, ssl.SSLSocket):
            return None
        session = sock.session
        return session if session is not None and session.has_ticket else None

    def pause_reading(self) -> None:
        """Stop reading the response (the client is slow)."""
        if self.transport is not None and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        """Read the response again."""
        if self.transport is not None and self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()

    def close(self, reason: str) -> None:
        """Close the connection and tell the pool why."""
        if self.state is ConnState.CLOSED:
            return
        self.close_reason = reason
        self.exchange = None
        self.state = ConnState.CLOSED
        self.pool.on_closed(self, reason)
        if self.transport is not None:
            self.transport.abort() if reason == "error" else self.transport.close()


# Errors of this host's own limits (descriptors, buffers, memory), not of the origin.
_LOCAL_LIMITS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def map_connect_error(exc: BaseException, host: str, port: int, stage: str) -> errors.ProxyError:
    """Turn a socket/TLS exception into an error with the right RFC 9209 type."""
    where = f"{host}:{port}"
    if isinstance(exc, errors.ProxyError):
        return exc
    if isinstance(exc, socket.gaierror):
        return errors.DnsError(f"DNS lookup for {host} failed: {exc.strerror}",
                               details=str(exc.strerror))
    if isinstance(exc, ssl.SSLCertVerificationError):
        return errors.TlsCertificateError(
            f"certificate of {where} not trusted: {exc.verify_message}",
            details=str(exc.verify_message))
    if isinstance(exc, ssl.SSLError):
        return errors.TlsProtocolError(f"TLS handshake with {where} failed: {exc.reason}",
                                       details=str(exc.reason))
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return errors.ConnectionTimeout(f"{stage} to {where} timed out")
    if isinstance(exc, ConnectionRefusedError):
        return errors.ConnectionRefused(f"connection to {where} refused")
    if isinstance(exc, ConnectionError) and stage == "TLS handshake":
        return errors.TlsProtocolError(f"{where} closed the connection during the TLS handshake")
    if isinstance(exc, OSError) and exc.errno in _LOCAL_LIMITS:
        return errors.ProxyResourceError(
            f"cannot open a connection to {where}: {exc.strerror} (a limit of this proxy, "
            f"not the origin's fault)")
    if isinstance(exc, OSError):
        return errors.UpstreamError(f"cannot connect to {where}: {exc.strerror or exc}",
                                    error_type="destination_unavailable")
    return errors.UpstreamError(f"cannot connect to {where}: {exc!r}",
                                error_type="proxy_internal_error")


def make_ssl_context(verify: bool, ca_file: str, min_version: str, cert_file: str = "",
                     key_file: str = "") -> ssl.SSLContext:
    """One client context per trust configuration: verification, hostname check, TLS 1.2+;
    with ``cert_file``, the client certificate presented to origins that ask for one."""
    ctx = ssl.create_default_context(cafile=ca_file or None)
    if cert_file:
        load_client_cert(ctx, cert_file, key_file)
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


class Connector:
    """Opens upstream connections: DNS, TCP connect, TLS handshake, each with its timeout."""

    def __init__(self, ssl_context: ssl.SSLContext, connect_timeout: float,
                 handshake_timeout: float, policy: DestinationPolicy | None = None) -> None:
        self.policy = policy or DestinationPolicy(())
        self.ssl_context = ssl_context
        self.connect_timeout = connect_timeout
        self.handshake_timeout = handshake_timeout
        self.resolver = Resolver()

    async def open(self, pool: Pool) -> tuple[UpstreamConnection, float]:
        """Open a connection for ``pool``; returns it and the handshake time in seconds."""
        key = pool.key
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                sock = await self.connect_tcp(loop, key.host, key.port)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise map_connect_error(exc, key.host, key.port, "connect") from None
        started = time.monotonic()
        try:
            # Without it a request head and body written apart wait for a delayed ACK.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if key.tls:
                # The socket object is detached by wrap_socket: from here on close the
                # SSLSocket, which owns the descriptor.
                sock = (pool.ssl_context or self.ssl_context).wrap_socket(
                    sock, server_hostname=pool.server_hostname, do_handshake_on_connect=False,
                    suppress_ragged_eofs=False, session=pool.tls_session())
                async with asyncio.timeout(self.handshake_timeout):
                    await _tls_handshake(loop, sock)  # type: ignore[arg-type]
        except BaseException as exc:
            sock.close()
            if isinstance(exc, asyncio.CancelledError):
                raise
            stage = "TLS handshake" if key.tls else "connect"
            raise map_connect_error(exc, key.host, key.port, stage) from None
        conn = UpstreamConnection(pool)
        SocketTransport(loop, sock, conn).start()
        return conn, time.monotonic() - started

    async def connect_tcp(self, loop: asyncio.AbstractEventLoop, host: str,
                          port: int) -> socket.socket:
        """Resolve, check each address against the policy, connect to the first that works."""
        infos = await self.resolver.resolve(loop, host, port)
        last: BaseException = OSError(f"no addresses for {host}")
        for family, type_, proto, _, addr in infos:
            try:
                self.policy.check(host, addr[0], addr[1])
            except errors.DestinationProhibited as exc:
                last = exc
                continue
            sock = socket.socket(family, type_, proto)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, addr)
                return sock
            except BaseException as exc:
                sock.close()
                if not isinstance(exc, OSError):
                    raise
                last = exc
        raise last


async def _tls_handshake(loop: asyncio.AbstractEventLoop, sock: ssl.SSLSocket) -> None:
    """Run the TLS handshake of a non-blocking SSLSocket on the loop (no sslproto layer)."""
    fd = sock.fileno()
    while True:
        try:
            sock.do_handshake()
            return
        except ssl.SSLWantReadError:
            readable = True
        except ssl.SSLWantWriteError:
            readable = False
        except ssl.SSLEOFError:
            # The origin closed the TCP connection mid-handshake: report it as a close, as
            # asyncio did, rather than as a protocol violation.
            raise ConnectionResetError("connection closed during the TLS handshake") from None
        await _wait_ready(loop, fd, readable)


async def _wait_ready(loop: asyncio.AbstractEventLoop, fd: int, readable: bool) -> None:
    """Wait until ``fd`` is readable (or writable); the callback is always removed."""
    waiter = loop.create_future()
    if readable:
        loop.add_reader(fd, _wake, waiter)
    else:
        loop.add_writer(fd, _wake, waiter)
    try:
        await waiter
    finally:
        if readable:
            loop.remove_reader(fd)
        else:
            loop.remove_writer(fd)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
