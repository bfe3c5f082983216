"""The public API of execution scopes: ExecutionScope, the current execution's engine and
SQLDatabase, and the guide's module-level functions over the process-default manager.

The SQLDatabase adapter (it loads LangChain) is imported on the first call that needs
it, through the import system, which makes concurrent first calls wait for one import
instead of seeing a half-initialised module.
"""

from __future__ import annotations

import asyncio
import contextvars
import importlib
import warnings
from types import ModuleType, TracebackType
from typing import TYPE_CHECKING, Any

from langgraph_scoped_conn.configure import get_connection_manager
from langgraph_scoped_conn.current import enter_scope, find_execution, leave_scope
from langgraph_scoped_conn.manager import ExecutionConnectionManager, manager_of

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

    from langgraph_scoped_conn.engine import ScopedEngine
    from langgraph_scoped_conn.execution import Execution
    from langgraph_scoped_conn.sql_database import ScopedSQLDatabase

__all__ = [
    "ExecutionScope",
    "close_database_connections",
    "create_execution_scoped_engine",
    "create_execution_scoped_engine_sync",
    "create_execution_scoped_sql_database",
    "create_execution_scoped_sql_database_sync",
    "get_connection_stats",
    "get_scoped_engine",
    "get_scoped_sql_database",
    "invalidate_schema_cache",
    "track_connection",
]


class ExecutionScope:
    """Track every database resource created inside, and release them all on exit.

    Usable as ``with`` and ``async with``.  An inner scope with the same id joins the
    outer one (its exit releases nothing); a scope with another id is an execution of
    its own.  The exception that ends the block propagates unchanged.

    On exit, idle connections return to the shared pool; a connection still checked
    out is closed (and reported as a leak) unless a statement is in flight on it (on
    another thread): that one is released when returned.  The
    ``with`` form does that on the calling thread; ``async with`` hands it to a release
    thread and awaits it, and a cancellation during the exit cannot drop it.

    Args:
        execution_id: the id; a random one is made up when ``None``.
        manager: the manager to register with; the process default when ``None``.

    Example:
        >>> with ExecutionScope("user-1-conv-9") as scope:  # doctest: +SKIP
        ...     result = await graph.ainvoke(state, config)
    """

    __slots__ = ("_execution", "_requested_id", "_token", "manager")

    def __init__(
        self, execution_id: str | None = None, *, manager: ExecutionConnectionManager | None = None
    ) -> None:
        self.manager = manager or get_connection_manager()
        self._requested_id = execution_id
        self._execution: Execution | None = None
        self._token: contextvars.Token[Any] | None = None

    @property
    def execution_id(self) -> str:
        """The id of this scope's execution (made up on entry when none was given)."""
        if self._execution is not None:
            return self._execution.execution_id
        if self._requested_id is None:
            raise RuntimeError("execution_id is made up on entry; read it inside the scope")
        return self._requested_id

    def _enter(self) -> ExecutionScope:
        if self._execution is not None:
            raise RuntimeError("an ExecutionScope cannot be entered twice; create a new one")
        self._execution = self.manager.open_execution(self._requested_id)
        self._token = enter_scope(self._execution)
        return self

    def _leave(self) -> Execution:
        execution = self._execution
        assert execution is not None, "scope exited without being entered"
        if self._token is not None:
            leave_scope(self._token)
            self._token = None
        return execution

    def __enter__(self) -> ExecutionScope:
        return self._enter()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        reason = "ended" if exc_type is None else f"ended with {exc_type.__name__}"
        self.manager.release_execution(self._leave(), reason=reason)

    async def __aenter__(self) -> ExecutionScope:
        return self._enter()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        reason = "ended" if exc_type is None else f"ended with {exc_type.__name__}"
        await self.manager.arelease_execution(self._leave(), reason=reason)

    def __repr__(self) -> str:
        state = self._execution.state if self._execution is not None else "not entered"
        return f"<ExecutionScope {self._requested_id or '(auto)'!s} {state}>"


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
            ``Runtime`` or ``None`` (LangGraph's current config and runtime).
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
            ``Runtime`` or ``None`` (LangGraph's current config and runtime).
        database_url: another URL than the configured one.
        manager: the manager, when not the process default.
        **options: ``read_only`` (default from the manager), ``statement_timeout``,
            ``max_result_rows``, ``max_result_bytes``, and ``SQLDatabase`` keyword
            arguments such as ``include_tables``.

    Raises:
        NoActiveScopeError: not inside a wrapped graph run or an ExecutionScope.
        ScopeUnavailableError: the run's scope could not be opened.

    Example:
        >>> @tool  # doctest: +SKIP
        ... def run_query(query: str, config: RunnableConfig) -> str:
        ...     return get_scoped_sql_database(config, read_only=True).run(query)
    """
    execution = find_execution(config, manager, what="get_scoped_sql_database()")
    if database_url is None and not options:
        key: tuple[Any, ...] = _DEFAULT_SQL_DATABASE  # the usual call: no key to build
    else:
        sql = _sql_database()
        key = ("sql_database", _url_key(database_url), sql.SchemaCache.options_key(options))
    cached = execution.cached.get(key)
    if cached is None:
        db = _sql_database().new_scoped_sql_database(execution, database_url, **options)
        cached = execution.cached.setdefault(key, db)
    return cached  # type: ignore[no-any-return]


_DEFAULT_SQL_DATABASE = ("sql_database", None, ())
#: langgraph_scoped_conn.sql_database once imported (set only after the import finished)
_sql_database_module: ModuleType | None = None


def _sql_database() -> ModuleType:
    """:mod:`langgraph_scoped_conn.sql_database`, imported on first use (it loads LangChain).

    ``importlib.import_module`` waits for a first import another thread has begun (the
    module's import lock), never returning it half initialised; after that, this is
    one global read.
    """
    global _sql_database_module  # noqa: PLW0603
    if _sql_database_module is None:
        _sql_database_module = importlib.import_module("langgraph_scoped_conn.sql_database")
    return _sql_database_module


def _url_key(database_url: str | URL | None) -> str | None:
    """A cache key for a URL that keeps the password (``str(URL)`` hides it as ``***``)."""
    if database_url is None or isinstance(database_url, str):
        return database_url
    return database_url.render_as_string(hide_password=False)


# -- the guide's functions -------------------------------------------------------------


def create_execution_scoped_engine_sync(
    database_url: str | URL | None = None, **options: Any
) -> ScopedEngine:
    """Synchronous twin of :func:`create_execution_scoped_engine`."""
    execution = find_execution(what="create_execution_scoped_engine()")
    return manager_of(execution).engine_for(execution, database_url, **options)


async def create_execution_scoped_engine(
    database_url: str | URL | None = None, **options: Any
) -> ScopedEngine:
    """Create an engine attached to the current execution, drawing from the shared pool.

    Args:
        database_url: the URL; defaults to the configured URL, then ``DATABASE_URL``.
        **options: SQLAlchemy execution options for the engine.

    Raises:
        NoActiveScopeError: outside any execution scope.
    """
    return create_execution_scoped_engine_sync(database_url, **options)


def create_execution_scoped_sql_database_sync(
    database_url: str | URL | None = None, **options: Any
) -> ScopedSQLDatabase:
    """Synchronous twin of :func:`create_execution_scoped_sql_database`."""
    execution = find_execution(what="create_execution_scoped_sql_database()")
    db: ScopedSQLDatabase = _sql_database().new_scoped_sql_database(
        execution, database_url, **options
    )
    return db


async def create_execution_scoped_sql_database(
    database_url: str | URL | None = None, **options: Any
) -> ScopedSQLDatabase:
    """Create a SQLDatabase attached to the current execution (the guide's API).

    Schema reflection is cached per URL and options, so this costs microseconds
    after the first call in a process.  With no arguments, it uses the configured
    URL: ``configure(database_url=...)``, else ``DATABASE_URL``.

    Args:
        database_url: the URL, or ``None`` for the configured one.
        **options: ``read_only``, ``statement_timeout`` and the keyword arguments of
            ``SQLDatabase`` (``include_tables``, ``sample_rows_in_table_info`` ...).

    Raises:
        NoActiveScopeError: outside any execution scope.
    """
    execution = find_execution(what="create_execution_scoped_sql_database()")
    new = _sql_database().new_scoped_sql_database
    if manager_of(execution).schema_cache.needs_reflection(database_url, options):
        # the first SQLDatabase of a URL reflects the schema: keep that I/O off the loop
        db: ScopedSQLDatabase = await asyncio.to_thread(new, execution, database_url, **options)
        return db
    db = new(execution, database_url, **options)
    return db


def track_connection(obj: Any) -> Any:
    """Attach a closable object (``close``, ``aclose`` or ``dispose``) to the current execution.

    It is closed when the execution ends.  Returns ``obj`` so it can wrap a creation.

    Raises:
        NoActiveScopeError: outside any execution scope.
        TypeError: ``obj`` has no close method.
    """
    execution = find_execution(what="track_connection()")
    manager_of(execution).track(execution, obj)
    return obj


def get_connection_stats() -> dict[str, Any]:
    """Stats of the process-default manager, in the guide's shape plus extra keys."""
    return get_connection_manager().get_stats()


def invalidate_schema_cache(manager: ExecutionConnectionManager | None = None) -> None:
    """Forget reflected schemas, so the next SQLDatabase reflects again (after a migration)."""
    (manager or get_connection_manager()).invalidate_schema_cache()


async def close_database_connections() -> None:
    """Deprecated no-op kept from the guide; scopes release connections on exit."""
    warnings.warn(
        "close_database_connections() does nothing: connections are released when each "
        "ExecutionScope or wrapped graph run ends. Remove the call",
        DeprecationWarning,
        stacklevel=2,
    )
