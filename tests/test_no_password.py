"""No password in any output: logs, stats, reprs, HTTP bodies and exceptions.

The server uses scram password authentication.  A login role with an awkward
password (URL-special characters) does the work; every log record (DEBUG, every
logger, SQLAlchemy's echo and pool loggers included), everything printed, every
repr, stats payload, HTTP body and exception raised along the way is scanned for
that password, for the wrong password of a failed login, and for the superuser's.
"""

from __future__ import annotations

import json
import logging
import threading
import traceback
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, quote_plus

import pytest
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import tool
from langgraph.graph import END, START, StateGraph
from sqlalchemy import text
from typing_extensions import TypedDict

import langgraph_scoped_conn as lsc
from langgraph_scoped_conn.registry import ExecutionConnectionManager
from tests.conftest import Database, assert_clean
from tests.pgcluster import SUPERUSER_PASSWORD, free_port


@dataclass
class Secrets:
    """The passwords that must never show, and everything collected to scan."""

    role: str
    password: str
    url: str
    wrong_password: str = "Wr0ng:p@ss/w%rd?#x"
    collected: list[tuple[str, str]] = field(default_factory=list)

    def forms(self) -> set[str]:
        out = set()
        for pw in (self.password, self.wrong_password, SUPERUSER_PASSWORD):
            out |= {pw, quote(pw, safe=""), quote_plus(pw)}
        return out

    def add(self, what: str, value: object) -> None:
        self.collected.append((what, value if isinstance(value, str) else repr(value)))

    def add_error(self, what: str, exc: BaseException) -> None:
        self.add(f"{what}: str", str(exc))
        self.add(f"{what}: repr", repr(exc))
        self.add(f"{what}: traceback", "".join(traceback.format_exception(exc)))

    def fragments(self) -> set[str]:
        """Every 8-character piece of every password: a partial leak is a leak too."""
        return {f[i : i + 8] for f in self.forms() for i in range(len(f) - 7)}

    def assert_clean(self) -> None:
        assert len(self.collected) > 50, "too little was scanned"
        pieces = self.fragments()
        for what, value in self.collected:
            for piece in pieces:
                assert piece not in value, (
                    f"a password (piece {piece!r}) leaked into {what}: {value[:300]!r}"
                )


@pytest.fixture
def secrets(pg_db: Database) -> Iterator[Secrets]:
    role = f"lsc_app_{uuid.uuid4().hex[:8]}"
    password = f"S3cret:p@ss/w%rd?#{uuid.uuid4().hex[:6]}"
    admin = pg_db.server.admin(pg_db.name)
    with admin.cursor() as cur:
        cur.execute(f"create role {role} login password %s", (password,))
        cur.execute(f"grant select on all tables in schema public to {role}")
    admin.close()
    base = pg_db.url.split("@", 1)[1]  # host:port/database
    url = f"postgresql+psycopg2://{role}:{quote(password, safe='')}@{base}"
    found = Secrets(role, password, url)
    try:
        yield found
    finally:
        admin = pg_db.server.admin(pg_db.name)
        with admin.cursor() as cur:
            cur.execute(
                "select pg_terminate_backend(pid) from pg_stat_activity where usename = %s",
                (role,),
            )
            cur.execute(f"drop owned by {role}")
            cur.execute(f"drop role if exists {role}")
        admin.close()


class _State(TypedDict, total=False):
    query: str
    answer: str


def _graph(manager: ExecutionConnectionManager) -> Any:
    @tool
    def sql(query: str, config: RunnableConfig) -> str:
        """Run one read-only query."""
        db = lsc.get_scoped_sql_database(config, manager=manager, read_only=True)
        return str(db.run_no_throw(query))

    def node(state: _State, config: RunnableConfig) -> _State:
        engine = lsc.get_scoped_engine(config, manager=manager)
        leaked = engine.connect()  # left open on purpose: the leak report is logged
        leaked.execute(text("select 1"))
        return {"answer": sql.invoke({"query": state["query"]}, config)}

    builder = StateGraph(_State)
    builder.add_node("ask", node)
    builder.add_edge(START, "ask")
    builder.add_edge("ask", END)
    return lsc.with_scoped_connections(builder.compile(), manager=manager)


def test_no_password_anywhere(
    pg_db: Database,
    secrets: Secrets,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    for name in ("sqlalchemy.engine", "sqlalchemy.pool", "langgraph_scoped_conn"):
        caplog.set_level(logging.DEBUG, logger=name)
    mgr = ExecutionConnectionManager(
        secrets.url,
        max_connections=2,
        pool_timeout=0.5,
        debug=True,  # leak reports carry the acquiring stack
        tag_connections=True,
        engine_options={"echo": "debug", "echo_pool": "debug"},
    )
    try:
        _exercise(mgr, pg_db, secrets)
        assert_clean(mgr)
    finally:
        mgr.close()
    out = capsys.readouterr()
    secrets.add("stdout", out.out)
    secrets.add("stderr", out.err)
    for record in caplog.records:
        secrets.add(f"log {record.name}", record.getMessage())
        if record.exc_info and record.exc_info[1] is not None:
            secrets.add_error(f"log {record.name} exc_info", record.exc_info[1])
    assert any(r.name.startswith("sqlalchemy.engine") for r in caplog.records)
    # SQLAlchemy names a pool's logger after the pool class (here BudgetPool)
    assert any(r.name.endswith("Pool") for r in caplog.records), {r.name for r in caplog.records}
    assert any("still checked out" in r.getMessage() for r in caplog.records)
    secrets.assert_clean()


def _exercise(mgr: ExecutionConnectionManager, pg_db: Database, secrets: Secrets) -> None:
    from starlette.testclient import TestClient

    from langgraph_scoped_conn.http import create_app

    graph = _graph(mgr)
    # a normal run, a refusal, a database error; each leaks a connection that is reclaimed
    for query in ("select count(*) from orders", "DROP TABLE orders", "select nope"):
        out = graph.invoke({"query": query})
        secrets.add(f"answer to {query}", out["answer"])
    assert graph.invoke({"query": "select 1"})["answer"] == "[(1,)]"

    with lsc.ExecutionScope("reprs", manager=mgr) as scope:
        engine = lsc.get_scoped_engine(manager=mgr)
        db = lsc.get_scoped_sql_database(manager=mgr, read_only=True)
        execution = mgr.execution("reprs")
        handle = mgr.pool_for()
        for name, obj in {
            "manager": mgr,
            "settings": mgr.settings,
            "scope": scope,
            "execution": execution,
            "engine": engine,
            "engine.url": engine.url,
            "pool handle": handle,
            "pool": handle.engine.pool,
            "sql database": db,
            "handler": lsc.ScopedConnectionHandler(mgr),
        }.items():
            secrets.add(f"repr({name})", repr(obj))
            secrets.add(f"str({name})", str(obj))
        secrets.add("public_dict", json.dumps(mgr.settings.public_dict()))
        secrets.add("table info", db.get_table_info())
        secrets.add("stats during a run", json.dumps(mgr.get_stats()))

        # the budget runs out: the error names the holders, not the URL
        with engine.connect(), engine.connect():
            caught: list[BaseException] = []

            def other() -> None:
                try:
                    with lsc.ExecutionScope("starved", manager=mgr):
                        lsc.get_scoped_engine(manager=mgr).connect()
                except BaseException as exc:
                    caught.append(exc)

            t = threading.Thread(target=other)
            t.start()
            t.join(30)
            assert isinstance(caught[0], lsc.ConnectionBudgetExceededError)
            secrets.add_error("budget exceeded", caught[0])
    secrets.add("stats after", json.dumps(mgr.get_stats()))

    # a tracked resource whose close() fails with a message holding a DSN
    class Client:
        def close(self) -> None:
            raise ConnectionError(f"could not close session on {secrets.url}")

    with lsc.ExecutionScope(manager=mgr):
        lsc.track_connection(Client())

    # an execution id factory that fails with a DSN in its message
    def bad_id(run: Any) -> str:
        raise RuntimeError(f"lookup failed for {secrets.url}")

    broken = lsc.with_scoped_connections(_plain_graph(mgr), manager=mgr, execution_id=bad_id)
    with pytest.raises(lsc.ScopeUnavailableError) as unavailable:
        broken.invoke({"query": "x"})
    secrets.add_error("scope unavailable", unavailable.value)

    # HTTP bodies
    client = TestClient(create_app(mgr, token="t0ken"))
    for path in (
        "/api/memory/debug/connections/status",
        "/api/memory/debug/connections/metrics",
    ):
        response = client.get(path)
        assert response.status_code == 200, response.text
        secrets.add(f"GET {path}", response.text)
    response = client.post(
        "/api/memory/debug/connections/cleanup",
        json={"execution_id": "nope"},
        headers={"Authorization": "Bearer t0ken"},
    )
    secrets.add("POST cleanup", response.text)

    # connection failures: wrong password, closed port, bad URLs
    wrong = secrets.url.replace(quote(secrets.password, safe=""), quote(secrets.wrong_password))
    for name, url in {
        "wrong password": wrong,
        "closed port": _with_port(secrets.url, free_port()),
    }.items():
        bad = ExecutionConnectionManager(url, max_connections=1)
        try:
            with lsc.ExecutionScope(manager=bad):
                with pytest.raises(Exception) as failed:
                    lsc.get_scoped_engine(manager=bad).connect()
                secrets.add_error(name, failed.value)
                secrets.add(f"{name} stats", json.dumps(bad.get_stats()))
                secrets.add(f"{name} repr", repr(bad))
        finally:
            bad.close()
    assert "password authentication failed" in str(
        next(v for w, v in secrets.collected if w == "wrong password: str")
    )
    for name, url in {
        "unparseable": f"postgresql://{secrets.role}:{secrets.password}@host:notaport/db",
        "unknown driver": f"postgresql+nodriver://{secrets.role}:{secrets.password}@h/db",
        # a password with "@", "/", "?" and "#" left un-encoded: SQLAlchemy would read its
        # tail as the host, and an earlier redaction showed that tail
        "unencoded": f"postgresql://{secrets.role}:{secrets.password}@127.0.0.1:5432/db",
        "bad option": secrets.url,
    }.items():
        with pytest.raises(lsc.ConfigurationError) as bad_config:
            options = {"max_connections": 0} if name == "bad option" else {}
            ExecutionConnectionManager(url, **options)
        secrets.add_error(name, bad_config.value)


def _plain_graph(manager: ExecutionConnectionManager) -> Any:
    def node(state: _State, config: RunnableConfig) -> _State:
        lsc.get_scoped_engine(config, manager=manager)
        return {"answer": "unreachable"}

    builder = StateGraph(_State)
    builder.add_node("n", node)
    builder.add_edge(START, "n")
    builder.add_edge("n", END)
    return builder.compile()


def _with_port(url: str, port: int) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).set(port=port).render_as_string(hide_password=False)
