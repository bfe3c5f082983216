"""Strategies: ``per_execution`` (the guide's engine per run) and ``shared`` (one budget pool).

Asserted from pg_stat_activity: which backends exist, in which state, and how many
at most while many executions hammer the pool.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg2
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool.base import reset_commit

import langgraph_scoped_conn as lsc
from langgraph_scoped_conn import ExecutionConnectionManager
from langgraph_scoped_conn.errors import ConnectionBudgetExceededError
from langgraph_scoped_conn.testing import PostgresCluster
from tests.conftest import Database, backend_pid, eventually

APP = "langgraph_scoped_conn"


def backends(pg_db: Database) -> list[tuple[int, str, str]]:
    """(pid, application_name, state) of this database's package backends."""
    rows = pg_db.query(
        "select pid, application_name, state from pg_stat_activity "
        "where datname = current_database() and backend_type = 'client backend' "
        f"and application_name like '{APP}%%'"
    )
    return [(int(p), str(a), str(s)) for p, a, s in rows]  # type: ignore[call-overload]


# -- per_execution ----------------------------------------------------------------


def test_per_execution_uses_the_guide_engine_and_leaves_no_backend(
    configure_default: Callable[..., ExecutionConnectionManager], pg_db: Database
) -> None:
    configure_default(strategy="per_execution", pool_timeout=20)
    with lsc.ExecutionScope("run-a"):
        db = lsc.create_execution_scoped_sql_database_sync()
        assert db.run("select count(*) from customers") == "[(50,)]"
        engine = lsc.create_execution_scoped_engine_sync()
        pool = engine.pool
        assert (pool.size(), pool._max_overflow, pool._timeout) == (2, 3, 20)  # type: ignore[attr-defined]
        assert pool._recycle == 1800
        assert pool._pre_ping is True
        assert pool._reset_on_return is reset_commit  # type: ignore[attr-defined]
        leaked = engine.connect()
        leaked_pid = backend_pid(leaked)
        with lsc.ExecutionScope("run-b"):
            other = lsc.create_execution_scoped_engine_sync().connect()
            other_pid = backend_pid(other)
            names = {pid: app for pid, app, _ in backends(pg_db)}
            assert names[leaked_pid] == f"{APP}:run-a"
            assert names[other_pid] == f"{APP}:run-b"
            other.close()  # returned to run-b's own pool, which is disposed at its end
        assert [b for b in backends(pg_db) if b[1] == f"{APP}:run-b"] == []
        assert any(b[1] == f"{APP}:run-a" for b in backends(pg_db))
    lsc.get_connection_manager().drain()
    assert [b for b in backends(pg_db) if b[1].startswith(f"{APP}:")] == []
    stats = lsc.get_connection_stats()
    assert stats["leaks_reclaimed"] == 1
    assert stats["connections_in_use"] == 0


async def test_per_execution_async_runs_leave_no_backend(
    configure_default: Callable[..., ExecutionConnectionManager], pg_db: Database
) -> None:
    manager = configure_default(strategy="per_execution")

    async def run(i: int) -> None:
        async with lsc.ExecutionScope(f"p{i}"):
            db = await lsc.create_execution_scoped_sql_database()
            db.run("select count(*) from orders")
            engine = await lsc.create_execution_scoped_engine()
            if i % 2:
                engine.connect().execute(text("select 1"))  # leaked on purpose
            await asyncio.sleep(0)

    await asyncio.gather(*(run(i) for i in range(8)))
    await manager.adrain()
    assert [b for b in backends(pg_db) if b[1].startswith(f"{APP}:")] == []
    assert manager.get_stats()["leaks_reclaimed"] == 4


# -- shared -----------------------------------------------------------------------


def test_shared_returns_idle_connections_to_the_pool_for_the_next_execution(
    configure_default: Callable[..., ExecutionConnectionManager], pg_db: Database
) -> None:
    configure_default(strategy="shared", max_connections=1)
    pids = []
    for i in range(3):
        with lsc.ExecutionScope(f"s{i}"):
            with lsc.create_execution_scoped_engine_sync().connect() as conn:
                pids.append(backend_pid(conn))
            assert lsc.get_connection_stats()["executions"][f"s{i}"]["connections_in_use"] == 0
    assert len(set(pids)) == 1  # one backend served all three executions
    assert backends(pg_db) == [(pids[0], APP, "idle")]
    stats = lsc.get_connection_stats()
    assert stats["connections_opened"] == 1
    assert stats["connections_reused"] == 2
    assert stats["connections_idle"] == 1


def test_shared_no_checked_out_connection_remains_after_exit(
    configure_default: Callable[..., ExecutionConnectionManager], pg_db: Database
) -> None:
    configure_default(strategy="shared", max_connections=4)
    with lsc.ExecutionScope("holder"):
        engine = lsc.create_execution_scoped_engine_sync()
        held = [engine.connect() for _ in range(3)]
        held_pids = {backend_pid(c) for c in held}
        raw = engine.raw_connection()  # a DBAPI connection, never returned either
        with raw.cursor() as cur:
            cur.execute("select pg_backend_pid()")
            held_pids.add(cur.fetchone()[0])
        assert {s for p, _, s in backends(pg_db) if p in held_pids} == {"idle in transaction"}
    eventually(
        lambda: not {p for p, _, _ in backends(pg_db)} & held_pids, "the held backends are gone"
    )
    stats = lsc.get_connection_stats()
    assert stats["leaks_reclaimed"] == 4
    assert stats["connections_in_use"] == 0
    with lsc.ExecutionScope("next"), lsc.create_execution_scoped_engine_sync().connect() as c:
        assert c.execute(text("select 1")).scalar_one() == 1  # every slot came back


def test_shared_total_stays_within_the_budget_under_load(
    configure_default: Callable[..., ExecutionConnectionManager], pg_db: Database
) -> None:
    budget = 4
    manager = configure_default(strategy="shared", max_connections=budget, pool_timeout=30)
    rng = random.Random(1234)
    plans = [[rng.randrange(4) for _ in range(6)] for _ in range(12)]
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for n, kind in enumerate(plans[t]):
                with lsc.ExecutionScope(f"w{t}-{n}"):
                    if kind == 0:
                        lsc.create_execution_scoped_sql_database_sync().run("select pg_sleep(0.01)")
                    elif kind == 1:  # two in a row (two at once could deadlock: see README)
                        engine = lsc.create_execution_scoped_engine_sync()
                        for _ in range(2):
                            with engine.connect() as conn:
                                conn.execute(text("select pg_sleep(0.01)"))
                    elif kind == 2:  # leaked, reclaimed at exit
                        lsc.create_execution_scoped_engine_sync().connect().execute(
                            text("select 1")
                        )
                    else:
                        with lsc.create_execution_scoped_engine_sync().begin() as conn:
                            conn.execute(text("select count(*) from orders"))
        except BaseException as exc:
            errors.append(exc)

    with pg_db.sampler(f"{APP}%", interval=0) as sampler:
        threads = [threading.Thread(target=worker, args=(t,)) for t in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert not errors, errors
    assert len(sampler.samples) > 10
    assert max(sampler.samples) <= budget, f"server saw {max(sampler.samples)} > {budget}"
    assert max(sampler.samples) >= 2  # the load did reach the server
    stats = manager.get_stats()
    assert stats["peak_connections"] <= budget
    assert stats["checkout_waits"] > 0  # more demand than budget: callers queued
    assert stats["leaks_reclaimed"] == sum(p.count(2) for p in plans)
    assert stats["connections_in_use"] == 0
    assert stats["active_executions"] == 0
    assert {s for _, _, s in backends(pg_db)} <= {"idle"}
    manager.close()
    eventually(lambda: backends(pg_db) == [], "nothing remains after close()")


def test_budget_waiter_gets_a_returned_or_reclaimed_connection(
    configure_default: Callable[..., ExecutionConnectionManager], pg_db: Database
) -> None:
    manager = configure_default(strategy="shared", max_connections=1, pool_timeout=60)
    got: list[int] = []
    queued = threading.Event()

    def waiter() -> None:
        with lsc.ExecutionScope("waiter"):
            engine = lsc.create_execution_scoped_engine_sync()
            queued.set()
            with engine.connect() as conn:
                got.append(backend_pid(conn))

    with lsc.ExecutionScope("hog"):
        leaked = lsc.create_execution_scoped_engine_sync().connect()
        hog_pid = backend_pid(leaked)
        thread = threading.Thread(target=waiter)
        thread.start()
        queued.wait(30)
        for _ in range(3000):  # until the waiter is queued on the budget (no time bound)
            if manager.get_stats()["checkout_waits"]:
                break
            time.sleep(0.01)
        assert manager.get_stats()["checkout_waits"] == 1
        assert got == []
    # the hog's scope ended with the connection still checked out: reclaimed, slot handed on
    thread.join(60)
    assert len(got) == 1
    assert got[0] != hog_pid
    assert manager.get_stats()["checkout_timeouts"] == 0


def test_budget_exhausted_raises_a_clear_error_not_a_server_error() -> None:
    """On a server with 10 slots, 16 threads through a budget of 6 never see 'too many clients'."""
    with PostgresCluster.running(max_connections=10) as cluster:
        url = cluster.url()
        # control: without a budget, the server refuses the 11th connection
        direct: list[Any] = []
        with pytest.raises(psycopg2.OperationalError, match="too many clients"):
            for _ in range(12):
                direct.append(
                    psycopg2.connect(
                        host="127.0.0.1",
                        port=cluster.port,
                        user="postgres",
                        password=make_url(url).password,
                        dbname="postgres",
                    )
                )
        for c in direct:
            c.close()

        manager = ExecutionConnectionManager(url, max_connections=6, pool_timeout=0.5)
        try:
            # 1) one execution holds the whole budget: the next caller gets a clear error
            with lsc.ExecutionScope("hog", manager=manager):
                engine = lsc.create_execution_scoped_engine_sync()
                held = [engine.connect() for _ in range(5)]
                with lsc.ExecutionScope("small", manager=manager):
                    small = lsc.create_execution_scoped_engine_sync().connect()
                    with lsc.ExecutionScope("late", manager=manager):
                        late = lsc.create_execution_scoped_engine_sync()
                        started = time.monotonic()
                        with pytest.raises(ConnectionBudgetExceededError) as caught:
                            late.connect()
                        waited = time.monotonic() - started
                    small.close()
                for c in held:
                    c.close()
            message = str(caught.value)
            assert "max_connections=6" in message
            assert "pool_timeout=0.50s" in message
            assert "hog(5), small(1)" in message
            assert "Raise max_connections" in message
            assert isinstance(caught.value, TimeoutError)
            assert waited >= 0.45  # it did wait for pool_timeout (no upper bound asserted)

            # 2) sixteen threads hammer the budget: successes or budget errors, never the server's
            outcomes: list[str] = []
            lock = threading.Lock()

            def hammer(i: int) -> None:
                for n in range(2):
                    try:
                        with (
                            lsc.ExecutionScope(f"h{i}-{n}", manager=manager),
                            lsc.create_execution_scoped_engine_sync().connect() as conn,
                        ):
                            conn.execute(text("select pg_sleep(1)"))
                        outcome = "ok"
                    except ConnectionBudgetExceededError:
                        outcome = "budget"
                    except DBAPIError as exc:
                        outcome = f"server: {exc.orig}"
                    except BaseException as exc:
                        outcome = f"other: {exc!r}"
                    with lock:
                        outcomes.append(outcome)

            threads = [threading.Thread(target=hammer, args=(i,)) for i in range(16)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert len(outcomes) == 32
            assert set(outcomes) <= {"ok", "budget"}, sorted(set(outcomes))
            assert "ok" in outcomes
            assert "budget" in outcomes  # 16 callers, 6 slots held 1 s each, 0.5 s patience
            stats = manager.get_stats()
            assert stats["peak_connections"] <= 6
            assert stats["checkout_timeouts"] == outcomes.count("budget") + 1
        finally:
            manager.close()
        count = cluster.psql(
            "select count(*) from pg_stat_activity where backend_type = 'client backend' "
            f"and application_name = '{APP}'"
        )
        assert count == "0"


def test_per_execution_takes_the_reset_on_return_from_engine_options(
    configure_default: Callable[..., ExecutionConnectionManager],
) -> None:
    """engine_options may set pool_reset_on_return; it used to collide with the guide's value."""
    configure_default(strategy="per_execution", engine_options={"pool_reset_on_return": None})
    with lsc.ExecutionScope("no-reset"):
        engine = lsc.create_execution_scoped_engine_sync()
        with engine.connect() as conn:
            assert conn.execute(text("select 1")).scalar() == 1
        pool = engine.pool
        assert pool._reset_on_return is not reset_commit  # type: ignore[attr-defined]
