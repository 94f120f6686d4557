"""Observability: the metrics endpoint, the alert rules, the Grafana dashboard.

* Static checks of grafana/: ``promtool check rules``, ``promtool test rules``, ``promtool
  check config``, and the dashboard JSON (data source variable, variables, units, rows).
* A real Prometheus (``/usr/bin/prometheus``) scrapes a real proxyd every second; every
  dashboard query and every alert expression is evaluated through its HTTP API.
* The metrics endpoint itself: names, types and labels as documented in grafana/README.md,
  ``promtool check metrics``, concurrent scrapes under load, counters across a worker kill,
  health endpoints, the cap on learned origin labels.

Only the Prometheus/promtool parts skip, when those binaries are not installed.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

from conftest import REPO

GRAFANA = REPO / "grafana"
DASHBOARD = GRAFANA / "proxyd-dashboard.json"
ALERTS = GRAFANA / "alerts.yml"
ALERTS_TEST = GRAFANA / "alerts_test.yml"
PROM_CONFIG = GRAFANA / "prometheus.yml"

PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (Debian package 'prometheus')")
needs_prometheus = pytest.mark.skipif(
    PROMTOOL is None or PROMETHEUS is None,
    reason="prometheus/promtool are not installed (Debian package 'prometheus')")

IO_TIMEOUT = 10.0

ALERT_NAMES = {
    "ProxydErrorRatioHigh", "ProxydP99LatencyHigh", "ProxydWarmHitRatioLow",
    "ProxydPoolExhausted", "ProxydTLSHandshakeFailures", "ProxydWorkerRestarts",
    "ProxydTargetDown", "ProxydConfigReloadFailed",
}
ROWS = ["Traffic", "Latency", "Errors", "Pool", "Process"]

# name -> (type, label names); histograms also have le on _bucket
SPEC = {
    "proxyd_requests_total": ("counter", {"origin", "method", "code"}),
    "proxyd_request_bytes_total": ("counter", {"origin"}),
    "proxyd_response_bytes_total": ("counter", {"origin"}),
    "proxyd_client_connections_total": ("counter", set()),
    "proxyd_upstream_connections_opened_total": ("counter", {"origin"}),
    "proxyd_upstream_connections_closed_total": ("counter", {"origin", "reason"}),
    "proxyd_tls_handshakes_total": ("counter", {"origin", "result"}),
    "proxyd_pool_requests_total": ("counter", {"origin", "result"}),
    "proxyd_retries_total": ("counter", {"origin"}),
    "proxyd_upstream_errors_total": ("counter", {"origin", "error"}),
    "proxyd_worker_restarts_total": ("counter", set()),
    "proxyd_config_reloads_total": ("counter", {"result"}),
    "proxyd_request_duration_seconds": ("histogram", {"origin"}),
    "proxyd_upstream_ttfb_seconds": ("histogram", {"origin"}),
    "proxyd_tls_handshake_duration_seconds": ("histogram", {"origin"}),
    "proxyd_pool_wait_seconds": ("histogram", {"origin"}),
    "proxyd_client_connections_active": ("gauge", set()),
    "proxyd_upstream_connections": ("gauge", {"origin", "state"}),
    "proxyd_pool_waiting": ("gauge", {"origin"}),
    "proxyd_workers": ("gauge", set()),
    "proxyd_worker_cpu_seconds_total": ("counter", set()),
    "proxyd_worker_resident_memory_bytes": ("gauge", set()),
    "proxyd_config_last_reload_success_timestamp_seconds": ("gauge", set()),
    "proxyd_build_info": ("gauge", {"version", "python"}),
}
CLOSE_REASONS = {"idle_ttl", "origin_closed", "max_requests", "lifetime", "error",
                 "client_aborted", "not_reusable", "unexpected_data", "pool_closed",
                 "private_client_closed", "private_limit"}
PROXY_STATUS_ERRORS = {  # RFC 9209 §2.3 error types
    "dns_timeout", "dns_error", "destination_not_found", "destination_unavailable",
    "destination_ip_prohibited", "destination_ip_unroutable", "connection_refused",
    "connection_terminated", "connection_timeout", "connection_read_timeout",
    "connection_write_timeout", "connection_limit_reached", "tls_protocol_error",
    "tls_certificate_error", "tls_alert_received", "http_request_error",
    "http_request_denied", "http_response_incomplete", "http_response_header_section_size",
    "http_response_header_size", "http_response_body_size", "http_response_trailer_section_size",
    "http_response_trailer_size", "http_response_transfer_coding", "http_response_content_coding",
    "http_response_timeout", "http_upgrade_failed", "http_protocol_error",
    "proxy_internal_response", "proxy_internal_error", "proxy_configuration_error",
    "proxy_loop_detected",
}
# labelled metrics a short test run need not have produced
MAY_BE_ABSENT = {
    "proxyd_retries_total": "nothing was retried",
    "proxyd_pool_waiting": "no request waited for a connection",
    "proxyd_config_reloads_total": "no reload happened",
}

# Dashboard panels that may legitimately show nothing after the end-to-end traffic.
OPTIONAL_PANELS = {
    "Retries/s by origin": "a retry needs a reused connection that fails before any response byte",
    "Requests waiting for a connection": "the gauge may be exported only while requests wait",
}


# --------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------


def wait_until(predicate, timeout: float, interval: float = 0.2):
    """Poll predicate() until it returns something truthy or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def http_get(port: int, path: str, timeout: float = IO_TIMEOUT, method: str = "GET",
             body=None, headers=None):
    """(status, headers, body bytes) of one request on a fresh connection to 127.0.0.1."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.headers, r.read()
    finally:
        conn.close()


def via_proxy(p, url: str, method: str = "GET", body=None):
    """(status, Proxy-Status) of one request through proxyd on a fresh client connection."""
    status, headers, _ = http_get(p.port, url, method=method, body=body)
    return status, ", ".join(headers.get_all("Proxy-Status") or [])


def raw_request(port: int, data: bytes) -> int:
    """Send raw bytes to proxyd, return the status code of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as s:
        s.sendall(data)
        f = s.makefile("rb")
        line = f.readline()
    m = re.match(rb"HTTP/1\.[01] (\d{3})", line)
    assert m, f"no status line from proxyd: {line!r}"
    return int(m.group(1))


def metrics_port(p) -> int:
    assert p.metrics_port, (
        "proxyd's ready line has no metrics_listen=HOST:PORT, so the tests cannot find the "
        f"metrics listener: {p.ready_line!r}")
    return p.metrics_port


def scrape(p, timeout: float = IO_TIMEOUT) -> str:
    status, headers, body = http_get(metrics_port(p), "/metrics", timeout=timeout)
    assert status == 200, (status, body[:300])
    return body.decode("utf-8")


_SAMPLE = re.compile(
    r"^([a-zA-Z_:][a-zA-Z0-9_:]*)"              # name
    r"(?:\{((?:[^}\"]|\"(?:[^\"\\]|\\.)*\")*)\})?"  # labels
    r"[ \t]+(\S+)"                               # value
    r"(?:[ \t]+(-?\d+))?[ \t]*$")                # timestamp
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*(,|$)')


def parse_exposition(text: str):
    """Strictly parse Prometheus text format 0.0.4 -> (types {family: type}, samples
    [(name, {labels}, value)]). Raises ValueError on any line it does not understand."""
    types: dict[str, str] = {}
    samples = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) >= 4 and parts[1] == "TYPE":
                if parts[2] in types:
                    raise ValueError(f"line {n}: second TYPE for {parts[2]}")
                types[parts[2]] = parts[3].strip()
            continue
        m = _SAMPLE.match(line)
        if not m:
            raise ValueError(f"line {n}: not a sample: {line!r}")
        name, lbl, value, _ts = m.groups()
        labels = {}
        if lbl and lbl.strip():
            pos = 0
            while pos < len(lbl):
                lm = _LABEL.match(lbl, pos)
                if not lm:
                    raise ValueError(f"line {n}: bad labels: {line!r}")
                labels[lm.group(1)] = (lm.group(2).replace("\\n", "\n").replace('\\"', '"')
                                       .replace("\\\\", "\\"))
                pos = lm.end()
        try:
            v = float(value)
        except ValueError:
            raise ValueError(f"line {n}: bad value {value!r}") from None
        samples.append((name, labels, v))
    return types, samples


def metric_sum(text: str, name: str, **labels) -> float | None:
    """Sum of the samples of name whose labels include labels; None if there is none."""
    _, samples = parse_exposition(text)
    vals = [v for n, lb, v in samples
            if n == name and all(lb.get(k) == want for k, want in labels.items())]
    return sum(vals) if vals else None


def requests_sum(p) -> float:
    return metric_sum(scrape(p), "proxyd_requests_total") or 0.0


def wait_requests_counted(p, n: int, timeout: float = 10.0) -> float:
    got = wait_until(lambda: requests_sum(p) >= n and requests_sum(p), timeout)
    assert got, f"proxyd_requests_total did not reach {n} within {timeout}s " \
                f"(now {requests_sum(p)})"
    return got


def drive_traffic(p, origin) -> list:
    """Successful requests, 404s from the origin, request bodies, a connection the origin
    closes, an origin hang-up, a DNS failure, a refused port and a malformed request.
    Returns [(what, status, proxy_status)]."""
    done = []
    for i in range(20):
        done.append(("ok", *via_proxy(p, origin.url(f"/bytes/{1000 + i}"))))
    for _ in range(5):
        done.append(("404", *via_proxy(p, origin.url("/status/404"))))
    for _ in range(2):
        done.append(("upload", *via_proxy(p, origin.url("/upload"), "POST", b"x" * 5000)))
    done.append(("origin-close", *via_proxy(p, origin.url("/close/100"))))
    done.append(("hangup", *via_proxy(p, origin.url("/hangup"))))
    done.append(("dns", *via_proxy(p, "http://nonexistent.invalid/")))
    done.append(("refused", *via_proxy(p, f"http://127.0.0.1:{free_port()}/")))
    done.append(("malformed", raw_request(p.port, b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n"), ""))
    want = {"ok": 200, "404": 404, "upload": 200, "origin-close": 200, "hangup": 502,
            "dns": 502, "refused": 502, "malformed": 400}
    wrong = [d for d in done if d[1] != want[d[0]]]
    assert not wrong, f"unexpected statuses from proxyd (what, status, Proxy-Status): {wrong}"
    return done


# --------------------------------------------------------------------------------------
# dashboard helpers
# --------------------------------------------------------------------------------------


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(d: dict) -> list:
    out = []
    for p in d["panels"]:
        out.append(p)
        out += p.get("panels", [])  # collapsed rows keep their panels inside
    return out


def dashboard_queries(d: dict) -> list:
    """[(panel title, refId, expr)] of every panel target."""
    return [(p["title"], t.get("refId"), t["expr"])
            for p in all_panels(d) if p.get("type") != "row" for t in p.get("targets", [])]


def variable_query(v: dict) -> str:
    q = v.get("query")
    return q.get("query", "") if isinstance(q, dict) else (q or "")


_VAR_REF = re.compile(r"\$\{([A-Za-z0-9_]+)(?::[^}]*)?\}|\$([A-Za-z0-9_]+)|\[\[([A-Za-z0-9_]+)\]\]")


def variables_used(text: str) -> set:
    return {a or b or c for a, b, c in _VAR_REF.findall(text)}


def substitute(expr: str, instance: str) -> str:
    """What Grafana would send: variables replaced as for a single selected instance and
    origin=All (allValue .*)."""
    out = expr
    for k, v in (("${datasource}", ""), ("$__rate_interval", "15s"), ("$__interval", "5s"),
                 ("$__range", "5m"), ("${instance}", instance), ("$instance", instance),
                 ("${origin}", ".*"), ("$origin", ".*")):
        out = out.replace(k, v)
    assert "$" not in out, f"unsubstituted variable in {out!r}"
    return out


# --------------------------------------------------------------------------------------
# a real Prometheus
# --------------------------------------------------------------------------------------


class Prometheus:
    """A Prometheus server started for one test (only the process we start is stopped)."""

    def __init__(self, tmp_path: Path, target: str, rule_files=(ALERTS,)):
        self.port = free_port()
        self.dir = tmp_path / "prometheus"
        self.dir.mkdir()
        cfg = self.dir / "prometheus.yml"
        rules = "\n".join(f"  - {json.dumps(str(r))}" for r in rule_files)
        cfg.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
            f"rule_files:\n{rules}\n"
            "scrape_configs:\n  - job_name: proxyd\n    static_configs:\n"
            f"      - targets: [{json.dumps(target)}]\n")
        self.log_path = self.dir / "prometheus.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={cfg}", f"--storage.tsdb.path={self.dir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h",
             "--log.level=warn"],
            cwd=self.dir, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-3000:]

    def get(self, path: str, **params):
        qs = urllib.parse.urlencode(params, doseq=True)
        try:
            status, _, body = http_get(self.port, path + ("?" + qs if qs else ""), timeout=10)
        except OSError as exc:
            return None, {"status": "error", "error": repr(exc)}
        try:
            return status, json.loads(body)
        except ValueError:
            return status, {"status": "error", "error": body[:300].decode("latin-1")}

    def wait_ready(self, timeout: float = 20.0):
        def ready():
            if self.proc.poll() is not None:
                return True
            try:
                return http_get(self.port, "/-/ready", timeout=2)[0] == 200
            except OSError:
                return False
        assert wait_until(ready, timeout) and self.proc.poll() is None, \
            f"prometheus did not become ready (exit {self.proc.poll()}):\n{self.log()}"

    def query(self, expr: str) -> dict:
        return self.get("/api/v1/query", query=expr)[1]

    def wait_target_up(self, timeout: float = 20.0) -> dict:
        def up():
            _, r = self.get("/api/v1/targets")
            for t in r.get("data", {}).get("activeTargets", []):
                if t.get("health") == "up":
                    return t
            return None
        t = wait_until(up, timeout)
        assert t, f"target never up: {self.get('/api/v1/targets')[1]}\n{self.log()}"
        return t

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


# ======================================================================================
# static checks of grafana/
# ======================================================================================


@needs_promtool
def test_promtool_check_rules():
    r = subprocess.run([PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True,
                       text=True, timeout=60)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert f"SUCCESS: {len(ALERT_NAMES)} rules found" in out, out
    assert not re.search(r"warn|fail|error", out, re.I), out


@needs_promtool
def test_promtool_unit_tests_of_alerts():
    r = subprocess.run([PROMTOOL, "test", "rules", ALERTS_TEST.name], cwd=GRAFANA,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


@needs_promtool
def test_promtool_check_example_config():
    r = subprocess.run([PROMTOOL, "check", "config", str(PROM_CONFIG)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    text = PROM_CONFIG.read_text()
    assert re.search(r"job_name:\s*['\"]?proxyd\b", text)
    assert "127.0.0.1:9128" in text
    assert re.search(r"rule_files:\s*\n\s*-\s*['\"]?alerts\.yml", text)


def _alert_blocks() -> dict:
    """alert name -> its text block in alerts.yml (the file keeps one '- alert:' per rule)."""
    text = ALERTS.read_text()
    parts = re.split(r"^\s*- alert:\s*", text, flags=re.M)[1:]
    return {p.split(None, 1)[0]: p for p in parts}


def test_alert_rules_have_for_severity_and_annotations():
    blocks = _alert_blocks()
    assert set(blocks) == ALERT_NAMES
    for name, block in blocks.items():
        assert re.search(r"^\s+for:\s*\d+[smh]\s*$", block, re.M), f"{name}: no for:"
        assert re.search(r"^\s+severity:\s*(critical|warning)\s*$", block, re.M), name
        assert re.search(r"^\s+summary:\s*\S", block, re.M), f"{name}: no summary"
        assert re.search(r"^\s+description:\s*\S", block, re.M), f"{name}: no description"
    assert 'up{job="proxyd"} == 0' in blocks["ProxydTargetDown"]
    assert "connection_limit_reached" in blocks["ProxydPoolExhausted"]
    assert "proxyd_pool_waiting" in blocks["ProxydPoolExhausted"]


def test_alert_unit_tests_cover_every_alert_firing_and_not():
    text = ALERTS_TEST.read_text()
    firing, quiet = set(), set()
    for block in re.split(r"^\s*- eval_time:", text, flags=re.M)[1:]:
        m = re.search(r"^\s*alertname:\s*(\w+)", block, re.M)
        assert m, block[:200]
        (quiet if re.search(r"exp_alerts:\s*\[\]", block) else firing).add(m.group(1))
    assert firing >= ALERT_NAMES, f"never tested firing: {ALERT_NAMES - firing}"
    assert quiet >= ALERT_NAMES, f"never tested not firing: {ALERT_NAMES - quiet}"


def test_dashboard_json():
    raw = DASHBOARD.read_text()
    d = json.loads(raw)
    assert "__inputs" not in d and "${DS_" not in raw
    assert d.get("title") and d.get("uid") and d.get("schemaVersion", 0) >= 36

    tvars = {v["name"]: v for v in d["templating"]["list"]}
    ds = tvars.get("datasource")
    assert ds and ds["type"] == "datasource" and ds["query"] == "prometheus", ds
    inst, orig = tvars.get("instance"), tvars.get("origin")
    assert inst and variable_query(inst) == "label_values(proxyd_build_info, instance)"
    assert orig and variable_query(orig) == \
        'label_values(proxyd_requests_total{instance=~"$instance"}, origin)'
    for v in (inst, orig):
        assert v["type"] == "query" and v["multi"] and v["includeAll"], v
        assert v["datasource"]["uid"] == "${datasource}", v

    # no hard-coded data source uid anywhere
    def walk(node, path="$"):
        if isinstance(node, dict):
            for k, val in node.items():
                if k == "uid" and path != "$":
                    assert val == "${datasource}", f"hard-coded uid {val!r} at {path}"
                walk(val, f"{path}.{k}")
        elif isinstance(node, list):
            for i, val in enumerate(node):
                walk(val, f"{path}[{i}]")
    walk(d)

    panels = all_panels(d)
    rows = [p["title"] for p in panels if p["type"] == "row"]
    assert rows == ROWS, rows
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    used = set()
    for p in panels:
        if p["type"] == "row":
            continue
        title = p.get("title", "")
        assert title.strip(), f"panel {p['id']} has no title"
        assert p.get("fieldConfig", {}).get("defaults", {}).get("unit"), f"{title}: no unit"
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, title
        assert p.get("targets"), f"{title}: no query"
        for t in p["targets"]:
            assert t.get("datasource", {}).get("uid") == "${datasource}", (title, t)
            expr = t["expr"]
            used |= variables_used(expr) | variables_used(t.get("legendFormat", ""))
            for rng in re.findall(r"\[([^\]]+)\]", expr):
                assert rng == "$__rate_interval", f"{title}: range [{rng}] in {expr}"
            for hq in re.findall(r"histogram_quantile\((.*)", expr, re.S):
                assert "_bucket{" in hq and re.search(r"by \(([^)]*\b)?le\)", hq), (title, expr)
        used |= variables_used(title)
    for v in tvars.values():
        used |= variables_used(variable_query(v))
    builtin = {u for u in used if u.startswith("__")}
    assert used - builtin <= set(tvars), f"undefined variables: {used - builtin - set(tvars)}"
    assert builtin <= {"__rate_interval", "__interval", "__range"}, builtin
    assert {"instance", "origin"} <= used, used

    exprs = " ".join(e for _, _, e in dashboard_queries(d))
    missing = [m for m in SPEC if not re.search(rf"\b{m}(_bucket)?\b", exprs)]
    assert not missing, f"metrics not on the dashboard: {missing}"
    titles = {p.get("title") for p in panels}
    assert set(OPTIONAL_PANELS) <= titles, set(OPTIONAL_PANELS) - titles


# ======================================================================================
# the metrics endpoint
# ======================================================================================


def test_metrics_match_spec(proxyd, tls_origin):
    o = tls_origin
    p = proxyd(origins=[o.authority], warm=2, workers=2)
    done = drive_traffic(p, o)
    wait_requests_counted(p, len(done))
    status, headers, _ = http_get(metrics_port(p), "/metrics")
    assert status == 200 and headers.get("Content-Type", "").startswith("text/plain"), \
        headers.get("Content-Type")
    text = scrape(p)
    types, samples = parse_exposition(text)

    problems = []
    by_name: dict[str, list] = {}
    for name, labels, v in samples:
        by_name.setdefault(name, []).append((labels, v))
    for name, (typ, label_names) in SPEC.items():
        if types.get(name) != typ:
            problems.append(f"{name}: TYPE {types.get(name)!r}, spec says {typ}")
        parts = [name + s for s in ("_bucket", "_sum", "_count")] if typ == "histogram" else [name]
        got = [(lb, v) for part in parts for lb, v in by_name.get(part, [])]
        if not got:
            if name not in MAY_BE_ABSENT:
                problems.append(f"{name}: no samples after the test traffic")
            continue
        for lb, v in got:
            if set(lb) - {"le"} != label_names:
                problems.append(f"{name}: labels {sorted(lb)}, spec says {sorted(label_names)}")
                break
        if typ == "histogram":
            les = sorted({float(lb["le"]) for lb, _ in by_name.get(name + "_bucket", [])})
            if les and (les[0] != 0.0001 or les[-2:] != [60.0, math.inf]):
                problems.append(f"{name}: buckets {les[0]} .. {les[-2:]}, spec 0.0001 .. 60")
    extra = sorted({t for t in types if t.startswith("proxyd_")} - set(SPEC))
    if extra:
        problems.append(f"families not in the spec: {extra}")

    def values(name, label):
        return {lb.get(label) for lb, _ in by_name.get(name, [])}

    reasons = values("proxyd_upstream_connections_closed_total", "reason")
    if not reasons <= CLOSE_REASONS:
        problems.append(f"close reasons not in the spec: {reasons - CLOSE_REASONS}")
    errors = values("proxyd_upstream_errors_total", "error")
    if not errors <= PROXY_STATUS_ERRORS or not {"dns_error", "connection_refused"} <= errors:
        problems.append(f"upstream error types {errors}")
    for name, label, allowed in (("proxyd_tls_handshakes_total", "result", {"ok", "error"}),
                                 ("proxyd_pool_requests_total", "result", {"hit", "miss"}),
                                 ("proxyd_upstream_connections", "state",
                                  {"idle", "busy", "connecting", "private"})):
        if not values(name, label) <= allowed:
            problems.append(f"{name}{{{label}}} values {values(name, label)}")
    if o.authority not in values("proxyd_requests_total", "origin"):
        problems.append(f"no origin={o.authority!r}: {values('proxyd_requests_total', 'origin')}")
    if metric_sum(text, "proxyd_requests_total", origin="none", code="400") is None:
        problems.append("the malformed request is not counted as origin=\"none\", code=\"400\"")
    total = metric_sum(text, "proxyd_requests_total")
    if total != len(done):
        problems.append(f"sum(proxyd_requests_total) = {total}, {len(done)} requests were made")
    if metric_sum(text, "proxyd_pool_requests_total", result="hit") in (None, 0):
        problems.append("no warm hit counted although the origin had warm=2")
    if metric_sum(text, "proxyd_workers") != 2:
        problems.append(f"proxyd_workers = {metric_sum(text, 'proxyd_workers')}, want 2")
    bi = by_name.get("proxyd_build_info", [])
    from proxyd import __version__
    if len(bi) != 1 or bi[0][1] != 1 or bi[0][0].get("version") != __version__ \
            or bi[0][0].get("python") != platform.python_version():
        problems.append(f"proxyd_build_info {bi}, want version={__version__} "
                        f"python={platform.python_version()} value 1")
    ts = metric_sum(text, "proxyd_config_last_reload_success_timestamp_seconds")
    if ts is None or abs(ts - time.time()) > 600:
        problems.append(f"proxyd_config_last_reload_success_timestamp_seconds = {ts}")
    created = sorted({n for n, _, _ in samples if n.endswith("_created")})
    if created:
        problems.append(f"*_created series exported: {created}")
    assert not problems, "\n".join(problems)


@needs_promtool
def test_promtool_check_metrics(proxyd, tls_origin):
    o = tls_origin
    p = proxyd(origins=[o.authority], warm=2, workers=2)
    done = drive_traffic(p, o)
    wait_requests_counted(p, len(done))
    text = scrape(p)
    r = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True,
                       text=True, timeout=60)
    allowed: tuple = ()  # lint messages we accept (none so far)
    lines = [ln for ln in (r.stdout + r.stderr).splitlines()
             if ln.strip() and not any(a in ln for a in allowed)]
    assert r.returncode == 0 and not lines, f"exit {r.returncode}:\n" + "\n".join(lines)


def test_metrics_concurrent_scrapes_under_load(proxyd, tls_origin):
    o = tls_origin
    p = proxyd(origins=[o.authority], warm=2, workers=2)
    mport = metrics_port(p)
    stop = threading.Event()
    traffic, failures = [], []

    def load():
        while not stop.is_set():
            try:
                traffic.append(via_proxy(p, o.url("/bytes/2000"))[0])
            except OSError as exc:
                traffic.append(repr(exc))

    def scraper(n):
        last = 0.0
        for _ in range(n):
            try:
                status, headers, body = http_get(mport, "/metrics")
                if status != 200:
                    failures.append(f"status {status}")
                    continue
                _, samples = parse_exposition(body.decode("utf-8"))
                total = sum(v for name, _, v in samples if name == "proxyd_requests_total")
                if total <= 0:
                    failures.append("no proxyd_requests_total in a scrape")
                if total < last:
                    failures.append(f"proxyd_requests_total went down: {last} -> {total}")
                last = total
            except (OSError, ValueError, UnicodeDecodeError) as exc:
                failures.append(repr(exc))

    loaders = [threading.Thread(target=load, daemon=True) for _ in range(2)]
    for t in loaders:
        t.start()
    assert wait_until(lambda: len(traffic) >= 5, 10), traffic  # traffic flows
    wait_requests_counted(p, 1)  # ... and has reached the master: every scrape must show it
    scrapers = [threading.Thread(target=scraper, args=(50,), daemon=True) for _ in range(8)]
    t0 = time.monotonic()
    for t in scrapers:
        t.start()
    for t in scrapers:
        t.join(60)
    elapsed = time.monotonic() - t0
    stop.set()
    for t in loaders:
        t.join(IO_TIMEOUT + 5)
    print(f"400 scrapes under load in {elapsed:.2f}s; {len(traffic)} proxied requests")
    assert not any(t.is_alive() for t in scrapers), "scrapers hung"
    assert not failures, failures[:10]
    assert traffic and all(s == 200 for s in traffic), \
        [s for s in traffic if s != 200][:10]


def test_counters_survive_worker_kill(proxyd, tls_origin):
    o = tls_origin
    p = proxyd(origins=[o.authority], warm=1, workers=2)
    for i in range(20):
        assert via_proxy(p, o.url(f"/bytes/{i}"))[0] == 200
    s0 = wait_requests_counted(p, 20)
    before = set(p.worker_pids())
    assert len(before) == 2, before
    victim = min(before)
    text = scrape(p)
    cpu0 = metric_sum(text, "proxyd_worker_cpu_seconds_total")
    assert cpu0 and cpu0 > 0, text
    assert (metric_sum(text, "proxyd_worker_resident_memory_bytes") or 0) > 2 * (8 << 20)

    seen, errors = [s0], []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            try:
                seen.append(requests_sum(p))
            except (OSError, AssertionError, ValueError) as exc:
                errors.append(repr(exc))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        os.kill(victim, signal.SIGKILL)

        def replaced():
            now = set(p.worker_pids())
            return len(now) == 2 and victim not in now and bool(now - before)
        assert wait_until(replaced, 15), f"no replacement worker: {p.worker_pids()} " \
                                         f"(killed {victim})\n{p.stderr_text()[-2000:]}"
        for i in range(20):
            assert via_proxy(p, o.url(f"/bytes/{i}"))[0] == 200
        final = wait_requests_counted(p, s0 + 20)
        wait_until(lambda: len(seen) >= 50, 10)
    finally:
        stop.set()
        watcher.join(IO_TIMEOUT + 5)
    drops = [(a, b) for a, b in zip(seen, seen[1:]) if b < a]
    assert not drops, f"proxyd_requests_total went down: {drops[:5]} (of {len(seen)} scrapes)"
    assert not errors, errors[:5]
    assert final >= s0 + 20
    text = scrape(p)
    assert (metric_sum(text, "proxyd_worker_restarts_total") or 0) >= 1, \
        "proxyd_worker_restarts_total did not count the killed worker"
    # the killed worker's CPU time stays in the total (its last report)
    assert metric_sum(text, "proxyd_worker_cpu_seconds_total") >= cpu0
    assert wait_until(lambda: metric_sum(scrape(p), "proxyd_workers") == 2, 10), \
        metric_sum(scrape(p), "proxyd_workers")


def test_health_ready_status(proxyd, tls_origin):
    o = tls_origin
    p = proxyd(origins=[o.authority], warm=2, workers=2)
    mport = metrics_port(p)
    status, _, body = http_get(mport, "/healthz")
    assert status == 200 and body.strip() == b"ok", (status, body)
    assert wait_until(lambda: http_get(mport, "/readyz")[0] == 200, 10), http_get(mport, "/readyz")
    for i in range(5):
        assert via_proxy(p, o.url("/bytes/10"))[0] == 200
    wait_requests_counted(p, 5)
    status, _, body = http_get(mport, "/status")
    text = body.decode("utf-8", "replace")
    assert status == 200, (status, text)
    assert o.authority in text, text
    assert re.search(r"warm[-_ ]?hit[^\n]*?\d", text, re.I), f"no warm-hit figure:\n{text}"
    # RFC 9110 §15.5.6: a 405 says which methods are allowed
    status, headers, _ = http_get(mport, "/metrics", method="POST", body=b"x")
    assert (status, headers.get("Allow")) == (405, "GET, HEAD"), (status, dict(headers))


def test_origin_label_cardinality_cap(proxyd, origin_factory):
    origins = [origin_factory() for _ in range(4)]
    p = proxyd(workers=2, config={"metrics_max_origins": 2})
    for o in origins:
        for i in range(3):
            assert via_proxy(p, f"http://localhost:{o.port}/bytes/{i}")[0] == 200
    wait_requests_counted(p, 12)
    _, samples = parse_exposition(scrape(p))
    labels = {lb["origin"] for _, lb, _ in samples if "origin" in lb}
    learned = labels - {"other", "none"}
    assert len(learned) <= 2, f"more than 2 learned origin labels: {sorted(labels)}"
    assert learned <= {o.authority for o in origins}, sorted(labels)
    req_origins = {lb["origin"] for n, lb, _ in samples if n == "proxyd_requests_total"}
    assert "other" in req_origins, sorted(req_origins)
    assert sum(v for n, _, v in samples if n == "proxyd_requests_total") == 12


def _counter_samples(text: str) -> dict[tuple, float]:
    types, samples = parse_exposition(text)
    out = {}
    for name, labels, value in samples:
        family = re.sub(r"_(total|bucket|count|sum)$", "", name)
        if types.get(family) in ("counter", "histogram") or types.get(name) == "counter":
            out[(name, tuple(sorted(labels.items())))] = value
    return out


def test_origin_labels_never_move_between_series(proxyd, origin_factory):
    """Found by an operator sweep: the master re-picked the learned labels from the union of
    its workers' at every scrape (alphabetically), so after a reload or a worker restart a
    new origin took the label slot of an old one: `origin="other"` jumped, the old series
    vanished — counter resets for Prometheus. A label's series is decided once."""
    late, early = sorted((origin_factory() for _ in range(2)), key=lambda o: o.authority)
    p = proxyd(workers=1, config={"metrics_max_origins": 1, "access_log": False})
    for i in range(2):
        assert via_proxy(p, f"http://localhost:{early.port}/bytes/{i}")[0] == 200
    wait_requests_counted(p, 2)
    before = _counter_samples(scrape(p))
    assert metric_sum(scrape(p), "proxyd_requests_total", origin=early.authority) == 2
    mark = p.log_mark()
    os.kill(p.pid, signal.SIGHUP)  # a new worker, which has seen no origin yet
    assert p.wait_for_log(r"msg=\"worker exited\"", 15, start=mark), p.stderr_text()[-2000:]
    # the new origin sorts first: a re-pick would give it the one learned slot
    assert via_proxy(p, f"http://localhost:{late.port}/bytes/1")[0] == 200
    wait_requests_counted(p, 3)
    after = _counter_samples(scrape(p))
    went_back = {k: (v, after.get(k)) for k, v in before.items() if after.get(k, -1) < v}
    assert not went_back, f"counters went backwards or vanished: {list(went_back.items())[:5]}"
    text = scrape(p)
    assert metric_sum(text, "proxyd_requests_total", origin=early.authority) == 2
    assert metric_sum(text, "proxyd_requests_total", origin="other") == 1


# ======================================================================================
# end to end: a real Prometheus scrapes proxyd; the dashboard and the alerts run on it
# ======================================================================================


@needs_prometheus
def test_prometheus_end_to_end(proxyd, tls_origin, tmp_path):
    o = tls_origin
    p = proxyd(origins=[o.authority], warm=2, workers=2,
               config={"timeouts": {"connect": 2.0, "tls_handshake": 2.0}})
    instance = f"127.0.0.1:{metrics_port(p)}"
    prom = Prometheus(tmp_path, instance)
    problems: list[str] = []
    t0 = time.monotonic()
    phases = []

    def phase(name):
        phases.append(f"{name} {time.monotonic() - t0:.1f}s")
    try:
        prom.wait_ready()
        target = prom.wait_target_up()
        assert target["labels"].get("instance") == instance, target["labels"]
        assert target["labels"].get("job") == "proxyd", target["labels"]
        phase("target up")

        # a successful reload, so that the reload panels have data
        os.kill(p.pid, signal.SIGHUP)
        if not wait_until(lambda: (metric_sum(scrape(p), "proxyd_config_reloads_total",
                                              result="ok") or 0) >= 1, 20):
            problems.append("after SIGHUP proxyd_config_reloads_total{result=\"ok\"} never "
                            "reached 1")

        phase("reloaded")
        done = drive_traffic(p, o)
        phase("traffic")
        sel = f'proxyd_requests_total{{instance="{instance}"}}'

        def counted():
            r = prom.query(f"sum({sel})")
            res = r.get("data", {}).get("result", [])
            return bool(res) and float(res[0]["value"][1]) >= len(done)
        assert wait_until(counted, 20), \
            f"Prometheus never saw {len(done)} requests: {prom.query(f'sum({sel})')}"

        d = load_dashboard()
        queries = dashboard_queries(d)
        must = [(t, ref, substitute(e, instance)) for t, ref, e in queries
                if t not in OPTIONAL_PANELS]

        def all_have_data():
            for _, _, e in must:
                r = prom.query(e)
                if r.get("status") != "success" or not r["data"]["result"]:
                    return False
            return True
        phase("counted")
        wait_until(all_have_data, 20, interval=0.5)
        phase("panels have data")

        verified = 0
        for title, ref, expr in queries:
            q = substitute(expr, instance)
            r = prom.query(q)
            if r.get("status") != "success":
                problems.append(f"panel {title!r} {ref}: {r.get('errorType')}: {r.get('error')}"
                                f"\n    {q}")
                continue
            data = r["data"]
            if data["resultType"] != "vector":
                problems.append(f"panel {title!r} {ref}: result type {data['resultType']}")
            elif not data["result"] and title not in OPTIONAL_PANELS:
                problems.append(f"panel {title!r} {ref}: no data after the test traffic\n    {q}")
            elif not data["result"]:
                print(f"optional panel {title!r} {ref} has no data "
                      f"({OPTIONAL_PANELS[title]})")
            verified += 1

        # the variables' queries, as Grafana runs label_values()
        for v in d["templating"]["list"]:
            if v["type"] != "query":
                continue
            m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", variable_query(v).strip())
            assert m, variable_query(v)
            match, label = substitute(m.group(1), instance), m.group(2)
            status, r = prom.get(f"/api/v1/label/{label}/values", **{"match[]": match})
            vals = r.get("data") or []
            want = instance if v["name"] == "instance" else o.authority
            if r.get("status") != "success" or want not in vals:
                problems.append(f"variable {v['name']}: {want!r} not in {r}")
            verified += 1
        print(f"{verified} dashboard queries verified against Prometheus")

        # the alert rules: loaded, evaluated, healthy
        def rules_ok():
            _, r = prom.get("/api/v1/rules", type="alert")
            rules = [x for g in r.get("data", {}).get("groups", []) for x in g["rules"]]
            names = {x["name"] for x in rules}
            if names >= ALERT_NAMES and all(x.get("health") == "ok" for x in rules):
                return rules
            return None
        rules = wait_until(rules_ok, 15, interval=0.5)
        if not rules:
            _, r = prom.get("/api/v1/rules", type="alert")
            rules = [x for g in r.get("data", {}).get("groups", []) for x in g["rules"]]
            problems.append("alert rules not all loaded with health ok: " + json.dumps(
                [(x["name"], x.get("health"), x.get("lastError")) for x in rules]))
        assert {x["name"] for x in rules} == ALERT_NAMES, [x["name"] for x in rules]
        for x in rules:
            ann = x.get("annotations", {})
            if not x.get("duration") or x["labels"].get("severity") not in ("critical", "warning") \
                    or not ann.get("summary") or not ann.get("description"):
                problems.append(f"alert {x['name']}: for/severity/annotations missing: {x}")
            r = prom.query(x["query"])
            if r.get("status") != "success" or r["data"]["resultType"] != "vector":
                problems.append(f"alert {x['name']}: {r}\n    {x['query']}")
            if x["name"] == "ProxydTargetDown" and r.get("data", {}).get("result"):
                problems.append(f"ProxydTargetDown matches while the target is up: {r}")
        phase("rules checked")
        print("phases: " + ", ".join(phases))
        print("alert states: " + ", ".join(f"{x['name']}={x.get('state')}" for x in rules))
    finally:
        prom.stop()
    assert not problems, "\n".join(problems) + f"\n--- prometheus log ---\n{prom.log()}"


def test_rate_limited_warnings_say_how_many_were_dropped(monkeypatch):
    """A failing origin under load must not flood the log: ten warnings a second, then one
    line with the count of those left out."""
    import logging

    from proxyd import logs

    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = logging.getLogger("proxyd.test-rate-limited")
    logger.addHandler(Keep())
    logger.propagate = False
    clock = [1000.0]
    monkeypatch.setattr(logs.time, "monotonic", lambda: clock[0])
    limited = logs.RateLimited(logger, per_second=10)
    for i in range(25):
        limited.warning("failure %d", i)
    assert records == [f"failure {i}" for i in range(10)]
    clock[0] += 1.0
    limited.warning("failure %d", 25)
    assert records[10:] == ["15 more like the last one not logged in the second before",
                            "failure 25"]


def test_log_lines_carry_their_priority_under_journald():
    """Under journald (JOURNAL_STREAM names stderr) each line starts with its syslog priority,
    so `journalctl -p warning -u proxyd` finds proxyd's warnings; elsewhere lines are plain
    logfmt. Found by an operator sweep: every line was stored at priority info."""
    script = ("import logging; from proxyd import logs; logs.setup('info'); "
              "log = logging.getLogger('proxyd.t'); log.info('i'); log.warning('w'); "
              "log.error('e')")
    for journal in (True, False):
        r, w = os.pipe()
        try:
            st = os.fstat(w)
            env = dict(os.environ, PYTHONPATH=str(REPO),
                       JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}" if journal else "1:2")
            proc = subprocess.run([sys.executable, "-c", script], stderr=w, env=env,
                                  timeout=30)
        finally:
            os.close(w)
        with os.fdopen(r, "rb") as f:
            lines = f.read().decode().splitlines()
        assert proc.returncode == 0, lines
        prefixes = [line.split("ts=", 1)[0] for line in lines]
        assert prefixes == (["<6>", "<4>", "<3>"] if journal else ["", "", ""]), lines


def test_log_values_never_carry_control_characters():
    """A CR, an ESC or a NUL in a logged value (an origin's error text, say) is escaped: one
    event stays one line and cannot fake another line or colour a terminal."""
    from proxyd.logs import _quote
    assert _quote("plain") == "plain"
    assert _quote("x\ry") == '"x\\ry"'
    assert _quote("a\nb\tc") == '"a\\nb\\tc"'
    assert _quote("esc\x1b[31m\x00") == '"esc\\x1b[31m\\x00"'
    assert _quote('say "hi"\\') == '"say \\"hi\\"\\\\"'
