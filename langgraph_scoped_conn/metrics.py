"""Prometheus metrics, read from the manager's stats at scrape time.

:class:`ScopedConnCollector` is a custom collector: it adds nothing to the hot
path (no counter is incremented per checkout by this module); every scrape calls
``manager.get_stats()`` once and turns it into metric families.

Requires the ``metrics`` extra (``pip install 'langgraph-scoped-conn[metrics]'``).

Example:
    >>> from prometheus_client import REGISTRY  # doctest: +SKIP
    >>> REGISTRY.register(ScopedConnCollector())
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)

from langgraph_scoped_conn.configure import get_connection_manager
from langgraph_scoped_conn.manager import ExecutionConnectionManager

__all__ = [
    "COUNTERS",
    "GAUGES",
    "POOL_COUNTERS",
    "POOL_GAUGES",
    "PREFIX",
    "ScopedConnCollector",
    "render_latest",
]

PREFIX = "langgraph_scoped_conn"

#: metric name (without prefix) -> (stats key, help text)
GAUGES: dict[str, tuple[str, str]] = {
    "active_executions": ("active_executions", "Execution scopes open right now."),
    "draining_executions": (
        "draining_executions",
        "Ended executions waiting for a worker thread to return a connection.",
    ),
    "connections_in_use": ("connections_in_use", "Connections checked out of the pools."),
    "connections_idle": ("connections_idle", "Connections open and idle in the pools."),
    "max_connections": ("max_connections", "The connection budget of each shared pool."),
    "peak_connections": ("peak_connections", "Most connections open at once."),
    "requests_waiting": ("requests_waiting", "Callers waiting for a connection right now."),
}

#: metric name (without prefix and ``_total``) -> (stats key, help text)
COUNTERS: dict[str, tuple[str, str]] = {
    "checkouts": ("checkouts", "Connections acquired from the pools."),
    "checkout_waits": ("checkout_waits", "Acquisitions that had to wait for a free connection."),
    "checkout_timeouts": (
        "checkout_timeouts",
        "Acquisitions that gave up after pool_timeout (ConnectionBudgetExceededError).",
    ),
    "connections_opened": ("connections_opened", "Server connections opened."),
    "connections_closed": ("connections_closed", "Server connections closed."),
    "scopes_opened": ("scopes_opened", "Execution scopes opened."),
    "scopes_closed": ("scopes_closed", "Execution scopes closed."),
    "leaks_reclaimed": (
        "leaks_reclaimed",
        "Connections still checked out when their scope ended, closed by the package.",
    ),
    "scopes_reaped": (
        "scopes_reaped",
        "Scopes released by the reaper after max_scope_lifetime or by the cleanup route.",
    ),
    "release_errors": ("release_errors", "Resources that failed to close at scope end."),
    "scope_open_failures": (
        "scope_open_failures",
        "Runs whose scope could not be opened (their tools got ScopeUnavailableError).",
    ),
    "connections_errors": ("connections_errors", "Server connections that failed to open."),
}

#: per pool, labelled ``pool`` (the redacted URL) and ``strategy``: name -> (row key, help)
POOL_GAUGES: dict[str, tuple[str, str]] = {
    "pool_max_connections": ("max_connections", "The pool's connection budget."),
    "pool_connections_in_use": ("connections_in_use", "Connections checked out of the pool."),
    "pool_connections_idle": ("connections_idle", "Connections open and idle in the pool."),
    "pool_requests_waiting": ("requests_waiting", "Callers waiting for a connection right now."),
}
POOL_COUNTERS: dict[str, tuple[str, str]] = {
    "pool_checkouts": ("checkouts", "Connections acquired from the pool."),
    "pool_checkout_waits": ("waits", "Acquisitions that had to wait for a free connection."),
    "pool_checkout_timeouts": ("timeouts", "Acquisitions that gave up after pool_timeout."),
    "pool_connections_opened": ("connections_opened", "Server connections opened."),
    "pool_connections_closed": ("connections_closed", "Server connections closed."),
    "pool_connections_errors": ("connections_errors", "Server connections that failed to open."),
}
_LABELS = ["pool", "strategy"]


class ScopedConnCollector:
    """A Prometheus collector over a manager's stats.

    Args:
        manager: the manager; the process default, looked up at each scrape, when ``None``.
    """

    def __init__(self, manager: ExecutionConnectionManager | None = None) -> None:
        if manager is None:
            self._get: Callable[[], ExecutionConnectionManager] = get_connection_manager
        else:
            self._get = lambda: manager

    def describe(self) -> list[Metric]:
        """The metric families without samples, so registering does not scrape."""
        return list(self._families(None))

    def collect(self) -> Iterator[Metric]:
        """One stats read, turned into metric families."""
        yield from self._families(self._get().get_stats())

    @staticmethod
    def _families(stats: dict[str, Any] | None) -> Iterator[Metric]:
        for name, (key, doc) in GAUGES.items():
            gauge = GaugeMetricFamily(f"{PREFIX}_{name}", doc)
            if stats is not None:
                gauge.add_metric([], float(stats.get(key, 0)))
            yield gauge
        for name, (key, doc) in COUNTERS.items():
            counter = CounterMetricFamily(f"{PREFIX}_{name}", doc)
            if stats is not None:
                counter.add_metric([], float(stats.get(key, 0)))
            yield counter
        pools = _by_pool(stats["pools"] if stats is not None else [])
        for name, (key, doc) in POOL_GAUGES.items():
            gauge = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=_LABELS)
            for labels, row in pools.items():
                gauge.add_metric(list(labels), float(row[key]))
            yield gauge
        for name, (key, doc) in POOL_COUNTERS.items():
            counter = CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=_LABELS)
            for labels, row in pools.items():
                counter.add_metric(list(labels), float(row[key]))
            yield counter
        summary = SummaryMetricFamily(
            f"{PREFIX}_pool_checkout_wait_seconds",
            "Time acquisitions that had to wait spent waiting for a connection.",
            labels=_LABELS,
        )
        for labels, row in pools.items():
            summary.add_metric(list(labels), int(row["waits"]), row["requests_wait_ms"] / 1000)
        yield summary


def _by_pool(rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, float]]:
    """Stats rows summed by (redacted URL, strategy): per_execution has a pool per execution."""
    keys = {key for key, _doc in (*POOL_GAUGES.values(), *POOL_COUNTERS.values())}
    out: dict[tuple[str, str], dict[str, float]] = {}
    for row in rows:
        total = out.setdefault((row["url"], row["strategy"]), dict.fromkeys(keys, 0.0))
        for key in keys | {"requests_wait_ms"}:
            total[key] = total.get(key, 0.0) + float(row[key])
    return out


def render_latest(manager: ExecutionConnectionManager | None = None) -> tuple[bytes, str]:
    """The Prometheus text exposition of ``manager``'s metrics, and its content type."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ScopedConnCollector(manager))
    return generate_latest(registry), CONTENT_TYPE_LATEST
