"""The debug routes: status, cleanup (and its token), metrics, mounting and the reaper lifespan."""

from __future__ import annotations

import datetime
import logging
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text
from sqlalchemy.engine import make_url
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

import langgraph_scoped_conn as lsc
from langgraph_scoped_conn import http
from tests.conftest import Database, eventually

ExecutionConnectionManager = lsc.ExecutionConnectionManager
STATUS = "/api/memory/debug/connections/status"
CLEANUP = "/api/memory/debug/connections/cleanup"
TOKEN = "t0ken-for-the-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def client(manager: ExecutionConnectionManager, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The default app, with the token in the environment and sent on every request."""
    monkeypatch.setenv(http.TOKEN_ENV, TOKEN)
    with TestClient(http.create_app(), headers=AUTH) as c:
        yield c


def in_use_on_server(pg_db: Database) -> int:
    count = pg_db.query(
        "select count(*) from pg_stat_activity where datname = current_database() "
        "and application_name like 'langgraph_scoped_conn%' and state <> 'idle'"
    )[0][0]
    assert isinstance(count, int)
    return count


def age(mgr: ExecutionConnectionManager, execution_id: str, seconds: float) -> None:
    """Make ``execution_id`` look ``seconds`` older (its creation time is a monotonic stamp)."""
    execution = mgr.execution(execution_id)
    assert execution is not None
    execution.created -= seconds


def test_status_has_the_guide_shape_and_matches_the_server(
    client: Any, pg_db: Database, manager: ExecutionConnectionManager
) -> None:
    with lsc.ExecutionScope("user1_conv1_1640995200"):
        lsc.create_execution_scoped_sql_database_sync()
        conn = lsc.create_execution_scoped_engine_sync().connect()
        conn.execute(text("select pg_backend_pid()"))  # opens a transaction: not idle

        response = client.get(STATUS)

        assert response.status_code == 200
        body = response.json()
        assert body["success"] is True
        assert set(body["data"]) == {"connection_stats", "timestamp"}
        stamp = datetime.datetime.fromisoformat(body["data"]["timestamp"])
        assert stamp.tzinfo is not None
        stats = body["data"]["connection_stats"]
        assert stats["active_executions"] == 1
        entry = stats["executions"]["user1_conv1_1640995200"]
        assert entry["sql_engines"] == 2 and entry["sql_databases"] == 1
        assert entry["custom_connections"] == 0
        assert stats["total_tracked_connections"] == 3
        assert stats["connections_in_use"] == 1 == in_use_on_server(pg_db)
        conn.close()
    assert client.get(STATUS).json()["data"]["connection_stats"]["active_executions"] == 0


def test_status_never_shows_a_password_or_a_dsn(client: Any, pg_db: Database) -> None:
    with lsc.ExecutionScope("x"), lsc.create_execution_scoped_engine_sync().connect() as c:
        c.execute(text("select 1"))
    body = client.get(STATUS).text
    url = make_url(pg_db.url)
    assert url.password and url.password not in body
    assert "***" not in body and "@" not in body  # no userinfo at all, not even masked
    pools = client.get(STATUS).json()["data"]["connection_stats"]["pools"]
    assert [p["url"] for p in pools] == [
        f"postgresql+psycopg2://{url.host}:{url.port}/{pg_db.name}"
    ]


def test_cleanup_reaps_only_scopes_past_their_lifetime(
    client: Any, pg_db: Database, manager: ExecutionConnectionManager
) -> None:
    with lsc.ExecutionScope("stale") as stale:
        stale_conn = lsc.create_execution_scoped_engine_sync().connect()
        stale_conn.execute(text("select 1"))
        with lsc.ExecutionScope("live"):
            live_conn = lsc.create_execution_scoped_engine_sync().connect()
            live_conn.execute(text("select 1"))
            age(manager, stale.execution_id, (manager.settings.max_scope_lifetime or 0) + 10)
            assert in_use_on_server(pg_db) == 2

            response = client.post(CLEANUP)

            assert response.status_code == 200, response.text
            data = response.json()["data"]
            assert data["released"] == ["stale"] and data["released_count"] == 1
            assert data["mode"] == "expired"
            assert data["max_scope_lifetime"] == manager.settings.max_scope_lifetime
            assert list(data["connection_stats"]["executions"]) == ["live"]
            assert data["connection_stats"]["scopes_reaped"] == 1
            assert in_use_on_server(pg_db) == 1  # the stale scope's backend is gone
            assert live_conn.execute(text("select 2")).scalar() == 2
            # a second call finds nothing more to do
            assert client.post(CLEANUP).json()["data"]["released"] == []
            live_conn.close()


def test_cleanup_of_one_execution_by_id(
    client: Any, pg_db: Database, manager: ExecutionConnectionManager
) -> None:
    with lsc.ExecutionScope("keep"), lsc.ExecutionScope("stuck"):
        conn = lsc.create_execution_scoped_engine_sync().connect()
        conn.execute(text("select 1"))

        response = client.post(CLEANUP, json={"execution_id": "stuck"})

        assert response.status_code == 200, response.text
        data = response.json()["data"]
        assert data["released"] == ["stuck"] and data["mode"] == "execution"
        assert manager.active_executions() == ["keep"]
        eventually(lambda: in_use_on_server(pg_db) == 0, "the released backend is gone")
        assert client.post(CLEANUP + "?execution_id=keep").json()["data"]["released"] == ["keep"]
    stats = manager.get_stats()
    assert stats["scopes_closed"] == 2
    assert stats["scopes_reaped"] == 0  # released by request: nothing outlived its lifetime


def test_cleanup_with_max_age_argument(client: Any, manager: ExecutionConnectionManager) -> None:
    with lsc.ExecutionScope("older"):
        age(manager, "older", 120)
        with lsc.ExecutionScope("newer"):
            response = client.post(CLEANUP, json={"max_age": 60})
            assert response.json()["data"]["released"] == ["older"]
            assert response.json()["data"]["max_scope_lifetime"] == 60


@pytest.mark.parametrize(
    ("kwargs", "status", "needle"),
    [
        ({"content": b"not json"}, 400, "must be a JSON object"),
        ({"json": ["stuck"]}, 400, "must be a JSON object, got list"),
        ({"json": {"execution": "x"}}, 400, "unknown cleanup argument(s) execution"),
        ({"json": {"execution_id": ""}}, 400, "execution_id='' must be a non-empty string"),
        ({"json": {"max_age": -1}}, 400, "max_age=-1.0 must be a finite number"),
        ({"json": {"max_age": "soon"}}, 400, "max_age='soon' must be a number"),
        ({"json": {"execution_id": "a", "max_age": 1}}, 400, "not both"),
        ({"json": {"execution_id": "nope"}}, 404, "no open execution with id 'nope'"),
    ],
)
def test_cleanup_rejects_bad_input_with_a_clear_error(
    client: Any, manager: ExecutionConnectionManager, kwargs: Any, status: int, needle: str
) -> None:
    with lsc.ExecutionScope("a"):
        age(manager, "a", 10_000)
        response = client.post(CLEANUP, **kwargs)
        assert response.status_code == status
        assert response.json()["success"] is False
        assert needle in response.json()["error"]
        assert manager.active_executions() == ["a"]  # nothing released on an error


def test_cleanup_requires_the_bearer_token_when_set(
    manager: ExecutionConnectionManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(http.TOKEN_ENV, "s3cret-token")
    with TestClient(http.create_app()) as client, lsc.ExecutionScope("guarded"):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-token"}):
            response = client.post(CLEANUP, json={"execution_id": "guarded"}, headers=headers)
            assert response.status_code == 401
            assert response.headers["www-authenticate"] == "Bearer"
            assert http.TOKEN_ENV in response.json()["error"]
            assert "s3cret-token" not in response.text
        assert manager.active_executions() == ["guarded"]
        assert client.get(STATUS).status_code == 200  # status is read-only: no token needed
        response = client.post(
            CLEANUP,
            json={"execution_id": "guarded"},
            headers={"Authorization": "Bearer s3cret-token"},
        )
        assert response.status_code == 200
        assert manager.active_executions() == []


def test_explicit_token_and_manager(
    pg_db: Database, monkeypatch: pytest.MonkeyPatch, manager: ExecutionConnectionManager
) -> None:
    monkeypatch.delenv(http.TOKEN_ENV, raising=False)
    other = ExecutionConnectionManager(pg_db.url, max_connections=2)
    try:
        app = http.create_app(other, token="t0ken")
        with TestClient(app) as client:
            execution = other.open_execution("on-other")
            assert client.post(CLEANUP, json={"execution_id": "on-other"}).status_code == 401
            stats = client.get(STATUS).json()["data"]["connection_stats"]
            assert list(stats["executions"]) == ["on-other"]  # not the default manager's
            ok = client.post(
                CLEANUP,
                json={"execution_id": "on-other"},
                headers={"authorization": "bearer t0ken"},
            )
            assert ok.status_code == 200
            other.release_execution(execution)
    finally:
        other.close()


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"token": ""}, "token must be a non-empty string"),
        ({"token": " \t"}, "token must be a non-empty string"),
        ({"allow_unauthenticated_cleanup": "yes"}, "allow_unauthenticated_cleanup must be"),
        ({"manager": "postgresql://x"}, "manager must be an ExecutionConnectionManager"),
        ({"reap_interval": 0}, "reap interval=0 must be a number of seconds above 0"),
    ],
)
def test_create_app_rejects_bad_arguments(kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(lsc.ConfigurationError, match=needle):
        http.create_app(**kwargs)


def _factories(**kwargs: Any) -> dict[str, Any]:
    """The three ways to get the routes, each as an app a test client can drive."""
    return {
        "create_app": lambda: http.create_app(**kwargs),
        "create_routes": lambda: Starlette(routes=http.create_routes(**kwargs)),
        "create_router": lambda: Starlette(routes=[Mount("", app=http.create_router(**kwargs))]),
    }


@pytest.mark.parametrize("factory", ["create_app", "create_routes", "create_router"])
def test_cleanup_without_a_token_is_refused(
    manager: ExecutionConnectionManager, monkeypatch: pytest.MonkeyPatch, factory: str
) -> None:
    """Reported: with no token set, anyone who could reach the port released live runs."""
    monkeypatch.delenv(http.TOKEN_ENV, raising=False)
    with TestClient(_factories()[factory]()) as client, lsc.ExecutionScope("live"):
        age(manager, "live", 10_000)  # even an expired one: no caller is trusted
        for kwargs in ({"json": {"execution_id": "live"}}, {}, {"json": {"max_age": 0}}):
            response = client.post(CLEANUP, **kwargs)
            assert response.status_code == 403, response.text
            error = response.json()["error"]
            assert response.json()["success"] is False
            assert http.TOKEN_ENV in error and "allow_unauthenticated_cleanup=True" in error
        assert manager.active_executions() == ["live"]
        assert client.get(STATUS).status_code == 200  # status needs no token


@pytest.mark.parametrize("factory", ["create_app", "create_routes", "create_router"])
def test_unauthenticated_cleanup_is_an_explicit_opt_in(
    manager: ExecutionConnectionManager, monkeypatch: pytest.MonkeyPatch, factory: str
) -> None:
    monkeypatch.delenv(http.TOKEN_ENV, raising=False)
    app = _factories(allow_unauthenticated_cleanup=True)[factory]()
    with TestClient(app) as client, lsc.ExecutionScope("stuck"):
        response = client.post(CLEANUP, json={"execution_id": "stuck"})
        assert response.status_code == 200, response.text
        assert response.json()["data"]["released"] == ["stuck"]
        assert manager.active_executions() == []


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        pytest.param('{"max_age": 0}', {"content-type": "text/plain"}, id="text/plain body"),
        pytest.param("max_age=0", {"content-type": "application/x-www-form-urlencoded"}, id="form"),
        pytest.param("", {}, id="no body, no content type"),
    ],
)
def test_unauthenticated_cleanup_refuses_what_a_web_page_can_send(
    manager: ExecutionConnectionManager,
    monkeypatch: pytest.MonkeyPatch,
    body: str,
    headers: dict[str, str],
) -> None:
    """Reproduction: a cross-origin text/plain POST of {"max_age": 0} released every run.

    A browser sends such a "simple request" from any page without asking the server
    first; JSON or a custom header makes it ask (a CORS preflight the app refuses).
    """
    monkeypatch.delenv(http.TOKEN_ENV, raising=False)
    app = http.create_app(allow_unauthenticated_cleanup=True)
    with TestClient(app) as client, lsc.ExecutionScope("live"):
        url = CLEANUP if body else f"{CLEANUP}?max_age=0"
        response = client.post(url, content=body, headers=headers)
        assert response.status_code == 415, response.text
        assert http.CLEANUP_HEADER in response.json()["error"]
        assert manager.active_executions() == ["live"]  # nothing released
        # the same request with the custom header (or as JSON) is served
        response = client.post(f"{CLEANUP}?execution_id=live", headers={http.CLEANUP_HEADER: "1"})
        assert response.status_code == 200, response.text
        assert manager.active_executions() == []


def test_a_token_still_applies_with_the_opt_in(
    manager: ExecutionConnectionManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(http.TOKEN_ENV, TOKEN)
    with (
        TestClient(http.create_app(allow_unauthenticated_cleanup=True)) as client,
        lsc.ExecutionScope("guarded"),
    ):
        assert client.post(CLEANUP, json={"execution_id": "guarded"}).status_code == 401
        assert manager.active_executions() == ["guarded"]
        response = client.post(CLEANUP, json={"execution_id": "guarded"}, headers=AUTH)
        assert response.status_code == 200


@pytest.mark.parametrize("value", ["", " ", "\t\n"])
@pytest.mark.parametrize("factory", ["create_app", "create_routes", "create_router"])
def test_an_empty_token_in_the_environment_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch, value: str, factory: str
) -> None:
    """Reported: SCOPED_CONN_DEBUG_TOKEN="" turned authentication off."""
    monkeypatch.setenv(http.TOKEN_ENV, value)
    for opt_in in (False, True):
        with pytest.raises(lsc.ConfigurationError, match=f"{http.TOKEN_ENV} is set but empty"):
            _factories(allow_unauthenticated_cleanup=opt_in)[factory]()


@pytest.mark.parametrize("opt_in", [False, True])
def test_a_token_emptied_after_startup_fails_closed_at_each_request(
    manager: ExecutionConnectionManager, monkeypatch: pytest.MonkeyPatch, opt_in: bool
) -> None:
    monkeypatch.setenv(http.TOKEN_ENV, TOKEN)
    app = http.create_app(allow_unauthenticated_cleanup=opt_in)
    monkeypatch.setenv(http.TOKEN_ENV, "")
    with TestClient(app) as client, lsc.ExecutionScope("live"):
        for headers in ({}, {"Authorization": "Bearer "}, AUTH):
            response = client.post(CLEANUP, json={"execution_id": "live"}, headers=headers)
            assert response.status_code == 500, response.text
            assert f"{http.TOKEN_ENV} is set but empty" in response.json()["error"]
        assert manager.active_executions() == ["live"]
        assert client.get(STATUS).status_code == 200


def test_surrounding_whitespace_of_the_token_is_ignored(
    manager: ExecutionConnectionManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A token read from a file often ends in a newline; it must not lock everyone out."""
    monkeypatch.setenv(http.TOKEN_ENV, f" {TOKEN}\n")
    with TestClient(http.create_app()) as client, lsc.ExecutionScope("x"):
        response = client.post(CLEANUP, json={"execution_id": "x"}, headers=AUTH)
        assert response.status_code == 200, response.text


def test_a_release_by_request_is_logged_as_such_not_as_reaped(
    client: Any, manager: ExecutionConnectionManager, caplog: pytest.LogCaptureFixture
) -> None:
    """Reported: releasing a 0.4 s old run by id was logged as reaped after max_scope_lifetime."""
    caplog.set_level(logging.DEBUG, logger="langgraph_scoped_conn")
    with lsc.ExecutionScope("young"):
        assert client.post(CLEANUP, json={"execution_id": "young"}).status_code == 200
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("langgraph_scoped")]
    about = [m for m in messages if "young" in m]
    assert any("young released by request" in m for m in about), messages
    assert not any("reaped" in m or "max_scope_lifetime" in m for m in about), about

    caplog.clear()
    with lsc.ExecutionScope("stale"):
        age(manager, "stale", (manager.settings.max_scope_lifetime or 0) + 10)
        assert client.post(CLEANUP).json()["data"]["released"] == ["stale"]
    messages = [r.getMessage() for r in caplog.records if "stale" in r.getMessage()]
    assert any("reaped execution stale after" in m for m in messages), messages
    assert not any("by request" in m for m in messages), messages


def test_no_cleanup_response_or_log_shows_the_token(
    client: Any, manager: ExecutionConnectionManager, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with lsc.ExecutionScope("t"):
        bodies = [
            client.post(CLEANUP, json={"execution_id": "t"}, headers=h).text
            for h in ({"Authorization": "Bearer wrong"}, AUTH)
        ]
    shown = "\n".join([*bodies, *(r.getMessage() for r in caplog.records)])
    assert TOKEN not in shown


def test_routes_mount_into_a_user_app(client: Any, manager: Any) -> None:
    async def hello(request: Any) -> PlainTextResponse:
        return PlainTextResponse("hello")

    mounted = Starlette(routes=[Route("/", hello), Mount("/ops", app=http.create_router())])
    # FastAPI apps take the same routes: app.router.routes.extend(create_routes())
    extended = Starlette(routes=[Route("/", hello)])
    extended.router.routes.extend(http.create_routes())
    with lsc.ExecutionScope("mounted"):
        for app, path in ((mounted, "/ops" + STATUS), (extended, STATUS)):
            with TestClient(app) as c:
                assert c.get("/").text == "hello"
                stats = c.get(path).json()["data"]["connection_stats"]
                assert list(stats["executions"]) == ["mounted"]


def test_the_app_uses_lifespan_not_startup_events() -> None:
    assert isinstance(http.app, Starlette)
    # langgraph-api refuses to merge an app that has on_startup/on_shutdown hooks
    assert not getattr(http.app.router, "on_startup", None)
    assert not getattr(http.app.router, "on_shutdown", None)
    assert type(http.app.router.lifespan_context).__name__ != "_DefaultLifespan"
    assert {r.path for r in http.app.routes} >= {STATUS, CLEANUP, "/metrics"}  # type: ignore[attr-defined]


def test_lifespan_reaper_releases_orphans(pg_db: Database, configure_default: Any) -> None:
    mgr = configure_default(max_connections=2, max_scope_lifetime=3600)
    orphan = mgr.open_execution("forgotten")
    mgr.engine_for(orphan).connect().execute(text("select 1"))
    live = mgr.open_execution("busy")
    age(mgr, "forgotten", 7200)
    assert in_use_on_server(pg_db) == 1
    with TestClient(http.create_app(reap_interval=0.05)):
        deadline = time.monotonic() + 30
        while mgr.execution("forgotten") is not None and time.monotonic() < deadline:
            time.sleep(0.05)
    assert mgr.active_executions() == ["busy"]
    assert mgr.get_stats()["scopes_reaped"] == 1
    eventually(lambda: in_use_on_server(pg_db) == 0, "the reaped backend is gone")
    mgr.release_execution(live)


def parse_metrics(body: str) -> dict[str, float]:
    return {s.name: s.value for f in text_string_to_metric_families(body) for s in f.samples}


def test_metrics_route(client: Any, pg_db: Database) -> None:
    with lsc.ExecutionScope("m"), lsc.create_execution_scoped_engine_sync().connect() as c:
        c.execute(text("select 1"))
        for path in ("/metrics", "/api/memory/debug/connections/metrics"):
            response = client.get(path)
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/plain")
            m = parse_metrics(response.text)
            assert m["langgraph_scoped_conn_active_executions"] == 1
            assert m["langgraph_scoped_conn_connections_in_use"] == 1 == in_use_on_server(pg_db)
            assert m["langgraph_scoped_conn_max_connections"] == 5
            assert m["langgraph_scoped_conn_checkouts_total"] == 1
            assert pg_db.url not in response.text


def test_metrics_route_without_prometheus_client_says_what_to_install(
    client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    monkeypatch.delitem(sys.modules, "langgraph_scoped_conn.metrics", raising=False)
    response = client.get("/metrics")
    assert response.status_code == 501
    assert "pip install 'langgraph-scoped-conn[metrics]'" in response.text
