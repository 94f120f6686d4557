"""One client connection: parse requests, route them, stream both ways, answer errors.

An exchange is one request and its response. The client connection owns at most one
upstream connection at a time; requests pipelined behind it wait in the parser's buffer
(bounded: reading pauses past ``limits.body_buffer``) and are answered in order.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from http import HTTPStatus
from typing import TYPE_CHECKING, ClassVar

from . import errors, logs
from .headers import (MAX_FORWARDS_METHODS, client_response_head, decrement_max_forwards,
                      error_response, filter_trailers, final_recipient_response, has_loop,
                      informational_head, max_forwards, upstream_request_head)
from .http1 import (CLOSED, NEED_DATA, PAUSED, Constant, EndOfMessage, Framing,
                    IncompleteMessage, ParseError, RequestHead, RequestParser, ResponseHead,
                    authenticates_connection, chunk_frame, field_values, last_chunk,
                    lower_names)
from .router import redact_userinfo, valid_host_field
from .tunnel import Tunnel
from .upstream import UpstreamConnection

if TYPE_CHECKING:
    from .pool import Pool
    from .router import Route
    from .worker import Worker

# Why an exchange with the origin failed (the client gets it in the error body; operators
# in the log, as nginx's error log says "upstream sent invalid chunked response").
_origin_failures = logs.RateLimited(logging.getLogger("proxyd.client"))

# RFC 9110 §9.2.2: methods whose repetition has the same effect, hence safe to retry.
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
_RETAIN_LIMIT = 65536  # request bytes kept for a retry; larger bodies are not retried

# Reasons for which reading from the client is paused (a bit set).
_PAUSE_UPSTREAM_FULL = 1
_PAUSE_BUFFER_FULL = 2
_PAUSE_CLIENT_SLOW = 4  # answers are not being read: no next request until they are
# Private upstream connections (NTLM, Negotiate) one client connection may hold, one per
# origin: a browser behind a proxy mixes hosts on one connection (HAProxy keeps 5).
_MAX_PRIVATE = 4


class ClientState(Constant):
    """Where the connection is in its request cycle."""

    __slots__ = ()
    HEAD: ClassVar[ClientState]      # waiting for a request head
    WAITING: ClassVar[ClientState]   # head routed, waiting for an upstream connection
    ACTIVE: ClassVar[ClientState]    # exchange in progress
    TUNNEL: ClassVar[ClientState]    # CONNECT tunnel
    CLOSED: ClassVar[ClientState]


ClientState.HEAD = ClientState("head")
ClientState.WAITING = ClientState("waiting")
ClientState.ACTIVE = ClientState("active")
ClientState.TUNNEL = ClientState("tunnel")
ClientState.CLOSED = ClientState("closed")


class ClientConnection(asyncio.Protocol):
    """Serves the requests of one client connection."""

    # Slots: a worker holds up to limits.client_connections of these; without a __dict__
    # an idle connection costs well under 4 KiB all told.
    __slots__ = (
        "worker", "transport", "parser", "state", "deadline", "head_started", "exchanges",
        "opened", "peer", "paused", "writing_paused", "_in_loop", "_out", "_corked", "_held_head",
        "tunnel",
        "req", "route", "pool", "upstream", "resp", "out_framing", "req_done", "resp_started",
        "keep_alive", "pending", "pending_size", "body_read", "retained", "retained_size",
        "retried", "reused", "started", "t_conn", "t_head", "bytes_in", "bytes_out", "logged",
        "fresh", "private")

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.transport: asyncio.Transport | None = None
        self.parser = RequestParser(worker.parser_limits)
        self.state = ClientState.HEAD
        self.deadline = time.monotonic() + worker.timeouts.client_head
        self.head_started = False  # bytes of the next head have arrived
        self.exchanges = 0  # requests begun on this connection
        self.opened = time.monotonic()
        self.peer = ""
        self.paused = 0
        self.writing_paused = False
        self._in_loop = False
        self._out: list[bytes] = []
        self._corked = False
        self.tunnel: Tunnel | None = None
        self.fresh = False  # counted in worker.fresh_clients (no request begun yet)
        # Upstream connections authenticated as this client (NTLM, Negotiate), one per origin:
        # each serves this client's next request to its origin and nobody else's, and closes
        # with this connection.
        self.private: dict[Pool, UpstreamConnection] | None = None
        self._reset_exchange()

    def _reset_exchange(self) -> None:
        self.req: RequestHead | None = None
        self.route: Route | None = None
        self.pool: Pool | None = None
        self.upstream: UpstreamConnection | None = None
        self.resp: ResponseHead | None = None
        self.out_framing = Framing.NONE
        self.req_done = False
        self.resp_started = False
        self._held_head = -1  # where in _out the final head sits while corked, else -1
        self.keep_alive = True
        self.pending: list[bytes | EndOfMessage] = []  # validated body events not yet sent
        self.pending_size = 0
        self.body_read = False  # the request's EndOfMessage was parsed
        self.retained: list[bytes] | None = None
        self.retained_size = 0
        self.retried = False
        self.reused = False
        self.started = 0.0
        self.t_conn = 0.0  # upstream connection obtained
        self.t_head = 0.0  # response head received
        self.bytes_in = 0  # request body bytes
        self.bytes_out = 0  # response body bytes
        self.logged = False

    def __repr__(self) -> str:
        return f"<ClientConnection {self.peer} {self.state.value}>"

    # -- asyncio.Protocol: client side --------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        # TCP_NODELAY is set by Worker._accept on every accepted socket.
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        if peer and not self.worker.access.client_allowed(peer[0]):
            self.state = ClientState.CLOSED  # not an allowed client network: say nothing
            transport.abort()
            return
        self.worker.clients.add(self)
        self.worker.stats.client_connections += 1
        self.fresh = True
        self.worker.fresh_clients += 1

    def data_received(self, data: bytes) -> None:
        self.worker.stats.bytes_from_clients += len(data)
        state = self.state
        if (state is ClientState.HEAD and not self._in_loop and type(data) is bytes
                and not self.writing_paused):
            req = self.parser.take_plain(data)
            if req is not None:
                # The common case in one step; pipelined bytes after it stay buffered and
                # are parsed when this exchange ends (_finish).
                self._begin(req)
                return
        if state is ClientState.TUNNEL:
            self.tunnel.from_client(data)  # type: ignore[union-attr]
            return
        self.parser.feed(data)
        if state is ClientState.HEAD:
            if not self.head_started:
                self.head_started = True
                self.deadline = time.monotonic() + self.worker.timeouts.client_head
            self._process()
        elif state is ClientState.ACTIVE and not self.req_done:
            self._pump_request()
        elif state is ClientState.WAITING:
            self._read_body()
        elif self.parser.buffered > self.worker.limits.body_buffer:
            self._pause(_PAUSE_BUFFER_FULL)

    def eof_received(self) -> bool:
        if self.state is ClientState.TUNNEL:
            return self.tunnel.client_eof()  # type: ignore[union-attr]
        self.parser.feed(b"")
        if self.state is ClientState.HEAD:
            self._process()
            return False
        if self.state is ClientState.ACTIVE and not self.req_done:
            self._pump_request()
        elif self.state is ClientState.WAITING:
            self._read_body()
        # Half-closed after a complete request: answer it, then close (RFC 9112 §9.6).
        self.keep_alive = False
        return self.state is not ClientState.CLOSED

    def connection_lost(self, exc: Exception | None) -> None:
        state = self.state
        self.state = ClientState.CLOSED
        self.worker.clients.discard(self)
        if self.fresh:
            self._not_fresh()
            self.worker.warm_capacity_changed()
        self.worker.client_closed()
        if state is ClientState.WAITING and self.pool is not None:
            self.pool.cancel(self)
        if self.tunnel is not None:
            self.tunnel.close()
        upstream = self.upstream
        if upstream is not None:
            # The exchange did not finish: its connection holds a partial message.
            self.upstream = None
            upstream.close("client_aborted")
        if self.private:
            for conn in self.private.values():
                conn.close("private_client_closed")
            self.private = None
        if self.tunnel is not None and self.t_conn:
            # A tunnel that was established ends when either side closes it: its 200, with
            # the bytes each way (as Squid logs CONNECT).
            self._log(200, self.tunnel.error)
        elif self.req is not None and state is not ClientState.HEAD:
            self._log(self._status_so_far(), "client_aborted")

    def pause_writing(self) -> None:
        self.writing_paused = True
        if self.upstream is not None:
            self.upstream.pause_reading()
        elif self.tunnel is not None:
            self.tunnel.pause_upstream()

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.upstream is not None:
            self.upstream.resume_reading()
        elif self.tunnel is not None:
            self.tunnel.resume_upstream()
        if self.paused & _PAUSE_CLIENT_SLOW:
            self._resume(_PAUSE_CLIENT_SLOW)
            if self.state is ClientState.HEAD:
                self._process()  # the pipelined requests held back

    def _pause(self, reason: int) -> None:
        if not self.paused and self.transport is not None:
            self.transport.pause_reading()
        self.paused |= reason

    def _resume(self, reason: int) -> None:
        if self.paused & reason:
            self.paused &= ~reason
            if not self.paused and self.transport is not None and self.state is not ClientState.CLOSED:
                self.transport.resume_reading()

    # -- request heads ------------------------------------------------------------------------
    def _process(self) -> None:
        """Start every complete request head buffered, one exchange at a time."""
        if self._in_loop:
            return
        self._in_loop = True
        try:
            while self.state is ClientState.HEAD:
                if self.writing_paused:
                    # Answers proxyd makes itself (errors, Max-Forwards 0) have no origin to
                    # slow down: a client that does not read them must not make the next
                    # pipelined request be read and answered into an ever larger buffer.
                    self._pause(_PAUSE_CLIENT_SLOW)
                    return
                try:
                    event = self.parser.next_event()
                except ParseError as exc:
                    self._reject(exc)
                    return
                if event is NEED_DATA:
                    return
                if event is CLOSED:
                    self._close()
                    return
                self._begin(event)  # type: ignore[arg-type]
        finally:
            self._in_loop = False

    def _reject(self, exc: ParseError) -> None:
        """Answer an unparseable request and close: the stream position is unknown."""
        if isinstance(exc, IncompleteMessage) or self.transport is None:
            self._close()
            return
        self.worker.stats.errors += 1
        self.keep_alive = False
        self._send_error(exc)
        self._close()

    def _not_fresh(self) -> None:
        self.fresh = False
        self.worker.fresh_clients -= 1

    def _begin(self, req: RequestHead) -> None:
        if self.fresh:
            # Its request takes the idle connection that was counted for it: the worker's
            # spare warm capacity is unchanged, so no need to tell the accept balancing.
            self._not_fresh()
        worker = self.worker
        worker.stats.requests += 1
        self.exchanges += 1
        self.req = req
        self.started = time.monotonic()
        self.head_started = False
        self.keep_alive = req.keep_alive and not worker.draining
        try:
            if not req.plain or worker.access.users:
                # A plain request has one Host and no Via, Expect or Proxy-Authorization
                # (the parser checked): only authentication is left to check.
                self._check(req)
            if req.method == b"CONNECT":
                if req.framing is Framing.CHUNKED or req.content_length:
                    # RFC 9110 §9.3.6: a CONNECT request has no content; what framing fields
                    # promise, a peer in front may read differently from the tunnel's bytes.
                    raise errors.ParseError("a CONNECT request has no content: "
                                            "Content-Length or Transfer-Encoding refused")
                host, port = worker.router.route_connect(req.target)
                host_field = req.get(b"host")
                if host_field is not None and not valid_host_field(host_field):
                    raise errors.ParseError("invalid Host header field")  # RFC 9112 §3.2
                worker.connector.policy.check_host(host)
                self.state = ClientState.TUNNEL
                self.deadline = time.monotonic() + worker.timeouts.tunnel_idle
                self.tunnel = Tunnel(self, host, port)
                self.tunnel.start(self.parser.take_buffered())
                return
            if req.target == b"*" and req.method == b"OPTIONS" and not worker.router.has_default:
                # RFC 9110 §9.3.7: "OPTIONS *" asks about the server it is sent to: here.
                self._answer_here(req, b"OPTIONS * is about proxyd itself")
                return
            route = worker.router.route(req.method, req.target)
            host = req.plain_host if req.plain else req.get(b"host")
            if host != route.host_header and host is not None and not valid_host_field(host):
                # RFC 9112 §3.2: 400 for an invalid Host, though a proxy replaces it.
                raise errors.ParseError("invalid Host header field")
            if worker.host_rules:
                worker.connector.policy.check_host(route.origin.host)
        except errors.ProxyError as exc:
            if req.method == b"CONNECT" and (exc.status != 407 or self.parser.buffered):
                # What follows a refused CONNECT's head was meant as tunnel data: never read
                # it as requests. (A 407 with nothing behind it keeps the connection for the
                # retry with credentials.)
                self.keep_alive = False
            self._fail_early(exc)
            return
        self.route = route
        if req.method in MAX_FORWARDS_METHODS and self._hop_limit_reached(req):
            return
        self.pool = worker.pool_for(route)
        self.state = ClientState.WAITING
        if not req.plain and b"expect" in req.connection_tokens:
            self._continue_here(req)
        # Parse what is buffered of the body first: a malformed body that already arrived
        # is refused before any byte of the request goes upstream.
        if req.plain:
            self.parser.skip_empty_body()  # a plain request has no body
            self.body_read = True
        elif not self._read_body():
            return
        self.deadline = math.inf  # the pool enforces pool_wait
        if self.private and self._take_private():
            return
        self.pool.acquire(self)

    def _continue_here(self, req: RequestHead) -> None:
        """Connection: Expect makes the expectation this hop's alone (RFC 9110 §7.6.1): it
        is not forwarded, so proxyd answers it (§10.1.1) once the request is accepted, or
        the client would wait for a 100 that never comes."""
        if (req.version >= 11 and req.has_body
                and field_values(req.headers, b"expect")):  # 100-continue (_check)
            self._send(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _take_private(self) -> bool:
        """Run the request on this client's private connection to its origin, if it has one
        that is still open and fresh."""
        conn = self.private.pop(self.pool, None)  # type: ignore[union-attr, arg-type]
        if conn is None or not self.pool.take_back(conn):  # type: ignore[union-attr]
            return False
        self.on_connection(conn, reused=True)
        return True

    def _keep_private(self, conn: UpstreamConnection) -> None:
        """Keep ``conn`` for this client's next request to its origin (at most _MAX_PRIVATE
        origins: the oldest goes first)."""
        conn.private = True  # never pooled again
        private = self.private
        if private is None:
            private = self.private = {}
        elif len(private) >= _MAX_PRIVATE:
            oldest = next(iter(private))
            private.pop(oldest).close("private_limit")
        private[self.pool] = conn  # type: ignore[index]
        self.pool.set_aside(conn)  # type: ignore[union-attr]

    def _check(self, req: RequestHead) -> None:
        """Request-level rules that need no routing decision."""
        access = self.worker.access
        lnames = lower_names(req)
        hosts = lnames.count(b"host")
        if hosts > 1 or (hosts == 0 and req.version >= 11):
            # RFC 9112 §3.2: exactly one Host in HTTP/1.1.
            raise errors.ParseError("request needs exactly one Host header field")
        if lnames.count(b"proxy-authorization") > 1:
            # RFC 9110 §11.7.2: one set of credentials; two lines are not a list to pick from.
            raise errors.ParseError("more than one Proxy-Authorization header field")
        if access.users:
            access.authenticate(req.get(b"proxy-authorization"))  # 407 unless valid
        if b"via" in lnames and has_loop(req.headers, self.worker.cfg.via):
            raise errors.ProxyError("request loop detected: Via already names this proxy",
                                    status=508, error_type="proxy_loop_detected")
        if b"expect" in lnames:
            # One field or several lines mean the same list (RFC 9110 §5.3); empty elements
            # are ignored (§5.6.1.2), so an empty field expects nothing.
            expect = field_values(req.headers, b"expect")
            if any(e.lower() != b"100-continue" for e in expect):
                raise errors.ProxyError("unsupported expectation", status=417,
                                        error_type="http_request_error")

    def _hop_limit_reached(self, req: RequestHead) -> bool:
        """RFC 9110 §7.6.2: a TRACE or OPTIONS with Max-Forwards 0 is answered here (True);
        with a larger value it goes on with the value one less."""
        hops = max_forwards(req)
        if hops is None:
            return False
        if hops:
            decrement_max_forwards(req, hops)
            return False
        self._answer_here(req)
        return True

    def _answer_here(self, req: RequestHead, *why: bytes) -> None:
        """Answer a TRACE or OPTIONS of which proxyd is the final recipient."""
        self._end_early()
        self._log(200, "")
        self._send(final_recipient_response(req, self.keep_alive, *why))
        self._finish_or_close()

    def _fail_early(self, exc: errors.ProxyError) -> None:
        """An error before anything went upstream; the request body (if any) is unread."""
        self._end_early()
        self.worker.stats.errors += 1
        self._send_error(exc)
        self._finish_or_close()

    def _end_early(self) -> None:
        """The request is answered before anything of it went upstream: take the end of a
        body-less one; with a body unread, the connection cannot be kept."""
        req = self.req
        if req is not None and req.has_body:
            self.keep_alive = False  # cannot find the next request without reading the body
        elif req is not None:
            self.parser.next_event()  # the EndOfMessage of a body-less request

    def _finish_or_close(self) -> None:
        """After an answer proxyd wrote itself: read the next request, or close."""
        if self.keep_alive:
            self._finish()
        else:
            self._close()

    # -- pool callbacks -----------------------------------------------------------------------
    def on_connection(self, conn: UpstreamConnection, reused: bool) -> None:
        """The pool hands over a connection for the current request."""
        if self.state is not ClientState.WAITING:
            self.pool.release(conn, reusable=True)  # type: ignore[union-attr]
            return
        req = self.req
        route = self.route
        assert req is not None and route is not None
        if reused and req.method not in IDEMPOTENT and conn.peer_closing():
            # RFC 9112 §9.3.1: a request that is not retried must not go into a connection
            # the origin has already closed — its FIN can sit unread when the connection
            # comes straight from the response that preceded it (a queued waiter, a
            # pipelined request). One peek, for non-idempotent requests only.
            conn.close("origin_closed")
            self.pool.acquire(self, fresh=True)  # type: ignore[union-attr]
            return
        self.t_conn = time.monotonic()
        self.upstream = conn
        self.state = ClientState.ACTIVE
        if self.retained is not None and self.retried:
            conn.writelines(self.retained)
            self._request_sent()
        else:
            head = upstream_request_head(req, route.target, route.host_header,
                                         self.worker.via(req.version))
            if self.body_read and not self.pending:
                # The whole request is this head (no body): one write, nothing to frame.
                # It goes first: the bookkeeping after it is not needed for the write and
                # runs while the origin works on the request.
                conn.write(head)
                if req.method in IDEMPOTENT:
                    self.retained = [head]
                    self.retained_size = len(head)
                self.req_done = True
                self._request_sent()
            else:
                self.deadline = self.t_conn + self.worker.timeouts.body_idle
                if req.method in IDEMPOTENT:
                    self.retained = []
                self._send_pending([head])
        # The response cannot arrive before this returns to the loop: the connection takes
        # the exchange after the write (a pause_writing during it shows in writing_paused).
        conn.start(self, req.method, reused)
        self.reused = reused
        stats = self.worker.stats
        ostats = self.pool.ostats  # type: ignore[union-attr]
        if reused:
            stats.warm_hits += 1
            ostats.hits += 1
        else:
            stats.pool_misses += 1
            ostats.misses += 1
        if self.writing_paused:
            conn.pause_reading()
        if conn.writing_paused:
            self._pause(_PAUSE_UPSTREAM_FULL)
        if self.paused:
            self._resume(_PAUSE_BUFFER_FULL)

    def on_pool_error(self, exc: errors.ProxyError) -> None:
        """No connection could be had."""
        if self.state is ClientState.WAITING:
            self._fail(exc)

    # -- request body -------------------------------------------------------------------------
    def _pump_request(self) -> None:
        """Body bytes arrived while the exchange is active: validate, then forward."""
        if self._read_body():
            self._send_pending([])
            if not self.req_done:
                self.deadline = time.monotonic() + self.worker.timeouts.body_idle

    def _read_body(self) -> bool:
        """Move buffered body events from the parser to ``pending``; False after an error.

        Only parsed (validated) bytes are ever forwarded, so bad framing that has arrived
        before the upstream connection is ready never reaches the origin. While waiting,
        ``pending`` is bounded by pausing the client at ``limits.body_buffer``.
        """
        parser = self.parser
        if not self.body_read and parser.skip_empty_body():
            self.body_read = True  # no body: nothing to frame or forward (not chunked)
            return True
        while not self.body_read:
            try:
                event = parser.next_event()
            except ParseError as exc:
                self._request_body_failed(exc)
                return False
            if event is NEED_DATA or event is PAUSED:
                break
            self.pending.append(event)  # type: ignore[arg-type]
            if type(event) is bytes:
                self.bytes_in += len(event)
                self.pending_size += len(event)
            else:
                self.body_read = True
        if self.upstream is None and self.pending_size > self.worker.limits.body_buffer:
            self._pause(_PAUSE_BUFFER_FULL)
        return True

    def _send_pending(self, parts: list[bytes]) -> None:
        """Write ``parts`` and the pending body events upstream, framed, in one call."""
        upstream = self.upstream
        assert upstream is not None and self.req is not None
        chunked = self.req.framing is Framing.CHUNKED
        for event in self.pending:
            if type(event) is bytes:
                parts.extend(chunk_frame(event) if chunked else (event,))
            elif chunked:
                parts.append(last_chunk(filter_trailers(
                    event.trailers, self.req.connection_tokens)))  # type: ignore[union-attr]
        done = self.body_read
        self.pending = []
        self.pending_size = 0
        if parts:
            upstream.writelines(parts)
            self._retain(parts)
        if done and not self.req_done:
            self.req_done = True
            self._request_sent()

    def _request_sent(self) -> None:
        if self.resp is None:
            self.deadline = time.monotonic() + self.worker.timeouts.response_head
        if self.parser.buffered > self.worker.limits.body_buffer:
            self._pause(_PAUSE_BUFFER_FULL)

    def _retain(self, parts: list[bytes]) -> None:
        if self.retained is None:
            return
        self.retained_size += len(parts[0]) if len(parts) == 1 else sum(map(len, parts))
        if self.retained_size > _RETAIN_LIMIT:
            self.retained = None
        else:
            self.retained.extend(parts)

    def _request_body_failed(self, exc: ParseError) -> None:
        """The client sent a bad or truncated body: the upstream message is now unusable."""
        upstream = self.upstream
        self.upstream = None
        if upstream is not None:
            upstream.close("client_aborted")
        elif self.state is ClientState.WAITING and self.pool is not None:
            self.pool.cancel(self)
        if isinstance(exc, IncompleteMessage) or self.resp_started:
            self._close()
            return
        self.keep_alive = False
        self.worker.stats.errors += 1
        self._send_error(exc)
        self._close()

    def pause_request_body(self) -> None:
        """The origin is slow to read: stop reading the client."""
        self._pause(_PAUSE_UPSTREAM_FULL)

    def resume_request_body(self) -> None:
        """The origin caught up."""
        self._resume(_PAUSE_UPSTREAM_FULL)

    # -- response -----------------------------------------------------------------------------
    def on_response_head(self, head: ResponseHead) -> None:
        """A response head (final or 1xx) arrived from the origin."""
        req = self.req
        assert req is not None
        if head.status < 200:
            if head.status == 101:
                self._upstream_protocol_error("origin switched protocols without being asked")
            elif req.version >= 11:
                # RFC 9110 §15.2: forward 1xx (100 Continue, 103 Early Hints) to 1.1 clients.
                self._send(informational_head(head, self.worker.via(head.version)))
            if self.req_done:
                # An interim response shows the origin at work (102 Processing is for that):
                # the wait for the final one starts again, as nginx's proxy_read_timeout.
                self.deadline = time.monotonic() + self.worker.timeouts.response_head
            return
        if self._corked:
            self._held_head = len(self._out)  # retractable until uncork (see _retract_head)
        self._send(self._final_head(head, req))
        self.deadline = self.t_head + self.worker.timeouts.body_idle  # the body's first bytes

    def on_whole_response(self, head: ResponseHead, body: bytes) -> None:
        """A final response that arrived whole with its body (the common small response):
        head and body go out in one write, then the exchange ends."""
        data = self._final_head(head, self.req)  # type: ignore[arg-type]
        if body:
            data += body
        if self._out:  # held informational heads go first
            self._out.append(data)
            self._flush()
        else:
            transport = self.transport
            if transport is not None and not transport.is_closing():
                transport.write(data)
        if body:  # counted after the write, which it need not delay
            n = len(body)
            self.worker.stats.bytes_to_clients += n
            self.bytes_out += n
        self.on_response_end([])

    def _final_head(self, head: ResponseHead, req: RequestHead) -> bytes:
        """Take a final response head: choose the client framing, return the head to send."""
        self.resp = head
        self.resp_started = True
        self.t_head = time.monotonic()
        framing = head.framing
        if framing is Framing.CHUNKED or framing is Framing.CLOSE:
            # HTTP/1.0 clients cannot take chunked: send raw and close (RFC 9112 §7).
            framing = Framing.CHUNKED if req.version >= 11 else Framing.CLOSE
        self.out_framing = framing
        if framing is Framing.CLOSE or not self.req_done or self.worker.draining:
            self.keep_alive = False  # say "close" now rather than close after a keep-alive
        return client_response_head(
            head, framing, self.keep_alive, req.version,
            self.worker.via(head.version))  # RFC 9110 §7.6.3: the version received

    def on_response_data(self, data: bytes) -> None:
        """A piece of response body."""
        stats = self.worker.stats
        stats.bytes_to_clients += len(data)
        self.bytes_out += len(data)
        if self.out_framing is Framing.CHUNKED:
            self._out.extend(chunk_frame(data))
            if not self._corked:
                self._flush()
        else:
            self._send(data)
        self.deadline = time.monotonic() + self.worker.timeouts.body_idle

    def on_response_end(self, trailers: list[tuple[bytes, bytes]]) -> None:
        """The response is complete."""
        self._log(self.resp.status if self.resp else 0, "")
        if self.out_framing is Framing.CHUNKED:
            tokens = self.resp.connection_tokens if self.resp is not None else frozenset()
            self._send(last_chunk(filter_trailers(trailers, tokens)))
        conn = self.upstream
        self.upstream = None
        if conn is not None:
            # RFC 9112 §9.6: no further request after the origin said "close".
            keep = self.resp is not None and self.resp.keep_alive
            reusable = conn.finish() and self.req_done and keep
            if conn.reading_paused:
                conn.resume_reading()
            req, resp = self.req, self.resp
            if reusable and resp is not None and req is not None and (
                    conn.private or ((not req.plain or resp.status == 401)
                                     and authenticates_connection(req, resp))):
                self._keep_private(conn)
            else:
                self.pool.release(conn, reusable)  # type: ignore[union-attr]
        if not self.req_done:
            # The origin answered before the request body ended (e.g. 413): the rest of the
            # body is unread, so the connection cannot carry another request.
            self._close()
            return
        self._finish()

    def on_upstream_error(self, exc: errors.ProxyError, retryable: bool) -> None:
        """The upstream connection failed during the exchange."""
        self.upstream = None
        if (retryable and not self.retried and not self.resp_started
                and self.retained is not None and self.req_done
                and self.state is ClientState.ACTIVE):
            # RFC 9110 §9.2.2: an idempotent request may be retried when the connection
            # closed before any response; the retry uses a newly opened connection.
            self.retried = True
            self.worker.stats.retries += 1
            self.state = ClientState.WAITING
            self.pool.acquire(self, fresh=True)  # type: ignore[union-attr]
            return
        self._fail(exc)

    def _upstream_protocol_error(self, reason: str) -> None:
        conn = self.upstream
        self.upstream = None
        if conn is not None:
            conn.close("error")
        self._fail(errors.UpstreamError(reason))

    # -- CONNECT tunnel -----------------------------------------------------------------------
    def tunnel_established(self) -> None:
        """The target accepted the TCP connection: say so, then bytes flow raw."""
        self.t_conn = self.t_head = time.monotonic()  # the access log's wait and ttfb
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")

    def tunnel_failed(self, exc: errors.ProxyError) -> None:
        """The tunnel target could not be reached."""
        self.tunnel = None
        self.keep_alive = False
        self.worker.stats.errors += 1
        self._send_error(exc)
        self._close()

    def tunnel_closed(self, exc: Exception | None = None) -> None:
        """The target connection is gone: flush what is buffered and close; a target that
        reset makes the client's end a reset too (a FIN would read as a clean end)."""
        if exc is not None and self.tunnel is not None:
            self.tunnel.error = "connection_terminated"
            self._reset()
        else:
            self._close()

    def pause_tunnel_reading(self) -> None:
        """The target (or the pending buffer) cannot take more client bytes now."""
        self._pause(_PAUSE_UPSTREAM_FULL)

    def resume_tunnel_reading(self) -> None:
        """The target caught up."""
        self._resume(_PAUSE_UPSTREAM_FULL)

    # -- endings ------------------------------------------------------------------------------
    def _fail(self, exc: errors.ProxyError) -> None:
        """Answer an upstream/pool failure, or cut the response if it already started."""
        self.worker.stats.errors += 1
        conn = self.upstream
        self.upstream = None
        if conn is not None:
            conn.close("error")
        if self.t_conn and isinstance(exc, errors.UpstreamError):
            # The exchange had a connection: the origin failed it (the pool logs its own
            # failures to connect).
            _origin_failures.warning(
                "origin %s failed a request: %s", self.route.origin if self.route else "?",
                exc.reason, fields={"error": exc.error_type, "client": self.peer})
        if self.resp_started and self._held_head >= 0:
            self._retract_head()
        if self.resp_started or self.state is ClientState.CLOSED:
            # Part of the response is out: closing is the only honest signal (the client
            # sees a short body or a missing last chunk, never a falsely complete one).
            self._log(self.resp.status if self.resp else 0, exc.error_type)
            if self.resp_started and self.out_framing is Framing.CLOSE:
                self._reset()  # a FIN would be this body's normal end (RFC 9112 §6.3)
            else:
                self._close()
            return
        if not self.body_read:
            self.keep_alive = False  # the rest of the body is unread: the stream is lost
        self._send_error(exc)
        self._finish_or_close()

    def _retract_head(self) -> None:
        """Take back a final head (and body bytes) still held by the cork: the origin's
        response failed in the same read as its head (an invalid first chunk, say), so the
        client can get a clean 502 instead of a 200 cut short. Interim heads held before it
        still go out."""
        del self._out[self._held_head:]
        self._held_head = -1
        self.worker.stats.bytes_to_clients -= self.bytes_out
        self.bytes_out = 0
        self.resp = None
        self.resp_started = False
        self.out_framing = Framing.NONE

    def _send_error(self, exc: errors.ProxyError) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        try:
            phrase = HTTPStatus(exc.status).phrase
        except ValueError:
            phrase = "Error"
        self._log(exc.status, exc.error_type)
        head_only = self.req is not None and self.req.method == b"HEAD"
        extra = [(b"Proxy-Authenticate", self.worker.access.challenge)] if exc.status == 407 else []
        self._send(error_response(exc.status, phrase, exc.error_type, exc.reason,
                                  self.keep_alive, exc.details, head_only, extra))

    def _log(self, status: int, error: str) -> None:
        """Record the finished exchange (once) for the metrics and the access log."""
        if self.logged:
            return
        self.logged = True
        exchanges = self.worker.exchanges
        if exchanges.enabled:
            # One tuple of plain values now; counted and formatted later in a batch
            # (proxyd/exchanges.py), when this request's objects may be out of the caches.
            req = self.req
            route = self.route
            exchanges.add((time.monotonic(), self.started, self.t_conn, self.t_head, self.peer,
                           req.method if req is not None else b"-",
                           route.target if route is not None else
                           (redact_userinfo(req.target) if req is not None else b"-"),
                           self.pool, status, self.bytes_in, self.bytes_out, self.reused,
                           self.retried, error))

    def _finish(self) -> None:
        """The exchange is over; read the next request or close."""
        if not self.keep_alive:
            self._close()
            return
        # Draining, with keep-alive promised (the head went out before the drain began): the
        # client may send its next request at once, so the connection stays for the drain's
        # grace; that request is answered with Connection: close (see Worker._drain).
        self._reset_exchange()
        self.state = ClientState.HEAD
        waiting = self.parser.next_message()
        if self.paused:
            self._resume(_PAUSE_BUFFER_FULL)
        timeouts = self.worker.timeouts
        if waiting:
            self.head_started = True
            self.deadline = time.monotonic() + timeouts.client_head
            self._process()
        else:
            self.deadline = time.monotonic() + timeouts.client_idle

    # -- output: writes made while the origin's bytes are being delivered are joined into
    # one send (head and body of a small response in one segment, not two syscalls).
    def cork(self) -> None:
        """Hold writes until :meth:`uncork`."""
        self._corked = True

    def uncork(self) -> None:
        """Send what was held."""
        self._corked = False
        if self._out:
            self._flush()

    def _send(self, data: bytes) -> None:
        self._out.append(data)
        if not self._corked:
            self._flush()

    def _flush(self) -> None:
        out, self._out = self._out, []
        self._held_head = -1  # whatever was held is sent now
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(out[0] if len(out) == 1 else b"".join(out))

    def _close(self) -> None:
        if self._out:
            self._flush()
        if self.state is not ClientState.CLOSED:
            lingering = self._peer_may_send()
            self.state = ClientState.CLOSED
            transport = self.transport
            if transport is not None:
                if lingering and hasattr(transport, "close_lingering"):
                    transport.close_lingering()
                else:
                    transport.close()

    def quiet_since(self) -> float:
        """Between requests: when this connection opened or its last exchange ended."""
        if not self.exchanges:
            return self.opened
        return self.deadline - self.worker.timeouts.client_idle  # set by _finish

    def busy(self) -> bool:
        """True while an exchange or a tunnel is in progress (not between requests)."""
        return self.tunnel is not None or (self.req is not None
                                           and self.state is not ClientState.HEAD)

    def _status_so_far(self) -> int:
        """The status the client has had: a tunnel's 200 once established, a response's
        status once its head went out, else 0 (none)."""
        if self.tunnel is not None:
            return 200 if self.t_conn else 0
        return self.resp.status if self.resp else 0

    def abort_for_shutdown(self) -> None:
        """The drain timeout passed: record the exchange in flight as cut by the shutdown
        (the access log would otherwise never see it: the worker exits first), then drop
        the connection."""
        if self.busy() and self.state is not ClientState.CLOSED:
            self._log(self._status_so_far(), "shutdown_timeout")
            self._reset()  # a cut response (close-delimited above all) must not end in FIN
        elif self.transport is not None:
            self.transport.abort()

    def _reset(self) -> None:
        """Close with a TCP RST after what is already written: the client of a body cut
        short that has no framing of its own (close-delimited, e.g. to an HTTP/1.0 client)
        then sees an error instead of a complete-looking response (as curl reports:
        "Connection reset by peer")."""
        if self._out:
            self._flush()
        self.state = ClientState.CLOSED
        transport = self.transport
        if transport is not None:
            reset = getattr(transport, "reset", None)
            reset() if reset is not None else transport.abort()

    def _peer_may_send(self) -> bool:
        """True when the client may still be sending: unparsed bytes, a request body not
        read to its end, or a partial head (closing then could reset our answer away)."""
        state = self.state
        if self.parser.buffered:
            return True
        if state is ClientState.HEAD:
            return self.head_started
        return state is not ClientState.TUNNEL and self.req is not None and not self.body_read

    def check_deadline(self, now: float) -> None:
        """Called periodically: enforce the timeout of the current state."""
        if now < self.deadline:
            return
        state = self.state
        if state is ClientState.HEAD:
            if self.head_started:
                self.keep_alive = False
                self._send_error(errors.ProxyError("request head not received in time",
                                                   status=408, error_type="http_request_error"))
            self._close()
        elif state is ClientState.ACTIVE:
            if self.req_done and not self.resp_started:
                self._fail(errors.ResponseTimeout(
                    f"origin sent no response within {self.worker.timeouts.response_head:g} s"))
            elif not self.resp_started and self.paused & _PAUSE_UPSTREAM_FULL:
                # The client is not read because the origin stopped reading: a 504, as
                # nginx's proxy_send_timeout gives, not a 408 that blames the client.
                self._fail(errors.WriteTimeout(
                    f"origin read none of the request body for "
                    f"{self.worker.timeouts.body_idle:g} s"))
            elif not self.resp_started:
                self._fail(errors.ProxyError("request body not received in time",
                                             status=408, error_type="http_request_error"))
            else:
                self._fail(errors.ReadTimeout(
                    f"origin sent no body bytes for {self.worker.timeouts.body_idle:g} s"))
        elif state is ClientState.TUNNEL:
            # Nothing moved either way for tunnel_idle (a client not reading counts: bytes
            # wait for it): an abort, not the FIN that ends a tunnel cleanly.
            if self.tunnel is not None:
                self.tunnel.error = "connection_read_timeout"
            self._reset()
