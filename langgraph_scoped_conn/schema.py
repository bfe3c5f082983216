"""The reflected-schema cache: one reflection per manager, URL and SQLDatabase options.

``SQLDatabase(engine)`` reflects the schema on construction (26 statements against
PostgreSQL).  :class:`SchemaCache` does that once per key and keeps the result as a
template; each execution's SQLDatabase is a shallow copy of it bound to the
execution's engine (:mod:`langgraph_scoped_conn.sql_database`).  Call
:func:`invalidate_schema_cache` after a migration.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import URL, Engine

from langgraph_scoped_conn.community import SQLDatabase
from langgraph_scoped_conn.manager import ExecutionConnectionManager, get_connection_manager

if TYPE_CHECKING:
    from langgraph_scoped_conn.engine import PoolHandle

__all__ = ["SCOPE_OPTIONS", "SchemaCache", "invalidate_schema_cache", "schema_cache"]

#: Options of a scoped SQLDatabase that are not SQLDatabase keyword arguments.
SCOPE_OPTIONS = frozenset({"read_only", "statement_timeout", "max_query_length"})


class SchemaCache:
    """Reflected schemas of one manager, by URL and SQLDatabase options.

    Reflection runs once per key (26 statements against PostgreSQL), through the
    shared pool; with strategy ``per_execution``, through the asking execution's own
    pool, which is disposed with it, so no connection outlives the executions.  A
    caller that asks while the key's reflection is in flight (a burst at start-up, or
    the eager one of ``warm_schema=True``) waits for that one instead of starting
    another.
    """

    def __init__(self, manager: ExecutionConnectionManager) -> None:
        self._manager = manager
        self._lock = threading.Lock()
        self._templates: dict[Any, SQLDatabase] = {}
        #: key -> the template's attributes a per-execution copy starts from
        self._states: dict[Any, dict[str, Any]] = {}
        #: key -> set when its reflection in flight ends (succeeded or failed)
        self._inflight: dict[Any, threading.Event] = {}
        #: URL text -> (a new copy's attributes but its engine, the shared pool): what a
        #: SQLDatabase with no options needs, so making one skips every lookup above
        self._ready: dict[str, tuple[dict[str, Any], PoolHandle]] = {}
        self._generation = 0  # bumped by clear(): a reflection begun before it is not kept

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
        raw = self._manager.settings.resolve_url(database_url)
        url_text = raw if isinstance(raw, str) else raw.render_as_string(hide_password=False)
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
        if options.get("lazy_table_reflection"):
            raise ValueError(
                "lazy_table_reflection=True is not supported by scoped SQLDatabase objects: "
                "they share one reflected schema; leave it False (reflection is cached anyway)"
            )
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

    def ready(self, database_url: str | URL | None) -> tuple[dict[str, Any], PoolHandle] | None:
        """What a SQLDatabase with no options for ``database_url`` starts from, once known.

        Kept by URL text only: a ``URL`` object (returned as is by ``resolve_url``) is not.
        """
        url = self._manager.settings.resolve_url(database_url)
        return self._ready.get(url) if isinstance(url, str) else None

    def remember_ready(
        self, database_url: str | URL | None, attributes: dict[str, Any], handle: PoolHandle
    ) -> None:
        """Keep ``attributes`` (no engine) for later :meth:`ready` calls, if still current."""
        url = self._manager.settings.resolve_url(database_url)
        if not isinstance(url, str) or not self._manager.settings.cache_reflection:
            return
        with self._lock:
            if self._states.get((url, ())) is not None:
                self._ready[url] = (attributes, handle)

    def clear(self) -> None:
        with self._lock:
            self._templates.clear()
            self._states.clear()
            self._ready.clear()
            self._generation += 1


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


def invalidate_schema_cache(manager: ExecutionConnectionManager | None = None) -> None:
    """Forget reflected schemas, so the next SQLDatabase reflects again (after a migration)."""
    schema_cache(manager or get_connection_manager()).clear()
