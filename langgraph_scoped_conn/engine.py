"""Engines: the pool a manager owns for a URL, and the scoped engine an execution draws from.

* :class:`PoolHandle` is one pool: its SQLAlchemy engine (over a
  :class:`~langgraph_scoped_conn.pool.BudgetPool` for ``shared`` and ``pooler``), its
  strategy and counters, and the hooks that count connections and keep their sessions
  apart (:mod:`langgraph_scoped_conn.session`).
* :class:`ScopedEngine` is a cheap :class:`~sqlalchemy.engine.Engine` view of a pool's
  engine that belongs to one execution.  Every connection it checks out is recorded
  against that execution.

Session state does not cross executions: a connection that comes back is marked with
its owner and whether it may carry session state; the next checkout by another
execution resets it first (one round trip), and a checkout by the same execution does
not.  Only the guarded read-only path and write-mode statements that provably change
nothing (:mod:`langgraph_scoped_conn.stateless`) mark their checkout clean
(:func:`mark_clean`), so they never need a reset.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, Engine, create_engine
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection, QueuePool

from langgraph_scoped_conn.checkout import Activity, Checkout
from langgraph_scoped_conn.compat import EngineView, ReclaimAwareConnection
from langgraph_scoped_conn.errors import ConfigurationError, ConnectionReclaimedError
from langgraph_scoped_conn.execution import Execution
from langgraph_scoped_conn.pool import (
    RECLAIMED_KEY,
    BudgetPool,
    CountingPool,
    PoolCounters,
    roll_back_unless_abandoned,
)
from langgraph_scoped_conn.redaction import safe_url
from langgraph_scoped_conn.runs import current_tool_call
from langgraph_scoped_conn.session import (
    activity,
    behind_a_pooler,
    has_input,
    reset_session,
    set_application_name,
)
from langgraph_scoped_conn.settings import ScopedConnSettings
from langgraph_scoped_conn.urls import resolve_strategy, shown_url

__all__ = ["PRE_PING_IDLE", "PoolHandle", "ScopedEngine", "mark_clean", "pool_name", "tag_name"]

logger = logging.getLogger("langgraph_scoped_conn")

#: Key under ``ConnectionPoolEntry.info`` that links a checked-out entry to its checkout record.
CHECKOUT_KEY = "langgraph_scoped_conn.checkout"
#: Key under ``ConnectionPoolEntry.info``: this checkout left no session state behind (a
#: scoped engine's checkout records that on its :class:`Checkout` instead).
CLEAN_KEY = "langgraph_scoped_conn.clean"
#: Key under ``ConnectionPoolEntry.info``: the serial of the execution that last used the
#: connection and may have left session state in it (absent: the session is clean).
DIRTY_BY_KEY = "langgraph_scoped_conn.dirty_by"
#: Key under ``ConnectionPoolEntry.info``: ``time.monotonic()`` when it was last checked in.
CHECKED_IN_KEY = "langgraph_scoped_conn.checked_in"
#: Seconds a pooled PostgreSQL connection may sit idle before its next checkout pings
#: the server first (``pool_pre_ping=True``, strategies ``shared`` and ``pooler``).
PRE_PING_IDLE = 5.0


def mark_clean(connection: Connection) -> None:
    """Say that nothing run on ``connection`` in this checkout left session state behind."""
    checkout: Checkout | None = connection.info.get(CHECKOUT_KEY)
    if checkout is not None:
        checkout.clean = True
    else:
        connection.info[CLEAN_KEY] = True


class ScopedConnection(ReclaimAwareConnection):
    """A Connection of a :class:`ScopedEngine`; it does not reconnect once its execution ended."""

    def refuse_reconnect(self) -> None:
        execution = getattr(self.engine, "_lsc_execution", None)
        if execution is not None and execution.state != "open":
            # reclaimed at scope end (or lost) after the execution ended: SQLAlchemy would
            # say "rollback() first" or silently check out a new connection
            raise ConnectionReclaimedError(
                f"this connection belonged to execution {execution.execution_id!r}, which has "
                "ended; it was closed at scope exit because nothing was using it. Use "
                "`with engine.connect() as conn:` inside the scope, and get a new engine in "
                "the next execution"
            )


class ScopedEngine(EngineView):
    """An Engine that belongs to one execution and draws from a shared pool.

    It shares the pool, dialect and compiled cache of the pool's engine, so creating
    one costs microseconds.  Each checkout is recorded against the execution, and
    counts toward ``max_connections_per_execution``.  :meth:`dispose` does not touch
    the shared pool: the execution scope releases this engine's connections.
    Once the execution has ended, every checkout raises
    :class:`~langgraph_scoped_conn.errors.ScopeClosedError`, from any thread.
    """

    _lsc_execution: Execution
    _lsc_handle: PoolHandle
    _connection_cls = ScopedConnection

    def __init__(
        self, proxied: Engine, execution: Execution, handle: PoolHandle, **options: Any
    ) -> None:
        super().__init__(proxied, options)
        self._lsc_execution = execution
        self._lsc_handle = handle

    @classmethod
    def for_execution(cls, prototype: ScopedEngine, execution: Execution) -> ScopedEngine:
        """A copy of ``prototype`` for ``execution`` (about a microsecond)."""
        engine: ScopedEngine = cls.copy_of(prototype)
        engine._lsc_execution = execution
        return engine

    @property
    def execution_id(self) -> str:
        """The id of the execution this engine belongs to."""
        return self._lsc_execution.execution_id

    def execution_options(self, **opt: Any) -> ScopedEngine:
        return ScopedEngine(self, self._lsc_execution, self._lsc_handle, **opt)

    def raw_connection(self) -> PoolProxiedConnection:
        return self._lsc_handle.checkout(self._lsc_execution)

    def connect(self) -> Connection:
        connection = super().connect()
        checkout = connection.connection.info.get(CHECKOUT_KEY)
        if checkout is not None:
            checkout.connection = weakref.ref(connection)
        return connection

    def dispose(self, close: bool = True) -> None:
        """Do nothing to the shared pool; the execution scope releases this engine's connections.

        Tool code written for unscoped engines often calls ``engine.dispose()``; on a
        scoped engine that would close connections other executions are using, so
        it only logs at DEBUG.
        """
        logger.debug(
            "dispose() on the scoped engine of execution %s ignored; "
            "the scope releases its connections when it ends",
            self.execution_id,
        )

    def __repr__(self) -> str:
        return f"ScopedEngine({safe_url(self.url)}, execution={self.execution_id!r})"


class PoolHandle:
    """One pool the manager owns: its engine, strategy and counters.

    ``shared`` and ``pooler`` strategies keep one handle per URL for the manager's
    life; ``per_execution`` creates a handle per execution and disposes it at the end.

    Args:
        url: the parsed URL.
        settings: the manager's settings.
        describe_holders: names the executions holding connections (for errors).
        find_deadlock: given this handle, names the executions that hold every
            connection while waiting for another, or ``None``.
        on_wait: called each time a caller has waited for the budget a while.
        per_execution_id: the execution that owns this pool (strategy ``per_execution``).
    """

    def __init__(
        self,
        url: URL,
        settings: ScopedConnSettings,
        *,
        describe_holders: Callable[[], str],
        find_deadlock: Callable[[PoolHandle], str | None] | None = None,
        on_wait: Callable[[], None] | None = None,
        per_execution_id: str | None = None,
    ) -> None:
        self.url = url
        self.strategy, self.strategy_reason = resolve_strategy(settings.strategy, url)
        if per_execution_id is not None:
            self.strategy = "per_execution"
        self.execution_id = per_execution_id
        self.settings = settings
        self.retired = False
        self.counters = PoolCounters()
        self.safe_url = safe_url(url)
        #: ``host:port/database`` (OpenTelemetry's ``db.client.connection.pool.name``)
        self.pool_name = pool_name(url)
        is_pg = url.get_backend_name() == "postgresql"
        #: SET application_name to name the execution at each checkout (shared PostgreSQL only)
        self.tag_connections = settings.tag_connections and self.strategy == "shared" and is_pg
        #: reset a connection that may carry session state before another execution gets
        #: it (not behind a transaction pooler, where sessions are the pooler's)
        self.resets_sessions = is_pg and self.strategy == "shared"
        #: caches of the layers above that belong to this pool (e.g. the read-only guard's
        #: function catalog); cleared with the schema cache
        self.catalog: dict[str, Any] = {}
        #: the first connection was checked for a transaction pooler in between
        self.pooler_checked = False
        #: a pooler answered where the strategy is ``shared`` (see _check_for_a_pooler)
        self.pooler_detected = False
        self._prototype: ScopedEngine | None = None
        #: thread id -> the execution it checks a connection out for, while it does
        self.connecting: dict[int, Execution] = {}
        #: ping at checkout only a connection idle longer than this, or whose socket has
        #: something to read (the server's goodbye); None: SQLAlchemy's ping every time
        self.pre_ping_idle: float | None = None
        if settings.pool_pre_ping and is_pg and self.strategy != "per_execution":
            self.pre_ping_idle = PRE_PING_IDLE
        self.engine = self._create_engine(per_execution_id)
        pool = self.engine.pool
        if isinstance(pool, BudgetPool):
            pool.describe_holders = describe_holders
            if find_deadlock is not None:
                pool.find_deadlock = lambda: find_deadlock(self)
            if on_wait is not None:
                pool.on_wait = on_wait
        self.dialect_name = self.engine.dialect.name
        self._install_listeners()

    @property
    def size(self) -> int:
        """How many connections this pool may hold at once."""
        return int(self.engine.pool.size()) if isinstance(self.engine.pool, QueuePool) else 0

    @property
    def budget_pool(self) -> BudgetPool | None:
        """The budget pool (strategies ``shared`` and ``pooler``), else ``None``."""
        pool = self.engine.pool
        return pool if isinstance(pool, BudgetPool) else None

    def in_use(self) -> int:
        """Connections checked out right now."""
        pool = self.engine.pool
        if isinstance(pool, BudgetPool):
            return pool.in_use()
        return int(pool.checkedout()) if isinstance(pool, QueuePool) else 0

    def idle(self) -> int:
        """Connections open and waiting in the pool."""
        c = self.counters
        return max(c.opened - c.closed - self.in_use(), 0)

    @staticmethod
    def activity(fairy: PoolProxiedConnection) -> Activity:
        """What a checked-out connection is doing (see :func:`session.activity`)."""
        return activity(fairy.driver_connection)

    # -- checkout ----------------------------------------------------------------------

    def checkout(self, execution: Execution) -> PoolProxiedConnection:
        """Check a connection out for ``execution``: reserve, wait, reset if it changed hands."""
        execution.reserve()
        thread = threading.get_ident()
        self.connecting[thread] = execution
        try:
            fairy = self.engine.pool.connect()
            if self.resets_sessions:
                fairy = self._clean_for(fairy, execution)
        except BaseException:
            execution.unreserve()
            raise
        finally:
            del self.connecting[thread]
        checkout = execution.record(fairy, self)
        fairy.info[CHECKOUT_KEY] = checkout
        if self.tag_connections:
            checkout.tagged = self._tag(fairy, execution)
        return fairy

    def _clean_for(self, fairy: PoolProxiedConnection, execution: Execution) -> Any:
        """Reset a connection another execution may have left session state in."""
        dirty_by = fairy.info.get(DIRTY_BY_KEY)
        if dirty_by is None or dirty_by == execution.serial:
            return fairy
        if reset_session(fairy.driver_connection):
            self.counters.add("resets")
            del fairy.info[DIRTY_BY_KEY]
            return fairy
        # a broken session: close it, and take a fresh connection on the same slot
        fairy.invalidate()
        fairy = self.engine.pool.connect()
        fairy.info.pop(DIRTY_BY_KEY, None)
        return fairy

    def reset_if_idle(self, record: ConnectionPoolEntry, serial: int) -> None:
        """Reset a pooled connection an ended execution left session state in (blocking).

        Only if it is idle and still marked by that execution: one another execution
        took meanwhile was reset by that checkout.  It is out of the pool while reset.
        """
        pool = self.budget_pool
        if pool is None or record.info.get(DIRTY_BY_KEY) != serial:
            return
        if not pool.claim_idle(record):
            return
        try:
            driver = record.driver_connection
            if driver is None or record.info.get(DIRTY_BY_KEY) != serial:
                return
            if reset_session(driver):
                self.counters.add("resets")
                del record.info[DIRTY_BY_KEY]
            else:  # a broken session: close it; the slot reconnects when next used
                record.invalidate()
        finally:
            pool.unclaim(record)

    def _tag(self, fairy: PoolProxiedConnection, execution: Execution) -> bool:
        """Name the execution (and the tool call, if known) in ``application_name``."""
        tool_call = current_tool_call.get()
        name = tag_name(
            self.settings.application_name,
            execution.execution_id,
            tool_call[1] if tool_call is not None else None,
        )
        return set_application_name(fairy.driver_connection, name)

    def waiting_executions(self) -> set[Execution]:
        """The executions with a thread waiting for a connection of this pool right now."""
        pool = self.budget_pool
        waiting = pool.waiting if pool is not None else set()
        found = (self.connecting.get(thread) for thread in waiting)
        return {e for e in found if e is not None}

    # -- slots set aside ---------------------------------------------------------------

    def reserve(self, count: int, timeout: float) -> None:
        """Set ``count`` slots of this pool's budget aside (see :meth:`BudgetPool.reserve`).

        Raises:
            ConfigurationError: the strategy has no budget pool, or no slot would be left.
        """
        pool = self.budget_pool
        if pool is None:
            raise ConfigurationError(
                "strategy='per_execution' has no shared budget to set connections aside from; "
                "use strategy='shared' or 'pooler'"
            )
        pool.reserve(count, timeout)

    def unreserve(self, count: int) -> None:
        pool = self.budget_pool
        if pool is not None:
            pool.unreserve(count)

    # -- stats -------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Plain values for the stats payload."""
        pool = self.budget_pool
        return {
            "url": shown_url(self.url),
            "pool_name": self.pool_name,
            "strategy": self.strategy,
            "strategy_reason": self.strategy_reason,
            "pooler_detected": self.pooler_detected,
            "dialect": self.dialect_name,
            "driver": self.url.get_driver_name(),
            "waiting": pool.requests_waiting() if pool is not None else 0,
            "reserved": pool.reserved if pool is not None else 0,
            "execution_id": self.execution_id,
            "max_connections": self.size,
            "in_use": self.in_use(),
            "idle": self.idle(),
            "counters": self.counters.snapshot(),
        }

    # -- set-up ------------------------------------------------------------------------

    def _create_engine(self, per_execution_id: str | None) -> Engine:
        s = self.settings
        url = self.url.difference_update_query(["pgbouncer"])
        connect_args: dict[str, Any] = {}
        backend = url.get_backend_name()
        options: dict[str, Any] = {
            "pool_recycle": s.pool_recycle,
            # a connection to an SQLite file cannot go stale: a ping would only cost a query
            "pool_pre_ping": s.pool_pre_ping and self.pre_ping_idle is None and backend != "sqlite",
            "pool_timeout": s.pool_timeout,
        }
        driver = url.get_driver_name()
        if backend == "postgresql":
            app = s.application_name
            if per_execution_id is not None:
                app = f"{app}:{per_execution_id}"
            connect_args["application_name"] = app[:63]
            if self.strategy == "pooler" and driver == "psycopg":
                # a transaction pooler hands each transaction to any server connection,
                # where a statement psycopg prepared earlier does not exist
                connect_args["prepare_threshold"] = None
        elif backend == "sqlite":
            if url.database in (None, "", ":memory:"):
                raise ConfigurationError(
                    "an in-memory SQLite database cannot be shared by a pool of connections; "
                    "use a file, e.g. sqlite:///agent.db"
                )
            connect_args["check_same_thread"] = False
        engine_options = dict(s.engine_options)
        connect_args.update(engine_options.pop("connect_args", {}))
        options.update(engine_options)
        if self.strategy == "pooler":
            _check_no_session_state(url, connect_args)
            if driver == "psycopg" and connect_args.get("prepare_threshold") is not None:
                logger.warning(
                    "strategy='pooler' with connect_args prepare_threshold=%r: a transaction "
                    "pooler may run the next transaction on a server connection that never "
                    "saw a prepared statement ('prepared statement ... does not exist'); "
                    "leave prepare_threshold out of engine_options",
                    connect_args["prepare_threshold"],
                )
        if per_execution_id is not None:
            # the guide's settings for an engine of one execution; engine_options may
            # still choose the reset on return
            options.setdefault("pool_reset_on_return", "commit")
            return create_engine(
                url,
                poolclass=CountingPool,
                pool_size=2,
                max_overflow=3,
                connect_args=connect_args,
                **options,
            )
        # the rollback on return is the "reset" listener's (_install_listeners), which
        # leaves out a connection a release closed under its thread (BudgetPool.abandon)
        options["pool_reset_on_return"] = None
        return create_engine(
            url,
            poolclass=BudgetPool,
            pool_size=s.max_connections,
            connect_args=connect_args,
            **options,
        )

    def _install_listeners(self) -> None:
        """Count connections, ping stale ones, and mark each one's session as it comes back.

        Opening and closing (rare) are pool events; checkout and check-in counting and the
        marking of a returned connection are the :class:`CountingPool`'s own hooks, which
        cost less than an event per checkout.  With the idle pre-ping, the ping is the one
        checkout listener (a failed ping raises, and SQLAlchemy retries the checkout).
        """
        counters = self.counters
        pool = self.engine.pool
        assert isinstance(pool, CountingPool), type(pool)
        resets = self.resets_sessions
        stamps = self.pre_ping_idle is not None
        dialect = self.engine.dialect

        def on_connect(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
            counters.on_open()
            if resets and not self.pooler_checked:
                self._check_for_a_pooler(dbapi_connection)

        def on_close(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
            counters.on_close()

        def ping_if_stale(dbapi_connection: Any, record: ConnectionPoolEntry, proxy: Any) -> None:
            # SQLAlchemy's pool_pre_ping costs a round trip per checkout; this pings only a
            # connection idle past the threshold (a firewall or NAT may have dropped it
            # silently) or whose socket shows the server's goodbye (no round trip)
            checked_in = record.info.get(CHECKED_IN_KEY)
            limit = self.pre_ping_idle
            if checked_in is None or limit is None:
                return  # opened for this checkout
            if time.monotonic() - checked_in <= limit and not has_input(dbapi_connection):
                return
            try:
                dialect.do_ping(dbapi_connection)
            except Exception as exc:
                raise DisconnectionError(f"pre-ping failed: {type(exc).__name__}") from exc

        def on_return(record: ConnectionPoolEntry) -> None:
            dbapi_connection = record.dbapi_connection
            info = record.info
            if stamps and dbapi_connection is not None:
                info[CHECKED_IN_KEY] = time.monotonic()
            checkout: Checkout | None = info.pop(CHECKOUT_KEY, None)
            if checkout is None:  # not a scoped engine's checkout (reflection, a plain use)
                info.pop(CLEAN_KEY, None)
                return
            dirty = None
            if dbapi_connection is not None and RECLAIMED_KEY not in info:  # not abandoned
                if resets and (not checkout.clean or checkout.cancelled):
                    info[DIRTY_BY_KEY] = checkout.execution.serial
                    dirty = record
                if checkout.tagged:
                    set_application_name(dbapi_connection, self.settings.application_name)
            checkout.returned(dirty)

        if isinstance(pool, BudgetPool):
            event.listen(pool, "reset", roll_back_unless_abandoned)
        event.listen(pool, "connect", on_connect)
        event.listen(pool, "close", on_close)
        event.listen(pool, "close_detached", on_close)
        if stamps:
            event.listen(pool, "checkout", ping_if_stale)
        pool.counters = counters
        pool.on_return = on_return

    def _check_for_a_pooler(self, dbapi_connection: Any) -> None:
        """Warn once if a ``shared`` pool's server answers through a transaction pooler.

        Behind one (PgBouncer, Supavisor), session resets and prepared statements reach
        whatever server connection the pooler picks next.  One query, on the pool's
        first connection (:func:`~langgraph_scoped_conn.session.behind_a_pooler`).
        """
        self.pooler_checked = True
        if not behind_a_pooler(dbapi_connection):
            return
        self.pooler_detected = True
        logger.warning(
            "%s answers through a connection pooler (PgBouncer or Supavisor: the backend "
            "pid given at login is not the server's), but the strategy is 'shared' (%s). "
            "Session resets and prepared statements would reach other clients' server "
            "connections: use strategy='pooler', or add ?pgbouncer=true to the URL",
            self.safe_url,
            self.strategy_reason,
        )

    def scoped_engine(self, execution: Execution, **options: Any) -> ScopedEngine:
        """A new :class:`ScopedEngine` of this pool for ``execution``."""
        if options:
            return ScopedEngine(self.engine, execution, self, **options)
        prototype = self._prototype
        if prototype is None:
            prototype = ScopedEngine(self.engine, execution, self)
            del prototype._lsc_execution  # don't keep the first execution alive
            self._prototype = prototype
        return ScopedEngine.for_execution(prototype, execution)

    def dispose(self) -> None:
        """Close every idle connection and forget the pool (blocking I/O).

        Connections still checked out are not closed by SQLAlchemy's dispose; the
        execution scope closes those it reclaims itself.
        """
        self.engine.dispose()

    def __repr__(self) -> str:
        return f"PoolHandle({self.safe_url}, strategy={self.strategy!r}, size={self.size})"


def tag_name(application_name: str, execution_id: str, tool_call_id: str | None) -> str:
    """``<application_name>:<execution id>[:<tool call id>]`` within PostgreSQL's 63 bytes.

    A uuid execution id and a tool call id do not both fit: the execution id is cut
    (to 8 characters at least), not the tool call id, which names one call of one run.
    """
    if not tool_call_id:
        return f"{application_name}:{execution_id}"[:63]
    room = 63 - len(application_name) - len(tool_call_id) - 2
    return f"{application_name}:{execution_id[: max(room, 8)]}:{tool_call_id}"[:63]


def pool_name(url: URL) -> str:
    """``server.address:server.port/db.namespace`` of ``url``: no user, no password."""
    host = url.host or "localhost"
    port = f":{url.port}" if url.port else ""
    return f"{host}{port}/{url.database or ''}"


def _check_no_session_state(url: URL, connect_args: dict[str, Any]) -> None:
    """Refuse startup ``options`` behind a transaction pooler: later transactions may not see them.

    The ``pooler`` strategy keeps the budget pool (the client connections to the pooler
    are what the budget caps; keeping them saves a TCP and SCRAM handshake per checkout,
    and an idle one holds no server backend); state belongs in ``SET LOCAL``.
    """
    if "options" in connect_args or "options" in url.query:
        raise ConfigurationError(
            "strategy='pooler': the startup parameter `options` (e.g. '-c search_path=...') "
            "sets session state, which a transaction pooler does not keep for the next "
            "transaction (PgBouncer rejects it). Remove it and use SET LOCAL inside the "
            "transaction, or use strategy='shared' when connecting to PostgreSQL directly"
        )
