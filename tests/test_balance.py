"""The worker's accept loop: balancing across workers (a worker whose warm connections are
all spoken for leaves new connections in the shared queue for a worker that has one) and
the socket options of accepted clients."""

from __future__ import annotations

import asyncio
import queue
import select
import socket
import threading
import time
from collections.abc import Callable

import pytest

from proxyd import config
from proxyd.router import OriginKey
from proxyd.worker import _DEFER_CAP, _DEFER_MAX, Worker, _wake_alone


async def _until(cond: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.001)


def _worker(workers: int, warm: int) -> tuple[Worker, socket.socket]:
    cfg = config.from_mapping({"workers": workers, "origin": [
        {"host": "localhost", "port": 9, "warm": warm}]}, "test")
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(64)
    lsock.setblocking(False)
    w = Worker(cfg, lsock, None)
    o = cfg.origin[0]
    pool = w._make_pool(OriginKey("localhost", 9, o.tls), o, learned=False)
    if w._balance:
        w._warm_pools.append(pool)
        pool.on_idle = w.warm_capacity_changed
    return w, lsock


def _connect(port: int, n: int) -> list[socket.socket]:
    return [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]


def test_defers_until_a_warm_connection_is_free() -> None:
    async def main() -> None:
        w, lsock = _worker(workers=2, warm=2)
        pool = next(iter(w.pools.values()))
        pool.idle.extend([object(), object()])  # two idle warm connections (only counted)
        w._start_accepting()
        clients = _connect(lsock.getsockname()[1], 3)
        await _until(lambda: w.fresh_clients == 2, "two accepts")
        # The third waits in the queue: this worker's two idle connections are spoken for.
        await _until(lambda: not w.accepting, "accepting stopped")
        assert w._deferred is not None and w.fresh_clients == 2
        pool.idle.append(object())   # a connection came back ...
        pool.on_idle()               # ... and the pool says so
        assert w.accepting
        await _until(lambda: w.fresh_clients == 3, "third accept")
        for c in clients:
            c.close()
        await _until(lambda: w.fresh_clients == 0, "clients gone")
        lsock.close()
    asyncio.run(asyncio.wait_for(main(), 30))


def test_deferral_is_bounded() -> None:
    async def main() -> None:
        w, lsock = _worker(workers=2, warm=1)
        next(iter(w.pools.values())).idle.append(object())
        w._start_accepting()
        loop = asyncio.get_running_loop()
        clients = _connect(lsock.getsockname()[1], 2)
        await _until(lambda: w.fresh_clients == 1, "first accept")
        t0 = loop.time()
        # No capacity comes back: after _DEFER_MAX the worker accepts anyway (the request
        # then queues in its pool) rather than leave a client unserved.
        await _until(lambda: w.fresh_clients == 2, "second accept")
        assert loop.time() - t0 >= _DEFER_MAX * 0.5
        for c in clients:
            c.close()
        lsock.close()
    asyncio.run(asyncio.wait_for(main(), 30))


def test_single_worker_never_defers() -> None:
    async def main() -> None:
        w, lsock = _worker(workers=1, warm=1)
        assert not w._warm_pools
        w._start_accepting()
        clients = _connect(lsock.getsockname()[1], 4)
        await _until(lambda: w.fresh_clients == 4, "all accepted")
        assert w._deferred is None
        for c in clients:
            c.close()
        lsock.close()
    asyncio.run(asyncio.wait_for(main(), 30))


def test_first_request_resolves_fresh_client() -> None:
    async def main() -> None:
        w, lsock = _worker(workers=2, warm=4)
        next(iter(w.pools.values())).idle.extend([object()] * 4)
        w._start_accepting()
        c = _connect(lsock.getsockname()[1], 1)[0]
        await _until(lambda: w.fresh_clients == 1, "accept")
        # A request the proxy refuses at once (origin-form without default_origin) still
        # ends the client's "fresh" state.
        c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await _until(lambda: w.fresh_clients == 0, "first request begun")
        c.close()
        lsock.close()
    asyncio.run(asyncio.wait_for(main(), 30))


def test_deferral_lasts_about_one_round_trip() -> None:
    async def main() -> None:
        w, lsock = _worker(workers=2, warm=2)
        pool = next(iter(w.pools.values()))
        assert w._defer_time() == _DEFER_MAX  # nothing measured yet
        for _ in range(4):
            pool.ostats.handshake.observe(0.03)  # warm connections took ~30 ms to handshake
        assert abs(w._defer_time() - 0.03) < 1e-9
        pool.ostats.handshake.observe(100.0)
        assert w._defer_time() == _DEFER_CAP
        lsock.close()
    asyncio.run(asyncio.wait_for(main(), 30))


def test_a_failing_origin_does_not_hold_accepts_back() -> None:
    async def main() -> None:
        w, lsock = _worker(workers=2, warm=2)
        pool = next(iter(w.pools.values()))
        pool.failures = 3  # its warm connections cannot be opened: nothing to balance
        w._start_accepting()
        clients = _connect(lsock.getsockname()[1], 3)
        await _until(lambda: w.fresh_clients == 3, "all accepted at once")
        assert w._deferred is None
        for c in clients:
            c.close()
        lsock.close()
    asyncio.run(asyncio.wait_for(main(), 30))


@pytest.mark.parametrize("listener_nodelay", [False, True])
def test_accepted_clients_have_tcp_nodelay(listener_nodelay: bool) -> None:
    """Inherited from the listener when set there (Linux), set per connection otherwise:
    without it a head and body written apart wait 40 ms for a delayed ACK."""
    async def main() -> None:
        w, lsock = _worker(workers=1, warm=0)
        if listener_nodelay:
            lsock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        w._start_accepting()
        clients = _connect(lsock.getsockname()[1], 2)
        await _until(lambda: len(w.clients) == 2, "accepted")
        for client in w.clients:
            sock = client.transport.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert w._nodelay_inherited is listener_nodelay
        for c in clients:
            c.close()
        lsock.close()
    asyncio.run(asyncio.wait_for(main(), 30))


# -- exclusive wake-ups -----------------------------------------------------------------------
_EPOLL_WAITS = {"232", "281", "441"}  # x86_64 epoll_wait, epoll_pwait, epoll_pwait2


def _blocked_in_epoll(tid: int) -> bool:
    with open(f"/proc/self/task/{tid}/syscall") as f:
        return f.read().split()[0] in _EPOLL_WAITS


def _until_threads(cond: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)


@pytest.mark.skipif(not hasattr(select, "EPOLLEXCLUSIVE"), reason="needs EPOLLEXCLUSIVE")
def test_a_new_connection_wakes_one_waiting_worker_loop() -> None:
    # Two loops (as two workers would) watch one listener. With the exclusive entry each
    # new connection wakes one of them; without it both wake and one finds nothing.
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(16)
    lsock.setblocking(False)
    accepted: queue.Queue[socket.socket] = queue.Queue()
    empty = [0]
    tids: list[int] = []
    loops: list[asyncio.AbstractEventLoop] = []
    exclusive: list[bool] = []

    def serve() -> None:
        loop = asyncio.new_event_loop()

        def on_ready() -> None:
            try:
                conn, _ = lsock.accept()
            except BlockingIOError:
                empty[0] += 1  # woken for a connection another loop took
                return
            accepted.put(conn)

        loop.add_reader(lsock.fileno(), on_ready)
        exclusive.append(_wake_alone(loop, lsock.fileno()))
        tids.append(threading.get_native_id())
        loops.append(loop)
        loop.run_forever()
        loop.remove_reader(lsock.fileno())
        loop.close()

    threads = [threading.Thread(target=serve) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        _until_threads(lambda: len(tids) == 2, "both loops")
        try:
            _blocked_in_epoll(tids[0])
        except OSError:
            pytest.skip("no /proc/<pid>/task/<tid>/syscall here")
        assert exclusive == [True, True]
        for _ in range(20):
            # Both loops asleep in epoll_wait, as idle workers are when a client connects.
            _until_threads(lambda: all(_blocked_in_epoll(t) for t in tids), "idle loops")
            client = socket.create_connection(lsock.getsockname(), timeout=5)
            accepted.get(timeout=5).close()
            client.close()
        _until_threads(lambda: all(_blocked_in_epoll(t) for t in tids), "idle loops")
        assert empty[0] == 0
    finally:
        for loop in loops:
            loop.call_soon_threadsafe(loop.stop)
        for t in threads:
            t.join(5)
        lsock.close()


def test_a_draining_worker_takes_the_clients_already_queued() -> None:
    # With exclusive wake-ups a queued client may have woken only this worker: stopping
    # without taking it would leave it waiting for the next connection to wake another.
    async def main() -> None:
        w, lsock = _worker(workers=2, warm=0)
        w._start_accepting()
        assert w._exclusive
        w._stop_accepting()  # before the loop could run the accept
        clients = _connect(lsock.getsockname()[1], 2)
        w.draining = True
        w._accept_queued()
        assert len(w.clients) == 2 and not w.accepting
        for c in clients:
            c.close()
        lsock.close()
    asyncio.run(main())
