"""Options of a connection manager (langgraph_scoped_conn.settings): validation, defaults and
``SCOPED_CONN_*`` variables.

A bad or absurd option is refused by name and the working default stays; options come
from the environment and arguments win; no URL anywhere is named with the ways to give one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import text

import langgraph_scoped_conn as lsc
from langgraph_scoped_conn import ExecutionConnectionManager
from langgraph_scoped_conn.errors import ConfigurationError
from tests.conftest import Database, installed_default, uninstall_default

pytestmark = pytest.mark.usefixtures("no_scoped_conn_env")  # no SCOPED_CONN_* options


# -- bad and absurd options ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"max_conections": 5}, "unknown option(s) max_conections"),
        ({"strategy": "pooled"}, "strategy='pooled' is not known"),
        ({"max_connections": 0}, "max_connections=0"),
        ({"max_connections": -3}, "max_connections=-3"),
        ({"max_connections": True}, "max_connections=True"),
        ({"max_connections": "10"}, "max_connections='10'"),
        ({"max_connections": 2.5}, "max_connections=2.5"),
        ({"max_connections_per_execution": 0}, "max_connections_per_execution=0"),
        ({"pool_timeout": 0}, "pool_timeout=0"),
        ({"pool_timeout": -1.0}, "pool_timeout=-1.0"),
        ({"pool_timeout": math.nan}, "pool_timeout=nan"),
        ({"pool_timeout": math.inf}, "pool_timeout=inf"),
        ({"pool_timeout": "20"}, "pool_timeout='20'"),
        ({"max_scope_lifetime": 0}, "max_scope_lifetime=0"),
        ({"statement_timeout": -5}, "statement_timeout=-5"),
        ({"pool_recycle": 0}, "pool_recycle=0"),
        ({"engine_options": {"pool_size": 50}}, "engine_options may not set pool_size"),
        ({"engine_options": "pool_size=50"}, "engine_options must be a dict"),
        ({"application_name": "x" * 41}, "application_name"),
    ],
)
def test_bad_options_are_named_and_keep_the_old_default(
    options: dict[str, Any], named: str
) -> None:
    old = lsc.configure("postgresql://app@127.0.0.1:1/app")  # nothing connects yet
    try:
        with pytest.raises(ConfigurationError) as caught:
            lsc.configure("postgresql://app@127.0.0.1:1/app", **options)
        assert named in str(caught.value)
        assert isinstance(caught.value, ValueError)
        assert lsc.get_connection_manager() is old
        with lsc.ExecutionScope("still-open"):
            pass
    finally:
        old.close()
        uninstall_default()


@pytest.mark.parametrize(
    ("options", "named"),
    [
        # reproductions: each was accepted, then broke every query or the pool later
        ({"statement_timeout": 3e6}, "statement_timeout=3000000.0"),
        ({"pool_timeout": 1e300}, "pool_timeout=1e+300"),
        ({"max_scope_lifetime": 1e12}, "max_scope_lifetime=1000000000000.0"),
        ({"max_connections": 10**6}, "max_connections=1000000"),
        ({"engine_options": {"pool_timeout": 1e300}}, "engine_options may not set pool_timeout"),
        ({"engine_options": {"pool_pre_ping": False}}, "engine_options may not set pool_pre_ping"),
        ({"engine_options": {"pool_recycle": -1}}, "engine_options may not set pool_recycle"),
        (
            {"engine_options": {"pool_reset_on_return": None}},
            "engine_options may not set pool_reset_on_return",
        ),
    ],
)
def test_absurd_settings_are_refused_at_configure(
    options: dict[str, Any],
    named: str,
    pg_db: Database,
    configure_default: Callable[..., ExecutionConnectionManager],
) -> None:
    kept = configure_default()
    with pytest.raises(ConfigurationError) as caught:
        lsc.configure(pg_db.url, **options)
    assert named in str(caught.value), str(caught.value)
    assert installed_default() is kept  # nothing changed: the old manager stays
    with lsc.ExecutionScope():
        assert lsc.get_scoped_sql_database(read_only=True).run("select 1") == "[(1,)]"


# -- no URL anywhere -----------------------------------------------------------------------


def test_no_url_anywhere_is_a_clear_error(
    configure_default: Callable[..., ExecutionConnectionManager],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    lsc.configure()  # options only: a URL may still come with each call
    try:
        with lsc.ExecutionScope("nourl"):
            with pytest.raises(ConfigurationError, match="no database URL") as caught:
                lsc.create_execution_scoped_engine_sync()
            assert "configure(database_url=...)" in str(caught.value)
            assert "DATABASE_URL" in str(caught.value)
    finally:
        lsc.get_connection_manager().close()
        uninstall_default()


# -- options from the environment ----------------------------------------------------------


def test_options_come_from_the_environment_and_arguments_win(
    configure_default: Callable[..., ExecutionConnectionManager],
    pg_db: Database,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SCOPED_CONN_MAX_CONNECTIONS", "4")
    monkeypatch.setenv("SCOPED_CONN_STRATEGY", "per_execution")
    monkeypatch.setenv("SCOPED_CONN_READ_ONLY", "true")
    monkeypatch.setenv("SCOPED_CONN_MAX_SCOPE_LIFETIME", "none")
    monkeypatch.setenv("SCOPED_CONN_POOL_TIMEOUT", "2.5")
    monkeypatch.setenv("SCOPED_CONN_APPLICATION_NAME", "from-env")
    monkeypatch.setenv("SCOPED_CONN_ENGINE_OPTIONS", '{"echo_pool": false}')
    monkeypatch.setenv("SCOPED_CONN_DEBUG_TOKEN", "not-a-settings-field")
    s = configure_default().settings
    assert (s.max_connections, s.strategy, s.read_only) == (4, "per_execution", True)
    assert s.max_scope_lifetime is None
    assert s.pool_timeout == 2.5
    assert s.application_name == "from-env"
    assert dict(s.engine_options) == {"echo_pool": False}
    # the environment's values are used: a per-execution engine names its execution
    with lsc.ExecutionScope("env-run"), lsc.create_execution_scoped_engine_sync().connect() as c:
        assert c.execute(text("show application_name")).scalar_one() == "from-env:env-run"
    # explicit arguments win over the environment
    s = configure_default(max_connections=3, strategy="shared", read_only=False).settings
    assert (s.max_connections, s.strategy, s.read_only) == (3, "shared", False)
    assert s.application_name == "from-env"


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("MAX_CONNECTIONS", "four", "a whole number"),
        ("MAX_CONNECTIONS", "0", "at least 1"),
        ("POOL_TIMEOUT", "soon", "a number of seconds"),
        ("READ_ONLY", "maybe", "true or false"),
        ("STRATEGY", "fast", "one of auto, shared, per_execution, pooler"),
        ("STATEMENT_TIMEOUT", "-1", "above 0"),
        ("ENGINE_OPTIONS", "echo=True", "a JSON object"),
        ("ENGINE_OPTIONS", '{"pool_size": 3}', "may not set pool_size"),
    ],
)
def test_a_bad_environment_value_names_the_variable(
    configure_default: Callable[..., ExecutionConnectionManager],
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    value: str,
    expected: str,
) -> None:
    kept = configure_default()
    monkeypatch.setenv(f"SCOPED_CONN_{name}", value)
    with pytest.raises(ConfigurationError) as caught:
        lsc.configure(kept.settings.database_url)
    message = str(caught.value)
    assert f"SCOPED_CONN_{name}" in message, message
    assert expected in message, message
    assert installed_default() is kept  # the old manager stays


def test_a_misspelled_variable_is_reported_and_others_are_left_alone(
    configure_default: Callable[..., ExecutionConnectionManager],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("SCOPED_CONN_MAX_CONECTIONS", "4")
    monkeypatch.setenv("SCOPED_CONN_DEBUG_TOKEN", "t0ken")
    monkeypatch.setenv("SCOPED_CONN_SOMETHING_OF_MY_OWN", "1")
    mgr = configure_default()
    assert mgr.settings.max_connections == 10  # the misspelled one is not used
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "SCOPED_CONN_MAX_CONECTIONS" in warnings[0]
    assert "SCOPED_CONN_MAX_CONNECTIONS" in warnings[0]
    assert "t0ken" not in caplog.text
