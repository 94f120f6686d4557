"""The master process: binds the listener, forks workers, supervises them, stops them.

Signal handlers only record the signal; all work happens in the master's loop (gunicorn's
arbiter pattern). The master never serves client traffic.
"""

from __future__ import annotations

import collections
import errno
import json
import logging
import os
import select
import signal
import socket
import sys
import time
from dataclasses import dataclass, field

from .config import Config, parse_hostport

log = logging.getLogger("proxyd.master")

BOOT_FAILURE = 3  # a worker exiting with this status could not start: do not respawn
_RESPAWN_BACKOFF_MAX = 10.0


@dataclass
class WorkerProc:
    """The master's view of one worker process."""

    pid: int
    read_fd: int
    started: float
    ready: bool = False
    buffer: bytes = b""
    stats: dict[str, float] = field(default_factory=dict)


def bind_listener(address: str, source: str, backlog: int = 1024) -> socket.socket:
    """Create the shared listening socket (kept open for the master's whole life)."""
    host, port = parse_hostport(address, 3128, "listen", source)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio only sets TCP_NODELAY on sockets whose proto says TCP.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


class Master:
    """Supervises ``cfg.worker_count`` workers sharing one listening socket."""

    def __init__(self, cfg: Config, listen_sock: socket.socket) -> None:
        self.cfg = cfg
        self.sock = listen_sock
        self.workers: dict[int, WorkerProc] = {}
        self.signals: collections.deque[int] = collections.deque()
        self.stopping = False
        self.stop_deadline = 0.0
        self.announced = False
        self.exit_code = 0
        self.respawn_failures = 0
        self.next_respawn = 0.0
        self._wake_r, self._wake_w = os.pipe()

    @property
    def address(self) -> str:
        """The bound address as host:port (the real port when 0 was asked for)."""
        host, port = self.sock.getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    # -- signals ------------------------------------------------------------------------------
    def _on_signal(self, signum: int, _frame: object) -> None:
        self.signals.append(signum)  # handlers only enqueue

    def _install_signals(self) -> None:
        os.set_blocking(self._wake_w, False)
        signal.set_wakeup_fd(self._wake_w)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD, signal.SIGHUP):
            signal.signal(sig, self._on_signal)

    # -- workers ------------------------------------------------------------------------------
    def spawn(self) -> None:
        """Fork one worker."""
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            os.close(read_fd)
            self._child(write_fd)
        os.close(write_fd)
        self.workers[pid] = WorkerProc(pid, read_fd, time.monotonic())
        log.info("worker started", extra={"fields": {"worker_pid": pid}})

    def _child(self, write_fd: int) -> None:
        code = BOOT_FAILURE
        try:
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGTERM, signal.SIGQUIT, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            os.close(self._wake_r)
            os.close(self._wake_w)
            for w in self.workers.values():
                os.close(w.read_fd)
            from .worker import worker_main
            code = worker_main(self.cfg, self.sock, write_fd)
        except BaseException:
            log.exception("worker failed")
        finally:
            logging.shutdown()
            os._exit(code)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            proc = self.workers.pop(pid, None)
            if proc is None:
                continue
            os.close(proc.read_fd)
            code = os.waitstatus_to_exitcode(status)
            self._worker_exited(proc, code)

    def _worker_exited(self, proc: WorkerProc, code: int) -> None:
        fields = {"worker_pid": proc.pid, "status": code}
        if self.stopping:
            log.info("worker exited", extra={"fields": fields})
            return
        log.error("worker died", extra={"fields": fields})
        if code == BOOT_FAILURE and not proc.ready:
            log.critical("worker could not start; stopping", extra={"fields": fields})
            self.exit_code = 1
            self.begin_stop()
            return
        self.respawn_failures += 1
        delay = min(_RESPAWN_BACKOFF_MAX, 0.1 * 2 ** (self.respawn_failures - 1))
        self.next_respawn = time.monotonic() + delay

    def _read_worker(self, proc: WorkerProc) -> None:
        try:
            data = os.read(proc.read_fd, 65536)
        except OSError:
            return
        proc.buffer += data
        *lines, proc.buffer = proc.buffer.split(b"\n")
        for line in lines:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if msg.get("event") == "ready":
                proc.ready = True
                self.respawn_failures = 0
            elif msg.get("event") == "stats":
                proc.stats = msg

    # -- loop ---------------------------------------------------------------------------------
    def run(self) -> int:
        """Run until stopped; returns the exit status."""
        self._install_signals()
        for _ in range(self.cfg.worker_count):
            self.spawn()
        while self.workers or not self.stopping:
            self._step()
        return self.exit_code

    def _step(self) -> None:
        fds = [self._wake_r] + [w.read_fd for w in self.workers.values()]
        try:
            readable, _, _ = select.select(fds, [], [], 0.5)
        except InterruptedError:
            readable = []
        if self._wake_r in readable:
            try:
                os.read(self._wake_r, 4096)
            except BlockingIOError:
                pass
        for proc in list(self.workers.values()):
            if proc.read_fd in readable:
                self._read_worker(proc)
        while self.signals:
            self._handle_signal(self.signals.popleft())
        self._reap()
        self._maintain()

    def _maintain(self) -> None:
        now = time.monotonic()
        if self.stopping:
            if now >= self.stop_deadline:
                self._kill_all(signal.SIGKILL)
            return
        if len(self.workers) < self.cfg.worker_count and now >= self.next_respawn:
            self.spawn()
        if not self.announced and len(self.workers) == self.cfg.worker_count and all(
                w.ready for w in self.workers.values()):
            self.announced = True
            log.info("ready", extra={"fields": {
                "listen": self.address, "workers": len(self.workers),
                "warm_origins": len(self.cfg.origin)}})

    def _handle_signal(self, signum: int) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            if self.stopping:
                log.warning("second stop signal: stopping now")
                self._kill_all(signal.SIGKILL)
            else:
                self.begin_stop()
        elif signum == signal.SIGQUIT:
            self._kill_all(signal.SIGKILL)
            self.stopping = True
        elif signum == signal.SIGHUP:
            log.warning("reload is not supported yet; ignoring SIGHUP")

    def begin_stop(self) -> None:
        """Graceful stop: workers finish in-flight requests up to the shutdown timeout."""
        if self.stopping:
            return
        self.stopping = True
        self.stop_deadline = time.monotonic() + self.cfg.timeouts.shutdown + 1.0
        log.info("stopping", extra={"fields": {"workers": len(self.workers)}})
        self._kill_all(signal.SIGTERM)

    def _kill_all(self, sig: int) -> None:
        for pid in list(self.workers):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
            except OSError as exc:  # pragma: no cover - unexpected
                if exc.errno != errno.ESRCH:
                    raise


def run(cfg: Config) -> int:
    """Bind, start the workers, supervise until stopped."""
    try:
        sock = bind_listener(cfg.listen, cfg.source)
    except OSError as exc:
        print(f"proxyd: cannot listen on {cfg.listen}: {exc.strerror}", file=sys.stderr)
        return 1
    master = Master(cfg, sock)
    log.info("starting", extra={"fields": {"listen": master.address,
                                           "workers": cfg.worker_count}})
    return master.run()
