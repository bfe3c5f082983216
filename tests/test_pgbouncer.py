"""Pooler mode through a real PgBouncer (transaction mode), and scale-out over processes.

One PgBouncer per module (``default_pool_size = 3``) sits in front of the session's
PostgreSQL; every test database gets its own (database, user) pool there.  The tests
that start it are marked ``pgbouncer`` (conftest skips them when the binary is
missing); the detection and configuration tests need no server and always run.  The code
under test logs in as a non-superuser role, so server backends it causes are counted
from ``pg_stat_activity`` by ``usename``; the samplers use the superuser.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg2
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

import langgraph_scoped_conn as lsc
from langgraph_scoped_conn import ExecutionConnectionManager
from langgraph_scoped_conn.errors import ConfigurationError, UnsafeQueryError
from langgraph_scoped_conn.testing import PgBouncer, scram_secret
from langgraph_scoped_conn.urls import parse_url, resolve_strategy
from tests.conftest import Database, Server, assert_clean
from tests.pgbouncer_worker import run_worker

ROLE = "lsc_bouncer"
ROLE_PASSWORD = "Bouncer-pw-7c1e0d"  # a throwaway cluster's password
POOL_SIZE = 3


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bouncer(pg_server: Server) -> Iterator[PgBouncer]:
    """PgBouncer in transaction mode with default_pool_size=3, for a non-superuser role."""
    admin = pg_server.admin()
    try:
        with admin.cursor() as cur:
            cur.execute("select 1 from pg_roles where rolname = %s", (ROLE,))
            if cur.fetchone() is None:
                cur.execute(f"create role {ROLE} login password '{ROLE_PASSWORD}'")
        secret = scram_secret(admin, ROLE)
    finally:
        admin.close()
    server = make_url(pg_server.admin_url)
    try:
        with PgBouncer.running(
            server_host=server.host or "127.0.0.1",
            server_port=server.port or 5432,
            users={ROLE: secret},
            pool_size=POOL_SIZE,
        ) as running:
            yield running
    finally:
        admin = pg_server.admin()
        with admin.cursor() as cur:
            cur.execute(f"drop role if exists {ROLE}")
        admin.close()


@dataclass
class BouncedDb:
    """A test database reachable through PgBouncer as the role."""

    db: Database
    bouncer: PgBouncer

    def url(self, driver: str = "psycopg2", *, flag: bool = True) -> str:
        return self.bouncer.url(
            self.db.name, user=ROLE, password=ROLE_PASSWORD, driver=driver, flag=flag
        )

    def server_backends(self) -> int:
        """Backends PgBouncer opened on the real server for this database."""
        rows = self.db.query(
            "select count(*) from pg_stat_activity where usename = %s and datname = %s "
            "and backend_type = 'client backend'",
            ROLE,
            self.db.name,
        )
        return int(rows[0][0])  # type: ignore[call-overload]

    def pool(self) -> dict[str, Any]:
        """PgBouncer's SHOW POOLS row for this database (zeros before its first client)."""
        for row in self.bouncer.show("pools", user=ROLE, password=ROLE_PASSWORD):
            if row["database"] == self.db.name:
                return row
        return {"cl_active": 0, "cl_waiting": 0, "sv_active": 0, "sv_idle": 0, "sv_used": 0}


@pytest.fixture
def bdb(pg_db: Database, bouncer: PgBouncer) -> BouncedDb:
    pg_db.query(f"grant select, insert, update on all tables in schema public to {ROLE}")
    return BouncedDb(pg_db, bouncer)


@pytest.fixture
def pooler_manager(bdb: BouncedDb) -> Iterator[ExecutionConnectionManager]:
    mgr = ExecutionConnectionManager(bdb.url(), max_connections=4, pool_timeout=10)
    try:
        yield mgr
        assert_clean(mgr)
    finally:
        mgr.close()


# -- detection and configuration (no server needed) -----------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u:pw@db.internal:6432/app", "pooler"),
        ("postgresql+psycopg://u:pw@aws-0-eu-west-1.pooler.supabase.com:6543/postgres", "pooler"),
        ("postgresql://u:pw@aws-0-eu-west-1.pooler.supabase.com:5432/postgres", "pooler"),
        ("postgres://u:pw@db.example.com:6543/postgres", "pooler"),
        ("postgresql://u:pw@127.0.0.1:5999/app?pgbouncer=true", "pooler"),
        ("postgresql://u:pw@127.0.0.1:5999/app?pgbouncer=false", "shared"),
        ("postgresql://u:pw@db.example.com:5432/app", "shared"),
        ("postgresql://u:pw@pooler.supabase.com.evil.example:5432/app", "shared"),
        ("sqlite:////tmp/agent.db", "shared"),
    ],
)
def test_auto_strategy_detects_transaction_poolers(url: str, expected: str) -> None:
    assert resolve_strategy("auto", parse_url(url))[0] == expected


def test_pooler_strategy_is_refused_for_sqlite(tmp_path: Any) -> None:
    with pytest.raises(ConfigurationError, match=r"strategy='pooler' is for PostgreSQL"):
        resolve_strategy("pooler", parse_url(f"sqlite:///{tmp_path}/agent.db"))


@pytest.mark.pgbouncer
def test_startup_options_are_refused_in_pooler_mode(bdb: BouncedDb) -> None:
    mgr = ExecutionConnectionManager(
        bdb.url(),
        engine_options={"connect_args": {"options": "-c search_path=sales"}},
    )
    try:
        with pytest.raises(ConfigurationError) as info, lsc.ExecutionScope(manager=mgr):
            lsc.create_execution_scoped_engine_sync()
        message = str(info.value)
        assert "`options`" in message and "SET LOCAL" in message
        assert ROLE_PASSWORD not in message
        # the URL form is refused too
        url = bdb.url() + "&options=-csearch_path%3Dsales"
        with pytest.raises(ConfigurationError, match="SET LOCAL"):
            ExecutionConnectionManager(url).pool_for()
    finally:
        mgr.close()
    assert bdb.server_backends() == 0


# -- one process through PgBouncer ------------------------------------------------------------


@pytest.mark.pgbouncer
def test_pgbouncer_flag_is_stripped_and_queries_go_through_the_pooler(
    bdb: BouncedDb, pooler_manager: ExecutionConnectionManager
) -> None:
    # the driver itself refuses the flag: it must never reach it
    url = make_url(bdb.url())
    with pytest.raises(psycopg2.ProgrammingError, match="pgbouncer"):
        psycopg2.connect(
            host=url.host, port=url.port, user=url.username, password=url.password, pgbouncer="1"
        )
    with lsc.ExecutionScope("through-bouncer", manager=pooler_manager):
        db = lsc.create_execution_scoped_sql_database_sync()
        assert db.run("select count(*) from orders") == "[(500,)]"
        engine = lsc.create_execution_scoped_engine_sync()
        assert "pgbouncer" not in dict(engine.url.query)
        with engine.connect() as conn:
            backend_port = conn.execute(text("select inet_server_port()")).scalar_one()
            assert backend_port == make_url(bdb.db.url).port  # the real server answered
    stats = pooler_manager.get_stats()
    assert stats["strategy"] == "pooler"
    assert stats["pools"][0]["url"].endswith("?pgbouncer=true")
    assert ROLE_PASSWORD not in repr(stats)
    assert stats["connections_in_use"] == 0
    assert 1 <= bdb.server_backends() <= POOL_SIZE
    assert bdb.pool()["cl_active"] >= 1  # our idle client connection, held by PgBouncer only


@pytest.mark.pgbouncer
@pytest.mark.parametrize("driver", ["psycopg2", "psycopg"])
def test_a_pooler_behind_a_shared_strategy_is_named_once(
    bdb: BouncedDb, driver: str, caplog: pytest.LogCaptureFixture
) -> None:
    """PgBouncer on a port the URL does not give away: the first connection finds it."""
    url = bdb.url(driver, flag=False)  # no ?pgbouncer=true, a free port: auto says shared
    mgr = ExecutionConnectionManager(url, max_connections=2, pool_timeout=10)
    try:
        with caplog.at_level(logging.WARNING, logger="langgraph_scoped_conn"):
            for _ in range(3):
                with lsc.ExecutionScope(manager=mgr):
                    engine = lsc.get_scoped_engine(manager=mgr)
                    with engine.connect() as conn:
                        conn.execute(text("select 1"))
        warnings = [r.getMessage() for r in caplog.records if "connection pooler" in r.getMessage()]
        assert len(warnings) == 1, warnings
        assert "strategy='pooler'" in warnings[0] and ROLE_PASSWORD not in warnings[0]
        row = mgr.get_stats()["pools"][0]
        assert row["strategy"] == "shared" and row["pooler_detected"] is True
    finally:
        mgr.close()


def test_a_direct_server_is_not_taken_for_a_pooler(
    pg_db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    mgr = ExecutionConnectionManager(pg_db.url, max_connections=1)
    try:
        with (
            caplog.at_level(logging.WARNING),
            lsc.ExecutionScope(manager=mgr),
            lsc.get_scoped_engine(manager=mgr).connect() as conn,
        ):
            conn.execute(text("select 1"))
        assert mgr.get_stats()["pools"][0]["pooler_detected"] is False
        assert not [r for r in caplog.records if "connection pooler" in r.getMessage()]
    finally:
        mgr.close()


@pytest.mark.pgbouncer
@pytest.mark.parametrize("threshold", ["package default", 5])
def test_psycopg3_prepared_statements_are_off_behind_the_pooler(
    bdb: BouncedDb, threshold: Any
) -> None:
    """Control: with psycopg's own default (prepare from the 5th run), PgBouncer breaks it.

    A statement psycopg prepared lives on one server connection; the client keeps
    using its name after PgBouncer hands the next transaction to another one (here
    forced with the admin command RECONNECT, as server_lifetime would do).
    """
    options: dict[str, Any] = {}
    if threshold != "package default":
        options["engine_options"] = {"connect_args": {"prepare_threshold": threshold}}
    mgr = ExecutionConnectionManager(bdb.url("psycopg"), max_connections=4, **options)
    query = text("select count(*) from orders where customer_id = 7")

    def workload() -> int:
        with engine.connect() as conn:
            for _ in range(6):  # above psycopg's default prepare_threshold of 5
                assert conn.execute(query).scalar_one() == 10
                conn.commit()
            prepared = conn.execute(text("select count(*) from pg_prepared_statements"))
            count = int(prepared.scalar_one())
            conn.commit()
            bdb.bouncer.show(f"RECONNECT {bdb.db.name}", user=ROLE, password=ROLE_PASSWORD)
            assert conn.execute(query).scalar_one() == 10
            conn.commit()
            return count

    try:
        with lsc.ExecutionScope(manager=mgr):
            engine = lsc.create_execution_scoped_engine_sync()
            if threshold == "package default":
                assert workload() == 0  # asked of the server: nothing was prepared there
            else:
                with pytest.raises(DBAPIError, match=r"prepared statement .* does not exist"):
                    workload()
    finally:
        mgr.close()
    assert bdb.server_backends() <= POOL_SIZE


@pytest.mark.pgbouncer
def test_transaction_local_settings_do_not_leak_through_the_pooler(
    bdb: BouncedDb, pooler_manager: ExecutionConnectionManager
) -> None:
    with lsc.ExecutionScope(manager=pooler_manager):
        ro = lsc.create_execution_scoped_sql_database_sync(read_only=True, statement_timeout=1.5)
        assert ro.run("select current_setting('transaction_read_only')") == "[('on',)]"
        assert ro.run("select current_setting('statement_timeout')") == "[('1500ms',)]"
        with pytest.raises(UnsafeQueryError):
            ro.run("update customers set city = 'Rome' where id = 1")
    with lsc.ExecutionScope(manager=pooler_manager):
        rw = lsc.create_execution_scoped_sql_database_sync()
        # a later execution, on whatever server connection PgBouncer picks, sees defaults
        for _ in range(POOL_SIZE * 2):
            assert rw.run("select current_setting('transaction_read_only')") == "[('off',)]"
            assert rw.run("select current_setting('statement_timeout')") == "[('0',)]"
        rw.run("update customers set city = 'Rome' where id = 1")
    assert bdb.db.query("select city from customers where id = 1") == [("Rome",)]


# -- many processes through PgBouncer ---------------------------------------------------------

WORKERS = 4
RUNS = 160  # K: K/4 per worker
PER_WORKER_BUDGET = 4  # 16 client connections in all, against a server pool of 3
PER_WORKER_CONCURRENCY = 8


class _Sampler:
    """Peak server backends (pg_stat_activity) and peak PgBouncer clients, on a thread."""

    def __init__(self, bdb: BouncedDb) -> None:
        self.bdb = bdb
        self.peak_server = 0
        self.peak_clients = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        admin = self.bdb.db.server.admin()
        try:
            with admin.cursor() as cur:
                while not self._stop.is_set():
                    cur.execute(
                        "select count(*) from pg_stat_activity where usename = %s "
                        "and datname = %s and backend_type = 'client backend'",
                        (ROLE, self.bdb.db.name),
                    )
                    self.peak_server = max(self.peak_server, int(cur.fetchone()[0]))
                    pool = self.bdb.pool()
                    self.peak_clients = max(
                        self.peak_clients, int(pool["cl_active"]) + int(pool["cl_waiting"])
                    )
                    self.samples += 1
                    self._stop.wait(0.01)
        finally:
            admin.close()

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


@pytest.mark.pgbouncer
@pytest.mark.slow
@pytest.mark.parametrize("driver", ["psycopg2", "psycopg"])
def test_four_processes_share_a_small_pgbouncer_pool(bdb: BouncedDb, driver: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(WORKERS + 1)
    results = ctx.Queue()
    url = bdb.url(driver)
    procs = [
        ctx.Process(
            target=run_worker,
            args=(
                w,
                url,
                RUNS // WORKERS,
                PER_WORKER_CONCURRENCY,
                PER_WORKER_BUDGET,
                barrier,
                results,
            ),
            name=f"lsc-bouncer-worker-{w}",
        )
        for w in range(WORKERS)
    ]
    reports: list[dict[str, Any]] = []
    try:
        for p in procs:
            p.start()
        with _Sampler(bdb) as sampler:
            barrier.wait(timeout=180)  # every worker has imported, warmed up and connected
            reports = [results.get(timeout=300) for _ in procs]
        for p in procs:
            p.join(timeout=60)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=10)
    assert [p.exitcode for p in procs] == [0] * WORKERS
    for report in sorted(reports, key=lambda r: r["worker"]):
        assert report["errors"] == {}, f"worker {report['worker']} failed: {report['errors']}"
        assert report["ok"] == RUNS // WORKERS, report
        assert report["wrong"] == 0
        assert report["strategy"] == "pooler"
        assert report["active_executions"] == 0
        assert report["connections_in_use"] == 0
        assert report["tracked_runs"] == 0
        assert 1 <= report["peak_open"] <= PER_WORKER_BUDGET
    assert len({r["pid"] for r in reports}) == WORKERS
    assert sampler.samples > 0
    # the real server never saw more backends than PgBouncer's pool ...
    assert 1 <= sampler.peak_server <= POOL_SIZE, sampler.peak_server
    # ... while PgBouncer served more client connections than that at once
    assert sampler.peak_clients > POOL_SIZE, sampler.peak_clients
    # the workers' managers closed their client connections when they finished
    deadline = time.monotonic() + 10
    while bdb.pool()["cl_active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert bdb.pool()["cl_active"] == 0
    assert bdb.server_backends() <= POOL_SIZE
