"""Test origins for the proxyd black-box suite.

Everything here runs in-process on background threads and binds only to 127.0.0.1.

* ``OriginServer``: an HTTP/1.1 origin on raw sockets (TLS via ``ssl`` with a ``trustme``
  certificate for "localhost" and "127.0.0.1", or plain TCP with ``tls=False``).  Raw
  sockets rather than ``http.server`` because the tests need exact control: the raw bytes
  each TCP connection received, completed TLS handshakes, idle closes, chunked request
  bodies with trailers, deliberately broken responses.
* ``EchoServer``: a raw TCP echo server for CONNECT tunnels.
* ``read_response`` / ``Response``: a strict little HTTP/1.x response reader for tests that
  talk to proxyd over a raw socket (pipelining, framing, 100-continue).
* ``pattern_bytes`` / ``id_body``: the deterministic bodies the endpoints serve, so tests can
  compute what they must receive.

Endpoints (any method; HEAD on any path sends the GET head without a body):

====================  ======================================================================
/bytes/N              N pattern bytes, Content-Length
/id/RID?size=N        N bytes of ``RID:`` repeated (``id_body``), Content-Length, X-Rid: RID
/chunked/N            N pattern bytes, Transfer-Encoding: chunked (``?chunk=S`` chunk size,
                      ``?trailers=1`` adds a trailer field)
/close/N              N pattern bytes, no Content-Length, Connection: close, then close
/echo                 request body echoed back; X-Echo-Headers: base64(JSON [[name, value]...])
/headers              JSON {method, target, version, headers} of the request as received
/stream/N             N pattern bytes generated on the fly in 64 KiB writes, Content-Length
/upload, /expect      body read streaming (Content-Length or chunked); JSON {bytes, sha256,
                      framing, trailers, expect_continue_sent}
/status/CODE          that status; 204 and 304 carry no body
/slow-head/SECONDS    waits SECONDS before sending the head, then "slow\\n"
/stall-read/SECONDS   reads none of the request body for SECONDS, then answers and closes
/slow-body/SECONDS    sends the head at once (Content-Length N, ``?size=N``, default 4000),
                      then N pattern bytes in ``?steps=S`` (default 20) equal pieces, one
                      every SECONDS/S, so the body ends SECONDS after the head
/cut/N                a chunked response cut off after N body bytes (no last chunk, no
                      close_notify)
/late-close/SECONDS   after SECONDS a complete keep-alive response "ok", then a close at once
                      (no close_notify)
/garbage              answers ``garbage\\r\\n\\r\\n`` and closes
/bad-chunk            a chunked 200 head, a valid chunk and an invalid chunk-size line in one
                      write, then a close
/hangup               closes the connection (no TLS close_notify) right after the request
====================  ======================================================================

A request with ``Expect: 100-continue`` and a body gets ``HTTP/1.1 100 Continue`` before the
origin reads the body.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

import trustme

# --------------------------------------------------------------------------------------
# Deterministic bodies
# --------------------------------------------------------------------------------------

PATTERN_PERIOD = 251  # prime, so 64 KiB / 1 MiB blocks never line up with the period
_BLOCK = 1 << 20
_PATTERN_BUF = bytes(range(PATTERN_PERIOD)) * ((_BLOCK + 2 * PATTERN_PERIOD) // PATTERN_PERIOD)


def pattern_view(offset: int, length: int) -> memoryview:
    """Pattern bytes [offset, offset+length) of the infinite stream; length <= 1 MiB."""
    if length > _BLOCK:
        raise ValueError("length > 1 MiB; use pattern_bytes/pattern_chunks")
    start = offset % PATTERN_PERIOD
    return memoryview(_PATTERN_BUF)[start:start + length]


def pattern_chunks(n: int, chunk: int = 65536, offset: int = 0):
    """Yield the pattern stream's bytes [offset, offset+n) as memoryviews of <= chunk bytes."""
    pos = 0
    while pos < n:
        k = min(chunk, n - pos)
        yield pattern_view(offset + pos, k)
        pos += k


def pattern_bytes(n: int, offset: int = 0) -> bytes:
    """The first n bytes that /bytes/N, /chunked/N, /close/N and /stream/N serve."""
    return b"".join(bytes(c) for c in pattern_chunks(n, _BLOCK, offset))


@functools.lru_cache(maxsize=None)
def pattern_sha256(n: int) -> str:
    h = hashlib.sha256()
    for c in pattern_chunks(n, _BLOCK):
        h.update(c)
    return h.hexdigest()


def id_body(rid: str, size: int) -> bytes:
    """The body /id/RID?size=N serves: ``RID:`` repeated, cut to size bytes."""
    unit = f"{rid}:".encode()
    return (unit * (size // len(unit) + 1))[:size]


# --------------------------------------------------------------------------------------
# Certificates
# --------------------------------------------------------------------------------------


def make_ca() -> trustme.CA:
    return trustme.CA()


def server_context(ca: trustme.CA, identities=("localhost", "127.0.0.1")) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert(*identities).configure_cert(ctx)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


# --------------------------------------------------------------------------------------
# Origin server
# --------------------------------------------------------------------------------------


class _EOF(Exception):
    """The peer closed the connection."""


class _Idle(Exception):
    """No new request arrived within idle_close_after."""


class _BadRequest(Exception):
    pass


def listen_in_thread(accept_loop, name: str, backlog: int = 64) -> tuple[socket.socket, int, threading.Thread]:
    """A loopback listener on a free port and a daemon thread running ``accept_loop``
    (which reads the listener from its owner); returns (listener, port, thread)."""
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", 0))
    ls.listen(backlog)
    port = ls.getsockname()[1]
    return ls, port, threading.Thread(target=accept_loop, daemon=True, name=f"{name}-{port}")


def stop_listener(ls: socket.socket, socks: list[socket.socket],
                  threads: list[threading.Thread]) -> None:
    """Undo listen_in_thread: wake accept() and the served sockets, then join the threads."""
    try:
        ls.shutdown(socket.SHUT_RDWR)  # wakes accept() on Linux
    except OSError:
        pass
    ls.close()
    for s in list(socks):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    for t in threads:
        t.join(2.0)


class _HeaderLookup:
    """Case-insensitive lookups over ``self.headers`` ([(name, value)])."""

    headers: list

    def header(self, name: str, default=None):
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return default

    def header_all(self, name: str) -> list:
        return [v for k, v in self.headers if k.lower() == name.lower()]


@dataclass
class RequestRecord(_HeaderLookup):
    conn_id: int
    seq: int  # position in OriginServer.requests
    method: str
    target: str
    version: str
    headers: list  # [(name, value)] in received order, names as sent
    raw_head: bytes  # request line + fields + CRLF CRLF, exactly as received
    body_framing: str = "none"  # none | length | chunked
    body_len: int = 0  # filled in when the handler consumed the body
    trailers: list = field(default_factory=list)
    expect_continue_sent: bool = False

    @property
    def path(self) -> str:
        return urlsplit(self.target).path


    def header_names(self) -> list:
        return [k.lower() for k, _ in self.headers]


@dataclass
class ConnRecord:
    id: int
    peer: tuple
    tls: bool
    accepted_at: float
    handshake_ok: bool | None = None
    handshake_error: str = ""
    raw: bytearray = field(default_factory=bytearray)  # application bytes received (capped)
    bytes_received: int = 0
    request_ids: list = field(default_factory=list)
    client_cert: dict | None = None  # the client's certificate, if it sent one (getpeercert)
    close_reason: str = ""  # "", peer_eof, idle, origin_close, error:..., stop
    closed: bool = False


class OriginServer:
    """A threaded HTTP/1.1 test origin on 127.0.0.1.

    Options:
      tls               serve TLS (certificate from ``ca`` for localhost and 127.0.0.1)
      ca                trustme.CA that signs the certificate (a fresh one if None)
      idle_close_after  seconds a connection may wait for its next request (including the
                        first one after the handshake) before the origin closes it
      keep_alive_header value of a ``Keep-Alive`` field added to keep-alive responses
      mode              "normal", or "garbage" / "hangup" to answer every request that way
      record_limit      raw bytes kept per connection (byte counts are always exact)
      identities        names/IPs the certificate is issued for
    """

    def __init__(self, *, tls: bool = True, ca: trustme.CA | None = None,
                 idle_close_after: float | None = None, keep_alive_header: str | None = None,
                 mode: str = "normal", record_limit: int = 1 << 20,
                 handshake_timeout: float = 10.0, io_timeout: float = 120.0,
                 identities: tuple = ("localhost", "127.0.0.1")):
        self.tls = tls
        self.ca = ca if ca is not None else (make_ca() if tls else None)
        self.ssl_context = server_context(self.ca, identities) if tls else None
        self.idle_close_after = idle_close_after
        self.keep_alive_header = keep_alive_header
        self.mode = mode
        self.record_limit = record_limit
        self.handshake_timeout = handshake_timeout
        self.io_timeout = io_timeout

        self.host = "127.0.0.1"
        self.port = 0
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._threads: list[threading.Thread] = []
        self._live: dict[int, socket.socket] = {}

        # Observations (read them under no lock: appends/increments are GIL-atomic).
        # In TLS 1.3 a client finishes its side of the handshake before the origin has
        # processed the client's Finished, so a client (proxyd) can know a connection is up
        # a moment before `handshakes` counts it: use wait_handshakes(n) rather than reading
        # the counter right after the client-side event.
        self.connections: list[ConnRecord] = []
        self.requests: list[RequestRecord] = []
        self.handshakes = 0
        self.resumed = 0  # handshakes that resumed a TLS session
        self.handshake_failures = 0
        self.idle_closes = 0

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> "OriginServer":
        self._listener, self.port, self._accept_thread = listen_in_thread(
            self._accept_loop, "origin-accept", backlog=512)
        self._accept_thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept() on Linux
            except OSError:
                pass
            self._listener.close()
        with self._cond:
            live = list(self._live.values())
        for s in live:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        if self._accept_thread is not None:
            self._accept_thread.join(max(0.0, deadline - time.monotonic()))
        for t in list(self._threads):
            t.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- helpers for tests --------------------------------------------------------------

    @property
    def authority(self) -> str:
        """host:port to put in absolute URIs (the certificate covers "localhost")."""
        return f"localhost:{self.port}"

    def url(self, path: str, host: str = "localhost") -> str:
        return f"http://{host}:{self.port}{path}"

    def wait_for(self, predicate, timeout: float = 5.0) -> bool:
        """Wait until predicate() is true (re-checked whenever the origin records something)."""
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    def wait_handshakes(self, n: int, timeout: float = 5.0) -> bool:
        return self.wait_for(lambda: self.handshakes >= n, timeout)

    def wait_idle_closes(self, n: int, timeout: float = 5.0) -> bool:
        return self.wait_for(lambda: self.idle_closes >= n, timeout)

    def wait_requests(self, n: int, timeout: float = 5.0) -> bool:
        return self.wait_for(lambda: len(self.requests) >= n, timeout)

    def wait_request(self, predicate, timeout: float = 5.0) -> RequestRecord | None:
        found = []

        def check():
            for r in self.requests:
                if predicate(r):
                    found.append(r)
                    return True
            return False

        self.wait_for(check, timeout)
        return found[0] if found else None

    def raw_bytes_for(self, req: RequestRecord) -> bytes:
        return bytes(self.connections[req.conn_id].raw)

    def total_app_bytes(self) -> int:
        return sum(c.bytes_received for c in self.connections)

    def _notify(self):
        with self._cond:
            self._cond.notify_all()

    # -- accept / connection ----------------------------------------------------------

    def _accept_loop(self):
        while not self._stop.is_set():
            try:
                sock, peer = self._listener.accept()
            except OSError:
                return
            if self._stop.is_set():
                sock.close()
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._cond:
                rec = ConnRecord(id=len(self.connections), peer=peer, tls=self.tls,
                                 accepted_at=time.monotonic())
                self.connections.append(rec)
                self._live[rec.id] = sock
                self._cond.notify_all()
            t = threading.Thread(target=self._serve_conn, args=(sock, rec), daemon=True,
                                 name=f"origin-{self.port}-conn-{rec.id}")
            self._threads.append(t)
            t.start()

    def _serve_conn(self, sock: socket.socket, rec: ConnRecord):
        try:
            if self.tls:
                sock.settimeout(self.handshake_timeout)
                tsock = self.ssl_context.wrap_socket(sock, server_side=True,
                                                     do_handshake_on_connect=False)
                sock = tsock  # the plain socket object is detached now
                with self._cond:
                    self._live[rec.id] = tsock
                try:
                    tsock.do_handshake()
                except (OSError, ssl.SSLError) as e:
                    rec.handshake_ok = False
                    rec.handshake_error = repr(e)
                    with self._cond:
                        self.handshake_failures += 1
                        self._cond.notify_all()
                    rec.close_reason = "handshake_failed"
                    return
                rec.handshake_ok = True
                rec.client_cert = tsock.getpeercert() or None
                with self._cond:
                    self.handshakes += 1
                    self.resumed += tsock.session_reused
                    self._cond.notify_all()
            _ConnHandler(self, sock, rec).run()
        except Exception as e:  # noqa: BLE001 - recorded for debugging, never raised
            if not rec.close_reason:
                rec.close_reason = f"error:{e!r}"
        finally:
            try:
                sock.close()
            except OSError:
                pass
            if self._stop.is_set() and not rec.close_reason:
                rec.close_reason = "stop"
            with self._cond:
                rec.closed = True
                self._live.pop(rec.id, None)
                self._cond.notify_all()


class _ConnHandler:
    def __init__(self, server: OriginServer, sock: socket.socket, rec: ConnRecord):
        self.srv = server
        self.sock = sock
        self.rec = rec
        self.buf = bytearray()
        self.ntlm_challenged = False  # ep_ntlm: the connection's authentication state
        self.ntlm_user = ""

    # -- reading -------------------------------------------------------------------

    def _recv(self, n: int = 262144) -> bytes:
        data = self.sock.recv(n)
        if data:
            rec = self.rec
            rec.bytes_received += len(data)
            room = self.srv.record_limit - len(rec.raw)
            if room > 0:
                rec.raw += data[:room]
        return data

    def _fill(self):
        data = self._recv()
        if not data:
            raise _EOF()
        self.buf += data

    def read_head(self) -> bytes:
        idle = self.srv.idle_close_after
        start = 0
        while True:
            # tolerate stray CRLFs between requests (RFC 9112 §2.2)
            while self.buf[:2] == b"\r\n":
                del self.buf[:2]
            i = self.buf.find(b"\r\n\r\n", start)
            if i >= 0:
                head = bytes(self.buf[:i + 4])
                del self.buf[:i + 4]
                return head
            start = max(0, len(self.buf) - 3)
            if len(self.buf) > 1 << 20:
                raise _BadRequest("head too large")
            if not self.buf and idle is not None:
                self.sock.settimeout(idle)
                try:
                    self._fill()
                except (socket.timeout, TimeoutError):
                    raise _Idle() from None
                finally:
                    self.sock.settimeout(self.srv.io_timeout)
            else:
                self._fill()

    def read_line(self) -> bytes:
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                line = bytes(self.buf[:i])
                del self.buf[:i + 2]
                return line
            if len(self.buf) > 65536:
                raise _BadRequest("line too long")
            self._fill()

    def read_upto(self, n: int) -> bytes:
        if self.buf:
            k = min(n, len(self.buf))
            data = bytes(self.buf[:k])
            del self.buf[:k]
            return data
        data = self._recv(min(n, 1 << 20))
        if not data:
            raise _EOF()
        return data

    def body_chunks(self, req: RequestRecord, length: int | None):
        """Yield the request body's data; records body_len and trailers on req."""
        if req.body_framing == "length":
            left = length
            while left > 0:
                data = self.read_upto(left)
                left -= len(data)
                req.body_len += len(data)
                yield data
        elif req.body_framing == "chunked":
            while True:
                line = self.read_line()
                size = int(line.split(b";", 1)[0].strip(), 16)
                if size == 0:
                    break
                left = size
                while left > 0:
                    data = self.read_upto(left)
                    left -= len(data)
                    req.body_len += len(data)
                    yield data
                if self.read_line() != b"":
                    raise _BadRequest("chunk not followed by CRLF")
            while True:
                line = self.read_line()
                if not line:
                    break
                k, _, v = line.decode("latin-1").partition(":")
                req.trailers.append((k.strip(), v.strip()))

    # -- writing -------------------------------------------------------------------

    def send(self, data) -> None:
        self.sock.sendall(data)

    def close_gracefully(self):
        """Close, sending a TLS close_notify first (without waiting for the peer's)."""
        if isinstance(self.sock, ssl.SSLSocket):
            try:
                self.sock.settimeout(0.0)
                self.sock.unwrap()
            except (OSError, ssl.SSLError, ValueError):
                pass
        try:
            self.sock.close()
        except OSError:
            pass

    def close_abruptly(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # TCP FIN, no close_notify
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass

    # -- main loop -----------------------------------------------------------------

    def run(self):
        srv = self.srv
        self.sock.settimeout(srv.io_timeout)
        while not srv._stop.is_set():
            try:
                head = self.read_head()
            except _EOF:
                self.rec.close_reason = "peer_eof"
                return
            except _Idle:
                self.rec.close_reason = "idle"
                self.close_gracefully()
                with srv._cond:
                    srv.idle_closes += 1
                    srv._cond.notify_all()
                return
            try:
                req = self._parse(head)
            except (_BadRequest, ValueError, UnicodeDecodeError) as e:
                self.send(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 12\r\n"
                          b"Connection: close\r\n\r\nbad request\n")
                self.rec.close_reason = f"bad_request:{e}"
                self.close_gracefully()
                return
            keep = self._handle(req)
            if not keep:
                if not self.rec.close_reason:
                    self.rec.close_reason = "origin_close"
                return

    def _parse(self, head: bytes) -> RequestRecord:
        lines = head[:-4].split(b"\r\n")
        method, target, version = lines[0].decode("latin-1").split(" ")
        if not version.startswith("HTTP/1."):
            raise _BadRequest("version")
        headers = []
        for line in lines[1:]:
            if line[:1] in (b" ", b"\t"):
                raise _BadRequest("obs-fold")
            k, sep, v = line.decode("latin-1").partition(":")
            if not sep or k != k.strip() or not k:
                raise _BadRequest("bad field")
            headers.append((k, v.strip(" \t")))
        srv = self.srv
        with srv._cond:
            req = RequestRecord(conn_id=self.rec.id, seq=len(srv.requests), method=method,
                                target=target, version=version, headers=headers,
                                raw_head=head)
            srv.requests.append(req)
            self.rec.request_ids.append(req.seq)
            srv._cond.notify_all()
        return req

    def _handle(self, req: RequestRecord) -> bool:
        """Serve one request; returns whether the connection stays open."""
        te = ",".join(req.header_all("Transfer-Encoding")).lower()
        cl = req.header("Content-Length")
        length = None
        if "chunked" in te:
            req.body_framing = "chunked"
        elif cl is not None:
            length = int(cl)
            req.body_framing = "length" if length > 0 else "none"
        conn_tokens = {t.strip().lower()
                       for v in req.header_all("Connection") for t in v.split(",")}
        if req.version == "HTTP/1.1":
            keep = "close" not in conn_tokens
        else:
            keep = "keep-alive" in conn_tokens
        expects = (req.header("Expect") or "").lower() == "100-continue"
        if expects and req.body_framing != "none":
            self.send(b"HTTP/1.1 100 Continue\r\n\r\n")
            req.expect_continue_sent = True

        body = self.body_chunks(req, length)
        r = _Responder(self, req, keep)
        path = req.path
        parts = [p for p in path.split("/") if p]
        qs = parse_qs(urlsplit(req.target).query)
        name = parts[0] if parts else ""
        if self.srv.mode != "normal":
            name = self.srv.mode
        try:
            handler = getattr(self, "ep_" + name.replace("-", "_"), None)
            if handler is None:
                r.simple(404, b"no such endpoint\n")
            else:
                handler(r, req, parts[1:], qs, body)
            if r.closed:
                return False
            for _ in body:  # drain whatever the handler did not read
                pass
        except (_EOF, OSError):
            self.rec.close_reason = self.rec.close_reason or "peer_eof_mid_request"
            return False
        if not r.keep:
            self.close_gracefully()
            return False
        return True

    # -- endpoints -------------------------------------------------------------------
    # each gets (responder, request, remaining path parts, query dict, body iterator)

    def ep_bytes(self, r, req, args, qs, body):
        n = int(args[0])
        r.start(200, [("Content-Type", "application/octet-stream"), ("Content-Length", str(n))])
        for c in pattern_chunks(n, 262144):
            r.write(c)

    def ep_stream(self, r, req, args, qs, body):
        n = int(args[0])
        r.start(200, [("Content-Type", "application/octet-stream"), ("Content-Length", str(n))])
        for c in pattern_chunks(n, 65536):
            r.write(c)

    def ep_id(self, r, req, args, qs, body):
        rid = args[0]
        size = int(qs.get("size", ["0"])[0])
        data = id_body(rid, size)
        r.start(200, [("Content-Type", "application/octet-stream"),
                      ("Content-Length", str(size)), ("X-Rid", rid)])
        for i in range(0, size, 262144):
            r.write(data[i:i + 262144])

    def ep_chunked(self, r, req, args, qs, body):
        n = int(args[0])
        chunk = int(qs.get("chunk", ["4096"])[0])
        trailers = qs.get("trailers", ["0"])[0] == "1"
        if req.version == "HTTP/1.0":  # cannot chunk to a 1.0 client: close-delimited
            r.keep = False
            r.start(200, [("Content-Type", "application/octet-stream")])
            for c in pattern_chunks(n, chunk):
                r.write(c)
            return
        hdrs = [("Content-Type", "application/octet-stream"), ("Transfer-Encoding", "chunked")]
        if trailers:
            hdrs.append(("Trailer", "X-Origin-Trailer"))
        r.start(200, hdrs)
        if r.head_only:
            return
        for c in pattern_chunks(n, chunk):
            r.write_raw(b"%x\r\n" % len(c) + bytes(c) + b"\r\n")
        r.write_raw(b"0\r\n" + (b"X-Origin-Trailer: done\r\n" if trailers else b"") + b"\r\n")

    def ep_ntlm(self, r, req, args, qs, body):
        """A resource behind connection-oriented authentication, shaped like NTLM (RFC 4559's
        Negotiate alike): ``NTLM type1`` is challenged with a 401, ``NTLM type3-<user>`` on
        the same connection authenticates the *connection* as <user>; later requests on it
        need no credentials. Anyone else gets the 401 that starts the handshake."""
        scheme, _, token = (req.header("Authorization") or "").partition(" ")
        if scheme.lower() == "ntlm" and token.startswith("type3-") and self.ntlm_challenged:
            self.ntlm_user = token[len("type3-"):]
        if self.ntlm_user:
            r.simple(200, f"hello {self.ntlm_user}\n".encode())
            return
        self.ntlm_challenged = scheme.lower() == "ntlm" and token == "type1"
        challenge = "NTLM type2" if self.ntlm_challenged else "NTLM"
        r.start(401, [("Content-Type", "text/plain"), ("Content-Length", "4"),
                      ("WWW-Authenticate", challenge)])
        r.write(b"who\n")

    def ep_close(self, r, req, args, qs, body):
        n = int(args[0])
        r.keep = False
        r.start(200, [("Content-Type", "application/octet-stream")])
        for c in pattern_chunks(n, 65536):
            r.write(c)

    def ep_echo(self, r, req, args, qs, body):
        data = b"".join(body)
        hdrs = base64.b64encode(json.dumps(req.headers).encode()).decode()
        r.start(200, [("Content-Type", "application/octet-stream"),
                      ("Content-Length", str(len(data))), ("X-Echo-Headers", hdrs)])
        r.write(data)

    def ep_headers(self, r, req, args, qs, body):
        for _ in body:
            pass
        data = json.dumps({"method": req.method, "target": req.target, "version": req.version,
                           "headers": req.headers}).encode()
        r.simple(200, data, "application/json")

    def ep_upload(self, r, req, args, qs, body):
        h = hashlib.sha256()
        n = 0
        for data in body:
            h.update(data)
            n += len(data)
        out = json.dumps({"bytes": n, "sha256": h.hexdigest(), "framing": req.body_framing,
                          "trailers": req.trailers,
                          "expect_continue_sent": req.expect_continue_sent}).encode()
        r.simple(200, out, "application/json")

    ep_expect = ep_upload

    def ep_status(self, r, req, args, qs, body):
        code = int(args[0])
        if code in (204, 304):
            extra = [("ETag", '"v1"')] if code == 304 else []
            r.start(code, extra)
        else:
            r.simple(code, f"status {code}\n".encode())

    def ep_slow_head(self, r, req, args, qs, body):
        delay = float(args[0])
        for _ in body:
            pass
        self.srv._stop.wait(delay)  # a deliberate delay, cut short when the origin stops
        r.simple(200, b"slow\n")

    def ep_processing(self, r, req, args, qs, body):
        """``/processing/<n>/<interval>``: n ``102 Processing`` interim responses, one every
        interval seconds, then a 200 (a long operation that shows it is alive)."""
        n, interval = int(args[0]), float(args[1])
        for _ in body:
            pass
        for _ in range(n):
            self.srv._stop.wait(interval)  # deliberate pacing, cut short when the origin stops
            self.send(b"HTTP/1.1 102 Processing\r\n\r\n")
        self.srv._stop.wait(interval)
        r.simple(200, b"done\n")

    def ep_stall_read(self, r, req, args, qs, body):
        """An origin that stops reading: none of the body is read for SECONDS."""
        self.srv._stop.wait(float(args[0]))
        r.keep = False
        r.simple(200, b"late\n")

    def ep_slow_body(self, r, req, args, qs, body):
        seconds = float(args[0])
        size = int(qs.get("size", ["4000"])[0])
        steps = max(1, int(qs.get("steps", ["20"])[0]))
        for _ in body:
            pass
        if qs.get("framing", [""])[0] == "close":  # ended by the close, no Content-Length
            r.keep = False
            r.start(200, [("Content-Type", "application/octet-stream")])
        else:
            r.start(200, [("Content-Type", "application/octet-stream"),
                          ("Content-Length", str(size))])
        if r.head_only:
            return
        sent = 0
        for i in range(steps):
            if self.srv._stop.wait(seconds / steps):  # deliberate trickle; cut short on stop
                r.closed = True
                self.close_abruptly()
                return
            end = size * (i + 1) // steps
            r.write(pattern_bytes(end - sent, offset=sent))
            sent = end

    def ep_garbage(self, r, req, args, qs, body):
        self.send(b"garbage\r\n\r\n")
        r.closed = True
        self.close_gracefully()

    def ep_bad_chunk(self, r, req, args, qs, body):
        self.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"5\r\nhello\r\nzz\r\n")
        r.closed = True
        self.close_gracefully()

    def ep_cut(self, r, req, args, qs, body):
        """A chunked response cut off inside its first chunk: N body bytes of a chunk that
        announced more, then a close without close_notify."""
        n = int(args[0])
        r.start(200, [("Content-Type", "application/octet-stream"),
                      ("Transfer-Encoding", "chunked")])
        r.write_raw(b"%x\r\n" % (n + 100) + pattern_bytes(n))
        r.closed = True
        self.close_abruptly()

    def ep_late_close(self, r, req, args, qs, body):
        """After SECONDS, a complete keep-alive response ("ok", no Connection: close) and at
        once a close without close_notify: the origin's close follows its last response."""
        for _ in body:
            pass
        self.srv._stop.wait(float(args[0]))
        # Corked, the response and the FIN leave in one segment: the proxy cannot read the
        # one without the other being in its socket already.
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
        self.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        r.closed = True
        self.close_abruptly()

    def ep_hangup(self, r, req, args, qs, body):
        r.closed = True
        self.close_abruptly()


_REASONS = {100: "Continue", 200: "OK", 204: "No Content", 304: "Not Modified",
            400: "Bad Request", 404: "Not Found", 500: "Internal Server Error",
            503: "Service Unavailable"}


class _Responder:
    def __init__(self, handler: _ConnHandler, req: RequestRecord, keep: bool):
        self.h = handler
        self.req = req
        self.keep = keep
        self.head_only = req.method == "HEAD"
        self.closed = False
        self.started = False

    def start(self, status: int, headers: list):
        srv = self.h.srv
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Whatever')}"]
        lines += [f"{k}: {v}" for k, v in headers]
        lines.append(f"X-Conn-Id: {self.h.rec.id}")
        lines.append(f"X-Request-Seq: {self.req.seq}")
        if self.keep:
            if self.req.version == "HTTP/1.0":
                lines.append("Connection: keep-alive")
            if srv.keep_alive_header:
                lines.append(f"Keep-Alive: {srv.keep_alive_header}")
        else:
            lines.append("Connection: close")
        self.h.send(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        self.started = True

    def write(self, data):
        if not self.head_only:
            self.h.send(data)

    def write_raw(self, data):
        self.h.send(data)

    def simple(self, status: int, body: bytes, ctype: str = "text/plain"):
        self.start(status, [("Content-Type", ctype), ("Content-Length", str(len(body)))])
        self.write(body)


# --------------------------------------------------------------------------------------
# TCP echo server (CONNECT tunnels)
# --------------------------------------------------------------------------------------


class EchoServer:
    """Raw TCP echo on 127.0.0.1; counts accepted connections and bytes echoed."""

    def __init__(self):
        self.port = 0
        self.accepted = 0
        self.bytes_echoed = 0
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []

    def start(self) -> "EchoServer":
        self._ls, self.port, t = listen_in_thread(self._accept, "echo")
        t.start()
        self._threads.append(t)
        return self

    def _accept(self):
        while True:
            try:
                s, _ = self._ls.accept()
            except OSError:
                return
            with self._cond:
                self.accepted += 1
                self._socks.append(s)
                self._cond.notify_all()
            t = threading.Thread(target=self._echo, args=(s,), daemon=True)
            t.start()
            self._threads.append(t)

    def _echo(self, s):
        try:
            while True:
                data = s.recv(65536)
                if not data:
                    break
                s.sendall(data)
                with self._cond:
                    self.bytes_echoed += len(data)
        except OSError:
            pass
        finally:
            s.close()

    def wait_accepted(self, n: int, timeout: float = 5.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.accepted >= n, timeout)

    def stop(self):
        stop_listener(self._ls, self._socks, self._threads)


# --------------------------------------------------------------------------------------
# Raw HTTP/1.x response reader for tests
# --------------------------------------------------------------------------------------


class ProtocolViolation(AssertionError):
    """What the proxy sent is not valid HTTP/1.x framing."""


@dataclass
class Response(_HeaderLookup):
    version: str
    status: int
    reason: str
    headers: list  # [(name, value)]
    body: bytes = b""
    framing: str = ""  # none | length | chunked | close
    trailers: list = field(default_factory=list)
    raw_head: bytes = b""
    interim: list = field(default_factory=list)  # 1xx responses seen before this one


    def has_token(self, name: str, token: str) -> bool:
        return any(t.strip().lower() == token.lower()
                   for v in self.header_all(name) for t in v.split(","))


def _readline(f, limit=65536) -> bytes:
    line = f.readline(limit + 1)
    if not line:
        raise EOFError("connection closed")
    if len(line) > limit:
        raise ProtocolViolation("line too long")
    if not line.endswith(b"\n"):
        raise EOFError(f"connection closed mid-line: {line!r}")
    return line


def read_response_head(f) -> Response:
    """Read one response head (1xx included) from a binary file (sock.makefile('rb'))."""
    raw = _readline(f)
    parts = raw.rstrip(b"\r\n").decode("latin-1").split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ProtocolViolation(f"bad status line {raw!r}")
    resp = Response(version=parts[0], status=int(parts[1]),
                    reason=parts[2] if len(parts) > 2 else "", headers=[])
    head = bytearray(raw)
    while True:
        line = _readline(f)
        head += line
        if line in (b"\r\n", b"\n"):
            break
        k, sep, v = line.decode("latin-1").partition(":")
        if not sep:
            raise ProtocolViolation(f"bad header line {line!r}")
        resp.headers.append((k, v.strip()))
    resp.raw_head = bytes(head)
    return resp


def read_response(f, method: str = "GET", *, return_interim: bool = False,
                  max_body: int = 1 << 30) -> Response:
    """Read one complete response (head + body) per RFC 9112 §6.3 framing.

    1xx responses are collected into ``.interim`` unless return_interim, in which case the
    first one is returned as is.
    """
    interim = []
    while True:
        resp = read_response_head(f)
        if 100 <= resp.status < 200 and resp.status != 101:
            if return_interim:
                return resp
            interim.append(resp)
            continue
        break
    resp.interim = interim
    te = ",".join(resp.header_all("Transfer-Encoding")).lower()
    cls = resp.header_all("Content-Length")
    if method == "HEAD" or resp.status in (204, 304) or 100 <= resp.status < 200:
        resp.framing = "none"
        return resp
    if te:
        if te.split(",")[-1].strip() != "chunked":
            raise ProtocolViolation(f"unexpected transfer-encoding {te!r}")
        if cls:
            raise ProtocolViolation("both Transfer-Encoding and Content-Length")
        resp.framing = "chunked"
        body = bytearray()
        while True:
            line = _readline(f)
            size = int(line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                break
            data = f.read(size)
            if len(data) != size:
                raise EOFError("connection closed mid-chunk")
            body += data
            if f.read(2) != b"\r\n":
                raise ProtocolViolation("chunk data not followed by CRLF")
        while True:
            line = _readline(f)
            if line in (b"\r\n", b"\n"):
                break
            k, _, v = line.decode("latin-1").partition(":")
            resp.trailers.append((k.strip(), v.strip()))
        resp.body = bytes(body)
        return resp
    if cls:
        if len(set(cls)) != 1:
            raise ProtocolViolation(f"conflicting Content-Length {cls}")
        n = int(cls[0])
        data = f.read(n)
        if len(data) != n:
            raise EOFError(f"connection closed after {len(data)} of {n} body bytes")
        resp.framing = "length"
        resp.body = data
        return resp
    resp.framing = "close"
    resp.body = f.read(max_body)
    return resp
