"""ScopedSQLDatabaseProxy: one ``SQLDatabase`` object that is the current run's scoped one.

``SQLDatabaseToolkit(db=..., llm=...)`` and the tools it makes keep the ``db`` they
were built with, and the tutorial builds them once, at import time, before any run
exists.  The proxy is that ``db``: an instance of langchain-community's
``SQLDatabase`` that holds no engine and no connection, and on every call looks up
the current run's :class:`~langgraph_scoped_conn.ScopedSQLDatabase`, the object
``get_scoped_sql_database(database_url=..., manager=..., **options)`` returns in
that run, and calls it.  Outside a run every call raises
:class:`~langgraph_scoped_conn.NoActiveScopeError`.

What tools read when they are built (``dialect``) comes from the URL, without
connecting.  The proxy is stateless, so copying returns it unchanged; it pickles
without its manager (a bare proxy searches every manager a wrapped graph used), and
shows no password in its ``repr``.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal

from langgraph_scoped_conn.configure import get_connection_manager
from langgraph_scoped_conn.errors import ConfigurationError
from langgraph_scoped_conn.langchain_sql_database import SQLDatabase
from langgraph_scoped_conn.manager import ExecutionConnectionManager
from langgraph_scoped_conn.redaction import redact_url, safe_url
from langgraph_scoped_conn.schema_cache import SCOPE_OPTIONS, check_sql_database_options
from langgraph_scoped_conn.scope import get_scoped_sql_database
from langgraph_scoped_conn.sql_database import ScopedSQLDatabase
from langgraph_scoped_conn.urls import parse_url

if TYPE_CHECKING:
    from sqlalchemy.engine import URL
    from sqlalchemy.sql.expression import Executable

__all__ = ["ScopedSQLDatabaseProxy"]

#: Instance attributes of SQLDatabase / ScopedSQLDatabase that code outside the class
#: reads (``db._engine``, ``db._usable_tables``...): read from the run's object, like
#: the attributes of the ScopedSQLDatabase class.  Any other missing attribute is an
#: AttributeError, so ``hasattr(proxy, "model_dump")`` (asked by serialisers, outside
#: any run) is False instead of an error.
_FORWARDED = frozenset(
    {
        "_engine",
        "_schema",
        "_inspector",
        "_all_tables",
        "_include_tables",
        "_ignore_tables",
        "_usable_tables",
        "_sample_rows_in_table_info",
        "_indexes_in_table_info",
        "_custom_table_info",
        "_max_string_length",
        "_view_support",
        "_metadata",
        "read_only",
    }
)


def _known_options() -> frozenset[str]:
    parameters = inspect.signature(SQLDatabase.__init__).parameters
    return frozenset(parameters) - {"self", "engine"} | SCOPE_OPTIONS


class ScopedSQLDatabaseProxy(SQLDatabase):
    """A ``SQLDatabase`` that is, at each call, the current run's scoped ``SQLDatabase``.

    Build it once, at import time, and give it to anything that wants a
    ``SQLDatabase``; every method call resolves
    ``get_scoped_sql_database(database_url=database_url, manager=manager, **options)``
    in the run that makes it, so each run uses its own scoped object and connections.

    Args:
        database_url: another URL than the manager's.
        manager: the manager; ``None`` uses the process default (and any manager a
            wrapped graph registered), looked up at each call.
        **options: the options of :func:`~langgraph_scoped_conn.get_scoped_sql_database`:
            ``read_only``, ``statement_timeout``, ``max_query_length`` and
            ``SQLDatabase`` keyword arguments such as ``include_tables``.

    Raises:
        ConfigurationError: an option that ``get_scoped_sql_database`` does not take.

    Example:
        >>> db = ScopedSQLDatabaseProxy(read_only=True)  # doctest: +SKIP
        >>> tools = SQLDatabaseToolkit(db=db, llm=model).get_tools()
        >>> graph = with_scoped_connections(create_react_agent(model, tools))
    """

    _lsc_url: str | URL | None
    _lsc_manager: ExecutionConnectionManager | None
    _lsc_options: dict[str, Any]

    def __init__(
        self,
        database_url: str | URL | None = None,
        *,
        manager: ExecutionConnectionManager | None = None,
        **options: Any,
    ) -> None:
        # SQLDatabase.__init__ would connect and reflect: the run's object has done that
        unknown = set(options) - _known_options()
        if unknown:
            raise ConfigurationError(
                f"ScopedSQLDatabaseProxy got unknown option(s) {', '.join(sorted(unknown))}; "
                f"it takes the options of get_scoped_sql_database: "
                f"{', '.join(sorted(_known_options()))}"
            )
        check_sql_database_options(options)
        self._lsc_url = database_url
        self._lsc_manager = manager
        self._lsc_options = dict(options)

    # -- the run's object ----------------------------------------------------------------

    def resolve(self, config: Any = None) -> ScopedSQLDatabase:
        """The current run's scoped SQLDatabase for this proxy's URL and options.

        Args:
            config: a ``RunnableConfig``, ``ToolRuntime`` or ``Runtime``; ``None`` uses
                LangGraph's current config.

        Raises:
            NoActiveScopeError: not inside a wrapped graph run or an ExecutionScope.
            ScopeUnavailableError: the run's scope could not be opened.
        """
        return get_scoped_sql_database(
            config, database_url=self._lsc_url, manager=self._lsc_manager, **self._lsc_options
        )

    def __getattr__(self, name: str) -> Any:
        # only called for attributes the proxy lacks: the SQLDatabase state it never had,
        # and what ScopedSQLDatabase adds (read_only, async methods): the run's object
        if name in _FORWARDED or (not name.startswith("__") and hasattr(ScopedSQLDatabase, name)):
            return getattr(self.resolve(), name)
        raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")

    # -- read without connecting ---------------------------------------------------------

    @property
    def dialect(self) -> str:
        """The SQLAlchemy dialect name of the URL (``"postgresql"``), read without connecting."""
        url = self._lsc_url
        if url is None:  # the manager's URL (its database_url, else DATABASE_URL)
            url = (self._lsc_manager or get_connection_manager()).settings.resolve_url()
        return parse_url(url).get_backend_name()

    # -- every SQLDatabase method: the run's object --------------------------------------

    def get_usable_table_names(self) -> Iterable[str]:
        return self.resolve().get_usable_table_names()

    def get_table_names(self) -> Iterable[str]:
        return self.resolve().get_table_names()

    @property
    def table_info(self) -> str:
        return self.resolve().table_info

    def get_table_info(
        self, table_names: list[str] | None = None, get_col_comments: bool = False
    ) -> str:
        return self.resolve().get_table_info(table_names, get_col_comments=get_col_comments)

    def get_table_info_no_throw(self, table_names: list[str] | None = None) -> str:
        return self.resolve().get_table_info_no_throw(table_names)

    def _get_table_indexes(self, table: Any) -> str:
        return self.resolve()._get_table_indexes(table)

    def _get_sample_rows(self, table: Any) -> str:
        return self.resolve()._get_sample_rows(table)

    def _execute(
        self,
        command: str | Executable,
        fetch: Literal["all", "one", "cursor"] = "all",
        *,
        parameters: dict[str, Any] | None = None,
        execution_options: dict[str, Any] | None = None,
    ) -> Any:
        return self.resolve()._execute(
            command, fetch, parameters=parameters, execution_options=execution_options
        )

    def run(self, command: str | Executable, *args: Any, **kwargs: Any) -> Any:
        return self.resolve().run(command, *args, **kwargs)

    def run_no_throw(self, command: str, *args: Any, **kwargs: Any) -> Any:
        return self.resolve().run_no_throw(command, *args, **kwargs)

    def get_context(self) -> dict[str, Any]:
        return self.resolve().get_context()

    # -- copying, pickling, showing ------------------------------------------------------

    def __copy__(self) -> ScopedSQLDatabaseProxy:
        return self  # stateless: a copy would resolve to the same objects

    def __deepcopy__(self, memo: dict[int, Any]) -> ScopedSQLDatabaseProxy:
        return self

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # a manager holds locks and pools and cannot be pickled; without it, the
        # unpickled proxy searches the default manager and every one a graph registered
        return (_restore, (self._lsc_url, tuple(sorted(self._lsc_options.items()))))

    def __repr__(self) -> str:
        url = self._lsc_url
        if url is None:
            shown = "the manager's URL"
        elif isinstance(url, str):
            shown = redact_url(url)
        else:
            shown = safe_url(url)
        options = "".join(f" {k}={v!r}" for k, v in sorted(self._lsc_options.items()))
        return f"<ScopedSQLDatabaseProxy {shown}{options} (resolves to the current run's)>"


def _restore(database_url: str | URL | None, options: Sequence[tuple[str, Any]]) -> Any:
    return ScopedSQLDatabaseProxy(database_url, **dict(options))
