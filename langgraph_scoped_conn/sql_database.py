"""The SQLDatabase adapter: langchain-community's ``SQLDatabase`` over a scoped engine.

``SQLDatabase(engine)`` reflects the schema on construction (26 statements against
PostgreSQL).  Here reflection runs once per manager, URL and options, into a template
held by the manager's :class:`SchemaCache`; each execution gets a shallow copy of the
template bound to its own scoped engine, which costs microseconds.  Call
:func:`invalidate_schema_cache` after a migration.

langchain-community is imported only here, and its import-time sunset warning is
silenced, so the core never depends on it.
"""

from __future__ import annotations

import re
import threading
import warnings
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.sql.expression import Executable

from langgraph_scoped_conn.engine import mark_clean
from langgraph_scoped_conn.errors import (
    ConfigurationError,
    ReadOnlyViolationError,
    ScopedConnectionError,
)
from langgraph_scoped_conn.guard import check_read_only_sql
from langgraph_scoped_conn.manager import (
    ExecutionConnectionManager,
    get_connection_manager,
    manager_of,
)
from langgraph_scoped_conn.settings import safe_url

with warnings.catch_warnings():
    warnings.filterwarnings(
        "ignore", message=r".*langchain-community.*", category=DeprecationWarning
    )
    from langchain_community.utilities.sql_database import SQLDatabase

if TYPE_CHECKING:
    from sqlalchemy.engine import URL
    from sqlalchemy.engine.reflection import Inspector

    from langgraph_scoped_conn.execution import Execution

__all__ = [
    "SchemaCache",
    "ScopedSQLDatabase",
    "invalidate_schema_cache",
    "new_scoped_sql_database",
    "schema_cache",
]

#: Options of new_scoped_sql_database that are not SQLDatabase keyword arguments.
_SCOPE_OPTIONS = frozenset({"read_only", "statement_timeout", "max_query_length"})
#: Functions that run SQL text of their own, which the guard cannot see into: a guarded
#: statement that names one may leave session state (a prepared statement) behind.
_DYNAMIC_SQL = re.compile(r"(?i)(?:query|cursor)_to_xml|dblink")
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
                _end_read_only(connection, transaction, command)
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
            f"<ScopedSQLDatabase {safe_url(self._engine.url)} "
            f"execution={getattr(self._engine, 'execution_id', None)!r} "
            f"read_only={self._lsc_read_only}>"
        )


def _end_read_only(connection: Any, transaction: Any, command: Any) -> None:
    """End a guarded read-only statement so that it leaves no session state behind.

    Everything a read-only transaction can change is undone by its rollback, except
    session-level advisory locks (``pg_advisory_lock(1)`` is allowed read-only), which
    are dropped in the same transaction before it ends.  The connection is then marked
    clean, so the pool does not reset it; a statement that runs SQL text of its own
    (``query_to_xml('...')``) is not, and the pool resets that session.
    """
    if connection.invalidated:
        return  # the session is gone, and its state with it
    try:
        connection.exec_driver_sql("SELECT pg_advisory_unlock_all()")
        transaction.rollback()
    except SQLAlchemyError:
        return  # a broken connection: the pool resets or discards it
    if not _DYNAMIC_SQL.search(str(command)):
        mark_clean(connection)


class SchemaCache:
    """Reflected schemas of one manager, by URL and SQLDatabase options.

    Reflection runs once per key (26 statements against PostgreSQL), through the
    shared pool; with strategy ``per_execution``, through the asking execution's own
    pool, which is disposed with it, so no connection outlives the executions.
    """

    def __init__(self, manager: ExecutionConnectionManager) -> None:
        self._manager = manager
        self._lock = threading.Lock()
        self._templates: dict[Any, SQLDatabase] = {}

    @staticmethod
    def options_key(options: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
        """A hashable key of SQLDatabase options."""
        if not options:
            return ()
        return tuple(sorted((k, _freeze(v)) for k, v in options.items()))

    def key(self, database_url: str | URL | None, options: Mapping[str, Any]) -> Any:
        """The cache key of a URL and its SQLDatabase options (scope options left out)."""
        parsed, _ = self._manager.resolve_target(database_url)
        sql_options = {k: v for k, v in options.items() if k not in _SCOPE_OPTIONS}
        return (parsed.render_as_string(hide_password=False), self.options_key(sql_options))

    def needs_reflection(self, database_url: str | URL | None, options: Mapping[str, Any]) -> bool:
        """True if a new SQLDatabase for these arguments would reflect the schema (blocking I/O)."""
        if not self._manager.settings.cache_reflection:
            return True
        return self.key(database_url, options) not in self._templates

    def template(
        self, engine: Engine, database_url: str | URL | None, options: dict[str, Any]
    ) -> SQLDatabase:
        """The reflected SQLDatabase for ``options``; ``engine`` is the asking execution's."""
        if options.get("lazy_table_reflection"):
            raise ValueError(
                "lazy_table_reflection=True is not supported by scoped SQLDatabase objects: "
                "they share one reflected schema; leave it False (reflection is cached anyway)"
            )
        if not self._manager.settings.cache_reflection:
            return _reflect(engine, options)
        key = self.key(database_url, options)
        template = self._templates.get(key)
        if template is None:
            with self._lock:
                template = self._templates.get(key)
                if template is None:
                    _, handle = self._manager.resolve_target(database_url)
                    template = _reflect(handle.engine if handle is not None else engine, options)
                    template._engine = None  # type: ignore[assignment]  # copies get their own
                    self._templates[key] = template
        return template

    def clear(self) -> None:
        with self._lock:
            self._templates.clear()


_caches: weakref.WeakKeyDictionary[ExecutionConnectionManager, SchemaCache] = (
    weakref.WeakKeyDictionary()
)
_caches_lock = threading.Lock()


def schema_cache(manager: ExecutionConnectionManager) -> SchemaCache:
    """The schema cache of ``manager``, created on first use."""
    cache = _caches.get(manager)
    if cache is None:
        with _caches_lock:
            cache = _caches.setdefault(manager, SchemaCache(manager))
    return cache


def _reflect(engine: Engine, options: dict[str, Any]) -> SQLDatabase:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return SQLDatabase(engine, **options)


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
    manager = manager_of(execution)
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
    template = schema_cache(manager).template(engine, database_url, options)
    db: ScopedSQLDatabase = ScopedSQLDatabase.__new__(ScopedSQLDatabase)
    state = dict(template.__dict__)
    state.pop("_inspector", None)
    db.__dict__.update(state)
    db._engine = engine
    db._lsc_inspector = None
    db._lsc_read_only = read_only
    db._lsc_statement_timeout = statement_timeout
    db._lsc_max_query_length = max_query_length
    execution.add("databases", db)
    return db


def invalidate_schema_cache(manager: ExecutionConnectionManager | None = None) -> None:
    """Forget reflected schemas, so the next SQLDatabase reflects again (after a migration)."""
    schema_cache(manager or get_connection_manager()).clear()
