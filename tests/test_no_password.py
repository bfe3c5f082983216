"""No password in any output: logs, stats, reprs, HTTP bodies and exceptions.

The server uses scram password authentication.  A login role with an awkward
password (URL-special characters) does the work; every log record (DEBUG, every
logger, SQLAlchemy's echo and pool loggers included), everything printed, every
repr, stats payload, HTTP body and exception raised along the way is scanned for
that password, for the wrong password of a failed login, and for the superuser's.

Then hypothesis generates passwords and writes each one in every form a password
takes (URL userinfo, ``?password=`` in any case, encoded or raw, after other
parameters, libpq keyword DSNs quoted or not) and scans the same outputs for it.
"""

from __future__ import annotations

import json
import logging
import threading
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, quote_plus, unquote

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import tool
from langgraph.graph import END, START, StateGraph
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from starlette.testclient import TestClient
from typing_extensions import TypedDict

import langgraph_scoped_conn as lsc
import langgraph_scoped_conn.redaction as lsc_redaction
import langgraph_scoped_conn.urls as lsc_urls
from langgraph_scoped_conn import ExecutionConnectionManager
from langgraph_scoped_conn.errors import ConfigurationError, ConnectionBudgetExceededError
from langgraph_scoped_conn.http import STATUS_PATH, create_app
from langgraph_scoped_conn.redaction import redact_url
from langgraph_scoped_conn.testing import SUPERUSER_PASSWORD, free_port
from tests.conftest import Database, assert_clean


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


def _graph(manager: lsc.ExecutionConnectionManager) -> Any:
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
    mgr = lsc.ExecutionConnectionManager(
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


def _exercise(mgr: lsc.ExecutionConnectionManager, pg_db: Database, secrets: Secrets) -> None:
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
        bad = lsc.ExecutionConnectionManager(url, max_connections=1)
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
            lsc.ExecutionConnectionManager(url, **options)
        secrets.add_error(name, bad_config.value)


def _plain_graph(manager: lsc.ExecutionConnectionManager) -> Any:
    def node(state: _State, config: RunnableConfig) -> _State:
        lsc.get_scoped_engine(config, manager=manager)
        return {"answer": "unreachable"}

    builder = StateGraph(_State)
    builder.add_node("n", node)
    builder.add_edge(START, "n")
    builder.add_edge("n", END)
    return builder.compile()


def _with_port(url: str, port: int) -> str:
    return make_url(url).set(port=port).render_as_string(hide_password=False)


# -- a role with a URL-special password, under both drivers ------------------------------


@pytest.fixture
def secret_role(pg_db: Database) -> Iterator[tuple[str, str]]:
    """A login role whose password has URL-special characters: (role, password)."""
    role = f"lsc_pw_{uuid.uuid4().hex[:8]}"
    password = f"P@ss:/w%rd?#-{uuid.uuid4().hex[:10]}"
    pg_db.query(f"create role {role} login password '{password}'")
    pg_db.query(f"grant select on customers, orders to {role}")
    try:
        yield role, password
    finally:
        pg_db.query(f'drop owned by {role}; drop role if exists "{role}"')


@pytest.mark.parametrize("driver", ["psycopg2", "psycopg"])
def test_password_never_appears_in_stats_reprs_logs_or_errors(
    configure_default: Callable[..., ExecutionConnectionManager],
    pg_db: Database,
    secret_role: tuple[str, str],
    caplog: pytest.LogCaptureFixture,
    driver: str,
) -> None:
    role, password = secret_role
    base = make_url(pg_db.url_with(driver))
    url = base.set(username=role, password=password).render_as_string(hide_password=False)
    assert quote(password, safe="") in url
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="sqlalchemy")
    caplog.set_level(logging.DEBUG, logger="langgraph_scoped_conn")
    texts: list[str] = []
    manager = configure_default(url, max_connections=2, pool_timeout=0.2)
    with lsc.ExecutionScope("secret-run") as scope:
        db = lsc.create_execution_scoped_sql_database_sync()
        assert db.run("select count(*) from customers") == "[(50,)]"
        engine = lsc.create_execution_scoped_engine_sync()
        held = [engine.connect(), engine.connect()]
        with lsc.ExecutionScope("starved"), pytest.raises(ConnectionBudgetExceededError) as budget:
            lsc.create_execution_scoped_engine_sync().connect()
        texts += [str(budget.value), repr(budget.value)]
        texts += [repr(x) for x in (manager, manager.settings, scope, engine, db, held[0])]
        texts += [repr(manager.settings.public_dict()), json.dumps(lsc.get_connection_stats())]
        texts.append(repr(manager.pool_for()))
        held[0].close()  # the other one leaks: its reclaim is logged
    texts.append(json.dumps(lsc.get_connection_stats()))
    # a wrong password and unparseable URLs
    wrong = base.set(username=role, password=password[::-1]).render_as_string(hide_password=False)
    with lsc.ExecutionScope("wrong-pw"), pytest.raises(OperationalError) as auth:
        lsc.create_execution_scoped_engine_sync(wrong).connect()
    assert "password authentication failed" in str(auth.value)
    texts += [str(auth.value), repr(auth.value)]
    for bad in (url.replace(f":{base.port}/", ":port/"), url.split("://", 1)[1]):
        with pytest.raises(ConfigurationError) as caught:
            ExecutionConnectionManager(bad)
        texts += [str(caught.value), repr(caught.value)]
    texts += [r.getMessage() for r in caplog.records]
    assert any("Created new connection" in r.getMessage() for r in caplog.records), (
        "SQLAlchemy's pool DEBUG log was not captured; the check would be vacuous"
    )
    everything = "\n".join(texts)
    for form in {password, quote(password, safe=""), quote(password), password[::-1]}:
        assert form not in everything
    assert "***" in everything


# -- the reported leaks, one test each ------------------------------------------------------


def _records(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(
        f"{r.name} {r.levelname} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records
    )


def test_a_query_password_never_shows_in_stats_reprs_or_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Reported: ``?password=`` showed in stats, reprs and "created shared pool for ..."."""
    caplog.set_level(logging.DEBUG)
    url = f"postgresql+psycopg2://u@127.0.0.1:{free_port()}/db?password=hunter2xyz"
    mgr = lsc.ExecutionConnectionManager(url, max_connections=1)
    try:
        handle = mgr.pool_for()
        shown = {
            "repr(manager)": repr(mgr),
            "repr(settings)": repr(mgr.settings),
            "repr(pool)": repr(handle),
            "stats": json.dumps(mgr.get_stats()),
            "log": _records(caplog),
        }
        assert "created shared pool for" in shown["log"]
        assert "127.0.0.1" in shown["stats"]  # the URL is there, only its password is not
        for what, value in shown.items():
            assert "hunter2xyz" not in value, f"the password leaked into {what}: {value}"
    finally:
        mgr.close()


@pytest.mark.parametrize(
    ("dsn", "password"),
    [
        ("host=127.0.0.1 port=5432 dbname=db password=hun@ter2xyz", "hun@ter2xyz"),
        ("host=127.0.0.1 password=hunter2xyz@ dbname=db user=u", "hunter2xyz@"),
        ("host=127.0.0.1 password='a b c d' dbname=db", "a b c d"),
        ("host=127.0.0.1 password = 'it\\'s s3cret' dbname=db", "it\\'s s3cret"),
        ("host=127.0.0.1 password = sec ret", "sec ret"),
        ("host=127.0.0.1 PASSWORD=Hunter2xyz", "Hunter2xyz"),
        ("user=u password=a:b/c@d?e#f%g&h", "a:b/c@d?e#f%g&h"),
    ],
)
def test_a_keyword_dsn_error_shows_no_part_of_the_password(dsn: str, password: str) -> None:
    """Reported: a keyword DSN's ConfigurationError showed most of an '@' password."""
    with pytest.raises(lsc.ConfigurationError) as caught:
        lsc.ExecutionConnectionManager(dsn)
    message = str(caught.value)
    assert "could not parse database URL" in message
    rest = dsn.replace(password, "")
    for piece in {password[i : i + 4] for i in range(len(password) - 3)}:
        if piece not in rest:  # a piece the rest of the DSN holds too is shown legitimately
            assert piece not in message, f"{piece!r} of the password shows: {message}"
    assert "host=127.0.0.1" in message or "user=u" in message  # the rest is still shown


@pytest.mark.parametrize(
    ("text", "secret", "kept"),
    [
        # userinfo, with what an un-encoded password may hold
        ("postgresql://u:a b@h/db", "a b", "@h/db"),
        ("postgresql://u:p@ss/w?rd#x@h:5432/db", "p@ss/w?rd#x", "@h:5432/db"),
        ("//u:s3cret@h/db", "s3cret", "@h/db"),
        ("could not connect to postgresql://u:pw1234@h/db: timed out", "pw1234", "timed out"),
        # ?password= in any case, encoded or raw, first or after other parameters
        ("postgresql://u@h/db?password=hunter2", "hunter2", "postgresql://u@h/db?password="),
        ("postgresql://u@h/db?PASSWORD=hunter2", "hunter2", "/db?"),
        ("postgresql://u@h/db?sslmode=require&PassWord=a%20b&connect_timeout=3", "a%20b", "3"),
        ("postgresql://u@h/db?a=1&password=a+b+c&b=2", "a+b+c", "b=2"),
        ("postgresql://u@h/db?password=a b c", "b c", "/db?"),
        ("postgresql://u@h/db?password=x&y&z=1", "x&y", "z=1"),
        ("postgresql://u@h/db?%70assword=hunter2", "hunter2", "/db?"),
        ("postgresql://u@h/db?sslpassword=hunter2", "hunter2", "/db?"),
        ("postgresql://u:p@h/db?password=s@t", "s@t", "postgresql://u:"),
        ("see postgresql://u@h/db?password=hunter2 for details", "hunter2", "for details"),
        # keyword DSNs
        ("host=h password=hunter2 dbname=d", "hunter2", "dbname=d"),
        ("host=h password = hunter2", "hunter2", "host=h"),
        ("host=h password='a b' dbname=d", "a b", "dbname=d"),
        ("host=h password='it\\'s here' dbname=d", "s here", "dbname=d"),
        ("host=h password='never closed dbname=d", "never closed", "host=h"),
        ("host=h password=a b c dbname=d", "b c", "dbname=d"),
        ("host=h password='a''zz' dbname=d", "zz", "dbname=d"),
        # other secret keys, and keys that only look like one
        ("postgresql://u@h/db?sslpassword=hunter2&access_token=t0k3n", "t0k3n", "sslpassword"),
        ("failed: max_tokens=4096 bypass=on; client_secret=s3cr3t", "s3cr3t", "max_tokens=4096"),
        # dict and JSON renderings
        ("{'password': 'a b', 'host': 'h'}", "a b", "'host': 'h'"),
        ('{"password": "x \\" y", "host": "h"}', 'x \\" y', '"host": "h"'),
    ],
)
def test_redact_url_hides_every_form(text: str, secret: str, kept: str) -> None:
    shown = redact_url(text)
    assert secret not in shown, shown
    assert kept in shown, shown
    assert "***" in shown
    assert redact_url(shown) == shown  # idempotent


@pytest.mark.parametrize(
    ("url", "secret"),
    [
        ("postgresql+psycopg2://u:hunter2@h/db", "hunter2"),
        ("postgresql+psycopg2://u@h/db?password=hunter2", "hunter2"),
        ("postgresql+psycopg2://u@h/db?sslmode=require&sslpassword=hunter2", "hunter2"),
        ("mysql+pymysql://u@h/db?Password=hunter2&charset=utf8", "hunter2"),
        ("sqlite:///file.db?password=hunter2", "hunter2"),
    ],
)
def test_safe_url_hides_the_password_and_secret_query_parameters(url: str, secret: str) -> None:
    shown = lsc_redaction.safe_url(make_url(url))
    assert secret not in shown, shown
    assert shown.startswith(url.split("?", maxsplit=1)[0].replace(":hunter2", ":***"))


def test_a_query_password_is_moved_to_the_urls_password() -> None:
    """So SQLAlchemy's own renderings (engine.url, reprs) hide it, and the driver gets it."""
    parsed = lsc_urls.parse_url("postgresql+psycopg2://u@h/db?sslmode=require&password=a%26b")
    assert parsed.password == "a&b"
    assert dict(parsed.query) == {"sslmode": "require"}
    assert "a%26b" not in repr(parsed) and "a&b" not in str(parsed)
    # the query wins over the userinfo, as it does in the driver's keyword arguments
    assert lsc_urls.parse_url("postgresql://u:old@h/db?password=new").password == "new"


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("postgresql://u@h/db?PASSWORD=hunter2", "'PASSWORD', which is not a libpq option"),
        ("postgresql://u@h/db?password=hunter2&password=hunter3", "more than once"),
    ],
)
def test_a_query_password_libpq_would_refuse_is_refused_now(url: str, needle: str) -> None:
    with pytest.raises(lsc.ConfigurationError, match=needle) as caught:
        lsc.ExecutionConnectionManager(url)
    assert "hunter" not in str(caught.value)


def test_sslpassword_in_the_query_never_shows_in_stats() -> None:
    url = f"postgresql+psycopg2://u@127.0.0.1:{free_port()}/db?sslpassword=hunter2xyz"
    mgr = lsc.ExecutionConnectionManager(url, max_connections=1)
    try:
        mgr.pool_for()
        assert "hunter2xyz" not in json.dumps(mgr.get_stats())
    finally:
        mgr.close()


# -- generated passwords in every form -------------------------------------------------------

# printable ASCII (every URL-special character, quotes, backslash, space) and a few others
_ALPHABET = st.characters(min_codepoint=0x20, max_codepoint=0x7E) | st.sampled_from("éü密🔑")
_passwords = st.text(_ALPHABET, min_size=6, max_size=24)
_ascii_passwords = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=6)
_PLACEHOLDER = "Plchldr0"
_USER = "lsc_user"


def _password_forms(password: str) -> set[str]:
    """The password and every encoding of it that could be shown."""
    libpq = password.replace("\\", "\\\\").replace("'", "\\'")
    forms = {password, quote(password, safe=""), quote(password), quote_plus(password), libpq}
    forms.add(unquote(password))  # what the server gets from an un-encoded userinfo password
    return {f for f in forms if len(f) >= 4}


def _libpq_quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _written_forms(password: str, port: int) -> dict[str, str]:
    """``password`` written every way a database URL or DSN can hold it."""
    base = f"postgresql+psycopg2://{_USER}"
    where = f"127.0.0.1:{port}/db"
    enc, plus = quote(password, safe=""), quote_plus(password)
    forms = {
        "userinfo": f"{base}:{enc}@{where}",
        "userinfo, not encoded": f"{base}:{password}@{where}",
        "query": f"{base}@{where}?password={enc}",
        "query, quote_plus, after others": f"{base}@{where}?sslmode=disable&password={plus}",
        "query, before others": f"{base}@{where}?password={enc}&application_name=x",
        "query, upper case": f"{base}@{where}?PASSWORD={enc}",
        "query, mixed case, after others": f"{base}@{where}?connect_timeout=3&Password={enc}",
        "query, encoded key": f"{base}@{where}?%70assword={enc}",
        "userinfo and query": f"{base}:{enc}@{where}?password={plus}",
        "dsn, quoted": f"host=127.0.0.1 port={port} dbname=db password={_libpq_quote(password)}",
        "dsn, spaced": f"user={_USER} password = {_libpq_quote(password)} host=127.0.0.1",
    }
    raw = f"{base}@{where}?password={password}"
    if _parses_to(raw, password):
        forms["query, raw"] = raw
        forms["query, raw, after others"] = f"{base}@{where}?sslmode=disable&password={password}"
    if not any(c.isspace() or c in "'\\" for c in password):
        forms["dsn, plain"] = f"host=127.0.0.1 port={port} password={password} dbname=db"
        forms["dsn, plain, spaced"] = f"host=127.0.0.1 password = {password}"
    return forms


def _parses_to(url: str, password: str) -> bool:
    try:
        return make_url(url).query.get("password") == password
    except Exception:
        return False


def _shown_for(url: str) -> dict[str, str]:
    """Everything the package shows about ``url`` without connecting."""
    shown = {
        "redact_url": redact_url(url),
        "redact_url in a sentence": redact_url(f"could not connect to {url}: timed out"),
    }
    try:
        mgr = lsc.ExecutionConnectionManager(url, max_connections=1)
    except lsc.ConfigurationError as exc:
        shown["error"] = str(exc)
        shown["error repr"] = repr(exc)
        shown["error traceback"] = "".join(traceback.format_exception(exc))
        return shown
    try:
        handle = mgr.pool_for()
        shown["repr(manager)"] = repr(mgr)
        shown["repr(settings)"] = repr(mgr.settings)
        shown["public_dict"] = json.dumps(mgr.settings.public_dict())
        shown["repr(pool)"] = repr(handle)
        shown["stats"] = json.dumps(mgr.get_stats())
        client = TestClient(create_app(mgr, token="t0ken-for-the-test"))
        shown["GET status"] = client.get(STATUS_PATH).text
    finally:
        mgr.close()
    return shown


def _shown_for_every_form(password: str, port: int, caplog: pytest.LogCaptureFixture) -> str:
    caplog.clear()
    out = []
    for form, url in _written_forms(password, port).items():
        for what, value in _shown_for(url).items():
            out.append(f"[{form}: {what}] {value}")
    out.append(f"[log] {_records(caplog)}")
    return "\n".join(out)


@settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(password=_passwords)
def test_no_form_of_a_generated_password_ever_shows(
    password: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Closed port: the managers, stats, reprs, errors and status bodies are built, not used."""
    caplog.set_level(logging.DEBUG)
    port = free_port()
    forms = _password_forms(password)
    # a password that is boilerplate (say "******" or "sslmode") is shown whatever happens
    baseline = _shown_for_every_form(_PLACEHOLDER, port, caplog)
    assume(not any(f in baseline for f in forms))
    shown = _shown_for_every_form(password, port, caplog)
    assert "created shared pool for" in shown  # the log was captured
    for form in forms:
        for line in shown.splitlines():
            assert form not in line, f"{form!r} (of {password!r}) shows: {line[:400]}"


def _connect_in_every_form(
    password: str, role: str, pg_db: Database, caplog: pytest.LogCaptureFixture
) -> str:
    """Log in as ``role`` with ``password`` written in each form that can connect."""
    admin = pg_db.server.admin(pg_db.name)
    with admin.cursor() as cur:
        cur.execute(f"alter role {role} password %s", (password,))
    admin.close()
    where = pg_db.url.split("@", 1)[1]  # host:port/database
    base = f"postgresql+psycopg2://{role}"
    enc, plus = quote(password, safe=""), quote_plus(password)
    urls = {
        "userinfo": f"{base}:{enc}@{where}",
        "query": f"{base}@{where}?password={enc}",
        "query after others": f"{base}@{where}?sslmode=disable&password={plus}",
        "userinfo and query": f"{base}:wrong@{where}?password={enc}&connect_timeout=5",
    }
    if _parses_to(f"{base}@{where}?password={password}", password):
        urls["query, raw"] = f"{base}@{where}?application_name=x&password={password}"
    caplog.clear()
    shown = []
    for form, url in urls.items():
        mgr = lsc.ExecutionConnectionManager(url, max_connections=1)
        try:
            with lsc.ExecutionScope(manager=mgr) as scope:
                engine = lsc.get_scoped_engine(manager=mgr)
                with engine.connect() as conn:
                    user = conn.execute(text("select current_user")).scalar()
                assert user == role, form
                shown += [repr(mgr), repr(engine), repr(engine.url), repr(scope)]
                shown += [repr(mgr.pool_for()), json.dumps(mgr.get_stats())]
            client = TestClient(create_app(mgr, token="t0ken-for-the-test"))
            shown.append(client.get(STATUS_PATH).text)
        finally:
            mgr.close()
    shown.append(_records(caplog))
    return "\n".join(shown)


@settings(
    max_examples=10,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(password=_ascii_passwords)
def test_generated_passwords_connect_in_every_form_and_never_show(
    password: str, secrets: Secrets, pg_db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """A real login with the generated password, written in each form that can connect."""
    caplog.set_level(logging.DEBUG)
    forms = _password_forms(password)
    baseline = _connect_in_every_form(_PLACEHOLDER, secrets.role, pg_db, caplog)
    assume(not any(f in baseline for f in forms))
    shown = _connect_in_every_form(password, secrets.role, pg_db, caplog)
    assert "created shared pool for" in shown
    for form in forms:
        for line in shown.splitlines():
            assert form not in line, f"{form!r} (of {password!r}) shows: {line[:400]}"
