"""Find the current execution from a RunnableConfig, a ToolRuntime, or LangGraph's context.

Inside a node or tool, ``config["run_id"]`` is ``None``; what is always there is
``config["callbacks"].parent_run_id``, the run id of the node or tool itself.  The
callback handler maps every run it sees to its execution, so that id is enough.
Under LangGraph Server, ``configurable.run_id`` names the server's run as well.
"""

from __future__ import annotations

import uuid
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from langgraph_scoped_conn.registry import (
    Execution,
    ExecutionConnectionManager,
    require_execution,
    set_attribution_provider,
)

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

    from langgraph_scoped_conn.pool import ScopedEngine
    from langgraph_scoped_conn.sql_database import ScopedSQLDatabase

__all__ = [
    "execution_from_config",
    "execution_from_langgraph_context",
    "get_scoped_engine",
    "get_scoped_sql_database",
]

#: Managers that a callback handler has used; searched when no manager is named.
_managers: weakref.WeakSet[ExecutionConnectionManager] = weakref.WeakSet()


def register_manager(manager: ExecutionConnectionManager) -> None:
    """Make ``manager``'s runs findable from a bare config (called by the handler)."""
    _managers.add(manager)


def _candidate_managers(manager: ExecutionConnectionManager | None) -> list[Any]:
    if manager is not None:
        return [manager]
    from langgraph_scoped_conn.scope import get_connection_manager

    default = get_connection_manager()
    return [default, *(m for m in list(_managers) if m is not default)]


def _as_config(config_or_runtime: Any) -> Mapping[str, Any] | None:
    if config_or_runtime is None:
        return None
    if isinstance(config_or_runtime, Mapping):
        return config_or_runtime
    config = getattr(config_or_runtime, "config", None)  # ToolRuntime, Runtime-like
    if isinstance(config, Mapping):
        return config
    raise TypeError(
        f"expected a RunnableConfig dict or a ToolRuntime, got {type(config_or_runtime).__name__}; "
        "declare `config: RunnableConfig` (or `runtime: ToolRuntime`) in your node or tool and "
        "pass it on"
    )


def execution_from_config(
    config: Mapping[str, Any], manager: ExecutionConnectionManager | None = None
) -> Execution | None:
    """The open execution that ``config`` belongs to, or ``None``.

    Raises:
        ScopeUnavailableError: the handler saw the run but could not open its scope.
    """
    run_ids: list[uuid.UUID] = []
    callbacks = config.get("callbacks")
    parent = getattr(callbacks, "parent_run_id", None)
    if isinstance(parent, uuid.UUID):
        run_ids.append(parent)
    run_id = config.get("run_id")
    if isinstance(run_id, uuid.UUID):
        run_ids.append(run_id)
    configurable = config.get("configurable") or {}
    server_run = configurable.get("run_id") if isinstance(configurable, Mapping) else None
    for candidate in _candidate_managers(manager):
        for rid in run_ids:
            execution: Execution | None = candidate.execution_for_run(rid)
            if execution is not None and execution.state == "open":
                return execution
        if server_run is not None:
            execution = candidate.execution(str(server_run))
            if execution is not None:
                return execution
    return None


def execution_from_langgraph_context(
    manager: ExecutionConnectionManager | None = None,
) -> Execution | None:
    """The execution of the runnable config LangGraph has set for the running node, if any."""
    from langchain_core.runnables.config import var_child_runnable_config

    config = var_child_runnable_config.get()
    if config is None:
        return None
    return execution_from_config(config, manager)


def _find(
    config_or_runtime: Any, manager: ExecutionConnectionManager | None, what: str
) -> Execution:
    from langgraph_scoped_conn.scope import current_execution

    config = _as_config(config_or_runtime)
    execution = execution_from_config(config, manager) if config is not None else None
    if execution is None:
        execution = execution_from_langgraph_context(manager) if config is None else None
    if execution is None:
        execution = current_execution()
    return require_execution(execution, what)


def get_scoped_engine(
    config: Any = None,
    *,
    database_url: str | URL | None = None,
    manager: ExecutionConnectionManager | None = None,
) -> ScopedEngine:
    """This execution's engine: created on first use, the same object for the rest of the run.

    Args:
        config: the node's ``RunnableConfig``, a ``ToolRuntime``, or ``None`` to use
            LangGraph's current config.
        database_url: another URL than the configured one.
        manager: the manager, when not the process default.

    Raises:
        NoActiveScopeError: not inside a wrapped graph run or an ExecutionScope.
        ScopeUnavailableError: the run's scope could not be opened.
    """
    execution = _find(config, manager, "get_scoped_engine()")
    key = ("engine", _url_key(database_url))
    cached = execution.cached.get(key)
    if cached is None:
        cached = execution.cached.setdefault(
            key, execution.manager.engine_for(execution, database_url)
        )
    return cached  # type: ignore[no-any-return]


def get_scoped_sql_database(
    config: Any = None,
    *,
    database_url: str | URL | None = None,
    manager: ExecutionConnectionManager | None = None,
    **options: Any,
) -> ScopedSQLDatabase:
    """This execution's SQLDatabase: created on first use, the same object for the rest of the run.

    Schema reflection is cached per URL and options; creating the instance for a new
    run costs microseconds.

    Args:
        config: the node's ``RunnableConfig``, a ``ToolRuntime``, or ``None`` to use
            LangGraph's current config.
        database_url: another URL than the configured one.
        manager: the manager, when not the process default.
        **options: ``read_only`` (default from the manager), ``statement_timeout``, and
            ``SQLDatabase`` keyword arguments such as ``include_tables``.

    Raises:
        NoActiveScopeError: not inside a wrapped graph run or an ExecutionScope.
        ScopeUnavailableError: the run's scope could not be opened.

    Example:
        >>> @tool  # doctest: +SKIP
        ... def run_query(query: str, config: RunnableConfig) -> str:
        ...     return get_scoped_sql_database(config, read_only=True).run(query)
    """
    from langgraph_scoped_conn.sql_database import new_scoped_sql_database, options_key

    execution = _find(config, manager, "get_scoped_sql_database()")
    key = (
        "sql_database",
        _url_key(database_url),
        options_key(options),
    )
    cached = execution.cached.get(key)
    if cached is None:
        cached = execution.cached.setdefault(
            key, new_scoped_sql_database(execution, database_url, **options)
        )
    return cached  # type: ignore[no-any-return]


def _url_key(database_url: str | URL | None) -> str | None:
    """A cache key for a URL that keeps the password (``str(URL)`` hides it as ``***``)."""
    if database_url is None or isinstance(database_url, str):
        return database_url
    return database_url.render_as_string(hide_password=False)


def _current_node(manager: ExecutionConnectionManager) -> str | None:
    """The LangGraph node (and tool) running in this context, for leak reports."""
    from langchain_core.runnables.config import var_child_runnable_config

    config = var_child_runnable_config.get()
    if not config:
        return None
    metadata = config.get("metadata") or {}
    node = metadata.get("langgraph_node")
    tool = manager.run_name(getattr(config.get("callbacks"), "parent_run_id", None))
    if node and tool:
        return f"node {node!r} / tool {tool!r}"
    return f"node {node!r}" if node else None


set_attribution_provider(_current_node)
