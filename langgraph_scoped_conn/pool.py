"""Engines and pools: the shared budget pool, per-execution engines and the scoped engine.

* :class:`BudgetPool` is a :class:`~sqlalchemy.pool.QueuePool` whose size is the hard
  budget (``max_connections``, no overflow).  Waiters are admitted first come, first
  served, and a caller that waits longer than ``pool_timeout`` gets
  :class:`~langgraph_scoped_conn.errors.ConnectionBudgetExceededError` naming the
  budget and the executions that hold connections.
* :class:`ScopedEngine` is a cheap :class:`~sqlalchemy.engine.Engine` view (an
  ``OptionEngine``) of a pool's engine that belongs to one execution.  Every
  connection it checks out is recorded against that execution.
"""

from __future__ import annotations

import collections
import logging
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, Engine, create_engine
from sqlalchemy.engine.base import OptionEngine
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection, QueuePool
from sqlalchemy.util import queue as sqla_queue

from langgraph_scoped_conn.errors import ConnectionBudgetExceededError, ConnectionReclaimedError
from langgraph_scoped_conn.settings import ScopedConnSettings, resolve_strategy

if TYPE_CHECKING:
    from langgraph_scoped_conn.registry import Execution

__all__ = ["BudgetPool", "PoolHandle", "ScopedEngine"]

logger = logging.getLogger("langgraph_scoped_conn")

#: Key under ``ConnectionPoolEntry.info`` that links a checked-out entry to its checkout record.
CHECKOUT_KEY = "langgraph_scoped_conn.checkout"
#: Execution option that names the owning execution on a :class:`ScopedEngine`.
EXECUTION_OPTION = "langgraph_scoped_conn_execution"


class PoolCounters:
    """Counters of one pool, updated from SQLAlchemy pool events.  Guarded by ``lock``."""

    __slots__ = (
        "checkins",
        "checkouts",
        "closed",
        "lock",
        "opened",
        "peak_in_use",
        "peak_open",
        "timeouts",
        "waits",
    )

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.opened = 0
        self.closed = 0
        self.checkouts = 0
        self.checkins = 0
        self.waits = 0
        self.timeouts = 0
        self.peak_open = 0
        self.peak_in_use = 0

    def on_open(self) -> None:
        with self.lock:
            self.opened += 1
            self.peak_open = max(self.peak_open, self.opened - self.closed)

    def on_close(self) -> None:
        with self.lock:
            self.closed += 1

    def on_checkout(self) -> None:
        with self.lock:
            self.checkouts += 1
            self.peak_in_use = max(self.peak_in_use, self.checkouts - self.checkins)

    def on_checkin(self) -> None:
        with self.lock:
            self.checkins += 1


class BudgetPool(QueuePool):
    """A fixed-size QueuePool with first-come-first-served admission and a clear timeout error.

    Only the head of the wait line blocks on the underlying queue; later arrivals wait
    behind it, so a caller that keeps acquiring cannot overtake one that is waiting.
    """

    def __init__(self, creator: Any, **kw: Any) -> None:
        kw["max_overflow"] = 0
        super().__init__(creator, **kw)
        self._describe_holders: Callable[[], str] = lambda: ""
        self.counters = PoolCounters()
        self._gate = threading.Condition(threading.Lock())
        self._line: collections.deque[object] = collections.deque()

    def recreate(self) -> BudgetPool:
        pool = super().recreate()
        assert isinstance(pool, BudgetPool)
        pool._describe_holders = self._describe_holders
        pool.counters = self.counters
        return pool

    def _do_get(self) -> ConnectionPoolEntry:
        if not self._line:  # nobody is waiting: an idle connection needs no place in line
            entry = self._take_idle()
            if entry is not None:
                return entry
        deadline = time.monotonic() + self._timeout
        ticket = object()
        with self._gate:
            self._line.append(ticket)
            if self._line[0] is not ticket:
                with self.counters.lock:
                    self.counters.waits += 1
            while self._line[0] is not ticket:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._gate.wait(remaining):
                    if self._line[0] is ticket:
                        break
                    self._line.remove(ticket)
                    self._gate.notify_all()
                    raise self._budget_error()
        try:
            return self._get_as_head(deadline)
        finally:
            with self._gate:
                self._line.remove(ticket)
                self._gate.notify_all()

    def _take_idle(self) -> ConnectionPoolEntry | None:
        """An idle pooled connection, or ``None`` if there is none right now."""
        try:
            return self._pool.get(False)
        except sqla_queue.Empty:
            return None

    def _get_as_head(self, deadline: float) -> ConnectionPoolEntry:
        try:
            return self._pool.get(False)
        except sqla_queue.Empty:
            pass
        if self._inc_overflow():
            try:
                return self._create_connection()
            except BaseException:
                self._dec_overflow()
                raise
        with self.counters.lock:
            self.counters.waits += 1
        try:
            return self._pool.get(True, max(deadline - time.monotonic(), 0.001))
        except sqla_queue.Empty:
            pass
        raise self._budget_error()

    def _budget_error(self) -> ConnectionBudgetExceededError:
        with self.counters.lock:
            self.counters.timeouts += 1
        holders = self._describe_holders() or "none recorded (connections held outside scopes)"
        return ConnectionBudgetExceededError(
            f"all {self.size()} connections of the budget (max_connections={self.size()}) stayed "
            f"in use for pool_timeout={self._timeout:.2f}s; executions holding connections: "
            f"{holders}. Raise max_connections if the server allows it, lower concurrency, or "
            "make tools return connections sooner"
        )


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
    """

    _lsc_execution: Execution
    _lsc_handle: PoolHandle
    _connection_cls = ScopedConnection

    def __init__(
        self, proxied: Engine, execution: Execution, handle: PoolHandle, **options: Any
    ) -> None:
        super().__init__(proxied, {EXECUTION_OPTION: execution.execution_id, **options})
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
        engine._execution_options = prototype._execution_options.union(
            {EXECUTION_OPTION: execution.execution_id}
        )
        engine._lsc_execution = execution
        return engine

    @property
    def execution_id(self) -> str:
        """The id of the execution this engine belongs to."""
        return self._lsc_execution.execution_id

    def execution_options(self, **opt: Any) -> ScopedEngine:
        return ScopedEngine(self, self._lsc_execution, self._lsc_handle, **opt)

    def raw_connection(self) -> PoolProxiedConnection:
        fairy = self._lsc_execution.checkout(self._lsc_handle, _caller_frame())
        if self._lsc_handle.tag_connections:
            _tag_connection(fairy, self._lsc_handle, self.execution_id)
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
        return (
            f"ScopedEngine({self.url.render_as_string(hide_password=True)}, "
            f"execution={self.execution_id!r})"
        )


class PoolHandle:
    """One pool the manager owns: its engine, strategy and counters.

    ``shared`` and ``pooler`` strategies keep one handle per URL for the manager's
    life; ``per_execution`` creates a handle per execution and disposes it at the end.
    """

    def __init__(
        self,
        url: URL,
        settings: ScopedConnSettings,
        *,
        describe_holders: Callable[[], str],
        per_execution_id: str | None = None,
    ) -> None:
        self.url = url
        self.strategy = resolve_strategy(settings.strategy, url)
        if per_execution_id is not None:
            self.strategy = "per_execution"
        self.settings = settings
        self.retired = False
        self.counters = PoolCounters()
        self.safe_url = url.render_as_string(hide_password=True)
        #: SET application_name to name the execution at each checkout (shared PostgreSQL only)
        self.tag_connections = (
            settings.tag_connections
            and self.strategy == "shared"
            and url.get_backend_name() == "postgresql"
        )
        self._prototype: ScopedEngine | None = None
        self.engine = self._create_engine(describe_holders, per_execution_id)
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

    def _create_engine(
        self, describe_holders: Callable[[], str], per_execution_id: str | None
    ) -> Engine:
        s = self.settings
        url = self.url.difference_update_query(["pgbouncer"])
        connect_args: dict[str, Any] = {}
        options: dict[str, Any] = {
            "pool_recycle": s.pool_recycle,
            "pool_pre_ping": s.pool_pre_ping,
            "pool_timeout": s.pool_timeout,
        }
        backend = url.get_backend_name()
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
                from langgraph_scoped_conn.errors import ConfigurationError

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
            # the guide's settings for an engine of one execution
            return create_engine(
                url,
                pool_size=2,
                max_overflow=3,
                pool_reset_on_return="commit",
                connect_args=connect_args,
                **{**options, "pool_timeout": s.pool_timeout},
            )
        engine = create_engine(
            url,
            poolclass=BudgetPool,
            pool_size=s.max_connections,
            connect_args=connect_args,
            **options,
        )
        pool = engine.pool
        assert isinstance(pool, BudgetPool)
        pool._describe_holders = describe_holders
        pool.counters = self.counters
        return engine

    def _install_listeners(self) -> None:
        counters = self.counters
        pool = self.engine.pool

        def on_connect(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
            counters.on_open()

        def on_close(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
            counters.on_close()

        def on_checkout(dbapi_connection: Any, record: ConnectionPoolEntry, proxy: Any) -> None:
            counters.on_checkout()

        def on_checkin(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
            counters.on_checkin()
            checkout = record.info.pop(CHECKOUT_KEY, None)
            if record.info.pop(TAGGED_KEY, False) and dbapi_connection is not None:
                _set_application_name(dbapi_connection, self.settings.application_name)
            if checkout is not None:
                checkout.returned()

        event.listen(pool, "connect", on_connect)
        event.listen(pool, "close", on_close)
        event.listen(pool, "close_detached", on_close)
        event.listen(pool, "checkout", on_checkout)
        event.listen(pool, "checkin", on_checkin)

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
        """Close every idle connection and forget the pool (blocking I/O)."""
        self.engine.dispose()

    def __repr__(self) -> str:
        return f"PoolHandle({self.safe_url}, strategy={self.strategy!r}, size={self.size})"


def _check_no_session_state(url: URL, connect_args: dict[str, Any]) -> None:
    """Refuse startup ``options`` behind a transaction pooler: later transactions may not see them.

    The ``pooler`` strategy keeps the budget pool (the client connections to the pooler
    are what the budget caps; keeping them saves a TCP and SCRAM handshake per checkout,
    and an idle one holds no server backend); state belongs in ``SET LOCAL``.
    """
    from langgraph_scoped_conn.errors import ConfigurationError

    if "options" in connect_args or "options" in url.query:
        raise ConfigurationError(
            "strategy='pooler': the startup parameter `options` (e.g. '-c search_path=...') "
            "sets session state, which a transaction pooler does not keep for the next "
            "transaction (PgBouncer rejects it). Remove it and use SET LOCAL inside the "
            "transaction, or use strategy='shared' when connecting to PostgreSQL directly"
        )


#: Key under ``ConnectionPoolEntry.info`` set while a connection carries an execution's name.
TAGGED_KEY = "langgraph_scoped_conn.tagged"


def _tag_connection(fairy: PoolProxiedConnection, handle: PoolHandle, execution_id: str) -> None:
    """Name the execution in the connection's application_name (``tag_connections=True``)."""
    name = f"{handle.settings.application_name}:{execution_id}"[:63]
    if _set_application_name(fairy.dbapi_connection, name):
        fairy.info[TAGGED_KEY] = True


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


_INTERNAL_PREFIXES = ("sqlalchemy", "langgraph_scoped_conn.pool", "langgraph_scoped_conn.registry")


def _caller_frame() -> Any:
    """The innermost frame outside SQLAlchemy and this package's plumbing."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_globals.get("__name__", "").startswith(_INTERNAL_PREFIXES):
        frame = frame.f_back  # type: ignore[assignment]
    return frame
