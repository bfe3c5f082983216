"""Configuration: the driver a bare URL gets, options from the environment, a second
configure() over live scopes, and what the ``execution_id=`` callable is given.

Everything runs against the real PostgreSQL of the test session.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import pytest
from langchain_core.runnables import RunnableConfig
from langgraph.graph import END, START, StateGraph
from sqlalchemy import text

import langgraph_scoped_conn as lsc
from langgraph_scoped_conn import ExecutionConnectionManager
from langgraph_scoped_conn.errors import ConfigurationError
from tests.conftest import Database, assert_clean, installed_default, uninstall_default

LOGGER = "langgraph_scoped_conn"
ROOT = Path(__file__).resolve().parent.parent


def bare(url: str) -> str:
    """``pg_db.url`` (``postgresql+psycopg2://``) with no driver in its scheme."""
    return "postgresql://" + url.split("://", 1)[1]


@pytest.fixture(autouse=True)
def _no_scoped_conn_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests start from an environment without SCOPED_CONN_* options."""
    for name in list(os.environ):
        if name.startswith("SCOPED_CONN_"):
            monkeypatch.delenv(name)


# -- the driver of a bare postgresql:// URL ----------------------------------------------


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


def test_bare_url_falls_back_to_psycopg2_without_psycopg3(pg_db: Database) -> None:
    result = run_fresh(FALLBACK, pg_db.url.split("://", 1)[1])
    assert result.returncode == 0, result.stderr
    assert "No module named 'psycopg'" not in result.stderr
    lines = result.stdout.strip().splitlines()
    assert json.loads(lines[-1]) == {"postgresql": [50, "psycopg2"], "postgres": [50, "psycopg2"]}


FIRST_USE = """
import json, sys, warnings
warnings.simplefilter("error", DeprecationWarning)  # langchain-community's sunset warning too
import langgraph_scoped_conn as lsc
loaded = "langgraph_scoped_conn.sql_database" in sys.modules
manager = lsc.configure(sys.argv[1], max_connections=2)
entry = sys.argv[2]
with lsc.ExecutionScope():
    if entry == "get_scoped_sql_database":
        db = lsc.get_scoped_sql_database()
    elif entry == "get_scoped_sql_database_read_only":
        db = lsc.get_scoped_sql_database(read_only=True)
    else:
        db = lsc.create_execution_scoped_sql_database_sync()
    out = db.run("select count(*) from customers")
manager.close()
print(json.dumps([loaded, out]))
"""


@pytest.mark.parametrize(
    "entry",
    [
        "get_scoped_sql_database",
        "get_scoped_sql_database_read_only",
        "create_execution_scoped_sql_database_sync",
    ],
)
def test_the_first_sql_database_of_a_fresh_process(pg_db: Database, entry: str) -> None:
    # nothing has imported the SQLDatabase adapter yet: the lazy import path itself runs
    result = run_fresh(FIRST_USE, pg_db.url, entry)
    assert result.returncode == 0, result.stderr
    loaded, out = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded is False, "the adapter was imported before its first use"
    assert out == "[(50,)]"


# -- options from the environment --------------------------------------------------------


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


def test_the_default_manager_reads_the_environment_on_first_use(
    pg_db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SCOPED_CONN_DATABASE_URL", pg_db.url)
    monkeypatch.setenv("SCOPED_CONN_MAX_CONNECTIONS", "2")
    monkeypatch.setenv("SCOPED_CONN_DEBUG", "yes")
    previous = uninstall_default()
    try:
        mgr = lsc.get_connection_manager()
        try:
            assert mgr.settings.max_connections == 2
            assert mgr.settings.debug is True
            with lsc.ExecutionScope("first-use"):
                db = lsc.create_execution_scoped_sql_database_sync()
                assert db.run("select count(*) from customers") == "[(50,)]"
            assert mgr.get_stats()["max_connections"] == 2
            assert_clean(mgr)
        finally:
            mgr.close()
            uninstall_default(mgr)
    finally:
        if previous is not None:
            lsc.manager.swap_default_manager(previous)


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


# -- a second configure() over live scopes -----------------------------------------------


def test_reconfiguring_over_live_scopes_names_both_call_sites(
    pg_db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    made: list[ExecutionConnectionManager] = []
    try:
        made.append(lsc.configure(pg_db.url))
        made.append(lsc.configure(pg_db.url))  # no live scope: nothing to say
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        first_line = inspect.currentframe().f_lineno - 2  # type: ignore[union-attr]
        live = made[-1].open_execution("still-running")
        made.append(lsc.configure(pg_db.url))
        second_line = inspect.currentframe().f_lineno - 1  # type: ignore[union-attr]
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        message = warnings[0].getMessage()
        assert f"test_config.py:{first_line}" in message, message
        assert f"test_config.py:{second_line}" in message, message
        assert "still-running" in message, message
        assert live.state != "open"  # released with the manager it belonged to
    finally:
        for mgr in made:
            mgr.close()
            uninstall_default(mgr)


# -- the execution_id= callable ----------------------------------------------------------


class State(TypedDict):
    n: int


@dataclass
class Context:
    tenant: str


def recording_graph(seen: list[list[str]]) -> Any:
    def node(state: State, config: RunnableConfig) -> dict[str, int]:
        with lsc.get_scoped_engine(config).connect() as conn:
            conn.execute(text("select 1"))
        seen.append(list(lsc.get_connection_stats()["executions"]))
        return {"n": state["n"] + 1}

    builder = StateGraph(State, context_schema=Context)
    builder.add_node("node", node)
    builder.add_edge(START, "node")
    builder.add_edge("node", END)
    return builder.compile()


@pytest.fixture
def runs() -> Iterator[list[dict[str, Any]]]:
    yield []


def test_execution_id_callable_gets_what_langchain_hands_the_run(
    manager: ExecutionConnectionManager, runs: list[dict[str, Any]]
) -> None:
    """The callable gets the run's metadata, tags and run id (what the callback is given).

    Values for the id go in ``config["metadata"]``; LangGraph copies ``thread_id`` and
    its other coordinates from ``configurable`` into the metadata, and the callable
    finds those under ``configurable`` too.
    """

    def guide_id(run: Any) -> str:
        runs.append(dict(run))
        return f"{run['metadata']['user_id']}_{run['metadata']['conversation_id']}"

    seen: list[list[str]] = []
    graph = lsc.with_scoped_connections(recording_graph(seen), execution_id=guide_id)
    run_id = uuid.uuid4()
    graph.invoke(
        {"n": 0},
        {
            "run_id": run_id,
            "configurable": {"thread_id": "t-1", "db": object()},
            "metadata": {"user_id": "u-7", "conversation_id": 42, "source": "test"},
            "tags": ["t1"],
        },
        context=Context("acme"),
    )
    assert seen == [["u-7_42"]]
    (run,) = runs
    assert run["run_id"] == run_id
    assert run["metadata"]["user_id"] == "u-7"
    assert run["metadata"]["conversation_id"] == 42
    assert run["metadata"]["source"] == "test"
    assert run["configurable"] == {"thread_id": "t-1"}  # only what the metadata carries
    assert "context" not in run  # the callback is not given the runtime context
    assert run["tags"] == ["t1"]


async def test_execution_id_callable_gets_the_metadata_under_ainvoke(
    manager: ExecutionConnectionManager, runs: list[dict[str, Any]]
) -> None:
    def guide_id(run: Any) -> str:
        runs.append(dict(run))
        return f"{run['metadata']['user_id']}_{run['metadata']['conversation_id']}"

    seen: list[list[str]] = []
    graph = lsc.with_scoped_connections(recording_graph(seen), execution_id=guide_id)
    config: RunnableConfig = {"metadata": {"user_id": "a", "conversation_id": "b"}}
    await graph.ainvoke({"n": 0}, config, context=Context("x"))
    async for _ in graph.astream({"n": 0}, {"metadata": {"user_id": "c", "conversation_id": 1}}):
        pass
    assert seen == [["a_b"], ["c_1"]]
    assert runs[0]["metadata"]["user_id"] == "a"
    manager.drain()


def test_execution_id_callable_that_raises_names_itself_and_the_keys(
    manager: ExecutionConnectionManager, caplog: pytest.LogCaptureFixture
) -> None:
    def thread_id(run: Any) -> str:
        return str(run["configurable"]["thread_id"])

    graph = lsc.with_scoped_connections(recording_graph([]), execution_id=thread_id)
    with pytest.raises(lsc.ScopeUnavailableError) as caught:
        graph.invoke({"n": 0}, {"metadata": {"user_id": "u", "conversation_id": "c"}})
    message = str(caught.value)
    assert "thread_id" in message and "KeyError" in message, message
    assert thread_id.__qualname__ in message, message
    assert "user_id" in message and "conversation_id" in message, message
    assert manager.get_stats()["scope_open_failures"] == 1
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(thread_id.__qualname__ in m for m in logged), logged


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
