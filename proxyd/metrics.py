"""Metrics: plain counters in each worker, aggregated by the master for Prometheus.

Incrementing an integer attribute costs tens of nanoseconds; prometheus-client's
multiprocess mode costs ~1 µs per update (REFERENCES.md). So workers count locally and send a
snapshot to the master every second; the master adds the snapshots of live workers to the
final snapshots of exited ones (a counter never goes backwards when a worker restarts) and
exposes the sum through a custom collector. Gauges come from live workers only.
"""

from __future__ import annotations

import bisect
import platform
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily)
from prometheus_client.registry import Collector

from . import __version__

# Sub-millisecond to a minute: loopback hops take ~100 µs, WAN origins tens of ms.
BUCKETS: tuple[float, ...] = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                              0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
HISTOGRAMS = ("duration", "ttfb", "handshake", "wait")
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH",
                      "CONNECT", "TRACE"})
OTHER = "other"
# Method label per request-line method: a dict hit instead of a decode and a set lookup.
METHOD_LABELS = {m.encode(): m for m in _METHODS}
NO_ORIGIN = "none"


class Histogram:
    """Bucket counts and a sum; ``observe`` is one bisect and two additions."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        """Count ``value`` in the first bucket whose bound is >= value (Prometheus ``le``)."""
        self.counts[bisect.bisect_left(BUCKETS, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        """Values observed."""
        return sum(self.counts)

    def mean(self) -> float:
        """Mean of the values observed; 0.0 before any."""
        count = self.count
        return self.total / count if count else 0.0

    def snapshot(self) -> list[float]:
        """Bucket counts followed by the sum."""
        return [*self.counts, self.total]


@dataclass(slots=True)
class OriginStats:
    """Counters of one origin label in one worker."""

    label: str = ""
    requests: dict[tuple[str, int], int] = field(default_factory=lambda: defaultdict(int))
    request_bytes: int = 0
    response_bytes: int = 0
    opened: int = 0
    closed: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    handshakes_ok: int = 0
    handshakes_error: int = 0
    hits: int = 0
    misses: int = 0
    retries: int = 0
    errors: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    duration: Histogram = field(default_factory=Histogram)
    ttfb: Histogram = field(default_factory=Histogram)
    handshake: Histogram = field(default_factory=Histogram)
    wait: Histogram = field(default_factory=Histogram)

    def snapshot(self) -> dict[str, Any]:
        """JSON-able counters."""
        return {
            "requests": {f"{m} {c}": n for (m, c), n in self.requests.items()},
            "request_bytes": self.request_bytes, "response_bytes": self.response_bytes,
            "opened": self.opened, "closed": dict(self.closed),
            "handshakes": {"ok": self.handshakes_ok, "error": self.handshakes_error},
            "pool": {"hit": self.hits, "miss": self.misses},
            "retries": self.retries, "errors": dict(self.errors),
            "hist": {name: getattr(self, name).snapshot() for name in HISTOGRAMS},
        }


@dataclass(slots=True)
class WorkerStats:
    """Everything one worker counts; origin labels are bounded by ``max_learned``."""

    requests: int = 0
    warm_hits: int = 0           # served on a connection handshaked before the request came
    pool_misses: int = 0         # had to wait for a new connection
    retries: int = 0
    errors: int = 0
    client_connections: int = 0
    upstream_opened: int = 0
    upstream_reused: int = 0
    upstream_closed: int = 0
    handshakes: int = 0
    handshake_failures: int = 0
    handshake_seconds: float = 0.0
    bytes_from_clients: int = 0
    bytes_to_clients: int = 0
    max_learned: int = 50
    origins: dict[str, OriginStats] = field(default_factory=dict)
    _learned: int = 0

    def origin(self, label: str, configured: bool) -> OriginStats:
        """The stats of an origin label, folding learned ones past the cap into ``other``."""
        stats = self.origins.get(label)
        if stats is not None:
            return stats
        if not configured and label != NO_ORIGIN:
            if self._learned >= self.max_learned:
                return self.origin(OTHER, True)
            self._learned += 1
        stats = self.origins[label] = OriginStats(label)
        return stats

    def counters(self) -> dict[str, float]:
        """The worker-wide counters."""
        return {name: getattr(self, name) for name in (
            "requests", "warm_hits", "pool_misses", "retries", "errors", "client_connections",
            "upstream_opened", "upstream_reused", "upstream_closed", "handshakes",
            "handshake_failures", "handshake_seconds", "bytes_from_clients", "bytes_to_clients")}

    def snapshot(self) -> dict[str, Any]:
        """Counters and per-origin counters, for the master."""
        return {"counters": self.counters(),
                "origins": {label: s.snapshot() for label, s in self.origins.items()}}


# -- master side -------------------------------------------------------------------------------

def merge(into: dict[str, Any], other: dict[str, Any]) -> None:
    """Add ``other`` into ``into``: numbers add, lists add element-wise, dicts recurse."""
    for key, value in other.items():
        if isinstance(value, dict):
            merge(into.setdefault(key, {}), value)
        elif isinstance(value, list):
            cur = into.get(key)
            into[key] = value[:] if cur is None else [a + b for a, b in zip(cur, value)]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            into[key] = into.get(key, 0) + value


class OriginLabels:
    """Which origin labels get series of their own at the master, decided once per label.

    Workers come and go (crashes, reloads), each with its own first 50 learned origins, so
    the union the master sees changes. Re-picking the labels from that union at every scrape
    moved counts between ``origin="X"`` and ``origin="other"``: counters went backwards and
    series vanished, which Prometheus reads as resets. Here a label's fate is sealed the
    first time the master sees it: configured origins (and ``other``, ``none``) always get
    their own series; learned ones while fewer than ``cap`` have one; the rest fold into
    ``other`` for the master's life (even if configured later: their past counts are in
    ``other`` already and cannot be taken out of it without a decrease).
    """

    def __init__(self) -> None:
        self._own: dict[str, bool] = {}
        self._learned = 0

    def fold(self, origins: dict[str, Any], configured: set[str], cap: int) -> dict[str, Any]:
        """``origins`` keyed by the label each gets: its own or ``other``."""
        out: dict[str, Any] = {}
        for label in sorted(origins):  # first sight in a fixed order: the same on every run
            own = self._own.get(label)
            if own is None:
                own = self._own[label] = self._decide(label, configured, cap)
            merge(out.setdefault(label if own else OTHER, {}), origins[label])
        return out

    def _decide(self, label: str, configured: set[str], cap: int) -> bool:
        if label in configured or label in (OTHER, NO_ORIGIN):
            return True
        if self._learned < cap:
            self._learned += 1
            return True
        return False


def _le(bound: float) -> str:
    return repr(bound)


@dataclass
class MetricsView:
    """What the collector exposes, prepared by the master at scrape time."""

    totals: dict[str, Any]
    gauges: dict[str, Any]
    workers: int
    worker_restarts: int
    reloads_ok: int
    reloads_failed: int
    last_reload_success: float


class ProxydCollector(Collector):
    """A prometheus-client collector over the master's aggregated worker snapshots."""

    def __init__(self, view: Any) -> None:
        self._view = view  # a callable returning a MetricsView

    def collect(self) -> Iterator[Any]:
        v: MetricsView = self._view()
        origins = v.totals.get("origins", {})
        yield from _origin_counters(origins)
        yield from _histograms(origins)
        yield from _process_metrics(v)


def _counter(name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=labels)


def _origin_counters(origins: dict[str, Any]) -> Iterator[Any]:
    req = _counter("proxyd_requests", "Requests answered, by origin, method and status code.",
                   ["origin", "method", "code"])
    rq_bytes = _counter("proxyd_request_bytes", "Request body bytes received from clients.", ["origin"])
    rs_bytes = _counter("proxyd_response_bytes", "Response body bytes sent to clients.", ["origin"])
    opened = _counter("proxyd_upstream_connections_opened",
                      "Upstream connections opened.", ["origin"])
    closed = _counter("proxyd_upstream_connections_closed",
                      "Upstream connections closed, by reason.", ["origin", "reason"])
    hs = _counter("proxyd_tls_handshakes", "TLS handshakes with origins, by result.",
                  ["origin", "result"])
    pool = _counter("proxyd_pool_requests",
                    "Requests by pool result: hit = no handshake on their path.", ["origin", "result"])
    retries = _counter("proxyd_retries", "Idempotent requests retried on a fresh connection.", ["origin"])
    errors = _counter("proxyd_upstream_errors",
                      "Errors answered to clients, by Proxy-Status error type.", ["origin", "error"])
    for label, o in sorted(origins.items()):
        for key, n in sorted(o.get("requests", {}).items()):
            method, code = key.split(" ")
            req.add_metric([label, method, code], n)
        rq_bytes.add_metric([label], o.get("request_bytes", 0))
        rs_bytes.add_metric([label], o.get("response_bytes", 0))
        opened.add_metric([label], o.get("opened", 0))
        for reason, n in sorted(o.get("closed", {}).items()):
            closed.add_metric([label, reason], n)
        for result, n in sorted(o.get("handshakes", {}).items()):
            hs.add_metric([label, result], n)
        for result, n in sorted(o.get("pool", {}).items()):
            pool.add_metric([label, result], n)
        retries.add_metric([label], o.get("retries", 0))
        for err, n in sorted(o.get("errors", {}).items()):
            errors.add_metric([label, err], n)
    yield from (req, rq_bytes, rs_bytes, opened, closed, hs, pool, retries, errors)


_HIST_DOCS = {
    "duration": ("proxyd_request_duration_seconds", "Time from request head to response end."),
    "ttfb": ("proxyd_upstream_ttfb_seconds",
             "Time from the request being sent upstream to the response head."),
    "handshake": ("proxyd_tls_handshake_duration_seconds", "TLS handshake duration."),
    "wait": ("proxyd_pool_wait_seconds", "Time a request waited for an upstream connection."),
}


def _histograms(origins: dict[str, Any]) -> Iterator[Any]:
    for key, (name, doc) in _HIST_DOCS.items():
        fam = HistogramMetricFamily(name, doc, labels=["origin"])
        for label, o in sorted(origins.items()):
            snap = o.get("hist", {}).get(key)
            if not snap:
                continue
            counts, total = snap[:-1], snap[-1]
            cumulative, buckets = 0, []
            for bound, n in zip(BUCKETS, counts):
                cumulative += n
                buckets.append((_le(bound), cumulative))
            buckets.append(("+Inf", cumulative + counts[-1]))
            fam.add_metric([label], buckets, total)
        yield fam


def _process_metrics(v: MetricsView) -> Iterator[Any]:
    counters = v.totals.get("counters", {})
    conns = _counter("proxyd_client_connections", "Client connections accepted.", [])
    conns.add_metric([], counters.get("client_connections", 0))
    yield conns
    active = GaugeMetricFamily("proxyd_client_connections_active", "Client connections open now.")
    active.add_metric([], v.gauges.get("client_connections", 0))
    yield active
    upstream = GaugeMetricFamily("proxyd_upstream_connections",
                                 "Upstream connections now, by state.", labels=["origin", "state"])
    waiting = GaugeMetricFamily("proxyd_pool_waiting", "Requests waiting for a connection.",
                                labels=["origin"])
    for label, pool in sorted(v.gauges.get("pools", {}).items()):
        for state in ("idle", "busy", "connecting", "private"):
            upstream.add_metric([label, state], pool.get(state, 0))
        waiting.add_metric([label], pool.get("waiting", 0))
    yield upstream
    yield waiting
    cpu = _counter("proxyd_worker_cpu_seconds",
                   "CPU time (user and system) of the workers, the exited ones included.", [])
    cpu.add_metric([], counters.get("cpu_seconds", 0.0))
    yield cpu
    rss = GaugeMetricFamily("proxyd_worker_resident_memory_bytes",
                            "Resident memory of the serving workers, summed.")
    rss.add_metric([], v.gauges.get("resident_memory_bytes", 0))
    yield rss
    workers = GaugeMetricFamily("proxyd_workers", "Worker processes serving.")
    workers.add_metric([], v.workers)
    yield workers
    restarts = _counter("proxyd_worker_restarts", "Workers replaced after dying.", [])
    restarts.add_metric([], v.worker_restarts)
    yield restarts
    reloads = _counter("proxyd_config_reloads", "Configuration reloads, by result.", ["result"])
    reloads.add_metric(["ok"], v.reloads_ok)
    reloads.add_metric(["failed"], v.reloads_failed)
    yield reloads
    last = GaugeMetricFamily("proxyd_config_last_reload_success_timestamp_seconds",
                             "Unix time of the last successful (re)load.")
    last.add_metric([], v.last_reload_success)
    yield last
    info = GaugeMetricFamily("proxyd_build_info", "Build information.",
                             labels=["version", "python"])
    info.add_metric([__version__, platform.python_version()], 1)
    yield info
