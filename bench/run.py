#!/usr/bin/env python3
"""proxyd benchmark harness: proxyd against nginx and HAProxy as TLS-originating forward proxies.

Everything runs on 127.0.0.1 in a temporary directory: an nginx HTTPS origin (trustme
certificate), the proxies, a delay relay for the WAN scenario, and wrk / Python clients.
See bench/README.md. ``bench/run --list`` lists the scenarios.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import platform
import re
import resource
import selectors
import shlex
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))  # delay_relay, also when run.py is imported from elsewhere
from delay_relay import ANC_SIZE, kernel_time, timestamp_reads  # noqa: E402
RESULTS = HERE / "results"
APT_CMD = "apt-get install nginx haproxy wrk"
TOOLS = ("nginx", "haproxy", "wrk")
PROXIES = ("proxyd", "nginx", "haproxy")
KIB = 1024
MIB = 1024 * 1024
FILES = {"1k": KIB, "1m": MIB}

SCENARIOS: dict[str, str] = {
    "rps-1k": "1 KiB responses, 32 connections (wrk): requests/s",
    "mbps-1m": "1 MiB responses, 8 connections (wrk): MB/s",
    "latency-seq": "one client, sequential keep-alive requests (http.client): "
                   "latency added over a pooled direct TLS client, p50/p99 in µs",
    "wan": "20 ms RTT delay relay between proxy and origin: sequential p50 vs fresh TLS and "
           "pooled direct; 32-request cold burst at start and after --idle seconds",
    "idle-conns": "RSS of one proxyd worker (workers=1) holding 10,000 idle client "
                  "connections: KiB per connection",
    "overhead": "proxyd rps-1k with metrics on vs off and access log on vs off",
}

# Targets from the project's issue.
TARGET_TEXT = {
    "rps": "≥ 0.6 × nginx",
    "mbps": "≥ 0.6 × nginx",
    "added_p50": "≤ 100 µs",
    "wan_vs_pooled": "≤ 1.05 × pooled direct",
    "wan_vs_fresh": "≥ 2.8× faster than fresh TLS",
    "burst_p99": "p99 ≤ 1.3 RTT",
    "idle_kib": "≤ 4 KiB/conn",
    "metrics_cost": "≤ 3 % cost",
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    """A set-up step failed; the message says which and why."""


# ------------------------------------------------------------------------------------------
# processes
# ------------------------------------------------------------------------------------------

def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc)."""
    out = []
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            out = [int(x) for x in fh.read().split()]
    except OSError:
        pass
    return out


def _descendants(pid: int) -> list[int]:
    seen: list[int] = []
    todo = [pid]
    while todo:
        for child in _children(todo.pop()):
            if child not in seen:
                seen.append(child)
                todo.append(child)
    return seen


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time used so far by ``pids`` (from /proc; gone pids count 0)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total / tick


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Proc:
    """A process this bench started; stopped by its PID (and its descendants' PIDs)."""

    registry: list["Proc"] = []

    def __init__(self, name: str, cmd: list[str], logfile: Path, env: dict | None = None,
                 cwd: Path | None = None, stop_signal: int = signal.SIGTERM,
                 stdout_pipe: bool = False) -> None:
        self.name = name
        self.cmd = cmd
        self.logfile = logfile
        self.stop_signal = stop_signal
        self.log_fh = open(logfile, "ab")  # O_APPEND: the bench may truncate it
        self.popen = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else self.log_fh, stderr=self.log_fh,
            env=env, cwd=cwd, start_new_session=True)
        self.pid = self.popen.pid
        self.known_children: set[int] = set()
        Proc.registry.append(self)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def children(self) -> list[int]:
        kids = _descendants(self.pid)
        self.known_children.update(kids)
        return kids

    def log_text(self, tail: int = 4000) -> str:
        try:
            data = self.logfile.read_bytes()
        except OSError:
            return ""
        return data[-tail:].decode("utf-8", "replace")

    def wait_for(self, check: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                self.children()
                return
            if not self.alive():
                raise BenchError(f"{self.name} exited with status {self.popen.returncode} "
                                 f"before {what}; log {self.logfile}:\n{self.log_text()}")
            time.sleep(0.02)
        raise BenchError(f"{self.name}: {what} not seen within {timeout:g} s; log "
                         f"{self.logfile}:\n{self.log_text()}")

    def stop(self, timeout: float = 10.0) -> int | None:
        if self in Proc.registry:
            Proc.registry.remove(self)
        if self.alive():
            self.children()
            try:
                os.kill(self.pid, self.stop_signal)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"{self.name} (pid {self.pid}) did not stop in {timeout:g} s; SIGKILL")
                for pid in [self.pid, *self.children()]:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                self.popen.wait(5)
        # Children that outlived their parent (should not happen): end them by PID.
        for pid in self.known_children:
            try:
                with open(f"/proc/{pid}/stat") as fh:
                    stat = fh.read()
                if stat.split(") ", 1)[1].split()[0] != "Z":
                    os.kill(pid, signal.SIGKILL)
            except (OSError, IndexError):
                pass
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        self.log_fh.close()
        return self.popen.returncode

    @classmethod
    def stop_all(cls) -> None:
        for proc in list(reversed(cls.registry)):
            try:
                proc.stop(timeout=5)
            except Exception as exc:  # noqa: BLE001 -- cleanup must go on
                log(f"stopping {proc.name}: {exc}")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


_used_ports: set[int] = set()


def free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _used_ports:
            _used_ports.add(port)
            return port


# ------------------------------------------------------------------------------------------
# the environment: temp dir, certificates, files, origin, proxies
# ------------------------------------------------------------------------------------------

NGINX_COMMON = """\
daemon off;
master_process on;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
worker_rlimit_nofile 20000;
{user}
"""

NGINX_TEMP = """\
  client_body_temp_path {d}/client_body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
"""

ORIGIN_CONF = NGINX_COMMON + """\
worker_processes 1;
events {{ worker_connections 16384; }}
http {{
{temp}
  access_log off;
  default_type application/octet-stream;
  sendfile on;
  tcp_nopush on;
  tcp_nodelay on;
  keepalive_timeout 300s;
  keepalive_requests 100000000;
  server {{
    listen 127.0.0.1:{port} ssl;
    server_name localhost;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_protocols TLSv1.2 TLSv1.3;
    root {www};
    location / {{ }}
  }}
}}
"""

NGINX_PROXY_CONF = NGINX_COMMON + """\
worker_processes 2;
events {{ worker_connections 16384; }}
http {{
{temp}
  access_log {d}/access.log combined buffer=64k flush=1s;
  keepalive_requests 100000;
  upstream origin {{
    server 127.0.0.1:{origin_port};
    keepalive 64;
  }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass https://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_ssl_verify on;
      proxy_ssl_trusted_certificate {ca};
      proxy_ssl_server_name on;
      proxy_ssl_name localhost;
      proxy_ssl_session_reuse on;
    }}
  }}
}}
"""

HAPROXY_CONF = """\
global
  nbthread 2
  maxconn {maxconn}
  ssl-server-verify required
  pidfile {d}/haproxy.pid

defaults
  mode http
  option http-keep-alive
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  timeout http-request 10s
  timeout http-keep-alive 60s

frontend fe
  bind 127.0.0.1:{port}
  default_backend be

backend be
  http-reuse always
  server o 127.0.0.1:{origin_port} ssl verify required ca-file {ca} sni str(localhost)
"""


@dataclass
class ProxyInst:
    """A running proxy (or the origin) and how clients reach the origin through it."""

    kind: str               # proxyd, nginx, haproxy, origin
    label: str
    proc: Proc
    port: int
    origin_port: int        # what the absolute URI names (origin or relay port)
    dir: Path
    log_offset: int = 0
    findings: dict[str, Any] = field(default_factory=dict)
    metrics_port: int = 0

    def uri(self, name: str) -> str:
        return f"http://localhost:{self.origin_port}/{name}"

    @property
    def host_header(self) -> str:
        return f"localhost:{self.origin_port}"

    def workers(self) -> list[int]:
        return self.proc.children()


class Env:
    """The temp dir, certificates, origin and the instances started so far."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="proxyd-bench-"))
        os.chmod(self.tmp, 0o755)  # nginx workers run as nobody when started as root
        self.www = self.tmp / "www"
        self.www.mkdir()
        self.anomalies: list[dict[str, Any]] = []
        self.instances: list[ProxyInst] = []
        self.origin: ProxyInst | None = None
        self.relay: tuple[Proc, int] | None = None
        self.shared: dict[str, ProxyInst] = {}
        self.metrics_switch: str | None | bool = False  # False: not probed yet
        self.proxyd_findings: list[dict[str, Any]] = []
        self._labels: dict[str, int] = {}
        self._make_certs()
        for name, size in FILES.items():
            (self.www / name).write_bytes(bytes((i * 7 + 13) % 251 for i in range(251)) * (size // 251)
                                          + b"x" * (size % 251))
            os.chmod(self.www / name, 0o644)
        os.chmod(self.www, 0o755)

    def _make_certs(self) -> None:
        import trustme
        ca = trustme.CA()
        cert = ca.issue_cert("localhost", "127.0.0.1")
        self.ca_pem = self.tmp / "ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_pem))
        self.cert_pem = self.tmp / "server.pem"
        cert.cert_chain_pems[0].write_to_path(str(self.cert_pem))
        for extra in cert.cert_chain_pems[1:]:
            extra.write_to_path(str(self.cert_pem), append=True)
        self.key_pem = self.tmp / "server.key"
        cert.private_key_pem.write_to_path(str(self.key_pem))
        os.chmod(self.ca_pem, 0o644)
        self.client_ctx = ssl.create_default_context(cafile=str(self.ca_pem))

    def note(self, where: str, what: str, **details: Any) -> None:
        entry = {"where": where, "what": what, **details}
        self.anomalies.append(entry)
        log(f"NOTE {where}: {what} {json.dumps(details) if details else ''}")

    # -- nginx / haproxy ----------------------------------------------------------------------
    def _nginx(self, label: str, template: str, **kw: Any) -> Proc:
        d = self.tmp / label
        d.mkdir(exist_ok=True)
        user = "user nobody nogroup;" if os.geteuid() == 0 else ""
        conf = d / "nginx.conf"
        conf.write_text(template.format(d=d, user=user, temp=NGINX_TEMP.format(d=d), **kw))
        return Proc(label, ["nginx", "-p", str(d), "-e", str(d / "error.log"), "-c", str(conf)],
                    d / "stderr.log", stop_signal=signal.SIGTERM)

    def start_origin(self) -> ProxyInst:
        if self.origin is None:
            port = free_port()
            proc = self._nginx("origin", ORIGIN_CONF, port=port, cert=self.cert_pem,
                               key=self.key_pem, www=self.www)
            proc.wait_for(lambda: port_open(port), 10, "origin listening")
            self.origin = ProxyInst("origin", "origin", proc, port, port, self.tmp / "origin")
            log(f"origin nginx on 127.0.0.1:{port} (pid {proc.pid})")
        return self.origin

    def start_relay(self) -> int:
        """The WAN delay relay in front of the origin; returns its port."""
        if self.relay is None:
            origin = self.start_origin()
            d = self.tmp / "relay"
            d.mkdir(exist_ok=True)
            proc = Proc("delay-relay", [sys.executable, str(HERE / "delay_relay.py"),
                                        "--listen", "127.0.0.1:0",
                                        "--target", f"127.0.0.1:{origin.port}",
                                        "--delay-ms", str(self.args.wan_delay_ms)],
                        d / "relay.log", stdout_pipe=True)
            line = proc.popen.stdout.readline().decode()  # type: ignore[union-attr]
            m = re.match(r"ready \S+:(\d+)", line)
            if not m:
                raise BenchError(f"delay relay did not start: {line!r} {proc.log_text()}")
            self.relay = (proc, int(m.group(1)))
            _used_ports.add(int(m.group(1)))
            log(f"delay relay on 127.0.0.1:{self.relay[1]} -> origin, "
                f"{self.args.wan_delay_ms:g} ms each way")
        return self.relay[1]

    def start_proxy(self, kind: str, label: str | None = None, upstream_port: int | None = None,
                    workers: int | None = None, extra_toml: str = "",
                    warm: int | None = None) -> ProxyInst:
        origin = self.start_origin()
        up = upstream_port or origin.port
        label = label or kind
        n = self._labels.get(label, 0)   # never reuse a label: it names the dir and the log
        self._labels[label] = n + 1
        label = f"{label}-{n + 1}" if n else label
        port = free_port()
        if kind == "nginx":
            proc = self._nginx(label, NGINX_PROXY_CONF, port=port, origin_port=up, ca=self.ca_pem)
            proc.wait_for(lambda: port_open(port), 10, "nginx listening")
            inst = ProxyInst(kind, label, proc, port, up, self.tmp / label)
        elif kind == "haproxy":
            d = self.tmp / label
            d.mkdir(exist_ok=True)
            nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            (d / "haproxy.cfg").write_text(HAPROXY_CONF.format(
                d=d, port=port, origin_port=up, ca=self.ca_pem,
                maxconn=max(256, min(20000, (nofile - 200) // 2))))
            proc = Proc(label, ["haproxy", "-db", "-f", str(d / "haproxy.cfg")], d / "stderr.log",
                        stop_signal=signal.SIGTERM)
            proc.wait_for(lambda: port_open(port), 10, "haproxy listening")
            inst = ProxyInst(kind, label, proc, port, up, d)
        elif kind == "proxyd":
            inst = self._start_proxyd(label, port, up, workers, extra_toml, warm)
        else:
            raise ValueError(kind)
        self.instances.append(inst)
        return inst

    def _start_proxyd(self, label: str, port: int, up: int, workers: int | None,
                      extra_toml: str, warm: int | None) -> ProxyInst:
        d = self.tmp / label
        d.mkdir(exist_ok=True)
        mport = free_port()
        cmd = proxyd_cmd(self.args) + [
            "--listen", f"127.0.0.1:{port}", "--metrics-listen", f"127.0.0.1:{mport}",
            "--ca-file", str(self.ca_pem), "--origin", f"localhost:{up}",
            "--warm", str(self.args.warm if warm is None else warm)]
        if workers is not None:
            cmd += ["--workers", str(workers)]
        if extra_toml:
            (d / "proxyd.toml").write_text(extra_toml)
            cmd += ["--config", str(d / "proxyd.toml")]
        logfile = d / "proxyd.log"
        proc = Proc(label, cmd, logfile, env=proxyd_env(), cwd=REPO, stop_signal=signal.SIGTERM)

        def ready() -> bool:
            try:
                return b"msg=ready" in logfile.read_bytes()[:200000]
            except OSError:
                return False

        proc.wait_for(ready, 30, "'msg=ready' on stderr")
        inst = ProxyInst("proxyd", label, proc, port, up, d, metrics_port=mport)
        inst.findings = {"label": label, "cmd": " ".join(cmd), "config": extra_toml.strip(),
                         "access_lines": 0, "non_200": 0, "non_200_examples": [],
                         "problems": [], "problem_count": 0}
        return inst

    def stop(self, inst: ProxyInst) -> None:
        rc = inst.proc.stop(timeout=15)
        if inst.kind == "proxyd":
            self.scan_proxyd_log(inst, final=True)   # includes what it logged while stopping
        if inst.kind != "proxyd":
            self.scan_peer_log(inst)
        if rc not in (0, None, -signal.SIGTERM) and not (inst.kind == "haproxy" and rc in (143, 130)):
            self.note(inst.label, f"exit status {rc} after SIGTERM")
        if inst.kind == "proxyd":
            inst.findings["exit_status"] = rc
            if rc not in (0, None):
                self.note(inst.label, f"proxyd exited with status {rc} after SIGTERM")
            self.proxyd_findings.append(inst.findings)
        if inst in self.instances:
            self.instances.remove(inst)
        for key, val in list(self.shared.items()):
            if val is inst:
                del self.shared[key]

    def shared_proxy(self, kind: str) -> ProxyInst:
        """The long-lived instance of ``kind`` used by the throughput/latency scenarios."""
        if kind not in self.shared:
            self.shared[kind] = self.start_proxy(kind)
            check_instance(self, self.shared[kind])
        return self.shared[kind]

    def close(self) -> None:
        for inst in list(self.instances):
            try:
                self.stop(inst)
            except Exception as exc:  # noqa: BLE001
                log(f"stopping {inst.label}: {exc}")
        if self.relay is not None:
            self.relay[0].stop()
        if self.origin is not None:
            self.origin.proc.stop()
            self.scan_peer_log(self.origin)
        Proc.stop_all()
        if self.args.keep_tmp:
            log(f"temp dir kept: {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -- logs ---------------------------------------------------------------------------------
    def scan_proxyd_log(self, inst: ProxyInst, final: bool = False,
                        details: bool = False) -> dict[str, Any]:
        """Count access lines and non-200s since the last scan, keep problems, truncate."""
        path = inst.proc.logfile
        try:
            data = path.read_bytes()
        except OSError:
            return {"access": 0, "non_200": 0}
        if not final:
            os.truncate(path, 0)  # proxyd's stderr is O_APPEND: it keeps writing at the end
        access = data.count(b"kind=access")
        ok = data.count(b" status=200 ")
        f = inst.findings
        f["access_lines"] += access
        non200 = access - ok
        if non200:
            f["non_200"] += non200
            for m in re.finditer(rb"^[^\n]*kind=access[^\n]* status=(?!200 )\d+ [^\n]*$", data, re.M):
                if len(f["non_200_examples"]) >= 5:
                    break
                f["non_200_examples"].append(m.group(0).decode("utf-8", "replace"))
        # logfmt warnings and errors (one line each; tracebacks are escaped in exc=)
        for m in re.finditer(rb"^[^\n]*level=(?:warning|error|critical)[^\n]*$", data, re.M):
            f["problem_count"] += 1
            if len(f["problems"]) < 20:
                f["problems"].append(m.group(0).decode("utf-8", "replace")[:2000])
        # anything printed to stderr outside proxyd's logfmt logger (e.g. asyncio's default
        # exception handler): kept raw, tracebacks counted by their final exception line
        raw = "\n".join(ln for ln in data.decode("utf-8", "replace").splitlines()
                        if ln and not ln.startswith("ts="))
        if raw:
            f["raw_stderr"] = (f.get("raw_stderr", "") + raw + "\n")[:20000]
            f["tracebacks"] = f.get("tracebacks", 0) + raw.count("Traceback (most recent call last)")
            exc = f.setdefault("exceptions", {})
            for m in re.finditer(r"^([A-Za-z_.]*(?:Error|Exception|Exit|Interrupt)\b.*)$", raw, re.M):
                exc[m.group(1)[:300]] = exc.get(m.group(1)[:300], 0) + 1
        out: dict[str, Any] = {"access": access, "non_200": non200}
        if details:
            out["lines"] = [dict(kv.split("=", 1) for kv in ln.split() if "=" in kv)
                            for ln in data.decode("utf-8", "replace").splitlines()
                            if "kind=access" in ln]
        return out

    def scan_peer_log(self, inst: ProxyInst) -> None:
        for path in (inst.dir / "error.log", inst.dir / "stderr.log"):
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            bad = [ln for ln in text.splitlines()
                   if re.search(r"\[(error|crit|alert|emerg)\]|ALERT|\[ALERT\]", ln)]
            if bad:
                self.note(inst.label, f"{len(bad)} error lines in {path.name}", first=bad[:3])


def proxyd_cmd(args: argparse.Namespace) -> list[str]:
    if args.proxyd_cmd:
        return shlex.split(args.proxyd_cmd)
    return [sys.executable, "-m", "proxyd"]


def proxyd_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.pop("PYTHONUNBUFFERED", None)  # as shipped; the access log batches its writes
    return env


def probe_metrics_switch(args: argparse.Namespace, tmp: Path) -> str | None:
    """The TOML that turns proxyd's metrics off, if this proxyd has such a switch."""
    for text in ("metrics = false\n", "[metrics]\nenabled = false\n"):
        f = tmp / "probe-metrics.toml"
        f.write_text(text)
        r = subprocess.run(proxyd_cmd(args) + ["check", "--config", str(f)], cwd=REPO,
                           env=proxyd_env(), capture_output=True, text=True, timeout=30)
        if r.returncode == 0:
            return text
    return None


# ------------------------------------------------------------------------------------------
# clients
# ------------------------------------------------------------------------------------------

def proxy_get(inst: ProxyInst, name: str, conn: http.client.HTTPConnection | None = None,
              timeout: float = 10.0) -> tuple[int, bytes, http.client.HTTPResponse]:
    own = conn is None
    c = conn or http.client.HTTPConnection("127.0.0.1", inst.port, timeout=timeout)
    try:
        c.request("GET", inst.uri(name), headers={"Host": inst.host_header})
        r = c.getresponse()
        body = r.read()
        return r.status, body, r
    finally:
        if own:
            c.close()


def check_instance(env: Env, inst: ProxyInst) -> None:
    """Absolute-form GETs through the proxy return 200 with the right body, both files."""
    for name, size in FILES.items():
        for attempt in range(2):  # the 2nd goes over a reused upstream connection
            status, body, r = proxy_get(inst, name)
            expect = (env.www / name).read_bytes()
            if status != 200 or body != expect:
                raise BenchError(
                    f"{inst.label}: GET {inst.uri(name)} via 127.0.0.1:{inst.port} -> {status}, "
                    f"{len(body)} bytes (want 200, {size}); headers {r.getheaders()}; "
                    f"body {body[:300]!r}")
    log(f"{inst.label} on 127.0.0.1:{inst.port}: absolute-form GET 1k/1m -> 200, sizes OK")


def wrk_script(env: Env, inst: ProxyInst, name: str) -> Path:
    path = env.tmp / f"wrk-{inst.label}-{name}.lua"
    path.write_text(f"""\
-- An HTTP_PROXY client: absolute-form target, Host of the origin.
wrk.method = "GET"
wrk.path = "{inst.uri(name)}"
wrk.headers["Host"] = "{inst.host_header}"

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {{"requests":%d,"bytes":%d,"duration_us":%d,"connect":%d,"read":%d,' ..
    '"write":%d,"status":%d,"timeout":%d,"lat_p50_us":%d,"lat_p99_us":%d,"lat_max_us":%d}}\\n',
    summary.requests, summary.bytes, summary.duration, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(99), latency.max))
end
""")
    return path


def run_wrk(env: Env, inst: ProxyInst, name: str, conns: int, duration: float,
            where: str, record: bool = True) -> dict[str, Any]:
    threads = min(env.args.wrk_threads, conns)
    script = wrk_script(env, inst, name)
    cmd = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{max(1, round(duration))}s", "--timeout", "10s",
           "-s", str(script), f"http://127.0.0.1:{inst.port}/"]
    load_before = os.getloadavg()[0]
    # CPU the proxy (master and workers) spent on this run: far less sensitive to other load
    # on the machine than requests per second.
    pids = [inst.proc.pid, *_descendants(inst.proc.pid)]
    cpu_before = cpu_seconds(pids)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    cpu_used = cpu_seconds(pids) - cpu_before
    m = re.search(r"WRKJSON (\{.*\})", r.stdout)
    if r.returncode != 0 or not m:
        raise BenchError(f"wrk failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout}\n{r.stderr}")
    res = json.loads(m.group(1))
    res["load_1m_before"] = round(load_before, 2)
    secs = res["duration_us"] / 1e6
    res["rps"] = res["requests"] / secs
    res["mbps"] = res["requests"] * FILES[name] / secs / 1e6  # payload MB/s (10^6 bytes)
    res["bytes_per_req"] = res["bytes"] / res["requests"] if res["requests"] else 0
    res["cpu_us_per_req"] = cpu_used / res["requests"] * 1e6 if res["requests"] else 0.0
    errs = {k: res[k] for k in ("connect", "read", "write", "status", "timeout") if res[k]}
    if not record:
        return res
    if errs:
        env.note(where, f"{inst.label}: wrk reported errors (status = non-2xx/3xx responses)",
                 **errs, requests=res["requests"])
    # wrk counts the bytes of the responses still in flight at the end too
    lo, hi = res["requests"] * FILES[name], (res["requests"] + conns) * (FILES[name] + 2048)
    if res["requests"] and not lo <= res["bytes"] <= hi:
        env.note(where, f"{inst.label}: {res['bytes_per_req']:.0f} bytes per response, expected "
                        f"{FILES[name]} + head")
    if inst.kind == "proxyd":
        counts = env.scan_proxyd_log(inst)
        res["proxyd_log"] = counts
        if counts["non_200"]:
            env.note(where, f"{inst.label}: {counts['non_200']} non-200 statuses in proxyd's "
                            "access log", access_lines=counts["access"])
    return res


def pct(samples: list[float], p: float) -> float:
    s = sorted(samples)
    if not s:
        return float("nan")
    k = (len(s) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def med(values: list[float]) -> float:
    vals = [v for v in values if v == v]
    return statistics.median(vals) if vals else float("nan")


def paired(a: list[float], b: list[float]) -> float:
    """Median of the per-round ratios a[r] / b[r] (rounds measured side by side)."""
    return med([x / y for x, y in zip(a, b) if y])


def rotate(items: list[Any], r: int) -> list[Any]:
    r %= len(items)
    return items[r:] + items[:r]


# ------------------------------------------------------------------------------------------
# scenarios
# ------------------------------------------------------------------------------------------

@dataclass
class Row:
    scenario: str
    metric: str
    values: dict[str, float | str | None]   # per proxy (or reference)
    target: str = ""
    verdict: str = ""
    ratio_n: float | None = None
    ratio_h: float | None = None
    fmt: str = "{:,.0f}"
    note: str = ""


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def throughput(env: Env, scenario: str, name: str, conns: int, key: str) -> tuple[dict, list[Row]]:
    args = env.args
    insts = {k: env.shared_proxy(k) for k in PROXIES}
    for k, inst in insts.items():  # warm-up (pools, caches); not recorded
        run_wrk(env, inst, name, conns, args.warmup, scenario, record=False)
        if inst.kind == "proxyd":
            env.scan_proxyd_log(inst)
    per: dict[str, list[dict]] = {k: [] for k in PROXIES}
    for r in range(args.rounds):
        for k in rotate(list(PROXIES), r):
            res = run_wrk(env, insts[k], name, conns, args.duration, f"{scenario} round {r + 1}")
            per[k].append(res)
            log(f"{scenario} round {r + 1}/{args.rounds} {k:8s} {res['rps']:>10,.0f} req/s "
                f"{res['mbps']:>9,.1f} MB/s  p50 {res['lat_p50_us']} µs p99 {res['lat_p99_us']} µs"
                f"  cpu {res['cpu_us_per_req']:,.1f} µs/req")
    medians = {k: med([x[key] for x in per[k]]) for k in PROXIES}
    cpu = {k: med([x["cpu_us_per_req"] for x in per[k]]) for k in PROXIES}
    lat50 = {k: med([x["lat_p50_us"] for x in per[k]]) for k in PROXIES}
    lat99 = {k: med([x["lat_p99_us"] for x in per[k]]) for k in PROXIES}
    rn = medians["proxyd"] / medians["nginx"]
    rh = medians["proxyd"] / medians["haproxy"]
    unit = "req/s" if key == "rps" else "MB/s"
    result = {"unit": unit, "connections": conns, "file": name, "rounds": per,
              "median": medians, "ratio_vs_nginx": rn, "ratio_vs_haproxy": rh,
              "wrk_latency_p50_us": lat50, "wrk_latency_p99_us": lat99,
              "cpu_us_per_req": cpu, "target": TARGET_TEXT[key], "pass": rn >= 0.6}
    spread = ", ".join(f"{k} {min(x[key] for x in per[k]):,.0f}-{max(x[key] for x in per[k]):,.0f}"
                       for k in PROXIES) if args.rounds > 1 else ""
    rows = [Row(scenario, f"{unit}, {conns} conns", medians, TARGET_TEXT[key], verdict(rn >= 0.6),
                rn, rh, "{:,.0f}" if key == "rps" else "{:,.1f}",
                note=f"range {spread}" if spread else ""),
            Row(scenario, "wrk latency p50 / p99 µs",
                {k: f"{lat50[k]:,.0f} / {lat99[k]:,.0f}" for k in PROXIES}),
            Row(scenario, "proxy CPU µs per request",
                {k: f"{cpu[k]:,.1f}" for k in PROXIES}, ratio_n=cpu["proxyd"] / cpu["nginx"]
                if cpu["nginx"] else None, ratio_h=cpu["proxyd"] / cpu["haproxy"]
                if cpu["haproxy"] else None,
                note="all processes of each proxy, user + system time")]
    return result, rows


def sc_rps(env: Env) -> tuple[dict, list[Row]]:
    return throughput(env, "rps-1k", "1k", 32, "rps")


def sc_mbps(env: Env) -> tuple[dict, list[Row]]:
    return throughput(env, "mbps-1m", "1m", 8, "mbps")


def _seq_block(send: Callable[[], tuple[int, int]], n: int, out: list[float], where: str,
               env: Env, label: str) -> None:
    bad = 0
    for _ in range(n):
        t0 = time.perf_counter_ns()
        status, size = send()
        t1 = time.perf_counter_ns()
        if status != 200 or size != KIB:
            bad += 1
        out.append((t1 - t0) / 1000.0)
    if bad:
        env.note(where, f"{label}: {bad} of {n} responses not 200 with 1024 bytes")


def sc_latency(env: Env) -> tuple[dict, list[Row]]:
    args = env.args
    origin = env.start_origin()
    insts = {k: env.shared_proxy(k) for k in PROXIES}
    n, block = args.seq_requests, 100
    rounds_out: list[dict[str, Any]] = []
    for r in range(args.rounds):
        where = f"latency-seq round {r + 1}"
        direct = http.client.HTTPSConnection("localhost", origin.port, context=env.client_ctx,
                                             timeout=10)
        conns = {k: http.client.HTTPConnection("127.0.0.1", insts[k].port, timeout=10)
                 for k in PROXIES}

        def direct_send() -> tuple[int, int]:
            direct.request("GET", "/1k")
            resp = direct.getresponse()
            return resp.status, len(resp.read())

        def via(k: str) -> Callable[[], tuple[int, int]]:
            c, inst = conns[k], insts[k]
            uri, hdrs = inst.uri("1k"), {"Host": inst.host_header}

            def send() -> tuple[int, int]:
                c.request("GET", uri, headers=hdrs)
                resp = c.getresponse()
                return resp.status, len(resp.read())
            return send

        senders = {"direct": direct_send, **{k: via(k) for k in PROXIES}}
        samples: dict[str, list[float]] = {k: [] for k in senders}
        for k, send in senders.items():   # warm-up: handshake, pools
            _seq_block(send, 50, [], where, env, k)
        done = 0
        while done < n:
            b = min(block, n - done)
            for k in rotate(list(senders), done // block):
                _seq_block(senders[k], b, samples[k], where, env, k)
            done += b
        direct.close()
        for c in conns.values():
            c.close()
        stats = {k: {"p50_us": pct(v, 50), "p99_us": pct(v, 99), "n": len(v)} for k, v in samples.items()}
        for k in PROXIES:
            stats[k]["added_p50_us"] = stats[k]["p50_us"] - stats["direct"]["p50_us"]
            stats[k]["added_p99_us"] = stats[k]["p99_us"] - stats["direct"]["p99_us"]
        rounds_out.append(stats)
        for inst in insts.values():
            if inst.kind == "proxyd":
                env.scan_proxyd_log(inst)
        log(f"latency-seq round {r + 1}: direct p50 {stats['direct']['p50_us']:.0f} µs; added p50 " +
            ", ".join(f"{k} {stats[k]['added_p50_us']:+.0f}" for k in PROXIES) + " µs")
    keys = ("p50_us", "p99_us", "added_p50_us", "added_p99_us")
    medians = {k: {m: med([rd[k][m] for rd in rounds_out if m in rd[k]]) for m in keys
                   if m in rounds_out[0][k]} for k in ("direct", *PROXIES)}
    ok = medians["proxyd"]["added_p50_us"] <= 100
    result = {"requests_per_round": n, "rounds": rounds_out, "median": medians,
              "target": TARGET_TEXT["added_p50"], "pass": ok}
    d = medians["direct"]
    rows = [
        Row("latency-seq", "added p50 µs", {k: medians[k]["added_p50_us"] for k in PROXIES},
            TARGET_TEXT["added_p50"], verdict(ok), fmt="{:,.0f}",
            note=f"direct TLS p50 {d['p50_us']:.0f} µs"),
        Row("latency-seq", "added p99 µs", {k: medians[k]["added_p99_us"] for k in PROXIES},
            fmt="{:,.0f}", note=f"direct TLS p99 {d['p99_us']:.0f} µs"),
    ]
    return result, rows


def burst(inst: ProxyInst, n: int, timeout: float = 30.0) -> list[tuple[float, int, int] | str]:
    """``n`` concurrent first requests, each on its own new connection to the proxy.

    Each latency runs from that socket's connect() to the moment the kernel received the
    last byte of its response (SO_TIMESTAMPNS), so the client's own work is not charged to
    the proxy: the sockets are made before any clock starts, each request is written right
    after its connect() (loopback connects complete at once; a select() waits otherwise),
    and responses read later than they arrived keep their arrival time.
    """
    req = (f"GET {inst.uri('1k')} HTTP/1.1\r\nHost: {inst.host_header}\r\n"
           "User-Agent: proxyd-bench\r\n\r\n").encode()
    sel = selectors.DefaultSelector()
    state: dict[socket.socket, list[Any]] = {}   # sock -> [t0 (wall clock), buffer]
    out: list[tuple[float, int, int] | str] = []
    socks = [_burst_socket() for _ in range(n)]
    for s in socks:
        t0 = time.time()
        s.connect_ex(("127.0.0.1", inst.port))
        state[s] = [t0, bytearray()]
        try:
            s.send(req)
            sel.register(s, selectors.EVENT_READ)
        except OSError:  # not connected yet (or refused: the select tells which)
            sel.register(s, selectors.EVENT_WRITE)
    deadline = time.monotonic() + timeout
    while state and time.monotonic() < deadline:
        for key, ev in sel.select(0.5):
            s = key.fileobj  # type: ignore[assignment]
            t0, buf = state[s]
            if ev & selectors.EVENT_WRITE:
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    out.append(f"connect: {os.strerror(err)}")
                else:
                    s.send(req)
                    sel.modify(s, selectors.EVENT_READ)
                    continue
            else:
                try:
                    data, anc, _flags, _addr = s.recvmsg(65536, ANC_SIZE)
                except OSError as exc:
                    out.append(f"recv: {exc}")
                    data = None
                if data:
                    buf += data
                    end = buf.find(b"\r\n\r\n")
                    if end < 0:
                        continue
                    m = re.search(rb"\r\ncontent-length:\s*(\d+)", bytes(buf[:end]), re.I)
                    if m is None or len(buf) < end + 4 + int(m.group(1)):
                        continue
                    status = int(bytes(buf[:end]).split(b" ", 2)[1])
                    out.append((_arrival(anc) - t0, status, len(buf) - end - 4))
                elif data is not None:
                    out.append(f"closed after {len(buf)} bytes: {bytes(buf[:200])!r}")
            sel.unregister(s)
            s.close()
            del state[s]
    for s in state:
        out.append("timeout")
        s.close()
    sel.close()
    return out


def _burst_socket() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    timestamp_reads(s)
    return s


def _arrival(anc: list[tuple[int, int, bytes]]) -> float:
    """Wall-clock time the kernel received the bytes of one recvmsg(); now without one."""
    received = kernel_time(anc)
    return time.time() if received is None else received


def sc_wan(env: Env) -> tuple[dict, list[Row]]:
    args = env.args
    relay = env.start_relay()
    rtt = 2 * args.wan_delay_ms / 1000.0
    n = args.wan_requests
    rounds_out: list[dict[str, Any]] = []
    for r in range(args.rounds):
        where = f"wan round {r + 1}"
        out: dict[str, Any] = {}
        order = rotate(list(PROXIES), r)
        insts: dict[str, ProxyInst] = {}
        cold_end: dict[str, float] = {}
        # cold burst: right after each proxy starts (is ready / listening)
        for k in order:
            insts[k] = env.start_proxy(k, label=f"{k}-wan", upstream_port=relay)
            out[f"{k}_cold"] = _burst_stats(env, insts[k], args.burst, rtt, where + " cold")
            cold_end[k] = time.monotonic()
        # the same after the pools sat idle
        log(f"wan round {r + 1}: pools idle for {args.idle:g} s ...")
        time.sleep(args.idle)
        for k in order:
            idle_for = time.monotonic() - cold_end[k]
            out[f"{k}_idle"] = _burst_stats(env, insts[k], args.burst, rtt, where + " idle")
            out[f"{k}_idle"]["idle_s"] = round(idle_for, 2)
        # sequential requests: a new client connection per request to the proxy (requests.get
        # with HTTP_PROXY), the proxy's pool behind it
        for k in order:
            out[f"{k}_seq"] = _seq_wan(env, lambda inst=insts[k]: _fresh_proxy_get(inst), n, rtt,
                                       f"{where} {k}")
        # fresh TLS per request, direct to the relay (requests.get without a proxy)
        out["fresh_tls"] = _seq_wan(env, lambda: _fresh_tls_get(env, relay), n, rtt, where + " fresh")
        # pooled direct client through the relay (requests.Session)
        pooled = http.client.HTTPSConnection("localhost", relay, context=env.client_ctx, timeout=10)
        _pooled_get(pooled)
        out["pooled_direct"] = _seq_wan(env, lambda: _pooled_get(pooled), n, rtt, where + " pooled")
        pooled.close()
        for k in order:
            env.stop(insts[k])
        rounds_out.append(out)
        log(f"wan round {r + 1}: seq p50 ms " + ", ".join(
            f"{k} {out[k]['p50_ms']:.1f}" for k in (*[f"{p}_seq" for p in PROXIES], "fresh_tls",
                                                     "pooled_direct")))
        log(f"wan round {r + 1}: burst p99 RTT cold/idle " + ", ".join(
            f"{p} {out[p + '_cold']['p99_rtt']:.2f}/{out[p + '_idle']['p99_rtt']:.2f}" for p in PROXIES))

    def m(key: str, stat: str) -> float:
        return med([rd[key][stat] for rd in rounds_out])

    seq = {k: m(f"{k}_seq", "p50_ms") for k in PROXIES}
    fresh, pooled_ms = m("fresh_tls", "p50_ms"), m("pooled_direct", "p50_ms")
    ok_pooled = seq["proxyd"] <= 1.05 * pooled_ms
    speedup = fresh / seq["proxyd"]
    ok_fresh = speedup >= 2.8
    cold99 = {k: m(f"{k}_cold", "p99_ms") for k in PROXIES}
    cold50 = {k: m(f"{k}_cold", "p50_ms") for k in PROXIES}
    idle99 = {k: m(f"{k}_idle", "p99_ms") for k in PROXIES}
    idle50 = {k: m(f"{k}_idle", "p50_ms") for k in PROXIES}
    rtt_ms = rtt * 1000
    ok_cold = cold99["proxyd"] <= 1.3 * rtt_ms
    ok_idle = idle99["proxyd"] <= 1.3 * rtt_ms

    def ms_rtt(d: dict[str, float]) -> dict[str, str]:
        return {k: f"{v:.1f} ({v / rtt_ms:.2f})" for k, v in d.items()}

    result = {
        "rtt_ms": rtt_ms, "sequential_requests": n, "burst": args.burst, "idle_s": args.idle,
        "rounds": rounds_out,
        "median": {"seq_p50_ms": seq, "fresh_tls_p50_ms": fresh, "pooled_direct_p50_ms": pooled_ms,
                   "cold_burst_p50_ms": cold50, "cold_burst_p99_ms": cold99,
                   "idle_burst_p50_ms": idle50, "idle_burst_p99_ms": idle99},
        "proxyd_seq_vs_pooled": seq["proxyd"] / pooled_ms, "fresh_over_proxyd": speedup,
        "pass": {"seq_vs_pooled": ok_pooled, "seq_vs_fresh": ok_fresh,
                 "cold_burst_p99": ok_cold, "idle_burst_p99": ok_idle},
    }
    rows = [
        Row("wan", "seq p50 ms (RTT)", ms_rtt(seq), TARGET_TEXT["wan_vs_pooled"], verdict(ok_pooled),
            note=f"pooled direct {pooled_ms:.1f} ms; proxyd = {seq['proxyd'] / pooled_ms:.2f}×"),
        Row("wan", "seq: fresh TLS / proxy", {k: f"{fresh / v:.2f}×" for k, v in seq.items()},
            TARGET_TEXT["wan_vs_fresh"], verdict(ok_fresh),
            note=f"fresh TLS per request {fresh:.1f} ms ({fresh / rtt_ms:.2f} RTT)"),
        Row("wan", f"cold burst x{args.burst} p50 ms (RTT)", ms_rtt(cold50)),
        Row("wan", f"cold burst x{args.burst} p99 ms (RTT)", ms_rtt(cold99), TARGET_TEXT["burst_p99"],
            verdict(ok_cold), note=f"RTT = {rtt_ms:g} ms"),
        Row("wan", f"after {args.idle:g} s idle p50 ms (RTT)", ms_rtt(idle50)),
        Row("wan", f"after {args.idle:g} s idle p99 ms (RTT)", ms_rtt(idle99), TARGET_TEXT["burst_p99"],
            verdict(ok_idle)),
    ]
    return result, rows


def proxyd_pool_gauges(inst: ProxyInst) -> dict[str, float] | str:
    """proxyd's upstream connection gauges by state, summed over origins (from /metrics)."""
    try:
        with socket.create_connection(("127.0.0.1", inst.metrics_port), timeout=2) as s:
            s.sendall(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    except OSError as exc:
        return f"metrics unavailable: {exc}"
    out: dict[str, float] = {}
    for m in re.finditer(rb'^proxyd_upstream_connections\{[^}]*state="(\w+)"[^}]*\} (\S+)$', data, re.M):
        out[m.group(1).decode()] = out.get(m.group(1).decode(), 0.0) + float(m.group(2))
    return out or "no proxyd_upstream_connections gauge"


def _burst_stats(env: Env, inst: ProxyInst, n: int, rtt: float, where: str) -> dict[str, Any]:
    pool_before = proxyd_pool_gauges(inst) if inst.kind == "proxyd" else None
    t0 = time.monotonic()
    res = burst(inst, n)
    elapsed = time.monotonic() - t0
    ok = [x for x in res if isinstance(x, tuple) and x[1] == 200 and x[2] == KIB]
    bad = [x for x in res if not (isinstance(x, tuple) and x[1] == 200 and x[2] == KIB)]
    if bad:
        env.note(where, f"{inst.label}: {len(bad)} of {n} burst requests failed or not 200/1024",
                 examples=[str(b) for b in bad[:3]])
    lat = [x[0] * 1000 for x in ok]
    extra: dict[str, Any] = {}
    if inst.kind == "proxyd":
        time.sleep(0.4)   # the access log is flushed every 0.25 s
        lines = env.scan_proxyd_log(inst, details=True)["lines"]
        try:
            waits = [float(x["wait_ms"]) for x in lines]
            ttfb = [float(x["ttfb_ms"]) for x in lines]
            pids: dict[str, int] = {}
            for x in lines:
                pids[x["pid"]] = pids.get(x["pid"], 0) + 1
            extra["proxyd_log"] = {
                "upstream_connections_before": pool_before,
                "requests": len(lines), "per_worker_pid": pids,
                "not_warm": sum(1 for x in lines if x.get("warm") == "0"),
                "retried": sum(1 for x in lines if x.get("retried") == "1"),
                "wait_ms_p50": pct(waits, 50), "wait_ms_max": max(waits, default=0.0),
                "ttfb_ms_p50": pct(ttfb, 50), "ttfb_ms_max": max(ttfb, default=0.0)}
        except (KeyError, ValueError) as exc:
            extra["proxyd_log"] = f"unparsed access log: {exc}"
    return {**extra, "n_ok": len(ok), "n_bad": len(bad), "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99),
            "max_ms": max(lat) if lat else float("nan"), "p50_rtt": pct(lat, 50) / (rtt * 1000),
            "p99_rtt": pct(lat, 99) / (rtt * 1000), "elapsed_s": elapsed,
            "latencies_ms": [round(x, 2) for x in sorted(lat)]}


def _fresh_proxy_get(inst: ProxyInst) -> tuple[int, int]:
    status, body, _ = proxy_get(inst, "1k")
    return status, len(body)


def _fresh_tls_get(env: Env, port: int) -> tuple[int, int]:
    c = http.client.HTTPSConnection("localhost", port, context=env.client_ctx, timeout=10)
    try:
        c.request("GET", "/1k")
        r = c.getresponse()
        return r.status, len(r.read())
    finally:
        c.close()


def _pooled_get(c: http.client.HTTPSConnection) -> tuple[int, int]:
    c.request("GET", "/1k")
    r = c.getresponse()
    return r.status, len(r.read())


def _seq_wan(env: Env, send: Callable[[], tuple[int, int]], n: int, rtt: float,
             where: str) -> dict[str, Any]:
    lat: list[float] = []
    bad = 0
    for _ in range(n):
        t0 = time.perf_counter()
        try:
            status, size = send()
        except (OSError, http.client.HTTPException) as exc:
            status, size = 0, 0
            env.note(where, f"request failed: {type(exc).__name__}: {exc}")
        dt = (time.perf_counter() - t0) * 1000
        if status == 200 and size == KIB:
            lat.append(dt)
        else:
            bad += 1
    if bad:
        env.note(where, f"{bad} of {n} sequential requests not 200/1024")
    return {"n_ok": len(lat), "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99),
            "p50_rtt": pct(lat, 50) / (rtt * 1000)}


def sc_idle(env: Env) -> tuple[dict, list[Row]]:
    args = env.args
    n = args.idle_conns
    # client_head: never-used connections would be closed after 10 s (the default) while
    # the bench is still opening the others; it does not change what a connection costs.
    inst = env.start_proxy("proxyd", label="proxyd-idle", workers=1,
                           extra_toml="[timeouts]\nclient_head = 120.0\n")
    check_instance(env, inst)
    workers = inst.workers()
    if len(workers) != 1:
        raise BenchError(f"proxyd --workers 1 has {len(workers)} worker processes: {workers}")
    wpid = workers[0]
    c = http.client.HTTPConnection("127.0.0.1", inst.port, timeout=10)
    for _ in range(300):   # settle allocations on the request path first
        proxy_get(inst, "1k", conn=c)
    c.close()
    time.sleep(1.0)
    base_rss, base_fds = rss_kib(wpid), fd_count(wpid)
    socks: list[socket.socket] = []
    t0 = time.monotonic()
    try:
        batch = 500
        while len(socks) < n:
            new = []
            for _ in range(min(batch, n - len(socks))):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setblocking(False)
                s.connect_ex(("127.0.0.1", inst.port))
                new.append(s)
            sel = selectors.DefaultSelector()
            for s in new:
                sel.register(s, selectors.EVENT_WRITE)
            pending = len(new)
            deadline = time.monotonic() + 20
            while pending and time.monotonic() < deadline:
                for key, _ in sel.select(1.0):
                    sel.unregister(key.fileobj)
                    pending -= 1
            sel.close()
            if pending:
                raise BenchError(f"idle-conns: {pending} connects did not complete")
            socks.extend(new)
            want = base_fds + len(socks)
            deadline = time.monotonic() + 20
            while fd_count(wpid) < want and time.monotonic() < deadline:
                time.sleep(0.01)
        open_s = time.monotonic() - t0
        deadline = time.monotonic() + 20
        while fd_count(wpid) < base_fds + n and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)
        held = fd_count(wpid) - base_fds
        rss_open = rss_kib(wpid)
        log(f"idle-conns: {n} connections opened in {open_s:.1f} s; worker holds {held}; "
            f"RSS {base_rss} -> {rss_open} KiB")
        # one request on each, then idle keep-alive connections
        req = (f"GET {inst.uri('1k')} HTTP/1.1\r\nHost: {inst.host_header}\r\n\r\n").encode()
        # a few at a time (no more than the warm pool), so the upstream pool does not grow and
        # what is measured is the client side
        failures = _one_request_each(socks, req, batch=max(1, args.warm))
        time.sleep(1.0)
        held2 = fd_count(wpid) - base_fds
        rss_used = rss_kib(wpid)
        log(f"idle-conns: after one request each: worker holds {held2}; RSS {rss_used} KiB; "
            f"{failures} failed")
        if failures:
            env.note("idle-conns", f"{failures} of {n} requests on the held connections failed")
    finally:
        for s in socks:
            s.close()
    per_open = (rss_open - base_rss) / n
    per_used = (rss_used - base_rss) / n
    env.stop(inst)
    ok_open, ok_used = per_open <= 4, per_used <= 4
    result = {"connections": n, "worker_pid": wpid, "baseline_rss_kib": base_rss,
              "rss_after_open_kib": rss_open, "rss_after_one_request_each_kib": rss_used,
              "held_after_open": held, "held_after_requests": held2,
              "kib_per_conn_never_used": per_open, "kib_per_conn_after_one_request": per_used,
              "failed_requests": failures, "open_seconds": open_s,
              "target": TARGET_TEXT["idle_kib"], "pass": ok_open and ok_used,
              "note": "RSS of the worker process only (kernel socket buffers not included)"}
    rows = [
        Row("idle-conns", f"KiB/conn, {n:,} never used", {"proxyd": per_open},
            TARGET_TEXT["idle_kib"], verdict(ok_open), fmt="{:,.2f}",
            note=f"RSS {base_rss:,} -> {rss_open:,} KiB"),
        Row("idle-conns", f"KiB/conn, {n:,} after 1 req each", {"proxyd": per_used},
            TARGET_TEXT["idle_kib"], verdict(ok_used), fmt="{:,.2f}",
            note=f"RSS -> {rss_used:,} KiB"),
    ]
    return result, rows


def _one_request_each(socks: list[socket.socket], req: bytes, batch: int) -> int:
    """Send ``req`` on every socket (``batch`` at a time) and read a 1 KiB 200 response."""
    failures = 0
    for i in range(0, len(socks), batch):
        group = socks[i:i + batch]
        sel = selectors.DefaultSelector()
        bufs: dict[socket.socket, bytearray] = {}
        for s in group:
            try:
                s.send(req)
            except OSError:
                failures += 1
                continue
            bufs[s] = bytearray()
            sel.register(s, selectors.EVENT_READ)
        deadline = time.monotonic() + 30
        while bufs and time.monotonic() < deadline:
            for key, _ in sel.select(1.0):
                s = key.fileobj  # type: ignore[assignment]
                try:
                    data = s.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                buf = bufs[s]
                buf += data
                end = buf.find(b"\r\n\r\n")
                done = False
                if end >= 0:
                    m = re.search(rb"\r\ncontent-length:\s*(\d+)", bytes(buf[:end]), re.I)
                    if m and len(buf) >= end + 4 + int(m.group(1)):
                        done = True
                        if not buf.startswith(b"HTTP/1.1 200") or int(m.group(1)) != KIB:
                            failures += 1
                if done or not data:
                    if not data and not done:
                        failures += 1
                    sel.unregister(s)
                    del bufs[s]
        failures += len(bufs)
        sel.close()
    return failures


def sc_overhead(env: Env) -> tuple[dict, list[Row]]:
    args = env.args
    if env.metrics_switch is False:
        env.metrics_switch = probe_metrics_switch(args, env.tmp)
    switch = env.metrics_switch
    variants: dict[str, str] = {"default": "", "access_log_off": "access_log = false\n"}
    if switch:
        variants["metrics_off"] = switch
    insts = {}
    for v, toml in variants.items():
        insts[v] = env.start_proxy("proxyd", label=f"proxyd-{v.replace('_', '-')}", extra_toml=toml)
        check_instance(env, insts[v])
        run_wrk(env, insts[v], "1k", 32, args.warmup, "overhead", record=False)
        env.scan_proxyd_log(insts[v])
    per: dict[str, list[float]] = {v: [] for v in variants}
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    # Many short rounds rather than a few long ones: the costs measured here are a few per
    # cent, round-to-round noise on a shared 2-core machine is about ±10 %. 16 rounds of 3 s
    # (rather than 8 of 6 s, the same time) put a round's variants 9 s apart instead of 18,
    # and give the median twice the pairs: in two runs of 8 x 6 s on the same code the
    # metrics cost read +9.5 % and -0.8 %.
    rounds = args.overhead_rounds
    duration = 2.0 if args.quick else min(args.duration, 3.0)
    for r in range(rounds):
        for v in rotate(list(variants), r):
            res = run_wrk(env, insts[v], "1k", 32, duration, f"overhead round {r + 1}")
            per[v].append(res["rps"])
            cpu[v].append(res["cpu_us_per_req"])
            log(f"overhead round {r + 1}/{rounds} {v:15s} {res['rps']:>10,.0f} req/s  "
                f"cpu {res['cpu_us_per_req']:.1f} µs/req")
    for inst in insts.values():
        env.stop(inst)
    m = {v: med(x) for v, x in per.items()}
    rng = {v: f"{min(x):,.0f}-{max(x):,.0f}" for v, x in per.items()}
    # A cost is the median of the rounds' own ratios: the variants of a round run back to
    # back (within 20 s), so each ratio is free of the machine's drift from one round to
    # the next (±10 % here), which a ratio of two medians keeps (one run: 5.0 % that way,
    # 2.6 % paired, from the same rounds).
    log_cost = 1 - paired(per["default"], per["access_log_off"])
    metrics_cost = (1 - paired(per["default"], per["metrics_off"])) if switch else None
    # The same costs from proxyd's CPU per request (all its processes, from /proc): the
    # share of its CPU a feature takes, which is what it costs in throughput once proxyd is
    # the bottleneck, and far less sensitive to the other load on the machine than req/s.
    c = {v: med(x) for v, x in cpu.items()}
    log_cpu_cost = 1 - paired(cpu["access_log_off"], cpu["default"])
    metrics_cpu_cost = (1 - paired(cpu["metrics_off"], cpu["default"])) if switch else None
    ok = None if metrics_cost is None else metrics_cost <= 0.03
    result = {"variants": {v: variants[v].strip() for v in variants}, "rounds": rounds,
              "duration_s": duration, "rounds_rps": per,
              "range_rps": rng,
              "median_rps": m, "access_log_cost": log_cost, "metrics_cost": metrics_cost,
              "rounds_cpu_us_per_req": cpu, "median_cpu_us_per_req": c,
              "access_log_cpu_cost": log_cpu_cost, "metrics_cpu_cost": metrics_cpu_cost,
              "metrics_switch": switch.strip() if switch else "n/a (no metrics switch in this proxyd)",
              "target": TARGET_TEXT["metrics_cost"], "pass": ok}
    rows = [
        Row("overhead", "metrics on vs off: cost",
            {"proxyd": f"{metrics_cost * 100:+.1f} %" if switch else "n/a"},
            TARGET_TEXT["metrics_cost"], verdict(ok),
            note=(f"median of the rounds' ratios; medians {m['default']:,.0f} vs "
                  f"{m['metrics_off']:,.0f} req/s" if switch
                  else "proxyd has no metrics switch")),
        Row("overhead", "metrics on vs off: CPU share",
            {"proxyd": f"{metrics_cpu_cost * 100:+.1f} %" if switch else "n/a"},
            note=(f"medians {c['default']:.1f} vs {c['metrics_off']:.1f} µs of CPU per request"
                  if switch else "proxyd has no metrics switch")),
        Row("overhead", "access log on vs off: cost", {"proxyd": f"{log_cost * 100:+.1f} %"},
            note=f"medians {m['default']:,.0f} vs {m['access_log_off']:,.0f} req/s"),
        Row("overhead", "access log on vs off: CPU share",
            {"proxyd": f"{log_cpu_cost * 100:+.1f} %"},
            note=f"medians {c['default']:.1f} vs {c['access_log_off']:.1f} µs of CPU per request"),
    ]
    return result, rows


RUNNERS: dict[str, Callable[[Env], tuple[dict, list[Row]]]] = {
    "rps-1k": sc_rps, "mbps-1m": sc_mbps, "latency-seq": sc_latency, "wan": sc_wan,
    "idle-conns": sc_idle, "overhead": sc_overhead,
}


# ------------------------------------------------------------------------------------------
# reporting
# ------------------------------------------------------------------------------------------

def _cell(v: Any, fmt: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if v != v:
        return "nan"
    return fmt.format(v)


def table(rows: list[Row]) -> str:
    head = ["scenario", "metric", "proxyd", "nginx", "haproxy", "p/nginx", "p/haproxy",
            "target", "result", "note"]
    body = []
    for r in rows:
        body.append([r.scenario, r.metric, *(_cell(r.values.get(k), r.fmt) for k in PROXIES),
                     _cell(r.ratio_n, "{:.2f}"), _cell(r.ratio_h, "{:.2f}"), r.target, r.verdict,
                     r.note])
    widths = [max(len(str(x[i])) for x in [head, *body]) for i in range(len(head))]
    right = {2, 3, 4, 5, 6}

    def fmt_line(cells: list[str]) -> str:
        return "  ".join(c.rjust(widths[i]) if i in right else c.ljust(widths[i])
                         for i, c in enumerate(cells)).rstrip()
    lines = [fmt_line(head), fmt_line(["-" * w for w in widths])]
    lines += [fmt_line(b) for b in body]
    return "\n".join(lines)


def _cmd_out(cmd: list[str]) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        return (r.stdout + r.stderr).strip().splitlines()[0] if (r.stdout + r.stderr).strip() else ""
    except (OSError, subprocess.SubprocessError):
        return "unavailable"


def machine_info(args: argparse.Namespace) -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    pyver = _cmd_out(proxyd_cmd(args)[:1] + ["--version"]) if args.proxyd_cmd else platform.python_version()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": cpu, "cores": os.cpu_count(), "kernel": platform.release(),
        "python": platform.python_version(), "python_executable": sys.executable,
        "proxyd_python": pyver,
        "nginx": _cmd_out(["nginx", "-v"]), "haproxy": _cmd_out(["haproxy", "-v"]),
        "wrk": _cmd_out(["wrk", "-v"]),
        "proxyd_version": _cmd_out(proxyd_cmd(args) + ["--version"]),
        "proxyd_git": _cmd_out(["git", "-C", str(REPO), "describe", "--always", "--dirty"]),
        "load_average_start": list(os.getloadavg()),
    }


# ------------------------------------------------------------------------------------------
# prerequisites
# ------------------------------------------------------------------------------------------

def check_tools(install: bool) -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if not missing:
        return
    if install:
        if os.geteuid() != 0:
            raise SystemExit(f"bench: missing {', '.join(missing)}; --install needs root. Run:\n"
                             f"  sudo {APT_CMD}")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "nginx", "haproxy", "wrk"], check=True, env=env)
        missing = [t for t in TOOLS if shutil.which(t) is None]
        if not missing:
            return
    raise SystemExit(f"bench: missing {', '.join(missing)} (Debian packages). Install them with:\n"
                     f"  {'' if os.geteuid() == 0 else 'sudo '}{APT_CMD}\n"
                     "or run `bench/run --install` as root.")


def raise_nofile(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return
    if hard < need and os.geteuid() == 0:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, need))
            return
        except (ValueError, OSError):
            pass
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
    if min(need, hard) < need:
        log(f"RLIMIT_NOFILE is {min(need, hard)} (< {need}); idle-conns may fail")


# ------------------------------------------------------------------------------------------
# profile
# ------------------------------------------------------------------------------------------

def profile(env: Env) -> None:
    args = env.args
    spy = shutil.which("py-spy")
    if spy is None:
        log("py-spy not found; installing it with pip")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"], check=True)
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    inst = env.shared_proxy("proxyd")
    run_wrk(env, inst, "1k", 32, args.warmup, "profile", record=False)
    workers = inst.workers()
    if not workers:
        raise BenchError("no proxyd worker process found")
    wpid = workers[0]
    dur = max(2, round(args.duration))
    script = wrk_script(env, inst, "1k")
    wrk = subprocess.Popen(["wrk", f"-t{args.wrk_threads}", "-c32", f"-d{dur + 2}s", "-s", str(script),
                            f"http://127.0.0.1:{inst.port}/"], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(1.0)
        raw = env.tmp / "profile.raw"
        cmd = [spy, "record", "--pid", str(wpid), "--duration", str(dur), "--rate", str(args.profile_rate),
               "--format", "raw", "--function", "--nonblocking", "--output", str(raw)]
        log(f"profiling proxyd worker {wpid} for {dur} s under rps-1k load: {' '.join(cmd)}")
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=dur + 60)
        if r.returncode != 0 or not raw.exists():
            raise BenchError(f"py-spy failed ({r.returncode}): {r.stdout}\n{r.stderr}")
    finally:
        out, _ = wrk.communicate(timeout=dur + 30)
    m = re.search(r"WRKJSON (\{.*\})", out or "")
    if m:
        w = json.loads(m.group(1))
        log(f"load during profile: {w['requests'] / (w['duration_us'] / 1e6):,.0f} req/s "
            "(py-spy sampling slows the worker a little)")
    self_c: dict[str, int] = {}
    total_c: dict[str, int] = {}
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        c = int(count)
        samples += c
        frames = [f for f in stack.split(";") if not f.startswith("process ") and not f.startswith("thread ")]
        if not frames:
            continue
        self_c[frames[-1]] = self_c.get(frames[-1], 0) + c
        for f in set(frames):
            total_c[f] = total_c.get(f, 0) + c
    expected = dur * args.profile_rate
    print(f"\npy-spy: {samples} samples of worker {wpid} (~{expected} if always on CPU; "
          f"the rest is idle in epoll)\n")
    # proxyd's functions, without the entry frames every sample passes through
    own = {f: c for f, c in total_c.items() if "proxyd/" in f and c < 0.95 * samples}
    for title, counts in (("self (where the CPU is)", self_c),
                          ("total, proxyd's own functions (inclusive)", own)):
        print(f"top {args.profile_top} functions by {title}:")
        for f, c in sorted(counts.items(), key=lambda x: -x[1])[:args.profile_top]:
            print(f"  {100 * c / max(samples, 1):5.1f}%  {c:6d}  {f}")
        print()
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = RESULTS / f"profile-{stamp}.raw.txt"
    shutil.copy(raw, dest)
    print(f"collapsed stacks: {dest} (flamegraph.pl or speedscope.app can draw them)")


# ------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run", description="proxyd vs nginx vs HAProxy "
                                "as TLS-originating forward proxies, on loopback.")
    p.add_argument("--list", action="store_true", help="list the scenarios and exit")
    p.add_argument("--scenario", action="append", metavar="NAME",
                   help="run only this scenario (repeatable or comma-separated)")
    p.add_argument("--quick", action="store_true", help="2 s per scenario, 1 round")
    p.add_argument("--rounds", type=int, default=None, help="rounds (default 3; --quick 1)")
    p.add_argument("--duration", type=float, default=None,
                   help="seconds per wrk measurement (default 10; --quick 2)")
    p.add_argument("--warmup", type=float, default=None, help="wrk warm-up seconds per proxy (default 2; --quick 1)")
    p.add_argument("--overhead-rounds", type=int, default=None,
                   help="overhead: rounds (default 16 x 3 s; --quick 1 x 2 s): the costs measured "
                        "there are smaller than the round-to-round noise")
    p.add_argument("--idle", type=float, default=15.0,
                   help="wan: seconds the pools sit idle before the second burst (default 15)")
    p.add_argument("--warm", type=int, default=16, help="proxyd --warm N per worker (default 16: the 32-request burst over 2 workers)")
    p.add_argument("--wan-delay-ms", type=float, default=10.0, help="one-way delay (default 10)")
    p.add_argument("--wan-requests", type=int, default=None,
                   help="wan: sequential requests per client kind (default 40; --quick 15)")
    p.add_argument("--burst", type=int, default=32, help="wan: concurrent first requests (default 32)")
    p.add_argument("--seq-requests", type=int, default=None,
                   help="latency-seq: requests per client per round (default 2000; --quick 500)")
    p.add_argument("--idle-conns", type=int, default=10000, help="idle-conns: connections (default 10000)")
    p.add_argument("--wrk-threads", type=int, default=2, help="wrk threads (default 2)")
    p.add_argument("--proxyd-cmd", default=os.environ.get("PROXYD_CMD", ""),
                   help="command that runs proxyd (default: python3 -m proxyd from this checkout)")
    p.add_argument("--out", help="JSON result file (default bench/results/<timestamp>.json)")
    p.add_argument("--install", action="store_true",
                   help=f"as root: `{APT_CMD}` if anything is missing")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    p.add_argument("--profile", action="store_true",
                   help="py-spy a proxyd worker under rps-1k load and print the top functions")
    p.add_argument("--profile-rate", type=int, default=200, help="py-spy samples/s (default 200)")
    p.add_argument("--profile-top", type=int, default=25, help="functions to print (default 25)")
    a = p.parse_args(argv)
    q = a.quick
    a.rounds = a.rounds or (1 if q else 3)
    a.duration = a.duration or (2.0 if q else 10.0)
    a.warmup = a.warmup if a.warmup is not None else (1.0 if q else 2.0)
    a.overhead_rounds = a.overhead_rounds or (1 if q else 16)
    a.wan_requests = a.wan_requests or (15 if q else 40)
    a.seq_requests = a.seq_requests or (500 if q else 2000)
    names: list[str] = []
    for s in a.scenario or []:
        names += [x.strip() for x in s.split(",") if x.strip()]
    for s in names:
        if s not in SCENARIOS:
            p.error(f"unknown scenario {s!r}; choose from {', '.join(SCENARIOS)}")
    a.scenarios = names or list(SCENARIOS)
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for name, text in SCENARIOS.items():
            print(f"{name:12s} {text}")
        return 0
    check_tools(args.install)
    raise_nofile(args.idle_conns + 2048)

    def on_term(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)

    env = Env(args)
    started = time.time()
    results: dict[str, Any] = {}
    rows: list[Row] = []
    failed: dict[str, str] = {}
    try:
        if args.profile:
            profile(env)
            return 0
        machine = machine_info(args)
        log(f"machine: {machine['cpu_model']}, {machine['cores']} cores, load "
            f"{', '.join(f'{x:.2f}' for x in machine['load_average_start'])}; temp dir {env.tmp}")
        env.start_origin()
        for name in args.scenarios:
            log(f"=== {name}: {SCENARIOS[name]}")
            try:
                res, rws = RUNNERS[name](env)
                results[name] = res
                rows += rws
            except Exception as exc:  # noqa: BLE001 -- report it, go on with the next one
                failed[name] = (str(exc) if isinstance(exc, BenchError)
                                else traceback.format_exc())
                log(f"{name} FAILED: {failed[name]}")
                for inst in [i for i in env.instances if i not in env.shared.values()]:
                    env.stop(inst)
    except KeyboardInterrupt:
        log("interrupted; stopping everything")
        return 130
    finally:
        env.close()
    machine["load_average_end"] = list(os.getloadavg())
    machine["elapsed_s"] = round(time.time() - started, 1)
    config = {k: v for k, v in vars(args).items() if k not in ("list", "install", "profile")}
    config["competitors"] = {
        "nginx": "2 workers; upstream keepalive 64; proxy_ssl_verify on, session reuse; access log "
                 "on (buffer=64k flush=1s); proxy buffering as shipped",
        "haproxy": "nbthread 2; http-reuse always; ssl verify required sni str(localhost); no logging",
        "proxyd": f"defaults: workers = CPUs, --origin --warm {args.warm} --ca-file; access log on; "
                  "metrics as shipped",
        "origin": "nginx 1 worker, TLS 1.2/1.3, keepalive_requests 1e8, sendfile",
    }
    out = {"machine": machine, "config": config, "scenarios": results, "failed": failed,
           "anomalies": env.anomalies, "proxyd_instances": env.proxyd_findings,
           "table": [r.__dict__ for r in rows]}
    RESULTS.mkdir(exist_ok=True)
    path = Path(args.out) if args.out else RESULTS / f"{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=2, default=str))
    print()
    print(f"proxyd bench, {machine['date']}, {machine['cpu_model']} x{machine['cores']}, "
          f"rounds {args.rounds} x {args.duration:g} s, load avg at start "
          f"{machine['load_average_start'][0]:.2f}")
    print(table(rows))
    if machine["load_average_start"][0] >= 1.0:
        print(f"\nWARNING: the machine was not idle (1-minute load average "
              f"{machine['load_average_start'][0]:.2f} at start): other work shares the CPUs, so "
              "these numbers are noisy and not comparable with an idle run.")
    if failed:
        print("\nscenarios that failed:")
        for k, v in failed.items():
            print(f"  {k}: {v.splitlines()[0]}")
    problems = [f for f in env.proxyd_findings
                if f["non_200"] or f["problem_count"] or f.get("raw_stderr") or f.get("exit_status")]
    if env.anomalies or problems:
        print(f"\n{len(env.anomalies)} notes (JSON: 'anomalies'; proxyd's own log: "
              "'proxyd_instances'):")
        for a in env.anomalies[:15]:
            print(f"  {a['where']}: {a['what']}")
        for f in problems:
            print(f"  {f['label']}: {f['non_200']} non-200 in access log, {f['problem_count']} "
                  f"warning/error log lines, {f.get('tracebacks', 0)} raw tracebacks on stderr, "
                  f"exit status {f.get('exit_status')}")
            for line in f["problems"][:3]:
                print(f"      {line[:200]}")
            for text, count in list(f.get("exceptions", {}).items())[:3]:
                print(f"      {count} x {text[:200]}")
    print(f"\nresult: {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
