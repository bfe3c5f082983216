"""The psycopg_pool pools of LangGraph's checkpointer and store: metered, and checked before use.

:class:`BudgetedConnectionPool` and :class:`AsyncBudgetedConnectionPool` are psycopg_pool
pools (LangGraph's savers and store accept them as such) whose every checkout, return
and new connection is counted by a :class:`PoolMeter`, which also keeps when each
connection came back, so the pool's ``check`` pings only a connection idle past
:data:`~langgraph_scoped_conn.engine.PRE_PING_IDLE` or whose socket holds the server's
goodbye.  Sizing and the budget are :mod:`langgraph_scoped_conn.checkpoint`'s.
"""

from __future__ import annotations

import functools
import json
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Literal, Self

from psycopg import AsyncConnection, Connection
from psycopg.rows import DictRow
from psycopg.types.json import set_json_dumps
from psycopg_pool import AsyncConnectionPool, ConnectionPool, PoolTimeout

from langgraph_scoped_conn.engine import PRE_PING_IDLE
from langgraph_scoped_conn.errors import ConnectionBudgetExceededError
from langgraph_scoped_conn.session import has_input
from langgraph_scoped_conn.stats import (
    CHECKINS,
    CONNECTIONS_LOST,
    CONNECTIONS_MS,
    CONNECTIONS_NUM,
    IDLE,
    IN_USE,
    MAX_CONNECTIONS,
    OPENED,
    POOL_NAME,
    RESERVED,
    RETURNS_BAD,
    STRATEGY,
    TIMEOUTS,
    URL,
    USAGE_MS,
    USED_BY,
    WAIT_MS,
    WAITING,
    WAITS,
)
from langgraph_scoped_conn.urls import shown_url

if TYPE_CHECKING:
    from langgraph_scoped_conn.engine import PoolHandle
    from langgraph_scoped_conn.manager import ExecutionConnectionManager

__all__ = ["AsyncBudgetedConnectionPool", "BudgetedConnectionPool", "PoolMeter", "UsedBy"]

UsedBy = Literal["checkpointer", "store"]


class PoolMeter:
    """Counts one budgeted pool's checkouts, uses and connections, and tells the observers.

    Shared by the sync and the async pool; no I/O.  psycopg_pool keeps the counters it
    has (waits in its queue, connection errors, lost connections); this keeps what it
    does not: connections in use, when each came back (for the idle check), peaks.
    Observers hear, as from the tools' pools, ``create`` for each new connection,
    ``use`` for each return, and ``wait`` for a checkout that found every connection in
    use (or timed out).
    """

    def __init__(
        self,
        manager: ExecutionConnectionManager,
        handle: PoolHandle,
        used_by: UsedBy,
        reserve: int,
    ) -> None:
        self.manager = manager
        self.used_by = used_by
        self.reserve = reserve
        self.pool_name = handle.pool_name
        self.url = shown_url(handle.url)
        self.strategy = handle.strategy
        self.strategy_reason = handle.strategy_reason
        self._handle = handle  # for what the tools' first connection found (pooler_detected)
        #: ping a connection idle longer than this before handing it out (None: never)
        self.pre_ping_idle = PRE_PING_IDLE if handle.settings.pool_pre_ping else None
        self._lock = threading.Lock()
        self._idle_since: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
        self._taken_at: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
        self._live: weakref.WeakSet[Any] = weakref.WeakSet()
        self.opened = 0
        self.checkouts = 0
        self.checkins = 0
        self.timeouts = 0
        self.in_use = 0
        self.peak_in_use = 0
        self.peak_open = 0
        self.use_us = 0
        self.create_us = 0
        self.peak_wait_us = 0

    # -- events ------------------------------------------------------------------------

    def connected(self, conn: Any, seconds: float) -> None:
        """A new server connection: it counts as idle from now."""
        with self._lock:
            self.opened += 1
            self.create_us += int(seconds * 1_000_000)
            self._live.add(conn)
            self._idle_since[conn] = time.monotonic()
            self.peak_open = max(self.peak_open, self._open_now())
        self._notify("create", seconds)

    def checked_out(self, conn: Any, waited: float, *, queued: bool) -> None:
        """``conn`` was handed out after ``waited`` s; ``queued``: every one was in use."""
        now = time.monotonic()
        with self._lock:
            self.checkouts += 1
            self.in_use += 1
            self.peak_in_use = max(self.peak_in_use, self.in_use)
            self.peak_wait_us = max(self.peak_wait_us, int(waited * 1_000_000))
            self._taken_at[conn] = now
        if queued:
            self._notify("wait", waited)

    def checked_in(self, conn: Any) -> None:
        now = time.monotonic()
        with self._lock:
            taken = self._taken_at.pop(conn, None)
            self.checkins += 1
            self.in_use -= 1
            used = now - taken if taken is not None else 0.0
            self.use_us += int(used * 1_000_000)
            self._idle_since[conn] = now
        self._notify("use", used)

    def timed_out(self, waited: float) -> None:
        with self._lock:
            self.timeouts += 1
        self._notify("wait", waited)

    def all_in_use(self, max_size: int) -> bool:
        """True if a checkout now waits for a connection to come back (no idle, no room)."""
        return self.in_use >= max_size

    def _notify(self, event: str, seconds: float) -> None:
        if self.manager.has_observers():
            self.manager.notify_observers(self.pool_name, self.used_by, event, seconds)

    # -- decisions -----------------------------------------------------------------------

    def needs_ping(self, conn: Any) -> bool:
        """Ping ``conn`` before use: idle past the threshold, or the server said goodbye."""
        limit = self.pre_ping_idle
        if limit is None:
            return False
        with self._lock:
            since = self._idle_since.get(conn)
        if since is None or time.monotonic() - since > limit:
            return True
        return has_input(conn)

    def budget_error(self, timeout: float, errors: int) -> ConnectionBudgetExceededError:
        return ConnectionBudgetExceededError(
            f"the {self.used_by} got none of its {self.reserve} connection(s) set aside from "
            f"the budget of {self.pool_name} within pool_timeout={timeout:.2f}s: all stayed in "
            f"use, or the server could not be reached ({errors} failed connection attempts so "
            f"far). Raise reserve= of the {self.used_by} (and max_connections with it)"
        )

    # -- stats ---------------------------------------------------------------------------

    def _open_now(self) -> int:
        return sum(1 for conn in list(self._live) if not conn.closed)

    def row(self, pool_stats: dict[str, int], max_size: int) -> dict[str, Any]:
        """A stats row in the tools' rows' shape (see :mod:`.stats`), plus psycopg_pool's own."""
        with self._lock:
            open_now = self._open_now()
            values = {
                "opened": self.opened,
                "checkouts": self.checkouts,
                "checkins": self.checkins,
                "timeouts": self.timeouts,
                "in_use": self.in_use,
                "peak_in_use": self.peak_in_use,
                "peak_open": self.peak_open,
                "use_us": self.use_us,
                "create_us": self.create_us,
                "peak_wait_us": self.peak_wait_us,
            }
        return {
            URL: self.url,
            POOL_NAME: self.pool_name,
            USED_BY: self.used_by,
            STRATEGY: self.strategy,
            "strategy_reason": self.strategy_reason,
            "pooler_detected": self._handle.pooler_detected,
            "dialect": "postgresql",
            "driver": "psycopg",
            MAX_CONNECTIONS: max_size,
            # its max_connections is its share of the budget; nothing is set aside from it
            RESERVED: 0,
            IN_USE: values["in_use"],
            IDLE: int(pool_stats.get("pool_available", 0)),
            "peak_connections": values["peak_open"],
            "peak_connections_in_use": values["peak_in_use"],
            OPENED: values["opened"],
            "connections_closed": max(values["opened"] - open_now, 0),
            "checkouts": values["checkouts"],
            CHECKINS: values["checkins"],
            WAITS: int(pool_stats.get("requests_queued", 0)),
            TIMEOUTS: values["timeouts"],
            "resets": 0,
            WAITING: int(pool_stats.get("requests_waiting", 0)),
            WAIT_MS: float(pool_stats.get("requests_wait_ms", 0)),
            "requests_wait_max_ms": round(values["peak_wait_us"] / 1000, 3),
            "connections_errors": int(pool_stats.get("connections_errors", 0)),
            USAGE_MS: round(values["use_us"] / 1000, 3),
            CONNECTIONS_MS: round(values["create_us"] / 1000, 3),
            CONNECTIONS_NUM: values["opened"],
            RETURNS_BAD: int(pool_stats.get("returns_bad", 0)),
            CONNECTIONS_LOST: int(pool_stats.get("connections_lost", 0)),
        }


# -- the pools ---------------------------------------------------------------------------


#: JSON for LangGraph's ``Jsonb`` parameters.  LangGraph Server copies every configurable
#: value into checkpoint metadata, the run's SQLDatabase proxy of
#: ``with_scoped_connections`` too, which ``json.dumps`` refuses ("not JSON
#: serializable", the run fails): such a value is written as its repr instead.
_json_dumps = functools.partial(json.dumps, default=repr)


def _metered_connection(meter: PoolMeter) -> type[Connection[DictRow]]:
    class MeteredConnection(Connection[DictRow]):
        """A psycopg connection that tells its pool's meter how long it took to open."""

        @classmethod
        def connect(cls, conninfo: str = "", **kwargs: Any) -> Self:
            start = time.monotonic()
            conn = super().connect(conninfo, **kwargs)
            meter.connected(conn, time.monotonic() - start)
            set_json_dumps(_json_dumps, conn)
            return conn

    return MeteredConnection


def _ametered_connection(meter: PoolMeter) -> type[AsyncConnection[DictRow]]:
    class AsyncMeteredConnection(AsyncConnection[DictRow]):
        """An async psycopg connection that tells its pool's meter how long it took to open."""

        @classmethod
        async def connect(cls, conninfo: str = "", **kwargs: Any) -> Self:
            start = time.monotonic()
            conn = await super().connect(conninfo, **kwargs)
            meter.connected(conn, time.monotonic() - start)
            set_json_dumps(_json_dumps, conn)
            return conn

    return AsyncMeteredConnection


class BudgetedConnectionPool(ConnectionPool[Connection[DictRow]]):
    """A psycopg_pool ``ConnectionPool`` of the slots a checkpointer or store set aside.

    LangGraph's savers accept it as a ``ConnectionPool``.  Every checkout and return is
    metered (:class:`PoolMeter`); a checkout that times out raises
    :class:`~langgraph_scoped_conn.errors.ConnectionBudgetExceededError`.
    """

    def __init__(self, meter: PoolMeter, **options: Any) -> None:
        self.meter = meter

        def check(conn: Connection[DictRow]) -> None:
            if not meter.needs_ping(conn):
                return
            try:
                conn.execute("", prepare=False)
            except Exception:
                conn.close()  # psycopg_pool discards it and hands out another
                raise

        super().__init__(connection_class=_metered_connection(meter), check=check, **options)

    def getconn(self, timeout: float | None = None) -> Connection[DictRow]:
        start, queued = time.monotonic(), self.meter.all_in_use(self.max_size)
        try:
            conn = super().getconn(timeout)
        except PoolTimeout:
            self.meter.timed_out(time.monotonic() - start)
            errors = self.get_stats().get("connections_errors", 0)
            raise self.meter.budget_error(timeout or self.timeout, errors) from None
        self.meter.checked_out(conn, time.monotonic() - start, queued=queued)
        return conn

    def putconn(self, conn: Connection[DictRow]) -> None:
        self.meter.checked_in(conn)
        super().putconn(conn)

    def snapshot(self, used_by: str) -> dict[str, Any]:
        """This pool's row of the stats (``get_connection_stats()["pools"]``)."""
        return self.meter.row(self.get_stats(), self.max_size)


class AsyncBudgetedConnectionPool(AsyncConnectionPool[AsyncConnection[DictRow]]):
    """The async twin of :class:`BudgetedConnectionPool` (an ``AsyncConnectionPool``)."""

    def __init__(self, meter: PoolMeter, **options: Any) -> None:
        self.meter = meter

        async def check(conn: AsyncConnection[DictRow]) -> None:
            if not meter.needs_ping(conn):
                return
            try:
                await conn.execute("", prepare=False)
            except Exception:
                await conn.close()  # psycopg_pool discards it and hands out another
                raise

        super().__init__(connection_class=_ametered_connection(meter), check=check, **options)

    async def getconn(self, timeout: float | None = None) -> AsyncConnection[DictRow]:  # noqa: ASYNC109
        start, queued = time.monotonic(), self.meter.all_in_use(self.max_size)
        try:
            conn = await super().getconn(timeout)
        except PoolTimeout:
            self.meter.timed_out(time.monotonic() - start)
            errors = self.get_stats().get("connections_errors", 0)
            raise self.meter.budget_error(timeout or self.timeout, errors) from None
        self.meter.checked_out(conn, time.monotonic() - start, queued=queued)
        return conn

    async def putconn(self, conn: AsyncConnection[DictRow]) -> None:
        self.meter.checked_in(conn)
        await super().putconn(conn)

    def snapshot(self, used_by: str) -> dict[str, Any]:
        """This pool's row of the stats (``get_connection_stats()["pools"]``)."""
        return self.meter.row(self.get_stats(), self.max_size)
