"""Database URLs (langgraph_scoped_conn.urls): parsing, the driver a bare ``postgresql://``
gets, and the schemes and URL objects accepted.

A URL that cannot be used is refused without showing its password; ``postgres://`` and
``sqlalchemy.engine.URL`` objects work; psycopg 3 through its own SQLAlchemy URL; a bare URL
gets psycopg 3 when it is installed, else psycopg2; an explicit driver is kept.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

import langgraph_scoped_conn as lsc
from langgraph_scoped_conn import ExecutionConnectionManager
from langgraph_scoped_conn.errors import ConfigurationError, ScopeClosedError
from tests.conftest import (
    Database,
    backend_pid,
    eventually,
    live_pids,
    run_fresh,
    uninstall_default,
)

LOGGER = "langgraph_scoped_conn"
pytestmark = pytest.mark.usefixtures("no_scoped_conn_env")  # no SCOPED_CONN_* options


# -- bad URLs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "named"),
    [
        ("postgresql://app:{pw}@127.0.0.1:notaport/db", "port that is not a number"),
        ("app:{pw}@127.0.0.1/db", "could not parse database URL"),
        ("://app:{pw}@127.0.0.1/db", "could not parse database URL"),
        ("postgresql+nodriver://app:{pw}@127.0.0.1/db", "no SQLAlchemy dialect/driver"),
    ],
)
def test_bad_urls_are_refused_without_showing_the_password(url: str, named: str) -> None:
    secret = f"Sekr1t-{uuid.uuid4().hex[:8]}"
    old = lsc.configure("postgresql://app@127.0.0.1:1/app")
    try:
        with pytest.raises(ConfigurationError) as caught:
            lsc.configure(url.format(pw=secret))
        assert named in str(caught.value)
        assert secret not in str(caught.value)
        assert secret not in repr(caught.value)
        assert lsc.get_connection_manager() is old
    finally:
        old.close()
        uninstall_default()


# -- schemes, URL objects and drivers ------------------------------------------------------


def test_postgres_scheme_and_url_objects_are_accepted(
    configure_default: Callable[..., ExecutionConnectionManager], pg_db: Database
) -> None:
    heroku_style = "postgres://" + pg_db.url.split("://", 1)[1]
    configure_default(heroku_style)
    url_object = make_url(pg_db.url)
    with lsc.ExecutionScope("schemes"):
        db = lsc.create_execution_scoped_sql_database_sync()
        assert db.run("select count(*) from customers") == "[(50,)]"
        # a sqlalchemy URL object keeps its password (str() of it would hide it)
        with lsc.create_execution_scoped_engine_sync(url_object).connect() as conn:
            assert backend_pid(conn) in live_pids(pg_db)
    assert lsc.get_connection_stats()["pools"][0]["url"].startswith("postgresql://")


def test_psycopg3_through_its_sqlalchemy_url(
    configure_default: Callable[..., ExecutionConnectionManager], pg_db: Database
) -> None:
    configure_default(pg_db.url_with("psycopg"), max_connections=3)
    with lsc.ExecutionScope("pg3"):
        db = lsc.create_execution_scoped_sql_database_sync()
        assert db.run("select count(*) from orders") == "[(500,)]"
        engine = lsc.create_execution_scoped_engine_sync()
        assert engine.dialect.driver == "psycopg"
        leaked = engine.connect()
        pid = backend_pid(leaked)
        assert live_pids(pg_db)[pid] == "idle in transaction"
    stats = lsc.get_connection_stats()
    assert stats["leaks_reclaimed"] == 1
    assert stats["pools"][0]["url"].startswith("postgresql+psycopg://")
    eventually(lambda: pid not in live_pids(pg_db), "the leaked psycopg 3 backend is gone")
    with pytest.raises(ScopeClosedError):
        leaked.execute(text("select 1"))


# -- the driver of a bare postgresql:// URL ------------------------------------------------


def bare(url: str) -> str:
    """``pg_db.url`` (``postgresql+psycopg2://``) with no driver in its scheme."""
    return "postgresql://" + url.split("://", 1)[1]


def test_bare_url_uses_psycopg3_when_it_is_installed(
    configure_default: Callable[..., ExecutionConnectionManager],
    pg_db: Database,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    mgr = configure_default(bare(pg_db.url))
    with lsc.ExecutionScope("bare"), lsc.create_execution_scoped_engine_sync().connect() as conn:
        assert conn.execute(text("select count(*) from customers")).scalar_one() == 50
        assert conn.engine.dialect.driver == "psycopg"
    pool = mgr.get_stats()["pools"][0]
    assert pool["driver"] == "psycopg"
    assert pool["url"].startswith("postgresql://")  # shown as given
    created = [r.getMessage() for r in caplog.records if "pool for" in r.getMessage()]
    assert len(created) == 1 and "driver psycopg" in created[0], created


def test_explicit_driver_is_kept_and_shown(
    configure_default: Callable[..., ExecutionConnectionManager], pg_db: Database
) -> None:
    mgr = configure_default(pg_db.url)  # postgresql+psycopg2://
    with lsc.ExecutionScope("explicit"), lsc.create_execution_scoped_engine_sync().connect() as c:
        c.execute(text("select 1"))
    assert [p["driver"] for p in mgr.get_stats()["pools"]] == ["psycopg2"]


FALLBACK = """
import json, sys
sys.modules["psycopg"] = None  # psycopg 3 is not installed
import langgraph_scoped_conn as lsc
from sqlalchemy import text

out = {}
for scheme in ("postgresql", "postgres"):
    mgr = lsc.configure(scheme + "://" + sys.argv[1])
    with lsc.ExecutionScope("fallback-" + scheme):
        with lsc.create_execution_scoped_engine_sync().connect() as conn:
            count = conn.execute(text("select count(*) from customers")).scalar_one()
    out[scheme] = [count, mgr.get_stats()["pools"][0]["driver"]]
    mgr.close()
print(json.dumps(out))
"""


def test_bare_url_falls_back_to_psycopg2_without_psycopg3(pg_db: Database) -> None:
    result = run_fresh(FALLBACK, pg_db.url.split("://", 1)[1])
    assert result.returncode == 0, result.stderr
    assert "No module named 'psycopg'" not in result.stderr
    lines = result.stdout.strip().splitlines()
    assert json.loads(lines[-1]) == {"postgresql": [50, "psycopg2"], "postgres": [50, "psycopg2"]}
