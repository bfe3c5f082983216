"""The stats payload: the guide's shape, plus pool measures and counters.

Pure code over plain snapshots gathered by the manager.  Every key is documented in
the README's stats table.  Nothing here can contain a password: pool URLs are
rendered with the password hidden before they get here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["build_stats"]

_POOL_COUNTERS = ("opened", "closed", "checkouts", "checkins", "waits", "timeouts", "resets")
#: counters named as psycopg_pool names them (``connections_errors``, ``requests_wait_ms``)
_LATER_COUNTERS = ("wait_us", "connect_errors")


def _ms(micros: int) -> float:
    return round(micros / 1000, 3)


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
) -> dict[str, Any]:
    """Merge live measures and counters into one JSON-serialisable dict.

    ``pools`` are :meth:`PoolHandle.snapshot` dicts (shared pools and the pools of
    live ``per_execution`` executions); ``retired`` holds the summed counters of
    per-execution pools already disposed.
    """
    totals = {name: retired.get(name, 0) for name in _POOL_COUNTERS + _LATER_COUNTERS}
    peak_open = retired.get("peak_open", 0)
    peak_wait = retired.get("peak_wait_us", 0)
    rows = []
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
            "url": pool["url"],
            "strategy": pool["strategy"],
            "dialect": pool["dialect"],
            "driver": pool["driver"],
            "max_connections": pool["max_connections"],
            "connections_in_use": pool["in_use"],
            "connections_idle": pool["idle"],
            "peak_connections": c["peak_open"],
            "peak_connections_in_use": c["peak_in_use"],
            **{
                f"connections_{k}" if k in ("opened", "closed") else k: c[k] for k in _POOL_COUNTERS
            },
            "requests_waiting": pool["waiting"],
            "requests_wait_ms": _ms(c["wait_us"]),
            "requests_wait_max_ms": _ms(c["peak_wait_us"]),
            "connections_errors": c["connect_errors"],
        }
        if pool["execution_id"] is not None:
            row["execution_id"] = pool["execution_id"]
        rows.append(row)
    strategies = sorted({r["strategy"] for r in rows})
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
        "session_resets": totals["resets"],
        "peak_connections": peak_open,
        "draining_executions": draining,
        "pending_releases": pending_releases,
        "tracked_runs": tracked_runs,
        **counters,
        "pools": rows,
    }
