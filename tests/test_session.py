"""Session hygiene of the shared pool (langgraph_scoped_conn.session and the pool's marks).

A pooled connection carries session state from one execution to the next unless it is
reset.  It is reset when it changes hands (a checkout by another execution) or when its
owner ends, while idle; never when it goes back to the same execution.  With psycopg 3
the reset also clears the driver's own cache of prepared statements, so a run never
names a statement the server dropped (a budget of 1 makes every run share one backend).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import psycopg2
import pytest
from sqlalchemy import text

import langgraph_scoped_conn as lsc
from langgraph_scoped_conn import ExecutionConnectionManager
from langgraph_scoped_conn.session import RESET_SQL, activity
from langgraph_scoped_conn.testing import SAMPLE_SQL, PostgresCluster
from tests.conftest import Database, eventually

QUERY = "select count(*) from orders"
#: The same answer from a statement that changes the session, so every change of hands
#: resets it (QUERY leaves nothing behind and pays no reset: tests/test_stateless.py).
DIRTY = "select count(*) from orders where set_config('work_mem', '8MB', false) <> ''"
#: prepared statements of the session but this query (psycopg may prepare it too)
OTHERS_PREPARED = (
    "select count(*) from pg_prepared_statements where statement not like '%pg_prepared%'"
)


def psycopg_manager(url: str, **options: Any) -> ExecutionConnectionManager:
    return lsc.configure(url, max_connections=1, pool_timeout=10, **options)


@pytest.mark.parametrize(
    "threshold",
    [
        pytest.param(None, id="psycopg default threshold"),
        pytest.param(1, id="threshold 1"),
        pytest.param(0, id="threshold 0"),
    ],
)
def test_psycopg3_repeated_statements_never_name_a_dropped_one(
    threshold: int | None,
    pg_db: Database,
    configure_default: Callable[..., ExecutionConnectionManager],
) -> None:
    """Reproduction: runs 6 and 13 of a repeated write-mode query failed with
    'prepared statement "_pg3_0" does not exist' (the reset itself got prepared)."""
    options: dict[str, Any] = {}
    if threshold is not None:
        options["engine_options"] = {"connect_args": {"prepare_threshold": threshold}}
    mgr = configure_default(pg_db.url_with("psycopg"), max_connections=1, **options)
    answers = []
    for _ in range(20):  # one backend: every run gets the previous run's session, reset
        with lsc.ExecutionScope():
            answers.append(lsc.get_scoped_sql_database().run(DIRTY))
    # one run repeats a statement six times (prepared on its 5th), the next repeats it
    for _ in range(3):
        with lsc.ExecutionScope():
            db = lsc.get_scoped_sql_database()
            answers += [db.run(DIRTY) for _ in range(6)]
    assert answers == ["[(500,)]"] * len(answers)
    assert mgr.get_stats()["connections_opened"] == 1  # the same session all along
    # and the server holds none of the runs' prepared statements once they ended
    pids = pg_db.query(
        "select pid from pg_stat_activity where datname = current_database() "
        "and application_name = 'langgraph_scoped_conn'"
    )
    assert len(pids) == 1
    with lsc.ExecutionScope():
        engine = lsc.get_scoped_engine()
        with engine.connect() as conn:
            assert conn.execute(text(OTHERS_PREPARED)).scalar() == 0


def test_a_run_sees_only_its_own_prepared_statements(
    pg_db: Database, configure_default: Callable[..., ExecutionConnectionManager]
) -> None:
    """Within one execution the connection keeps its prepared statements (no reset)."""
    configure_default(
        pg_db.url_with("psycopg"),
        max_connections=1,
        engine_options={"connect_args": {"prepare_threshold": 1}},
    )
    with lsc.ExecutionScope():
        engine = lsc.get_scoped_engine()
        for _ in range(3):  # the connection goes back to the pool and comes back
            with engine.connect() as conn:
                assert conn.execute(text(QUERY)).scalar() == 500
                conn.commit()
        with engine.connect() as conn:
            names = conn.execute(text("select name from pg_prepared_statements")).scalars()
            assert len(list(names)) >= 1  # kept across this execution's checkouts
    with lsc.ExecutionScope(), lsc.get_scoped_engine().connect() as conn:
        left = conn.execute(text("select count(*) from pg_prepared_statements")).scalar()
    assert left == 0


def test_setseed_does_not_survive_to_the_next_execution(
    pg_db: Database, configure_default: Callable[..., ExecutionConnectionManager]
) -> None:
    """DISCARD ALL keeps a setseed(); the reset draws a new seed."""
    configure_default(pg_db.url, max_connections=1, pool_timeout=10)
    admin = pg_db.server.admin(pg_db.name)
    try:
        with admin.cursor() as cur:
            cur.execute("select setseed(0.5)")
            cur.execute("select random(), random()")
            seeded = cur.fetchone()
    finally:
        admin.close()
    with lsc.ExecutionScope():  # write mode may call setseed
        lsc.get_scoped_sql_database().run("select setseed(0.5)")
    with lsc.ExecutionScope(), lsc.get_scoped_engine().connect() as conn:
        after = tuple(conn.execute(text("select random(), random()")).one())
    assert after != seeded


# -- resets counted on the server ---------------------------------------------------------


@pytest.fixture(scope="module")
def logged() -> Iterator[PostgresCluster]:
    with PostgresCluster.running(
        extra_conf={"log_statement": "all", "log_line_prefix": "%a:"}
    ) as cluster:
        cluster.psql("create database sess")
        cluster.psql(SAMPLE_SQL, database="sess")
        yield cluster


def resets_sent(cluster: PostgresCluster, action: Callable[[], Any]) -> int:
    """How many resets the package's backends were sent while ``action`` ran."""
    start = cluster.logfile.stat().st_size
    action()
    with cluster.logfile.open("rb") as f:
        f.seek(start)
        lines = f.read().decode(errors="replace").splitlines()
    prefix = "langgraph_scoped_conn:LOG:  statement: " + RESET_SQL
    return sum(1 for line in lines if line.startswith(prefix))


@pytest.mark.parametrize("driver", ["psycopg2", "psycopg"])
def test_one_reset_per_owner_change_and_none_for_the_same_owner(
    driver: str, logged: PostgresCluster
) -> None:
    mgr = ExecutionConnectionManager(logged.url("sess", driver=driver), max_connections=1)
    try:

        def one_owner_writes_three_times() -> None:
            with lsc.ExecutionScope(manager=mgr):
                db = lsc.get_scoped_sql_database(manager=mgr)
                for _ in range(3):  # the same connection comes back each time
                    assert db.run(DIRTY) == "[(500,)]"

        # the three checkouts of one execution: no reset; its end: one
        assert resets_sent(logged, one_owner_writes_three_times) == 1

        # read-only runs leave nothing behind: no reset at all; nor do write-mode
        # statements that provably change nothing in the session
        def reads() -> None:
            for read_only in (True, True, True, False, False, False):
                with lsc.ExecutionScope(manager=mgr):
                    db = lsc.get_scoped_sql_database(manager=mgr, read_only=read_only)
                    assert db.run(QUERY) == "[(500,)]"

        assert resets_sent(logged, reads) == 0

        # two live executions take turns on the one connection: a reset at each change
        # of hands (the checkout of the other), none when the same one takes it again
        def interleaved() -> None:
            a, b = lsc.ExecutionScope(manager=mgr), lsc.ExecutionScope(manager=mgr)
            with a:
                db_a = lsc.get_scoped_sql_database(manager=mgr)
                db_a.run(DIRTY)  # dirty, by a
                db_a.run(QUERY)  # a again: no reset (and still marked by a)
                with b:
                    db_b = lsc.get_scoped_sql_database(manager=mgr)
                    db_b.run(DIRTY)  # change of hands a -> b: reset
                    db_b.run(DIRTY)  # b again: no reset
                # b ended while the connection was idle and marked by b: reset
            # a ended: the connection is b's reset one, not marked by a: nothing

        assert resets_sent(logged, interleaved) == 2
        assert mgr.get_stats()["session_resets"] == 3
    finally:
        mgr.close()


# -- what a connection is doing, read from the driver ----------------------------------------


@pytest.mark.parametrize("driver", ["psycopg2", "psycopg"])
def test_activity_reads_the_driver_state(driver: str, pg_db: Database) -> None:
    url = pg_db.url_with(driver).replace(f"postgresql+{driver}", "postgresql")
    if driver == "psycopg":
        import psycopg

        conn: Any = psycopg.connect(url)
    else:
        conn = psycopg2.connect(url)
    worker: threading.Thread | None = None
    try:
        assert activity(conn) == "idle"
        cur = conn.cursor()
        cur.execute("select 1")
        assert activity(conn) == "transaction"  # autobegun, between statements
        outcome: dict[str, Any] = {}

        def sleep() -> None:
            try:
                conn.cursor().execute("select pg_sleep(60)")
            except Exception as exc:  # cancelled below
                outcome["error"] = exc

        pid = conn.info.backend_pid if driver == "psycopg" else conn.get_backend_pid()
        worker = threading.Thread(target=sleep)
        worker.start()
        seen = None
        while worker.is_alive() and seen != "active":  # until the statement is in flight
            seen = activity(conn)
        assert seen == "active"  # a statement in flight, seen from another thread
        # psycopg 3 counts a statement as in flight from the moment its thread takes the
        # connection's lock, before the query reaches the server; a cancel sent before
        # then is a no-op (and the sleep would run its 60 s), so cancel once it runs
        eventually(
            lambda: (
                pg_db.query("select state, query from pg_stat_activity where pid = %s", pid)
                == [("active", "select pg_sleep(60)")]
            ),
            "the sleep running on the server",
        )
        conn.cancel()
        worker.join(30)
        assert "canceling statement" in str(outcome.get("error")), outcome
        conn.rollback()
        assert activity(conn) == "idle"
    finally:
        # never close a connection under a thread still inside a statement: a driver may
        # free what that thread is using (a failed assertion above must not crash the run)
        while worker is not None and worker.is_alive():
            conn.cancel()
            worker.join(1)
        conn.close()
    assert activity(conn) == "gone"
