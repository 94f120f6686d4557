"""One plain exchange through a ClientConnection and a pooled UpstreamConnection, sans I/O.

The common request (a keep-alive GET to an idle pooled connection) and the common response
(a small one that arrives whole) each go out in one write, and that write comes before the
bookkeeping that does not need it: on the sequential path only the work before a write is
latency, what follows it overlaps with the origin or the client.
"""

from __future__ import annotations

import socket
from typing import Any, Callable

from proxyd import config
from proxyd.client import ClientConnection, ClientState
from proxyd.router import OriginKey
from proxyd.upstream import ConnState, UpstreamConnection
from proxyd.worker import Worker

REQUEST = (b"GET http://localhost:9443/1k HTTP/1.1\r\nHost: localhost:9443\r\n"
           b"User-Agent: test\r\n\r\n")
BODY = b"x" * 1024
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: 1024\r\nConnection: keep-alive\r\n\r\n" + BODY)


class RecordingTransport:
    """Keeps each write with a snapshot taken at the moment of the write. Only what the
    common exchange uses is here: a close, a pause or another call fails the test."""

    def __init__(self, snapshot: Callable[[], Any]) -> None:
        self.writes: list[tuple[bytes, Any]] = []
        self._snapshot = snapshot

    def write(self, data: bytes) -> None:
        self.writes.append((bytes(data), self._snapshot()))

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default


def _exchange_parts() -> tuple[Worker, ClientConnection, UpstreamConnection,
                               RecordingTransport, RecordingTransport]:
    cfg = config.from_mapping({"origin": [{"host": "localhost", "port": 9443, "warm": 0}]},
                              "test_exchange_path")
    listener = socket.socket()
    try:
        worker = Worker(cfg, listener, None)
    finally:
        listener.close()  # the worker is not run: only its pools and counters are used
    pool = worker._make_pool(OriginKey("localhost", 9443, True), cfg.origin[0], learned=False)
    stats = worker.stats
    upstream = UpstreamConnection(pool)
    up_transport = RecordingTransport(lambda: (stats.requests, stats.warm_hits, pool.ostats.hits))
    upstream.connection_made(up_transport)  # type: ignore[arg-type]
    pool.idle.append(upstream)
    client = ClientConnection(worker)
    client_transport = RecordingTransport(lambda: stats.bytes_to_clients)
    client.connection_made(client_transport)  # type: ignore[arg-type]
    return worker, client, upstream, up_transport, client_transport


def test_plain_request_is_one_upstream_write_before_its_bookkeeping() -> None:
    worker, client, upstream, up_transport, _ = _exchange_parts()
    client.data_received(REQUEST)
    [(head, (requests, warm_hits, origin_hits))] = up_transport.writes
    assert head.startswith(b"GET /1k HTTP/1.1\r\nHost: localhost:9443\r\nUser-Agent: test\r\n")
    assert b"\r\nVia: 1.1 " in head and head.endswith(b"\r\n\r\n")
    # The request was counted when it began; the pool hit only after the write.
    assert (requests, warm_hits, origin_hits) == (1, 0, 0)
    assert worker.stats.warm_hits == 1 and upstream.pool.ostats.hits == 1
    assert client.state is ClientState.ACTIVE and client.req_done and client.reused
    assert upstream.state is ConnState.BUSY and upstream in upstream.pool.busy
    assert client.retained == [head]  # a GET may be retried on a fresh connection


def test_whole_response_is_one_client_write_then_the_exchange_ends() -> None:
    worker, client, upstream, _, client_transport = _exchange_parts()
    client.data_received(REQUEST)
    upstream.data_received(RESPONSE)
    [(data, counted_before)] = client_transport.writes
    assert data.startswith(b"HTTP/1.1 200 OK\r\nServer: nginx\r\n") and data.endswith(BODY)
    assert b"Connection: keep-alive" not in data  # the origin's hop-by-hop line is dropped
    assert counted_before == 0 and worker.stats.bytes_to_clients == len(BODY)
    # The exchange is over: the connection is idle in the pool, the client awaits a head.
    assert client.state is ClientState.HEAD and client.upstream is None
    assert upstream.state is ConnState.IDLE and upstream.pool.idle == [upstream]


def test_second_request_reuses_the_connection() -> None:
    worker, client, upstream, up_transport, client_transport = _exchange_parts()
    for _ in range(2):
        client.data_received(REQUEST)
        upstream.data_received(RESPONSE)
    assert len(up_transport.writes) == 2 and len(client_transport.writes) == 2
    assert worker.stats.warm_hits == 2 and upstream.requests == 2
    assert worker.stats.bytes_to_clients == 2 * len(BODY)


class ClosableTransport(RecordingTransport):
    """A RecordingTransport that may also be closed (an error path closes connections)."""

    def __init__(self, snapshot: Callable[[], Any]) -> None:
        super().__init__(snapshot)
        self.closed = False

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    abort = close


CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


def _failing_exchange() -> tuple[ClientConnection, UpstreamConnection, ClosableTransport]:
    worker, client, upstream, _, _ = _exchange_parts()
    client_transport = ClosableTransport(lambda: worker.stats.bytes_to_clients)
    client.connection_made(client_transport)  # type: ignore[arg-type]
    upstream.transport = ClosableTransport(lambda: None)  # type: ignore[assignment]
    client.data_received(REQUEST)
    return client, upstream, client_transport


def test_a_response_invalid_in_the_read_of_its_head_is_a_clean_502() -> None:
    """HAProxy's behaviour: the head is still held when the first chunk turns out invalid,
    so the client gets a 502 it can act on, not a 200 cut short."""
    client, upstream, client_transport = _failing_exchange()
    upstream.data_received(CHUNKED_HEAD + b"5\r\nhello\r\nzz\r\n")
    [(data, bytes_counted)] = client_transport.writes
    assert data.startswith(b"HTTP/1.1 502 "), data
    assert b"Proxy-Status: proxyd; error=http_protocol_error" in data
    assert b"hello" not in data and bytes_counted == 0
    assert client.worker.stats.bytes_to_clients == 0
    assert upstream.state is ConnState.CLOSED


def test_an_interim_head_before_the_invalid_response_still_goes_out() -> None:
    client, upstream, client_transport = _failing_exchange()
    upstream.data_received(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
                           + CHUNKED_HEAD + b"zz\r\n")
    [(data, _)] = client_transport.writes
    assert data.startswith(b"HTTP/1.1 103 Early Hints\r\n")
    assert b"\r\n\r\nHTTP/1.1 502 " in data


def test_a_response_that_fails_after_its_head_went_out_is_cut() -> None:
    """Once the head has been sent, closing is the only honest signal (no last chunk)."""
    client, upstream, client_transport = _failing_exchange()
    upstream.data_received(CHUNKED_HEAD + b"5\r\nhello\r\n")
    upstream.data_received(b"zz\r\n")
    sent = b"".join(data for data, _ in client_transport.writes)
    assert sent.startswith(b"HTTP/1.1 200 OK\r\n") and sent.endswith(b"5\r\nhello\r\n")
    assert client_transport.closed and client.state is ClientState.CLOSED
