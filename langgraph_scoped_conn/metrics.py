"""Prometheus metrics, read from the manager's stats at scrape time.

:class:`ScopedConnCollector` is a custom collector: it adds nothing to the hot
path (no counter is incremented per checkout by this module); every scrape calls
``manager.get_stats()`` once and turns it into metric families.

Per-pool families are labelled ``pool`` (the URL without its password), ``strategy``
and ``used_by``: ``tools`` for the runs' pools, ``checkpointer`` or ``store`` for
LangGraph's.  A pool gets a sample of a family only if its stats row has the key: the
checkpointer's and store's rows carry psycopg_pool's ``returns_bad`` and
``connections_lost``, the runs' pools their checkouts, waits and timed use.

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

import langgraph_scoped_conn.stats as keys
from langgraph_scoped_conn.configure import get_connection_manager
from langgraph_scoped_conn.manager import ExecutionConnectionManager

__all__ = [
    "COUNTERS",
    "GAUGES",
    "POOL_COUNTERS",
    "POOL_GAUGES",
    "POOL_SUMMARIES",
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
    "returns_bad": (
        keys.RETURNS_BAD,
        "Connections returned in a bad state to the checkpointer's and store's pools.",
    ),
    "connections_lost": (
        keys.CONNECTIONS_LOST,
        "Connections of the checkpointer's and store's pools found broken by a pool check.",
    ),
}

#: per pool, labelled ``pool`` (the URL without its password), ``strategy`` and ``used_by``
#: (``tools``, ``checkpointer``, ``store``): name -> (row key, help).  A pool gets a
#: sample only if its row has the key (the checkpointer's rows have psycopg_pool's).
POOL_GAUGES: dict[str, tuple[str, str]] = {
    "pool_max_connections": (keys.MAX_CONNECTIONS, "The pool's connection budget."),
    "pool_connections_reserved": (
        keys.RESERVED,
        "Connections of the budget set aside for the checkpointer and store (the tools' pool "
        "may use max_connections minus these).",
    ),
    "pool_connections_in_use": (keys.IN_USE, "Connections checked out of the pool."),
    "pool_connections_idle": (keys.IDLE, "Connections open and idle in the pool."),
    "pool_requests_waiting": (keys.WAITING, "Callers waiting for a connection right now."),
}
POOL_COUNTERS: dict[str, tuple[str, str]] = {
    "pool_checkouts": ("checkouts", "Connections acquired from the pool."),
    "pool_checkout_waits": (keys.WAITS, "Acquisitions that had to wait for a free connection."),
    "pool_checkout_timeouts": (keys.TIMEOUTS, "Acquisitions that gave up after pool_timeout."),
    "pool_connections_opened": (keys.OPENED, "Server connections opened."),
    "pool_connections_closed": ("connections_closed", "Server connections closed."),
    "pool_connections_errors": ("connections_errors", "Server connections that failed to open."),
    "pool_returns_bad": (
        keys.RETURNS_BAD,
        "Connections returned to the pool in a bad state (psycopg_pool pools only).",
    ),
    "pool_connections_lost": (
        keys.CONNECTIONS_LOST,
        "Connections found broken by a pool check (psycopg_pool pools only).",
    ),
}
#: per pool: name -> (row key of the count, row key of the sum in ms, help)
POOL_SUMMARIES: dict[str, tuple[str, str, str]] = {
    "pool_checkout_wait_seconds": (
        keys.WAITS,
        keys.WAIT_MS,
        "Time acquisitions that had to wait spent waiting for a connection.",
    ),
    "pool_connection_use_seconds": (
        keys.CHECKINS,
        keys.USAGE_MS,
        "Time connections stayed checked out, counted when they came back.",
    ),
    "pool_connection_create_seconds": (
        keys.CONNECTIONS_NUM,
        keys.CONNECTIONS_MS,
        "Time server connections took to open.",
    ),
}
_LABELS = ["pool", "strategy", "used_by"]
_LABEL_KEYS = (keys.URL, keys.STRATEGY, keys.USED_BY)


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
                if key in row:
                    gauge.add_metric(list(labels), row[key])
            yield gauge
        for name, (key, doc) in POOL_COUNTERS.items():
            counter = CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=_LABELS)
            for labels, row in pools.items():
                if key in row:
                    counter.add_metric(list(labels), row[key])
            yield counter
        for name, (count, ms, doc) in POOL_SUMMARIES.items():
            summary = SummaryMetricFamily(f"{PREFIX}_{name}", doc, labels=_LABELS)
            for labels, row in pools.items():
                if count in row and ms in row:
                    summary.add_metric(list(labels), int(row[count]), row[ms] / 1000)
            yield summary


_POOL_KEYS = {
    *(key for key, _doc in (*POOL_GAUGES.values(), *POOL_COUNTERS.values())),
    *(key for count, ms, _doc in POOL_SUMMARIES.values() for key in (count, ms)),
}


def _by_pool(rows: list[dict[str, Any]]) -> dict[tuple[str, ...], dict[str, float]]:
    return keys.sum_rows(rows, _LABEL_KEYS, _POOL_KEYS)


def render_latest(manager: ExecutionConnectionManager | None = None) -> tuple[bytes, str]:
    """The Prometheus text exposition of ``manager``'s metrics, and its content type."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ScopedConnCollector(manager))
    return generate_latest(registry), CONTENT_TYPE_LATEST
