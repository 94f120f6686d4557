"""The master process: owns the listener, forks workers, supervises, reloads, stops.

Signal handlers only record the signal; all work happens in the master's loop (gunicorn's
arbiter pattern). The master never serves client traffic. Workers are grouped in
generations: a reload starts a new generation and drains the old one once the new one is
serving, so the listening socket never closes and no connection is refused.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .admin import AdminServer
from .config import Config, ConfigError, parse_hostport
from .config import _validate_listen_address as validate_listen_address
from .metrics import MetricsView, OriginLabels, ProxydCollector, merge
from .systemd import Notifier, listen_fds
# Imported here, not in the forked child: a worker that replaces one hours later must run
# the code this master was started with, not whatever a package upgrade left on disk.
from .worker import worker_main

log = logging.getLogger("proxyd.master")

BOOT_FAILURE = 3  # a worker exiting with this status before it was ready could not start
_RESPAWN_BACKOFF_MAX = 10.0
_HEARTBEAT_STALE = 5.0  # a worker silent this long does not count for the watchdog
# ... and one silent this long is stuck: killed and replaced, so that the connections it
# accepts do not hang forever (before systemd's WatchdogSec=30 restarts everything).
_STUCK_KILL = 20.0
# The master's loop wakes at least 4 times a second: a longer gap means the master itself did
# not run (the process group frozen by SIGSTOP or `systemctl freeze`, a reload blocked reading
# its file), and the workers' reports sat unread meanwhile.
_MASTER_STALL = 2.0
_STATUS_EVERY = 2.0


@dataclass
class WorkerProc:
    """The master's view of one worker process."""

    pid: int
    read_fd: int
    generation: int
    started: float
    ready: bool = False
    draining: bool = False
    buffer: bytes = b""
    last_seen: float = 0.0
    silent: bool = False  # reported as not responding
    killed: bool = False  # killed as stuck, not yet reaped
    stats: dict[str, object] = field(default_factory=dict)


def bound_address(sock: socket.socket) -> str:
    """A bound socket's address as the listen keys are written: host:port, an IPv6 host in
    brackets (RFC 3986 §3.2.2); "unix" for a Unix socket systemd passed."""
    return _ip_sockname(sock) or "unix"


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

    def __init__(self, cfg: Config, listen_sock: socket.socket,
                 loader: Callable[[], Config] | None = None,
                 notifier: Notifier | None = None,
                 admin_sock: socket.socket | None = None) -> None:
        self.cfg = cfg
        self.sock = listen_sock
        self.admin = AdminServer(admin_sock, self._admin) if admin_sock is not None else None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ProxydCollector(self.metrics_view))
        # The master's own process_* family (the workers': proxyd_worker_* above).
        ProcessCollector(registry=self.registry)
        self.last_reload_success = time.time()
        self.loader = loader
        self.notify = notifier or Notifier()
        self.workers: dict[int, WorkerProc] = {}
        self.generation = 0
        self.signals: collections.deque[int] = collections.deque()
        self.stopping = False
        self.stop_deadline = 0.0
        self.announced = False
        self.reload_pending: Config | None = None  # new generation starting
        self.reload_again = False  # a SIGHUP came while one was starting: reload once more
        self.reload_deadline = 0.0
        self.exit_code = 0
        self.respawn_failures = 0
        self.next_respawn = 0.0
        self.totals_dead: dict[str, object] = {}
        self.labels = OriginLabels()  # origin labels with series of their own, never re-picked
        self.reloads_ok = 0
        self.reloads_failed = 0
        self.worker_restarts = 0
        self._last_status = 0.0
        self._last_watchdog = 0.0
        self._heartbeats_checked = 0.0  # when _check_heartbeats last ran (monotonic)
        self._status_requests = (0.0, 0.0)  # (time, requests) at the last rate sample
        self._request_rate = 0.0  # req/s between the last two samples (every _STATUS_EVERY)
        self._wake_r, self._wake_w = os.pipe()

    @property
    def address(self) -> str:
        """The bound address as host:port (the real port when 0 was asked for)."""
        return bound_address(self.sock)

    @property
    def admin_address(self) -> str:
        """The metrics listener's address, or "-"."""
        if self.admin is None:
            return "-"
        return bound_address(self.admin.sock)

    def current(self) -> list[WorkerProc]:
        """Workers of the serving generation."""
        return [w for w in self.workers.values() if w.generation == self.generation]

    # -- signals ------------------------------------------------------------------------------
    def _on_signal(self, signum: int, _frame: object) -> None:
        self.signals.append(signum)  # handlers only enqueue

    def _install_signals(self) -> None:
        os.set_blocking(self._wake_w, False)
        signal.set_wakeup_fd(self._wake_w)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD, signal.SIGHUP,
                    signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, self._on_signal)

    # -- workers ------------------------------------------------------------------------------
    def spawn(self, cfg: Config, generation: int) -> None:
        """Fork one worker of ``generation`` running ``cfg``."""
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            os.close(read_fd)
            self._child(cfg, write_fd)
        os.close(write_fd)
        now = time.monotonic()
        self.workers[pid] = WorkerProc(pid, read_fd, generation, now, last_seen=now)
        log.info("worker started", extra={"fields": {"worker_pid": pid, "generation": generation}})

    def _child(self, cfg: Config, write_fd: int) -> None:
        code = BOOT_FAILURE
        try:
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGTERM, signal.SIGQUIT, signal.SIGCHLD, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            # nginx reopens logs on SIGUSR1, HAProxy reloads on SIGUSR2: sent to a worker by
            # habit, either must not kill it (the default action).
            for sig in (signal.SIGUSR1, signal.SIGUSR2):
                signal.signal(sig, signal.SIG_IGN)
            logging.getLogger("proxyd").setLevel(cfg.log_level.upper())  # a reload may change it
            os.close(self._wake_r)
            os.close(self._wake_w)
            for w in self.workers.values():
                os.close(w.read_fd)
            if self.admin is not None:
                self.admin.close()  # the child's copies only; the master keeps serving
            code = worker_main(cfg, self.sock, write_fd)
        except ConfigError as exc:  # a file the configuration names is gone or broken now
            log.error("worker could not start", extra={"fields": {"error": str(exc)}})
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
            self._keep_totals(proc)
            self._worker_exited(proc, os.waitstatus_to_exitcode(status))

    def _keep_totals(self, proc: WorkerProc) -> None:
        # Counters of exited workers stay in the totals so that they never go backwards.
        merge(self.totals_dead, {k: proc.stats[k] for k in ("counters", "origins")
                                 if k in proc.stats})

    def _worker_exited(self, proc: WorkerProc, code: int) -> None:
        fields = {"worker_pid": proc.pid, "status": code, "generation": proc.generation}
        if self.stopping or proc.draining:
            log.info("worker exited", extra={"fields": fields})
            return
        if not proc.ready and code == BOOT_FAILURE:
            self._boot_failed(proc, fields)
            return
        log.error("worker died; replacing it", extra={"fields": fields})
        self.worker_restarts += 1
        self._respawn_later()

    def _respawn_later(self) -> float:
        """Back off before the next replacement (none for the first); returns the delay."""
        self.respawn_failures += 1
        delay = min(_RESPAWN_BACKOFF_MAX, 0.1 * 2 ** (self.respawn_failures - 1))
        delay = delay if self.respawn_failures > 1 else 0.0
        self.next_respawn = time.monotonic() + delay
        return delay

    def _boot_failed(self, proc: WorkerProc, fields: dict[str, object]) -> None:
        if self.reload_pending is not None and proc.generation == self.generation:
            log.error("new worker could not start; reload aborted, old workers keep serving",
                      extra={"fields": fields})
            self._abort_reload()
            return
        if self.announced and any(w.ready for w in self._serving()):
            # A replacement for a worker that died. The others keep serving (so do nginx's
            # and HAProxy's); what stopped it (a CA file being rotated, say) may pass. With
            # none left serving, retrying would leave clients hanging in the listen queue:
            # stop instead, as at start-up (systemd's Restart= takes over).
            delay = self._respawn_later()
            log.error("replacement worker could not start; others keep serving, retrying",
                      extra={"fields": {**fields, "retry_in_s": round(delay, 1),
                                        "serving": sum(w.ready for w in self._serving())}})
            return
        log.critical("worker could not start; stopping", extra={"fields": fields})
        self.exit_code = 1
        self.begin_stop()

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
            proc.last_seen = time.monotonic()
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
            self.spawn(self.cfg, self.generation)
        while self.workers or not self.stopping:
            self._step()
        log.info("stopped", extra={"fields": {"status": self.exit_code}})
        return self.exit_code

    def _step(self) -> None:
        fds = [self._wake_r] + [w.read_fd for w in self.workers.values()]
        wfds: list[int] = []
        if self.admin is not None:
            fds += self.admin.read_fds()
            wfds = self.admin.write_fds()
        try:
            readable, writable, _ = select.select(fds, wfds, [], 0.25)
        except InterruptedError:
            readable, writable = [], []
        if self.admin is not None:
            self.admin.handle(readable, writable)
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
            if now >= self.stop_deadline and self.workers:
                log.warning("shutdown timeout reached; killing workers")
                self._kill(list(self.workers), signal.SIGKILL)
                self.stop_deadline = float("inf")
            return
        self._advance_reload(now)
        self._check_heartbeats(now)
        # During a reload the current generation is the new one, running the new config.
        cfg = self.reload_pending or self.cfg
        if len(self.current()) < cfg.worker_count and now >= self.next_respawn:
            self.spawn(cfg, self.generation)
        if not self.announced and self._generation_ready():
            self.announced = True
            log.info("ready", extra={"fields": {
                "listen": self.address, "metrics_listen": self.admin_address,
                "workers": len(self.current()),
                "warm_origins": len(self.cfg.origin)}})
            self.notify.ready(self.status_line())
        self._notify_periodic(now)

    def _check_heartbeats(self, now: float) -> None:
        """A serving worker reports every second. One that stops (a bug looping, a SIGSTOP,
        the machine swapping) is named after _HEARTBEAT_STALE and killed after _STUCK_KILL
        to be replaced — as HAProxy's watchdog kills a stuck process."""
        stalled = self._heartbeats_checked and now - self._heartbeats_checked > _MASTER_STALL
        self._heartbeats_checked = now
        for w in list(self.workers.values()):
            if stalled:
                w.last_seen = max(w.last_seen, now)  # their silence proves nothing: start over
            if not w.ready or w.draining or w.killed:
                continue
            fields = {"worker_pid": w.pid, "silent_s": round(now - w.last_seen, 1)}
            if now - w.last_seen >= _STUCK_KILL:
                log.error("worker stuck; killing it to replace it", extra={"fields": fields})
                w.killed = True
                self._kill([w.pid], signal.SIGKILL)
            elif now - w.last_seen >= _HEARTBEAT_STALE and not w.silent:
                w.silent = True
                log.warning("worker not responding", extra={"fields": fields})
            elif now - w.last_seen < _HEARTBEAT_STALE and w.silent:
                w.silent = False
                log.info("worker responding again", extra={"fields": fields})

    def _generation_ready(self) -> bool:
        cur = self.current()
        return len(cur) == self.cfg.worker_count and all(w.ready for w in cur)

    def _serving(self) -> list[WorkerProc]:
        """The generation that takes connections: during a reload the old one, until the new
        one is ready."""
        if self.reload_pending is None:
            return self.current()
        return [w for w in self.workers.values()
                if w.generation != self.generation and not w.draining]

    def _serving_ready(self) -> bool:
        """What /readyz says: every worker of the serving generation ready (a reload does not
        take proxyd out of a load balancer: the old generation serves until the new one is)."""
        serving = self._serving()
        return (self.announced and not self.stopping and len(serving) == self.cfg.worker_count
                and all(w.ready and not w.silent for w in serving))

    def _notify_periodic(self, now: float) -> None:
        if now - self._last_status >= _STATUS_EVERY:
            self._last_status = now
            self._sample_rate(now)
            self.notify.status(self.status_line())
        interval = self.notify.watchdog_interval
        if interval and now - self._last_watchdog >= interval and self._all_heartbeating(now):
            self._last_watchdog = now
            self.notify.watchdog()

    def _all_heartbeating(self, now: float) -> bool:
        # The serving workers: ready and not draining (during a reload the old generation
        # serves until the new one is ready). A stuck one stops reporting and so the pings.
        serving = [w for w in self.workers.values() if w.ready and not w.draining]
        return bool(serving) and all(now - w.last_seen < _HEARTBEAT_STALE for w in serving)

    def totals(self) -> dict[str, object]:
        """Counters summed over live workers and the ones that exited."""
        out: dict[str, object] = {}
        merge(out, self.totals_dead)
        for w in self.workers.values():
            merge(out, {k: w.stats[k] for k in ("counters", "origins") if k in w.stats})
        return out

    def gauges(self) -> dict[str, object]:
        """Gauges summed over live workers only."""
        out: dict[str, object] = {}
        for w in self.workers.values():
            if not w.draining and isinstance(w.stats.get("gauges"), dict):
                merge(out, w.stats["gauges"])  # type: ignore[arg-type]
        return out

    def metrics_view(self) -> MetricsView:
        """The aggregated state the Prometheus collector exposes."""
        totals = self.totals()
        configured = {f"{o.host.lower()}:{o.port}" for o in self.cfg.origin}
        cap = self.cfg.metrics_max_origins
        totals["origins"] = self.labels.fold(totals.get("origins", {}), configured, cap)  # type: ignore[arg-type]
        gauges = self.gauges()
        gauges["pools"] = self.labels.fold(gauges.get("pools", {}), configured, cap)  # type: ignore[arg-type]
        return MetricsView(totals, gauges, len(self.current()), self.worker_restarts,
                           self.reloads_ok, self.reloads_failed, self.last_reload_success)

    def _sample_rate(self, now: float) -> None:
        """The request rate over the last _STATUS_EVERY seconds. Sampled on the master's
        clock only, so that reading /status does not shorten systemd's STATUS= window."""
        requests = float(self.totals().get("counters", {}).get("requests", 0))  # type: ignore[union-attr]
        then, before = self._status_requests
        self._request_rate = (requests - before) / (now - then) if then and now > then else 0.0
        self._status_requests = (now, requests)

    def status_line(self) -> str:
        """One-line summary for systemd's STATUS= and /status."""
        t = collections.defaultdict(float, self.totals().get("counters", {}))  # type: ignore[arg-type]
        rate = self._request_rate
        served = t["warm_hits"] + t["pool_misses"]
        hit = f"{100 * t['warm_hits'] / served:.1f}%" if served else "n/a"
        return (f"{len(self.current())} workers, {rate:.0f} req/s, warm hit {hit}, "
                f"{int(t['requests'])} requests")

    # -- reload -------------------------------------------------------------------------------
    def reload(self) -> None:
        """SIGHUP: validate the new config, start a new generation, drain the old one."""
        if self.loader is None:
            log.warning("reload ignored: no configuration file to read")
            return
        if self.reload_pending is not None:
            # The file may have changed again since this reload read it: the last SIGHUP
            # must win (as with nginx and HAProxy), so read it once more when this one ends.
            self.reload_again = True
            log.info("reload requested while one is starting: it follows when that one ends")
            return
        self.notify.reloading()
        try:
            new = self.loader()
        except Exception as exc:  # noqa: BLE001 — whatever the reason, the master must live on
            self.reloads_failed += 1
            error = str(exc) if isinstance(exc, ConfigError) else f"{type(exc).__name__}: {exc}"
            log.error("reload refused: invalid configuration; old configuration keeps serving",
                      extra={"fields": {"error": error}})
            self.notify.ready(self.status_line())
            return
        for key, old_value, new_value, bound in (
                ("listen", self.cfg.listen, new.listen, self.address),
                ("metrics_listen", self.cfg.metrics_listen, new.metrics_listen,
                 self.admin_address)):
            if new_value != old_value:
                log.warning("listen address changes need a restart; keeping the current listener",
                            extra={"fields": {"key": key, "listen": bound, "asked": new_value}})
        self.reload_pending = new
        self.reload_deadline = time.monotonic() + new.timeouts.connect + new.timeouts.tls_handshake + 5
        self.generation += 1
        for _ in range(new.worker_count):
            self.spawn(new, self.generation)

    def _advance_reload(self, now: float) -> None:
        new = self.reload_pending
        if new is None:
            return
        cur = self.current()
        if len(cur) == new.worker_count and all(w.ready for w in cur):
            old = [w for w in self.workers.values() if w.generation != self.generation]
            for w in old:
                w.draining = True
            self._kill([w.pid for w in old], signal.SIGTERM)
            self.cfg = new
            logging.getLogger("proxyd").setLevel(new.log_level.upper())
            self.reload_pending = None
            self.reloads_ok += 1
            self.last_reload_success = time.time()
            log.info("reloaded", extra={"fields": {"generation": self.generation,
                                                   "draining": len(old)}})
            self.notify.ready(self.status_line())
            self._reload_again()
        elif now > self.reload_deadline:
            log.error("new workers not ready in time; reload aborted")
            self._abort_reload()

    def _reload_again(self) -> None:
        """Run the reload asked for while the last one was starting, if any."""
        if self.reload_again and not self.stopping:
            self.reload_again = False
            self.reload()

    def _abort_reload(self) -> None:
        new_gen = [w for w in self.workers.values() if w.generation == self.generation]
        for w in new_gen:
            w.draining = True
        self._kill([w.pid for w in new_gen], signal.SIGKILL)
        self.generation -= 1
        self.reload_pending = None
        self.reloads_failed += 1
        self.notify.ready(self.status_line())
        self._reload_again()

    # -- admin endpoints ----------------------------------------------------------------------
    def _admin(self, method: str, path: str) -> tuple[int, str, bytes]:
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if path == "/healthz":
            return 200, "text/plain", b"ok\n"
        if path == "/readyz":
            ready = self._serving_ready()
            return (200, "text/plain", b"ready\n") if ready else (503, "text/plain", b"not ready\n")
        if path in ("/status", "/"):
            return 200, "text/plain; charset=utf-8", self.status_page().encode()
        return 404, "text/plain", b"not found: try /metrics, /healthz, /readyz, /status\n"

    def status_page(self) -> str:
        """A human-readable page: workers, pools per origin, warm-hit ratio, recent errors."""
        lines = [f"proxyd on {self.address}: {self.status_line()}", ""]
        for w in sorted(self.workers.values(), key=lambda w: w.pid):
            state = ("draining" if w.draining else "not responding" if w.silent
                     else "ready" if w.ready else "starting")
            lines.append(f"worker {w.pid} generation {w.generation} {state}")
            gauges = w.stats.get("gauges", {})
            for label, p in sorted(gauges.get("pools", {}).items()):  # type: ignore[union-attr]
                lines.append(f"  pool {label}: idle={p['idle']} busy={p['busy']} "
                             f"connecting={p['connecting']} private={p.get('private', 0)} "
                             f"waiting={p['waiting']}")
            for origin, err in sorted(w.stats.get("recent_errors", {}).items()):  # type: ignore[union-attr]
                lines.append(f"  last error {origin}: {err}")
        lines.append("")
        for label, o in sorted(self.metrics_view().totals.get("origins", {}).items()):  # type: ignore[union-attr]
            hit, miss = o.get("pool", {}).get("hit", 0), o.get("pool", {}).get("miss", 0)
            ratio = f"{100 * hit / (hit + miss):.1f}%" if hit + miss else "n/a"
            total = sum(o.get("requests", {}).values())
            lines.append(f"origin {label}: {total} requests, warm hit {ratio}")
        return "\n".join(lines) + "\n"

    # -- stop ---------------------------------------------------------------------------------
    def _handle_signal(self, signum: int) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            if self.stopping:
                log.warning("second stop signal: stopping now")
                self._kill(list(self.workers), signal.SIGKILL)
            else:
                self.begin_stop()
        elif signum == signal.SIGQUIT:
            log.warning("SIGQUIT: stopping at once")
            self.stopping = True
            self.stop_deadline = float("inf")  # nothing left to time out
            self.notify.stopping()
            self._kill(list(self.workers), signal.SIGKILL)
        elif signum == signal.SIGHUP and not self.stopping:
            self.reload()
        elif signum in (signal.SIGUSR1, signal.SIGUSR2):
            # Not nginx's reopen-logs (proxyd writes to stderr, there is nothing to reopen) nor
            # HAProxy's reload: say so rather than die of the default action.
            log.warning("signal ignored: SIGHUP reloads, SIGTERM stops",
                        extra={"fields": {"signal": signal.Signals(signum).name}})

    def begin_stop(self) -> None:
        """Graceful stop: workers finish in-flight requests up to the shutdown timeout."""
        if self.stopping:
            return
        self.stopping = True
        self.notify.stopping()
        self.stop_deadline = time.monotonic() + self.cfg.timeouts.shutdown + 1.0
        log.info("stopping", extra={"fields": {"workers": len(self.workers)}})
        self._kill(list(self.workers), signal.SIGTERM)
        self._stop_listening()

    def _stop_listening(self) -> None:
        """Refuse new connections at once instead of queueing them until exit.

        shutdown() on a listening socket stops it for every process sharing it; the
        workers have been told to stop accepting and finish what they hold.
        """
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    @staticmethod
    def _kill(pids: list[int], sig: int) -> None:
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def open_listener(cfg: Config) -> socket.socket:
    """The listening socket: inherited from systemd socket activation, or bound here.

    Raises ConfigError when an inherited socket is not loopback and nothing restricts who
    may use it: the open-proxy guard of ``listen`` applies to the socket unit's address too.
    """
    inherited = listen_fds()
    if not inherited:
        return bind_listener(cfg.listen, cfg.source)
    sock = inherited[0]
    address = _ip_sockname(sock)
    for extra in inherited[1:]:
        log.warning("socket activation passed more than one socket; only the first is used",
                    extra={"fields": {"listen": address, "closed": _ip_sockname(extra)}})
        extra.close()
    if address is not None:
        check_activated_address(cfg, address)
    log.info("listening on the socket systemd passed; the listen setting does not apply",
             extra={"fields": {"listen": address or "unix", "configured": cfg.listen}})
    return sock


def _ip_sockname(sock: socket.socket) -> str | None:
    """``host:port`` of an IP socket (brackets for IPv6); None for any other family."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}"


def check_activated_address(cfg: Config, address: str) -> None:
    """Apply ``listen``'s open-proxy guard to the address of a socket systemd passed."""
    validate_listen_address(dataclasses.replace(
        cfg, listen=address, source=f"{cfg.source} (socket passed by systemd)"))


def run(cfg: Config, loader: Callable[[], Config] | None = None) -> int:
    """Bind (or inherit) the listener, start the workers, supervise until stopped."""
    try:
        sock = open_listener(cfg)
    except ConfigError as exc:
        print(f"proxyd: configuration error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        log.critical("cannot listen", extra={"fields": {"key": "listen", "listen": cfg.listen,
                                                        "error": exc.strerror}})
        return 1
    try:
        admin = bind_listener(cfg.metrics_listen, cfg.source, backlog=64)
    except OSError as exc:
        log.critical("cannot listen", extra={"fields": {
            "key": "metrics_listen", "listen": cfg.metrics_listen, "error": exc.strerror}})
        return 1
    master = Master(cfg, sock, loader, admin_sock=admin)
    log.info("starting", extra={"fields": {"listen": master.address,
                                           "metrics_listen": bound_address(admin),
                                           "workers": cfg.worker_count}})
    return master.run()
