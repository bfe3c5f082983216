"""The current execution: found from a config, a runtime, or the innermost ExecutionScope.

There is one search, :func:`find_execution`.  With a ``RunnableConfig``, a
``ToolRuntime`` or a ``Runtime`` passed in:

1. the root run id LangGraph hands the running code, ``runtime.execution_info.run_id``
   (LangGraph 1.2+ sets it under LangGraph Server and whenever a run id is given);
2. the run ids in the config (for a bare ``Runtime``: LangGraph's current config);
3. the innermost :class:`~langgraph_scoped_conn.ExecutionScope` of this context.

With nothing passed: an ``ExecutionScope`` entered inside the running node itself
first, then 1 and 2 for LangGraph's current runtime and config, then 3.

Inside a node or tool, ``config["run_id"]`` is ``None``; what is always there is
``config["callbacks"].parent_run_id``, the run id of the node or tool itself, which
the callback handler mapped to its root run's execution.  The managers searched are the
one named, the handlers' managers found in the config's callbacks, and the process
default.

LangChain is imported here only when it is already loaded (a graph is running).
"""

from __future__ import annotations

import contextvars
import sys
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from langgraph_scoped_conn.configure import get_connection_manager
from langgraph_scoped_conn.errors import NoActiveScopeError, ScopeClosedError
from langgraph_scoped_conn.manager import ExecutionConnectionManager

if TYPE_CHECKING:
    from langgraph_scoped_conn.execution import Execution

__all__ = [
    "current_execution",
    "enter_scope",
    "find_execution",
    "leave_scope",
]

#: The innermost ExecutionScope's execution, and the LangGraph config it was entered in.
_current: contextvars.ContextVar[tuple[Execution, object] | None] = contextvars.ContextVar(
    "langgraph_scoped_conn_execution", default=None
)


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


def _runtime_run_id(runtime: Any) -> str | None:
    """``execution_info.run_id`` of a ``Runtime`` / ``ToolRuntime``, if it has one."""
    run_id = getattr(getattr(runtime, "execution_info", None), "run_id", None)
    return str(run_id) if run_id else None


def _current_runtime() -> Any:
    """LangGraph's runtime of the running node, if a graph is running (``get_runtime()``)."""
    module = sys.modules.get("langgraph.runtime")
    if module is None:
        return None
    try:
        return module.get_runtime()
    except (RuntimeError, KeyError, LookupError):  # not inside a runnable
        return None


def _managers(
    manager: ExecutionConnectionManager | None, config: Mapping[str, Any] | None
) -> list[ExecutionConnectionManager]:
    """The named manager; else the config's handlers' managers and the process default."""
    if manager is not None:
        return [manager]
    found: list[ExecutionConnectionManager] = []
    callbacks = config.get("callbacks") if config is not None else None
    for handler in getattr(callbacks, "handlers", ()):
        candidate = getattr(handler, "manager", None)  # a ScopedConnectionHandler's
        if isinstance(candidate, ExecutionConnectionManager) and candidate not in found:
            found.append(candidate)
    default = get_connection_manager()
    if default not in found:
        found.append(default)
    return found


def _by_run_id(managers: list[ExecutionConnectionManager], run_id: str | None) -> Execution | None:
    """The open execution of the root run (or server run) ``run_id``, if any."""
    if run_id is None:
        return None
    try:
        as_uuid: uuid.UUID | None = uuid.UUID(run_id)
    except ValueError:
        as_uuid = None
    for candidate in managers:
        execution = candidate.execution_for_run(as_uuid) if as_uuid is not None else None
        if execution is None:
            execution = candidate.execution(run_id)
        if execution is not None and execution.state == "open":
            return execution
    return None


def execution_from_config(
    config: Mapping[str, Any],
    manager: ExecutionConnectionManager | None = None,
    runtime: Any = None,
) -> Execution | None:
    """The open execution that ``config`` (or ``runtime``) belongs to, or ``None``.

    Raises:
        ScopeUnavailableError: the handler saw the run but could not open its scope.
    """
    managers = _managers(manager, config)
    execution = _by_run_id(managers, _runtime_run_id(runtime))
    if execution is not None:
        return execution
    run_ids: list[uuid.UUID] = []
    parent = getattr(config.get("callbacks"), "parent_run_id", None)
    if isinstance(parent, uuid.UUID):
        run_ids.append(parent)
    run_id = config.get("run_id")
    if isinstance(run_id, uuid.UUID):
        run_ids.append(run_id)
    configurable = config.get("configurable") or {}
    server_run = configurable.get("run_id") if isinstance(configurable, Mapping) else None
    for candidate in managers:
        for rid in run_ids:
            found: Execution | None = candidate.execution_for_run(rid)
            if found is not None and found.state == "open":
                return found
        if server_run is not None:
            found = candidate.execution(str(server_run))
            if found is not None:
                return found
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
        execution = execution_from_config(config, manager, config_or_runtime)
        return require_execution(execution or current_execution(), what)
    entry = _current.get()
    graph_config = _langgraph_config()
    if entry is not None and entry[1] is graph_config and entry[0].state == "open":
        return entry[0]  # a scope entered inside this node (or outside any graph)
    runtime = config_or_runtime if config_or_runtime is not None else _current_runtime()
    execution = execution_from_config(graph_config, manager, runtime) if graph_config else None
    if execution is None and entry is not None:
        if entry[0].state != "open":  # inside a `with ExecutionScope` that was released
            raise ScopeClosedError(
                f"{what} was called in execution {entry[0].execution_id!r}, which has already "
                "been released (reaped after max_scope_lifetime, or by the cleanup route); "
                "open a new ExecutionScope"
            )
        execution = entry[0]
    return require_execution(execution, what)
