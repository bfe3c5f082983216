"""One execution's resources: its state, its per-execution cap and the connections it holds.

Pure bookkeeping: nothing here does I/O.  Ending an execution returns what must be
closed (a :class:`Release`), and the blocking side (:mod:`langgraph_scoped_conn.release`)
closes it.  Engines record their checkouts here through :meth:`Execution.reserve`,
:meth:`Execution.record` and :meth:`Execution.returned`.

Whether a connection is still in use is read from the connection itself (see
:meth:`Checkout.activity`), never from the code that checked it out: a statement in
flight, or a transaction open on another thread than the one ending the execution.

An ended execution refuses every new use with :class:`ScopeClosedError`, on every
thread and task.  The one allowance: a thread that held one of its connections in use
when it ended (a sync node still running after its run was cancelled) keeps working
until it has returned them all.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Literal, Protocol

from langgraph_scoped_conn.checkout import Checkout
from langgraph_scoped_conn.errors import ExecutionConnectionLimitError, ScopeClosedError
from langgraph_scoped_conn.settings import ScopedConnSettings

__all__ = [
    "END_GRACE",
    "Execution",
    "ExecutionOwner",
    "FailedScope",
    "Release",
]

logger = logging.getLogger("langgraph_scoped_conn")

State = Literal["open", "draining", "closed"]

#: Seconds a connection another thread holds inside a transaction, between statements,
#: stays that thread's after its execution ended (a sync node still running after its
#: run was cancelled); then it is taken as abandoned and closed, which rolls the
#: transaction back on the server.
END_GRACE = 1.0

#: serial numbers of executions: unique within the process, never reused (an id may be)
_serials = itertools.count(1)

#: what an execution's rarely used tables hold until their first entry (read-only, shared:
#: most executions never track a resource, own a pool or leave a straggler, so they
#: allocate none of those tables; see Execution._table)
_NO_ENTRIES: Mapping[Any, Any] = MappingProxyType({})


class ExecutionOwner(Protocol):
    """What an execution needs from the manager that owns it."""

    settings: ScopedConnSettings

    def execution_drained(self, execution: Execution) -> None:
        """The last connection of an ended execution came back."""


class FailedScope:
    """Stands for the scope of a root run that could not be opened; its tools get the error."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


_NONE: tuple[Any, ...] = ()


class Release:
    """What ending an execution leaves to close: leaked connections, resources, pools."""

    __slots__ = (
        "cancel",
        "custom",
        "dirty",
        "draining",
        "execution",
        "handles",
        "reason",
        "reclaim",
    )

    def __init__(
        self,
        execution: Execution,
        reason: str,
        *,
        reclaim: Sequence[Checkout] = _NONE,
        cancel: Sequence[Checkout] = _NONE,
        custom: Sequence[Any] = _NONE,
        handles: Sequence[Any] = _NONE,
        dirty: Sequence[tuple[Any, Any]] = _NONE,
    ) -> None:
        self.execution = execution
        self.reason = reason
        #: checked out and not in use: close them
        self.reclaim = reclaim
        #: a statement in flight for a force-released execution: cancel it on the server;
        #: the connection stays recorded (its slot held) until its thread returns it
        self.cancel = cancel
        self.custom = custom
        self.handles = handles
        #: (pool handle, record) of pooled connections whose session it may have changed:
        #: reset those still idle, so nothing of the execution outlives it
        self.dirty = dirty
        #: the execution ended with connections still in use
        self.draining = False

    def is_empty(self) -> bool:
        return not (self.reclaim or self.cancel or self.custom or self.handles or self.dirty)


class Execution:
    """The resources of one execution (one LangGraph run, or one ExecutionScope).

    Its fields are its own: the registry and the run index ask through :meth:`hold`,
    :meth:`drop` and the methods below.  ``lock`` is shared with other executions (the
    registry stripes a few locks), so opening an execution allocates none; ``cond`` is a
    condition on the same lock, used only for the per-execution cap.
    """

    __slots__ = (
        "_cond",
        "_grace_until",
        "_holds",
        "_inflight",
        "_lock",
        "_stragglers",
        "_waiters",
        "_warned_straggler",
        "cached",
        "checkouts",
        "created",
        "custom",
        "custom_origins",
        "databases",
        "dirtied",
        "engines",
        "execution_id",
        "handles",
        "owner",
        "reserved",
        "serial",
        "state",
    )

    def __init__(
        self,
        owner: ExecutionOwner,
        execution_id: str,
        lock: threading.Lock,
        cond: threading.Condition,
    ) -> None:
        self.owner = owner
        self.execution_id = execution_id
        self.serial = next(_serials)
        self.created = time.monotonic()
        self._holds = 1
        self.state: State = "open"
        # engines, databases, custom, custom_origins, handles, dirtied and _stragglers stay
        # shared read-only empties until their first entry (_list, _table)
        self.engines: Sequence[Any] = _NONE
        self.databases: Sequence[Any] = _NONE
        self.custom: Sequence[Any] = _NONE
        #: id(tracked object) -> (node that tracked it, stack when debug=True), for reports
        self.custom_origins: Mapping[int, tuple[str | None, str | None]] = _NO_ENTRIES
        self.cached: dict[Any, Any] = {}
        #: per-execution pools (strategy per_execution), by redacted URL
        self.handles: Mapping[str, Any] = _NO_ENTRIES
        self.checkouts: dict[int, Checkout] = {}
        #: id(record) -> (pool handle, record): connections it gave back with session state
        self.dirtied: Mapping[int, tuple[Any, Any]] = _NO_ENTRIES
        self.reserved = 0  # checkouts in flight (counted against the cap, not yet recorded)
        self._lock = lock
        self._cond = cond
        self._waiters = 0  # threads waiting on the per-execution cap
        #: threads that held connections in use (or were checking one out) when the
        #: execution ended -> how many they hold now; they may go on until they hold none
        self._stragglers: Mapping[int, int] = _NO_ENTRIES
        #: threads inside reserve() .. record()/unreserve() -> how many checkouts in flight
        self._inflight: dict[int, int] = {}
        self._warned_straggler = False
        #: until when a connection left inside a transaction stays its thread's
        self._grace_until = 0.0

    def _list(self, name: Literal["engines", "databases", "custom"]) -> list[Any]:
        """The list ``name`` (engines, databases, custom), made on its first entry.

        Holding the lock: an execution starts with shared read-only empties in the
        places most executions never fill.
        """
        items = getattr(self, name)
        if not isinstance(items, list):
            items = []
            setattr(self, name, items)
        return items

    def _table(
        self, name: Literal["custom_origins", "handles", "dirtied", "_stragglers"]
    ) -> dict[Any, Any]:
        """The dict ``name`` (custom_origins, handles, dirtied, _stragglers), made on its
        first entry (holding the lock; see :meth:`_list`)."""
        table = getattr(self, name)
        if not isinstance(table, dict):
            table = {}
            setattr(self, name, table)
        return table

    # -- holders -------------------------------------------------------------------

    # the registry is the one caller of hold() and drop(), always under its lock, so the
    # hold count needs no lock of its own (it is read nowhere else)

    def hold(self) -> None:
        """One more holder (a joining scope or run); the registry calls it under its lock."""
        self._holds += 1

    def drop(self, *, every: bool = False) -> bool:
        """Drop one hold (all with ``every``); True when none is left and it should end.

        The registry calls it under its lock.
        """
        self._holds = 0 if every else self._holds - 1
        return self._holds <= 0

    # -- checkouts -----------------------------------------------------------------

    def reserve(self) -> None:
        """Claim a place under the per-execution cap for a checkout about to start.

        Raises:
            ScopeClosedError: the execution has ended (and this thread may not go on).
            ExecutionConnectionLimitError: the cap stayed full for ``pool_timeout``.
        """
        settings = self.owner.settings
        cap = settings.max_connections_per_execution
        thread = threading.get_ident()
        with self._lock:
            if self.state != "open":
                self._check_usable()
            inflight = self._inflight
            inflight[thread] = inflight.get(thread, 0) + 1
            if len(self.checkouts) + self.reserved < cap:
                self.reserved += 1
                return
            try:
                self._wait_below_cap(cap, settings.pool_timeout)
                self._check_usable()  # the scope may have ended while this thread waited
                self.reserved += 1
                return
            except BaseException as exc:
                self._landed(thread, recorded=False)
                failure, drained = exc, self._drained()
        if drained:
            self.owner.execution_drained(self)
        raise failure

    def unreserve(self) -> None:
        """A reserved checkout failed; give its place back."""
        with self._lock:
            self.reserved -= 1
            self._landed(threading.get_ident(), recorded=False)
            self._wake_waiters()
            drained = self._drained()
        if drained:
            self.owner.execution_drained(self)

    def record(self, fairy: Any, pool: Any) -> Checkout:
        """Record the connection a reserved checkout obtained (from ``pool``)."""
        checkout = Checkout(self, fairy, pool)
        thread = checkout.thread_id
        with self._lock:
            self.reserved -= 1
            self.checkouts[id(checkout)] = checkout
            if self._inflight.get(thread) == 1 and not self._stragglers:
                del self._inflight[thread]  # the usual case, as _landed does it
            else:
                self._landed(thread, recorded=True)
        return checkout

    def _landed(self, thread: int, *, recorded: bool) -> None:
        """A checkout of ``thread`` left flight (holding the lock)."""
        left = self._inflight.get(thread, 0) - 1
        if left > 0:
            self._inflight[thread] = left
        else:
            self._inflight.pop(thread, None)
        if thread in self._stragglers:  # the execution ended meanwhile
            stragglers = self._table("_stragglers")
            if recorded:
                stragglers[thread] += 1
            elif not stragglers[thread] and thread not in self._inflight:
                del stragglers[thread]

    def returned(self, checkout: Checkout, dirty: Any = None) -> None:
        """Forget a checkout that came back to the pool; finish draining if it was the last.

        ``dirty`` is the connection's pool record when it may carry session state this
        execution left: it is reset when the execution ends, if nobody else took it.
        """
        with self._lock:
            if dirty is not None:
                self._table("dirtied")[id(dirty)] = (checkout.pool, dirty)
            if self.checkouts.pop(id(checkout), None) is None:
                return
            checkout.fairy = None
            if self._stragglers:
                self._straggler_returned(checkout.thread_id)
            if self._waiters:
                self._cond.notify_all()
            drained = self.state == "draining" and self._drained()
        if drained:
            self.owner.execution_drained(self)

    def _straggler_returned(self, thread_id: int) -> None:
        """A straggler thread gave one connection back (holding the lock)."""
        left = self._stragglers.get(thread_id)
        if left is None:
            return
        stragglers = self._table("_stragglers")
        if left <= 1 and thread_id not in self._inflight:
            del stragglers[thread_id]
        else:
            stragglers[thread_id] = max(left - 1, 0)

    def _drained(self) -> bool:
        """Move a draining execution to closed once nothing is out (holding the lock)."""
        if (
            self.state == "draining"
            and not self.checkouts
            and not self.reserved
            and not self._inflight
        ):
            self.state = "closed"
            return True
        return False

    def _wait_below_cap(self, cap: int, timeout: float) -> None:
        """Wait (holding the lock) until this execution holds fewer than ``cap`` connections."""
        deadline = time.monotonic() + timeout
        self._waiters += 1
        try:
            while len(self.checkouts) + self.reserved >= cap:
                if self.state != "open":
                    return  # ended while waiting: the caller re-checks and fails
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._cond.wait(remaining):
                    if len(self.checkouts) + self.reserved < cap:
                        return
                    raise ExecutionConnectionLimitError(
                        f"execution {self.execution_id!r} already holds {cap} connections "
                        f"(max_connections_per_execution={cap}) and none came back within "
                        f"pool_timeout={timeout:.2f}s; return connections you no longer need "
                        "(use `with engine.connect()`), or raise max_connections_per_execution"
                    )
        finally:
            self._waiters -= 1

    def _wake_waiters(self) -> None:
        """Wake threads waiting on the cap (holding the lock); the condition is shared."""
        if self._waiters:
            self._cond.notify_all()

    # -- use after the end ---------------------------------------------------------

    def _check_usable(self) -> None:
        if self.state == "open":
            return
        if threading.get_ident() in self._stragglers:
            # a sync node still running in the thread that held connections when its
            # run ended: it keeps working until it has returned them
            if not self._warned_straggler:
                self._warned_straggler = True
                logger.warning(
                    "execution %s has ended but a worker thread still uses its connections; "
                    "they are released as they are returned",
                    self.execution_id,
                )
            return
        raise ScopeClosedError(
            f"execution {self.execution_id!r} has ended; its engines and SQLDatabase objects "
            "cannot be used after the scope exits, from any thread. Get a new one inside the "
            "next execution (e.g. get_scoped_sql_database(config) in the tool, not at import)"
        )

    # -- what it owns --------------------------------------------------------------

    def add(self, kind: Literal["engines", "databases"], obj: Any) -> None:
        """Record an engine or SQLDatabase created for this execution."""
        with self._lock:
            self._check_usable()
            self._list(kind).append(obj)

    def add_engine_and_database(self, engine: Any, database: Any) -> None:
        """Record a new SQLDatabase and its engine (one lock instead of two)."""
        with self._lock:
            self._check_usable()
            self._list("engines").append(engine)
            self._list("databases").append(database)

    def add_custom(self, obj: Any, node: str | None, stack: str | None) -> None:
        """Record a resource to close when the execution ends."""
        with self._lock:
            self._check_usable()
            self._list("custom").append(obj)
            self._table("custom_origins")[id(obj)] = (node, stack)

    def handle_for(self, key: str, create: Callable[[], Any]) -> Any:
        """This execution's own pool for ``key``, created by ``create()`` on first use."""
        with self._lock:
            self._check_usable()
            handle = self.handles.get(key)
        if handle is None:
            made = create()
            with self._lock:
                handle = self._table("handles").setdefault(key, made)
            if handle is not made:
                made.dispose()
        return handle

    # -- ending --------------------------------------------------------------------

    def end(self, *, force: bool, reason: str, closer: int) -> Release:
        """Mark the execution ended and return what must be closed.

        Each connection still checked out is judged by what it is doing (no I/O):

        * a statement in flight: in use.  It is left to its thread (a straggler, which
          returns it when the statement ends); with ``force`` the statement is to be
          cancelled first.  It is never closed under the statement, so its budget slot
          is held until the server is done with it.
        * a transaction open between statements, checked out on another thread than
          ``closer`` (the thread ending the execution): in use by that thread for
          :data:`END_GRACE` seconds (see :meth:`abandoned`); with ``force``, abandoned.
        * anything else: abandoned (a leak).  It is to be closed, which rolls an open
          transaction back on the server and ends the backend at once.
        """
        with self._lock:
            dirty: list[tuple[Any, Any]] = []
            if self.dirtied:
                dirty = list(self.dirtied.values())
                self.dirtied = _NO_ENTRIES
            if not (self.checkouts or self.reserved or self._inflight or self.custom):
                # the usual end: nothing out, nothing tracked
                self.state = "closed"
                if self._waiters:
                    self._cond.notify_all()
                self.cached.clear()
                if self.handles or dirty:
                    return Release(self, reason, handles=list(self.handles.values()), dirty=dirty)
                return Release(self, reason)
            reclaim: list[Checkout] = []
            cancel: list[Checkout] = []
            stragglers = self._table("_stragglers")  # something is out: the rare end
            for checkout in list(self.checkouts.values()):
                activity = checkout.activity()
                kept = activity == "active" or (
                    activity == "transaction" and not force and checkout.thread_id != closer
                )
                if not kept:
                    reclaim.append(checkout)
                    del self.checkouts[id(checkout)]
                    continue
                if force:
                    checkout.cancelled = True
                    cancel.append(checkout)
                stragglers[checkout.thread_id] = stragglers.get(checkout.thread_id, 0) + 1
            for thread in self._inflight:  # mid-checkout: they go on like the holders
                stragglers.setdefault(thread, 0)
            busy = bool(self.checkouts) or self.reserved > 0 or bool(self._inflight)
            self.state = "draining" if busy else "closed"
            self._grace_until = time.monotonic() + END_GRACE
            self._wake_waiters()  # they re-check the scope and fail or drain
            custom = list(self.custom)
            handles = [] if busy else list(self.handles.values())
            self.cached.clear()
        release = Release(
            self,
            reason,
            reclaim=reclaim,
            cancel=cancel,
            custom=custom,
            handles=handles,
            dirty=dirty,
        )
        release.draining = busy
        return release

    def abandoned(self) -> list[Checkout]:
        """Connections of an ended execution that nobody uses any more: forget them.

        One is abandoned once no statement is in flight on it and, when a transaction
        is open, its grace is over (or its statement was cancelled by a forced release).
        A statement in flight is never abandoned.
        """
        with self._lock:
            if self.state != "draining":
                return []
            grace_over = time.monotonic() >= self._grace_until
            stale = []
            for checkout in self.checkouts.values():
                activity = checkout.activity()
                if activity == "active":
                    continue
                if activity == "transaction" and not (grace_over or checkout.cancelled):
                    continue
                stale.append(checkout)
            for c in stale:
                del self.checkouts[id(c)]
                self._straggler_returned(c.thread_id)
            return stale

    def in_grace(self) -> bool:
        """True while a connection of this ended execution is kept only for its grace."""
        with self._lock:
            if self.state != "draining" or time.monotonic() >= self._grace_until:
                return False
            return any(c.activity() == "transaction" for c in self.checkouts.values())

    def still_out(self, checkouts: Sequence[Checkout]) -> bool:
        """True while any of ``checkouts`` has not been returned."""
        return any(id(c) in self.checkouts for c in checkouts)

    def force_drain(self) -> tuple[list[Checkout], list[Checkout]]:
        """A forced release of a draining execution: (checkouts to close, to cancel).

        A connection with a statement in flight stays recorded (marked cancelled) until
        its thread returns it; every other one is to be closed now.
        """
        with self._lock:
            reclaim: list[Checkout] = []
            cancel: list[Checkout] = []
            for checkout in list(self.checkouts.values()):
                if checkout.activity() == "active":
                    checkout.cancelled = True
                    cancel.append(checkout)
                else:
                    reclaim.append(checkout)
                    del self.checkouts[id(checkout)]
                    self._straggler_returned(checkout.thread_id)
            self._grace_until = 0.0
            self._wake_waiters()
            return reclaim, cancel

    def is_closed(self) -> bool:
        """True once the execution has ended and holds nothing."""
        return self.state == "closed"

    def finish_if_drained(self) -> bool:
        """Close a draining execution that holds nothing any more."""
        with self._lock:
            return self._drained()

    # -- reading -------------------------------------------------------------------

    def held(self) -> int:
        """Connections checked out by this execution right now."""
        return len(self.checkouts)

    def checkouts_of(self, pool: Any) -> list[Checkout]:
        """The connections this execution holds from ``pool``."""
        with self._lock:
            return [c for c in self.checkouts.values() if c.pool is pool]

    def outstanding(self) -> list[Checkout]:
        """Every connection checked out right now (a copy)."""
        with self._lock:
            return list(self.checkouts.values())

    def describe(self) -> dict[str, Any]:
        """The per-execution entry of the stats payload."""
        return {
            "sql_engines": len(self.engines),
            "sql_databases": len(self.databases),
            "custom_connections": len(self.custom),
            "connections_in_use": self.held(),
            "age_seconds": round(time.monotonic() - self.created, 3),
            "state": self.state,
        }

    def __repr__(self) -> str:
        return f"<Execution {self.execution_id!r} {self.state} holding {len(self.checkouts)}>"
