"""A real `langgraph dev` server with the repo's langgraph.json, driven by langgraph-sdk.

The server runs the example SQL agent (offline scripted model) against the test
database, and the package's debug app as its ``http.app``.  Every run mode Studio
uses is exercised: wait, stream, cancel, a stream that disconnects, and an
interrupt that is resumed.  Then the status route and pg_stat_activity must agree
that every run's scope opened and closed and that no connection is held, and the
server log must show no BlockingError from the dev server's blocking-call checker.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from langgraph_sdk import get_client
from sqlalchemy.engine import make_url

from langgraph_scoped_conn.testing import free_port
from tests.conftest import Database
from tests.devserver import langgraph_dev

pytestmark = [pytest.mark.studio, pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parent.parent
STATUS = "/api/memory/debug/connections/status"
CLEANUP = "/api/memory/debug/connections/cleanup"
TOKEN = "studio-test-token-6b1f"
SLOW_SQL = "sql: SELECT pg_sleep(3) AS slept, count(*) AS orders FROM orders"


def _langgraph_cli() -> list[str]:
    exe = shutil.which("langgraph", path=str(Path(sys.executable).parent)) or shutil.which(
        "langgraph"
    )
    if exe is None:
        pytest.fail("langgraph-cli is not installed: pip install 'langgraph-scoped-conn[studio]'")
    return [exe]


class DevServer:
    def __init__(self, url: str, log: Path, proc: subprocess.Popen[bytes]) -> None:
        self.url = url
        self.log = log
        self.proc = proc

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def status(self) -> dict[str, Any]:
        response = httpx.get(self.url + STATUS, timeout=10)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["success"] is True
        return dict(body["data"]["connection_stats"])


@pytest.fixture
def dev_server(pg_db: Database, tmp_path: Path) -> Iterator[DevServer]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LANGSMITH_", "LANGCHAIN_"))}
    env.pop("LSC_CHAT_MODEL", None)  # the offline scripted model
    env.update(
        DATABASE_URL=pg_db.url,
        SCOPED_CONN_DEBUG_TOKEN=TOKEN,
        LANGGRAPH_CLI_NO_ANALYTICS="1",
        LANGSMITH_TRACING="false",
        LANGCHAIN_TRACING_V2="false",
        PYTHONUNBUFFERED="1",
    )
    log = tmp_path / "langgraph-dev.log"
    # `langgraph dev` resolves graph paths against its working directory and keeps its
    # in-memory state under ./.langgraph_api: run it in a fresh directory that sees the
    # repo's examples, so no state from an earlier run is replayed
    (tmp_path / "examples").symlink_to(REPO / "examples", target_is_directory=True)
    cmd = [
        *_langgraph_cli(),
        "dev",
        "--no-browser",
        "--no-reload",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--config",
        str(REPO / "langgraph.json"),
        "--n-jobs-per-worker",
        "4",
    ]
    url = f"http://127.0.0.1:{port}"
    with langgraph_dev(cmd, cwd=tmp_path, env=env, log=log, url=url) as proc:
        yield DevServer(url, log, proc)


def held_backends(pg_db: Database) -> list[tuple[object, ...]]:
    """Package connections that are busy on the server (running or inside a transaction)."""
    return pg_db.query(
        "select application_name, state, query from pg_stat_activity "
        "where datname = current_database() and backend_type = 'client backend' "
        "and application_name like 'langgraph_scoped_conn%' and state <> 'idle'"
    )


async def eventually(
    check: Callable[[], Awaitable[bool] | bool], what: str, limit: float = 60
) -> None:
    """Poll ``check`` until it is true; fail naming ``what`` after ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting until {what}")
        await asyncio.sleep(0.1)


def question(text: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}]}


def last_text(values: dict[str, Any]) -> str:
    return str(values["messages"][-1]["content"])


async def test_langgraph_dev_runs_release_every_scope(
    dev_server: DevServer, pg_db: Database
) -> None:
    async with get_client(url=dev_server.url) as client:
        await drive_every_run_mode(client, dev_server, pg_db)

    log = dev_server.log_text()
    assert "--allow-blocking, which allows" not in log  # the checker was on
    assert "BlockingError" not in log, log[log.index("BlockingError") - 3000 :][:6000]
    password = make_url(pg_db.url).password
    assert password and password not in log


async def drive_every_run_mode(client: Any, dev_server: DevServer, pg_db: Database) -> None:
    status = dev_server.status
    assert (await asyncio.to_thread(status))["active_executions"] == 0
    opened_before = (await asyncio.to_thread(status))["scopes_opened"]
    runs = 0

    async def running_query_of(run_id: str) -> bool:
        """The run's scope is open, holds the connection, and the query runs on the server."""
        executions = (await asyncio.to_thread(status))["executions"]
        busy = await asyncio.to_thread(held_backends, pg_db)
        return executions.get(run_id, {}).get("connections_in_use") == 1 and any(
            "pg_sleep" in str(row[2]) and row[1] == "active" for row in busy
        )

    async def all_released() -> bool:
        stats = await asyncio.to_thread(status)
        busy = await asyncio.to_thread(held_backends, pg_db)
        return (
            stats["active_executions"] == 0
            and stats["draining_executions"] == 0
            and stats["connections_in_use"] == 0
            and not busy
        )

    # 1. create a thread and wait on a run
    thread = await client.threads.create()
    result = await client.runs.wait(
        thread["thread_id"], "sql_agent", input=question("sql: SELECT count(*) FROM orders")
    )
    runs += 1
    assert isinstance(result, dict)
    assert "500" in last_text(result)
    await eventually(all_released, "the waited run released its scope")

    # 2. stream a run on the same thread
    chunks = [
        chunk
        async for chunk in client.runs.stream(
            thread["thread_id"],
            "sql_agent",
            input=question("sql: SELECT count(*) FROM customers"),
            stream_mode="values",
        )
    ]
    runs += 1
    values = [c.data for c in chunks if c.event == "values"]
    assert values and "50" in last_text(values[-1])
    await eventually(all_released, "the streamed run released its scope")

    # 3. cancel a run while its query holds a connection on the server
    thread = await client.threads.create()
    run = await client.runs.create(thread["thread_id"], "sql_agent", input=question(SLOW_SQL))
    runs += 1
    await eventually(lambda: running_query_of(run["run_id"]), "the slow query runs")
    await client.runs.cancel(thread["thread_id"], run["run_id"], wait=True)
    cancelled = await client.runs.get(thread["thread_id"], run["run_id"])
    assert cancelled["status"] in ("interrupted", "error"), cancelled["status"]
    await eventually(all_released, "the cancelled run released its scope")

    # 4. disconnect a stream mid-way (the server cancels the run)
    thread = await client.threads.create()
    stream_run_id: str | None = None
    stream = client.runs.stream(
        thread["thread_id"],
        "sql_agent",
        input=question(SLOW_SQL),
        stream_mode="updates",
        on_disconnect="cancel",
    )
    async for chunk in stream:
        if chunk.event == "metadata":
            stream_run_id = chunk.data["run_id"]
            await eventually(
                lambda: running_query_of(str(stream_run_id)), "the streamed query runs"
            )
            break
    await stream.aclose()  # type: ignore[attr-defined]
    runs += 1
    assert stream_run_id is not None

    async def stream_run_finished() -> bool:
        got = await client.runs.get(thread["thread_id"], stream_run_id)
        return got["status"] not in ("pending", "running")

    await eventually(stream_run_finished, "the disconnected stream's run stopped")
    await eventually(all_released, "the disconnected run released its scope")

    # 5. interrupt a run for approval, then resume it
    thread = await client.threads.create()
    approval = question("sql: SELECT count(*) FROM orders WHERE amount > 50")
    interrupted = await client.runs.wait(
        thread["thread_id"], "sql_agent", input={**approval, "require_approval": True}
    )
    runs += 1
    assert isinstance(interrupted, dict)
    state = await client.threads.get_state(thread["thread_id"])
    assert state["next"] == ["approve"]
    assert state["tasks"][0]["interrupts"], state["tasks"]
    await eventually(all_released, "the interrupted run released its scope")
    resumed = await client.runs.wait(thread["thread_id"], "sql_agent", command={"resume": True})
    runs += 1
    assert isinstance(resumed, dict)
    expected = pg_db.query("select count(*) from orders where amount > 50")[0][0]
    assert str(expected) in last_text(resumed)
    await eventually(all_released, "the resumed run released its scope")

    # every run opened one scope and closed it; nothing is held, server side too
    stats = await asyncio.to_thread(status)
    assert stats["scopes_opened"] - opened_before == runs
    assert stats["scopes_closed"] == stats["scopes_opened"]
    assert stats["scope_open_failures"] == 0
    assert stats["tracked_runs"] == 0
    assert stats["connections_in_use"] == 0
    assert stats["checkouts"] == stats["checkins"]
    assert held_backends(pg_db) == []
    idle = pg_db.backends("langgraph_scoped_conn%")
    assert idle == stats["connections_idle"] <= stats["max_connections"]

    # the cleanup route is protected by the token and reaps nothing live
    async with httpx.AsyncClient(base_url=dev_server.url, timeout=10) as http:
        assert (await http.post(CLEANUP)).status_code == 401
        response = await http.post(CLEANUP, headers={"Authorization": f"Bearer {TOKEN}"})
        assert response.status_code == 200, response.text
        assert response.json()["data"]["released"] == []
        metrics = await http.get("/api/memory/debug/connections/metrics")
    assert f"langgraph_scoped_conn_scopes_closed_total {float(stats['scopes_closed'])}" in (
        metrics.text
    )
