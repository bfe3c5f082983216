"""The pools a manager owns: the shared pool of each URL, the per-execution pools, and
LangGraph's checkpointer and store pools on the same budgets (for stats); and who is told
of their events.

No executions here: the manager hands in what a new pool needs (who holds connections,
how to find a budget deadlock, what to do when callers wait).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from langgraph_scoped_conn.errors import ConfigurationError, ScopeUnavailableError
from langgraph_scoped_conn.settings import ScopedConnSettings
from langgraph_scoped_conn.urls import parse_url

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

    # SQLAlchemy is imported on first use, so `import langgraph_scoped_conn` stays cheap
    from langgraph_scoped_conn.engine import PoolHandle

__all__ = ["PoolObserver", "Pools"]

logger = logging.getLogger("langgraph_scoped_conn")

#: ``(pool name, used by, event, seconds)``: see :meth:`Pools.observe`
PoolObserver = Callable[[str, str, str, float], None]


class Pools:
    """Every pool of one manager, by URL, created on first use.

    Args:
        settings: the manager's settings.
        describe_holders: names the executions holding connections (for errors).
        find_deadlock: given a shared pool, names a budget deadlock, or ``None``.
        on_wait: called each time a caller has waited for a shared pool's budget a while.
    """

    def __init__(
        self,
        settings: ScopedConnSettings,
        *,
        describe_holders: Callable[[], str],
        find_deadlock: Callable[[PoolHandle], str | None],
        on_wait: Callable[[], None],
    ) -> None:
        self.settings = settings
        self._describe_holders = describe_holders
        self._find_deadlock = find_deadlock
        self._on_wait = on_wait
        self._lock = threading.Lock()
        self._closed = False
        self._handles: dict[str, PoolHandle] = {}
        # URL text as given -> (parsed URL, its shared handle or None for per_execution)
        self._targets: dict[str, tuple[URL, PoolHandle | None]] = {}
        #: pools of LangGraph's checkpointer and store on these budgets, for stats
        self._langgraph: dict[int, tuple[str, Any]] = {}
        #: told (pool name, used by, "wait" | "use" | "create", seconds) of every event;
        #: replaced, never changed in place, so pool threads iterate it without the lock
        self._observers: tuple[PoolObserver, ...] = ()

    def resolve(self, url: str | URL | None) -> tuple[URL, PoolHandle | None]:
        """The parsed URL and its shared pool (``None`` for strategy per_execution).

        Raises:
            ScopeUnavailableError: the pools were closed with their manager.
        """
        raw = self.settings.resolve_url(url)
        text = raw if isinstance(raw, str) else raw.render_as_string(hide_password=False)
        found = self._targets.get(text)
        if found is not None:
            return found
        from langgraph_scoped_conn.engine import PoolHandle

        parsed = parse_url(raw)
        key = parsed.render_as_string(hide_password=False)
        with self._lock:
            if self._closed:
                raise ScopeUnavailableError("this ExecutionConnectionManager is closed")
            handle = self._handles.get(key)
            created = False
            if handle is None and self.settings.strategy != "per_execution":
                handle = PoolHandle(
                    parsed,
                    self.settings,
                    describe_holders=self._describe_holders,
                    find_deadlock=self._find_deadlock,
                    on_wait=self._on_wait,
                )
                self._handles[key] = handle
                self._attach_observers(handle)
                created = True
            found = (parsed, handle)
            self._targets[text] = found
        if created and handle is not None:
            logger.info(
                "created %s pool for %s with max_connections=%d (driver %s; %s)",
                handle.strategy,
                handle.safe_url,
                self.settings.max_connections,
                parsed.get_driver_name(),
                handle.strategy_reason,
            )
        return found

    def shared(self, url: str | URL | None = None) -> PoolHandle:
        """The shared pool for ``url``.

        Raises:
            ConfigurationError: with strategy ``per_execution``, which has no shared pool.
        """
        _parsed, handle = self.resolve(url)
        if handle is None:
            raise ConfigurationError(
                "strategy='per_execution' has no shared pool: each execution gets its own; "
                "use get_scoped_engine() inside a scope"
            )
        return handle

    def new_for_execution(self, url: URL, execution_id: str) -> PoolHandle:
        """A pool of one execution's own (strategy ``per_execution``)."""
        from langgraph_scoped_conn.engine import PoolHandle

        handle = PoolHandle(
            url,
            self.settings,
            describe_holders=self._describe_holders,
            per_execution_id=execution_id,
        )
        self._attach_observers(handle)
        return handle

    def handles(self) -> list[PoolHandle]:
        """The shared pools created so far."""
        with self._lock:
            return list(self._handles.values())

    # -- LangGraph's pools, for stats -----------------------------------------------------

    def add_langgraph(self, used_by: str, pool: Any) -> None:
        with self._lock:
            self._langgraph[id(pool)] = (used_by, pool)

    def remove_langgraph(self, pool: Any) -> None:
        with self._lock:
            self._langgraph.pop(id(pool), None)

    def langgraph_rows(self) -> list[dict[str, Any]]:
        """The stats rows of LangGraph's checkpointer and store pools."""
        with self._lock:
            langgraph = list(self._langgraph.values())
        rows: list[dict[str, Any]] = [pool.snapshot(used_by) for used_by, pool in langgraph]
        return rows

    # -- observers ------------------------------------------------------------------------

    def observe(self, observer: PoolObserver) -> None:
        """Tell ``observer`` of every pool's events, now and later (see the manager)."""
        with self._lock:
            self._observers = (*self._observers, observer)
            handles = list(self._handles.values())
        for handle in handles:
            self._attach_observers(handle)

    def unobserve(self, observer: PoolObserver) -> None:
        """Stop telling ``observer`` of pool events (no error if it was not observing)."""
        with self._lock:
            self._observers = tuple(o for o in self._observers if o != observer)

    def has_observers(self) -> bool:
        return bool(self._observers)

    def notify(self, pool_name: str, used_by: str, event: str, seconds: float) -> None:
        """Pass a pool event on to the observers."""
        for observer in self._observers:
            observer(pool_name, used_by, event, seconds)

    def _attach_observers(self, handle: PoolHandle) -> None:
        if not self._observers:
            return
        name, notify = handle.pool_name, self.notify

        def observe(event: str, seconds: float) -> None:
            notify(name, "tools", event, seconds)

        handle.engine.pool.observe = observe  # type: ignore[attr-defined]

    # -- shutdown -------------------------------------------------------------------------

    def close(self) -> list[PoolHandle]:
        """Refuse new pools and forget every shared one; return them to dispose."""
        with self._lock:
            self._closed = True
            handles = list(self._handles.values())
            self._handles.clear()
            self._targets.clear()
        return handles
