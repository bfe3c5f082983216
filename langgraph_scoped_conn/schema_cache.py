"""The reflected-schema cache: one reflection per manager, URL and SQLDatabase options.

``SQLDatabase(engine)`` reflects the schema on construction (26 statements against
PostgreSQL).  Each manager owns a :class:`SchemaCache` that does that once per key and
keeps the result as a template; each execution's SQLDatabase is a shallow copy of it
bound to the execution's engine (:mod:`langgraph_scoped_conn.sql_database`).  Call
``invalidate_schema_cache()`` after a migration.

langchain-community is imported on the first reflection, not with this module: the
manager holds its cache from the start, and an app that never asks for a SQLDatabase
never loads it.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from langgraph_scoped_conn.errors import ConfigurationError

if TYPE_CHECKING:
    from sqlalchemy.engine import URL, Engine

    from langgraph_scoped_conn.engine import PoolHandle
    from langgraph_scoped_conn.langchain_sql_database import SQLDatabase
    from langgraph_scoped_conn.settings import ScopedConnSettings

__all__ = ["SCOPE_OPTIONS", "SchemaCache", "check_sql_database_options"]

#: Options of a scoped SQLDatabase that are not SQLDatabase keyword arguments.
SCOPE_OPTIONS = frozenset(
    {"read_only", "statement_timeout", "max_query_length", "max_result_rows", "max_result_bytes"}
)


class Pools(Protocol):
    """What the cache needs from its manager."""

    settings: ScopedConnSettings

    def resolve_target(self, url: str | URL | None) -> tuple[URL, PoolHandle | None]: ...


def check_sql_database_options(options: Mapping[str, Any]) -> None:
    """Refuse SQLDatabase options a scoped SQLDatabase cannot honour.

    Raises:
        ConfigurationError: ``lazy_table_reflection=True``.
    """
    if options.get("lazy_table_reflection"):
        raise ConfigurationError(
            "lazy_table_reflection=True is not supported by scoped SQLDatabase objects: "
            "they share one reflected schema; leave it False (reflection is cached anyway)"
        )


class SchemaCache:
    """Reflected schemas of one manager, by URL and SQLDatabase options.

    Reflection runs once per key (26 statements against PostgreSQL), through the
    shared pool; with strategy ``per_execution``, through the asking execution's own
    pool, which is disposed with it, so no connection outlives the executions.  A
    caller that asks while the key's reflection is in flight (a burst at start-up, or
    the eager one of ``warm_schema=True``) waits for that one instead of starting
    another.
    """

    def __init__(self, manager: Pools) -> None:
        self._manager = manager
        self._lock = threading.Lock()
        self._templates: dict[Any, SQLDatabase] = {}
        #: key -> the template's attributes a per-execution copy starts from
        self._states: dict[Any, dict[str, Any]] = {}
        #: key -> set when its reflection in flight ends (succeeded or failed)
        self._inflight: dict[Any, threading.Event] = {}
        #: URL text -> (a new copy's attributes but its engine, the shared pool): what a
        #: SQLDatabase with no options needs, so making one skips every lookup above
        self._ready: dict[tuple[str, bool], tuple[dict[str, Any], PoolHandle]] = {}
        self._generation = 0  # bumped by clear(): a reflection begun before it is not kept
        #: URL text -> the read-only guard's catalog of the database's functions
        self._catalogs: dict[str, Any] = {}

    @staticmethod
    def options_key(options: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
        """A hashable key of SQLDatabase options."""
        if not options:
            return ()
        return tuple(sorted((k, _freeze(v)) for k, v in options.items()))

    def key(self, database_url: str | URL | None, options: Mapping[str, Any]) -> Any:
        """The cache key of a URL and its SQLDatabase options (scope options left out).

        The URL is keyed by its text as given (a ``URL`` object by its rendering), so the
        hot path parses and renders nothing.
        """
        url_text = self.url_text(database_url)
        if not options:
            return (url_text, ())
        sql_options = {k: v for k, v in options.items() if k not in SCOPE_OPTIONS}
        return (url_text, self.options_key(sql_options))

    def needs_reflection(self, database_url: str | URL | None, options: Mapping[str, Any]) -> bool:
        """True if a new SQLDatabase for these arguments would reflect the schema (blocking I/O)."""
        if not self._manager.settings.cache_reflection:
            return True
        return self.key(database_url, options) not in self._templates

    def state(
        self, engine: Engine, database_url: str | URL | None, options: dict[str, Any]
    ) -> dict[str, Any]:
        """The template's attributes for a new copy (no engine, no inspector)."""
        if self._manager.settings.cache_reflection:
            state = self._states.get(self.key(database_url, options))
            if state is not None:
                return state
        template = self.template(engine, database_url, options)
        state = dict(template.__dict__)
        state.pop("_inspector", None)
        state.pop("_engine", None)
        return state

    def template(
        self, engine: Engine, database_url: str | URL | None, options: dict[str, Any]
    ) -> SQLDatabase:
        """The reflected SQLDatabase for ``options``; ``engine`` is the asking execution's."""
        check_sql_database_options(options)
        if not self._manager.settings.cache_reflection:
            return _reflect(engine, options)
        key = self.key(database_url, options)
        while True:
            template = self._templates.get(key)
            if template is not None:
                return template
            with self._lock:
                template = self._templates.get(key)
                if template is not None:
                    return template
                waiting = self._inflight.get(key)
                if waiting is None:
                    done = self._inflight[key] = threading.Event()
                    generation = self._generation
            if waiting is not None:
                waiting.wait()  # the reflection in flight; a failed one: try again
                continue
            try:
                _, handle = self._manager.resolve_target(database_url)
                template = _reflect(handle.engine if handle is not None else engine, options)
                template._engine = None  # type: ignore[assignment]  # copies get their own
                state = dict(template.__dict__)
                state.pop("_inspector", None)
                state.pop("_engine", None)
                with self._lock:
                    if generation == self._generation:
                        self._templates[key] = template
                        self._states[key] = state
            finally:
                with self._lock:
                    del self._inflight[key]
                done.set()
            return template

    def warm(self, database_url: str | URL | None = None, **options: Any) -> None:
        """Reflect ``database_url`` with ``options`` now, unless it is cached or in flight.

        Runs through the shared pool (blocking I/O); used by ``warm_schema=True`` on a
        release thread.  Strategy ``per_execution`` has no shared pool: nothing to do.
        """
        _, handle = self._manager.resolve_target(database_url)
        if handle is not None and self._manager.settings.cache_reflection:
            self.template(handle.engine, database_url, options)

    def ready(
        self, database_url: str | URL | None, read_only: bool
    ) -> tuple[dict[str, Any], PoolHandle] | None:
        """What a SQLDatabase with no options but ``read_only`` for ``database_url`` starts
        from, once known.

        Kept by URL text only: a ``URL`` object (returned as is by ``resolve_url``) is not.
        """
        url = self._manager.settings.resolve_url(database_url)
        return self._ready.get((url, read_only)) if isinstance(url, str) else None

    def remember_ready(
        self,
        database_url: str | URL | None,
        read_only: bool,
        attributes: dict[str, Any],
        handle: PoolHandle,
    ) -> None:
        """Keep ``attributes`` (no engine) for later :meth:`ready` calls, if still current."""
        url = self._manager.settings.resolve_url(database_url)
        if not isinstance(url, str) or not self._manager.settings.cache_reflection:
            return
        with self._lock:
            if self._states.get((url, ())) is not None:
                self._ready[url, read_only] = (attributes, handle)

    def catalog(self, url_text: str) -> Any:
        """The function catalog read for ``url_text``'s database, if any yet."""
        return self._catalogs.get(url_text)

    def remember_catalog(self, url_text: str, catalog: Any) -> None:
        with self._lock:
            self._catalogs[url_text] = catalog

    def url_text(self, database_url: str | URL | None) -> str:
        """The text a URL is keyed by (its rendering, with the password, for a URL object)."""
        raw = self._manager.settings.resolve_url(database_url)
        return raw if isinstance(raw, str) else raw.render_as_string(hide_password=False)

    def clear(self) -> None:
        """Forget every reflected schema and function catalog (after a migration)."""
        with self._lock:
            self._templates.clear()
            self._states.clear()
            self._ready.clear()
            self._catalogs.clear()
            self._generation += 1


def _reflect(engine: Engine, options: dict[str, Any]) -> SQLDatabase:
    from langgraph_scoped_conn.langchain_sql_database import SQLDatabase

    return SQLDatabase(engine, **options)


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, list | tuple | set | frozenset):
        return tuple(sorted(map(str, value)))
    return value
