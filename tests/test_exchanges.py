"""Finished exchanges are recorded on the request path and counted/logged in batches."""

from __future__ import annotations

import re
import socket
import sys
import time

import pytest

from proxyd import config
from proxyd.exchanges import BATCH, ExchangeLog
from proxyd.http1 import ParserLimits, RequestParser
from proxyd.router import OriginKey, Route
from proxyd.worker import Worker

REQUEST = b"GET http://localhost:9443/x?q=1 HTTP/1.1\r\nHost: localhost:9443\r\n\r\n"


class _Stderr:
    """The access log's lines, as pytest captured them from sys.stderr."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self._capsys = capsys

    def lines(self) -> list[str]:
        return [line for line in self._capsys.readouterr().err.splitlines()
                if "kind=access" in line]


@pytest.fixture
def stderr(capsys: pytest.CaptureFixture[str]) -> _Stderr:
    return _Stderr(capsys)


def _worker(**settings: object) -> Worker:
    cfg = config.from_mapping({"origin": [{"host": "localhost", "port": 9443}], **settings},
                              "test_exchanges")
    listener = socket.socket()
    try:
        return Worker(cfg, listener, None)
    finally:
        listener.close()  # the worker is not run: only its pools and logs are used


def _record(worker: Worker, ended: float, status: int = 200, connected: bool = True,
            error: str = "") -> tuple:
    pool = worker._make_pool(OriginKey("localhost", 9443, True), worker.cfg.origin[0],
                             learned=False)
    req = RequestParser(ParserLimits(8192, 65536, 100, 4096, 8192)).take_plain(REQUEST)
    route = Route(pool.key, b"/x?q=1", b"localhost:9443", worker.cfg.origin[0])
    started = ended - 0.004
    t_conn = started + 0.001 if connected else 0.0
    t_head = started + 0.003 if connected else 0.0
    return (ended, started, t_conn, t_head, "127.0.0.1:5555", req.method, route.target, pool,
            status, 0, 1024 if connected else 0, True, False, error)


def _requests(worker: Worker) -> int:
    stats = worker.stats.origins.get("localhost:9443")
    return sum(stats.requests.values()) if stats else 0


def test_records_wait_for_a_batch_or_a_flush(stderr: _Stderr) -> None:
    worker = _worker()
    log: ExchangeLog = worker.exchanges
    now = time.monotonic()
    for _ in range(BATCH - 1):
        log.add(_record(worker, now))
    assert _requests(worker) == 0 and worker.access_log.pending_lines == 0  # nothing done yet
    log.add(_record(worker, now))  # the batch is full: counted and formatted at once
    assert _requests(worker) == BATCH and worker.access_log.pending_lines == BATCH
    log.add(_record(worker, now))
    log.flush()  # the housekeeping tick and every stats report take the rest
    assert _requests(worker) == BATCH + 1
    worker.access_log.flush()
    assert len(stderr.lines()) == BATCH + 1


def test_counted_exactly_as_the_request_ended(stderr: _Stderr) -> None:
    worker = _worker()
    log = worker.exchanges
    now = time.monotonic()
    log.add(_record(worker, now))
    log.add(_record(worker, now, status=502, connected=False, error="connection_refused"))
    log.flush()
    stats = worker.stats.origins["localhost:9443"]
    assert dict(stats.requests) == {("GET", 200): 1, ("GET", 502): 1}
    assert stats.response_bytes == 1024 and dict(stats.errors) == {"connection_refused": 1}
    # Histograms leave out what did not happen: no connection, no wait and no ttfb.
    assert stats.duration.count == 2 and stats.wait.count == 1 and stats.ttfb.count == 1
    assert stats.duration.total == pytest.approx(0.008)
    assert stats.wait.total == pytest.approx(0.001) and stats.ttfb.total == pytest.approx(0.002)
    worker.access_log.flush()
    ok, refused = stderr.lines()
    assert ("method=GET origin=localhost:9443 path=\"/x?q=1\" status=200 bytes_in=0 bytes_out=1024 "
            "duration_ms=4.000 wait_ms=1.000 ttfb_ms=2.000 warm=1 retried=0 error=-") in ok
    # The log line gives the whole time as the wait of a request that never got a
    # connection, and 0 for the time to a response head that never came.
    assert "status=502" in refused and "duration_ms=4.000 wait_ms=4.000 ttfb_ms=0.000" in refused
    assert refused.endswith("error=connection_refused")


def test_ends_never_answered_with_an_error_are_logged_not_counted_as_errors(
        stderr: _Stderr) -> None:
    """A client that went away, or a transfer cut by the shutdown timeout, got no
    Proxy-Status error: the access log says why it ended, proxyd_upstream_errors_total
    (errors answered to clients, by RFC 9209 type) does not count it."""
    worker = _worker()
    now = time.monotonic()
    log = worker.exchanges
    log.add(_record(worker, now, error="client_aborted"))
    log.add(_record(worker, now, error="shutdown_timeout"))
    log.flush()
    stats = worker.stats.origins["localhost:9443"]
    assert dict(stats.errors) == {} and dict(stats.requests) == {("GET", 200): 2}
    worker.access_log.flush()
    assert [line.rsplit(" ", 1)[1] for line in stderr.lines()] == [
        "error=client_aborted", "error=shutdown_timeout"]


def test_log_time_is_when_the_request_ended_not_when_the_batch_ran(stderr: _Stderr) -> None:
    worker = _worker()
    ended = time.monotonic() - 3600.0  # an hour ago, on the monotonic clock
    worker.exchanges.add(_record(worker, ended))
    worker.exchanges.flush()
    worker.access_log.flush()
    (line,) = stderr.lines()
    stamp = re.match(r"ts=(\S+) ", line).group(1)  # type: ignore[union-attr]
    expected = time.time() - 3600.0
    logged = time.mktime(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    assert abs(logged - expected) < 2.0, (stamp, expected)


def test_metrics_off_keeps_the_access_log(stderr: _Stderr) -> None:
    worker = _worker(metrics=False)
    assert worker.exchanges.enabled
    worker.exchanges.add(_record(worker, time.monotonic()))
    worker.exchanges.flush()
    worker.access_log.flush()
    assert _requests(worker) == 0 and len(stderr.lines()) == 1


def test_access_log_off_keeps_the_metrics(stderr: _Stderr) -> None:
    worker = _worker(access_log=False)
    worker.exchanges.add(_record(worker, time.monotonic()))
    worker.exchanges.flush()
    worker.access_log.flush()
    assert _requests(worker) == 1 and stderr.lines() == []


def test_nothing_is_recorded_with_both_off() -> None:
    assert not _worker(metrics=False, access_log=False).exchanges.enabled


def test_a_request_without_a_pool_counts_under_none(stderr: _Stderr) -> None:
    worker = _worker()
    now = time.monotonic()
    # A request refused before routing (e.g. 400): no request head, pool or route.
    worker.exchanges.add((now, now - 0.001, 0.0, 0.0, "127.0.0.1:5555", b"-", b"-", None,
                          400, 0, 0, False, False, "http_request_error"))
    worker.exchanges.flush()
    assert dict(worker.stats.origins["none"].requests) == {("OTHER", 400): 1}
    worker.access_log.flush()
    (line,) = stderr.lines()
    assert "method=- origin=- path=- status=400" in line
