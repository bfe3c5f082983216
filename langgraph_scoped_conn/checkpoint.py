"""LangGraph's checkpointer and store on the manager's connection budget.

:func:`postgres_checkpointer`, :func:`apostgres_checkpointer`, :func:`postgres_store`
and :func:`apostgres_store` are context managers that yield LangGraph's own
``PostgresSaver``, ``AsyncPostgresSaver``, ``PostgresStore`` and ``AsyncPostgresStore``
over a psycopg_pool pool whose connections count against the same per-URL budget
(``max_connections``) as the runs' tools.

How the budget covers both: on entry, ``reserve`` slots of the URL's budget are set
aside (:meth:`~langgraph_scoped_conn.engine.PoolHandle.reserve`: the tools' pool
shrinks to ``max_connections - reserve``, and entry waits until that many tool
connections are really closed), and the saver's pool may hold at most ``reserve``
connections.  The server never sees more than ``max_connections`` from the process,
whatever mix of checkpoint writes and tool queries is in flight.  On exit the pool is
closed first, then the slots are given back.

Why a reserve, not a place in the tools' line: a checkpoint write is short and every
step of every run makes one; behind runs that hold tool connections for seconds it
would wait for them (and a run waiting for its own checkpoint cannot return its tool
connection: a deadlock at the budget).  With its own slots it never waits for a tool.
LangGraph's savers and its async store run one statement at a time (under their own
lock, or one batching task), so one slot serves them: ``reserve=1`` by default, which
is also what ``from_conn_string`` opens.  A sync ``PostgresStore`` used by many threads
at once can use more.

Connections are what ``from_conn_string`` opens (autocommit, ``dict_row``,
``prepare_threshold=0``), but with no prepared statements at all under the ``pooler``
strategy (PgBouncer's and Supavisor's transaction mode), ``application_name``
``<application_name>:checkpointer`` (or ``:store``), ``max_lifetime`` the manager's
``pool_recycle``, and a check before use: a connection idle longer than
:data:`~langgraph_scoped_conn.engine.PRE_PING_IDLE`, or whose socket has the server's
goodbye waiting, is pinged first, and one that fails is replaced by psycopg_pool
(a server-side idle kill never reaches the run as "the connection is closed").
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
import weakref
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any, Literal, Self

from psycopg import AsyncConnection, Connection
from psycopg.rows import DictRow, dict_row
from psycopg_pool import AsyncConnectionPool, ConnectionPool, PoolTimeout

from langgraph_scoped_conn.engine import PRE_PING_IDLE
from langgraph_scoped_conn.errors import ConfigurationError, ConnectionBudgetExceededError
from langgraph_scoped_conn.manager import ExecutionConnectionManager, get_connection_manager
from langgraph_scoped_conn.session import has_input
from langgraph_scoped_conn.stats import (
    CHECKINS,
    CONNECTIONS_MS,
    IDLE,
    IN_USE,
    MAX_CONNECTIONS,
    OPENED,
    RESERVED,
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
    from langgraph.checkpoint.postgres import PostgresSaver
    from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
    from langgraph.checkpoint.serde.base import SerializerProtocol
    from langgraph.store.postgres import AsyncPostgresStore, PostgresStore
    from sqlalchemy.engine import URL as SQLAlchemyURL

    from langgraph_scoped_conn.engine import PoolHandle

__all__ = [
    "AsyncBudgetedConnectionPool",
    "BudgetedConnectionPool",
    "PoolMeter",
    "apostgres_checkpointer",
    "apostgres_store",
    "postgres_checkpointer",
    "postgres_store",
]

logger = logging.getLogger("langgraph_scoped_conn")

UsedBy = Literal["checkpointer", "store"]


class PoolMeter:
    """Counts one budgeted pool's checkouts, uses and connections, and tells the observers.

    Shared by the sync and the async pool; no I/O.  psycopg_pool keeps the counters it
    has (waits in its queue, connection errors, lost connections); this keeps what it
    does not: connections in use, when each came back (for the idle check), peaks.
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

    def checked_out(self, conn: Any, waited: float) -> None:
        now = time.monotonic()
        with self._lock:
            self.checkouts += 1
            self.in_use += 1
            self.peak_in_use = max(self.peak_in_use, self.in_use)
            self.peak_wait_us = max(self.peak_wait_us, int(waited * 1_000_000))
            self._taken_at[conn] = now
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

    def timed_out(self) -> None:
        with self._lock:
            self.timeouts += 1

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
            USED_BY: self.used_by,
            STRATEGY: self.strategy,
            "strategy_reason": self.strategy_reason,
            "dialect": "postgresql",
            "driver": "psycopg",
            MAX_CONNECTIONS: max_size,
            RESERVED: self.reserve,
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
            "returns_bad": int(pool_stats.get("returns_bad", 0)),
            "connections_lost": int(pool_stats.get("connections_lost", 0)),
        }


# -- the pools ---------------------------------------------------------------------------


def _metered_connection(meter: PoolMeter) -> type[Connection[DictRow]]:
    class MeteredConnection(Connection[DictRow]):
        """A psycopg connection that tells its pool's meter how long it took to open."""

        @classmethod
        def connect(cls, conninfo: str = "", **kwargs: Any) -> Self:
            start = time.monotonic()
            conn = super().connect(conninfo, **kwargs)
            meter.connected(conn, time.monotonic() - start)
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
        start = time.monotonic()
        try:
            conn = super().getconn(timeout)
        except PoolTimeout:
            self.meter.timed_out()
            errors = self.get_stats().get("connections_errors", 0)
            raise self.meter.budget_error(timeout or self.timeout, errors) from None
        self.meter.checked_out(conn, time.monotonic() - start)
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
        start = time.monotonic()
        try:
            conn = await super().getconn(timeout)
        except PoolTimeout:
            self.meter.timed_out()
            errors = self.get_stats().get("connections_errors", 0)
            raise self.meter.budget_error(timeout or self.timeout, errors) from None
        self.meter.checked_out(conn, time.monotonic() - start)
        return conn

    async def putconn(self, conn: AsyncConnection[DictRow]) -> None:
        self.meter.checked_in(conn)
        await super().putconn(conn)

    def snapshot(self, used_by: str) -> dict[str, Any]:
        """This pool's row of the stats (``get_connection_stats()["pools"]``)."""
        return self.meter.row(self.get_stats(), self.max_size)


# -- what both pools are built from ------------------------------------------------------


class _Plan:
    """The manager, the URL's budget and the pool options of one checkpointer or store."""

    def __init__(
        self,
        used_by: UsedBy,
        database_url: str | SQLAlchemyURL | None,
        manager: ExecutionConnectionManager | None,
        reserve: int,
    ) -> None:
        if isinstance(reserve, bool) or not isinstance(reserve, int) or reserve < 1:
            raise ConfigurationError(
                f"reserve={reserve!r} must be a whole number of at least 1: the {used_by}'s "
                "connections, set aside from max_connections"
            )
        self.used_by: UsedBy = used_by
        self.reserve = reserve
        self.manager = manager if manager is not None else get_connection_manager()
        self.handle = self.manager.pool_for(database_url)
        if self.handle.url.get_backend_name() != "postgresql":
            raise ConfigurationError(
                f"the {used_by} needs a PostgreSQL URL; {self.handle.safe_url!r} is "
                f"{self.handle.url.get_backend_name()}"
            )
        self.meter = PoolMeter(self.manager, self.handle, used_by, reserve)

    @property
    def timeout(self) -> float:
        return self.handle.settings.pool_timeout

    def pool_options(self) -> dict[str, Any]:
        """Keyword arguments of the psycopg_pool pool (the password is in ``kwargs`` only)."""
        settings = self.handle.settings
        url = self.handle.url.difference_update_query(["pgbouncer"])
        params: dict[str, Any] = dict(
            url.translate_connect_args(database="dbname", username="user")
        )
        params.update({k: v if isinstance(v, str) else v[-1] for k, v in url.query.items()})
        params.setdefault("application_name", f"{settings.application_name}:{self.used_by}"[:63])
        params.update(
            autocommit=True,
            row_factory=dict_row,
            # pooler: a transaction pooler runs the next statement on any server
            # connection, where a statement prepared on another does not exist
            prepare_threshold=None if self.handle.strategy == "pooler" else 0,
        )
        return {
            "conninfo": "",
            "kwargs": params,
            "min_size": 1,
            "max_size": self.reserve,
            "open": False,
            "name": f"{self.handle.pool_name}:{self.used_by}",
            "timeout": settings.pool_timeout,
            "max_lifetime": float(settings.pool_recycle) if settings.pool_recycle > 0 else 1e9,
        }

    def set_aside(self) -> None:
        """Set the slots aside (blocking: waits for tool connections to come back)."""
        self.handle.reserve(self.reserve, self.timeout)

    def give_back(self) -> None:
        self.handle.unreserve(self.reserve)

    def opened(self, pool: Any) -> None:
        self.manager.add_langgraph_pool(self.used_by, pool)
        logger.info(
            "%s pool for %s: %d connection(s) set aside from max_connections=%d (%s%s)",
            self.used_by,
            self.handle.safe_url,
            self.reserve,
            self.handle.settings.max_connections,
            self.handle.strategy,
            ", no prepared statements" if self.handle.strategy == "pooler" else "",
        )


@contextlib.contextmanager
def _budgeted_pool(plan: _Plan) -> Iterator[BudgetedConnectionPool]:
    plan.set_aside()
    try:
        pool = BudgetedConnectionPool(plan.meter, **plan.pool_options())
        try:
            pool.open(wait=True, timeout=plan.timeout)
            plan.opened(pool)
            try:
                yield pool
            finally:
                plan.manager.remove_langgraph_pool(pool)
        finally:
            pool.close()  # its connections are closed before their slots are given back
    finally:
        plan.give_back()


def _give_back_if_set(plan: _Plan, setting_aside: asyncio.Future[None]) -> None:
    if not setting_aside.cancelled() and setting_aside.exception() is None:
        plan.give_back()


@contextlib.asynccontextmanager
async def _abudgeted_pool(plan: _Plan) -> AsyncIterator[AsyncBudgetedConnectionPool]:
    # setting aside may wait for tool connections: on a thread, and never lost to a
    # cancellation (the slots are given back once the thread has them)
    setting_aside = asyncio.ensure_future(asyncio.to_thread(plan.set_aside))
    try:
        await asyncio.shield(setting_aside)
    except asyncio.CancelledError:
        setting_aside.add_done_callback(functools.partial(_give_back_if_set, plan))
        raise
    try:
        pool = AsyncBudgetedConnectionPool(plan.meter, **plan.pool_options())
        try:
            await pool.open(wait=True, timeout=plan.timeout)
            plan.opened(pool)
            try:
                yield pool
            finally:
                plan.manager.remove_langgraph_pool(pool)
        finally:
            await pool.close()
    finally:
        plan.give_back()


# -- the factories -----------------------------------------------------------------------


@contextlib.contextmanager
def postgres_checkpointer(
    database_url: str | SQLAlchemyURL | None = None,
    *,
    manager: ExecutionConnectionManager | None = None,
    reserve: int = 1,
    setup: bool = True,
    serde: SerializerProtocol | None = None,
) -> Iterator[PostgresSaver]:
    """LangGraph's ``PostgresSaver`` with connections from the URL's budget.

    Args:
        database_url: the URL; the manager's configured URL by default.
        manager: the manager whose budget it draws from; the process default by default.
        reserve: connections set aside from ``max_connections`` for it (at least 1,
            leaving at least 1 to the tools).  The saver runs one statement at a time.
        setup: run LangGraph's idempotent migrations (``saver.setup()``) on entry.
        serde: the saver's serializer.

    Raises:
        ConfigurationError: strategy ``per_execution`` (no budget to share), a URL that
            is not PostgreSQL, or no slot would be left to the tools.
        ConnectionBudgetExceededError: the tools did not return enough connections
            within ``pool_timeout``; create the checkpointer at startup.

    On exit the pool is closed (its idle connections at once, one still in use when it
    comes back) and the slots go back to the tools.

    Example:
        >>> with lsc.postgres_checkpointer() as saver:  # doctest: +SKIP
        ...     graph = with_scoped_connections(builder.compile(checkpointer=saver))
    """
    from langgraph.checkpoint.postgres import PostgresSaver

    with _budgeted_pool(_Plan("checkpointer", database_url, manager, reserve)) as pool:
        saver = PostgresSaver(pool, serde=serde)
        if setup:
            saver.setup()
        yield saver


@contextlib.asynccontextmanager
async def apostgres_checkpointer(
    database_url: str | SQLAlchemyURL | None = None,
    *,
    manager: ExecutionConnectionManager | None = None,
    reserve: int = 1,
    setup: bool = True,
    serde: SerializerProtocol | None = None,
) -> AsyncIterator[AsyncPostgresSaver]:
    """LangGraph's ``AsyncPostgresSaver`` with connections from the URL's budget.

    The function itself fits langgraph.json (``"checkpointer": {"path":
    "./agent.py:checkpointer"}`` with ``checkpointer = lsc.apostgres_checkpointer``):
    LangGraph Server and ``langgraph dev`` call it and enter the async context manager
    on their event loop.  Arguments, errors and exit as :func:`postgres_checkpointer`.

    Example:
        >>> async with lsc.apostgres_checkpointer() as saver:  # doctest: +SKIP
        ...     graph = with_scoped_connections(builder.compile(checkpointer=saver))
    """
    from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver

    async with _abudgeted_pool(_Plan("checkpointer", database_url, manager, reserve)) as pool:
        saver = AsyncPostgresSaver(pool, serde=serde)
        if setup:
            await saver.setup()
        yield saver


@contextlib.contextmanager
def postgres_store(
    database_url: str | SQLAlchemyURL | None = None,
    *,
    manager: ExecutionConnectionManager | None = None,
    reserve: int = 1,
    setup: bool = True,
    **store_options: Any,
) -> Iterator[PostgresStore]:
    """LangGraph's ``PostgresStore`` with connections from the URL's budget.

    Arguments, errors and exit as :func:`postgres_checkpointer`; ``store_options``
    (``index``, ``ttl``, ``deserializer``) go to ``PostgresStore``.  Unlike the savers,
    a sync store serves threads at once: a larger ``reserve`` lets them run together.
    """
    from langgraph.store.postgres import PostgresStore

    with _budgeted_pool(_Plan("store", database_url, manager, reserve)) as pool:
        store = PostgresStore(pool, **store_options)
        if setup:
            store.setup()
        yield store


@contextlib.asynccontextmanager
async def apostgres_store(
    database_url: str | SQLAlchemyURL | None = None,
    *,
    manager: ExecutionConnectionManager | None = None,
    reserve: int = 1,
    setup: bool = True,
    **store_options: Any,
) -> AsyncIterator[AsyncPostgresStore]:
    """LangGraph's ``AsyncPostgresStore`` with connections from the URL's budget.

    It fits langgraph.json's ``"store": {"path": ...}`` like
    :func:`apostgres_checkpointer`; arguments, errors and exit as
    :func:`postgres_store`.  The async store runs its operations in one batching task.
    """
    from langgraph.store.postgres import AsyncPostgresStore

    async with _abudgeted_pool(_Plan("store", database_url, manager, reserve)) as pool:
        store = AsyncPostgresStore(pool, **store_options)
        if setup:
            await store.setup()
        yield store
