"""The SQLDatabase adapter: langchain-community's ``SQLDatabase`` over a scoped engine.

``SQLDatabase(engine)`` reflects the schema on construction (26 statements against
PostgreSQL).  Here reflection runs once per manager, URL and options, into a template
held by the manager's :class:`~langgraph_scoped_conn.schema_cache.SchemaCache`; each
execution gets a shallow copy of the template bound to its own scoped engine, which
costs microseconds.  Call ``invalidate_schema_cache()`` after a migration.

In write mode a lone statement runs in autocommit mode in one round trip; one that
provably changed nothing in the session (:mod:`langgraph_scoped_conn.stateless`) leaves
its connection clean, so the next execution that gets it pays no reset.

In read-only mode every statement passes the guard (:mod:`langgraph_scoped_conn.guard`)
and runs in a read-only transaction, and its rows are fetched through a cursor, a few
at a time, up to ``max_result_rows`` and ``max_result_bytes``: rows past the cap never
reach the process, and the text returned says the result was cut.

langchain-community comes in through :mod:`langgraph_scoped_conn.langchain_sql_database`,
its sunset warning silenced; the core never depends on it.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.expression import Executable

from langgraph_scoped_conn.engine import mark_clean
from langgraph_scoped_conn.errors import ConfigurationError, ReadOnlyViolationError
from langgraph_scoped_conn.guard import CheckedQuery, inspect_read_only_sql
from langgraph_scoped_conn.langchain_sql_database import SQLDatabase
from langgraph_scoped_conn.manager import manager_of
from langgraph_scoped_conn.redaction import redact_url, safe_url
from langgraph_scoped_conn.results import (
    CURSOR,
    collecting_cuts,
    fetch_comment,
    fetch_cursor,
    rows,
    rows_within,
)
from langgraph_scoped_conn.schema_cache import SchemaCache
from langgraph_scoped_conn.stateless import (
    CATALOG_SQL,
    DYNAMIC_SQL,
    DatabaseCatalog,
    leaves_no_state,
    may_read_only,
)

if TYPE_CHECKING:
    from sqlalchemy.engine.reflection import Inspector

    from langgraph_scoped_conn.engine import ScopedEngine
    from langgraph_scoped_conn.execution import Execution

__all__ = ["SchemaCache", "ScopedSQLDatabase", "new_scoped_sql_database"]

logger = logging.getLogger("langgraph_scoped_conn")

#: SQLSTATE codes that mean "refused because the transaction is read-only" (25006), or
#: "cannot do this inside the read-only transaction" (25001, e.g. set_config of
#: transaction_read_only).
_READ_ONLY_SQLSTATES = frozenset({"25006", "25001"})
_READ_ONLY_DIALECTS = ("postgresql", "sqlite")
#: One plain statement that is a transaction of its own in autocommit mode, exactly as
#: between BEGIN and COMMIT: it starts with a query, DML, SHOW or EXPLAIN keyword and has
#: no semicolon but an optional last one (a semicolon anywhere else, even in a string or
#: a comment, takes the BEGIN/COMMIT path: that errs on the safe side).
_LONE_STATEMENT = re.compile(
    r"\s*(?:select|insert|update|delete|with|values|table|merge|show|explain)\b[^;]*;?\s*",
    re.IGNORECASE,
)
#: Ends a read-only transaction in one round trip, whether the query succeeded or
#: failed: the rollback works in an aborted transaction too (and closes the cursor), and
#: the session advisory locks the query may have taken are dropped after it.
_END_READ_ONLY = "ROLLBACK; SELECT pg_advisory_unlock_all()"
_UNCHANGED = object()


class ScopedSQLDatabase(SQLDatabase):
    """A ``SQLDatabase`` bound to one execution's scoped engine.

    Behaves like ``langchain_community``'s ``SQLDatabase``.  Differences:

    * the schema comes from a per-URL reflection cache instead of being reflected
      again;
    * with ``read_only=True`` every statement passes the read-only guard, runs in a
      read-only transaction with a statement timeout that is rolled back afterwards,
      and returns at most ``max_result_rows`` rows and about ``max_result_bytes`` of
      text (saying so when it cut);
    * on PostgreSQL, ``schema=`` uses ``SET LOCAL search_path``, so it cannot leak to
      the next execution through the shared pool;
    * ``run_no_throw`` returns ``"Error: ..."`` for every error, never raises.
    """

    _lsc_read_only: bool
    _lsc_statement_timeout: float | None
    _lsc_max_query_length: int
    _lsc_max_result_rows: int
    _lsc_max_result_bytes: int
    _lsc_url_text: str
    _lsc_inspector: Inspector | None
    _engine: ScopedEngine

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
        if not self._lsc_read_only and (
            dialect not in ("postgresql", "sqlite") or (dialect == "sqlite" and fetch != "cursor")
        ):
            # SQLite in write mode needs nothing of its own (no session state to guard, no
            # round trips to save): SQLDatabase's own transaction is the cheapest path.  A
            # "cursor" fetch takes the path below, which returns it frozen (the connection
            # is closed by then)
            return super()._execute(
                command, fetch, parameters=parameters, execution_options=execution_options
            )
        checked = None
        if self._lsc_read_only:
            if not isinstance(command, str):
                raise ReadOnlyViolationError(
                    "read-only mode runs SQL text only, so the guard can check it; "
                    f"got {type(command).__name__}"
                )
            checked = self._check(command, dialect)
            command = checked.text
        if (
            dialect == "postgresql"
            and isinstance(command, str)
            and (
                self._lsc_read_only
                or (
                    self._schema is None
                    and not execution_options
                    and _LONE_STATEMENT.fullmatch(command) is not None
                )
            )
        ):
            return self._execute_autocommit(command, fetch, parameters, execution_options, checked)
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
                result = self._fetch(cursor, fetch)
            except DBAPIError as exc:
                transaction.rollback()
                if self._lsc_read_only:
                    _raise_if_read_only_refusal(exc)
                raise
            except BaseException:
                transaction.rollback()
                raise
            finally:
                if connection.info.pop("langgraph_scoped_conn.query_only", False):
                    if connection.in_transaction():
                        transaction.rollback()
                    connection.exec_driver_sql("PRAGMA query_only = OFF")
            if connection.in_transaction():
                # the connection's current transaction: after the SQLite PRAGMA above it is
                # a new, autobegun one, and ``transaction`` is already rolled back
                if self._lsc_read_only:
                    connection.rollback()
                else:
                    connection.commit()
            return result

    def _check(self, command: str, dialect: str) -> CheckedQuery:
        """The read-only guard, with the database's function catalog once it is known."""
        catalog = self._catalog() if dialect == "postgresql" else None
        return inspect_read_only_sql(
            command, max_length=self._lsc_max_query_length, dialect=dialect, functions=catalog
        )

    def _catalog(self) -> DatabaseCatalog | None:
        """The database's catalog, if a query has read it yet."""
        manager = manager_of(self._engine._lsc_execution)
        catalog: DatabaseCatalog | None = manager.schema_cache.catalog(self._lsc_url_text)
        return catalog

    def _read_catalog(self, connection: Any) -> DatabaseCatalog:
        """Read the database's functions, relations and their safety on ``connection``
        (autocommit; see :mod:`langgraph_scoped_conn.stateless`)."""
        manager = manager_of(self._engine._lsc_execution)
        rows = connection.exec_driver_sql(CATALOG_SQL).fetchall()
        catalog = DatabaseCatalog(
            ((r[0], r[1], r[2], r[3]) for r in rows), manager.settings.allow_functions
        )
        manager.schema_cache.remember_catalog(self._lsc_url_text, catalog)
        return catalog

    def _leaves_no_state(self, connection: Any, command: str) -> bool:
        """Whether a write-mode statement that just ran provably left no session state."""
        if not may_read_only(command):
            return False  # a write: not even parsed
        try:
            catalog = self._catalog()
            if catalog is None:  # this database's first query that needs it
                catalog = self._read_catalog(connection)
            return leaves_no_state(command, catalog, self._lsc_max_query_length)
        except Exception as exc:  # the statement ran: its connection just stays marked
            logger.debug("could not check a statement for session state: %s", type(exc).__name__)
            return False

    def _execute_autocommit(
        self,
        command: str,
        fetch: Literal["all", "one", "cursor"],
        parameters: dict[str, Any] | None,
        execution_options: dict[str, Any] | None,
        checked: CheckedQuery | None,
    ) -> Any:
        """PostgreSQL with the connection in autocommit mode, to save round trips.

        A guarded read-only query costs three: ``BEGIN READ ONLY; SET LOCAL
        statement_timeout = N; DECLARE ... CURSOR FOR <query>`` in one, ``FETCH`` of
        its first rows, and ``ROLLBACK; SELECT pg_advisory_unlock_all()`` in one (a
        result larger than the first fetch costs more fetches, until the caps).  A lone
        plain statement (:data:`_LONE_STATEMENT`) is a transaction of its own, exactly
        as between the driver's BEGIN and COMMIT, and costs one; if it provably left no
        session state (:mod:`langgraph_scoped_conn.stateless`), its connection needs no
        reset when it changes hands.  The connection leaves autocommit mode before it
        goes back to the pool; one whose transaction could not be ended is invalidated,
        never handed out again.
        """
        read_only = checked is not None
        clean = False
        with self._engine.connect() as connection:
            raw: Any = connection.connection.driver_connection
            raw.autocommit = True
            in_transaction = False
            threshold = _UNCHANGED
            if read_only and hasattr(raw, "prepare_threshold"):
                # psycopg 3 prepares a statement on its 5th run and forgets every prepared
                # statement when it sees the ROLLBACK below (then DEALLOCATE ALL): a
                # statement that is rolled back right after gains nothing from it
                threshold, raw.prepare_threshold = raw.prepare_threshold, None
            try:
                if checked is not None:
                    if self._catalog() is None:  # this database's first read-only query
                        checked = inspect_read_only_sql(
                            command,
                            max_length=self._lsc_max_query_length,
                            functions=self._read_catalog(connection),
                        )
                    in_transaction = True  # from here on only the end may leave it
                    result = self._read(connection, raw, checked, fetch, parameters)
                else:
                    cursor = connection.execute(
                        text(command), parameters or {}, execution_options=execution_options or {}
                    )
                    result = self._fetch(cursor, fetch)
                    clean = self._leaves_no_state(connection, command)
            except DBAPIError as exc:
                if read_only:
                    _raise_if_read_only_refusal(exc)
                raise
            finally:
                ended = _end_autocommit(connection, raw, in_transaction)
                if threshold is not _UNCHANGED:
                    raw.prepare_threshold = threshold
            if ended and (clean or (read_only and not DYNAMIC_SQL.search(command))):
                # read-only: the rollback undid everything the statement could change,
                # the unlock the session advisory locks; a statement that runs SQL text of
                # its own is not marked, and the next owner resets that session
                mark_clean(connection)
            return result

    def _read(
        self,
        connection: Any,
        raw: Any,
        checked: CheckedQuery,
        fetch: Literal["all", "one", "cursor"],
        parameters: dict[str, Any] | None,
    ) -> Any:
        """Run a guarded query in a read-only transaction; fetch its rows within the caps."""
        begin = self._begin_read_only()
        if self._schema is not None:
            _simple_query(raw, begin)
            connection.exec_driver_sql(
                "SELECT set_config('search_path', %(schema)s, true)", {"schema": self._schema}
            )
            begin = ""
        if checked.cursor and not parameters:
            declare = f"DECLARE {CURSOR} NO SCROLL CURSOR FOR {checked.text}"
            _simple_query(raw, f"{begin}; {declare}" if begin else declare)
            return fetch_cursor(
                connection,
                fetch,
                comment=fetch_comment(checked.text),
                max_rows=self._lsc_max_result_rows,
                max_bytes=self._lsc_max_result_bytes,
            )
        if begin:
            _simple_query(raw, begin)
        cursor = connection.execute(text(checked.text), parameters or {})
        return self._fetch(cursor, fetch)

    def _fetch(self, cursor: Any, fetch: str) -> Any:
        """Rows of a plain result; within the caps in read-only mode (``fetchmany``)."""
        if not self._lsc_read_only:
            return rows(cursor, fetch)
        return rows_within(
            cursor,
            fetch,
            max_rows=self._lsc_max_result_rows,
            max_bytes=self._lsc_max_result_bytes,
        )

    def _begin_read_only(self) -> str:
        timeout = self._lsc_statement_timeout
        if timeout is None:
            return "BEGIN READ ONLY"
        return f"BEGIN READ ONLY; SET LOCAL statement_timeout = {max(int(timeout * 1000), 1)}"

    def _prepare_transaction(self, connection: Any, dialect: str) -> None:
        if dialect == "postgresql":
            # read-only PostgreSQL statements take _execute_autocommit
            if self._schema is not None:
                connection.exec_driver_sql(
                    "SELECT set_config('search_path', %(schema)s, true)", {"schema": self._schema}
                )
        elif dialect == "sqlite" and self._lsc_read_only:
            # query_only lasts for the connection; _execute turns it off in its finally
            connection.exec_driver_sql("PRAGMA query_only = ON")
            connection.info["langgraph_scoped_conn.query_only"] = True

    def run(self, command: str | Executable, *args: Any, **kwargs: Any) -> Any:
        """Like ``SQLDatabase.run``; in ``async def`` code, use :meth:`arun` instead.

        A read-only result cut at ``max_result_rows`` / ``max_result_bytes`` ends with a
        line saying so.  Called on a thread that runs an event loop, it blocks every task
        of that loop until the database answers, and logs one WARNING per manager.
        """
        if asyncio._get_running_loop() is not None:
            self._warn_on_loop()
        return self._run(command, *args, **kwargs)

    def _run(self, command: str | Executable, *args: Any, **kwargs: Any) -> Any:
        with collecting_cuts() as cut:
            out = super().run(command, *args, **kwargs)
        if cut.note and isinstance(out, str):
            out += cut.note
        return out

    async def arun(self, command: str | Executable, *args: Any, **kwargs: Any) -> Any:
        """``run()`` in a worker thread, so the event loop keeps running meanwhile.

        Same arguments and result as ``run()``; it draws from the same budget, and
        raises ``ScopeClosedError`` once the execution has ended, as ``run()`` does.
        """
        return await asyncio.to_thread(self._run, command, *args, **kwargs)

    async def arun_no_throw(self, command: str, *args: Any, **kwargs: Any) -> Any:
        """``run_no_throw()`` in a worker thread: errors come back as ``"Error: ..."`` text."""
        return await asyncio.to_thread(self._run_no_throw, command, *args, **kwargs)

    async def aget_table_info(self, table_names: list[str] | None = None, **kwargs: Any) -> str:
        """``get_table_info()`` in a worker thread (it may query sample rows)."""
        return await asyncio.to_thread(self.get_table_info, table_names, **kwargs)

    def _warn_on_loop(self) -> None:
        execution = getattr(self._engine, "_lsc_execution", None)
        if execution is None or not manager_of(execution).warn_once("run_on_loop"):
            return
        logger.warning(
            "ScopedSQLDatabase.run() was called on the event loop thread; it blocks every run "
            "of this loop until the database answers. Use `await db.arun(...)` (or "
            "`await db.arun_no_throw(...)`) in async tools. Logged once per manager"
        )

    def run_no_throw(self, command: str, *args: Any, **kwargs: Any) -> Any:
        """Like ``SQLDatabase.run_no_throw``: every error comes back as ``"Error: ..."`` text.

        Refusals of the read-only guard, budget errors, and errors a driver raises for
        text it cannot send (a lone surrogate) are returned the same way, so a model
        sees them; no password is ever in the text.
        """
        if asyncio._get_running_loop() is not None:
            self._warn_on_loop()
        return self._run_no_throw(command, *args, **kwargs)

    def _run_no_throw(self, command: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return self._run(command, *args, **kwargs)
        except Exception as exc:
            return f"Error: {redact_url(str(exc))}"

    def __repr__(self) -> str:
        return (
            f"<ScopedSQLDatabase {safe_url(self._engine.url)} "
            f"execution={getattr(self._engine, 'execution_id', None)!r} "
            f"read_only={self._lsc_read_only}>"
        )


def _raise_if_read_only_refusal(exc: DBAPIError) -> None:
    """Raise ReadOnlyViolationError if the database refused ``exc``'s statement as a write."""
    code = getattr(exc.orig, "pgcode", None) or getattr(exc.orig, "sqlstate", None)
    if code in _READ_ONLY_SQLSTATES or "readonly database" in str(exc.orig):
        reason = str(exc.orig).strip().splitlines()[0] if str(exc.orig) else code
        raise ReadOnlyViolationError(
            f"the database refused this statement in read-only mode ({reason}); "
            "only queries that read may run here"
        ) from exc


def _simple_query(dbapi_connection: Any, sql: str) -> None:
    """Send ``sql`` (several statements allowed) as one simple-protocol query."""
    cursor = dbapi_connection.cursor()
    try:
        if hasattr(dbapi_connection, "prepare_threshold"):
            # psycopg 3: never as a prepared statement, which holds one statement only
            cursor.execute(sql, prepare=False)
        else:
            cursor.execute(sql)
    finally:
        cursor.close()


def _end_autocommit(connection: Any, dbapi_connection: Any, in_transaction: bool) -> bool:
    """End :meth:`ScopedSQLDatabase._execute_autocommit`'s transaction, leave autocommit.

    True when the session is back to where it was, with nothing left behind; otherwise
    the connection is invalidated (closed, never handed out again) and False returned.
    """
    if connection.invalidated:
        return False  # the session is gone, and its state with it
    try:
        if in_transaction:
            _simple_query(dbapi_connection, _END_READ_ONLY)
        if connection.in_transaction():
            # SQLAlchemy's bookkeeping only: the server has no transaction open, so
            # neither driver sends anything
            connection.rollback()
        dbapi_connection.autocommit = False
    except Exception as exc:
        logger.debug("could not end a statement's transaction: %s", type(exc).__name__)
        if not connection.invalidated:
            connection.invalidate()
        return False
    return True


def new_scoped_sql_database(
    execution: Execution, database_url: str | URL | None = None, **options: Any
) -> ScopedSQLDatabase:
    """A new ScopedSQLDatabase for ``execution`` (recorded under ``sql_databases``)."""
    manager = manager_of(execution)
    cache = manager.schema_cache
    settings = manager.settings
    read_only = bool(options.pop("read_only", settings.read_only))
    plain = not options  # the manager's defaults but read_only (a URL object is never kept)
    if plain:
        ready = cache.ready(database_url, read_only)
        if ready is not None:  # the usual call, after the first: copy and bind
            attributes, handle = ready
            engine = handle.scoped_engine(execution)
            db: ScopedSQLDatabase = ScopedSQLDatabase.__new__(ScopedSQLDatabase)
            db.__dict__ = attributes.copy()
            db._engine = engine
            execution.add_engine_and_database(engine, db)
            return db
    overrides = {name: options.pop(name) for name in _CAP_OPTIONS if name in options}
    if overrides:
        _check_caps(overrides)
    scope_options = {
        f"_lsc_{name}": overrides.get(name, getattr(settings, name)) for name in _CAP_OPTIONS
    }
    engine = manager.engine_for(execution, database_url)
    if read_only and engine.dialect.name not in _READ_ONLY_DIALECTS:
        raise ConfigurationError(
            f"read_only=True needs PostgreSQL or SQLite, which can run a statement in a "
            f"read-only transaction; {engine.dialect.name} cannot. Connect with a database "
            "role that may only SELECT and pass read_only=False"
        )
    state = cache.state(engine, database_url, options)
    db = ScopedSQLDatabase.__new__(ScopedSQLDatabase)
    attributes = state.copy()
    attributes["_lsc_inspector"] = None
    attributes["_lsc_read_only"] = read_only
    attributes["_lsc_url_text"] = cache.url_text(database_url)
    attributes.update(scope_options)
    if plain and engine._lsc_handle.strategy != "per_execution":
        cache.remember_ready(database_url, read_only, attributes.copy(), engine._lsc_handle)
    attributes["_engine"] = engine
    db.__dict__ = attributes
    execution.add("databases", db)
    return db


#: per-call overrides of the settings' caps a ScopedSQLDatabase takes
_CAP_OPTIONS = ("statement_timeout", "max_query_length", "max_result_rows", "max_result_bytes")


def _check_caps(overrides: dict[str, Any]) -> None:
    """Check per-call overrides of the settings' caps (same rules as configure())."""
    from langgraph_scoped_conn.settings import ScopedConnSettings

    ScopedConnSettings(**overrides)
