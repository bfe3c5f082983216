"""Isolation that holds: one regression test per reproduction of the issue, on a real PostgreSQL.

Every assertion is made from the server's side (pg_stat_activity, pg_locks,
pg_prepared_statements, pg_cursors, pg_listening_channels(), current_setting,
current_user) or from the package's counters, never from how long something took:
deadlines (``eventually``, thread joins with a timeout) only bound waits for a
condition, so a hang fails the test instead of stalling the suite.

Only the package root and ``langgraph_scoped_conn.errors`` are imported, so the file
runs unchanged against the core before the restructuring (where these tests fail).

The allowance that a sync node still running after its run was cancelled keeps its
connection until it returns it is covered by
``tests/test_langgraph.py::test_sync_node_outliving_its_cancelled_run_keeps_a_working_connection``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import text

import langgraph_scoped_conn as lsc
from langgraph_scoped_conn.errors import ConnectionBudgetExceededError, ScopeClosedError
from tests.conftest import Database, backend_pid, eventually, live_pids

DRIVERS = ("psycopg2", "psycopg")
CLEANUP_PATH = "/api/memory/debug/connections/cleanup"
#: a statement run often enough in one session that psycopg 3 prepares it (threshold 5)
REPEATED = "select CAST(:n AS integer) + 1"


def url_for(pg_db: Database, driver: str) -> str:
    return pg_db.url if driver == "psycopg2" else pg_db.url_with("psycopg")


@pytest.fixture
def role(pg_db: Database) -> Iterator[str]:
    """A role without login, for SET ROLE; dropped afterwards (roles are cluster-wide)."""
    name = f"lsc_iso_{uuid.uuid4().hex[:10]}"
    pg_db.query(f'create role "{name}"')
    try:
        yield name
    finally:
        admin = pg_db.server.admin()
        try:
            with admin.cursor() as cur:
                # objects in the test database go with it; privileges granted there too
                cur.execute(f'drop role if exists "{name}"')
        except Exception:  # still referenced by the test database: dropped with it
            pass
        finally:
            admin.close()


def server_defaults(pg_db: Database) -> tuple[object, ...]:
    """search_path, work_mem and statement_timeout of a fresh session of the same user."""
    return pg_db.query(
        "select current_setting('search_path'), current_setting('work_mem'), "
        "current_setting('statement_timeout')"
    )[0]


def advisory_locks(pg_db: Database, key: int) -> int:
    """Granted session advisory locks on ``key`` (one bigint key: classid 0, objsubid 1)."""
    rows = pg_db.query(
        "select count(*) from pg_locks where locktype = 'advisory' and granted "
        "and classid = 0 and objid = %s and objsubid = 1",
        key,
    )
    return int(str(rows[0][0]))


def run_repeated(conn: Any, times: int = 10) -> list[int]:
    return [int(conn.execute(text(REPEATED), {"n": i}).scalar_one()) for i in range(times)]


# -- 1. session state does not cross executions on the shared pool ----------------------


@pytest.mark.parametrize("driver", DRIVERS)
def test_session_state_does_not_cross_executions(
    driver: str, pg_db: Database, role: str, configure_default: Callable[..., Any]
) -> None:
    configure_default(url_for(pg_db, driver), max_connections=1, pool_timeout=10)
    defaults = server_defaults(pg_db)

    with lsc.ExecutionScope("iso-a"):
        # a write-mode SQLDatabase statement that changes the session...
        lsc.get_scoped_sql_database(read_only=False).run(
            "select set_config('statement_timeout', '1234', false)"
        )
        engine = lsc.create_execution_scoped_engine_sync()
        # ...and a raw engine connection that changes everything else
        with engine.connect() as conn:
            a_pid = backend_pid(conn)
            conn.execute(text("create temp table t (secret text)"))
            conn.execute(text("insert into t values ('private to a')"))
            conn.execute(text(f'grant select on t to "{role}"'))
            conn.execute(text("set search_path = public, pg_catalog"))
            conn.execute(text("set work_mem = '77MB'"))
            conn.execute(text("prepare p as select 1"))
            conn.execute(text("select pg_advisory_lock(42)"))
            conn.execute(text("listen chan"))
            conn.commit()
            conn.execute(text("declare c cursor with hold for select 1"))
            conn.commit()
            conn.execute(text(f'set role "{role}"'))
            conn.commit()
            assert run_repeated(conn) == [i + 1 for i in range(10)]
            # the set-up really left all of it in the session
            assert conn.execute(text("select count(*) from t")).scalar_one() == 1
            assert conn.execute(text("select current_user")).scalar_one() == role
            prepared = conn.execute(text("select name from pg_prepared_statements")).scalars()
            names = set(prepared)
            assert "p" in names
            if driver == "psycopg":  # psycopg 3 prepared the repeated statement itself
                assert len(names) >= 2, names
            assert conn.execute(text("select name from pg_cursors")).scalars().all() == ["c"]
            assert conn.execute(text("select pg_listening_channels()")).scalars().all() == ["chan"]
            assert advisory_locks(pg_db, 42) == 1

    # A has ended: its session advisory lock is no longer held
    assert advisory_locks(pg_db, 42) == 0, "execution A's advisory lock outlived it"

    with lsc.ExecutionScope("iso-b"):
        db = lsc.get_scoped_sql_database(read_only=True)
        with pytest.raises(Exception) as seen:  # the driver's error, asserted below
            db.run("select * from t")
        assert "does not exist" in str(seen.value), seen.value
        engine = lsc.create_execution_scoped_engine_sync()
        with engine.connect() as conn:
            assert backend_pid(conn) == a_pid, "B did not get A's backend: nothing was tested"
            assert conn.execute(text("select to_regclass('pg_temp.t')")).scalar_one() is None
            settings = conn.execute(
                text(
                    "select current_setting('search_path'), current_setting('work_mem'), "
                    "current_setting('statement_timeout')"
                )
            ).one()
            assert tuple(settings) == defaults
            assert conn.execute(text("select name from pg_prepared_statements")).all() == []
            assert conn.execute(text("select name from pg_cursors")).all() == []
            assert conn.execute(text("select pg_listening_channels()")).all() == []
            assert conn.execute(text("select current_user = session_user")).scalar_one() is True
            held = conn.execute(
                text(
                    "select count(*) from pg_locks where locktype = 'advisory' "
                    "and pid = pg_backend_pid()"
                )
            ).scalar_one()
            assert held == 0
            # psycopg 3 forgot the statements it prepared in A's session
            assert run_repeated(conn) == [i + 1 for i in range(10)]


def test_clean_read_only_query_pays_no_session_reset(
    pg_db: Database, configure_default: Callable[..., Any]
) -> None:
    mgr = configure_default(pg_db.url, max_connections=1, pool_timeout=10)
    with lsc.ExecutionScope("warm-up"):  # reflects the schema once
        assert lsc.get_scoped_sql_database(read_only=True).run("select 1") == "[(1,)]"
    before = mgr.get_stats()
    pids = set(live_pids(pg_db))
    assert len(pids) == 1

    for i in range(3):
        with lsc.ExecutionScope(f"read-{i}"):
            assert lsc.get_scoped_sql_database(read_only=True).run("select 1") == "[(1,)]"
    after_reads = mgr.get_stats()
    assert after_reads.get("session_resets", 0) == before.get("session_resets", 0)
    assert set(live_pids(pg_db)) == pids  # the same backend served every run
    assert after_reads["connections_opened"] == before["connections_opened"]

    # a write-mode statement that provably changes nothing in the session pays none either
    with lsc.ExecutionScope("write"):
        assert lsc.get_scoped_sql_database(read_only=False).run("select 1") == "[(1,)]"
    assert mgr.get_stats().get("session_resets", 0) == before.get("session_resets", 0)
    # one that may change it is reset
    with lsc.ExecutionScope("write"):
        db = lsc.get_scoped_sql_database(read_only=False)
        assert db.run("select set_config('work_mem', '8MB', false)") == "[('8MB',)]"
    after_write = mgr.get_stats()
    assert after_write.get("session_resets", 0) == before.get("session_resets", 0) + 1
    assert live_pids(pg_db) == dict.fromkeys(pids, "idle")  # reset, kept, idle


# -- 2. ended objects stay unusable from other threads ----------------------------------


def attempt_use(db: Any, engine: Any) -> dict[str, Any]:
    """Try both objects; what each call returned or raised."""
    outcome: dict[str, Any] = {}
    for what, call in (("db.run", lambda: db.run("select 1")), ("engine.connect", engine.connect)):
        try:
            result = call()
        except BaseException as exc:
            outcome[what] = exc
        else:
            outcome[what] = result
            if hasattr(result, "close"):
                result.close()
    return outcome


def test_ended_objects_refuse_use_from_other_threads(
    pg_db: Database, configure_default: Callable[..., Any]
) -> None:
    mgr = configure_default(pg_db.url, max_connections=2, pool_timeout=5)
    with lsc.ExecutionScope("ended-x"):
        db = lsc.get_scoped_sql_database()
        engine = lsc.create_execution_scoped_engine_sync()
        assert db.run("select 1") == "[(1,)]"
    mgr.drain()
    mgr.pool_for().dispose()  # no idle connection: any use would have to open a backend
    eventually(lambda: pg_db.backends() == 0, "the disposed pool's backends are gone")
    checkouts = mgr.get_stats()["checkouts"]

    outcomes: dict[str, dict[str, Any]] = {}

    def in_thread() -> None:
        outcomes["thread"] = attempt_use(db, engine)

    worker = threading.Thread(target=in_thread, daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive()

    async def main() -> None:
        outcomes["to_thread"] = await asyncio.to_thread(attempt_use, db, engine)

    asyncio.run(main())

    for where, outcome in outcomes.items():
        for what, result in outcome.items():
            assert isinstance(result, ScopeClosedError), (where, what, result)
    assert pg_db.backends() == 0
    assert mgr.get_stats()["checkouts"] == checkouts


class ImportTimeToolkit:
    """Like ``SQLDatabaseToolkit(db=...)`` built once at import and shared by every run."""

    def __init__(self) -> None:
        self.db: Any = None

    def query_tool(self, query: str) -> str:
        return str(self.db.run(query))


TOOLKIT = ImportTimeToolkit()


def test_toolkit_holding_a_previous_runs_database_cannot_bypass_the_budget(
    pg_db: Database, configure_default: Callable[..., Any]
) -> None:
    mgr = configure_default(pg_db.url, max_connections=1, pool_timeout=3)
    with lsc.ExecutionScope("run-1"):
        TOOLKIT.db = lsc.get_scoped_sql_database()
        assert TOOLKIT.query_tool("select 1") == "[(1,)]"
    try:
        with lsc.ExecutionScope("run-2"):
            engine = lsc.create_execution_scoped_engine_sync()
            with engine.connect() as held:  # run-2 holds the whole budget
                pid = backend_pid(held)
                with pytest.raises(ScopeClosedError):
                    TOOLKIT.query_tool("select 1")
                # a sync tool runs in a worker thread under LangGraph
                with concurrent.futures.ThreadPoolExecutor(1) as pool:
                    future = pool.submit(TOOLKIT.query_tool, "select 1")
                    with pytest.raises(ScopeClosedError):
                        future.result(timeout=30)
                assert set(live_pids(pg_db)) == {pid}
                stats = mgr.get_stats()
                assert stats["connections_in_use"] == 1
                assert stats["checkout_timeouts"] == 0
            # with the budget free it refuses too, rather than draw outside run-2
            checkouts = mgr.get_stats()["checkouts"]
            with pytest.raises(ScopeClosedError):
                TOOLKIT.query_tool("select 1")
            assert mgr.get_stats()["checkouts"] == checkouts
    finally:
        TOOLKIT.db = None


# -- 3. releasing a live execution cancels its query on the server ----------------------


def sleeping(pg_db: Database, pid: int) -> bool:
    rows = pg_db.query(
        "select count(*) from pg_stat_activity where pid = %s and state = 'active' "
        "and query like %s",
        pid,
        "%pg_sleep%",
    )
    return int(str(rows[0][0])) == 1


@pytest.mark.parametrize("how", ["reap", "close", "http"])
@pytest.mark.parametrize("driver", DRIVERS)
def test_releasing_a_live_execution_cancels_its_query(
    driver: str, how: str, pg_db: Database, configure_default: Callable[..., Any]
) -> None:
    mgr = configure_default(url_for(pg_db, driver), max_connections=2, pool_timeout=10)
    started = threading.Event()
    outcome: dict[str, Any] = {}

    def sleeper() -> None:
        try:
            with lsc.ExecutionScope("sleeper"):
                engine = lsc.create_execution_scoped_engine_sync()
                with engine.connect() as conn:
                    outcome["pid"] = backend_pid(conn)
                    started.set()
                    conn.execute(text("select pg_sleep(30)"))
                    outcome["returned"] = True
        except BaseException as exc:
            outcome["error"] = exc
        finally:
            started.set()

    def release() -> None:
        try:
            if how == "reap":
                outcome["released"] = mgr.reap(execution_id="sleeper", reason="released by request")
            elif how == "close":
                mgr.close()
                outcome["released"] = ["sleeper"]
            else:
                from starlette.testclient import TestClient

                from langgraph_scoped_conn.http import create_app

                with TestClient(create_app(mgr, token="t")) as client:
                    response = client.post(
                        CLEANUP_PATH,
                        json={"execution_id": "sleeper"},
                        headers={"Authorization": "Bearer t"},
                    )
                assert response.status_code == 200, response.text
                outcome["released"] = response.json()["data"]["released"]
        except BaseException as exc:
            outcome["release_error"] = exc

    with pg_db.sampler() as sampler:
        worker = threading.Thread(target=sleeper, daemon=True)
        worker.start()
        assert started.wait(30)
        assert "pid" in outcome, outcome.get("error")
        pid = outcome["pid"]
        eventually(lambda: sleeping(pg_db, pid), "the execution's pg_sleep is running")

        releaser = threading.Thread(target=release, daemon=True)
        releaser.start()
        releaser.join(timeout=15)
        assert not releaser.is_alive(), "the release waited for the statement to finish"
        assert "release_error" not in outcome, outcome.get("release_error")
        assert outcome["released"] == ["sleeper"]

        worker.join(timeout=15)
        assert not worker.is_alive(), "the execution's statement was not cancelled"
        assert "returned" not in outcome
        assert isinstance(outcome.get("error"), Exception), outcome.get("error")
        eventually(lambda: not sleeping(pg_db, pid), "the backend no longer runs pg_sleep")
    assert sampler.samples
    assert sampler.peak <= 2


# -- 4. a cancel during scope exit loses no connection ---------------------------------


class BlockingResource:
    """A tracked resource whose close() waits until the test lets it finish."""

    def __init__(self) -> None:
        self.may_close = threading.Event()
        self.closed = threading.Event()

    def close(self) -> None:
        self.may_close.wait(30)
        self.closed.set()


def idle_in_transaction(pg_db: Database) -> int:
    return sum(state.startswith("idle in transaction") for state in live_pids(pg_db).values())


def assert_nothing_lost(mgr: Any, pg_db: Database, leaks: int) -> None:
    assert mgr.drain(timeout=30)
    stats = mgr.get_stats()
    assert stats["connections_in_use"] == 0
    assert stats["active_executions"] == 0
    assert stats["leaks_reclaimed"] == leaks
    eventually(
        lambda: idle_in_transaction(pg_db) == 0, "no leaked connection is idle in transaction"
    )


def test_cancel_during_async_scope_exit_with_a_busy_default_executor(
    pg_db: Database, configure_default: Callable[..., Any]
) -> None:
    mgr = configure_default(pg_db.url, max_connections=3, pool_timeout=10)
    runs = 60
    leaked: list[Any] = []
    resources: list[BlockingResource] = []

    async def body(at_exit: asyncio.Event, resource: BlockingResource) -> None:
        async with lsc.ExecutionScope():
            lsc.track_connection(resource)  # its close() keeps the exit waiting
            conn = lsc.create_execution_scoped_engine_sync().connect()
            leaked.append(conn)
            conn.execute(text("select 1"))  # a leak, idle in transaction
            at_exit.set()

    async def main() -> int:
        loop = asyncio.get_running_loop()
        executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        loop.set_default_executor(executor)
        cancelled = 0
        for _ in range(runs):
            gate = threading.Event()
            busy = loop.run_in_executor(None, gate.wait, 30)  # the only worker is busy
            at_exit = asyncio.Event()
            resource = BlockingResource()
            resources.append(resource)
            task = asyncio.ensure_future(body(at_exit, resource))
            await at_exit.wait()  # the task has gone on into __aexit__ and awaits there
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                cancelled += 1
            resource.may_close.set()
            gate.set()
            await busy
        return cancelled

    assert asyncio.run(main()) == runs  # each cancel landed while the exit awaited
    assert_nothing_lost(mgr, pg_db, leaks=len(leaked))
    assert len(leaked) == runs
    assert all(r.closed.is_set() for r in resources)


def test_wait_for_timeouts_on_the_default_executor_lose_no_connection(
    pg_db: Database, configure_default: Callable[..., Any]
) -> None:
    mgr = configure_default(pg_db.url, max_connections=3, pool_timeout=10)
    runs = 250
    leaked: list[Any] = []

    async def body() -> None:
        async with lsc.ExecutionScope():
            conn = lsc.create_execution_scoped_engine_sync().connect()
            leaked.append(conn)
            conn.execute(text("select 1"))
            await asyncio.sleep(0)

    async def main() -> None:
        for _ in range(runs):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(body(), timeout=0.001)

    asyncio.run(main())
    assert_nothing_lost(mgr, pg_db, leaks=len(leaked))
    assert len(leaked) == runs


# -- 5. budget holders waiting on each other -------------------------------------------


def test_budget_holders_waiting_on_each_other_fail_at_once(
    pg_db: Database, configure_default: Callable[..., Any]
) -> None:
    mgr = configure_default(
        pg_db.url, max_connections=2, max_connections_per_execution=2, pool_timeout=60
    )
    both_hold = threading.Barrier(2, timeout=30)
    outcome: dict[str, Any] = {}

    def execution(name: str) -> None:
        try:
            with lsc.ExecutionScope(name):
                engine = lsc.create_execution_scoped_engine_sync()
                first = engine.connect()  # kept: a leak, not inside a running `with`
                first.execute(text("select 1"))
                both_hold.wait()
                second = engine.connect()
                outcome[name] = ("got", backend_pid(second))
                second.close()
        except BaseException as exc:
            outcome[name] = ("error", exc)

    threads = [
        threading.Thread(target=execution, args=(name,), daemon=True)
        for name in ("holder-a", "holder-b")
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 40  # pool_timeout is 60: a hang would still be waiting
    for thread in threads:
        thread.join(timeout=max(deadline - time.monotonic(), 0.1))
    assert not any(t.is_alive() for t in threads), "both executions waited on each other"
    assert sorted(outcome) == ["holder-a", "holder-b"]
    errors = [v[1] for v in outcome.values() if v[0] == "error"]
    assert len(errors) == 1, outcome
    error = errors[0]
    assert isinstance(error, ConnectionBudgetExceededError), error
    message = str(error)
    assert "holder-a" in message and "holder-b" in message, message
    assert "waiting" in message, message
    assert [v[0] for v in outcome.values()].count("got") == 1  # the other went on
    assert mgr.drain(timeout=30)
    stats = mgr.get_stats()
    assert stats["connections_in_use"] == 0
    assert stats["leaks_reclaimed"] == 2  # each execution's kept first connection


# -- 6. per_execution leaves no server connection once no execution is active ----------


def test_per_execution_strategy_leaves_no_backend(
    pg_db: Database, configure_default: Callable[..., Any]
) -> None:
    mgr = configure_default(pg_db.url, strategy="per_execution")
    with lsc.ExecutionScope("pe-run"):
        db = lsc.get_scoped_sql_database()  # reflects the schema
        assert db.run("select count(*) from customers") != ""
        during = mgr.get_stats()
        assert pg_db.backends() >= 1
    pools = [p for p in during["pools"] if p.get("execution_id") == "pe-run"]
    assert len(pools) == 1, during["pools"]
    assert pools[0]["strategy"] == "per_execution"
    assert mgr.drain(timeout=30)
    eventually(lambda: pg_db.backends() == 0, "no backend of the app is left")
    after = mgr.get_stats()
    assert after["connections_idle"] == 0
    assert after["connections_in_use"] == 0
    assert after["connections_opened"] == after["connections_closed"]
