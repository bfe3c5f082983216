"""Ending an execution (langgraph_scoped_conn.release): leaked connections reclaimed, and
releases while connections are in use.

Leaks: a connection a run never returned (or detached) is closed on the server at scope
end, counted, refuses reuse with a clear error, and frees its budget slot.

In use: "in use" is read from the connection (a statement in flight, a transaction open), never
from the frame that checked it out.  Reproductions: a connection checked out in a helper
function, or on the loop and then used in ``asyncio.to_thread``, looked like a leak and
was closed without a cancel.  With psycopg 3 the server kept running the statement past
the budget; with psycopg2 a forced release blocked for the statement's length; a
statement that ignored the cancel overshot the budget once the grace ended; and two such
releases occupied both release threads, so a third run's plain leak was never reclaimed.

Every in-use test samples the server (``pg_stat_activity``) and asserts the backends of the
package's pool never exceed the budget.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import event as sa_event
from sqlalchemy import text

import langgraph_scoped_conn as lsc
from langgraph_scoped_conn import ExecutionConnectionManager
from langgraph_scoped_conn.errors import ConnectionReclaimedError, ScopeClosedError
from tests.conftest import Database, backend_pid, eventually, live_pids

DRIVERS = ["psycopg2", "psycopg"]
APP = "langgraph_scoped_conn%"

#: A statement that ignores a cancel: it catches query_canceled and sleeps on, until the
#: test lets it go (a row in ``gate``).  What a slow model-written query can look like to
#: the release: the cancel does not end it.
STUBBORN_SQL = """
create table gate (opened boolean);
create function stubborn() returns int language plpgsql as $$
begin
  loop
    begin  -- every statement inside the block: a cancel lands in one of them
      perform pg_sleep(0.05);
      if exists (select 1 from gate) then
        return 1;
      end if;
    exception when query_canceled then
      null;
    end;
  end loop;
end $$;
"""


def running(pg_db: Database, pid: int, fragment: str) -> bool:
    rows = pg_db.query(
        "select count(*) from pg_stat_activity where pid = %s and state = 'active' "
        "and query like %s",
        pid,
        f"%{fragment}%",
    )
    return int(str(rows[0][0])) == 1


def checked_out_in_a_helper(engine: Any) -> Any:
    """A connection checked out in a helper function and handed back to the caller."""
    return engine.connect()


@pytest.fixture
def stubborn(pg_db: Database) -> Iterator[Callable[[], None]]:
    pg_db.query(STUBBORN_SQL)

    def open_gate() -> None:
        pg_db.query("insert into gate values (true)")

    try:
        yield open_gate
    finally:
        open_gate()


# -- leaks: connections nobody uses any more -------------------------------------------


def test_leaked_connection_is_reclaimed_counted_and_refuses_reuse(
    manager: ExecutionConnectionManager, pg_db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    with lsc.ExecutionScope("leaky"):
        engine = lsc.create_execution_scoped_engine_sync()
        leaked = engine.connect()  # never closed
        leaked_pid = backend_pid(leaked)
        with engine.connect() as fine:  # returned properly
            kept_pid = backend_pid(fine)
        assert live_pids(pg_db)[leaked_pid] == "idle in transaction"
    stats = lsc.get_connection_stats()
    assert stats["leaks_reclaimed"] == 1
    assert stats["connections_in_use"] == 0
    # closed on the server, not left to garbage collection
    eventually(lambda: leaked_pid not in live_pids(pg_db), "the leaked backend is gone")
    pids = live_pids(pg_db)
    assert pids.get(kept_pid) == "idle"  # the returned one stays pooled
    warning = next(r for r in caplog.records if "still checked out" in r.getMessage())
    assert warning.levelno == logging.WARNING
    assert "leaky" in warning.getMessage()
    # using it again is a clear error, with or without a rollback first
    with pytest.raises(ConnectionReclaimedError, match="execution 'leaky', which has ended"):
        leaked.execute(text("select 1"))
    leaked.rollback()
    with pytest.raises(ScopeClosedError, match="closed at scope exit"):
        leaked.execute(text("select 1"))
    assert lsc.get_connection_stats()["connections_in_use"] == 0
    # and the engine cannot check out anything new for the ended execution
    with pytest.raises(ScopeClosedError, match="has ended"):
        engine.connect()


def test_a_detached_connection_is_still_reclaimed_at_scope_end(
    manager: ExecutionConnectionManager, pg_db: Database
) -> None:
    # detach() takes the DBAPI connection out of SQLAlchemy's pool: it is never checked
    # in, so the execution keeps it as a leak and closes it on the server at scope end
    with lsc.ExecutionScope("detaching"):
        engine = lsc.create_execution_scoped_engine_sync()
        detached = engine.connect()
        pid = backend_pid(detached)
        detached.detach()
        assert pid in live_pids(pg_db)
    assert lsc.get_connection_stats()["leaks_reclaimed"] == 1
    eventually(lambda: pid not in live_pids(pg_db), "the detached backend is gone")


def test_leaked_connection_frees_its_budget_slot(
    configure_default: Callable[..., ExecutionConnectionManager], pg_db: Database
) -> None:
    configure_default(max_connections=2, pool_timeout=1)
    for i in range(5):  # without reclaiming, the third execution would time out
        with lsc.ExecutionScope(f"leak{i}"):
            engine = lsc.create_execution_scoped_engine_sync()
            engine.connect().execute(text("select 1"))
            engine.connect().execute(text("select 1"))
    stats = lsc.get_connection_stats()
    assert stats["leaks_reclaimed"] == 10
    assert stats["checkout_timeouts"] == 0
    eventually(lambda: live_pids(pg_db) == {}, "every leaked backend is gone")


# -- releases while connections are in use ----------------------------------------------


@pytest.mark.parametrize("driver", DRIVERS)
def test_forced_release_of_a_helper_checkout_cancels_its_statement_first(
    driver: str, pg_db: Database, configure_default: Callable[..., ExecutionConnectionManager]
) -> None:
    mgr = configure_default(pg_db.url_with(driver), max_connections=1, pool_timeout=30)
    outcome: dict[str, Any] = {}
    started = threading.Event()

    def run() -> None:
        try:
            with lsc.ExecutionScope("helper"):
                conn = checked_out_in_a_helper(lsc.create_execution_scoped_engine_sync())
                outcome["pid"] = conn.execute(text("select pg_backend_pid()")).scalar()
                started.set()
                conn.execute(text("select pg_sleep(60)"))
                outcome["returned"] = True
        except BaseException as exc:
            outcome["error"] = exc
        finally:
            started.set()

    with pg_db.sampler(APP) as sampler:
        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        assert started.wait(30) and "pid" in outcome, outcome
        eventually(lambda: running(pg_db, outcome["pid"], "pg_sleep(60)"), "the sleep runs")
        begun = time.monotonic()
        assert mgr.reap(execution_id="helper", reason="released by request") == ["helper"]
        took = time.monotonic() - begun
        worker.join(30)
        assert not worker.is_alive(), "the statement was not cancelled"
    assert took < 15, took  # far less than the statement's 60 s (psycopg2 blocked before)
    assert "returned" not in outcome and "canceling statement" in str(outcome.get("error"))
    assert sampler.samples and sampler.peak <= 1
    assert mgr.drain()
    eventually(lambda: not running(pg_db, outcome["pid"], "pg_sleep"), "the backend is idle")


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_loop_checkout_used_in_to_thread_is_not_closed_under_its_statement(
    driver: str,
    pg_db: Database,
    stubborn: Callable[[], None],
    configure_default: Callable[..., ExecutionConnectionManager],
) -> None:
    """A cancelled run leaves a statement in flight to its thread; the slot stays held."""
    mgr = configure_default(pg_db.url_with(driver), max_connections=1, pool_timeout=30)
    state: dict[str, Any] = {}

    def statement(conn: Any) -> None:
        with conn:  # the thread closes the connection it was handed
            state["pid"] = conn.execute(text("select pg_backend_pid()")).scalar()
            conn.execute(text("select stubborn()"))  # in flight until the test opens its gate
            state["after"] = conn.execute(text("select 2")).scalar()  # it still works

    async def body() -> None:
        async with lsc.ExecutionScope("loop-checkout"):
            conn = lsc.create_execution_scoped_engine_sync().connect()  # on the loop
            await asyncio.to_thread(statement, conn)

    async def main() -> None:
        task = asyncio.ensure_future(body())
        await asyncio.to_thread(
            eventually,
            lambda: "pid" in state and running(pg_db, state["pid"], "stubborn()"),
            "the statement runs",
        )
        task.cancel()  # the run ends; its to_thread call goes on in its thread
        with pytest.raises(asyncio.CancelledError):
            await task
        stats = mgr.get_stats()
        state["draining"] = stats["draining_executions"]
        state["in_use"] = stats["connections_in_use"]
        stubborn()  # the statement ends; the thread goes on with the connection

    with pg_db.sampler(APP) as sampler:
        asyncio.run(main())  # returns once the default executor's thread has finished
        assert mgr.drain(30)
    assert (state["draining"], state["in_use"]) == (1, 1)  # left to its thread, slot held
    assert state["after"] == 2  # the connection was not torn away under the thread
    assert sampler.samples and sampler.peak <= 1
    stats = mgr.get_stats()
    assert stats["connections_in_use"] == 0 and stats["draining_executions"] == 0
    assert stats["leaks_reclaimed"] == 0


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_statement_that_ignores_cancel_keeps_its_slot_until_it_ends(
    driver: str,
    pg_db: Database,
    stubborn: Callable[[], None],
    configure_default: Callable[..., ExecutionConnectionManager],
) -> None:
    mgr = configure_default(pg_db.url_with(driver), max_connections=1, pool_timeout=30)
    outcome: dict[str, Any] = {}
    started = threading.Event()

    def run() -> None:
        try:
            with lsc.ExecutionScope("stubborn"):
                engine = lsc.create_execution_scoped_engine_sync()
                with engine.connect() as conn:
                    outcome["pid"] = conn.execute(text("select pg_backend_pid()")).scalar()
                    started.set()
                    outcome["value"] = conn.execute(text("select stubborn()")).scalar()
        except BaseException as exc:
            outcome["error"] = exc
        finally:
            started.set()

    with pg_db.sampler(APP) as sampler:
        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        assert started.wait(30) and "pid" in outcome, outcome
        eventually(lambda: running(pg_db, outcome["pid"], "stubborn()"), "stubborn() runs")
        begun = time.monotonic()
        assert mgr.reap(execution_id="stubborn", reason="released by request") == ["stubborn"]
        assert time.monotonic() - begun < 15  # the release returned; it did not wait it out
        # the statement goes on, and holds the one slot: the next run waits for it
        assert running(pg_db, outcome["pid"], "stubborn()")
        assert mgr.get_stats()["connections_in_use"] == 1
        got: list[str] = []

        def next_run() -> None:
            with lsc.ExecutionScope("next"):
                got.append(lsc.get_scoped_sql_database().run("select 2"))

        waiter = threading.Thread(target=next_run, daemon=True)
        waiter.start()
        eventually(lambda: mgr.get_stats()["requests_waiting"] == 1, "the next run waits")
        assert running(pg_db, outcome["pid"], "stubborn()") and got == []
        stubborn()  # let the statement end: its thread returns the connection
        worker.join(30)
        waiter.join(30)
        assert not worker.is_alive() and not waiter.is_alive()
        assert got == ["[(2,)]"]
        assert mgr.drain(30)
    assert sampler.samples and sampler.peak <= 1  # never a second backend to kill it
    assert mgr.get_stats()["connections_in_use"] == 0


def test_one_stuck_release_never_delays_another_runs_reclaim(
    pg_db: Database,
    stubborn: Callable[[], None],
    configure_default: Callable[..., ExecutionConnectionManager],
) -> None:
    """Two releases stuck on stubborn statements; a third run's plain leak is reclaimed."""
    mgr = configure_default(pg_db.url, max_connections=3, pool_timeout=10)
    pids: dict[str, int] = {}
    ready = threading.Barrier(3, timeout=30)

    def stubborn_run(name: str) -> None:
        with (
            lsc.ExecutionScope(name),
            lsc.create_execution_scoped_engine_sync().connect() as conn,
        ):
            pids[name] = int(conn.execute(text("select pg_backend_pid()")).scalar())
            ready.wait()
            conn.execute(text("select stubborn()"))

    workers = [threading.Thread(target=stubborn_run, args=(n,), daemon=True) for n in "ab"]
    for w in workers:
        w.start()
    ready.wait()
    for name in "ab":
        eventually(lambda name=name: running(pg_db, pids[name], "stubborn()"), "stubborn runs")
    releases = [
        threading.Thread(target=mgr.reap, kwargs={"execution_id": n}, daemon=True) for n in "ab"
    ]
    for r in releases:
        r.start()
    # meanwhile a third run leaks its connection: it is reclaimed at its end, and the
    # slot serves an innocent fourth run
    with lsc.ExecutionScope("leaker"):
        leaked = lsc.create_execution_scoped_engine_sync().connect()
        leaked.execute(text("select 1"))
    assert mgr.get_stats()["leaks_reclaimed"] == 1
    with lsc.ExecutionScope("innocent"):
        assert lsc.get_scoped_sql_database().run("select 1") == "[(1,)]"
    stubborn()
    for t in (*workers, *releases):
        t.join(30)
        assert not t.is_alive()
    assert mgr.drain(30)


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_straggler_returning_its_connection_as_it_is_reclaimed_never_shares_it(
    driver: str, pg_db: Database, configure_default: Callable[..., ExecutionConnectionManager]
) -> None:
    """A run's thread is returning its connection (inside SQLAlchemy's check-in) at the
    moment its run is released: the connection must not end up handed to two runs.

    The thread is held inside the pool's check-in (its ``reset`` event) while the run is
    released by force; then another run takes the budget's one connection, the thread
    finishes its check-in, and a third run asks for a connection while the second
    still holds its own.  It must wait: before, the release returned the record to the
    pool from its own thread and the straggler's check-in returned it a second time, so
    the third run got a connection past the budget (or the second run's backend).
    """
    mgr = configure_default(pg_db.url_with(driver), max_connections=1, pool_timeout=30)
    pool = mgr.pool_for().engine.pool
    straggler: dict[str, Any] = {}
    in_checkin, checkin_may_go = threading.Event(), threading.Event()

    def hold_the_checkin(dbapi_connection: Any, record: Any, state: Any) -> None:
        if threading.get_ident() == straggler.get("thread"):
            in_checkin.set()
            checkin_may_go.wait(30)

    sa_event.listen(pool, "reset", hold_the_checkin)

    def straggler_run() -> None:
        straggler["thread"] = threading.get_ident()
        with lsc.ExecutionScope("straggler"):
            conn = lsc.get_scoped_engine().connect()
            straggler["pid"] = backend_pid(conn)
            try:
                conn.close()  # held in the check-in by the event above
            except Exception as exc:  # its run was released meanwhile: its own error
                straggler["error"] = exc

    held: dict[str, Any] = {}
    second_may_end = threading.Event()

    def run(name: str, keep: threading.Event | None) -> None:
        try:
            with lsc.ExecutionScope(name), lsc.get_scoped_engine().connect() as conn:
                held[name] = backend_pid(conn)
                if keep is not None:
                    keep.wait(30)
                    held[f"{name} again"] = backend_pid(conn)
        except BaseException as exc:
            held[name] = exc

    t = threading.Thread(target=straggler_run, daemon=True)
    t.start()
    assert in_checkin.wait(30), "the straggler reached the check-in"
    mgr.reap(execution_id="straggler", reason="released by request")
    second = threading.Thread(target=run, args=("second", second_may_end), daemon=True)
    second.start()
    eventually(
        lambda: "second" in held or mgr.get_stats()["requests_waiting"] == 1,
        "the second run holds the connection or waits for it",
    )
    checkin_may_go.set()
    t.join(30)
    eventually(lambda: "second" in held, "the second run got a connection")
    assert isinstance(held["second"], int), held
    third = threading.Thread(target=run, args=("third", None), daemon=True)
    third.start()
    # the budget's one connection is the second run's: the third run waits for it
    eventually(
        lambda: "third" in held or mgr.get_stats()["requests_waiting"] == 1,
        "the third run holds a connection or waits for one",
    )
    assert "third" not in held, f"a second connection on a budget of one: {held}"
    assert pg_db.query(
        "select count(*) from pg_stat_activity where application_name like %s",
        "langgraph_scoped_conn%",
    ) == [(1,)]
    second_may_end.set()
    second.join(30)
    third.join(30)
    assert held["second again"] == held["second"], held  # its backend stayed its own
    assert isinstance(held["third"], int), held
    assert mgr.drain(30)
    assert mgr.get_stats()["connections_in_use"] == 0


def test_drain_closes_a_connection_whose_grace_ends_while_it_waits(
    pg_db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """drain() read the grace after its reclaim, so a grace that ended in between (a slow
    release thread on a busy machine) returned with the connection still out: seen as a
    draining execution in a busy-core CI run.  Here the release threads' drain always
    waits until the grace is over, so that interleaving happens every time."""
    mgr = ExecutionConnectionManager(pg_db.url, max_connections=2)
    try:
        execution = mgr.open_execution("graced")
        engine = mgr.engine_for(execution)
        taken: dict[str, Any] = {}

        def node() -> None:  # another thread than the closer, inside a transaction
            conn = engine.connect()
            conn.execute(text("select 1"))
            taken["conn"], taken["pid"] = conn, backend_pid(conn)

        worker = threading.Thread(target=node)
        worker.start()
        worker.join()
        mgr.release_execution(execution)  # kept for its grace: its thread may go on
        assert mgr.get_stats()["draining_executions"] == 1

        slow = mgr._releaser.drain

        def drain_after_the_grace(timeout: float | None) -> bool:
            eventually(lambda: not execution.in_grace(), "the grace is over")
            return slow(timeout)

        monkeypatch.setattr(mgr._releaser, "drain", drain_after_the_grace)
        assert mgr.drain(30)
        stats = mgr.get_stats()
        assert (stats["draining_executions"], stats["connections_in_use"]) == (0, 0)
        assert stats["leaks_reclaimed"] == 1
        eventually(lambda: taken["pid"] not in live_pids(pg_db), "the backend is gone")
    finally:
        mgr.close()
