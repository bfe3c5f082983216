"""Find the current execution, and this execution's engine and SQLDatabase.

There is one search, :func:`find_execution`, in this order:

1. what the caller passed: a ``RunnableConfig`` or a ``ToolRuntime`` (its config);
   a LangGraph ``Runtime`` (``def node(state, runtime: Runtime[Ctx])``, a
   ``create_agent`` middleware hook) carries no config, so passing one is the same
   as passing nothing: the search starts at 2;
2. an :class:`~langgraph_scoped_conn.ExecutionScope` entered inside the running
   node itself;
3. the config LangGraph has set for the running node or tool;
4. the innermost :class:`~langgraph_scoped_conn.ExecutionScope` of this context.

Inside a node or tool, ``config["run_id"]`` is ``None``; what is always there is
``config["callbacks"].parent_run_id``, the run id of the node or tool itself, which
the callback handler mapped to its root run's execution.  Under LangGraph Server,
``configurable.run_id`` names the server's run as well.

LangChain is imported here only when it is already loaded (a graph is running).
"""

from __future__ import annotations

import contextvars
import logging
import sys
import uuid
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from langgraph_scoped_conn.errors import NoActiveScopeError, ScopeClosedError
from langgraph_scoped_conn.hooks import set_schema_warmer
from langgraph_scoped_conn.manager import (
    ExecutionConnectionManager,
    get_connection_manager,
    manager_of,
    set_attribution_provider,
)
from langgraph_scoped_conn.settings import redact_url

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

    from langgraph_scoped_conn.engine import ScopedEngine
    from langgraph_scoped_conn.execution import Execution
    from langgraph_scoped_conn.sql_database import ScopedSQLDatabase

__all__ = [
    "current_execution",
    "enter_scope",
    "execution_from_config",
    "find_execution",
    "get_scoped_engine",
    "get_scoped_sql_database",
    "leave_scope",
    "register_manager",
]

logger = logging.getLogger("langgraph_scoped_conn")

#: The innermost ExecutionScope's execution, and the LangGraph config it was entered in.
_current: contextvars.ContextVar[tuple[Execution, object] | None] = contextvars.ContextVar(
    "langgraph_scoped_conn_execution", default=None
)

#: Managers that a callback handler has used; searched when no manager is named.
_managers: weakref.WeakSet[ExecutionConnectionManager] = weakref.WeakSet()


def register_manager(manager: ExecutionConnectionManager) -> None:
    """Make ``manager``'s runs findable from a bare config (called by the handler)."""
    _managers.add(manager)


# -- ExecutionScope's context ------------------------------------------------------------


def enter_scope(execution: Execution) -> contextvars.Token[tuple[Execution, object] | None]:
    """Make ``execution`` the innermost scope of this context."""
    return _current.set((execution, _langgraph_config()))


def leave_scope(token: contextvars.Token[tuple[Execution, object] | None]) -> None:
    """Undo :func:`enter_scope`."""
    try:
        _current.reset(token)
    except ValueError:  # exited in another context (e.g. a generator finalised elsewhere)
        _current.set(None)


def current_execution() -> Execution | None:
    """The execution opened by the innermost :class:`ExecutionScope` in this context."""
    entry = _current.get()
    if entry is None or entry[0].state != "open":
        return None
    return entry[0]


def _langgraph_config() -> Any:
    """The config LangGraph set for the running node or tool, if a graph is running."""
    module = sys.modules.get("langchain_core.runnables.config")
    if module is None:
        return None
    return module.var_child_runnable_config.get()


# -- the search ------------------------------------------------------------------------


def _as_config(config_or_runtime: Any) -> Mapping[str, Any] | None:
    if config_or_runtime is None:
        return None
    if isinstance(config_or_runtime, Mapping):
        return config_or_runtime
    config = getattr(config_or_runtime, "config", None)  # ToolRuntime, Runtime-like
    if isinstance(config, Mapping):
        return config
    if _is_langgraph_runtime(config_or_runtime):
        return None  # no config of its own: LangGraph's current config is searched
    raise TypeError(
        "expected a RunnableConfig dict, a ToolRuntime or a LangGraph Runtime, got "
        f"{type(config_or_runtime).__name__}; declare `config: RunnableConfig` (or "
        "`runtime: ToolRuntime` / `runtime: Runtime`) in your node or tool and pass it on"
    )


def _is_langgraph_runtime(obj: object) -> bool:
    """True for a ``langgraph.runtime.Runtime`` (loaded whenever one exists)."""
    module = sys.modules.get("langgraph.runtime")
    runtime_class = getattr(module, "Runtime", None)
    return isinstance(runtime_class, type) and isinstance(obj, runtime_class)


def _candidate_managers(manager: ExecutionConnectionManager | None) -> list[Any]:
    if manager is not None:
        return [manager]
    default = get_connection_manager()
    return [default, *(m for m in list(_managers) if m is not default)]


def execution_from_config(
    config: Mapping[str, Any], manager: ExecutionConnectionManager | None = None
) -> Execution | None:
    """The open execution that ``config`` belongs to, or ``None``.

    Raises:
        ScopeUnavailableError: the handler saw the run but could not open its scope.
    """
    run_ids: list[uuid.UUID] = []
    parent = getattr(config.get("callbacks"), "parent_run_id", None)
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


def require_execution(execution: Execution | None, what: str) -> Execution:
    """Return ``execution`` or raise :class:`NoActiveScopeError` naming ``what``."""
    if execution is None:
        raise NoActiveScopeError(
            f"{what} was called outside an execution scope; wrap the graph with "
            "with_scoped_connections(...), pass the node's `config`, or use "
            "`with ExecutionScope(...):`"
        )
    return execution


def find_execution(
    config_or_runtime: Any = None,
    manager: ExecutionConnectionManager | None = None,
    *,
    what: str,
) -> Execution:
    """The current execution (see the module docstring for the order).

    Raises:
        NoActiveScopeError: there is none.
        ScopeClosedError: the innermost ExecutionScope's execution was released.
        ScopeUnavailableError: the run's scope could not be opened.
    """
    config = _as_config(config_or_runtime)
    if config is not None:
        execution = execution_from_config(config, manager)
        return require_execution(execution or current_execution(), what)
    entry = _current.get()
    graph_config = _langgraph_config()
    if entry is not None and entry[1] is graph_config and entry[0].state == "open":
        return entry[0]  # a scope entered inside this node (or outside any graph)
    execution = execution_from_config(graph_config, manager) if graph_config else None
    if execution is None and entry is not None:
        if entry[0].state != "open":  # inside a `with ExecutionScope` that was released
            raise ScopeClosedError(
                f"{what} was called in execution {entry[0].execution_id!r}, which has already "
                "been released (reaped after max_scope_lifetime, or by the cleanup route); "
                "open a new ExecutionScope"
            )
        execution = entry[0]
    return require_execution(execution, what)


# -- this execution's engine and SQLDatabase ------------------------------------------


def get_scoped_engine(
    config: Any = None,
    *,
    database_url: str | URL | None = None,
    manager: ExecutionConnectionManager | None = None,
) -> ScopedEngine:
    """This execution's engine: created on first use, the same object for the rest of the run.

    Args:
        config: the node's ``RunnableConfig``, a ``ToolRuntime``, a LangGraph
            ``Runtime`` or ``None`` (both use LangGraph's current config).
        database_url: another URL than the configured one.
        manager: the manager, when not the process default.

    Raises:
        NoActiveScopeError: not inside a wrapped graph run or an ExecutionScope.
        ScopeUnavailableError: the run's scope could not be opened.
    """
    execution = find_execution(config, manager, what="get_scoped_engine()")
    key = ("engine", _url_key(database_url))
    cached = execution.cached.get(key)
    if cached is None:
        engine = manager_of(execution).engine_for(execution, database_url)
        cached = execution.cached.setdefault(key, engine)
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
        config: the node's ``RunnableConfig``, a ``ToolRuntime``, a LangGraph
            ``Runtime`` or ``None`` (both use LangGraph's current config).
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
    execution = find_execution(config, manager, what="get_scoped_sql_database()")
    module = _sql_database_module()
    if database_url is None and not options:
        key: tuple[Any, ...] = _DEFAULT_SQL_DATABASE  # the usual call: no key to build
    else:
        key = ("sql_database", _url_key(database_url), module.SchemaCache.options_key(options))
    cached = execution.cached.get(key)
    if cached is None:
        db = module.new_scoped_sql_database(execution, database_url, **options)
        cached = execution.cached.setdefault(key, db)
    return cached  # type: ignore[no-any-return]


_DEFAULT_SQL_DATABASE = ("sql_database", None, ())


def _sql_database_module() -> Any:
    """:mod:`langgraph_scoped_conn.sql_database`, imported on first use (it loads LangChain).

    A function-level ``import`` statement costs a trip through the import machinery on
    every call; after the first, this is one dictionary lookup.
    """
    module = sys.modules.get("langgraph_scoped_conn.sql_database")
    if module is None:
        from langgraph_scoped_conn.sql_database import new_scoped_sql_database

        module = sys.modules[new_scoped_sql_database.__module__]  # defined there, not re-exported
    return module


def _url_key(database_url: str | URL | None) -> str | None:
    """A cache key for a URL that keeps the password (``str(URL)`` hides it as ``***``)."""
    if database_url is None or isinstance(database_url, str):
        return database_url
    return database_url.render_as_string(hide_password=False)


def _current_node(manager: ExecutionConnectionManager) -> str | None:
    """The LangGraph node (and tool) running in this context, for leak reports."""
    config = _langgraph_config()
    if not config:
        return None
    metadata = config.get("metadata") or {}
    node = metadata.get("langgraph_node")
    tool = manager.run_name(getattr(config.get("callbacks"), "parent_run_id", None))
    if node and tool:
        return f"node {node!r} / tool {tool!r}"
    return f"node {node!r}" if node else None


def _warm_schema(manager: ExecutionConnectionManager) -> None:
    """``warm_schema=True``: reflect the configured URL now, on a release thread.

    The first ``get_scoped_sql_database()`` with no options (the same cache key) then
    finds it ready, or waits for this one reflection instead of starting its own.
    """
    try:
        _sql_database_module().schema_cache(manager).warm()
    except Exception as exc:  # the first SQLDatabase reflects (and raises) instead
        logger.warning(
            "warm_schema: reflecting the schema ahead of the first run failed (%s: %s); "
            "the first SQLDatabase will reflect it",
            type(exc).__name__,
            redact_url(str(exc)),
        )


set_attribution_provider(_current_node)
set_schema_warmer(_warm_schema)
