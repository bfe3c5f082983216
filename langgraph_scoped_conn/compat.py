"""Every reach into a library's private members, in one place.

The budget pool, the scoped engine and the session reset need a few things SQLAlchemy
and psycopg do not offer as public API.  Each is wrapped here under a name that says
what it does, and ``tests/test_compat.py`` checks each one at the dependency floors
(``.ci/floors.txt``) and at the latest versions, so an upgrade that moves one fails
there, not in production.

SQLAlchemy (``sqlalchemy.pool.impl.QueuePool`` and ``sqlalchemy.engine.base``):

* :class:`HookedQueuePool` overrides ``_do_get``, ``_do_return_conn``,
  ``_return_conn``, ``_inc_overflow`` and reads ``_pool`` (its ``queue`` and ``mutex``
  too), ``_overflow`` and ``_max_overflow``, so the budget pool can run its own wait
  line, count check-ins where the ``checkin`` event fires (without an event dispatch
  per checkout), reset an idle connection in place, and keep slots aside for
  LangGraph's checkpointer.
* :class:`EngineView` is an ``OptionEngine`` (what ``Engine.execution_options()``
  returns) whose connections refuse to reconnect once reclaimed
  (``Connection._revalidate_connection``).

psycopg 3:

* :func:`forget_prepared_statements` clears the connection's prepared-statement cache
  (``Connection._prepared``) after the package's own session reset deallocated them
  on the server, so psycopg never names a statement the server no longer has.
* :func:`statement_lock` is the connection's ``lock``, held while a statement runs.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import Connection
from sqlalchemy.engine.base import OptionEngine
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection, QueuePool
from sqlalchemy.util import queue as sqla_queue

__all__ = [
    "EngineView",
    "HookedQueuePool",
    "ReclaimAwareConnection",
    "checked_out_by",
    "forget_dbapi_connection",
    "forget_prepared_statements",
    "record_of",
    "statement_lock",
]


class HookedQueuePool(QueuePool):
    """A QueuePool whose checkout, check-in and slot accounting subclasses can replace.

    Subclasses implement :meth:`take_entry` (a checkout) and :meth:`give_back` (a
    returned connection), and may override :meth:`on_checkin`; they use the
    ``idle_*``, ``open_slot``/``free_slot`` and :meth:`create_entry` helpers instead of
    QueuePool's private members.  ``reserved`` slots (of ``pool_size``) cannot be
    opened.
    """

    def __init__(self, creator: Any, **kw: Any) -> None:
        super().__init__(creator, **kw)
        self.reserved = 0

    # -- what subclasses implement ---------------------------------------------------

    def take_entry(self) -> ConnectionPoolEntry:
        """Check out a connection record (QueuePool's behaviour by default)."""
        return super()._do_get()

    def give_back(self, record: ConnectionPoolEntry) -> None:
        """Take a returned record back (QueuePool's behaviour by default)."""
        super()._do_return_conn(record)

    def on_checkin(self, record: ConnectionPoolEntry) -> None:
        """A connection comes back, where the ``checkin`` event fires (before give_back)."""

    # -- QueuePool's private members, overridden -------------------------------------

    def _do_get(self) -> ConnectionPoolEntry:
        return self.take_entry()

    def _do_return_conn(self, record: ConnectionPoolEntry) -> None:
        self.give_back(record)

    def _return_conn(self, record: ConnectionPoolEntry) -> None:
        # a check-in, exactly where the ``checkin`` event fires; not ``_do_return_conn``,
        # which a ``detach()`` also calls for a connection that leaves the pool unreturned
        try:
            self.on_checkin(record)
        finally:
            super()._return_conn(record)

    def _inc_overflow(self) -> bool:
        with self._overflow_lock:
            if self._overflow < self._max_overflow - self.reserved:
                self._overflow += 1
                return True
            return False

    # -- helpers over QueuePool's private members ------------------------------------

    def idle_take(self) -> ConnectionPoolEntry | None:
        """An idle pooled record, or ``None`` if there is none right now."""
        try:
            return self._pool.get(False)
        except sqla_queue.Empty:
            return None

    def idle_put(self, record: ConnectionPoolEntry) -> None:
        """Pool an idle record."""
        self._pool.put(record, False)

    def idle_count(self) -> int:
        return self._pool.qsize()

    def idle_remove(self, record: ConnectionPoolEntry) -> bool:
        """Take ``record`` out of the idle pool if it is there (True), else leave it."""
        queue = self._pool
        with queue.mutex:  # type: ignore[attr-defined]
            try:
                queue.queue.remove(record)  # type: ignore[attr-defined]
            except ValueError:
                return False
            queue.not_full.notify()  # type: ignore[attr-defined]
            return True

    def open_slot(self) -> bool:
        """Count one more record against the budget if one is free (then create it)."""
        return self._inc_overflow()

    def free_slot(self) -> None:
        """A record was closed for good: its slot is free."""
        self._dec_overflow()

    def records(self) -> int:
        """Records counted against the budget (open, checked out, or being opened)."""
        return int(self._overflow) + self.size()

    def over_capacity(self) -> bool:
        """True while more records are counted than the budget less the reserve allows."""
        return bool(self._overflow > self._max_overflow - self.reserved)

    def create_entry(self) -> ConnectionPoolEntry:
        """A new record with a new connection (its slot already counted)."""
        return self._create_connection()

    def pool_timeout(self) -> float:
        return float(self._timeout)


class ReclaimAwareConnection(Connection):
    """A Connection that asks :meth:`refuse_reconnect` before reconnecting after invalidation."""

    def refuse_reconnect(self) -> None:
        """Raise to stop an invalidated connection from checking out a new one."""

    def _revalidate_connection(self) -> PoolProxiedConnection:
        if self.invalidated:
            self.refuse_reconnect()
        return super()._revalidate_connection()


class EngineView(OptionEngine):
    """An engine sharing another engine's pool and dialect (``Engine.execution_options()``)."""

    _connection_cls = ReclaimAwareConnection

    @classmethod
    def copy_of(cls, prototype: EngineView) -> Any:
        """A copy of ``prototype`` made without OptionEngine's set-up (a logger, dispatch).

        That set-up is the same for every copy of one pool's engine; copying keeps a new
        run's engine at about a microsecond.
        """
        engine = cls.__new__(cls)
        engine.__dict__.update(prototype.__dict__)
        return engine


def forget_prepared_statements(driver_connection: Any) -> None:
    """Make psycopg 3 forget its prepared statements (they were deallocated on the server).

    psycopg clears its cache on seeing ``DISCARD ALL`` only while it holds prepared names,
    and the reset itself, run often enough, would be prepared too; clearing the cache
    here, after the package's reset, keeps the client and the server in step.  Any other
    driver: nothing to do.
    """
    prepared = getattr(driver_connection, "_prepared", None)
    if prepared is None:
        return
    prepared._counts.clear()
    prepared._names.clear()
    flush = getattr(prepared, "_to_flush", None)  # psycopg >= 3.2
    if flush is not None:
        flush.clear()
    maint = getattr(prepared, "_maint_commands", None)  # psycopg 3.0-3.1
    if maint is not None:
        maint.clear()


def statement_lock(driver_connection: Any) -> Any:
    """psycopg 3's connection lock (held while a statement runs), or ``None``."""
    lock = getattr(driver_connection, "lock", None)
    return lock if hasattr(lock, "locked") else None


def checked_out_by(record: ConnectionPoolEntry, fairy: Any) -> bool:
    """True while ``fairy`` still holds ``record``: its thread has not begun returning it.

    SQLAlchemy's record keeps a weak reference to the fairy that checked it out
    (``_ConnectionRecord.fairy_ref``) and clears it first thing in its check-in.
    """
    ref = getattr(record, "fairy_ref", None)
    return ref is not None and ref() is fairy


def record_of(fairy: Any) -> ConnectionPoolEntry | None:
    """The pool record a checked-out connection (``_ConnectionFairy``) holds, if any."""
    record: ConnectionPoolEntry | None = getattr(fairy, "_connection_record", None)
    return record


def forget_dbapi_connection(connection: Connection) -> None:
    """Make a SQLAlchemy Connection drop its pooled connection without returning it.

    Its next use asks to reconnect (``_revalidate_connection``), which a
    :class:`ReclaimAwareConnection` refuses.  The pooled connection is left to the
    pool's own return path (the thread holding it, or the garbage collector): for a
    connection another thread may be closing right now, where ``invalidate()`` would
    return it a second time.
    """
    connection._dbapi_connection = None
