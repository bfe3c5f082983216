"""LangGraph's checkpointer and store on the tools' budget, against a real PostgreSQL.

Every budget claim is checked from the server: ``pg_stat_activity`` sampled every 10 ms
(through PgBouncer: its client count, sampled the same way).  The checkpointer's and
store's connections are named ``langgraph_scoped_conn:checkpointer`` / ``:store``, so the
samplers count them with the tools' ``langgraph_scoped_conn``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypedDict

import psycopg
import pytest
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
from langgraph.graph import END, START, StateGraph
from langgraph.types import Command, interrupt
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text
from sqlalchemy.engine import make_url

import langgraph_scoped_conn as lsc
from langgraph_scoped_conn import ExecutionConnectionManager
from langgraph_scoped_conn.errors import ConfigurationError, ConnectionBudgetExceededError
from langgraph_scoped_conn.metrics import render_latest
from langgraph_scoped_conn.otel import USED_BY, instrument
from langgraph_scoped_conn.testing import free_port
from tests.conftest import Database, eventually
from tests.devserver import langgraph_dev
from tests.pgbouncer_worker import build_graph as build_tool_graph
from tests.pgbouncer_worker import expected_answer
from tests.test_otel import Otel, collect, histogram, otel, value  # noqa: F401 (a fixture)
from tests.test_pgbouncer import ROLE, BouncedDb, bdb, bouncer  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parent.parent
BUDGET = 4
SAVER_APP = "langgraph_scoped_conn:checkpointer"


class State(TypedDict, total=False):
    customer: int
    orders: int
    approved: bool
    answer: str


def count_orders(customer: int, config: RunnableConfig) -> int:
    with lsc.get_scoped_engine(config).connect() as conn:
        sql = text("select count(*) from orders where customer_id = :c")
        return int(conn.execute(sql, {"c": customer}).scalar_one())


def approval_graph(checkpointer: Any) -> Any:
    """query (a tool connection) -> approve (interrupt) -> answer (a tool connection)."""

    def query(state: State, config: RunnableConfig) -> State:
        return {"orders": count_orders(state["customer"], config)}

    def approve(state: State) -> State:
        return {"approved": bool(interrupt({"orders": state["orders"]}))}

    def answer(state: State, config: RunnableConfig) -> State:
        again = count_orders(state["customer"], config)
        return {"answer": f"{state['customer']}:{state['orders']}:{again}:{state['approved']}"}

    builder = StateGraph(State)
    builder.add_node("query", query)
    builder.add_node("approve", approve)
    builder.add_node("answer", answer)
    builder.add_edge(START, "query")
    builder.add_edge("query", "approve")
    builder.add_edge("approve", "answer")
    builder.add_edge("answer", END)
    return lsc.with_scoped_connections(builder.compile(checkpointer=checkpointer))


def orders_of(customer: int) -> int:
    """Orders of ``customer`` in the sample schema (500 orders over 50 customers)."""
    return sum(1 for g in range(1, 501) if 1 + g % 50 == customer)


def row(manager: ExecutionConnectionManager, used_by: str) -> dict[str, Any]:
    [found] = [r for r in manager.get_stats()["pools"] if r["used_by"] == used_by]
    return found


def thread(i: int) -> dict[str, Any]:
    return {"configurable": {"thread_id": f"t{i}"}}


@contextlib.asynccontextmanager
async def checkpointer(kind: str, **options: Any) -> AsyncIterator[Any]:
    """The sync or the async factory's saver, entered the way its users enter it."""
    if kind == "async":
        async with lsc.apostgres_checkpointer(**options) as saver:
            yield saver
    else:
        with lsc.postgres_checkpointer(**options) as saver:
            yield saver


async def invoke(kind: str, graph: Any, inputs: Any, config: dict[str, Any]) -> dict[str, Any]:
    if kind == "async":
        return await graph.ainvoke(inputs, config)  # type: ignore[no-any-return]
    return await asyncio.to_thread(graph.invoke, inputs, config)  # type: ignore[no-any-return]


@pytest.fixture
async def many_threads() -> AsyncIterator[None]:
    """30 runs at once: enough threads that they all reach the pool (sync nodes, to_thread)."""
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(64) as executor:
        loop.set_default_executor(executor)
        yield


# -- one budget -------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_30_runs_with_interrupts_never_exceed_the_budget(
    kind: str,
    pg_db: Database,
    configure_default: Callable[..., ExecutionConnectionManager],
    many_threads: None,
) -> None:
    manager = configure_default(max_connections=BUDGET, pool_timeout=60)
    customers = [1 + i % 50 for i in range(30)]
    with pg_db.sampler(interval=0.01) as sampler:
        async with checkpointer(kind) as saver:
            graph = approval_graph(saver)
            paused = await asyncio.gather(
                *(invoke(kind, graph, {"customer": c}, thread(i)) for i, c in enumerate(customers))
            )
            resumed = await asyncio.gather(
                *(invoke(kind, graph, Command(resume=True), thread(i)) for i in range(30))
            )
            saver_row = row(manager, "checkpointer")
    assert [p["__interrupt__"][0].value for p in paused] == [
        {"orders": orders_of(c)} for c in customers
    ]
    assert [r["answer"] for r in resumed] == [
        f"{c}:{orders_of(c)}:{orders_of(c)}:True" for c in customers
    ]
    assert sampler.peak <= BUDGET, sampler.samples
    assert sampler.peak >= 2  # the checkpointer's and the tools' connections were both there
    assert saver_row["checkouts"] >= 30 * 4  # a write per step of every run
    assert saver_row["max_connections"] == 1  # its share of the budget
    # server side: the threads' checkpoints are in PostgreSQL
    assert pg_db.query("select count(distinct thread_id) from checkpoints") == [(30,)]
    assert row(manager, "tools")["connections_reserved"] == 0  # given back on exit


async def test_the_checkpointer_s_slots_come_out_of_the_tools_budget(
    pg_db: Database, configure_default: Callable[..., ExecutionConnectionManager]
) -> None:
    manager = configure_default(max_connections=BUDGET, pool_timeout=0.5)
    async with lsc.apostgres_checkpointer(reserve=1), lsc.ExecutionScope():
        engine = lsc.get_scoped_engine()
        held = [engine.connect() for _ in range(BUDGET - 1)]
        try:
            assert pg_db.backends("langgraph_scoped_conn%") == BUDGET
            with pytest.raises(ConnectionBudgetExceededError, match="1 set aside"):
                engine.connect()  # the 4th would be one backend over the budget
        finally:
            for conn in held:
                conn.close()
    with lsc.ExecutionScope():  # on exit the slot is the tools' again
        engine = lsc.get_scoped_engine()
        held = [engine.connect() for _ in range(BUDGET)]
        for conn in held:
            conn.close()
    eventually(lambda: pg_db.backends(SAVER_APP) == 0, "the checkpointer's backend left")
    assert row(manager, "tools")["connections_reserved"] == 0


async def test_entering_waits_for_tool_connections_and_gives_up_after_pool_timeout(
    configure_default: Callable[..., ExecutionConnectionManager],
) -> None:
    manager = configure_default(max_connections=2, pool_timeout=0.3)
    with lsc.ExecutionScope():
        engine = lsc.get_scoped_engine()
        held = [engine.connect() for _ in range(2)]
        with pytest.raises(ConnectionBudgetExceededError, match="could not set 1 connection"):
            async with lsc.apostgres_checkpointer():
                pass
        assert row(manager, "tools")["connections_reserved"] == 0  # nothing kept aside
        held[0].close()  # one comes back: now the checkpointer gets its slot
        async with lsc.apostgres_checkpointer() as saver:
            assert await saver.aget_tuple(thread(0)) is None
        held[1].close()


async def test_a_checkpointer_that_waits_out_pool_timeout_names_its_reserve(
    configure_default: Callable[..., ExecutionConnectionManager],
) -> None:
    manager = configure_default(max_connections=2, pool_timeout=0.3)
    heard: list[tuple[str, str]] = []
    manager.observe_pools(lambda name, used_by, event, s: heard.append((used_by, event)))
    async with lsc.apostgres_checkpointer() as saver:
        taken = await saver.conn.getconn()  # its one connection, held elsewhere
        try:
            with pytest.raises(ConnectionBudgetExceededError, match="got none of its 1 conn"):
                await saver.aget_tuple(thread(1))
        finally:
            await saver.conn.putconn(taken)
        assert await saver.aget_tuple(thread(1)) is None  # and it goes on afterwards
        saver_row = row(manager, "checkpointer")
    assert saver_row["timeouts"] == 1
    assert saver_row["checkouts"] == saver_row["checkins"]
    assert heard.count(("checkpointer", "wait")) == 1  # the one that found it in use


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"strategy": "per_execution"}, "per_execution.* has no shared pool"),
        ({"max_connections": 2, "reserve": 2}, "the runs' tools need at least one"),
        ({"reserve": 0}, "reserve=0 must be a whole number of at least 1"),
    ],
)
def test_refused_configurations(
    options: dict[str, Any],
    error: str,
    configure_default: Callable[..., ExecutionConnectionManager],
) -> None:
    reserve = options.pop("reserve", 1)
    configure_default(**options)
    with pytest.raises(ConfigurationError, match=error), lsc.postgres_checkpointer(reserve=reserve):
        pass
    stats = lsc.get_connection_stats()
    assert all(r["connections_reserved"] == 0 for r in stats["pools"])


# -- checkpoint writes are not starved ------------------------------------------------


async def test_checkpoint_writes_go_on_while_runs_hold_and_wait_for_every_tool_slot(
    configure_default: Callable[..., ExecutionConnectionManager], many_threads: None
) -> None:
    """A storm: 12 runs, 2 tool slots held until released, 10 runs waiting in line for them.

    Meanwhile whole checkpointed runs (which need no tool) complete, and the holders'
    and waiters' own checkpoint writes were already made: checkpoint work never waits
    for a tool connection.
    """
    manager = configure_default(max_connections=3, pool_timeout=120)
    release = threading.Event()

    def hold(state: State, config: RunnableConfig) -> State:
        with lsc.get_scoped_engine(config).connect():
            release.wait(120)
        return {"orders": 0}

    def note(state: State) -> State:
        return {"answer": f"noted {state['customer']}"}

    holding = StateGraph(State)
    holding.add_node("hold", hold)
    holding.add_edge(START, "hold")
    plain = StateGraph(State)
    plain.add_node("note", note)
    plain.add_edge(START, "note")
    async with lsc.apostgres_checkpointer() as saver:
        storm_graph = lsc.with_scoped_connections(holding.compile(checkpointer=saver))
        plain_graph = lsc.with_scoped_connections(plain.compile(checkpointer=saver))
        storm = [
            asyncio.ensure_future(storm_graph.ainvoke({"customer": i}, thread(i)))
            for i in range(12)
        ]
        try:

            def saturated() -> bool:
                tools = row(manager, "tools")
                return tools["connections_in_use"] == 2 and tools["requests_waiting"] == 10

            await asyncio.to_thread(eventually, saturated, "2 slots held, 10 runs in line")
            for i in range(100, 110):  # each: 3 checkpoint writes, 1 read
                done = await asyncio.wait_for(plain_graph.ainvoke({"customer": i}, thread(i)), 60)
                assert done["answer"] == f"noted {i}"
            assert row(manager, "tools")["requests_waiting"] == 10  # still starved of tools
            assert row(manager, "checkpointer")["timeouts"] == 0
        finally:
            release.set()
        results = await asyncio.gather(*storm)
    assert all(r["orders"] == 0 for r in results)


# -- behind a transaction pooler ----------------------------------------------------------


@pytest.mark.pgbouncer
@pytest.mark.slow
async def test_200_runs_through_pgbouncer_without_a_prepared_statement_error(
    bdb: BouncedDb,  # noqa: F811
    configure_default: Callable[..., ExecutionConnectionManager],
) -> None:
    """psycopg 3 for the tools and the checkpointer, PgBouncer in transaction mode."""
    bdb.db.query(f"grant create on schema public to {ROLE}")
    manager = configure_default(bdb.url("psycopg"), max_connections=BUDGET, pool_timeout=60)
    errors: list[str] = []
    clients: list[int] = []
    stop = threading.Event()

    def sample_clients() -> None:
        while not stop.is_set():
            pool = bdb.pool()
            clients.append(int(pool["cl_active"]) + int(pool["cl_waiting"]))
            stop.wait(0.01)

    sampler = threading.Thread(target=sample_clients, daemon=True)
    try:
        async with lsc.apostgres_checkpointer() as saver:
            async with saver.conn.connection() as conn:
                assert conn.prepare_threshold is None  # the pooler's connections prepare nothing
            graph = build_tool_graph(saver)
            line = asyncio.Semaphore(16)

            async def one(i: int) -> None:
                customer = 1 + i % 50
                async with line:
                    try:
                        state = await graph.ainvoke(
                            {"messages": [("user", str(customer))]}, thread(i)
                        )
                    except Exception as exc:
                        errors.append(f"{type(exc).__name__}: {exc}")
                        return
                if state["messages"][-1].content != expected_answer(customer):
                    errors.append(f"wrong answer: {state['messages'][-1].content}")

            sampler.start()
            await asyncio.gather(*(one(i) for i in range(200)))
            stop.set()
            sampler.join()
            saver_row = row(manager, "checkpointer")
        assert errors == []
        assert saver_row["strategy"] == "pooler"
        assert saver_row["checkouts"] >= 200 * 4
        assert max(clients) <= BUDGET, clients  # the budget, counted by PgBouncer
        assert bdb.db.query("select count(distinct thread_id) from checkpoints") == [(200,)]
    finally:
        stop.set()


# -- a server-side idle kill ---------------------------------------------------------------


def saver_pids(pg_db: Database) -> list[int]:
    rows = pg_db.query(
        "select pid from pg_stat_activity where datname = current_database() "
        "and application_name = %s",
        SAVER_APP,
    )
    return [int(r[0]) for r in rows]  # type: ignore[call-overload]


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_an_idle_connection_killed_by_the_server_is_replaced_without_an_error(
    kind: str, pg_db: Database, configure_default: Callable[..., ExecutionConnectionManager]
) -> None:
    manager = configure_default(max_connections=BUDGET)
    async with checkpointer(kind) as saver:
        graph = approval_graph(saver)
        await invoke(kind, graph, {"customer": 7}, thread(1))
        [pid] = saver_pids(pg_db)
        pg_db.query("select pg_terminate_backend(%s)", pid)  # an idle reaper's kill
        eventually(lambda: pid not in saver_pids(pg_db), "the killed backend is gone")

        done = await invoke(kind, graph, Command(resume=True), thread(1))

        assert done["answer"] == f"7:{orders_of(7)}:{orders_of(7)}:True"
        [new_pid] = saver_pids(pg_db)  # a new connection took its place
        assert new_pid != pid
        assert row(manager, "checkpointer")["connections_lost"] == 1


async def test_langgraph_s_own_saver_fails_on_the_same_kill(pg_db: Database) -> None:
    """The control: what the run above would have seen with ``from_conn_string``."""
    url = make_url(pg_db.url).set(drivername="postgresql")
    url = url.update_query_dict({"application_name": "lsc-control"})
    async with AsyncPostgresSaver.from_conn_string(url.render_as_string(False)) as saver:
        await saver.setup()
        assert await saver.aget_tuple(thread(1)) is None
        [(pid,)] = pg_db.query(
            "select pid from pg_stat_activity where application_name = 'lsc-control'"
        )
        pg_db.query("select pg_terminate_backend(%s)", pid)
        eventually(
            lambda: not pg_db.query("select 1 from pg_stat_activity where pid = %s", pid),
            "the killed backend is gone",
        )
        with pytest.raises(psycopg.OperationalError):
            await saver.aget_tuple(thread(1))


# -- what the stats and the observers see ---------------------------------------------------


async def test_stats_metrics_and_observers_label_checkpointer_and_store(
    pg_db: Database,
    configure_default: Callable[..., ExecutionConnectionManager],
    otel: Otel,  # noqa: F811
) -> None:
    manager = configure_default(max_connections=5)
    instrument(manager, meter_provider=otel.provider)
    heard: list[tuple[str, str, str]] = []
    manager.observe_pools(lambda name, used_by, event, s: heard.append((name, used_by, event)))
    with lsc.ExecutionScope(), lsc.get_scoped_engine().connect() as conn:  # the tools' row
        conn.execute(text("select 1"))
    async with lsc.apostgres_checkpointer() as saver, lsc.apostgres_store(reserve=2) as store:
        await saver.aget_tuple(thread(1))
        await store.aput(("users", "ada"), "prefs", {"theme": "dark"})
        assert (await store.aget(("users", "ada"), "prefs")).value == {"theme": "dark"}
        stats = manager.get_stats()
        body, _ = render_latest(manager)
        measured = collect(otel.reader)
        server = {
            "checkpointer": pg_db.backends(SAVER_APP),
            "store": pg_db.backends("langgraph_scoped_conn:store"),
        }
    rows = {r["used_by"]: r for r in stats["pools"]}
    assert set(rows) == {"tools", "checkpointer", "store"}
    assert set(rows["tools"]) - {"execution_id"} <= set(rows["checkpointer"])
    # each pool's max is its share: together, the budget
    assert rows["tools"]["connections_reserved"] == 3
    assert rows["checkpointer"]["max_connections"] == 1
    assert rows["store"]["max_connections"] == 2
    assert rows["checkpointer"]["connections_reserved"] == 0  # nothing set aside from them
    assert rows["store"]["connections_reserved"] == 0
    assert {r["pool_name"] for r in rows.values()} == {manager.pool_for().pool_name}
    for used_by in ("checkpointer", "store"):
        r = rows[used_by]
        assert r["checkouts"] >= 2 and r["checkouts"] == r["checkins"]
        assert r["connections_idle"] == r["connections_opened"] == server[used_by] >= 1
        assert "***" in r["url"] and make_url(pg_db.url).password not in r["url"]
    assert stats["connections_idle"] == sum(r["connections_idle"] for r in rows.values())
    for used_by in ("tools", "checkpointer", "store"):  # Prometheus, labelled by used_by
        assert re.search(rf'pool_checkouts_total{{[^}}]*used_by="{used_by}"}} [1-9]', body.decode())
    gauges = {
        (f.name, s.labels["used_by"]): s.value
        for f in text_string_to_metric_families(body.decode())
        for s in f.samples
        if f.name.startswith("langgraph_scoped_conn_pool_") and "used_by" in s.labels
    }
    shares = [
        gauges["langgraph_scoped_conn_pool_max_connections", u]
        - gauges["langgraph_scoped_conn_pool_connections_reserved", u]
        for u in rows
    ]
    assert sorted(shares) == [1, 2, 2] and sum(shares) == 5  # Prometheus' shares: the budget
    # OpenTelemetry: each pool's max is its share, and the shares add up to the budget
    maxima = {
        used_by: value(measured, "db.client.connection.max", **{USED_BY: used_by})
        for used_by in rows
    }
    assert maxima == {"tools": 2, "checkpointer": 1, "store": 2}
    created = histogram(measured, "db.client.connection.create_time", **{USED_BY: "store"})
    assert created.count == rows["store"]["connections_opened"]
    for used_by in ("checkpointer", "store"):  # no checkout found them all in use
        events = {e for _, u, e in heard if u == used_by}
        assert events == {"create", "use"}, (used_by, heard)
    assert {name for name, _, _ in heard} == {manager.pool_for().pool_name}
    assert not [r for r in manager.get_stats()["pools"] if r["used_by"] != "tools"]


def test_a_sync_store_serves_threads_at_once_within_its_reserve(
    pg_db: Database, configure_default: Callable[..., ExecutionConnectionManager]
) -> None:
    manager = configure_default(max_connections=BUDGET, pool_timeout=60)
    with (
        pg_db.sampler("langgraph_scoped_conn:store", interval=0.01) as sampler,
        lsc.postgres_store(reserve=2) as store,
        ThreadPoolExecutor(8) as executor,
    ):
        list(executor.map(lambda i: store.put(("users", str(i)), "n", {"n": i}), range(200)))
        found = list(executor.map(lambda i: store.get(("users", str(i)), "n"), range(200)))
        store_row = row(manager, "store")
    assert [item.value for item in found if item is not None] == [{"n": i} for i in range(200)]
    assert 1 <= sampler.peak <= 2, sampler.samples
    assert store_row["peak_connections"] <= 2
    assert store_row["checkouts"] == store_row["checkins"] >= 400


async def test_pooler_strategy_turns_prepared_statements_off_and_shared_keeps_them(
    configure_default: Callable[..., ExecutionConnectionManager], pg_db: Database
) -> None:
    for strategy, expected in (("shared", 0), ("pooler", None)):
        configure_default(pg_db.url_with("psycopg"), strategy=strategy, max_connections=2)
        async with lsc.apostgres_checkpointer() as saver, saver.conn.connection() as conn:
            assert conn.prepare_threshold == expected
            assert conn.autocommit is True


# -- under a real `langgraph dev` ----------------------------------------------------------


@pytest.fixture
def postgres_dev_server(pg_db: Database, tmp_path: Path) -> Iterator[str]:
    """``langgraph dev`` with examples/sql_agent/langgraph.postgres.json (budget 4)."""
    from tests.test_studio import _langgraph_cli

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LANGSMITH_", "LANGCHAIN_"))}
    env.pop("LSC_CHAT_MODEL", None)
    env.update(
        DATABASE_URL=pg_db.url,
        SCOPED_CONN_MAX_CONNECTIONS=str(BUDGET),
        SCOPED_CONN_DEBUG_TOKEN="checkpoint-test-token",
        LANGGRAPH_CLI_NO_ANALYTICS="1",
        LANGSMITH_TRACING="false",
        PYTHONUNBUFFERED="1",
    )
    # paths in langgraph.json resolve against the working directory: a fresh one that
    # sees the repo's examples, with the example's config pointed at them
    (tmp_path / "examples").symlink_to(REPO / "examples", target_is_directory=True)
    example = REPO / "examples" / "sql_agent"
    config = json.loads((example / "langgraph.postgres.json").read_text())
    config["dependencies"] = [str(REPO)]
    config["graphs"] = {
        k: "./examples/sql_agent/" + v.removeprefix("./") for k, v in config["graphs"].items()
    }
    for key in ("checkpointer", "store"):
        config[key]["path"] = "./examples/sql_agent/" + config[key]["path"].removeprefix("./")
    (tmp_path / "langgraph.json").write_text(json.dumps(config))
    cmd = [
        *_langgraph_cli(),
        "dev",
        "--no-browser",
        "--no-reload",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--config",
        str(tmp_path / "langgraph.json"),
        "--n-jobs-per-worker",
        "8",
    ]
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "langgraph-dev.log"
    with langgraph_dev(cmd, cwd=tmp_path, env=env, log=log, url=url):
        yield url
    text_log = log.read_text(errors="replace")
    assert "BlockingError" not in text_log, text_log[-6000:]
    password = make_url(pg_db.url).password
    assert password and password not in text_log


@pytest.mark.studio
@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_langgraph_dev_keeps_threads_in_postgres_on_the_budget(
    postgres_dev_server: str, pg_db: Database
) -> None:
    from langgraph_sdk import get_client

    status_url = postgres_dev_server + "/api/memory/debug/connections/status"

    def status() -> dict[str, Any]:
        import httpx

        return dict(httpx.get(status_url, timeout=10).json()["data"]["connection_stats"])

    approval = {"messages": [{"role": "user", "content": "How many sales are there?"}]}
    with pg_db.sampler(interval=0.01) as sampler:
        async with get_client(url=postgres_dev_server) as client:
            threads = [await client.threads.create() for _ in range(8)]
            paused = await asyncio.gather(
                *(
                    client.runs.wait(
                        t["thread_id"], "sql_agent", input={**approval, "require_approval": True}
                    )
                    for t in threads
                )
            )
            assert all("__interrupt__" in p for p in paused), paused[0]
            resumed = await asyncio.gather(
                *(
                    client.runs.wait(t["thread_id"], "sql_agent", command={"resume": True})
                    for t in threads
                )
            )
            state = await client.threads.get_state(threads[0]["thread_id"])
    answers = [r["messages"][-1]["content"] for r in resumed]
    assert all(a.startswith("Result: [(3000,)]") for a in answers), answers
    assert state["values"]["messages"][-1]["content"] == answers[0]
    assert sampler.peak <= BUDGET, sampler.samples
    # the server's threads are in PostgreSQL, written by LangGraph's AsyncPostgresSaver
    ids = [t["thread_id"] for t in threads]
    stored = pg_db.query(
        "select count(distinct thread_id) from checkpoints where thread_id = any(%s)", ids
    )
    assert stored == [(8,)]
    stats = await asyncio.to_thread(status)
    rows = {r["used_by"]: r for r in stats["pools"]}
    assert rows["checkpointer"]["checkouts"] >= 8 * 4
    assert rows["tools"]["connections_reserved"] == 2  # the checkpointer's and the store's
    assert pg_db.backends(SAVER_APP) == 1
