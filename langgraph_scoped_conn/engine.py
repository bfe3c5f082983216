"""Engines: the pool a manager owns for a URL, and the scoped engine an execution draws from.

* :class:`PoolHandle` is one pool: its SQLAlchemy engine (over a
  :class:`~langgraph_scoped_conn.pool.BudgetPool` for ``shared`` and ``pooler``), its
  strategy and counters, and the pool events that count connections and clean them.
* :class:`ScopedEngine` is a cheap :class:`~sqlalchemy.engine.Engine` view (an
  ``OptionEngine``) of a pool's engine that belongs to one execution.  Every
  connection it checks out is recorded against that execution.

Session state does not cross executions: a connection that went back to a shared
PostgreSQL pool is reset (``DISCARD ALL``) before anyone else can get it, unless the
only thing that ran on it was the guarded read-only path, which leaves nothing behind.
"""

from __future__ import annotations

import logging
import select
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, Engine, create_engine
from sqlalchemy.engine.base import OptionEngine
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection, QueuePool

from langgraph_scoped_conn.errors import ConfigurationError, ConnectionReclaimedError
from langgraph_scoped_conn.execution import Checkout, Execution
from langgraph_scoped_conn.pool import BudgetPool, CountingPool, PoolCounters
from langgraph_scoped_conn.settings import (
    ScopedConnSettings,
    resolve_strategy,
    safe_url,
    shown_url,
)

__all__ = ["CLEAN_KEY", "PoolHandle", "ScopedEngine", "mark_clean"]

logger = logging.getLogger("langgraph_scoped_conn")

#: Key under ``ConnectionPoolEntry.info`` that links a checked-out entry to its checkout record.
CHECKOUT_KEY = "langgraph_scoped_conn.checkout"
#: Key under ``ConnectionPoolEntry.info``: this checkout left no session state behind (a
#: scoped engine's checkout records that on its :class:`Checkout` instead).
CLEAN_KEY = "langgraph_scoped_conn.clean"
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


class ScopedConnection(Connection):
    """A Connection of a :class:`ScopedEngine`; it does not reconnect once its execution ended."""

    def _revalidate_connection(self) -> PoolProxiedConnection:
        execution = getattr(self.engine, "_lsc_execution", None)
        if self.invalidated and execution is not None and execution.state != "open":
            # reclaimed at scope end (or lost) after the execution ended: SQLAlchemy would
            # say "rollback() first" or silently check out a new connection
            raise ConnectionReclaimedError(
                f"this connection belonged to execution {execution.execution_id!r}, which has "
                "ended; it was closed at scope exit because it was still checked out. Use "
                "`with engine.connect() as conn:` inside the scope, and get a new engine in "
                "the next execution"
            )
        return super()._revalidate_connection()


class ScopedEngine(OptionEngine):
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
    def _copy_for(cls, prototype: ScopedEngine, execution: Execution) -> ScopedEngine:
        """A copy of ``prototype`` for ``execution``, skipping OptionEngine's set-up.

        ``OptionEngine.__init__`` builds a logger and joins event dispatchers, the same
        for every execution of a pool; copying a prototype keeps a new run's engine at
        about a microsecond.
        """
        engine = cls.__new__(cls)
        engine.__dict__.update(prototype.__dict__)
        engine._lsc_execution = execution
        return engine

    @property
    def execution_id(self) -> str:
        """The id of the execution this engine belongs to."""
        return self._lsc_execution.execution_id

    def execution_options(self, **opt: Any) -> ScopedEngine:
        return ScopedEngine(self, self._lsc_execution, self._lsc_handle, **opt)

    def raw_connection(self) -> PoolProxiedConnection:
        execution, handle = self._lsc_execution, self._lsc_handle
        frame = _caller_frame()
        execution.reserve()
        try:
            fairy = handle.connect(execution)
        except BaseException:
            execution.unreserve()
            raise
        checkout = execution.record(fairy, frame, handle)
        fairy.info[CHECKOUT_KEY] = checkout
        if handle.tag_connections:
            checkout.tagged = _tag_connection(fairy, handle, self.execution_id)
        return fairy

    def connect(self) -> Connection:
        connection = super().connect()
        dbapi = connection._dbapi_connection
        checkout = dbapi.info.get(CHECKOUT_KEY) if dbapi is not None else None
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
        find_deadlock: given the ids of the threads waiting for this pool, names the
            executions that hold every connection while waiting for another, or ``None``.
        per_execution_id: the execution that owns this pool (strategy ``per_execution``).
    """

    def __init__(
        self,
        url: URL,
        settings: ScopedConnSettings,
        *,
        describe_holders: Callable[[], str],
        find_deadlock: Callable[[PoolHandle], str | None] | None = None,
        per_execution_id: str | None = None,
    ) -> None:
        self.url = url
        self.strategy = resolve_strategy(settings.strategy, url)
        if per_execution_id is not None:
            self.strategy = "per_execution"
        self.execution_id = per_execution_id
        self.settings = settings
        self.retired = False
        self.counters = PoolCounters()
        self.safe_url = safe_url(url)
        is_pg = url.get_backend_name() == "postgresql"
        #: SET application_name to name the execution at each checkout (shared PostgreSQL only)
        self.tag_connections = settings.tag_connections and self.strategy == "shared" and is_pg
        #: DISCARD ALL a connection that may carry session state before it is handed out
        #: again (not behind a transaction pooler, where sessions are the pooler's)
        self.resets_sessions = is_pg and self.strategy == "shared"
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
        self.dialect_name = self.engine.dialect.name
        self._install_listeners()

    @property
    def size(self) -> int:
        """How many connections this pool may hold at once."""
        return int(self.engine.pool.size()) if isinstance(self.engine.pool, QueuePool) else 0

    def in_use(self) -> int:
        """Connections checked out right now."""
        return int(self.engine.pool.checkedout()) if isinstance(self.engine.pool, QueuePool) else 0

    def idle(self) -> int:
        """Connections open and waiting in the pool."""
        c = self.counters
        return max(c.opened - c.closed - self.in_use(), 0)

    def connect(self, execution: Execution) -> PoolProxiedConnection:
        """Check a connection out of the pool for ``execution`` (blocking while it waits)."""
        thread = threading.get_ident()
        self.connecting[thread] = execution
        try:
            return self.engine.pool.connect()
        finally:
            del self.connecting[thread]

    def waiting_executions(self) -> set[Execution]:
        """The executions with a thread waiting for a connection of this pool right now."""
        pool = self.engine.pool
        waiting = list(pool.waiting) if isinstance(pool, BudgetPool) else []
        found = (self.connecting.get(thread) for thread in waiting)
        return {e for e in found if e is not None}

    def snapshot(self) -> dict[str, Any]:
        """Plain values for the stats payload."""
        pool = self.engine.pool
        return {
            "url": shown_url(self.url),
            "strategy": self.strategy,
            "dialect": self.dialect_name,
            "driver": self.url.get_driver_name(),
            "waiting": pool.requests_waiting() if isinstance(pool, BudgetPool) else 0,
            "execution_id": self.execution_id,
            "max_connections": self.size,
            "in_use": self.in_use(),
            "idle": self.idle(),
            "counters": self.counters.snapshot(),
        }

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
        return create_engine(
            url,
            poolclass=BudgetPool,
            pool_size=s.max_connections,
            connect_args=connect_args,
            **options,
        )

    def _pre_ping_listeners(self) -> tuple[Callable[..., None], Callable[..., None]]:
        """Ping at checkout only when a connection may have gone stale (0 round trips usually).

        SQLAlchemy's ``pool_pre_ping`` costs a round trip per checkout.  Here a connection
        is pinged when it sat idle longer than :attr:`pre_ping_idle` (a firewall or NAT
        may have dropped it silently), or when its socket has something to read: an idle
        connection is sent nothing unless the server is ending it (a restart, a
        ``pg_terminate_backend``, ``idle_session_timeout``), so that check costs a
        ``poll()`` and no round trip.  A failed ping raises ``DisconnectionError``, and
        SQLAlchemy hands out a new connection instead.
        """
        dialect = self.engine.dialect

        def ping_if_stale(dbapi_connection: Any, record: ConnectionPoolEntry, proxy: Any) -> None:
            checked_in = record.info.get(CHECKED_IN_KEY)
            limit = self.pre_ping_idle
            if checked_in is None or limit is None:
                return  # opened for this checkout
            if time.monotonic() - checked_in <= limit and not _has_input(dbapi_connection):
                return
            try:
                dialect.do_ping(dbapi_connection)
            except Exception as exc:
                raise DisconnectionError(f"pre-ping failed: {type(exc).__name__}") from exc

        def on_checkin(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
            if dbapi_connection is not None:
                record.info[CHECKED_IN_KEY] = time.monotonic()

        return ping_if_stale, on_checkin

    def _install_listeners(self) -> None:
        """Count connections and clean them as they come back.

        Opening and closing (rare) are pool events; checkout and check-in counting and the
        clean-up of a returned connection are the :class:`CountingPool`'s own hooks, which
        cost less than an event per checkout.  With the idle pre-ping, the ping is the one
        checkout listener (a failed ping raises, and SQLAlchemy retries the checkout).
        """
        counters = self.counters
        pool = self.engine.pool
        assert isinstance(pool, CountingPool), type(pool)
        resets = self.resets_sessions
        ping, stamp = self._pre_ping_listeners() if self.pre_ping_idle is not None else (None, None)

        def on_connect(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
            counters.on_open()

        def on_close(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
            counters.on_close()

        def on_return(record: ConnectionPoolEntry) -> None:
            dbapi_connection = record.dbapi_connection
            if stamp is not None:
                stamp(dbapi_connection, record)
            info = record.info
            checkout: Checkout | None = info.pop(CHECKOUT_KEY, None)
            if checkout is None:  # not a scoped engine's checkout (reflection, a plain use)
                info.pop(CLEAN_KEY, None)
                return
            if dbapi_connection is not None:
                if resets and (not checkout.clean or checkout.cancelled):
                    if _discard_all(dbapi_connection):
                        counters.add("resets")
                    else:  # a broken session: close it rather than hand it out
                        record.invalidate()
                elif checkout.tagged:
                    _set_application_name(dbapi_connection, self.settings.application_name)
            checkout.returned()

        event.listen(pool, "connect", on_connect)
        event.listen(pool, "close", on_close)
        event.listen(pool, "close_detached", on_close)
        if ping is not None:
            event.listen(pool, "checkout", ping)
        pool.counters = counters
        pool.on_return = on_return

    def scoped_engine(self, execution: Execution, **options: Any) -> ScopedEngine:
        """A new :class:`ScopedEngine` of this pool for ``execution``."""
        if options:
            return ScopedEngine(self.engine, execution, self, **options)
        prototype = self._prototype
        if prototype is None:
            prototype = ScopedEngine(self.engine, execution, self)
            del prototype._lsc_execution  # don't keep the first execution alive
            self._prototype = prototype
        return ScopedEngine._copy_for(prototype, execution)

    def dispose(self) -> None:
        """Close every idle connection and forget the pool (blocking I/O).

        Connections still checked out are not closed by SQLAlchemy's dispose; the
        execution scope closes those it reclaims itself.
        """
        self.engine.dispose()

    def __repr__(self) -> str:
        return f"PoolHandle({self.safe_url}, strategy={self.strategy!r}, size={self.size})"


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


def _has_input(dbapi_connection: Any) -> bool:
    """True if an idle connection's socket can be read (or cannot be checked)."""
    try:
        fd = dbapi_connection.fileno()
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            return bool(poller.poll(0))
        return bool(select.select([fd], [], [], 0)[0])
    except Exception:
        return True  # ping rather than hand out a connection nobody checked


def _discard_all(dbapi_connection: Any) -> bool:
    """Reset every piece of session state (1 round trip); False if the session is broken.

    ``DISCARD ALL`` closes cursors, resets settings, role and session authorization,
    drops temp tables, prepared statements and LISTENs, and releases advisory locks.
    It cannot run in a transaction block, so it runs in autocommit; the pool has
    already rolled back.  psycopg 3 forgets its own prepared statements on seeing it.
    """
    try:
        autocommit = dbapi_connection.autocommit
        dbapi_connection.autocommit = True
        try:
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute("DISCARD ALL")
            finally:
                cursor.close()
        finally:
            dbapi_connection.autocommit = autocommit
    except Exception as exc:
        logger.debug("could not reset a session: %s", type(exc).__name__)
        return False
    return True


def _tag_connection(fairy: PoolProxiedConnection, handle: PoolHandle, execution_id: str) -> bool:
    """Name the execution in the connection's application_name (``tag_connections=True``).

    Returns:
        True if it was set (the checkin sets it back).
    """
    name = f"{handle.settings.application_name}:{execution_id}"[:63]
    return _set_application_name(fairy.dbapi_connection, name)


def _set_application_name(dbapi_connection: Any, name: str) -> bool:
    """Set and commit application_name, so a later rollback keeps it (2 round trips)."""
    try:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("select set_config('application_name', %s, false)", (name,))
        finally:
            cursor.close()
        dbapi_connection.commit()
    except Exception as exc:  # a broken connection fails the caller's own query instead
        logger.debug("could not set application_name: %s", type(exc).__name__)
        return False
    return True


_INTERNAL_PREFIXES = ("sqlalchemy", "langgraph_scoped_conn.engine")


#: code objects of SQLAlchemy and the engine plumbing seen so far (a bounded set: only
#: those modules' functions are added), so the walk checks a module name once per function
_internal_code: set[Any] = set()


def _caller_frame() -> Any:
    """The innermost frame outside SQLAlchemy and this package's plumbing."""
    frame = sys._getframe(2)
    internal = _internal_code
    while frame is not None:
        code = frame.f_code
        if code not in internal:
            if not frame.f_globals.get("__name__", "").startswith(_INTERNAL_PREFIXES):
                return frame
            internal.add(code)
        frame = frame.f_back  # type: ignore[assignment]
    return frame
