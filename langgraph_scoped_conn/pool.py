"""The budget pool: a fixed-size QueuePool with fair admission, and its counters.

:class:`BudgetPool` is a :class:`~sqlalchemy.pool.QueuePool` whose size is the hard
budget (``max_connections``, no overflow).  Waiters are admitted first come, first
served.  A caller that waits longer than ``pool_timeout`` gets
:class:`~langgraph_scoped_conn.errors.ConnectionBudgetExceededError` naming the
budget and the executions that hold connections; a caller that would wait on
executions which are themselves all waiting for a connection gets it at once.

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
from sqlalchemy.pool import ConnectionPoolEntry, QueuePool
from sqlalchemy.util import queue as sqla_queue

from langgraph_scoped_conn.errors import ConnectionBudgetExceededError

__all__ = ["BudgetPool", "CountingPool", "PoolCounters"]


class PoolCounters:
    """Counters of one pool, updated by the pool and its events.  Guarded by ``lock``."""

    __slots__ = (
        "checkins",
        "checkouts",
        "closed",
        "connect_errors",
        "lock",
        "opened",
        "peak_in_use",
        "peak_open",
        "peak_wait_us",
        "resets",
        "timeouts",
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
    )

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.opened = 0
        self.closed = 0
        self.checkouts = 0
        self.checkins = 0
        self.waits = 0
        self.timeouts = 0
        self.resets = 0  # session resets (DISCARD ALL) of connections that may be dirty
        self.wait_us = 0  # microseconds requests spent waiting for the budget, in total
        self.peak_wait_us = 0  # the longest such wait
        self.connect_errors = 0  # new server connections that failed to open
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

    def on_waited(self, seconds: float) -> None:
        micros = int(seconds * 1_000_000)
        with self.lock:
            self.wait_us += micros
            self.peak_wait_us = max(self.peak_wait_us, micros)

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


class _Ticket:
    """A caller's place in the wait line."""

    __slots__ = ("waited",)

    def __init__(self) -> None:
        self.waited = False


def _nobody() -> str:
    return ""


def _returned_nowhere(record: ConnectionPoolEntry) -> None:
    return None


def _no_deadlock() -> str | None:
    return None


class CountingPool(QueuePool):
    """A QueuePool that counts checkouts and check-ins, and hands returned connections to a hook.

    It does directly what a ``checkout`` and a ``checkin`` event listener would do, at the
    same points (``_do_get`` and ``_return_conn``);
    SQLAlchemy's event dispatch costs a few microseconds per call, on every checkout.
    ``on_return`` runs before the connection is back in the pool (where the ``checkin``
    event runs), with the connection record; it may invalidate the record.
    """

    def __init__(self, creator: Any, **kw: Any) -> None:
        super().__init__(creator, **kw)
        self.counters = PoolCounters()
        #: called with each returned connection's record, before it is pooled again
        self.on_return: Callable[[ConnectionPoolEntry], None] = _returned_nowhere

    def recreate(self) -> CountingPool:
        pool = super().recreate()
        assert isinstance(pool, CountingPool)
        pool.counters = self.counters
        pool.on_return = self.on_return
        return pool

    def _do_get(self) -> ConnectionPoolEntry:
        entry = self._get_entry()
        self.counters.on_checkout()
        return entry

    def _get_entry(self) -> ConnectionPoolEntry:
        return super()._do_get()

    def _return_conn(self, record: ConnectionPoolEntry) -> None:
        # a check-in, exactly where the ``checkin`` event fires; not ``_do_return_conn``,
        # which a ``detach()`` also calls for a connection that leaves the pool unreturned
        try:
            self.counters.on_checkin()
            self.on_return(record)
        finally:
            super()._return_conn(record)


class BudgetPool(CountingPool):
    """A fixed-size QueuePool with first-come-first-served admission and a clear timeout error.

    Only the head of the wait line blocks on the underlying queue; later arrivals wait
    behind it, so a caller that keeps acquiring cannot overtake one that is waiting.
    """

    def __init__(self, creator: Any, **kw: Any) -> None:
        kw["max_overflow"] = 0
        super().__init__(creator, **kw)
        #: names the executions holding connections, for the timeout error
        self.describe_holders: Callable[[], str] = _nobody
        #: names the cycle when every holder waits for a connection itself, else None
        self.find_deadlock: Callable[[], str | None] = _no_deadlock
        self._gate = threading.Condition(threading.Lock())
        self._line: collections.deque[object] = collections.deque()
        #: ids of the threads waiting for a connection right now
        self.waiting: set[int] = set()
        creator = self._invoke_creator

        def invoke_creator(rec: ConnectionPoolEntry) -> DBAPIConnection:
            # every server connect goes through here (a new slot, or a reconnect of an
            # invalidated one at checkout): count the failures, as psycopg_pool does
            try:
                connection: DBAPIConnection = creator(rec)
            except Exception:
                with self.counters.lock:
                    self.counters.connect_errors += 1
                raise
            return connection

        self._invoke_creator = invoke_creator

    def recreate(self) -> BudgetPool:
        pool = super().recreate()
        assert isinstance(pool, BudgetPool)
        pool.describe_holders = self.describe_holders
        pool.find_deadlock = self.find_deadlock
        return pool

    def _get_entry(self) -> ConnectionPoolEntry:
        if not self._line:  # nobody is waiting: an idle connection needs no place in line
            entry = self._take_idle()
            if entry is not None:
                return entry
        start = time.monotonic()
        ticket = _Ticket()
        try:
            return self._wait_in_line(ticket, start + self._timeout)
        finally:
            if ticket.waited:  # psycopg_pool's requests_wait_ms counts requests that queued
                self.counters.on_waited(time.monotonic() - start)

    def requests_waiting(self) -> int:
        """Callers waiting for a connection right now (in line, or at its head and blocked)."""
        return len(self._line)

    def _wait_in_line(self, ticket: _Ticket, deadline: float) -> ConnectionPoolEntry:
        thread = threading.get_ident()
        with self._gate:
            self.waiting.add(thread)
            self._line.append(ticket)
            behind = self._line[0] is not ticket
            if behind:  # counted once per request, in line or at the head
                ticket.waited = True
                with self.counters.lock:
                    self.counters.waits += 1
        if behind:
            # the head looked for a deadlock before blocking and will not look again; a
            # caller joining the line behind it may be the one that closes the cycle
            cycle = self.find_deadlock()
            if cycle is not None:
                with self._gate:
                    self._line.remove(ticket)
                    self.waiting.discard(thread)
                    self._gate.notify_all()
                raise self._budget_error(cycle)
        with self._gate:
            while self._line[0] is not ticket:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._gate.wait(remaining):
                    if self._line[0] is ticket:
                        break
                    self._line.remove(ticket)
                    self.waiting.discard(thread)
                    self._gate.notify_all()
                    raise self._budget_error()
        try:
            return self._get_as_head(deadline)
        finally:
            with self._gate:
                self._line.remove(ticket)
                self.waiting.discard(thread)
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
        cycle = self.find_deadlock()
        if cycle is not None:
            raise self._budget_error(cycle)
        head = self._line[0]  # this caller's ticket
        if isinstance(head, _Ticket) and not head.waited:
            head.waited = True
            with self.counters.lock:
                self.counters.waits += 1
        try:
            return self._pool.get(True, max(deadline - time.monotonic(), 0.001))
        except sqla_queue.Empty:
            pass
        raise self._budget_error()

    def _budget_error(self, cycle: str | None = None) -> ConnectionBudgetExceededError:
        with self.counters.lock:
            self.counters.timeouts += 1
        if cycle is not None:
            return ConnectionBudgetExceededError(
                f"all {self.size()} connections of the budget (max_connections={self.size()}) "
                f"are held by executions that are themselves waiting for another: {cycle}. "
                "None can go on, so this request fails at once instead of after "
                f"pool_timeout={self._timeout:.2f}s; its scope's release lets the others go "
                "on. Return connections before asking for another (`with engine.connect()`)"
            )
        holders = self.describe_holders() or "none recorded (connections held outside scopes)"
        return ConnectionBudgetExceededError(
            f"all {self.size()} connections of the budget (max_connections={self.size()}) stayed "
            f"in use for pool_timeout={self._timeout:.2f}s; executions holding connections: "
            f"{holders}. Raise max_connections if the server allows it, lower concurrency, or "
            "make tools return connections sooner"
        )
