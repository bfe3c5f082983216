"""Leak report, attribution and Prometheus metrics, on real PostgreSQL and graphs.

The orphan reaper (``reap()``, ``max_scope_lifetime``) is in test_manager.py.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any, TypedDict

import pytest
from langchain_core.messages import AIMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import tool
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

import langgraph_scoped_conn as lsc
from langgraph_scoped_conn import ExecutionConnectionManager
from langgraph_scoped_conn.metrics import ScopedConnCollector, render_latest
from tests.conftest import Database, app_backends, eventually

LOGGER = "langgraph_scoped_conn"
_held: list[Any] = []  # connections a "leaky" node keeps past the end of its run


@pytest.fixture(autouse=True)
def _forget_held() -> Iterator[None]:
    yield
    _held.clear()


@pytest.fixture
def configure_default(configure_default: Any) -> Any:
    """conftest's ``configure_default`` with a 5 s ``pool_timeout`` unless given."""

    def make(url: str | None = None, **options: Any) -> ExecutionConnectionManager:
        options.setdefault("pool_timeout", 5)
        return configure_default(url, **options)  # type: ignore[no-any-return]

    return make


class State(TypedDict):
    n: int


def leaky_node(state: State, config: RunnableConfig) -> dict[str, int]:
    conn = lsc.get_scoped_engine(config).connect()
    conn.execute(text("select 1"))
    _held.append(conn)  # never closed: the scope must reclaim it
    return {"n": state["n"] + 1}


def leaky_graph() -> Any:
    builder = StateGraph(State)
    builder.add_node("leaky", leaky_node)
    builder.add_edge(START, "leaky")
    builder.add_edge("leaky", END)
    return lsc.with_scoped_connections(builder.compile())


def leak_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == LOGGER and r.levelno == logging.WARNING and "still checked out" in r.message
    ]


# -- leak report ------------------------------------------------------------------------


@pytest.mark.parametrize("debug", [False, True])
def test_leak_in_a_node_is_reported_once_counted_and_closed_on_the_server(
    configure_default: Any, pg_db: Database, caplog: pytest.LogCaptureFixture, debug: bool
) -> None:
    configure_default(max_connections=3, debug=debug)
    graph = leaky_graph()
    caplog.set_level(logging.WARNING, logger=LOGGER)
    assert graph.invoke({"n": 0}, {"run_id": "0c7b5a8e-1d3e-4a55-9d7a-6f1f3c2b9a01"}) == {"n": 1}
    assert lsc.get_connection_manager().drain()  # the run's end hands release to a thread

    records = leak_records(caplog)
    assert len(records) == 1, [r.message for r in records]
    message = records[0].getMessage()
    assert "0c7b5a8e-1d3e-4a55-9d7a-6f1f3c2b9a01" in message  # the execution (root run id)
    assert "node 'leaky'" in message  # langgraph_node from the run's metadata
    if debug:
        assert "acquired at:" in message and "leaky_node" in message
    else:
        assert "acquired at:" not in message
    stats = lsc.get_connection_stats()
    assert stats["leaks_reclaimed"] == 1
    assert stats["connections_in_use"] == 0
    # the leaked connection was closed on the server; only idle pooled ones remain
    eventually(
        lambda: len(app_backends(pg_db, "langgraph_scoped_conn%")) == stats["connections_idle"],
        "only pooled backends remain",
    )
    assert _held[0].invalidated or _held[0].closed


def test_leak_in_a_tool_names_the_tool_node(
    configure_default: Any, pg_db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    configure_default(max_connections=3)

    @tool
    def count_orders(config: RunnableConfig) -> str:
        """Count the orders, and forget to return the connection."""
        conn = lsc.get_scoped_engine(config).connect()
        _held.append(conn)
        return str(conn.execute(text("select count(*) from orders")).scalar())

    builder = StateGraph(MessagesState)
    builder.add_node("tools", ToolNode([count_orders]))
    builder.add_edge(START, "tools")
    builder.add_edge("tools", END)
    graph = lsc.with_scoped_connections(builder.compile())
    call = {"name": "count_orders", "args": {}, "id": "call-1", "type": "tool_call"}
    caplog.set_level(logging.WARNING, logger=LOGGER)

    out = graph.invoke({"messages": [AIMessage("", tool_calls=[call])]})
    assert lsc.get_connection_manager().drain()  # the run's end hands release to a thread

    assert out["messages"][-1].content == "500"
    records = leak_records(caplog)
    assert len(records) == 1
    # langgraph_node of the ToolNode; the tool's own config carries no tool name
    assert "acquired by node 'tools' / tool 'count_orders'" in records[0].getMessage()
    assert lsc.get_connection_stats()["leaks_reclaimed"] == 1


class BrokenResource:
    def close(self) -> None:
        raise OSError("socket already gone for postgresql://app:hunter2@db/x")


@pytest.mark.parametrize("debug", [False, True])
def test_tracked_resource_that_fails_to_close_is_reported_and_counted(
    configure_default: Any, caplog: pytest.LogCaptureFixture, debug: bool
) -> None:
    configure_default(debug=debug)

    def tracks(state: State, config: RunnableConfig) -> dict[str, int]:
        lsc.track_connection(BrokenResource())
        return {"n": 1}

    builder = StateGraph(State)
    builder.add_node("tracker", tracks)
    builder.add_edge(START, "tracker")
    graph = lsc.with_scoped_connections(builder.compile())
    caplog.set_level(logging.WARNING, logger=LOGGER)

    graph.invoke({"n": 0}, {"run_id": "5d1f6c1e-8a51-4f0c-b0a4-1f4c2e0a9b77"})
    assert lsc.get_connection_manager().drain()  # the run's end hands release to a thread

    records = [r for r in caplog.records if "closing tracked resource" in r.getMessage()]
    assert len(records) == 1
    message = records[0].getMessage()
    assert "5d1f6c1e-8a51-4f0c-b0a4-1f4c2e0a9b77" in message
    assert "BrokenResource" in message and "node 'tracker'" in message
    assert "hunter2" not in message
    assert ("tracked at:" in message) is debug
    assert lsc.get_connection_stats()["release_errors"] == 1


# -- attribution ------------------------------------------------------------------------


@pytest.mark.parametrize("driver", ["psycopg2", "psycopg"])
def test_tag_connections_names_the_execution_while_checked_out(
    configure_default: Any, pg_db: Database, driver: str
) -> None:
    configure_default(pg_db.url_with(driver), tag_connections=True, max_connections=2)
    with lsc.ExecutionScope("tagged-run-1"):
        engine = lsc.create_execution_scoped_engine_sync()
        with engine.connect() as conn:
            conn.execute(text("select 1"))
            conn.rollback()  # a rollback must not undo the tag
            assert app_backends(pg_db, "langgraph_scoped_conn%") == [
                "langgraph_scoped_conn:tagged-run-1"
            ]
        # back in the pool: the idle connection no longer names the execution
        assert app_backends(pg_db, "langgraph_scoped_conn%") == ["langgraph_scoped_conn"]


def test_shared_connections_carry_the_package_name_untagged_by_default(
    configure_default: Any, pg_db: Database
) -> None:
    configure_default(max_connections=2)
    with lsc.ExecutionScope("plain"), lsc.create_execution_scoped_engine_sync().connect() as c:
        c.execute(text("select 1"))
        assert app_backends(pg_db, "langgraph_scoped_conn%") == ["langgraph_scoped_conn"]


def test_per_execution_strategy_names_the_execution(
    configure_default: Any, pg_db: Database
) -> None:
    configure_default(strategy="per_execution")
    with lsc.ExecutionScope("pe-7"), lsc.create_execution_scoped_engine_sync().connect() as c:
        c.execute(text("select 1"))
        assert app_backends(pg_db, "langgraph_scoped_conn%") == ["langgraph_scoped_conn:pe-7"]
    lsc.get_connection_manager().drain()
    eventually(
        lambda: app_backends(pg_db, "langgraph_scoped_conn%") == [], "the engine was disposed"
    )


# -- Prometheus ------------------------------------------------------------------------


def scrape(manager: ExecutionConnectionManager) -> dict[str, float]:
    body, content_type = render_latest(manager)
    assert content_type.startswith("text/plain")
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def test_metrics_read_stats_at_scrape_time(configure_default: Any, pg_db: Database) -> None:
    mgr = configure_default(max_connections=1, pool_timeout=0.2)
    assert scrape(mgr)["langgraph_scoped_conn_max_connections"] == 1
    with lsc.ExecutionScope("holder"):
        held = lsc.create_execution_scoped_engine_sync().connect()
        held.execute(text("select 1"))
        with lsc.ExecutionScope("starved"), pytest.raises(lsc.ConnectionBudgetExceededError):
            lsc.create_execution_scoped_engine_sync().connect()
        m = scrape(mgr)
        assert m["langgraph_scoped_conn_active_executions"] == 1
        assert m["langgraph_scoped_conn_connections_in_use"] == 1
        assert m["langgraph_scoped_conn_connections_in_use"] == len(
            app_backends(pg_db, "langgraph_scoped_conn%")
        )
        held.close()
    m = scrape(mgr)
    stats = mgr.get_stats()
    assert m["langgraph_scoped_conn_active_executions"] == 0
    assert m["langgraph_scoped_conn_connections_in_use"] == 0
    assert m["langgraph_scoped_conn_connections_idle"] == 1
    assert m["langgraph_scoped_conn_checkouts_total"] == stats["checkouts"] == 1
    assert m["langgraph_scoped_conn_checkout_waits_total"] >= 1
    assert m["langgraph_scoped_conn_checkout_timeouts_total"] == 1
    assert m["langgraph_scoped_conn_scopes_opened_total"] == 2
    assert m["langgraph_scoped_conn_leaks_reclaimed_total"] == 0
    assert m["langgraph_scoped_conn_scopes_reaped_total"] == 0


def test_registering_the_collector_does_not_read_stats(
    configure_default: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    mgr = configure_default()
    calls = []
    original = mgr.get_stats
    monkeypatch.setattr(mgr, "get_stats", lambda: calls.append(1) or original())
    registry = CollectorRegistry()  # auto_describe=True: uses describe(), not collect()
    registry.register(ScopedConnCollector(mgr))
    assert calls == []
    assert registry.get_sample_value("langgraph_scoped_conn_active_executions") == 0
    assert calls == [1]


def test_importing_the_package_imports_neither_starlette_nor_prometheus() -> None:
    code = (
        "import sys, langgraph_scoped_conn, langgraph_scoped_conn.http\n"
        "loaded = sorted(m for m in ('prometheus_client',) if m in sys.modules)\n"
        "assert not loaded, loaded\n"
        "import importlib; sys.modules.pop('langgraph_scoped_conn.http')\n"
        "for m in [m for m in sys.modules if m.startswith('starlette')]: del sys.modules[m]\n"
    )
    bare = (
        "import sys, langgraph_scoped_conn\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('starlette', 'prometheus_client', 'langgraph', 'langchain_core'))\n"
        "assert not bad, bad\n"
    )
    for snippet in (bare, code):
        result = subprocess.run(
            [sys.executable, "-c", snippet], capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stderr


# -- psycopg_pool-style pool stats, per-pool metrics ----------------------------------------


def test_three_threads_on_a_budget_of_one_wait_at_most_twice(configure_default: Any) -> None:
    mgr = configure_default(max_connections=1, pool_timeout=30)
    holding = threading.Event()
    release = threading.Event()
    errors: list[BaseException] = []

    def holder() -> None:
        try:
            with (
                lsc.ExecutionScope("holder"),
                lsc.create_execution_scoped_engine_sync().connect() as conn,
            ):
                conn.execute(text("select 1"))
                holding.set()
                release.wait(30)
        except BaseException as exc:
            errors.append(exc)
            holding.set()

    def waiter(i: int) -> None:
        try:
            with (
                lsc.ExecutionScope(f"waiter-{i}"),
                lsc.create_execution_scoped_engine_sync().connect() as conn,
            ):
                conn.execute(text("select 1"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=holder)]
    threads[0].start()
    assert holding.wait(30)
    threads += [threading.Thread(target=waiter, args=(i,)) for i in (1, 2)]
    for t in threads[1:]:
        t.start()
    eventually(lambda: mgr.get_stats()["requests_waiting"] == 2, "both waiters are in line")
    stats = mgr.get_stats()
    assert stats["pools"][0]["requests_waiting"] == 2
    release.set()
    for t in threads:
        t.join(30)
    assert errors == []
    stats = mgr.get_stats()
    assert stats["checkouts"] == 3
    assert stats["checkout_waits"] <= 2  # one per request that waited, never more
    assert stats["checkout_waits"] == 2  # both queued behind the holder
    assert stats["requests_waiting"] == 0
    assert stats["requests_wait_ms"] > 0
    assert 0 < stats["requests_wait_max_ms"] <= stats["requests_wait_ms"]
    (pool,) = stats["pools"]
    assert pool["requests_wait_ms"] == stats["requests_wait_ms"]
    assert pool["requests_wait_max_ms"] == stats["requests_wait_max_ms"]
    assert pool["waits"] == 2


def test_a_failed_server_connect_is_counted(configure_default: Any, pg_db: Database) -> None:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import OperationalError

    missing = make_url(pg_db.url).set(database=f"{pg_db.name}_missing")
    mgr = configure_default(missing.render_as_string(hide_password=False))
    with lsc.ExecutionScope("no-such-db"), pytest.raises(OperationalError):
        lsc.create_execution_scoped_engine_sync().connect()
    stats = mgr.get_stats()
    assert stats["connections_errors"] == 1
    assert stats["pools"][0]["connections_errors"] == 1
    assert stats["connections_opened"] == 0
    assert stats["checkout_timeouts"] == 0
    m = scrape(mgr)
    assert m["langgraph_scoped_conn_connections_errors_total"] == 1


def labelled(manager: ExecutionConnectionManager) -> dict[tuple[str, tuple[Any, ...]], float]:
    body, _ = render_latest(manager)
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def test_metrics_are_labelled_per_pool_and_count_scope_failures(
    configure_default: Any, pg_db: Database
) -> None:
    mgr = configure_default(max_connections=1, pool_timeout=0.2)
    other_url = pg_db.url_with("psycopg")
    with lsc.ExecutionScope("two-pools"):
        held = lsc.create_execution_scoped_engine_sync().connect()
        held.execute(text("select 1"))
        with lsc.ExecutionScope("starved"), pytest.raises(lsc.ConnectionBudgetExceededError):
            lsc.create_execution_scoped_engine_sync().connect()
        with lsc.create_execution_scoped_engine_sync(other_url).connect() as conn:
            conn.execute(text("select 1"))
        held.close()

    def broken_id(run: Any) -> str:
        raise RuntimeError("no id")

    builder = StateGraph(State)
    builder.add_node("noop", lambda state: {"n": state["n"] + 1})
    builder.add_edge(START, "noop")
    builder.add_edge("noop", END)
    lsc.with_scoped_connections(builder.compile(), execution_id=broken_id).invoke({"n": 0})
    mgr.drain()

    stats = mgr.get_stats()
    urls = sorted(p["url"] for p in stats["pools"])
    assert len(urls) == 2 and all("***" not in u or ":***@" in u for u in urls)
    m = labelled(mgr)
    for url in urls:
        labels = (("pool", url), ("strategy", "shared"), ("used_by", "tools"))
        assert m["langgraph_scoped_conn_pool_checkouts_total", labels] == 1
        assert m["langgraph_scoped_conn_pool_connections_in_use", labels] == 0
        assert m["langgraph_scoped_conn_pool_max_connections", labels] == 1
        assert m["langgraph_scoped_conn_pool_requests_waiting", labels] == 0
    first = next(p for p in stats["pools"] if p["driver"] == "psycopg2")
    labels = (("pool", first["url"]), ("strategy", "shared"), ("used_by", "tools"))
    assert m["langgraph_scoped_conn_pool_checkout_timeouts_total", labels] == 1
    assert m["langgraph_scoped_conn_pool_checkout_wait_seconds_count", labels] == 1
    assert m["langgraph_scoped_conn_pool_checkout_wait_seconds_sum", labels] > 0
    assert m["langgraph_scoped_conn_scope_open_failures_total", ()] == 1
    assert stats["scope_open_failures"] == 1


class CheckpointerPool:
    """Stands in for the checkpointer's pool: its stats row, as the manager shows it."""

    def __init__(self, url: str) -> None:
        self.url = url

    def snapshot(self, used_by: str) -> dict[str, Any]:
        return {
            "url": self.url,
            "used_by": used_by,
            "strategy": "shared",
            "max_connections": 1,
            "connections_in_use": 0,
            "connections_idle": 1,
            "requests_waiting": 0,
            "returns_bad": 3,
            "connections_lost": 1,
        }


def test_pool_metrics_say_what_uses_the_pool_and_time_uses_and_connects(
    configure_default: Any, pg_db: Database
) -> None:
    mgr = configure_default(max_connections=3)
    with lsc.ExecutionScope("two-at-once"):
        engine = lsc.create_execution_scoped_engine_sync()
        with engine.connect() as a, engine.connect() as b:
            a.execute(text("select 1"))
            b.execute(text("select 1"))
    (row,) = mgr.get_stats()["pools"]
    checkpointer = CheckpointerPool(row["url"])
    mgr.add_langgraph_pool("checkpointer", checkpointer)
    try:
        m = labelled(mgr)
        stats = mgr.get_stats()
    finally:
        mgr.remove_langgraph_pool(checkpointer)

    tools = (("pool", row["url"]), ("strategy", "shared"), ("used_by", "tools"))
    opened = len(app_backends(pg_db, "langgraph_scoped_conn%"))
    assert opened == 2  # the server saw both connections, still pooled
    assert m["langgraph_scoped_conn_pool_connection_create_seconds_count", tools] == opened
    assert m["langgraph_scoped_conn_pool_connection_create_seconds_sum", tools] > 0
    assert m["langgraph_scoped_conn_pool_connection_use_seconds_count", tools] == 2
    assert m["langgraph_scoped_conn_pool_connection_use_seconds_sum", tools] == pytest.approx(
        stats["pools"][0]["usage_ms"] / 1000
    )
    assert m["langgraph_scoped_conn_pool_connections_idle", tools] == opened
    # psycopg_pool's counters: only for the pool whose row has them
    assert ("langgraph_scoped_conn_pool_returns_bad_total", tools) not in m
    cp = (("pool", row["url"]), ("strategy", "shared"), ("used_by", "checkpointer"))
    assert m["langgraph_scoped_conn_pool_returns_bad_total", cp] == 3
    assert m["langgraph_scoped_conn_pool_connections_lost_total", cp] == 1
    assert m["langgraph_scoped_conn_pool_connections_idle", cp] == 1
    assert ("langgraph_scoped_conn_pool_connection_use_seconds_count", cp) not in m
    assert m["langgraph_scoped_conn_returns_bad_total", ()] == stats["returns_bad"] == 3
    assert m["langgraph_scoped_conn_connections_idle", ()] == opened + 1
