"""The budget pool: a fixed-size QueuePool with a fair wait line, and its counters.

:class:`BudgetPool` is a :class:`~sqlalchemy.pool.QueuePool` whose size is the hard
budget (``max_connections``, no overflow).  A caller that finds no idle connection and
no free slot joins a first-come, first-served line, and a returned connection is handed
straight to the head of the line (one wake-up per hand-over, as psycopg_pool does).  A
caller that waits longer than ``pool_timeout`` gets
:class:`~langgraph_scoped_conn.errors.ConnectionBudgetExceededError` naming the budget
and the executions that hold connections.  A caller that has waited past a short
threshold looks, now and then, for executions that hold every connection while all
waiting for another; if it finds them it fails at once instead.

Slots may be set aside (:meth:`BudgetPool.reserve`) for LangGraph's checkpointer and
store, which draw from pools of their own: the budget then covers both.

The pool knows nothing of executions: the engine layer gives it two callbacks,
``describe_holders`` and ``find_deadlock``.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.pool import ConnectionPoolEntry

from langgraph_scoped_conn.compat import HookedQueuePool, checked_out_by
from langgraph_scoped_conn.errors import ConfigurationError, ConnectionBudgetExceededError

__all__ = [
    "RECLAIMED_KEY",
    "BudgetPool",
    "CountingPool",
    "PoolCounters",
    "roll_back_unless_abandoned",
]

#: Seconds a caller waits in line before it first looks for a budget deadlock, and the
#: longest gap between two looks after that (the gap doubles from the first).
DEADLOCK_CHECK_AFTER = 0.2
DEADLOCK_CHECK_EVERY = 2.0
#: ``ConnectionPoolEntry.info`` key: when the record was checked out (time.monotonic()).
CHECKED_OUT_AT = "langgraph_scoped_conn.checked_out_at"

Observer = Callable[[str, float], None]


class PoolCounters:
    """Counters of one pool, updated by the pool and its events.  Guarded by ``lock``."""

    __slots__ = (
        "checkins",
        "checkouts",
        "closed",
        "connect_errors",
        "create_count",
        "create_us",
        "lock",
        "opened",
        "peak_in_use",
        "peak_open",
        "peak_wait_us",
        "resets",
        "timeouts",
        "use_us",
        "wait_us",
        "waits",
    )

    NAMES = (
        "opened",
        "closed",
        "checkouts",
        "checkins",
        "waits",
        "timeouts",
        "resets",
        "wait_us",
        "connect_errors",
        "use_us",
        "create_us",
        "create_count",
    )

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.opened = 0
        self.closed = 0
        self.checkouts = 0
        self.checkins = 0
        self.waits = 0
        self.timeouts = 0
        self.resets = 0  # session resets (DISCARD ALL) of connections that changed hands
        self.wait_us = 0  # microseconds requests spent waiting for the budget, in total
        self.peak_wait_us = 0  # the longest such wait
        self.connect_errors = 0  # new server connections that failed to open
        self.use_us = 0  # microseconds connections were checked out, in total (check-ins)
        self.create_us = 0  # microseconds spent opening server connections, in total
        self.create_count = 0  # server connections opened, timed in create_us
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

    def on_checkin(self, used_us: int) -> None:
        with self.lock:
            self.checkins += 1
            self.use_us += used_us

    def on_waited(self, seconds: float) -> None:
        micros = int(seconds * 1_000_000)
        with self.lock:
            self.wait_us += micros
            self.peak_wait_us = max(self.peak_wait_us, micros)

    def on_created(self, seconds: float) -> None:
        with self.lock:
            self.create_us += int(seconds * 1_000_000)
            self.create_count += 1

    def add(self, name: str) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + 1)

    def snapshot(self) -> dict[str, int]:
        """The counters as plain values."""
        with self.lock:
            values = {name: getattr(self, name) for name in self.NAMES}
            values["peak_open"] = self.peak_open
            values["peak_in_use"] = self.peak_in_use
            values["peak_wait_us"] = self.peak_wait_us
        return values


def _returned_nowhere(record: ConnectionPoolEntry) -> None:
    return None


def _nobody() -> str:
    return ""


def _no_deadlock() -> str | None:
    return None


def _nothing() -> None:
    return None


class CountingPool(HookedQueuePool):
    """A QueuePool that counts checkouts and check-ins, and hands returned connections to a hook.

    It does directly what a ``checkout`` and a ``checkin`` event listener would do, at the
    same points; SQLAlchemy's event dispatch costs a few microseconds per call, on every
    checkout.  ``on_return`` runs before the connection is back in the pool (where the
    ``checkin`` event runs), with the connection record; it may invalidate the record.
    ``observe``, when set, hears ``("wait"|"use"|"create", seconds)`` for each event
    (OpenTelemetry histograms).
    """

    def __init__(self, creator: Any, **kw: Any) -> None:
        super().__init__(creator, **kw)
        self.counters = PoolCounters()
        #: called with each returned connection's record, before it is pooled again
        self.on_return: Callable[[ConnectionPoolEntry], None] = _returned_nowhere
        self.observe: Observer | None = None
        creator_fn = self._invoke_creator

        def invoke_creator(rec: ConnectionPoolEntry) -> DBAPIConnection:
            # every server connect goes through here (a new slot, or a reconnect of an
            # invalidated one at checkout): time it, and count failures as psycopg_pool does
            start = time.monotonic()
            try:
                connection: DBAPIConnection = creator_fn(rec)
            except Exception:
                with self.counters.lock:
                    self.counters.connect_errors += 1
                raise
            took = time.monotonic() - start
            self.counters.on_created(took)
            if self.observe is not None:
                self.observe("create", took)
            return connection

        self._invoke_creator = invoke_creator

    def recreate(self) -> CountingPool:
        pool = super().recreate()
        assert isinstance(pool, CountingPool)
        pool.counters = self.counters
        pool.on_return = self.on_return
        pool.observe = self.observe
        return pool

    def take_entry(self) -> ConnectionPoolEntry:
        entry = self.take()
        self.counters.on_checkout()
        entry.info[CHECKED_OUT_AT] = time.monotonic()
        return entry

    def take(self) -> ConnectionPoolEntry:
        return super().take_entry()

    def on_checkin(self, record: ConnectionPoolEntry) -> None:
        since = record.info.pop(CHECKED_OUT_AT, None)
        used = time.monotonic() - since if since is not None else 0.0
        self.counters.on_checkin(int(used * 1_000_000))
        if self.observe is not None and since is not None:
            self.observe("use", used)
        self.on_return(record)


#: handed to a waiter instead of a record: a slot is free, open a connection on it
#: ``record.info`` key: a release closed this checked-out connection under its thread
#: and freed its slot (:meth:`BudgetPool.abandon`); when that thread returns it, the
#: record is closed, not pooled
RECLAIMED_KEY = "langgraph_scoped_conn.reclaimed"

_NEW_SLOT: Any = object()


class _Ticket:
    """A caller's place in the wait line: a held lock its predecessor releases to hand over.

    ``record`` is what was handed over: a returned record, or :data:`_NEW_SLOT`.
    """

    __slots__ = ("gate", "record", "thread")

    def __init__(self) -> None:
        self.gate = threading.Lock()
        self.gate.acquire()
        self.record: Any = None
        self.thread = threading.get_ident()


class BudgetPool(CountingPool):
    """A fixed-size QueuePool with a first-come-first-served line and a clear timeout error."""

    def __init__(self, creator: Any, **kw: Any) -> None:
        kw["max_overflow"] = 0
        super().__init__(creator, **kw)
        #: names the executions holding connections, for the timeout error
        self.describe_holders: Callable[[], str] = _nobody
        #: names the cycle when every holder waits for a connection itself, else None
        self.find_deadlock: Callable[[], str | None] = _no_deadlock
        #: told each time a caller has waited a while: connections ended runs no longer
        #: use may be waiting to be closed (the manager looks for them then)
        self.on_wait: Callable[[], None] = _nothing
        self._mutex = threading.Lock()
        self._disposed = False  # a connection that comes back after dispose() is closed
        #: idle records taken out to reset their session (not in use by anyone)
        self.claimed = 0
        self._line: collections.deque[_Ticket] = collections.deque()
        self._slots_freed = threading.Condition(self._mutex)

    def recreate(self) -> BudgetPool:
        pool = super().recreate()
        assert isinstance(pool, BudgetPool)
        pool.describe_holders = self.describe_holders
        pool.find_deadlock = self.find_deadlock
        pool.on_wait = self.on_wait
        pool.reserved = self.reserved
        return pool

    @property
    def waiting(self) -> set[int]:
        """Ids of the threads waiting for a connection right now."""
        with self._mutex:
            return {t.thread for t in self._line}

    def requests_waiting(self) -> int:
        """Callers waiting for a connection right now."""
        return len(self._line)

    def capacity(self) -> int:
        """Connections this pool may open: the budget less the slots set aside."""
        return self.size() - self.reserved

    # -- checkout ----------------------------------------------------------------------

    def take(self) -> ConnectionPoolEntry:
        if not self._line:  # nobody waits: an idle connection needs no place in line
            record = self.idle_take()
            if record is not None:
                return record
        with self._mutex:
            if not self._line:
                record = self.idle_take()
                if record is not None:
                    return record
            opened = self.open_slot()
            if not opened:
                ticket = _Ticket()
                self._line.append(ticket)
        if opened:
            return self._create()
        return self._wait(ticket)

    def _create(self) -> ConnectionPoolEntry:
        try:
            return self.create_entry()
        except BaseException:
            self._slot_freed()
            raise

    def _wait(self, ticket: _Ticket) -> ConnectionPoolEntry:
        start = time.monotonic()
        deadline = start + self.pool_timeout()
        with self.counters.lock:
            self.counters.waits += 1
        gap = DEADLOCK_CHECK_AFTER
        try:
            while True:
                now = time.monotonic()
                if now >= deadline:
                    raise self._budget_error()
                if ticket.gate.acquire(timeout=min(deadline - now, gap)):
                    return self._handed(ticket)
                self.on_wait()
                cycle = self.find_deadlock()
                if cycle is not None:
                    raise self._budget_error(cycle)
                gap = min(gap * 2, DEADLOCK_CHECK_EVERY)
        except BaseException:
            with self._mutex:
                handed = ticket.record
                if handed is None:
                    self._line.remove(ticket)
            if handed is _NEW_SLOT:  # handed over as this caller gave up: pass it on
                self._slot_freed()
            elif handed is not None:
                self.give_back(handed)
            raise
        finally:
            waited = time.monotonic() - start
            self.counters.on_waited(waited)
            if self.observe is not None:
                self.observe("wait", waited)

    def _handed(self, ticket: _Ticket) -> ConnectionPoolEntry:
        if ticket.record is _NEW_SLOT:
            return self._create()
        record: ConnectionPoolEntry = ticket.record
        return record

    def _hand_over(self, what: Any) -> None:
        """Give ``what`` to the head of the line (holding the mutex; the line is not empty)."""
        ticket = self._line.popleft()
        ticket.record = what
        ticket.gate.release()

    # -- check-in ----------------------------------------------------------------------

    def dispose(self) -> None:
        """Close the idle connections; those still checked out are closed when returned."""
        with self._mutex:
            self._disposed = True
        super().dispose()

    def give_back(self, record: ConnectionPoolEntry) -> None:
        if record.info.pop(RECLAIMED_KEY, False):
            record.close()  # abandoned: its slot was freed then (see abandon)
            return
        with self._mutex:
            # disposed, or slots were set aside meanwhile: close this one
            close = self._disposed or self.over_capacity()
            if not close:
                if self._line:
                    self._hand_over(record)
                else:
                    self.idle_put(record)
                return
        try:
            record.close()
        finally:
            self._slot_freed()

    def _slot_freed(self) -> None:
        self.free_slot()
        with self._mutex:
            self._offer_slots()
            self._slots_freed.notify_all()

    def _offer_slots(self) -> None:
        """Let waiters open connections on free slots (holding the mutex)."""
        while self._line and self.open_slot():
            self._hand_over(_NEW_SLOT)

    def abandon(self, record: ConnectionPoolEntry, fairy: Any, close: Callable[[], None]) -> bool:
        """Close a checked-out connection its thread may still hold, and free its slot.

        Only while ``fairy`` still holds ``record`` (its thread has not begun returning
        it), checked under the pool's mutex, which that return takes too.  SQLAlchemy's
        objects stay with the thread: returning the record from here would race with
        its own check-in, which may then put the record back a second time, or
        invalidate it after another caller got it.  The record never comes back into
        use: its thread's return (or the garbage collector's) closes it, and the slot is
        freed here, once ``close`` returned.

        Args:
            close: closes the driver's connection and returns once its server backend
                is gone (not under the pool's mutex: it may wait).

        Returns:
            True if it was closed and its slot freed; False if its thread is returning
            it (then it comes back as any returned connection does).
        """
        with self._mutex:
            if not checked_out_by(record, fairy):
                return False
            record.info[RECLAIMED_KEY] = True
        try:
            close()
        finally:
            self._slot_freed()
        return True

    def claim_idle(self, record: ConnectionPoolEntry) -> bool:
        """Take an idle ``record`` out of the pool to work on it (then :meth:`unclaim`)."""
        with self._mutex:
            claimed = self.idle_remove(record)
            self.claimed += claimed
            return claimed

    def unclaim(self, record: ConnectionPoolEntry) -> None:
        """Put a record :meth:`claim_idle` took back (to the head of the line, or idle)."""
        with self._mutex:
            self.claimed -= 1
        self.give_back(record)

    def in_use(self) -> int:
        """Connections checked out right now (not those taken out to be reset)."""
        return int(self.checkedout()) - self.claimed

    # -- slots set aside ---------------------------------------------------------------

    def reserve(self, count: int, timeout: float) -> None:
        """Set ``count`` slots of the budget aside; wait until they are really free.

        Idle connections beyond the new capacity are closed now; checked-out ones when
        they come back.

        Raises:
            ConfigurationError: no slot would be left for the pool itself.
            ConnectionBudgetExceededError: connections in use did not come back in time.
        """
        with self._mutex:
            if count < 1 or self.capacity() - count < 1:
                raise ConfigurationError(
                    f"cannot set {count} connection(s) aside from a budget of {self.size()} "
                    f"with {self.reserved} already set aside: the runs' tools need at least one; "
                    "raise max_connections or lower the reserve"
                )
            self.reserved += count
        deadline = time.monotonic() + timeout
        try:
            while True:
                with self._mutex:
                    extra: list[ConnectionPoolEntry] = []
                    excess = self.records() - self.capacity()
                    while len(extra) < excess:
                        record = self.idle_take()
                        if record is None:
                            break
                        extra.append(record)
                    done = excess <= 0
                for record in extra:
                    try:
                        record.close()
                    finally:
                        self.free_slot()
                if done:
                    return
                if extra:
                    continue
                with self._mutex:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise ConnectionBudgetExceededError(
                            f"could not set {count} connection(s) of the budget aside within "
                            f"{timeout:.2f}s: the runs hold them ({self.describe_holders()}); "
                            "create the checkpointer at startup, before runs start"
                        )
                    self._slots_freed.wait(min(remaining, 0.1))
        except BaseException:
            self.unreserve(count)
            raise

    def unreserve(self, count: int) -> None:
        """Give ``count`` slots set aside back to the pool."""
        with self._mutex:
            self.reserved = max(self.reserved - count, 0)
            self._offer_slots()

    # -- errors ------------------------------------------------------------------------

    def _budget_error(self, cycle: str | None = None) -> ConnectionBudgetExceededError:
        with self.counters.lock:
            self.counters.timeouts += 1
        size = self.size()
        aside = f", {self.reserved} set aside for the checkpointer" if self.reserved else ""
        if cycle is not None:
            return ConnectionBudgetExceededError(
                f"all {self.capacity()} connections of the budget (max_connections={size}"
                f"{aside}) are held by executions that are themselves waiting for another: "
                f"{cycle}. None can go on, so this request fails now instead of after "
                f"pool_timeout={self.pool_timeout():.2f}s; its scope's release lets the others "
                "go on. Return connections before asking for another (`with engine.connect()`)"
            )
        holders = self.describe_holders() or "none recorded (connections held outside scopes)"
        return ConnectionBudgetExceededError(
            f"all {self.capacity()} connections of the budget (max_connections={size}{aside}) "
            f"stayed in use for pool_timeout={self.pool_timeout():.2f}s; executions holding "
            f"connections: {holders}. Raise max_connections if the server allows it, lower "
            "concurrency, or make tools return connections sooner"
        )


def roll_back_unless_abandoned(
    dbapi_connection: Any, record: ConnectionPoolEntry, state: Any
) -> None:
    """SQLAlchemy's reset on return (a rollback), as the budget pool's ``reset`` listener.

    Not for a connection a release closed under its thread (``BudgetPool.abandon``): it
    is closed, and its record is closed too when it comes back.
    """
    if state.transaction_was_reset or not state.asyncio_safe:
        return
    if RECLAIMED_KEY not in record.info:
        dbapi_connection.rollback()
