"""with_scoped_connections: give a compiled graph one execution scope per run.

The wrapped graph is a copy of the compiled graph (``graph.with_config``) with a
:class:`~langgraph_scoped_conn.ScopedConnectionHandler` in its callbacks, so it is
still a ``Pregel`` of the same class: LangGraph Server and ``langgraph dev`` accept
it from ``langgraph.json``, and every run path (invoke, ainvoke, stream, astream,
batch, abatch, astream_events, use as a subgraph) goes through the handler.

The copy's config also carries ``configurable["sql_database"]``: a
:class:`~langgraph_scoped_conn.ScopedSQLDatabaseProxy`, so a node or tool can take
the run's SQLDatabase from its config without importing anything.  A value the
compiled graph's config or the caller's config sets for that key wins.

LangGraph Server copies every ``configurable`` value whose key does not start with
``__`` into the metadata it hands a checkpointer named in langgraph.json
(``langgraph_api/_checkpointer/_adapter.py``), unlike LangGraph's own savers, which keep
only plain values; LangGraph's Postgres savers write that metadata as JSON and refuse the
proxy.  ``sql_database_key`` names another key (``__sql_database``) or none for that case.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

from langgraph.pregel import Pregel

from langgraph_scoped_conn.handler import ExecutionIdFactory, ScopedConnectionHandler
from langgraph_scoped_conn.manager import ExecutionConnectionManager

__all__ = ["SQL_DATABASE_KEY", "with_scoped_connections"]

#: The ``configurable`` key under which a wrapped graph's runs find their SQLDatabase.
SQL_DATABASE_KEY = "sql_database"

G = TypeVar("G", bound=Pregel)  # type: ignore[type-arg]
F = TypeVar("F", bound=Callable[..., Any])


@overload
def with_scoped_connections(
    graph: G,
    /,
    *,
    manager: ExecutionConnectionManager | None = ...,
    execution_id: ExecutionIdFactory | None = ...,
    sql_database_key: str | None = ...,
) -> G: ...


@overload
def with_scoped_connections(
    graph: F,
    /,
    *,
    manager: ExecutionConnectionManager | None = ...,
    execution_id: ExecutionIdFactory | None = ...,
    sql_database_key: str | None = ...,
) -> F: ...


@overload
def with_scoped_connections(
    graph: None = None,
    /,
    *,
    manager: ExecutionConnectionManager | None = ...,
    execution_id: ExecutionIdFactory | None = ...,
    sql_database_key: str | None = ...,
) -> Callable[[F], F]: ...


def with_scoped_connections(
    graph: Any = None,
    /,
    *,
    manager: ExecutionConnectionManager | None = None,
    execution_id: ExecutionIdFactory | None = None,
    sql_database_key: str | None = SQL_DATABASE_KEY,
) -> Any:
    """Open an execution scope for every run of a compiled graph and release it at the end.

    Works three ways::

        graph = with_scoped_connections(builder.compile())

        @with_scoped_connections           # on a graph factory, as langgraph dev accepts
        def make_graph(config): ...

        @with_scoped_connections(
            execution_id=lambda run: f"{run['metadata'].get('user_id', 'anon')}:{run['run_id']}"
        )
        def make_graph(config): ...

    Args:
        graph: a compiled graph, a function returning one (sync or async), or nothing
            to get a decorator.
        manager: the manager; the process default (looked up per run) when ``None``.
        execution_id: a callable returning the execution id from the run's
            ``{"run_id", "metadata", "tags", "configurable"}`` (see
            :class:`~langgraph_scoped_conn.ScopedConnectionHandler`).  Return an id unique
            per run: a run cannot join an execution another live run holds, so an id
            taken from ``thread_id`` alone fails the second run of a thread that
            overlaps the first.
        sql_database_key: the ``configurable`` key under which runs find a
            :class:`~langgraph_scoped_conn.ScopedSQLDatabaseProxy` (``"sql_database"``);
            ``None`` puts none there.  Under LangGraph Server with a checkpointer of
            LangGraph's own (``AsyncPostgresSaver.from_conn_string`` in langgraph.json),
            pass ``None`` or a key starting with ``__``: the server copies every other
            configurable value into the checkpoint's metadata, which that saver writes
            as JSON, and every run fails with "Object of type ScopedSQLDatabaseProxy is
            not JSON serializable".  ``lsc.apostgres_checkpointer()`` writes such a
            value as its repr, so the default key works with it.

    Returns:
        A compiled graph of the same class (still ``isinstance(x, Pregel)``), or a
        factory that returns one.

    Raises:
        TypeError: ``graph`` is neither a compiled graph nor a callable, or
            ``sql_database_key`` is neither a non-empty string nor ``None``.
    """
    if sql_database_key is not None and (
        not isinstance(sql_database_key, str) or not sql_database_key
    ):
        raise TypeError(
            f"with_scoped_connections(sql_database_key=...) takes a non-empty configurable "
            f"key or None; got {sql_database_key!r}"
        )
    if graph is None:
        return functools.partial(
            with_scoped_connections,
            manager=manager,
            execution_id=execution_id,
            sql_database_key=sql_database_key,
        )
    wrap = functools.partial(
        _wrap, manager=manager, execution_id=execution_id, key=sql_database_key
    )
    if isinstance(graph, Pregel):
        return wrap(graph)
    if inspect.iscoroutinefunction(graph):
        factory = graph

        @functools.wraps(factory)
        async def async_factory(*args: Any, **kwargs: Any) -> Any:
            return _wrap_result(await factory(*args, **kwargs), wrap)

        return async_factory
    if callable(graph):
        sync_factory: Callable[..., Any] = graph

        @functools.wraps(sync_factory)
        def factory_wrapper(*args: Any, **kwargs: Any) -> Any:
            result = sync_factory(*args, **kwargs)
            if inspect.isawaitable(result):
                return _await_and_wrap(result, wrap)
            return _wrap_result(result, wrap)

        return factory_wrapper
    raise TypeError(
        f"with_scoped_connections() takes a compiled graph (builder.compile()) or a function "
        f"returning one; got {type(graph).__name__}. Did you pass the StateGraph builder? "
        "Call .compile() first"
    )


async def _await_and_wrap(result: Awaitable[Any], wrap: Callable[[Any], Any]) -> Any:
    return _wrap_result(await result, wrap)


def _wrap_result(result: Any, wrap: Callable[[Any], Any]) -> Any:
    if not isinstance(result, Pregel):
        raise TypeError(
            f"the graph factory wrapped by with_scoped_connections returned "
            f"{type(result).__name__}, not a compiled graph; return builder.compile()"
        )
    return wrap(result)


def _wrap(
    graph: G,
    *,
    manager: ExecutionConnectionManager | None,
    execution_id: ExecutionIdFactory | None,
    key: str | None,
) -> G:
    callbacks = (graph.config or {}).get("callbacks")
    if isinstance(callbacks, list) and any(
        isinstance(cb, ScopedConnectionHandler) for cb in callbacks
    ):
        return graph  # already wrapped: one scope per run, not two
    handler = ScopedConnectionHandler(manager, execution_id=execution_id)
    configurable = (graph.config or {}).get("configurable") or {}
    if key is None or key in configurable:
        return graph.with_config(callbacks=[handler])  # the user's own choice stays
    # imported here: it brings langchain-community, which `import graph` should not
    from langgraph_scoped_conn.sql_database_proxy import ScopedSQLDatabaseProxy

    # a proxy, not a SQLDatabase: every run that reads it gets its own scoped object
    proxy = ScopedSQLDatabaseProxy(manager=manager)
    return graph.with_config(callbacks=[handler], configurable={key: proxy})
