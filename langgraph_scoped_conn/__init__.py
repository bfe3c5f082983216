"""Execution-scoped database connections for LangGraph.

Every graph run (execution) gets its own tracked engines, SQLDatabase objects and
custom resources, drawn from one shared pool per database URL under a hard
connection budget, and released when the run ends, errors, is cancelled or its
stream is closed.

The LangGraph layer (handler, graph wrapper, config lookups) and the SQLDatabase
adapter are imported on first use, so ``import langgraph_scoped_conn`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from langgraph_scoped_conn.errors import (
    ConfigurationError,
    ConnectionBudgetExceededError,
    ExecutionConnectionLimitError,
    NoActiveScopeError,
    ReadOnlyViolationError,
    ScopeClosedError,
    ScopedConnectionError,
    ScopeUnavailableError,
    UnsafeQueryError,
)
from langgraph_scoped_conn.lookup import (
    current_execution,
    get_scoped_engine,
    get_scoped_sql_database,
)
from langgraph_scoped_conn.manager import (
    ExecutionConnectionManager,
    aconfigure,
    configure,
    get_connection_manager,
)
from langgraph_scoped_conn.scope import (
    ExecutionScope,
    close_database_connections,
    create_execution_scoped_engine,
    create_execution_scoped_engine_sync,
    create_execution_scoped_sql_database,
    create_execution_scoped_sql_database_sync,
    get_connection_stats,
    track_connection,
)

if TYPE_CHECKING:
    from langgraph_scoped_conn.engine import ScopedEngine
    from langgraph_scoped_conn.errors import ConnectionReclaimedError
    from langgraph_scoped_conn.graph import with_scoped_connections
    from langgraph_scoped_conn.handler import ScopedConnectionHandler
    from langgraph_scoped_conn.proxy import ScopedSQLDatabaseProxy
    from langgraph_scoped_conn.sql_database import ScopedSQLDatabase, invalidate_schema_cache

__version__ = "0.1.0"

__all__ = [
    "ConfigurationError",
    "ConnectionBudgetExceededError",
    "ConnectionReclaimedError",
    "ExecutionConnectionLimitError",
    "ExecutionConnectionManager",
    "ExecutionScope",
    "NoActiveScopeError",
    "ReadOnlyViolationError",
    "ScopeClosedError",
    "ScopeUnavailableError",
    "ScopedConnectionError",
    "ScopedConnectionHandler",
    "ScopedEngine",
    "ScopedSQLDatabase",
    "ScopedSQLDatabaseProxy",
    "UnsafeQueryError",
    "__version__",
    "aconfigure",
    "close_database_connections",
    "configure",
    "create_execution_scoped_engine",
    "create_execution_scoped_engine_sync",
    "create_execution_scoped_sql_database",
    "create_execution_scoped_sql_database_sync",
    "current_execution",
    "get_connection_manager",
    "get_connection_stats",
    "get_scoped_engine",
    "get_scoped_sql_database",
    "invalidate_schema_cache",
    "track_connection",
    "with_scoped_connections",
]

_LAZY = {
    "ConnectionReclaimedError": "langgraph_scoped_conn.errors",
    "with_scoped_connections": "langgraph_scoped_conn.graph",
    "ScopedConnectionHandler": "langgraph_scoped_conn.handler",
    "ScopedEngine": "langgraph_scoped_conn.engine",
    "ScopedSQLDatabase": "langgraph_scoped_conn.sql_database",
    "ScopedSQLDatabaseProxy": "langgraph_scoped_conn.proxy",
    "invalidate_schema_cache": "langgraph_scoped_conn.sql_database",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'langgraph_scoped_conn' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
