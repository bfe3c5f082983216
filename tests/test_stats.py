"""The stats payload: pool rows of every user, their keys, and the totals over them."""

from __future__ import annotations

from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import make_url

import langgraph_scoped_conn as lsc
from langgraph_scoped_conn import stats as keys
from langgraph_scoped_conn.stats import build_stats
from tests.conftest import Database

SETTINGS = {"strategy": "shared", "max_connections": 4, "max_connections_per_execution": None}


def checkpointer_row(**extra: Any) -> dict[str, Any]:
    """A row as the checkpointer's psycopg_pool would give it (no ``pool_name``)."""
    return {
        keys.URL: "postgresql://app:***@db.internal:6543/agents",
        keys.USED_BY: "checkpointer",
        keys.STRATEGY: "shared",
        keys.MAX_CONNECTIONS: 2,
        keys.IN_USE: 1,
        keys.IDLE: 1,
        keys.WAITING: 0,
        **extra,
    }


def stats_of(*rows: dict[str, Any]) -> dict[str, Any]:
    return build_stats(
        executions={},
        counters={},
        pools=[],
        retired={},
        draining=0,
        pending_releases=0,
        tracked_runs=0,
        settings=SETTINGS,
        langgraph_pools=rows,
    )


def test_a_row_without_a_pool_name_gets_host_port_and_database() -> None:
    (row,) = stats_of(checkpointer_row())["pools"]
    assert row[keys.POOL_NAME] == "db.internal:6543/agents"
    (row,) = stats_of(checkpointer_row(**{keys.URL: "postgresql:///agents"}))["pools"]
    assert row[keys.POOL_NAME] == "localhost/agents"
    (row,) = stats_of(checkpointer_row(**{keys.POOL_NAME: "given"}))["pools"]
    assert row[keys.POOL_NAME] == "given"  # the row's own name wins


def test_returns_bad_and_connections_lost_are_summed_over_the_rows_that_have_them() -> None:
    stats = stats_of(
        checkpointer_row(**{keys.RETURNS_BAD: 2, keys.CONNECTIONS_LOST: 1}),
        checkpointer_row(**{keys.USED_BY: "store", keys.RETURNS_BAD: 3}),
    )
    assert stats[keys.RETURNS_BAD] == 5
    assert stats[keys.CONNECTIONS_LOST] == 1
    assert stats_of()[keys.RETURNS_BAD] == stats_of()[keys.CONNECTIONS_LOST] == 0
    assert stats["connections_in_use"] == 2 and stats["connections_idle"] == 2


def test_a_tools_row_names_its_pool_and_counts_connects(
    configure_default: Any, pg_db: Database
) -> None:
    mgr = configure_default(max_connections=2)
    with lsc.ExecutionScope("row"):
        engine = lsc.create_execution_scoped_engine_sync()
        with engine.connect() as a, engine.connect() as b:
            a.execute(text("select 1"))
            b.execute(text("select 1"))
    stats = mgr.get_stats()
    (row,) = stats["pools"]
    url = make_url(pg_db.url)
    assert row[keys.POOL_NAME] == f"{url.host}:{url.port}/{pg_db.name}"
    assert url.password and url.password not in row[keys.POOL_NAME]
    assert row[keys.USED_BY] == keys.USED_BY_TOOLS
    assert row[keys.CONNECTIONS_NUM] == row[keys.OPENED] == 2
    assert row[keys.CHECKINS] == 2 and row[keys.USAGE_MS] > 0 and row[keys.CONNECTIONS_MS] > 0
    assert stats[keys.CONNECTIONS_NUM] == 2
    assert keys.RETURNS_BAD not in row  # psycopg_pool's counters only: none here
    assert stats[keys.RETURNS_BAD] == 0
