"""Fixtures for the proxyd black-box suite.

* ``ca`` / ``ca_pem``          session trustme CA and its PEM file (what proxyd is told to trust)
* ``tls_origin``               a started TLS ``OriginServer`` (cert from ``ca``); ``.ca_pem``
* ``origin_factory(**kw)``     more origins (``tls=False``, ``idle_close_after=``, ``ca=`` ...)
* ``echo_server``              raw TCP echo server for CONNECT tests
* ``proxyd(...)``              starts ``python -m proxyd`` and waits for its ready line; see
                               ``ProxydProcess`` for what the handle offers

Set ``PROXYD_CMD`` (shell syntax) to test a different proxyd command, e.g. an installed
``proxyd`` entry point; the default is ``python -m proxyd`` run from the repository root.
"""

from __future__ import annotations

import os
import re
import select
import shlex
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from origin import EchoServer, OriginServer, make_ca  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
READY_TIMEOUT = 20.0
_PROXY_ENV = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy",
              "ALL_PROXY", "no_proxy", "NO_PROXY")


def proxyd_command() -> list[str]:
    cmd = os.environ.get("PROXYD_CMD")
    return shlex.split(cmd) if cmd else [sys.executable, "-m", "proxyd"]


def proxyd_env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _PROXY_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


def run_proxyd(*args, timeout: float = 20.0, **kw) -> subprocess.CompletedProcess:
    """Run a one-shot proxyd command (check, --version) and capture its output."""
    return subprocess.run(proxyd_command() + list(args), cwd=REPO, env=proxyd_env(),
                          capture_output=True, text=True, timeout=timeout, **kw)


# --------------------------------------------------------------------------------------
# TOML writer for test configs (tests may also pass a TOML string verbatim)
# --------------------------------------------------------------------------------------


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def to_toml(cfg: dict) -> str:
    """Top-level scalars, then [tables], then [[arrays of tables]] (lists of dicts)."""
    out = []
    tables, arrays = {}, {}
    for k, v in cfg.items():
        if isinstance(v, dict):
            tables[k] = v
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            arrays[k] = v
        else:
            out.append(f"{k} = {_toml_value(v)}")
    for name, t in tables.items():
        out.append(f"\n[{name}]")
        out += [f"{k} = {_toml_value(v)}" for k, v in t.items()]
    for name, items in arrays.items():
        for t in items:
            out.append(f"\n[[{name}]]")
            out += [f"{k} = {_toml_value(v)}" for k, v in t.items()]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------
# Process handle
# --------------------------------------------------------------------------------------


_LOGFMT = re.compile(r'(\w[\w.\-]*)=("(?:[^"\\]|\\.)*"|\S*)')


def parse_logfmt(line: str) -> dict:
    out = {}
    for k, v in _LOGFMT.findall(line):
        if v.startswith('"'):
            v = v[1:-1].replace('\\"', '"').replace("\\\\", "\\")
        out[k] = v
    return out


def pid_alive(pid: int) -> bool:
    """True while pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_pid_gone(pid: int, timeout: float) -> bool:
    """Wait (event-driven, via pidfd) until a process that need not be our child exits."""
    try:
        fd = os.pidfd_open(pid)
    except (ProcessLookupError, OSError):
        return not pid_alive(pid)
    try:
        p = select.poll()
        p.register(fd, select.POLLIN)
        p.poll(timeout * 1000)
        return not pid_alive(pid)
    finally:
        os.close(fd)


def proc_start_time(pid: int) -> int | None:
    """Start time (clock ticks since boot) of pid, to tell it apart from a reused pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class ProxydProcess:
    """A running ``proxyd`` master started by the ``proxyd`` fixture.

    Attributes: ``proc`` (Popen), ``pid``, ``port``, ``proxy_url`` ("http://127.0.0.1:PORT"),
    ``metrics_port`` (None unless the ready line says ``metrics_listen=``), ``ready_line``,
    ``ready`` (its logfmt fields), ``config_path`` (None if started without --config),
    ``startup_seconds`` (spawn -> ready line), ``argv``.
    """

    def __init__(self, argv: list[str], config_path: Path | None, env: dict | None):
        self.argv = argv
        self.config_path = config_path
        self._lines: list[str] = []
        self._stdout: list[str] = []
        self._cond = threading.Condition()
        self._eof = False
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.ready_line = ""
        self.ready: dict = {}
        self._t0 = time.monotonic()
        self.proc = subprocess.Popen(argv, cwd=REPO, env=proxyd_env(env),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, errors="replace")
        self.pid = self.proc.pid
        self._known_workers: dict[int, int | None] = {}  # pid -> start time
        self._readers = [
            threading.Thread(target=self._pump, args=(self.proc.stderr, self._lines, True),
                             daemon=True, name=f"proxyd-{self.pid}-stderr"),
            threading.Thread(target=self._pump, args=(self.proc.stdout, self._stdout, False),
                             daemon=True, name=f"proxyd-{self.pid}-stdout"),
        ]
        for t in self._readers:
            t.start()

    def _pump(self, stream, sink, is_stderr):
        for line in stream:
            with self._cond:
                sink.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            if is_stderr:
                self._eof = True
            self._cond.notify_all()

    # -- logs ----------------------------------------------------------------------

    def stderr_text(self) -> str:
        with self._cond:
            return "\n".join(self._lines)

    def stdout_text(self) -> str:
        with self._cond:
            return "\n".join(self._stdout)

    def log_lines(self) -> list[dict]:
        with self._cond:
            return [parse_logfmt(line) for line in self._lines]

    def wait_for_log(self, pattern: str, timeout: float = 5.0, start: int = 0) -> str | None:
        """Wait for a stderr line (index >= start) matching regex pattern; None on timeout/exit."""
        rx = re.compile(pattern)
        found = []

        def check():
            for line in self._lines[start:]:
                if rx.search(line):
                    found.append(line)
                    return True
            return self._eof

        with self._cond:
            self._cond.wait_for(check, timeout)
        return found[0] if found else None

    def log_mark(self) -> int:
        with self._cond:
            return len(self._lines)

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        line = self.wait_for_log(r"\bmsg=\"?ready\b", timeout)
        if line is None:
            rc = self.proc.poll()
            pytest.fail(f"proxyd did not print msg=ready within {timeout}s "
                        f"(exit code {rc}); argv={self.argv}\n--- stderr ---\n"
                        f"{self.stderr_text()}\n--- stdout ---\n{self.stdout_text()}")
        self.startup_seconds = time.monotonic() - self._t0
        self.ready_line = line
        self.ready = parse_logfmt(line)
        m = re.search(r"\blisten=\"?127\.0\.0\.1:(\d+)", line)
        assert m, f"ready line has no listen=127.0.0.1:PORT: {line!r}"
        self.port = int(m.group(1))
        m = re.search(r"\bmetrics_listen=\"?[\d.]+:(\d+)", line)
        self.metrics_port = int(m.group(1)) if m else None
        self.worker_pids()

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- processes -----------------------------------------------------------------

    def worker_pids(self) -> list[int]:
        try:
            with open(f"/proc/{self.pid}/task/{self.pid}/children") as f:
                pids = [int(p) for p in f.read().split()]
        except OSError:
            return []
        for pid in pids:
            self._known_workers.setdefault(pid, proc_start_time(pid))
        return pids

    def rss_kib(self, include_master: bool = True) -> int:
        """Sum of VmRSS (KiB) of the workers (and the master)."""
        pids = self.worker_pids() + ([self.pid] if include_master else [])
        return sum(rss_kib(p) for p in pids)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def terminate(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the master and wait; returns its exit code (None if it had to be killed)."""
        self.worker_pids()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                return None
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the master we started and the worker pids we saw it parent."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for pid, started in self._known_workers.items():
            if started is None or proc_start_time(pid) != started:
                continue  # gone, or the pid now belongs to another process
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    def close(self) -> None:
        if self.proc.poll() is None:
            rc = self.terminate()
            if rc != 0:
                tail = "\n".join(self.stderr_text().splitlines()[-15:])
                warnings.warn(f"proxyd pid {self.pid} did not exit 0 on SIGTERM at teardown "
                              f"(exit code {rc}; None = killed after 10 s)\n{tail}")
        self.kill()  # no-op unless something is left over
        for t in self._readers:
            t.join(5)


# --------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ca():
    return make_ca()


@pytest.fixture(scope="session")
def ca_pem(ca, tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(p))
    return p


@pytest.fixture
def origin_factory(ca, ca_pem):
    started: list = []

    def make(**kw) -> OriginServer:
        kw.setdefault("ca", ca)
        o = OriginServer(**kw).start()
        o.ca_pem = ca_pem if kw["ca"] is ca else None
        started.append(o)
        return o

    yield make
    for o in started:
        o.stop()


@pytest.fixture
def tls_origin(origin_factory) -> OriginServer:
    return origin_factory()


@pytest.fixture
def echo_server():
    e = EchoServer().start()
    yield e
    e.stop()


_DEFAULT = object()


@pytest.fixture
def proxyd(tmp_path, ca_pem):
    """Factory: ``proxyd(*extra_args, config=None, workers=1, ca_file=<session CA>,
    origins=(), warm=None, log_level=None, env=None, wait_ready=True, listen=True)``.

    ``config`` is a dict (written as TOML) or a TOML string; it goes to --config.  Flags are
    added for listen/metrics-listen (127.0.0.1:0), --workers, --ca-file (pass ca_file=None
    to leave it to the config), each --origin and --warm.
    """
    procs: list[ProxydProcess] = []

    def start(*extra, config=None, workers=1, ca_file=_DEFAULT, origins=(), warm=None,
              log_level=None, env=None, wait_ready=True, listen=True) -> ProxydProcess:
        argv = proxyd_command()
        cfg_path = None
        if config is not None:
            cfg_path = tmp_path / f"proxyd-{len(procs)}.toml"
            cfg_path.write_text(config if isinstance(config, str) else to_toml(config))
            argv += ["--config", str(cfg_path)]
        if listen:
            argv += ["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"]
        if workers is not None:
            argv += ["--workers", str(workers)]
        if ca_file is _DEFAULT:
            ca_file = ca_pem
        if ca_file is not None:
            argv += ["--ca-file", str(ca_file)]
        for o in origins:
            argv += ["--origin", o]
        if warm is not None:
            argv += ["--warm", str(warm)]
        if log_level:
            argv += ["--log-level", log_level]
        argv += [str(a) for a in extra]
        p = ProxydProcess(argv, cfg_path, env)
        procs.append(p)
        if wait_ready:
            p.wait_ready()
        return p

    yield start
    for p in procs:
        p.close()
