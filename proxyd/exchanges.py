"""Finished exchanges: one tuple on the request path; metrics and access log in batches.

Why: counting a request into the metrics and formatting its access-log line cost about 0.5
and 2 µs of CPU each when measured in a tight loop, but 3.4 and 4.7 µs under wrk load
(``bench/run --scenario overhead``, CPU per request with each switched off): between two
requests of a worker the clients, the origin and the other worker run on the same two cores,
so the code and data of counting and formatting (bisect, float formatting, the histogram
lists, the line list) were cold again for every request. Appending one tuple keeps the
request path short; up to :data:`BATCH` of them are then counted and formatted in one pass,
where the code and data stay warm from one record to the next. A batch is also taken at
every housekeeping tick and before each stats report, so the access log is no later than
before and the metrics the master serves are at most one report old, as before.
"""

from __future__ import annotations

import logging
import time
from bisect import bisect_left
from typing import TYPE_CHECKING

from .accesslog import AccessLog
from .metrics import BUCKETS, METHOD_LABELS, NO_ORIGIN, OriginStats, WorkerStats

if TYPE_CHECKING:
    from .pool import Pool

log = logging.getLogger("proxyd.exchanges")

# Records per batch: large enough that the code stays warm across a batch, small enough that
# a batch (about 1 µs a record) never holds the loop for long: 32 records are ~30 µs,
# taken after the response that completed the batch was written.
BATCH = 32

# Reasons an exchange ended that the access log gives but that were never answered with a
# Proxy-Status (RFC 9209) error: not counted in proxyd_upstream_errors_total.
_NOT_ANSWERED = frozenset({"client_aborted", "shutdown_timeout"})

# One finished exchange, as the client connection knew it (see ClientConnection._log):
# (ended, started, t_conn, t_head, peer, method, path, pool, status, bytes_in, bytes_out,
#  reused, retried, error) — monotonic times, 0.0 for what did not happen; method and path
# b"-" when no request head was parsed, pool None before one was chosen.
Record = tuple[float, float, float, float, str, bytes, bytes, "Pool | None", int, int, int,
               bool, bool, str]


class ExchangeLog:
    """Collects finished exchanges and hands them in batches to the metrics and the access
    log of one worker."""

    __slots__ = ("enabled", "_pending", "_stats", "_metrics", "_access")

    def __init__(self, stats: WorkerStats, metrics: bool, access: AccessLog) -> None:
        self.enabled = metrics or access.enabled  # nothing to record otherwise
        self._pending: list[Record] = []
        self._stats = stats
        self._metrics = metrics
        self._access = access

    def add(self, record: Record) -> None:
        """Record one finished exchange (the per-request call)."""
        pending = self._pending
        pending.append(record)
        if len(pending) >= BATCH:
            self.flush()

    def flush(self) -> None:
        """Count and format every recorded exchange."""
        batch = self._pending
        if not batch:
            return
        self._pending = []
        try:
            if self._metrics:
                self._count(batch)
            if self._access.enabled:
                self._write(batch)
        except Exception:  # noqa: BLE001 - a bug here must not fail the request that flushed
            log.exception("counting or logging %d finished exchanges failed", len(batch))

    def _count(self, batch: list[Record]) -> None:
        # Records come in runs of the same origin (a worker mostly serves a few): each run
        # is counted with that origin's counters looked up once.
        start = 0
        while start < len(batch):
            pool = batch[start][7]
            end = start + 1
            while end < len(batch) and batch[end][7] is pool:
                end += 1
            ostats = pool.ostats if pool is not None else self._stats.origin(NO_ORIGIN, True)
            _count_run(ostats, batch, start, end)
            start = end

    def _write(self, batch: list[Record]) -> None:
        # Wall-clock time of each record from its monotonic end: one clock pair per batch.
        offset = time.time() - time.monotonic()
        record = self._access.record
        for (ended, started, t_conn, t_head, peer, method, path, pool, status, bytes_in,
             bytes_out, reused, retried, error) in batch:
            started = started or ended
            duration = ended - started
            # The log line says 0 for what did not happen, and the whole time as the wait
            # of a request that never got a connection.
            record(ended + offset, peer, method, pool.name if pool is not None else "-", path,
                   status, bytes_in, bytes_out, duration,
                   t_conn - started if t_conn else duration,
                   t_head - t_conn if t_head and t_conn else 0.0, reused, retried, error)


def _count_run(ostats: OriginStats, batch: list[Record], start: int, end: int) -> None:
    """Count ``batch[start:end]``, exchanges of one origin, into ``ostats``.

    The histograms' observe is written out here (a bisect and an increment per value; the
    sums added once per run): three method calls a record were a third of this loop."""
    requests = ostats.requests
    labels = METHOD_LABELS
    duration, wait, ttfb = ostats.duration, ostats.wait, ostats.ttfb
    d_counts, w_counts, t_counts = duration.counts, wait.counts, ttfb.counts
    d_sum = w_sum = t_sum = 0.0
    bytes_in_total = bytes_out_total = 0
    for i in range(start, end):
        (ended, started, t_conn, t_head, _, method, _, _, status, bytes_in, bytes_out, _, retried,
         error) = batch[i]
        started = started or ended
        requests[(labels.get(method, "OTHER"), status)] += 1
        bytes_in_total += bytes_in
        bytes_out_total += bytes_out
        value = ended - started
        d_counts[bisect_left(BUCKETS, value)] += 1
        d_sum += value
        # Histograms leave out what did not happen (no connection, no response head).
        if t_conn:
            value = t_conn - started
            w_counts[bisect_left(BUCKETS, value)] += 1
            w_sum += value
            if t_head:
                value = t_head - t_conn
                t_counts[bisect_left(BUCKETS, value)] += 1
                t_sum += value
        if error and error not in _NOT_ANSWERED:
            ostats.errors[error] += 1
        if retried:
            ostats.retries += 1
    duration.total += d_sum
    wait.total += w_sum
    ttfb.total += t_sum
    ostats.request_bytes += bytes_in_total
    ostats.response_bytes += bytes_out_total
