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
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

from psycopg.rows import dict_row

from langgraph_scoped_conn.checkpoint_pool import (
    AsyncBudgetedConnectionPool,
    BudgetedConnectionPool,
    PoolMeter,
    UsedBy,
)
from langgraph_scoped_conn.configure import get_connection_manager
from langgraph_scoped_conn.errors import ConfigurationError
from langgraph_scoped_conn.manager import ExecutionConnectionManager

if TYPE_CHECKING:
    from langgraph.checkpoint.postgres import PostgresSaver
    from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
    from langgraph.checkpoint.serde.base import SerializerProtocol
    from langgraph.store.postgres import AsyncPostgresStore, PostgresStore
    from sqlalchemy.engine import URL as SQLAlchemyURL

__all__ = [
    "apostgres_checkpointer",
    "apostgres_store",
    "postgres_checkpointer",
    "postgres_store",
]

logger = logging.getLogger("langgraph_scoped_conn")


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
def _budgeted_pool(
    used_by: UsedBy,
    database_url: str | SQLAlchemyURL | None,
    manager: ExecutionConnectionManager | None,
    reserve: int,
) -> Iterator[BudgetedConnectionPool]:
    """Set the slots aside, open the pool, show it in the stats; undo it all on exit."""
    plan = _Plan(used_by, database_url, manager, reserve)
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
async def _abudgeted_pool(
    used_by: UsedBy,
    database_url: str | SQLAlchemyURL | None,
    manager: ExecutionConnectionManager | None,
    reserve: int,
) -> AsyncIterator[AsyncBudgetedConnectionPool]:
    """The async twin of :func:`_budgeted_pool`; the blocking steps run on a thread."""
    # the first pool_for() of a URL creates the tools' engine (imports, no I/O on the loop)
    plan = await asyncio.to_thread(_Plan, used_by, database_url, manager, reserve)
    # setting aside may wait for tool connections; a cancellation meanwhile cannot lose
    # the slots (they are given back once the thread has them)
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
        manager: the manager whose budget it draws from; by default the process default
            at entry (enter it after ``configure()``: a manager installed later has a
            budget of its own).
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

    with _budgeted_pool("checkpointer", database_url, manager, reserve) as pool:
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

    async with _abudgeted_pool("checkpointer", database_url, manager, reserve) as pool:
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

    with _budgeted_pool("store", database_url, manager, reserve) as pool:
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

    async with _abudgeted_pool("store", database_url, manager, reserve) as pool:
        store = AsyncPostgresStore(pool, **store_options)
        if setup:
            await store.setup()
        yield store
