"""ScopedConnectionHandler (langgraph_scoped_conn.handler): what the ``execution_id=``
callable is given, and a callable that raises.

The callable gets what LangChain hands the run's callbacks (run id, metadata, tags, the
configurable values the metadata carries), under invoke, ainvoke and astream; one that
raises names itself and the keys it was given.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypedDict

import pytest
from langchain_core.runnables import RunnableConfig
from langgraph.graph import END, START, StateGraph
from sqlalchemy import text

import langgraph_scoped_conn as lsc
from langgraph_scoped_conn import ExecutionConnectionManager

pytestmark = pytest.mark.usefixtures("no_scoped_conn_env")  # no SCOPED_CONN_* options


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
