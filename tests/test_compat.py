"""Every reach into library internals (langgraph_scoped_conn.compat), checked against the
installed SQLAlchemy and psycopg.

``compat.py`` wraps each private member of SQLAlchemy and psycopg the package relies on.
These tests fail loudly, naming the member, when an upgrade moves one.  Three layers:

1. the member is there, with the parameters compat.py calls it with;
2. the installed library still calls each override where compat.py says it does (a bare
   pool over SQLite, an engine view over SQLite, a psycopg 3 connection);
3. each override at work through the package, against the real PostgreSQL: the budget
   pool's slots, line and reserve; a reclaimed connection that refuses to reconnect; the
   per-execution engine copies; the session reset's prepared-statement cache; the
   statement lock read from another thread.

One more library the package leans on: lazy_loader, whose ``attach_stub`` must keep a root
name such as ``configure`` the function, not the module of the same name.

CI runs them at the dependency floors (``.ci/floors.txt``) and at the latest versions.
"""

from __future__ import annotations

import collections
import importlib
import importlib.util
import inspect
import sqlite3
import threading
from collections.abc import Callable
from typing import Any

import psycopg
import psycopg2
import pytest
import sqlalchemy
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.engine.base import OptionEngine
from sqlalchemy.exc import ResourceClosedError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.pool import ConnectionPoolEntry, QueuePool
from sqlalchemy.util import queue as sqla_queue

import langgraph_scoped_conn as lsc
from langgraph_scoped_conn import ExecutionConnectionManager
from langgraph_scoped_conn.compat import (
    EngineView,
    HookedQueuePool,
    ReclaimAwareConnection,
    forget_prepared_statements,
    statement_lock,
)
from langgraph_scoped_conn.engine import ScopedConnection, ScopedEngine
from langgraph_scoped_conn.errors import ConnectionReclaimedError
from langgraph_scoped_conn.session import activity, reset_session
from tests.conftest import Database, backend_pid, eventually, live_pids

QUERY = "select count(*) from orders"


def versions() -> str:
    return f"SQLAlchemy {sqlalchemy.__version__}, psycopg {psycopg.__version__}"


def sqlite_creator() -> sqlite3.Connection:
    return sqlite3.connect(":memory:", check_same_thread=False)


def params(function: Any) -> list[str]:
    return list(inspect.signature(function).parameters)


def libpq_url(pg_db: Database, driver: str) -> str:
    return pg_db.url_with(driver).replace(f"postgresql+{driver}", "postgresql")


# -- 1. the members are there -------------------------------------------------------------

#: QueuePool's private methods HookedQueuePool overrides or calls, and their parameters
QUEUE_POOL_METHODS = {
    "_do_get": ["self"],
    "_do_return_conn": ["self", "record"],
    "_return_conn": ["self", "record"],
    "_inc_overflow": ["self"],
    "_dec_overflow": ["self"],
    "_create_connection": ["self"],
    "size": ["self"],
}


@pytest.mark.parametrize(("name", "expected"), sorted(QUEUE_POOL_METHODS.items()))
def test_queue_pool_has_the_private_methods_hooked_queue_pool_uses(
    name: str, expected: list[str]
) -> None:
    method = getattr(QueuePool, name, None)
    assert callable(method), f"QueuePool.{name} is gone in {versions()} (compat.HookedQueuePool)"
    assert params(method) == expected, (
        f"QueuePool.{name}{inspect.signature(method)} in {versions()}: compat.HookedQueuePool "
        f"calls it as {name}({', '.join(expected[1:])})"
    )


def test_hooked_queue_pool_overrides_members_queue_pool_still_has() -> None:
    """An override of a member QueuePool renamed would never be called: none may be dead."""
    overridden = {"_do_get", "_do_return_conn", "_return_conn", "_inc_overflow"}
    assert overridden <= set(HookedQueuePool.__dict__)
    for name in overridden:
        assert hasattr(QueuePool, name), f"QueuePool.{name} is gone in {versions()}"


def test_queue_pool_keeps_its_state_where_hooked_queue_pool_reads_it() -> None:
    pool = HookedQueuePool(sqlite_creator, pool_size=3, max_overflow=0, timeout=1.5)
    try:
        queue = pool._pool
        assert isinstance(queue, sqla_queue.Queue), type(queue)
        assert isinstance(queue.queue, collections.deque), type(queue.queue)  # type: ignore[attr-defined]
        assert isinstance(queue.not_full, threading.Condition)  # type: ignore[attr-defined]
        with queue.mutex:  # type: ignore[attr-defined]
            pass
        assert (pool._overflow, pool._max_overflow, pool._timeout) == (-3, 0, 1.5)
        with pool._overflow_lock:
            pass
        # the helpers read them as compat.py says
        assert (pool.records(), pool.idle_count(), pool.pool_timeout()) == (0, 0, 1.5)
        assert not pool.over_capacity()
    finally:
        pool.dispose()


def test_connection_and_option_engine_have_what_the_engine_view_uses() -> None:
    assert params(Connection._revalidate_connection) == ["self"], versions()
    assert Engine._connection_cls is Connection, versions()
    assert params(OptionEngine.__init__) == ["self", "proxied", "execution_options"], versions()
    engine = create_engine("sqlite://")
    try:
        view = EngineView(engine, {})
        assert hasattr(view, "__dict__"), "OptionEngine has __slots__: copy_of copies __dict__"
        with view.connect() as conn:
            assert hasattr(conn, "_dbapi_connection"), versions()
    finally:
        engine.dispose()


def test_psycopg_connection_has_the_prepared_cache_and_the_lock(pg_db: Database) -> None:
    conn = psycopg.connect(libpq_url(pg_db, "psycopg"))
    try:
        prepared = conn._prepared
        for name in ("_counts", "_names", "_to_flush"):
            assert hasattr(getattr(prepared, name, None), "clear"), (
                f"psycopg {psycopg.__version__}: Connection._prepared.{name} is gone "
                "(compat.forget_prepared_statements)"
            )
        assert hasattr(conn, "prepare_threshold")  # how session.reset_session knows psycopg 3
        assert "prepare" in params(psycopg.Cursor.execute)
        assert statement_lock(conn) is conn.lock
        assert conn.lock.locked() is False
    finally:
        conn.close()


def test_psycopg2_has_no_statement_lock(pg_db: Database) -> None:
    conn = psycopg2.connect(libpq_url(pg_db, "psycopg2"))
    try:
        assert statement_lock(conn) is None
        forget_prepared_statements(conn)  # nothing to forget: no error
    finally:
        conn.close()


async def test_psycopg_async_connection_lock_is_read_too(pg_db: Database) -> None:
    conn = await psycopg.AsyncConnection.connect(libpq_url(pg_db, "psycopg"))
    try:
        lock = statement_lock(conn)
        assert lock is conn.lock
        assert lock.locked() is False
        assert hasattr(conn._prepared, "_names")
    finally:
        await conn.close()


# -- 2. the library calls each override where compat.py says --------------------------------


class RecordingPool(HookedQueuePool):
    """HookedQueuePool's own behaviour, with each hook call written down."""

    def __init__(self, creator: Any, **kw: Any) -> None:
        super().__init__(creator, **kw)
        self.calls: list[str] = []

    def take_entry(self) -> ConnectionPoolEntry:
        self.calls.append("take_entry")
        return super().take_entry()

    def give_back(self, record: ConnectionPoolEntry) -> None:
        self.calls.append("give_back")
        super().give_back(record)

    def on_checkin(self, record: ConnectionPoolEntry) -> None:
        self.calls.append("on_checkin")

    def _inc_overflow(self) -> bool:
        self.calls.append("_inc_overflow")
        return super()._inc_overflow()


@pytest.fixture
def recording_pool() -> Any:
    pool = RecordingPool(sqlite_creator, pool_size=1, max_overflow=0, timeout=0.05)
    event.listen(pool, "checkin", lambda *args: pool.calls.append("checkin event"))
    yield pool
    pool.dispose()


def test_checkout_and_checkin_go_through_the_hooks(recording_pool: RecordingPool) -> None:
    pool = recording_pool
    fairy = pool.connect()
    assert pool.calls == ["take_entry", "_inc_overflow"], versions()
    assert pool.records() == 1
    pool.calls.clear()
    fairy.close()
    # on_checkin runs where the checkin event fires, before the record is pooled again
    assert pool.calls == ["checkin event", "on_checkin", "give_back"], versions()
    assert pool.idle_count() == 1
    pool.calls.clear()
    again = pool.connect()  # the idle one: no new slot
    assert pool.calls == ["take_entry"], versions()
    again.close()


def test_a_detach_gives_the_record_back_without_a_checkin(recording_pool: RecordingPool) -> None:
    pool = recording_pool
    fairy = pool.connect()
    pool.calls.clear()
    fairy.detach()
    fairy.close()
    assert pool.calls == ["give_back"], versions()  # no on_checkin: it was never returned


def test_queue_pool_waits_then_gives_up_when_its_slots_are_taken(
    recording_pool: RecordingPool,
) -> None:
    pool = recording_pool  # one slot (a per-execution pool checks out this way)
    held = pool.connect()
    with pytest.raises(PoolTimeoutError):
        pool.connect()  # the one slot is taken: QueuePool waited pool_timeout, then gave up
    assert pool.calls == ["take_entry", "_inc_overflow", "take_entry"], versions()
    held.close()


def test_the_slot_helpers_over_queue_pool_state() -> None:
    pool = HookedQueuePool(sqlite_creator, pool_size=3, max_overflow=0, timeout=0.05)
    try:
        pool.reserved = 1
        assert [pool.open_slot() for _ in range(3)] == [True, True, False]
        assert pool.records() == 2 and not pool.over_capacity()
        pool.reserved = 2
        assert pool.over_capacity()
        pool.free_slot()
        assert pool.records() == 1 and not pool.over_capacity()
        record = pool.create_entry()
        assert record.dbapi_connection is not None
        pool.idle_put(record)
        assert pool.idle_count() == 1
        assert pool.idle_remove(record) is True
        assert pool.idle_remove(record) is False
        assert pool.idle_take() is None
        pool.idle_put(record)
        assert pool.idle_take() is record
        record.close()
    finally:
        pool.dispose()


class Refused(ResourceClosedError):
    """What refuse_reconnect raises (a SQLAlchemy error is raised as it is, not wrapped)."""


def test_a_reclaim_aware_connection_is_asked_before_it_reconnects() -> None:
    class Refusing(ReclaimAwareConnection):
        refusals = 0

        def refuse_reconnect(self) -> None:
            type(self).refusals += 1
            raise Refused("refused")

    class RefusingView(EngineView):
        _connection_cls = Refusing

    engine = create_engine("sqlite://")
    try:
        conn = RefusingView(engine, {}).connect()
        assert isinstance(conn, Refusing), versions()
        assert conn.execute(text("select 1")).scalar_one() == 1
        conn.invalidate()
        assert conn.invalidated and conn._dbapi_connection is None
        with pytest.raises(Refused, match="refused"):  # before "rollback first"
            conn.execute(text("select 1"))
        assert Refusing.refusals == 1
        conn.close()
        # without a refusal, SQLAlchemy's own reconnect goes on
        plain = EngineView(engine, {}).connect()
        plain.execute(text("select 1"))
        plain.invalidate()
        plain.rollback()
        assert plain.execute(text("select 2")).scalar_one() == 2
        plain.close()
    finally:
        engine.dispose()


def test_an_engine_view_copy_shares_the_pool_and_dialect() -> None:
    engine = create_engine("sqlite://")
    try:
        view = EngineView(engine, {"logging_token": "view"})
        copy = EngineView.copy_of(view)
        assert type(copy) is EngineView and copy is not view
        assert copy.pool is engine.pool and copy.dialect is engine.dialect
        assert copy.get_execution_options() == view.get_execution_options()
        copy.marker = "copy"  # type: ignore[attr-defined]
        assert not hasattr(view, "marker")  # its own attributes
        with copy.connect() as conn:
            assert isinstance(conn, ReclaimAwareConnection)
            assert conn.execute(text("select 3")).scalar_one() == 3
    finally:
        engine.dispose()


def test_forget_prepared_statements_keeps_psycopg_in_step_with_a_reset(pg_db: Database) -> None:
    # autocommit: psycopg itself forgets what it prepared in a transaction rolled back
    conn = psycopg.connect(libpq_url(pg_db, "psycopg"), prepare_threshold=0, autocommit=True)
    on_server = "select count(*) from pg_prepared_statements"
    try:
        for _ in range(2):
            assert conn.execute(QUERY).fetchone() == (500,)
        assert conn._prepared._names, "prepare_threshold=0 prepared nothing"
        assert conn.execute(on_server, prepare=False).fetchone() == (1,)
        assert reset_session(conn)  # DEALLOCATE ALL on the server, then forget
        assert not conn._prepared._names and not conn._prepared._counts
        assert conn.execute(on_server, prepare=False).fetchone() == (0,)
        for _ in range(2):  # psycopg prepares it afresh instead of naming a dropped one
            assert conn.execute(QUERY).fetchone() == (500,)
        assert conn._prepared._names
    finally:
        conn.close()


def test_the_statement_lock_is_held_while_a_statement_runs(pg_db: Database) -> None:
    conn = psycopg.connect(libpq_url(pg_db, "psycopg"))
    outcome: dict[str, Any] = {}

    def sleep() -> None:
        try:
            conn.execute("select pg_sleep(60)")
        except Exception as exc:  # cancelled below
            outcome["error"] = exc

    def on_server() -> bool:
        rows = pg_db.query(
            "select count(*) from pg_stat_activity where state = 'active' "
            "and query = 'select pg_sleep(60)'"
        )
        return rows == [(1,)]

    worker = threading.Thread(target=sleep)
    try:
        worker.start()
        lock = statement_lock(conn)
        assert lock is not None
        eventually(on_server, "the statement runs on the server")
        assert lock.locked() and activity(conn) == "active"  # read from this thread
        conn.cancel()
        worker.join(30)
        assert "canceling statement" in str(outcome.get("error")), outcome
        assert not lock.locked()
    finally:
        if worker.is_alive():
            conn.cancel()
            worker.join(30)
        conn.close()


# -- 3. the overrides at work through the package ---------------------------------------------


def test_the_budget_pool_opens_hands_over_and_sets_aside_through_the_hooks(
    configure_default: Callable[..., ExecutionConnectionManager], pg_db: Database
) -> None:
    mgr = configure_default(max_connections=2, pool_timeout=30)
    handle = mgr.pool_for()
    pool = handle.engine.pool
    assert isinstance(pool, HookedQueuePool)
    got: dict[str, Any] = {}

    def waiter() -> None:
        with lsc.ExecutionScope("waiter"), lsc.get_scoped_engine().connect() as conn:
            got["pid"] = backend_pid(conn)

    with lsc.ExecutionScope("holder"):
        engine = lsc.get_scoped_engine()
        first, second = engine.connect(), engine.connect()  # both slots
        pids = {backend_pid(first), backend_pid(second)}
        assert pool.records() == 2
        thread = threading.Thread(target=waiter)
        thread.start()
        eventually(lambda: mgr.get_stats()["requests_waiting"] == 1, "the waiter is in line")
        first.close()  # handed straight to the head of the line
        thread.join(30)
        assert got["pid"] in pids
        second.close()
    stats = mgr.get_stats()["pools"][0]
    assert stats["connections_opened"] == 2 and stats["waits"] == 1
    assert stats["checkouts"] == stats["checkins"] == 3  # counted by the hooks
    mgr.drain()
    handle.reserve(1, timeout=5)  # the idle one beyond the new capacity is closed
    try:
        assert pool.records() == 1
        eventually(lambda: len(live_pids(pg_db)) == 1, "one backend is left")
    finally:
        handle.unreserve(1)


def test_a_reclaimed_connection_refuses_to_reconnect_through_the_package(
    manager: ExecutionConnectionManager, pg_db: Database
) -> None:
    with lsc.ExecutionScope("leaks"):
        engine = lsc.get_scoped_engine()
        assert isinstance(engine, ScopedEngine)
        leaked = engine.connect()
        assert isinstance(leaked, ScopedConnection)
        pid = backend_pid(leaked)
    eventually(lambda: pid not in live_pids(pg_db), "the leaked backend is gone")
    assert leaked.invalidated
    with pytest.raises(ConnectionReclaimedError):
        leaked.execute(text("select 1"))
    assert pid not in live_pids(pg_db)
    assert manager.get_stats()["pools"][0]["connections_opened"] == 1  # no silent reconnect


def test_each_execution_gets_a_copy_of_one_engine_on_the_shared_pool(
    manager: ExecutionConnectionManager,
) -> None:
    engines = []
    for name in ("one", "two"):
        with lsc.ExecutionScope(name):
            engine = lsc.get_scoped_engine()
            with engine.connect() as conn:
                assert conn.execute(text(QUERY)).scalar_one() == 500
            engines.append(engine)
    one, two = engines
    assert type(one) is type(two) is ScopedEngine and one is not two
    assert (one.execution_id, two.execution_id) == ("one", "two")
    assert one.pool is two.pool is manager.pool_for().engine.pool
    assert one.dialect is two.dialect


@pytest.mark.parametrize("threshold", [0, 1])
def test_runs_on_one_psycopg_session_never_name_a_dropped_statement(
    threshold: int,
    configure_default: Callable[..., ExecutionConnectionManager],
    pg_db: Database,
) -> None:
    mgr = configure_default(
        pg_db.url_with("psycopg"),  # psycopg 3: its prepared-statement cache
        max_connections=1,
        engine_options={"connect_args": {"prepare_threshold": threshold}},
    )
    for i in range(6):  # one backend: each run gets the previous run's reset session
        with lsc.ExecutionScope(f"run{i}"), lsc.get_scoped_engine().connect() as conn:
            for _ in range(3):
                assert conn.execute(text(QUERY)).scalar_one() == 500
            driver = conn.connection.driver_connection
            assert driver is not None and driver._prepared._names  # prepared in this run
    assert mgr.get_stats()["connections_opened"] == 1


# -- lazy_loader: a root name that is also the name of its module ------------------------------


def test_a_root_name_is_not_shadowed_by_its_module_of_the_same_name() -> None:
    """``configure()`` lives in ``configure.py``: importing that module (conftest does) sets
    the package's ``configure`` attribute to the module, unless lazy_loader guards it
    (0.6 and newer do; with 0.5, ``lsc.configure(...)`` raised "'module' object is not
    callable")."""
    shared = [n for n in lsc.__all__ if importlib.util.find_spec(f"{lsc.__name__}.{n}")]
    assert "configure" in shared
    for name in shared:
        module = importlib.import_module(f"{lsc.__name__}.{name}")
        assert getattr(lsc, name) is getattr(module, name), name
