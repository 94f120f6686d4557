"""Black-box tests: proxyd is run as a subprocess and driven only through its sockets, CLI
and stderr; what reaches the origin is checked on the origin side (tests/origin.py)."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import re
import socket
import ssl
import struct
import subprocess
import threading
import time
import tomllib
import urllib.request

import pytest

from conftest import proxyd_env, run_proxyd, wait_pid_gone
from origin import (client_context, id_body, make_ca, pattern_bytes, pattern_chunks,
                    pattern_sha256, read_response, read_response_head)

IO_TIMEOUT = 10.0
MiB = 1 << 20
GiB = 1 << 30


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


class Raw:
    """A raw client socket to proxyd with a buffered reader."""

    def __init__(self, port: int, timeout: float = IO_TIMEOUT):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.f = self.sock.makefile("rb")

    def send(self, data: bytes | str):
        self.sock.sendall(data.encode("latin-1") if isinstance(data, str) else data)

    def response(self, method="GET", **kw):
        return read_response(self.f, method, **kw)

    def at_eof(self, timeout: float = 5.0) -> bool:
        """True if the peer closes the connection within timeout (and sent nothing more)."""
        old = self.sock.gettimeout()
        self.sock.settimeout(timeout)
        try:
            return self.f.read(1) == b""
        except ConnectionResetError:
            return True
        except (socket.timeout, TimeoutError):
            return False
        finally:
            self.sock.settimeout(old)

    def close(self):
        self.f.close()
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def get(port: int, url: str, method: str = "GET", body=None, headers=None,
        timeout: float = IO_TIMEOUT):
    """One request through the proxy on a fresh http.client connection -> (resp, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, url, body=body, headers=headers or {})
        r = conn.getresponse()
        return r, r.read()
    finally:
        conn.close()


def proxy_status(headers) -> str:
    if hasattr(headers, "get_all"):
        vals = headers.get_all("Proxy-Status") or []
    else:
        vals = headers.header_all("Proxy-Status")
    return ", ".join(vals)


def assert_proxy_error(resp, body: bytes, status: int, error: str | None):
    ps = proxy_status(resp.headers if hasattr(resp, "getheader") else resp)
    assert resp.status == status, (resp.status, ps, body[:300])
    assert ps, f"no Proxy-Status header on {resp.status} (body {body[:200]!r})"
    assert re.match(r"^\s*proxyd\s*;", ps), f"Proxy-Status not from proxyd: {ps!r}"
    if error is not None:
        assert re.search(rf'\berror\s*=\s*"?{re.escape(error)}"?(;|,|\s|$)', ps), \
            f"expected error={error} in Proxy-Status: {ps!r}"
    ctype = resp.getheader("Content-Type", "") if hasattr(resp, "getheader") else \
        resp.header("Content-Type", "")
    assert ctype.startswith("text/plain"), ctype
    assert body.strip(), "error response has an empty body"
    date = resp.getheader("Date") if hasattr(resp, "getheader") else resp.header("Date")
    assert date and date.endswith(" GMT"), "RFC 9110 §6.6.1: a generated response has a Date"


def has_via_proxyd(values) -> bool:
    return any(re.search(r"\bproxyd\b", v) for v in values)


def free_port_closed() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def clean_env() -> dict:
    return proxyd_env()


# --------------------------------------------------------------------------------------
# clients: curl, urllib, http.client CONNECT
# --------------------------------------------------------------------------------------


def test_curl_get_through_proxy(proxyd, tls_origin, tmp_path):
    p = proxyd()
    out, hdr = tmp_path / "body", tmp_path / "headers"
    r = subprocess.run(["curl", "-sS", "--max-time", "15", "-x", p.proxy_url,
                        tls_origin.url("/bytes/1024"), "-o", str(out), "-D", str(hdr),
                        "-w", "%{http_code}"],
                       env=clean_env(), capture_output=True, text=True, timeout=30)
    assert r.stdout == "200", (r.stdout, r.stderr, p.stderr_text())
    assert out.read_bytes() == pattern_bytes(1024)
    via = [line.split(":", 1)[1].strip() for line in hdr.read_text().splitlines()
           if line.lower().startswith("via:")]
    assert has_via_proxyd(via), hdr.read_text()
    req = tls_origin.requests[-1]
    assert (req.method, req.target) == ("GET", "/bytes/1024")
    assert req.header_all("Host") == [tls_origin.authority]
    assert tls_origin.connections[req.conn_id].tls


def test_urllib_with_http_proxy_env(proxyd, tls_origin, monkeypatch):
    p = proxyd()
    for k in ("http_proxy", "no_proxy", "NO_PROXY", "REQUEST_METHOD"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HTTP_PROXY", p.proxy_url)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler())  # reads the env
    with opener.open(tls_origin.url("/id/urllib-1?size=5000"), timeout=IO_TIMEOUT) as resp:
        body = resp.read()
        assert resp.status == 200
    assert body == id_body("urllib-1", 5000)
    assert tls_origin.requests[-1].target == "/id/urllib-1?size=5000"


def test_connect_tunnel_tls_with_http_client(proxyd, tls_origin, ca):
    p = proxyd(config={"connect_ports": [443, tls_origin.port]})
    conn = http.client.HTTPSConnection("127.0.0.1", p.port, context=client_context(ca),
                                       timeout=IO_TIMEOUT)
    conn.set_tunnel("localhost", tls_origin.port)
    try:
        for n in (5000, 200000):
            conn.request("GET", f"/bytes/{n}")
            r = conn.getresponse()
            assert r.status == 200
            assert r.read() == pattern_bytes(n)
    finally:
        conn.close()
    # end-to-end TLS: one handshake (the client's), both requests on it, untouched by proxyd
    assert tls_origin.handshakes == 1
    assert [r.conn_id for r in tls_origin.requests] == [0, 0]
    raw = bytes(tls_origin.connections[0].raw)
    assert raw.startswith(b"GET /bytes/5000 HTTP/1.1\r\n"), raw[:200]
    assert b"via:" not in raw.lower()


def test_connect_raw_tcp_echo(proxyd, echo_server):
    p = proxyd(config={"connect_ports": [443, echo_server.port]})
    with Raw(p.port) as c:
        c.send(f"CONNECT 127.0.0.1:{echo_server.port} HTTP/1.1\r\n"
               f"Host: 127.0.0.1:{echo_server.port}\r\n\r\n")
        head = read_response_head(c.f)
        assert 200 <= head.status < 300, head.raw_head
        assert not head.header_all("Content-Length") and not head.header_all("Transfer-Encoding")
        payload = os.urandom(300_000)
        c.send(payload)
        got = c.f.read(len(payload))
        assert got == payload
        c.sock.shutdown(socket.SHUT_WR)  # half-close must travel through the tunnel
        assert c.f.read() == b""
    assert echo_server.accepted == 1
    # logged as what it was: a 200 tunnel with its bytes each way, not an aborted request
    line = p.wait_for_log(r"method=CONNECT .*status=200 bytes_in=300000 bytes_out=300000 ")
    assert line and "error=-" in line, p.stderr_text()[-2000:]


def test_connect_port_not_allowed(proxyd, echo_server):
    p = proxyd()  # default connect_ports = [443]
    with Raw(p.port) as c:
        c.send(f"CONNECT 127.0.0.1:{echo_server.port} HTTP/1.1\r\n"
               f"Host: 127.0.0.1:{echo_server.port}\r\n\r\n")
        r = c.response()
    assert 400 <= r.status < 500, r.raw_head
    assert proxy_status(r), r.raw_head
    assert echo_server.accepted == 0


def test_connect_refusals_close_and_framing_is_refused(proxyd, echo_server):
    """What follows a CONNECT head is tunnel data: after a refusal it was parsed as requests
    (a GET behind a refused CONNECT was served), and Content-Length / Transfer-Encoding on a
    CONNECT (RFC 9110 §9.3.6: no content) put the "body" into the tunnel. Both found by a
    tunnel sweep."""
    p = proxyd(config={"connect_ports": [443, echo_server.port]})
    target = f"127.0.0.1:{echo_server.port}"
    with Raw(p.port) as c:  # a port not allowed, a request pipelined behind it
        c.send(f"CONNECT 127.0.0.1:9 HTTP/1.1\r\nHost: 127.0.0.1:9\r\n\r\n"
               f"GET http://{target}/smuggled HTTP/1.1\r\nHost: {target}\r\n\r\n")
        r = c.response()
        assert r.status == 403 and r.header("Connection") == "close", r.raw_head
        assert c.at_eof()
    for framing in ("Content-Length: 5", "Transfer-Encoding: chunked"):
        with Raw(p.port) as c:
            c.send(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{framing}\r\n\r\nXXXXX")
            r = c.response()
            assert r.status == 400 and "no content" in r.body.decode(), (r.raw_head, r.body)
            assert c.at_eof()
    assert echo_server.accepted == 0


def test_connect_target_reset_reaches_the_client_as_a_reset(proxyd):
    """A target that resets mid-tunnel: the client saw a clean EOF and the log said error=-
    (found by a tunnel sweep). It sees a reset, and the log says connection_terminated."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    port = listener.getsockname()[1]
    p = proxyd(config={"connect_ports": [port]})
    try:
        with Raw(p.port) as c:
            c.send(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n")
            head = read_response_head(c.f)
            assert head.status == 200
            target, _ = listener.accept()
            target.sendall(b"hello")
            assert c.f.read(5) == b"hello"
            target.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            target.close()  # RST
            with pytest.raises(ConnectionResetError):
                c.f.read(1)
    finally:
        listener.close()
    line = p.wait_for_log(r"method=CONNECT .*status=200 ")
    assert line and "error=connection_terminated" in line, p.stderr_text()[-2000:]


# --------------------------------------------------------------------------------------
# warm pool and connection reuse
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_warm_pool_handshakes_before_first_request(proxyd, tls_origin, workers):
    o = tls_origin
    p = proxyd(origins=[o.authority], warm=4, workers=workers)
    print(f"startup to ready: {p.startup_seconds:.2f}s")
    assert len(p.worker_pids()) == workers
    want = 4 * workers
    assert o.wait_handshakes(want, timeout=5), (o.handshakes, p.stderr_text())
    # no more than the floor: a further handshake must not show up
    assert not o.wait_handshakes(want + 1, timeout=0.5), o.handshakes
    assert o.handshakes == want and not o.requests and o.total_app_bytes() == 0

    latencies = []
    for i in range(4):
        t0 = time.perf_counter()
        r, body = get(p.port, o.url(f"/id/warm{i}?size=100"))
        latencies.append(time.perf_counter() - t0)
        assert r.status == 200 and body == id_body(f"warm{i}", 100)
    print("request latencies (first is the warm-pool first request): "
          + ", ".join(f"{x * 1000:.1f}ms" for x in latencies))
    # Every request ran on a connection handshaked before any request was sent; taking
    # one refills the floor in the background (at most one spare per worker here).
    assert all(r.conn_id < want for r in o.requests), [r.conn_id for r in o.requests]
    assert o.handshakes <= want + workers, o.handshakes


def test_upstream_connection_reused_across_requests(proxyd, tls_origin):
    o = tls_origin
    # no spare for the learned origin: this test is about reuse of one connection
    p = proxyd(workers=1, config={"pool": {"learned_warm": 0}})
    conn = http.client.HTTPConnection("127.0.0.1", p.port, timeout=IO_TIMEOUT)
    for i in range(10):
        conn.request("GET", o.url(f"/id/ka{i}?size={i * 1000}"))
        r = conn.getresponse()
        assert r.status == 200 and r.read() == id_body(f"ka{i}", i * 1000)
    conn.close()
    for i in range(5):  # fresh client connections share the upstream pool
        r, body = get(p.port, o.url("/bytes/10"))
        assert body == pattern_bytes(10)
    assert o.handshakes == 1, [c.close_reason for c in o.connections]
    assert {r.conn_id for r in o.requests} == {0}


@pytest.mark.parametrize("preemptive", [False, True], ids=["challenged", "preemptive"])
def test_connection_authenticated_upstream_is_never_given_to_another_client(
        proxyd, tls_origin, preemptive):
    """NTLM and Negotiate authenticate the connection, not the request (RFC 4559): after
    alice's handshake the upstream connection *is* alice. Found by a QA sweep: the pool handed
    it to the next client, who was served as alice. It stays with alice's client connection
    (her later requests run on it without credentials), no other client ever gets it, and it
    closes when her connection does — HAProxy's private connections."""
    o = tls_origin
    p = proxyd(workers=1, origins=[o.authority], warm=1)
    url = o.url("/ntlm")
    alice = http.client.HTTPConnection("127.0.0.1", p.port, timeout=IO_TIMEOUT)
    steps = ([("NTLM type1", 401), ("NTLM type3-alice", 200)] if preemptive else
             [(None, 401), ("NTLM type1", 401), ("NTLM type3-alice", 200)])
    for auth, want in steps:
        alice.request("GET", url, headers={"Authorization": auth} if auth else {})
        r = alice.getresponse()
        body = r.read()
        assert r.status == want, (auth, r.status, body)
    assert body == b"hello alice\n"
    alice_conn = o.requests[-1].conn_id
    # alice's next request needs no credentials: it runs on her connection
    alice.request("GET", url)
    r = alice.getresponse()
    assert (r.status, r.read()) == (200, b"hello alice\n")
    assert o.requests[-1].conn_id == alice_conn
    # bob, on another client connection, while alice's is still open and idle
    for _ in range(3):
        r, body = get(p.port, url)
        assert r.status == 401 and b"alice" not in body, (r.status, body)
        assert o.requests[-1].conn_id != alice_conn
    alice.close()
    assert o.wait_for(lambda: o.connections[alice_conn].closed, 5), \
        "alice's authenticated connection outlived her client connection"


def test_private_connection_holds_no_place_in_the_pool_and_survives_other_origins(
        proxyd, tls_origin, origin_factory):
    """An idle private connection is nobody else's, so it must not hold one of
    max_connections (found by review: with max_connections = 1 every other client got 503
    while alice sat idle); and a client that turns to another origin and back still has its
    authenticated connection (browsers mix hosts on one proxy connection)."""
    o, other = tls_origin, origin_factory()
    p = proxyd(workers=1, config={"pool": {"max_connections": 1, "learned_warm": 0},
                                  "timeouts": {"pool_wait": 2.0}})
    alice = http.client.HTTPConnection("127.0.0.1", p.port, timeout=IO_TIMEOUT)
    for auth, want in (("NTLM type1", 401), ("NTLM type3-alice", 200)):
        alice.request("GET", o.url("/ntlm"), headers={"Authorization": auth})
        r = alice.getresponse()
        assert (r.status, r.read()[:5]) == (want, b"hello" if want == 200 else b"who\n"[:5])
    alice_conn = o.requests[-1].conn_id
    t0 = time.monotonic()
    r, body = get(p.port, o.url("/bytes/10"))  # bob, while alice's connection sits idle
    assert (r.status, body) == (200, pattern_bytes(10)), (r.status, body)
    assert time.monotonic() - t0 < 1.5, "bob waited for alice's private connection"
    assert o.requests[-1].conn_id != alice_conn
    alice.request("GET", other.url("/bytes/5"))  # alice turns to another origin ...
    r = alice.getresponse()
    assert (r.status, r.read()) == (200, pattern_bytes(5))
    alice.request("GET", o.url("/ntlm"))  # ... and back: still authenticated
    r = alice.getresponse()
    assert (r.status, r.read()) == (200, b"hello alice\n")
    assert o.requests[-1].conn_id == alice_conn
    alice.close()


def test_private_connection_expires_like_an_idle_one_and_keeps_its_pool(
        proxyd, tls_origin, origin_factory):
    """Found by a sweep: a set-aside private connection was never swept (it outlived idle_ttl
    until its client's next request), and the learned-pool cap evicted the pool holding it,
    undoing a connected client's authentication."""
    o, other = tls_origin, origin_factory()
    p = proxyd(workers=1, config={"pool": {"learned_max": 1, "learned_warm": 0}})
    alice = http.client.HTTPConnection("127.0.0.1", p.port, timeout=IO_TIMEOUT)
    for auth in ("NTLM type1", "NTLM type3-alice"):
        alice.request("GET", o.url("/ntlm"), headers={"Authorization": auth})
        alice.getresponse().read()
    r, _ = get(p.port, other.url("/bytes/1"))  # a second learned origin: over the cap of 1
    assert r.status == 200
    alice.request("GET", o.url("/ntlm"))
    r = alice.getresponse()
    assert (r.status, r.read()) == (200, b"hello alice\n"), "the cap evicted alice's pool"
    alice.close()

    q = proxyd(workers=1, config={"pool": {"idle_ttl": 1.0, "learned_warm": 0}})
    bob = http.client.HTTPConnection("127.0.0.1", q.port, timeout=IO_TIMEOUT)
    for auth in ("NTLM type1", "NTLM type3-bob"):
        bob.request("GET", o.url("/ntlm"), headers={"Authorization": auth})
        bob.getresponse().read()
    bob_conn = o.requests[-1].conn_id
    assert o.wait_for(lambda: o.connections[bob_conn].closed, 5), \
        "a private connection idle past idle_ttl was not closed"
    bob.close()


def test_new_upstream_connections_resume_the_tls_session(proxyd, tls_origin):
    """With max_requests = 1 every request needs a new connection; after the first, each
    resumes the TLS session of a connection already open (no certificate exchange)."""
    o = tls_origin
    p = proxyd(workers=1, config={"pool": {"learned_warm": 0, "max_requests": 1}})
    conn = http.client.HTTPConnection("127.0.0.1", p.port, timeout=IO_TIMEOUT)
    for i in range(4):
        conn.request("GET", o.url("/bytes/10"))
        r = conn.getresponse()
        assert r.status == 200 and r.read() == pattern_bytes(10)
    conn.close()
    assert o.handshakes >= 4
    assert o.resumed >= 1, f"{o.handshakes} handshakes, none resumed"


def test_plain_http_origin(proxyd, origin_factory):
    o = origin_factory(tls=False)
    p = proxyd(config={"origin": [{"host": "127.0.0.1", "port": o.port, "tls": False}]})
    r, body = get(p.port, o.url("/bytes/3000", host="127.0.0.1"))
    assert r.status == 200 and body == pattern_bytes(3000)
    raw = bytes(o.connections[o.requests[0].conn_id].raw)
    assert raw.startswith(b"GET /bytes/3000 HTTP/1.1\r\n"), raw[:100]  # plaintext, not TLS


# --------------------------------------------------------------------------------------
# request handling
# --------------------------------------------------------------------------------------


def test_origin_form_request_rejected(proxyd, tls_origin):
    p = proxyd()
    with Raw(p.port) as c:
        c.send(f"GET /x HTTP/1.1\r\nHost: 127.0.0.1:{p.port}\r\n\r\n")
        r = c.response()
    assert r.status == 400, r.raw_head
    assert proxy_status(r)
    assert re.search(rb"forward(ing)?[ -]proxy", r.body, re.I), r.body
    assert not tls_origin.connections


def test_hop_by_hop_headers_removed(proxyd, tls_origin):
    o = tls_origin
    p = proxyd()
    with Raw(p.port) as c:
        c.send(f"GET {o.url('/headers')} HTTP/1.1\r\n"
               "Host: wrong.example:1\r\n"
               "Connection: close, X-Secret\r\n"
               "X-Secret: 1\r\n"
               "Keep-Alive: 5\r\n"
               "Proxy-Connection: keep-alive\r\n"
               "TE: gzip\r\n"
               "Upgrade: foo\r\n"
               "Proxy-Authorization: Basic eA==\r\n"
               "X-End-To-End: kept\r\n"
               "\r\n")
        r = c.response()
        assert r.status == 200, (r.raw_head, r.body)
        assert has_via_proxyd(r.header_all("Via")), r.raw_head
        assert c.at_eof(), "client asked for Connection: close"
    req = o.requests[-1]
    raw = o.raw_bytes_for(req)
    names = req.header_names()
    for gone in ("x-secret", "keep-alive", "proxy-connection", "te", "upgrade",
                 "proxy-authorization"):
        assert gone not in names, (gone, req.raw_head)
    for conn_value in req.header_all("Connection"):
        assert "x-secret" not in conn_value.lower() and "close" not in conn_value.lower()
    assert b"Basic eA==" not in raw and b"wrong.example" not in raw and b"gzip" not in raw
    assert req.raw_head.startswith(b"GET /headers HTTP/1.1\r\n"), req.raw_head
    assert req.header_all("Host") == [o.authority]
    assert req.header("X-End-To-End") == "kept"
    assert has_via_proxyd(req.header_all("Via")), req.raw_head


def test_trailer_named_by_connection_not_forwarded(proxyd, tls_origin):
    """RFC 9110 §7.6.1: the fields a Connection option names are removed, trailer fields
    included."""
    o = tls_origin
    p = proxyd()
    with Raw(p.port) as c:
        c.send(f"POST {o.url('/upload')} HTTP/1.1\r\nHost: {o.authority}\r\n"
               "Connection: X-Hop\r\nTransfer-Encoding: chunked\r\n\r\n"
               "5\r\nhello\r\n0\r\nX-Hop: secret\r\nX-Other: ok\r\n\r\n")
        r = c.response()
    assert r.status == 200, (r.raw_head, r.body)
    assert json.loads(r.body)["trailers"] == [["X-Other", "ok"]]
    assert b"secret" not in o.raw_bytes_for(o.requests[-1])


@pytest.mark.parametrize("method", ["TRACE", "OPTIONS"])
def test_max_forwards_zero_is_answered_by_the_proxy(proxyd, tls_origin, method):
    """RFC 9110 §7.6.2: with Max-Forwards 0 the proxy MUST NOT forward the request and
    answers as its final recipient; the connection stays usable."""
    o = tls_origin
    p = proxyd()
    with Raw(p.port) as c:
        c.send(f"{method} {o.url('/headers')} HTTP/1.1\r\nHost: {o.authority}\r\n"
               "Max-Forwards: 0\r\nCookie: secret=1\r\n\r\n")
        r = c.response(method)
        assert r.status == 200, (r.raw_head, r.body)
        assert proxy_status(r).startswith("proxyd")
        if method == "TRACE":
            assert r.header("Content-Type") == "message/http"
            assert r.body.startswith(f"TRACE {o.url('/headers')} HTTP/1.1\r\n".encode())
            assert b"Max-Forwards: 0" in r.body and b"secret" not in r.body
        else:
            assert r.body == b""
        c.send(f"GET {o.url('/bytes/5')} HTTP/1.1\r\nHost: {o.authority}\r\n\r\n")
        assert c.response().body == pattern_bytes(5)
    assert [r.target for r in o.requests] == ["/bytes/5"]


@pytest.mark.parametrize("max_forwards", ["", "Max-Forwards: 0\r\n"])
def test_options_asterisk_is_answered_by_the_proxy(proxyd, tls_origin, max_forwards):
    """RFC 9110 §9.3.7: OPTIONS * asks about the server it is sent to, so without a
    default_origin proxyd answers it (with Max-Forwards 0 it MUST, §7.6.2); it was a 400
    telling the client to send absolute-form. GET * stays a 400."""
    o = tls_origin
    p = proxyd()
    with Raw(p.port) as c:
        c.send(f"OPTIONS * HTTP/1.1\r\nHost: {o.authority}\r\n{max_forwards}\r\n")
        r = c.response("OPTIONS")
        assert (r.status, r.body) == (200, b""), (r.raw_head, r.body)
        assert "OPTIONS *" in proxy_status(r)
        c.send(f"GET * HTTP/1.1\r\nHost: {o.authority}\r\n\r\n")
        assert c.response().status == 400
    assert not o.requests


def test_max_forwards_is_decremented(proxyd, tls_origin):
    """RFC 9110 §7.6.2: a non-zero Max-Forwards is forwarded one less."""
    o = tls_origin
    p = proxyd()
    with Raw(p.port) as c:
        c.send(f"OPTIONS {o.url('/headers')} HTTP/1.1\r\nHost: {o.authority}\r\n"
               "Max-Forwards: 5\r\n\r\n")
        r = c.response("OPTIONS")
    assert r.status == 200, (r.raw_head, r.body)
    assert o.requests[-1].header_all("Max-Forwards") == ["4"]


@pytest.mark.parametrize("value", ["a b", "u@evil.example", "{authority}, evil.example",
                                   "localhost:abc", 'exa"mple', "[::1"])
def test_invalid_host_field_is_400(proxyd, tls_origin, value):
    """RFC 9112 §3.2: a server MUST answer 400 to a Host field with an invalid value, even
    a proxy that would have replaced it with the target's authority."""
    o = tls_origin
    p = proxyd()
    with Raw(p.port) as c:
        c.send(f"GET {o.url('/headers')} HTTP/1.1\r\n"
               f"Host: {value.format(authority=o.authority)}\r\n\r\n")
        r = c.response()
    assert_proxy_error(r, r.body, 400, "http_request_error")
    assert b"Host" in r.body
    assert not o.requests


def test_pipelined_requests(proxyd, tls_origin):
    o = tls_origin
    p = proxyd()
    with Raw(p.port) as c:
        c.send(f"GET {o.url('/id/pipe1?size=1000')} HTTP/1.1\r\nHost: {o.authority}\r\n\r\n"
               f"GET {o.url('/bytes/70000')} HTTP/1.1\r\nHost: {o.authority}\r\n\r\n"
               f"GET {o.url('/id/pipe3?size=10')} HTTP/1.1\r\nHost: {o.authority}\r\n\r\n")
        r1, r2, r3 = c.response(), c.response(), c.response()
        assert (r1.status, r1.body) == (200, id_body("pipe1", 1000))
        assert (r2.status, r2.body) == (200, pattern_bytes(70000))
        assert (r3.status, r3.body) == (200, id_body("pipe3", 10))
        c.send(f"GET {o.url('/bytes/5')} HTTP/1.1\r\nHost: {o.authority}\r\n\r\n")
        assert c.response().body == pattern_bytes(5)  # still usable afterwards
    assert [r.target for r in o.requests] == ["/id/pipe1?size=1000", "/bytes/70000",
                                              "/id/pipe3?size=10", "/bytes/5"]


def test_head_204_304_have_no_body(proxyd, tls_origin):
    o = tls_origin
    p = proxyd()
    with Raw(p.port) as c:
        def req(method, path):
            c.send(f"{method} {o.url(path)} HTTP/1.1\r\nHost: {o.authority}\r\n\r\n")
            return c.response(method)

        r = req("HEAD", "/bytes/1000")
        assert r.status == 200 and r.body == b""
        assert r.header("Content-Length") == "1000", r.raw_head
        r = req("HEAD", "/chunked/1000")
        assert r.status == 200 and r.body == b""
        r = req("GET", "/status/204")
        assert r.status == 204 and r.body == b""
        assert not r.header_all("Transfer-Encoding"), r.raw_head
        r = req("GET", "/status/304")
        assert r.status == 304 and r.body == b""
        assert r.header("ETag") == '"v1"'
        # any stray body byte from above would corrupt this response
        r = req("GET", "/bytes/10")
        assert r.status == 200 and r.body == pattern_bytes(10)


def test_chunked_response_to_http11_client(proxyd, tls_origin):
    o = tls_origin
    p = proxyd()
    with Raw(p.port) as c:
        for path, n in (("/chunked/300000?chunk=1000", 300000),
                        ("/chunked/5000?trailers=1", 5000), ("/chunked/0", 0)):
            c.send(f"GET {o.url(path)} HTTP/1.1\r\nHost: {o.authority}\r\n\r\n")
            r = c.response()
            assert r.status == 200
            assert r.framing in ("chunked", "length"), r.raw_head
            assert r.body == pattern_bytes(n)
    conn = http.client.HTTPConnection("127.0.0.1", p.port, timeout=IO_TIMEOUT)
    conn.request("GET", o.url("/chunked/123457?chunk=7000"))
    assert conn.getresponse().read() == pattern_bytes(123457)
    conn.close()


def test_close_delimited_response_to_http11_client(proxyd, tls_origin):
    o = tls_origin
    p = proxyd()
    with Raw(p.port) as c:
        c.send(f"GET {o.url('/close/200000')} HTTP/1.1\r\nHost: {o.authority}\r\n\r\n")
        r = c.response()
        assert r.status == 200
        assert r.framing == "chunked", r.raw_head
        assert r.body == pattern_bytes(200000)
        if not r.has_token("Connection", "close"):
            c.send(f"GET {o.url('/bytes/100')} HTTP/1.1\r\nHost: {o.authority}\r\n\r\n")
            assert c.response().body == pattern_bytes(100)


@pytest.mark.parametrize("path,n", [("/close/50000", 50000), ("/chunked/50000", 50000),
                                    ("/bytes/50000", 50000)])
def test_http10_client_never_gets_chunked(proxyd, tls_origin, path, n):
    o = tls_origin
    p = proxyd()
    with Raw(p.port) as c:
        c.send(f"GET {o.url(path)} HTTP/1.0\r\n\r\n")
        r = c.response()
        assert r.status == 200
        assert not r.header_all("Transfer-Encoding"), r.raw_head
        assert r.framing in ("close", "length")
        assert r.body == pattern_bytes(n)
        assert c.at_eof(), "HTTP/1.0 client without keep-alive: proxyd must close"
        # RFC 9110 §7.6.3: Via names the protocol of the message received, the origin's
        # HTTP/1.1 response, not the client's version.
        assert r.header_all("Via") == ["1.1 proxyd"], r.raw_head


def test_body_cut_short_ends_in_a_reset_for_a_close_delimited_client(proxyd, tls_origin):
    """An HTTP/1.0 client gets a close-delimited body, whose only end is the connection's:
    when the origin's body breaks off, proxyd resets the connection, so the client sees an
    error rather than a complete-looking response (an HTTP/1.1 client sees a missing last
    chunk instead)."""
    p = proxyd()
    with socket.create_connection(("127.0.0.1", p.port), timeout=IO_TIMEOUT) as s:
        s.sendall(f"GET {tls_origin.url('/cut/3000')} HTTP/1.0\r\n\r\n".encode())
        data = b""
        with pytest.raises(ConnectionResetError):
            while chunk := s.recv(65536):
                data += chunk
    assert data.startswith(b"HTTP/1.1 200"), data[:200]
    assert b"Transfer-Encoding" not in data.partition(b"\r\n\r\n")[0]
    assert p.wait_for_log(r"status=200.*error=http_response_incomplete"), p.stderr_text()[-2000:]


def test_expect_100_continue(proxyd, tls_origin):
    o = tls_origin
    p = proxyd()
    n = 200_000
    with Raw(p.port, timeout=5) as c:
        c.send(f"POST {o.url('/upload')} HTTP/1.1\r\nHost: {o.authority}\r\n"
               f"Content-Length: {n}\r\nExpect: 100-continue\r\n\r\n")
        interim = c.response(return_interim=True)  # socket timeout: 5 s
        assert interim.status == 100, interim.raw_head
        c.send(pattern_bytes(n))
        r = c.response()
    assert r.status == 200, (r.raw_head, r.body)
    d = json.loads(r.body)
    assert d["bytes"] == n and d["sha256"] == pattern_sha256(n)


def test_expect_named_by_connection_is_answered_by_proxyd(proxyd, tls_origin):
    """Connection: Expect makes the expectation this hop's (RFC 9110 §7.6.1): proxyd does not
    forward it, so it sends the 100 itself (nginx and HAProxy do), or the client waits for
    one that never comes and is blamed with a 408."""
    o = tls_origin
    p = proxyd()
    with Raw(p.port, timeout=5) as c:
        c.send(f"POST {o.url('/upload')} HTTP/1.1\r\nHost: {o.authority}\r\n"
               "Connection: Expect\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
        interim = c.response(return_interim=True)
        assert interim.status == 100, interim.raw_head
        c.send(b"hello")
        r = c.response()
    assert r.status == 200 and json.loads(r.body)["bytes"] == 5, (r.raw_head, r.body)
    assert "expect" not in o.requests[-1].header_names()


def test_expect_named_by_connection_gets_no_100_when_the_request_is_refused(proxyd, tls_origin):
    """Found by review: the 100 went out before routing and policy, so a refused client was
    invited to upload a body that would be thrown away."""
    p = proxyd(config={"destinations": {"deny_hosts": ["denied.test"]}})
    with Raw(p.port, timeout=5) as c:
        c.send("POST http://denied.test/up HTTP/1.1\r\nHost: denied.test\r\n"
               "Connection: Expect\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
        r = c.response(return_interim=True)
    assert r.status == 403, r.raw_head


@pytest.mark.parametrize("expect", ["", ",", " , "])
def test_an_empty_expect_field_expects_nothing(proxyd, tls_origin, expect):
    """RFC 9110 §5.6.1.2: empty list elements are ignored, so an empty Expect is no
    unsupported expectation (it was a 417; nginx and HAProxy forward the request)."""
    o = tls_origin
    p = proxyd()
    with Raw(p.port, timeout=5) as c:
        c.send(f"POST {o.url('/upload')} HTTP/1.1\r\nHost: {o.authority}\r\n"
               f"Expect:{expect}\r\nContent-Length: 5\r\n\r\nhello")
        r = c.response()
    assert r.status == 200 and json.loads(r.body)["bytes"] == 5, (r.raw_head, r.body)


def test_connect_with_an_invalid_host_field_is_a_400(proxyd, echo_server):
    """RFC 9112 §3.2: any request with an invalid Host value gets a 400 — CONNECT too (it
    got a tunnel; nginx and HAProxy answer 400)."""
    p = proxyd(config={"connect_ports": [echo_server.port]})
    for host in ("a b", "u@x"):
        with Raw(p.port, timeout=5) as c:
            c.send(f"CONNECT 127.0.0.1:{echo_server.port} HTTP/1.1\r\nHost: {host}\r\n\r\n")
            r = c.response(method="CONNECT")
        assert r.status == 400 and b"invalid Host" in r.body, (r.raw_head, r.body)


def test_chunked_upload_with_trailers(proxyd, tls_origin):
    o = tls_origin
    p = proxyd()
    data = pattern_bytes(777_777)
    sizes = [1, 15, 16, 4096, 65536, 100_000, 300_000]
    with Raw(p.port) as c:
        c.send(f"POST {o.url('/upload')} HTTP/1.1\r\nHost: {o.authority}\r\n"
               "Transfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n")
        pos = 0
        for i, s in enumerate(sizes * 3):
            piece = data[pos:pos + s]
            if not piece:
                break
            ext = ";name=value" if i == 2 else ""
            c.send(b"%x%s\r\n" % (len(piece), ext.encode()) + piece + b"\r\n")
            pos += len(piece)
        assert pos == len(data)
        c.send(b"0\r\nX-Checksum: " + hashlib.sha256(data).hexdigest().encode() + b"\r\n\r\n")
        r = c.response()
        assert r.status == 200, (r.raw_head, r.body)
        d = json.loads(r.body)
        assert d["bytes"] == len(data) and d["sha256"] == hashlib.sha256(data).hexdigest()
        # the connection is still in sync after the trailer section
        c.send(f"GET {o.url('/bytes/7')} HTTP/1.1\r\nHost: {o.authority}\r\n\r\n")
        assert c.response().body == pattern_bytes(7)


def test_limits_reject_oversized_heads(proxyd, tls_origin):
    o = tls_origin
    p = proxyd()
    with Raw(p.port) as c:
        c.send(f"GET {o.url('/bytes/1?' + 'a' * 10000)} HTTP/1.1\r\n"
               f"Host: {o.authority}\r\n\r\n")
        r = c.response()
        assert 400 <= r.status < 500, r.raw_head
    with Raw(p.port) as c:
        fields = "".join(f"X-F{i}: {i}\r\n" for i in range(150))
        c.send(f"GET {o.url('/bytes/1')} HTTP/1.1\r\nHost: {o.authority}\r\n{fields}\r\n")
        r = c.response()
        assert 400 <= r.status < 500, r.raw_head
    assert not o.requests


# --------------------------------------------------------------------------------------
# upstream failures -> Proxy-Status
# --------------------------------------------------------------------------------------


def test_dns_error(proxyd):
    p = proxyd()
    r, body = get(p.port, "http://nonexistent.invalid/")
    assert_proxy_error(r, body, 502, "dns_error")


def test_connection_refused(proxyd):
    """An unreachable origin is answered 502 at once, not after a timeout."""
    p = proxyd()
    port = free_port_closed()
    t0 = time.monotonic()
    r, body = get(p.port, f"http://127.0.0.1:{port}/bytes/1")
    assert time.monotonic() - t0 < 1.0
    assert_proxy_error(r, body, 502, "connection_refused")
    # the request was read whole: the client connection stays usable (as with nginx)
    with Raw(p.port) as c:
        for _ in range(2):
            c.send(f"GET http://127.0.0.1:{port}/x HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n")
            r = c.response()
            assert r.status == 502 and r.header("Connection") == "keep-alive", r.raw_head


def test_tls_handshake_timeout(proxyd):
    """An origin that accepts TCP but never answers the ClientHello: 504 within the timeout."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # the kernel completes the TCP handshake; nobody speaks TLS
    port = silent.getsockname()[1]
    try:
        p = proxyd(config={"timeouts": {"tls_handshake": 1.0}, "pool": {"learned_warm": 0}})
        t0 = time.monotonic()
        r, body = get(p.port, f"http://127.0.0.1:{port}/x")
        took = time.monotonic() - t0
    finally:
        silent.close()
    assert_proxy_error(r, body, 504, "connection_timeout")
    assert b"handshake" in body, body
    assert took < 3.0, took


def test_untrusted_certificate(proxyd, origin_factory):
    o = origin_factory(ca=make_ca())  # signed by a CA proxyd was not told about
    p = proxyd()
    r, body = get(p.port, o.url("/bytes/10"))
    assert_proxy_error(r, body, 502, "tls_certificate_error")
    assert o.wait_for(lambda: o.handshake_failures >= 1, 5)
    assert o.handshakes == 0 and o.total_app_bytes() == 0 and not o.requests


def test_interim_responses_restart_the_response_head_timeout(proxyd, tls_origin):
    """102 Processing exists to show a long request is alive: each interim response starts
    the wait for the final one again (nginx's proxy_read_timeout and HAProxy's timeout server
    measure silence too). Found by a QA sweep: 504 after response_head in total."""
    o = tls_origin
    p = proxyd(origins=[o.authority], warm=1, config={"timeouts": {"response_head": 1.0}})
    t0 = time.monotonic()
    c = Raw(p.port)
    c.send(f"GET {o.url('/processing/5/0.4')} HTTP/1.1\r\nHost: {o.authority}\r\n\r\n")
    r = c.response()  # 2.4 s in all, never 1 s silent
    c.close()
    assert (r.status, r.body, len(r.interim)) == (200, b"done\n", 5), (r.status, r.body)
    assert time.monotonic() - t0 >= 2.0
    r, body = get(p.port, o.url("/slow-head/2.5"))  # silence still times out
    assert_proxy_error(r, body, 504, "http_response_timeout")


def test_wrong_host_certificate(proxyd, origin_factory):
    o = origin_factory(identities=("localhost",))  # trusted CA, but not valid for 127.0.0.1
    p = proxyd()
    r, body = get(p.port, o.url("/bytes/10", host="127.0.0.1"))
    assert_proxy_error(r, body, 502, "tls_certificate_error")
    assert o.total_app_bytes() == 0 and not o.requests


def test_garbage_response(proxyd, tls_origin):
    p = proxyd()
    r, body = get(p.port, tls_origin.url("/garbage"))
    assert_proxy_error(r, body, 502, "http_protocol_error")
    assert tls_origin.requests[0].path == "/garbage"
    # the operator learns why too, not only the client
    line = p.wait_for_log(r"level=warning.*failed a request: invalid response from origin")
    assert line and "error=http_protocol_error" in line, p.stderr_text()[-2000:]


def test_invalid_chunk_in_the_read_of_the_head_is_a_clean_502(proxyd, tls_origin):
    """The head is still held when the first chunks turn out invalid (HAProxy answers 502
    there too): the client gets an error it can act on, not a 200 cut short."""
    p = proxyd()
    r, body = get(p.port, tls_origin.url("/bad-chunk"))
    assert_proxy_error(r, body, 502, "http_protocol_error")
    assert p.wait_for_log(r"status=502 .*error=http_protocol_error"), p.stderr_text()[-2000:]


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_origin_closes_after_request(proxyd, tls_origin, method):
    p = proxyd()
    r, body = get(p.port, tls_origin.url("/hangup"), method=method,
                  body=b"x" * 10 if method == "POST" else None)
    assert_proxy_error(r, body, 502, "http_response_incomplete")
    assert tls_origin.requests and tls_origin.requests[0].path == "/hangup"
    if method == "POST":
        assert len(tls_origin.requests) == 1, "non-idempotent request must not be retried"


def test_response_head_timeout(proxyd, tls_origin):
    p = proxyd(config={"timeouts": {"response_head": 1.0}})
    t0 = time.monotonic()
    r, body = get(p.port, tls_origin.url("/slow-head/5"))
    elapsed = time.monotonic() - t0
    assert_proxy_error(r, body, 504, "http_response_timeout")  # RFC 9209 §2.3.26
    assert elapsed < 3.0, f"504 after {elapsed:.2f}s, response_head = 1"


def test_pool_exhausted(proxyd, tls_origin):
    o = tls_origin
    p = proxyd(workers=1, config={
        "timeouts": {"pool_wait": 0.5},
        "origin": [{"host": "localhost", "port": o.port, "tls": True, "warm": 0,
                    "max_connections": 1}],
    })
    held = {}

    def slow():
        held["resp"] = get(p.port, o.url("/slow-head/3"))

    t = threading.Thread(target=slow)
    t.start()
    try:
        assert o.wait_request(lambda r: r.path == "/slow-head/3", timeout=5), p.stderr_text()
        t0 = time.monotonic()
        r, body = get(p.port, o.url("/bytes/10"))
        elapsed = time.monotonic() - t0
        assert_proxy_error(r, body, 503, "connection_limit_reached")
        assert elapsed < 2.5, elapsed
    finally:
        t.join(IO_TIMEOUT)
    r, body = held["resp"]
    assert (r.status, body) == (200, b"slow\n")
    assert len(o.connections) == 1


# --------------------------------------------------------------------------------------
# load, large transfers, upstream idle closes
# --------------------------------------------------------------------------------------


def test_mixed_load_with_aborts(proxyd, tls_origin):
    o = tls_origin
    p = proxyd(workers=2)
    workers_before = sorted(p.worker_pids())
    THREADS, PER, MAX = 64, 100, 256 * 1024
    lock = threading.Lock()
    stats = {"completed": 0, "aborted": 0, "after_abort_ok": 0}
    mismatches, errors = [], []

    def client(t: int):
        rng = random.Random(1000 + t)
        conn = None
        just_aborted = False
        for i in range(PER):
            rid = f"t{t}-{i}-{rng.randrange(1 << 32):08x}"
            size = rng.randrange(0, MAX + 1)
            abort = size >= 2048 and rng.random() < 0.10
            expected = id_body(rid, size)
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", p.port, timeout=30)
            try:
                conn.request("GET", f"http://{o.authority}/id/{rid}?size={size}")
                r = conn.getresponse()
                if abort:
                    part = r.read(rng.randrange(1, size // 2))
                    if r.status != 200 or part != expected[:len(part)]:
                        with lock:
                            mismatches.append((rid, size, r.status, "abort-prefix"))
                    conn.close()  # mid-body: unread data -> RST
                    conn = None
                    just_aborted = True
                    with lock:
                        stats["aborted"] += 1
                    continue
                body = r.read()
                ok = r.status == 200 and body == expected and r.getheader("X-Rid") == rid
                with lock:
                    if ok:
                        stats["completed"] += 1
                        stats["after_abort_ok"] += just_aborted
                    else:
                        mismatches.append((rid, size, r.status, len(body), body[:40]))
                just_aborted = False
                if r.will_close:
                    conn.close()
                    conn = None
            except Exception as e:  # noqa: BLE001
                with lock:
                    errors.append((rid, size, abort, repr(e)))
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()

    t0 = time.monotonic()
    threads = [threading.Thread(target=client, args=(t,)) for t in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    elapsed = time.monotonic() - t0
    print(f"mixed load: {elapsed:.1f}s {stats} errors={len(errors)} "
          f"origin conns={len(o.connections)} handshakes={o.handshakes}")
    assert not any(t.is_alive() for t in threads), "client threads hung"
    assert not mismatches, mismatches[:5]
    assert not errors, errors[:5]
    assert stats["completed"] + stats["aborted"] == THREADS * PER
    assert stats["aborted"] > 0 and stats["after_abort_ok"] > 0
    assert sorted(p.worker_pids()) == workers_before, "a worker died/restarted"
    r, body = get(p.port, o.url("/id/final?size=1000"))
    assert body == id_body("final", 1000)
    assert elapsed < 90, f"mixed load took {elapsed:.1f}s"


class RssSampler:
    """Samples proxyd's RSS (master + workers) every `interval` s on a thread."""

    def __init__(self, p, interval=0.05):
        self.p = p
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.p.rss_kib())
            self.samples += 1

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def _warm_up(p, o):
    # allocate whatever a few requests allocate before taking the baseline
    for _ in range(3):
        r, body = get(p.port, o.url(f"/stream/{4 * MiB}"))
        assert len(body) == 4 * MiB
        r, body = get(p.port, o.url("/upload"), method="POST", body=pattern_bytes(4 * MiB))
        assert json.loads(body)["bytes"] == 4 * MiB


def test_download_1gib_constant_memory(proxyd, tls_origin):
    o = tls_origin
    p = proxyd(workers=1)
    _warm_up(p, o)
    base = p.rss_kib()
    conn = http.client.HTTPConnection("127.0.0.1", p.port, timeout=30)
    h = hashlib.sha256()
    n = 0
    buf = bytearray(MiB)
    t0 = time.monotonic()
    with RssSampler(p) as s:
        conn.request("GET", o.url(f"/stream/{GiB}"))
        r = conn.getresponse()
        assert r.status == 200
        mv = memoryview(buf)
        while True:
            k = r.readinto(mv)
            if not k:
                break
            h.update(mv[:k])
            n += k
    elapsed = time.monotonic() - t0
    conn.close()
    growth = (s.peak - base) / 1024
    print(f"1 GiB download: {elapsed:.1f}s ({GiB / MiB / elapsed:.0f} MiB/s), RSS base "
          f"{base / 1024:.1f} MiB, peak {s.peak / 1024:.1f} MiB, {s.samples} samples")
    assert n == GiB
    assert h.hexdigest() == pattern_sha256(GiB)
    assert s.samples > 0
    assert growth < 50, f"proxyd RSS grew {growth:.1f} MiB during a 1 GiB download"
    assert elapsed < 60


def test_upload_1gib_constant_memory(proxyd, tls_origin):
    o = tls_origin
    p = proxyd(workers=1)
    _warm_up(p, o)
    base = p.rss_kib()
    conn = http.client.HTTPConnection("127.0.0.1", p.port, timeout=30)
    t0 = time.monotonic()
    with RssSampler(p) as s:
        conn.request("POST", o.url("/upload"), body=pattern_chunks(GiB, MiB),
                     headers={"Content-Length": str(GiB),
                              "Content-Type": "application/octet-stream"})
        r = conn.getresponse()
        body = r.read()
    elapsed = time.monotonic() - t0
    conn.close()
    growth = (s.peak - base) / 1024
    print(f"1 GiB upload: {elapsed:.1f}s ({GiB / MiB / elapsed:.0f} MiB/s), RSS base "
          f"{base / 1024:.1f} MiB, peak {s.peak / 1024:.1f} MiB, {s.samples} samples")
    assert r.status == 200, body[:300]
    d = json.loads(body)
    assert d["bytes"] == GiB and d["sha256"] == pattern_sha256(GiB)
    assert s.samples > 0
    assert growth < 50, f"proxyd RSS grew {growth:.1f} MiB during a 1 GiB upload"
    assert elapsed < 60


def test_origin_closing_idle_connections(proxyd, origin_factory):
    o = origin_factory(idle_close_after=0.5)
    p = proxyd(origins=[o.authority], warm=2, workers=1)
    assert o.wait_handshakes(2, timeout=5)
    assert o.wait_idle_closes(2, timeout=5), [c.close_reason for c in o.connections]
    results = []
    for batch in range(2):
        for i in range(10):
            rid = f"idle{batch}-{i}"
            r, body = get(p.port, o.url(f"/id/{rid}?size=2000"))
            results.append((r.status, body == id_body(rid, 2000),
                            r.getheader("Proxy-Status")))
        # start the second batch right after the origin has closed more idle connections
        if batch == 0:
            assert o.wait_idle_closes(o.idle_closes + 1, timeout=5)
    assert results == [(200, True, None)] * 20, results


# --------------------------------------------------------------------------------------
# CLI: check, --version, signals
# --------------------------------------------------------------------------------------


def test_check_unknown_key(tmp_path):
    cfg = tmp_path / "bad-unknown.toml"
    cfg.write_text('listen = "127.0.0.1:3128"\n\n[pool]\nwram = 3\n')
    r = run_proxyd("check", "--config", str(cfg))
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "pool.wram" in r.stderr, r.stderr
    assert cfg.name in r.stderr, r.stderr


def test_check_wrong_type(tmp_path):
    cfg = tmp_path / "bad-type.toml"
    cfg.write_text('workers = "two"\n')
    r = run_proxyd("check", "--config", str(cfg))
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert re.search(r"\bworkers\b", r.stderr), r.stderr
    assert cfg.name in r.stderr, r.stderr


def test_check_good_config_prints_effective_config(tmp_path):
    cfg = tmp_path / "good.toml"
    cfg.write_text('listen = "127.0.0.1:3999"\nworkers = 3\nconnect_ports = [443, 8443]\n'
                   '[timeouts]\nconnect = 2.5\n[pool]\nwarm = 2\n'
                   '[[origin]]\nhost = "example.com"\nport = 8443\nwarm = 4\n')
    r = run_proxyd("check", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    eff = tomllib.loads(r.stdout)
    assert eff["listen"] == "127.0.0.1:3999"
    assert eff["workers"] == 3
    assert eff["connect_ports"] == [443, 8443]
    assert eff["timeouts"]["connect"] == 2.5
    assert eff["timeouts"]["pool_wait"] == 5.0  # default filled in
    assert eff["limits"]["header_count"] == 100
    assert eff["pool"]["warm"] == 2
    [origin] = eff["origin"]
    assert (origin["host"], origin["port"], origin["warm"]) == ("example.com", 8443, 4)


def test_version():
    r = run_proxyd("--version")
    assert r.returncode == 0, r.stderr
    out = r.stdout + r.stderr
    assert re.search(r"\b\d+\.\d+\.\d+\b", out), out
    print(out.strip())


def test_sigterm_exits_zero_and_workers_exit(proxyd):
    p = proxyd(workers=2)
    workers = p.worker_pids()
    assert len(workers) == 2
    t0 = time.monotonic()
    rc = p.terminate(timeout=5)
    assert rc == 0, (rc, p.stderr_text())
    for pid in workers:
        assert wait_pid_gone(pid, 5), f"worker {pid} still running after master exit"
    print(f"SIGTERM -> exit in {time.monotonic() - t0:.2f}s")


@pytest.mark.parametrize("state", ["after_closed_tunnel", "idle_keepalive_client"])
def test_sigterm_is_prompt_after_traffic(proxyd, tls_origin, echo_server, state):
    p = proxyd(workers=1, config={"connect_ports": [443, echo_server.port]})
    c = Raw(p.port)
    if state == "after_closed_tunnel":
        c.send(f"CONNECT 127.0.0.1:{echo_server.port} HTTP/1.1\r\n"
               f"Host: 127.0.0.1:{echo_server.port}\r\n\r\n")
        assert read_response_head(c.f).status == 200
        c.send(b"ping")
        assert c.f.read(4) == b"ping"
        c.sock.shutdown(socket.SHUT_WR)
        assert c.f.read() == b""
        c.close()
    else:  # a keep-alive client connection left open and idle
        c.send(f"GET {tls_origin.url('/bytes/10')} HTTP/1.1\r\n"
               f"Host: {tls_origin.authority}\r\n\r\n")
        assert c.response().body == pattern_bytes(10)
    workers = p.worker_pids()
    t0 = time.monotonic()
    rc = p.terminate(timeout=5)
    elapsed = time.monotonic() - t0
    c.close()
    assert rc == 0, (rc, p.stderr_text()[-2000:])
    for pid in workers:
        assert wait_pid_gone(pid, 5)
    print(f"SIGTERM -> exit in {elapsed:.2f}s")


def test_client_connection_limit_queues_in_the_backlog(proxyd, tls_origin):
    """limits.client_connections per worker: further clients wait, they are not refused."""
    p = proxyd(workers=1, config={"limits": {"client_connections": 2}})
    held = [socket.create_connection(("127.0.0.1", p.port), timeout=IO_TIMEOUT) for _ in range(2)]
    try:
        for s in held:  # make sure both are accepted and served
            s.sendall(f"GET {tls_origin.url('/bytes/1')} HTTP/1.1\r\nHost: {tls_origin.authority}\r\n\r\n".encode())
            assert s.recv(65536).startswith(b"HTTP/1.1 200")
        third = socket.create_connection(("127.0.0.1", p.port), timeout=IO_TIMEOUT)
        third.sendall(f"GET {tls_origin.url('/bytes/3')} HTTP/1.1\r\nHost: {tls_origin.authority}\r\n"
                      "Connection: close\r\n\r\n".encode())
        third.settimeout(0.5)
        with pytest.raises(socket.timeout):
            third.recv(100)  # queued: the worker is at its limit
        held.pop().close()
        third.settimeout(IO_TIMEOUT)
        data = b""
        while chunk := third.recv(65536):
            data += chunk
        assert data.startswith(b"HTTP/1.1 200") and data.endswith(pattern_bytes(3))
        third.close()
    finally:
        for s in held:
            s.close()


def test_link_local_destinations_denied_by_default(proxyd):
    """Cloud metadata lives on link-local addresses: 403 before any connection attempt."""
    p = proxyd()
    r, body = get(p.port, "http://169.254.169.254/latest/meta-data/")
    assert_proxy_error(r, body, 403, "destination_ip_prohibited")
    with Raw(p.port) as c:  # CONNECT is judged the same way
        c.send("CONNECT 169.254.169.254:443 HTTP/1.1\r\nHost: 169.254.169.254:443\r\n\r\n")
        assert c.response().status == 403


def test_denied_network_checked_on_the_resolved_address(proxyd, tls_origin):
    """A name that resolves into a denied network is denied too (localhost -> 127.0.0.1)."""
    p = proxyd(config={"destinations": {"deny_networks": ["127.0.0.0/8", "::1/128"]}})
    r, body = get(p.port, tls_origin.url("/bytes/1"))
    assert_proxy_error(r, body, 403, "destination_ip_prohibited")
    assert not tls_origin.connections


@pytest.mark.parametrize("host", ["0.0.0.0", "0", "[::]", "0.1.2.3"])
def test_unspecified_address_is_never_a_destination(proxyd, tls_origin, echo_server, host):
    """Linux connects 0.0.0.0 and :: to the local host, past rules written for 127.0.0.0/8
    and past the own-listener loop check: 403, for requests and tunnels alike."""
    p = proxyd(config={"destinations": {"deny_networks": ["127.0.0.0/8", "::1/128"]},
                       "connect_ports": [echo_server.port]})
    r, body = get(p.port, f"http://{host}:{tls_origin.port}/bytes/1")
    assert_proxy_error(r, body, 403, "destination_ip_prohibited")
    with Raw(p.port) as c:
        c.send(f"CONNECT {host}:{echo_server.port} HTTP/1.1\r\n"
               f"Host: {host}:{echo_server.port}\r\n\r\n")
        assert c.response().status == 403
    assert not tls_origin.connections and echo_server.accepted == 0


def test_request_to_own_listener_is_a_loop(proxyd):
    p = proxyd(config={"origin": [{"host": "127.0.0.1", "port": 9, "tls": False}]})
    r, body = get(p.port, f"http://127.0.0.1:{p.port}/x")
    assert r.status in (508, 400), r.status  # Via or the own-address check stops it
    assert proxy_status(r.headers)


def test_rejected_request_is_answered_before_a_clean_close_while_the_client_still_sends(proxyd):
    """A client still sending when proxyd refuses its request (here a malformed head followed
    by a stream of bytes) gets the 400 and then a clean FIN, not a reset: proxyd closes with
    a lingering close (shut its side, drop the client's bytes until it closes)."""
    p = proxyd(workers=1)
    s = socket.create_connection(("127.0.0.1", p.port), timeout=IO_TIMEOUT)
    stop = threading.Event()

    def keep_sending() -> None:
        chunk = b"x" * 65536
        try:
            while not stop.is_set():
                s.sendall(chunk)
        except OSError:
            pass

    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    # More than proxyd reads at once, so bytes are still unread when it refuses the request.
    s.sendall(b"GET http://localhost:1/ HTTP/1.1\r\nHost: localhost:1\r\nBad Header: x\r\n\r\n"
              + b"x" * (1 << 20))
    sender = threading.Thread(target=keep_sending, daemon=True)
    sender.start()
    data = b""
    ending = "timeout"
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                ending = "eof"
                break
            data += chunk
    except ConnectionResetError:
        ending = "reset"
    except socket.timeout:
        pass
    finally:
        stop.set()
        s.close()
        sender.join(IO_TIMEOUT)
    assert data.startswith(b"HTTP/1.1 400 "), data[:100]
    assert b"Proxy-Status: proxyd; error=http_request_error" in data
    assert ending == "eof"


def _ask_for_client_certificates(o, ca, required: bool) -> None:
    """Make a running test origin ask for a client certificate issued by ``ca``."""
    o.ssl_context.load_verify_locations(cadata=ca.cert_pem.bytes().decode())
    o.ssl_context.verify_mode = ssl.CERT_REQUIRED if required else ssl.CERT_OPTIONAL


def _client_subject_names(rec) -> list[str]:
    return [name for kind, name in (rec.client_cert or {}).get("subjectAltName", ())]


def test_an_origin_requiring_a_client_certificate_gets_the_configured_one(
        proxyd, origin_factory, ca, tmp_path):
    """origin[i].cert_file (nginx's proxy_ssl_certificate, HAProxy's crt on a server): the
    configured origin gets the certificate; another origin that merely asks gets none."""
    mtls, other = origin_factory(), origin_factory()
    _ask_for_client_certificates(mtls, ca, required=True)
    _ask_for_client_certificates(other, ca, required=False)
    both = tmp_path / "client.pem"
    ca.issue_cert("proxyd-client.test").private_key_and_cert_chain_pem.write_to_path(str(both))
    p = proxyd(config={"origin": [{"host": "localhost", "port": mtls.port, "warm": 1,
                                   "cert_file": str(both)}]})
    assert mtls.wait_handshakes(1), p.stderr_text()[-2000:]
    r, body = get(p.port, mtls.url("/bytes/7", host="localhost"))
    assert (r.status, body) == (200, pattern_bytes(7))
    assert all(_client_subject_names(c) == ["proxyd-client.test"]
               for c in mtls.connections if c.handshake_ok)
    r, body = get(p.port, other.url("/bytes/7", host="localhost"))
    assert (r.status, body) == (200, pattern_bytes(7))
    assert other.connections and all(c.client_cert is None for c in other.connections)
