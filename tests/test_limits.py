"""Slow and idle clients cannot starve the proxy: limits and timeouts under load."""

from __future__ import annotations

import resource
import select
import socket
import time

import pytest

from origin import pattern_bytes

IO_TIMEOUT = 10.0


@pytest.fixture
def many_fds():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4096 if hard == resource.RLIM_INFINITY else min(4096, hard)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 2600:
        pytest.skip("needs about 2,600 open files for 1,000 slow clients")
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _get(port: int, url: str, authority: str) -> tuple[float, bytes]:
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as s:
        s.sendall(f"GET {url} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return time.monotonic() - t0, data


def test_slowloris_clients_do_not_starve_a_normal_client(proxyd, tls_origin, many_fds):
    """1,000 clients trickling a request head; a normal client is still served at once, and
    the slow ones are answered 408 and closed when timeouts.client_head expires."""
    p = proxyd(workers=1, origins=[tls_origin.authority], warm=1,
               config={"timeouts": {"client_head": 2.0}})
    slow = []
    try:
        for _ in range(1000):
            s = socket.create_connection(("127.0.0.1", p.port), timeout=IO_TIMEOUT)
            s.sendall(b"GET http://")  # a head that never completes
            slow.append(s)
        took, data = _get(p.port, tls_origin.url("/bytes/100"), tls_origin.authority)
        print(f"\nnormal request beside 1,000 slowloris connections: {took * 1000:.1f} ms")
        assert data.startswith(b"HTTP/1.1 200") and data.endswith(pattern_bytes(100))
        assert took < 1.0
        # each slow client gets 408 once client_head passes, then the connection closes
        deadline = time.monotonic() + 10
        answered = 0
        for s in slow[:50]:
            s.settimeout(max(0.1, deadline - time.monotonic()))
            reply = s.recv(100)
            answered += reply.startswith(b"HTTP/1.1 408")
        assert answered == 50
    finally:
        for s in slow:
            s.close()
    assert not tls_origin.requests[1:], "no slow request reached the origin"


def test_idle_keepalive_client_is_closed_after_client_idle(proxyd, tls_origin):
    p = proxyd(workers=1, config={"timeouts": {"client_idle": 1.0}})
    with socket.create_connection(("127.0.0.1", p.port), timeout=IO_TIMEOUT) as s:
        s.sendall(f"GET {tls_origin.url('/bytes/5')} HTTP/1.1\r\n"
                  f"Host: {tls_origin.authority}\r\n\r\n".encode())
        data = b""
        while not data.endswith(pattern_bytes(5)):
            data += s.recv(65536)
        t0 = time.monotonic()
        assert s.recv(100) == b""  # closed by proxyd, silently, after client_idle
        took = time.monotonic() - t0
    assert 0.8 < took < 3.0, took


def test_body_idle_timeout_cuts_a_stalled_response(proxyd, tls_origin):
    """The origin sends a head, then nothing for 3 s: with body_idle = 1 s the client sees
    the connection close before the announced length (an incomplete response)."""
    p = proxyd(workers=1, config={"timeouts": {"body_idle": 1.0}})
    took, data = _get(p.port, tls_origin.url("/slow-body/6?size=1000&steps=2"),
                      tls_origin.authority)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: 1000" in head
    assert len(body) < 1000, "a stalled body must not look complete"
    assert took < 3.0, took
    # RFC 9209 §2.3.10: the access log names it a read timeout (not a connect timeout)
    assert p.wait_for_log(r"error=connection_read_timeout"), p.stderr_text()[-2000:]


def test_origin_that_stops_reading_the_upload_gets_504_not_408(proxyd, tls_origin):
    """The origin takes the head and then reads nothing for seconds: proxyd stops reading
    the client (backpressure), and when body_idle passes it answers 504
    connection_write_timeout, as nginx's proxy_send_timeout does; a 408 would blame a
    client that had megabytes more to send."""
    p = proxyd(workers=1, config={"timeouts": {"body_idle": 1.0, "response_head": 30.0}})
    size = 256 << 20  # more than every socket buffer on the way can hold
    with socket.create_connection(("127.0.0.1", p.port), timeout=IO_TIMEOUT) as s:
        s.sendall(f"PUT {tls_origin.url('/stall-read/4')} HTTP/1.1\r\n"
                  f"Host: {tls_origin.authority}\r\nContent-Length: {size}\r\n\r\n".encode())
        piece = b"u" * 65536
        sent = 0
        s.setblocking(False)
        data = b""
        t0 = time.monotonic()
        while b"\r\n\r\n" not in data and time.monotonic() - t0 < IO_TIMEOUT:
            readable, writable, _ = select.select([s], [s] if sent < size else [], [], 1.0)
            if writable:
                try:
                    sent += s.send(piece)
                except BlockingIOError:
                    pass
            if readable:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
    assert data.startswith(b"HTTP/1.1 504"), data[:300]
    assert b"error=connection_write_timeout" in data
    assert sent < size, "the client was never held back"
    assert p.wait_for_log(r"status=504.*error=connection_write_timeout"), p.stderr_text()[-2000:]


def test_tunnel_idle_timeout_closes_a_silent_tunnel(proxyd, echo_server):
    p = proxyd(workers=1, config={"timeouts": {"tunnel_idle": 1.0},
                                  "connect_ports": [echo_server.port]})
    with socket.create_connection(("127.0.0.1", p.port), timeout=IO_TIMEOUT) as s:
        s.sendall(f"CONNECT 127.0.0.1:{echo_server.port} HTTP/1.1\r\n"
                  f"Host: 127.0.0.1:{echo_server.port}\r\n\r\n".encode())
        assert s.recv(100).startswith(b"HTTP/1.1 200")
        s.sendall(b"ping")
        assert s.recv(100) == b"ping"
        t0 = time.monotonic()
        with pytest.raises(ConnectionResetError):  # an abort: a FIN would read as a clean end
            s.recv(100)
        took = time.monotonic() - t0
    assert 0.8 < took < 3.0, took
    line = p.wait_for_log(r"method=CONNECT .*status=200 ")
    assert line and "error=connection_read_timeout" in line, p.stderr_text()[-2000:]


def test_connect_timeout_when_the_origin_never_accepts(proxyd):
    """A listener whose accept queue is full drops SYNs, so the TCP connect hangs: proxyd
    answers 504 connection_timeout after timeouts.connect, not after the kernel's minutes."""
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    port = full.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):  # fill the accept queue (nobody accepts)
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            fillers.append(s)
        # wait until the accept queue holds a completed connection (it is full from then on)
        _, done, _ = select.select([], fillers, [], 5)
        assert done, "could not fill the accept queue"
        p = proxyd(workers=1, config={"timeouts": {"connect": 1.0}, "pool": {"learned_warm": 0}})
        took, data = _get(p.port, f"http://127.0.0.1:{port}/x", f"127.0.0.1:{port}")
    finally:
        for s in fillers:
            s.close()
        full.close()
    assert data.startswith(b"HTTP/1.1 504"), data[:200]
    assert b"error=connection_timeout" in data
    assert took < 3.0, took


def test_request_body_idle_timeout(proxyd, tls_origin):
    """A client that stops sending its announced body gets 408 after body_idle, and the
    half-sent request never completes upstream."""
    p = proxyd(workers=1, config={"timeouts": {"body_idle": 1.0}})
    with socket.create_connection(("127.0.0.1", p.port), timeout=IO_TIMEOUT) as s:
        s.sendall(f"POST {tls_origin.url('/upload')} HTTP/1.1\r\nHost: {tls_origin.authority}\r\n"
                  "Content-Length: 1000\r\n\r\n".encode() + b"x" * 10)
        t0 = time.monotonic()
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        took = time.monotonic() - t0
    assert data.startswith(b"HTTP/1.1 408"), data[:100]
    assert 0.8 < took < 3.0, took
    assert not any(r.path == "/upload" and r.body_len == 1000 for r in tls_origin.requests)


def test_ten_thousand_idle_clients_on_one_worker(proxyd, tls_origin):
    """One worker holds 10,000 idle client connections and still serves a new client."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 10_300 if hard == resource.RLIM_INFINITY else min(10_300, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 10_300:
        pytest.skip("needs 10,300 open files in the test process")
    p = proxyd(workers=1, config={"timeouts": {"client_head": 60.0}})
    held = []
    try:
        for _ in range(10_000):
            held.append(socket.create_connection(("127.0.0.1", p.port), timeout=IO_TIMEOUT))
        took, data = _get(p.port, tls_origin.url("/bytes/10"), tls_origin.authority)
        assert data.startswith(b"HTTP/1.1 200") and data.endswith(pattern_bytes(10))
        rss = p.rss_kib()
        print(f"\n10,000 idle clients: a new request took {took * 1000:.1f} ms; "
              f"proxyd RSS {rss:,} KiB")
        assert took < 2.0
    finally:
        for s in held:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_client_that_never_reads_cannot_grow_answers_proxyd_makes_itself(proxyd):
    """Pipelined requests that proxyd answers itself (here TRACE with Max-Forwards 0, whose
    answer is as large as the request) from a client that reads nothing: once the answers
    back up, proxyd stops reading the client, so its memory stays flat and the client's
    sends block — the answers of requests sent to an origin are bounded by pausing the
    origin, these have no origin to pause."""
    p = proxyd(workers=1)
    pad = "".join(f"X-Pad-{i}: {'p' * 80}\r\n" for i in range(90))
    request = (f"TRACE http://example.test/ HTTP/1.1\r\nHost: example.test\r\n"
               f"Max-Forwards: 0\r\n{pad}\r\n").encode()
    before = p.rss_kib(include_master=False)
    sent = 0
    with socket.create_connection(("127.0.0.1", p.port), timeout=IO_TIMEOUT) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        s.setblocking(False)
        stalled_since = time.monotonic()
        while sent < 256 << 20 and time.monotonic() - stalled_since < 1.0:
            _, writable, _ = select.select([], [s], [], 0.2)
            if writable:
                try:
                    sent += s.send(request * 16)
                    stalled_since = time.monotonic()
                except BlockingIOError:
                    pass
        grown = p.rss_kib(include_master=False) - before
    assert sent < 64 << 20, f"proxyd read {sent >> 20} MiB from a client that reads nothing"
    assert grown < 32 << 10, f"worker RSS grew by {grown >> 10} MiB"
