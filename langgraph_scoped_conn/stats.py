"""The stats payload: the guide's shape, plus pool measures and counters.

Pure code over plain snapshots gathered by the manager.  Every key is documented in
the docs' stats table, and the key names the metrics modules read are constants here.
Nothing here can contain a password: pool URLs are rendered with the password hidden
before they get here.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

__all__ = ["RetiredCounters", "build_stats", "sum_rows"]

# -- keys of a pool row, read by the metrics modules -------------------------------------
URL = "url"
#: ``server.address:server.port/db.namespace``: OpenTelemetry's ``db.client.connection.pool.name``
POOL_NAME = "pool_name"
USED_BY = "used_by"
STRATEGY = "strategy"
MAX_CONNECTIONS = "max_connections"
IN_USE = "connections_in_use"
IDLE = "connections_idle"
RESERVED = "connections_reserved"
WAITING = "requests_waiting"
WAIT_MS = "requests_wait_ms"
WAITS = "waits"
TIMEOUTS = "timeouts"
USAGE_MS = "usage_ms"
CHECKINS = "checkins"
CONNECTIONS_MS = "connections_ms"
#: server connections timed in ``connections_ms`` (psycopg_pool's name)
CONNECTIONS_NUM = "connections_num"
OPENED = "connections_opened"
#: psycopg_pool's counters, in the rows of the checkpointer's and store's pools only:
#: connections returned to the pool in a bad state, and found broken by a pool check
RETURNS_BAD = "returns_bad"
CONNECTIONS_LOST = "connections_lost"

#: what uses a pool's connections: the runs' tools, LangGraph's checkpointer or store
USED_BY_TOOLS = "tools"

_POOL_COUNTERS = ("opened", "closed", "checkouts", "checkins", "waits", "timeouts", "resets")
#: counters named as psycopg_pool names them (``connections_errors``, ``requests_wait_ms``)
_LATER_COUNTERS = ("wait_us", "connect_errors", "use_us", "create_us", "create_count")


def _ms(micros: int) -> float:
    return round(micros / 1000, 3)


def _pool_name_of(url: str) -> str:
    """``host:port/database`` of a URL shown without its password (rows that lack it)."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.hostname or 'localhost'}{port}/{parts.path.lstrip('/')}"


def sum_rows(
    rows: Sequence[Mapping[str, Any]], by: Sequence[str], keys: Iterable[str]
) -> dict[tuple[str, ...], dict[str, float]]:
    """Pool rows summed by their values of ``by``, for each of ``keys`` the rows have.

    Strategy ``per_execution`` has a pool per execution, all under one URL: their rows
    add up.  A key no row of a group has is left out of that group's sums (the
    checkpointer's rows have psycopg_pool's keys, the runs' pools their own).
    """
    wanted = set(keys)
    out: dict[tuple[str, ...], dict[str, float]] = {}
    for row in rows:
        total = out.setdefault(tuple(str(row.get(label, "")) for label in by), {})
        for key in wanted & row.keys():
            total[key] = total.get(key, 0.0) + float(row[key])
    return out


class RetiredCounters:
    """The summed counters of per-execution pools already disposed (kept in the totals)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, int] = {}

    def add(self, handle: Any) -> None:
        """Keep a disposed pool handle's counters (once per handle)."""
        values = handle.counters.snapshot()
        with self._lock:
            if handle.retired:
                return
            handle.retired = True
            for name, value in values.items():
                if name.startswith("peak"):
                    self._values[name] = max(self._values.get(name, 0), value)
                else:
                    self._values[name] = self._values.get(name, 0) + value

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)


def build_stats(
    *,
    executions: Mapping[str, Mapping[str, Any]],
    counters: Mapping[str, int],
    pools: Sequence[Mapping[str, Any]],
    retired: Mapping[str, int],
    draining: int,
    pending_releases: int,
    tracked_runs: int,
    settings: Mapping[str, Any],
    langgraph_pools: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """Merge live measures and counters into one JSON-serialisable dict.

    ``pools`` are :meth:`PoolHandle.snapshot` dicts (shared pools and the pools of
    live ``per_execution`` executions); ``retired`` holds the summed counters of
    per-execution pools already disposed; ``langgraph_pools`` are rows of the
    checkpointer's and store's pools, already in the row shape.
    """
    totals = {name: retired.get(name, 0) for name in _POOL_COUNTERS + _LATER_COUNTERS}
    peak_open = retired.get("peak_open", 0)
    peak_wait = retired.get("peak_wait_us", 0)
    rows: list[dict[str, Any]] = []
    in_use = idle = waiting = 0
    for pool in pools:
        c = pool["counters"]
        for name in _POOL_COUNTERS + _LATER_COUNTERS:
            totals[name] += c[name]
        peak_open = max(peak_open, c["peak_open"])
        peak_wait = max(peak_wait, c["peak_wait_us"])
        in_use += pool["in_use"]
        idle += pool["idle"]
        waiting += pool["waiting"]
        row = {
            URL: pool["url"],
            POOL_NAME: pool["pool_name"],
            USED_BY: USED_BY_TOOLS,
            STRATEGY: pool["strategy"],
            "strategy_reason": pool["strategy_reason"],
            "pooler_detected": pool["pooler_detected"],
            "dialect": pool["dialect"],
            "driver": pool["driver"],
            MAX_CONNECTIONS: pool["max_connections"],
            RESERVED: pool["reserved"],
            IN_USE: pool["in_use"],
            IDLE: pool["idle"],
            "peak_connections": c["peak_open"],
            "peak_connections_in_use": c["peak_in_use"],
            **{
                f"connections_{k}" if k in ("opened", "closed") else k: c[k] for k in _POOL_COUNTERS
            },
            WAITING: pool["waiting"],
            WAIT_MS: _ms(c["wait_us"]),
            "requests_wait_max_ms": _ms(c["peak_wait_us"]),
            "connections_errors": c["connect_errors"],
            USAGE_MS: _ms(c["use_us"]),
            CONNECTIONS_MS: _ms(c["create_us"]),
            CONNECTIONS_NUM: c["create_count"],
        }
        if pool["execution_id"] is not None:
            row["execution_id"] = pool["execution_id"]
        rows.append(row)
    returns_bad = lost = 0
    for langgraph_row in langgraph_pools:
        in_use += langgraph_row[IN_USE]
        idle += langgraph_row[IDLE]
        waiting += langgraph_row[WAITING]
        returns_bad += langgraph_row.get(RETURNS_BAD, 0)
        lost += langgraph_row.get(CONNECTIONS_LOST, 0)
        rows.append({POOL_NAME: _pool_name_of(langgraph_row[URL]), **langgraph_row})
    strategies = sorted({r[STRATEGY] for r in rows if r[USED_BY] == USED_BY_TOOLS})
    return {
        "active_executions": len(executions),
        "total_tracked_connections": sum(
            e["sql_engines"] + e["sql_databases"] + e["custom_connections"]
            for e in executions.values()
        ),
        "executions": {eid: dict(e) for eid, e in executions.items()},
        "strategy": ", ".join(strategies) or settings["strategy"],
        "max_connections": settings["max_connections"],
        "max_connections_per_execution": settings["max_connections_per_execution"],
        "connections_in_use": in_use,
        "connections_idle": idle,
        "connections_opened": totals["opened"],
        "connections_closed": totals["closed"],
        "connections_reused": max(totals["checkouts"] - totals["opened"], 0),
        "checkouts": totals["checkouts"],
        "checkins": totals["checkins"],
        "checkout_waits": totals["waits"],
        "checkout_timeouts": totals["timeouts"],
        "requests_waiting": waiting,
        "requests_wait_ms": _ms(totals["wait_us"]),
        "requests_wait_max_ms": _ms(peak_wait),
        "connections_errors": totals["connect_errors"],
        "usage_ms": _ms(totals["use_us"]),
        "connections_ms": _ms(totals["create_us"]),
        CONNECTIONS_NUM: totals["create_count"],
        RETURNS_BAD: returns_bad,
        CONNECTIONS_LOST: lost,
        "session_resets": totals["resets"],
        "peak_connections": peak_open,
        "draining_executions": draining,
        "pending_releases": pending_releases,
        "tracked_runs": tracked_runs,
        **counters,
        "pools": rows,
    }
