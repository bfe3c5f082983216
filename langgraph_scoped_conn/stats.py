"""The stats payload: the guide's shape, plus pool measures and counters.

Pure code over plain values gathered by the registry.  Every key is documented in
the README's stats table.  Nothing here can contain a password: pool URLs are
rendered with the password hidden before they get here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from langgraph_scoped_conn.pool import PoolHandle
    from langgraph_scoped_conn.settings import ScopedConnSettings

__all__ = ["build_stats"]

_POOL_COUNTERS = ("opened", "closed", "checkouts", "checkins", "waits", "timeouts")


def build_stats(
    *,
    executions: Mapping[str, Mapping[str, Any]],
    counters: Mapping[str, int],
    handles: Sequence[PoolHandle],
    retired: Mapping[str, int],
    draining: int,
    pending_releases: int,
    tracked_runs: int,
    settings: ScopedConnSettings,
) -> dict[str, Any]:
    """Merge live measures and counters into one JSON-serialisable dict."""
    totals = {name: retired.get(name, 0) for name in _POOL_COUNTERS}
    peak_open = retired.get("peak_open", 0)
    pools = []
    in_use = idle = 0
    for handle in handles:
        c = handle.counters
        with c.lock:
            snapshot = {name: getattr(c, name) for name in _POOL_COUNTERS}
            peak = c.peak_open
            peak_in_use = c.peak_in_use
        for name, value in snapshot.items():
            totals[name] += value
        peak_open = max(peak_open, peak)
        h_in_use, h_idle = handle.in_use(), handle.idle()
        in_use += h_in_use
        idle += h_idle
        if handle.strategy != "per_execution":
            pools.append(
                {
                    "url": handle.safe_url,
                    "strategy": handle.strategy,
                    "dialect": handle.dialect_name,
                    "max_connections": handle.size,
                    "connections_in_use": h_in_use,
                    "connections_idle": h_idle,
                    "peak_connections": peak,
                    "peak_connections_in_use": peak_in_use,
                    **{
                        f"connections_{k}" if k in ("opened", "closed") else k: v
                        for k, v in snapshot.items()
                    },
                }
            )
    return {
        "active_executions": len(executions),
        "total_tracked_connections": sum(
            e["sql_engines"] + e["sql_databases"] + e["custom_connections"]
            for e in executions.values()
        ),
        "executions": {eid: dict(e) for eid, e in executions.items()},
        "strategy": ", ".join(sorted({p["strategy"] for p in pools})) or settings.strategy,
        "max_connections": settings.max_connections,
        "max_connections_per_execution": settings.max_connections_per_execution,
        "connections_in_use": in_use,
        "connections_idle": idle,
        "connections_opened": totals["opened"],
        "connections_closed": totals["closed"],
        "connections_reused": max(totals["checkouts"] - totals["opened"], 0),
        "checkouts": totals["checkouts"],
        "checkins": totals["checkins"],
        "checkout_waits": totals["waits"],
        "checkout_timeouts": totals["timeouts"],
        "peak_connections": peak_open,
        "draining_executions": draining,
        "pending_releases": pending_releases,
        "tracked_runs": tracked_runs,
        **counters,
        "pools": pools,
    }
