"""The SQLDatabase adapter: langchain-community's ``SQLDatabase`` over a scoped engine.

``SQLDatabase(engine)`` reflects the schema on construction (26 statements against
PostgreSQL).  Here reflection runs once per URL and options, into a template; each
execution gets a shallow copy of the template bound to its own scoped engine, which
costs microseconds.  Call :meth:`ExecutionConnectionManager.invalidate_schema_cache
<langgraph_scoped_conn.sql_database.invalidate_schema_cache>` after a migration.

langchain-community is imported only here, and its import-time sunset warning is
silenced, so the core never depends on it.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.sql.expression import Executable

from langgraph_scoped_conn.errors import (
    ConfigurationError,
    ReadOnlyViolationError,
    ScopedConnectionError,
)
from langgraph_scoped_conn.guard import check_read_only_sql

with warnings.catch_warnings():
    warnings.filterwarnings(
        "ignore", message=r".*langchain-community.*", category=DeprecationWarning
    )
    from langchain_community.utilities.sql_database import SQLDatabase

if TYPE_CHECKING:
    from sqlalchemy.engine import URL
    from sqlalchemy.engine.reflection import Inspector

    from langgraph_scoped_conn.registry import Execution, ExecutionConnectionManager

__all__ = ["ScopedSQLDatabase", "invalidate_schema_cache", "new_scoped_sql_database"]

#: Options of new_scoped_sql_database that are not SQLDatabase keyword arguments.
_SCOPE_OPTIONS = frozenset({"read_only", "statement_timeout", "max_query_length"})
_template_lock = threading.Lock()
#: SQLSTATE codes that mean "refused because the transaction is read-only" (25006), or
#: "cannot do this inside the read-only transaction" (25001, e.g. set_config of
#: transaction_read_only).
_READ_ONLY_SQLSTATES = frozenset({"25006", "25001"})
_READ_ONLY_DIALECTS = ("postgresql", "sqlite")


class ScopedSQLDatabase(SQLDatabase):
    """A ``SQLDatabase`` bound to one execution's scoped engine.

    Behaves like ``langchain_community``'s ``SQLDatabase``.  Differences:

    * the schema comes from a per-URL reflection cache instead of being reflected
      again;
    * with ``read_only=True`` every statement passes the read-only guard and runs in
      a read-only transaction with a statement timeout that is rolled back afterwards;
    * on PostgreSQL, ``schema=`` uses ``SET LOCAL search_path``, so it cannot leak to
      the next execution through the shared pool.
    """

    _lsc_read_only: bool
    _lsc_statement_timeout: float | None
    _lsc_max_query_length: int
    _lsc_inspector: Inspector | None

    @property
    def _inspector(self) -> Inspector:
        # created on first use from this execution's engine; most runs never need it
        if self._lsc_inspector is None:
            from sqlalchemy import inspect

            self._lsc_inspector = inspect(self._engine)
        return self._lsc_inspector

    @_inspector.setter
    def _inspector(self, value: Inspector) -> None:
        self._lsc_inspector = value

    @property
    def read_only(self) -> bool:
        """Whether statements run through the read-only guard."""
        return self._lsc_read_only

    def _execute(
        self,
        command: str | Executable,
        fetch: Literal["all", "one", "cursor"] = "all",
        *,
        parameters: dict[str, Any] | None = None,
        execution_options: dict[str, Any] | None = None,
    ) -> Any:
        dialect = self._engine.dialect.name
        if not self._lsc_read_only and dialect not in ("postgresql", "sqlite"):
            return super()._execute(
                command, fetch, parameters=parameters, execution_options=execution_options
            )
        if self._lsc_read_only:
            if not isinstance(command, str):
                raise ReadOnlyViolationError(
                    "read-only mode runs SQL text only, so the guard can check it; "
                    f"got {type(command).__name__}"
                )
            command = check_read_only_sql(
                command, max_length=self._lsc_max_query_length, dialect=dialect
            )
        if isinstance(command, str):
            command = text(command)
        elif not isinstance(command, Executable):
            raise TypeError(f"Query expression has unknown type: {type(command)}")
        with self._engine.connect() as connection:
            transaction = connection.begin()
            try:
                self._prepare_transaction(connection, dialect)
                cursor = connection.execute(
                    command, parameters or {}, execution_options=execution_options or {}
                )
                result: Any = []
                if cursor.returns_rows:
                    if fetch == "all":
                        result = [x._asdict() for x in cursor.fetchall()]
                    elif fetch == "one":
                        first = cursor.fetchone()
                        result = [] if first is None else [first._asdict()]
                    elif fetch == "cursor":
                        result = cursor.freeze()
                    else:
                        raise ValueError("Fetch parameter must be either 'one', 'all', or 'cursor'")
            except DBAPIError as exc:
                transaction.rollback()
                code = getattr(exc.orig, "pgcode", None) or getattr(exc.orig, "sqlstate", None)
                if self._lsc_read_only and (
                    code in _READ_ONLY_SQLSTATES or "readonly database" in str(exc.orig)
                ):
                    reason = str(exc.orig).strip().splitlines()[0] if str(exc.orig) else code
                    raise ReadOnlyViolationError(
                        f"the database refused this statement in read-only mode ({reason}); "
                        "only queries that read may run here"
                    ) from exc
                raise
            except BaseException:
                transaction.rollback()
                raise
            finally:
                if connection.info.pop("langgraph_scoped_conn.query_only", False):
                    if connection.in_transaction():
                        transaction.rollback()
                    connection.exec_driver_sql("PRAGMA query_only = OFF")
                if self._lsc_read_only and dialect == "postgresql":
                    _release_session_locks(connection, transaction)
            if connection.in_transaction():
                # the connection's current transaction: after the SQLite PRAGMA above it is
                # a new, autobegun one, and ``transaction`` is already rolled back
                if self._lsc_read_only:
                    connection.rollback()
                else:
                    connection.commit()
            return result

    def _prepare_transaction(self, connection: Any, dialect: str) -> None:
        if dialect == "postgresql":
            if self._lsc_read_only:
                connection.exec_driver_sql("SET TRANSACTION READ ONLY")
            timeout = self._lsc_statement_timeout
            if timeout is not None and self._lsc_read_only:
                connection.exec_driver_sql(
                    f"SET LOCAL statement_timeout = {max(int(timeout * 1000), 1)}"
                )
            if self._schema is not None:
                connection.exec_driver_sql(
                    "SELECT set_config('search_path', %(schema)s, true)", {"schema": self._schema}
                )
        elif dialect == "sqlite" and self._lsc_read_only:
            # query_only lasts for the connection; _execute turns it off in its finally
            connection.exec_driver_sql("PRAGMA query_only = ON")
            connection.info["langgraph_scoped_conn.query_only"] = True

    def run_no_throw(self, command: str, *args: Any, **kwargs: Any) -> Any:
        """Like ``SQLDatabase.run_no_throw``: errors come back as ``"Error: ..."`` text.

        Refusals of the read-only guard are returned the same way, so a model sees them.
        """
        try:
            return super().run_no_throw(command, *args, **kwargs)
        except ScopedConnectionError as exc:
            return f"Error: {exc}"

    def __repr__(self) -> str:
        return (
            f"<ScopedSQLDatabase {self._engine.url.render_as_string(hide_password=True)} "
            f"execution={getattr(self._engine, 'execution_id', None)!r} "
            f"read_only={self._lsc_read_only}>"
        )


def _release_session_locks(connection: Any, transaction: Any) -> None:
    """Drop the session-level advisory locks a read-only statement took.

    ``SELECT pg_advisory_lock(1)`` (also hidden in ``query_to_xml('...')``) is allowed
    in a read-only transaction and outlives its rollback, so the pooled connection
    would hold the lock for the next execution and beyond.
    """
    if connection.invalidated:
        return  # the session is gone, and its locks with it
    try:
        if transaction.is_active:
            transaction.rollback()
        connection.exec_driver_sql("SELECT pg_advisory_unlock_all()")
    except SQLAlchemyError:
        pass  # a broken connection: the pool discards it, which ends the session's locks


def options_key(options: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    """A hashable key of SQLDatabase options, for caches."""
    if not options:
        return ()
    return tuple(sorted((k, _freeze(v)) for k, v in options.items()))


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, list | tuple | set | frozenset):
        return tuple(sorted(map(str, value)))
    return value


def new_scoped_sql_database(
    execution: Execution, database_url: str | URL | None = None, **options: Any
) -> ScopedSQLDatabase:
    """A new ScopedSQLDatabase for ``execution`` (recorded under ``sql_databases``)."""
    manager = execution.manager
    settings = manager.settings
    read_only = bool(options.pop("read_only", settings.read_only))
    statement_timeout = options.pop("statement_timeout", settings.statement_timeout)
    max_query_length = options.pop("max_query_length", settings.max_query_length)
    engine = manager.engine_for(execution, database_url)
    if read_only and engine.dialect.name not in _READ_ONLY_DIALECTS:
        raise ConfigurationError(
            f"read_only=True needs PostgreSQL or SQLite, which can run a statement in a "
            f"read-only transaction; {engine.dialect.name} cannot. Connect with a database "
            "role that may only SELECT and pass read_only=False"
        )
    template = _template(manager, engine, database_url, options)
    db: ScopedSQLDatabase = ScopedSQLDatabase.__new__(ScopedSQLDatabase)
    state = dict(template.__dict__)
    state.pop("_inspector", None)
    db.__dict__.update(state)
    db._engine = engine
    db._lsc_inspector = None
    db._lsc_read_only = read_only
    db._lsc_statement_timeout = statement_timeout
    db._lsc_max_query_length = max_query_length
    with execution._mutex:
        execution._check_usable()
        execution.databases.append(db)
    return db


def _template(
    manager: ExecutionConnectionManager,
    engine: Engine,
    database_url: str | URL | None,
    options: dict[str, Any],
) -> Any:
    if options.get("lazy_table_reflection"):
        raise ValueError(
            "lazy_table_reflection=True is not supported by scoped SQLDatabase objects: they "
            "share one reflected schema; leave it False (reflection is cached per URL anyway)"
        )
    if not manager.settings.cache_reflection:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return SQLDatabase(engine, **options)
    handle = manager.pool_for(database_url)
    key = (handle.safe_url, id(handle), options_key(options))
    cache = manager._reflection
    template = cache.get(key)
    if template is None:
        with _template_lock:
            template = cache.get(key)
            if template is None:
                template = SQLDatabase(handle.engine, **options)
                cache[key] = template
    return template


def needs_reflection(
    manager: ExecutionConnectionManager, database_url: str | URL | None, options: Mapping[str, Any]
) -> bool:
    """True if a new SQLDatabase for these arguments would reflect the schema (blocking I/O)."""
    if not manager.settings.cache_reflection:
        return True
    sql_options = {k: v for k, v in options.items() if k not in _SCOPE_OPTIONS}
    handle = manager.pool_for(database_url)
    return (handle.safe_url, id(handle), options_key(sql_options)) not in manager._reflection


def invalidate_schema_cache(manager: ExecutionConnectionManager | None = None) -> None:
    """Forget reflected schemas, so the next SQLDatabase reflects again (after a migration)."""
    if manager is None:
        from langgraph_scoped_conn.scope import get_connection_manager

        manager = get_connection_manager()
    with _template_lock:
        manager._reflection.clear()
