"""Per-worker counters kept as plain integers on the hot path.

Incrementing an attribute costs tens of nanoseconds; prometheus-client's multiprocess mode
costs ~1 µs per update (see REFERENCES.md), so workers count locally and the master
aggregates their snapshots.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(slots=True)
class WorkerStats:
    """Monotonic counters of one worker process."""

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

    def snapshot(self) -> dict[str, float]:
        """A copy of the counters, for reporting."""
        return asdict(self)
