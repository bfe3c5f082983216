"""One execution's resources: its state, its per-execution cap and the connections it holds.

Pure bookkeeping: nothing here does I/O.  Ending an execution returns what must be
closed (a :class:`Release`), and the blocking side (:mod:`langgraph_scoped_conn.release`)
closes it.  Engines record their checkouts here through :meth:`Execution.reserve`,
:meth:`Execution.record` and :meth:`Execution.returned`.

An ended execution refuses every new use with :class:`ScopeClosedError`, on every
thread and task.  The one allowance: a thread that held one of its connections when
it ended (a sync node still running after its run was cancelled) keeps working until
it has returned them all.  Those threads are recorded exactly, when the execution ends.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol

from langgraph_scoped_conn.errors import ExecutionConnectionLimitError, ScopeClosedError
from langgraph_scoped_conn.settings import ScopedConnSettings

__all__ = ["Checkout", "Execution", "ExecutionOwner", "FailedScope", "Release"]

logger = logging.getLogger("langgraph_scoped_conn")

State = Literal["open", "draining", "closed"]


class ExecutionOwner(Protocol):
    """What an execution needs from the registry that owns it."""

    settings: ScopedConnSettings

    def attribute(self) -> str | None:
        """The graph node (and tool) running in this context, for leak reports."""

    def execution_drained(self, execution: Execution) -> None:
        """The last connection of an ended execution came back."""


class Checkout:
    """One connection checked out by an execution, from checkout until it is returned."""

    __slots__ = (
        "cancelled",
        "clean",
        "connection",
        "execution",
        "fairy",
        "frame",
        "node",
        "pool",
        "stack",
        "started",
        "tagged",
        "thread_id",
    )

    def __init__(self, execution: Execution, fairy: Any, frame: Any, pool: Any = None) -> None:
        self.execution = execution
        self.fairy = fairy
        self.pool = pool  # the PoolHandle it came from
        self.connection: weakref.ref[Any] | None = None  # the SQLAlchemy Connection, if any
        self.frame = frame
        self.thread_id = threading.get_ident()
        self.started = time.monotonic()
        self.cancelled = False  # its statement was cancelled when the execution was released
        self.clean = False  # nothing run on it in this checkout left session state behind
        self.tagged = False  # its application_name names the execution (set back at checkin)
        owner = execution.owner
        self.node = owner.attribute()
        self.stack = "".join(traceback.format_stack(frame)) if owner.settings.debug else None

    def returned(self) -> None:
        """Called from the pool's checkin event when the connection comes back."""
        self.execution.returned(self)

    def in_use_elsewhere(self, frames: dict[int, Any], closer: int) -> bool:
        """True if another thread is still running the code that checked this out."""
        if self.thread_id == closer or self.frame is None:
            return False
        frame = frames.get(self.thread_id)
        while frame is not None:
            if frame is self.frame:
                return True
            frame = frame.f_back
        return False


class FailedScope:
    """Stands for the scope of a root run that could not be opened; its tools get the error."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class Release:
    """What ending an execution leaves to close: leaked connections, resources, pools."""

    __slots__ = ("cancel", "custom", "draining", "execution", "handles", "reason", "reclaim")

    def __init__(
        self,
        execution: Execution,
        reason: str,
        *,
        reclaim: Sequence[Checkout] = (),
        cancel: Sequence[Checkout] = (),
        custom: Sequence[Any] = (),
        handles: Sequence[Any] = (),
    ) -> None:
        self.execution = execution
        self.reason = reason
        #: checked out and abandoned: close them
        self.reclaim = reclaim
        #: still in use by a running thread of a force-released execution: cancel their
        #: statements on the server, so the thread returns them at once
        self.cancel = cancel
        self.custom = custom
        self.handles = handles
        #: the execution ended with connections still in use by running threads
        self.draining = False

    def is_empty(self) -> bool:
        return not (self.reclaim or self.cancel or self.custom or self.handles)


class Execution:
    """The resources of one execution (one LangGraph run, or one ExecutionScope).

    ``lock`` is shared with other executions (the registry stripes a few locks), so
    opening an execution allocates none; ``cond`` is a condition on the same lock,
    used only for the per-execution cap.
    """

    __slots__ = (
        "_cond",
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
        "engines",
        "execution_id",
        "handles",
        "owner",
        "refcount",
        "reserved",
        "run_ids",
        "state",
    )

    def __init__(self, owner: ExecutionOwner, execution_id: str, cond: threading.Condition) -> None:
        self.owner = owner
        self.execution_id = execution_id
        self.created = time.monotonic()
        self.refcount = 1
        self.state: State = "open"
        self.engines: list[Any] = []
        self.databases: list[Any] = []
        self.custom: list[Any] = []
        #: id(tracked object) -> (node that tracked it, stack when debug=True), for reports
        self.custom_origins: dict[int, tuple[str | None, str | None]] = {}
        self.cached: dict[Any, Any] = {}
        #: per-execution pools (strategy per_execution), by redacted URL
        self.handles: dict[str, Any] = {}
        self.checkouts: dict[int, Checkout] = {}
        self.reserved = 0  # checkouts in flight (counted against the cap, not yet recorded)
        self.run_ids: list[Any] = []  # the root runs mapped to this execution (runs._key)
        self._cond = cond
        #: the condition's own lock (a C lock: cheaper to take than the Condition object)
        self._lock: Any = getattr(cond, "_lock", cond)
        self._waiters = 0  # threads waiting on the per-execution cap
        #: threads that held connections (or were checking one out) when the execution
        #: ended -> how many they hold now; they may go on until they hold none
        self._stragglers: dict[int, int] = {}
        #: threads inside reserve() .. record()/unreserve() -> how many checkouts in flight
        self._inflight: dict[int, int] = {}
        self._warned_straggler = False

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
            if len(self.checkouts) + self.reserved < cap:
                self.reserved += 1
                inflight[thread] = inflight.get(thread, 0) + 1
                return
            self._inflight[thread] = self._inflight.get(thread, 0) + 1
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

    def record(self, fairy: Any, frame: Any, pool: Any = None) -> Checkout:
        """Record the connection a reserved checkout obtained (from ``pool``)."""
        checkout = Checkout(self, fairy, frame, pool)
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
            if recorded:
                self._stragglers[thread] += 1
            elif not self._stragglers[thread] and thread not in self._inflight:
                del self._stragglers[thread]

    def returned(self, checkout: Checkout) -> None:
        """Forget a checkout that came back to the pool; finish draining if it was the last."""
        with self._lock:
            if self.checkouts.pop(id(checkout), None) is None:
                return
            checkout.frame = None
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
        if left <= 1 and thread_id not in self._inflight:
            del self._stragglers[thread_id]
        else:
            self._stragglers[thread_id] = max(left - 1, 0)

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

    def check_usable(self) -> None:
        """Raise :class:`ScopeClosedError` unless this thread may still use the execution."""
        with self._lock:
            self._check_usable()

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
            getattr(self, kind).append(obj)

    def add_engine_and_database(self, engine: Any, database: Any) -> None:
        """Record a new SQLDatabase and its engine (one lock instead of two)."""
        with self._lock:
            self._check_usable()
            self.engines.append(engine)
            self.databases.append(database)

    def add_custom(self, obj: Any, node: str | None, stack: str | None) -> None:
        """Record a resource to close when the execution ends."""
        with self._lock:
            self._check_usable()
            self.custom.append(obj)
            self.custom_origins[id(obj)] = (node, stack)

    def handle_for(self, key: str, create: Callable[[], Any]) -> Any:
        """This execution's own pool for ``key``, created by ``create()`` on first use."""
        with self._lock:
            self._check_usable()
            handle = self.handles.get(key)
        if handle is None:
            made = create()
            with self._lock:
                handle = self.handles.setdefault(key, made)
            if handle is not made:
                made.dispose()
        return handle

    # -- ending --------------------------------------------------------------------

    def end(self, closer: int, frames: dict[int, Any], *, force: bool, reason: str) -> Release:
        """Mark the execution ended and return what must be closed.

        A connection that another thread is still using (``frames`` shows it running
        the code that checked it out) is left to that thread, which is recorded as a
        straggler; with ``force`` its statement is cancelled instead (the thread then
        returns it at once).  Every other checked-out connection is to be closed.
        """
        with self._lock:
            if not (self.checkouts or self.reserved or self._inflight or self.custom):
                # the usual end: nothing out, nothing tracked
                self.state = "closed"
                if self._waiters:
                    self._cond.notify_all()
                self.cached.clear()
                if self.handles:
                    return Release(self, reason, handles=list(self.handles.values()))
                return Release(self, reason)
            reclaim: list[Checkout] = []
            cancel: list[Checkout] = []
            for checkout in list(self.checkouts.values()):
                if checkout.in_use_elsewhere(frames, closer):
                    if force:
                        checkout.cancelled = True
                        cancel.append(checkout)
                    self._stragglers[checkout.thread_id] = (
                        self._stragglers.get(checkout.thread_id, 0) + 1
                    )
                else:
                    reclaim.append(checkout)
                    del self.checkouts[id(checkout)]
            for thread in self._inflight:  # mid-checkout: they go on like the holders
                self._stragglers.setdefault(thread, 0)
            busy = bool(self.checkouts) or self.reserved > 0 or bool(self._inflight)
            self.state = "draining" if busy else "closed"
            self._wake_waiters()  # they re-check the scope and fail or drain
            custom = list(self.custom)
            handles = [] if busy else list(self.handles.values())
            self.cached.clear()
        release = Release(
            self, reason, reclaim=reclaim, cancel=cancel, custom=custom, handles=handles
        )
        release.draining = busy
        return release

    def abandoned(self, frames: dict[int, Any]) -> list[Checkout]:
        """Checkouts of an ended execution whose thread moved on without returning them."""
        with self._lock:
            if self.state != "draining":
                return []
            stale = [c for c in self.checkouts.values() if not c.in_use_elsewhere(frames, 0)]
            for c in stale:
                del self.checkouts[id(c)]
                self._straggler_returned(c.thread_id)
            return stale

    def still_out(self, checkouts: Sequence[Checkout]) -> bool:
        """True while any of ``checkouts`` has not been returned."""
        return any(id(c) in self.checkouts for c in checkouts)

    def take(self, checkouts: Sequence[Checkout]) -> list[Checkout]:
        """Forget those of ``checkouts`` not yet returned, and return them (to be closed)."""
        with self._lock:
            taken = [c for c in checkouts if self.checkouts.pop(id(c), None) is not None]
            for c in taken:
                self._straggler_returned(c.thread_id)
            drained = self._drained()
        if drained:
            self.owner.execution_drained(self)
        return taken

    def force_drain(self, frames: dict[int, Any]) -> tuple[list[Checkout], list[Checkout]]:
        """A forced release of a draining execution: (checkouts to close, to cancel).

        Those a running thread still uses stay recorded (marked cancelled) until the
        release has cancelled their statements and the thread returned them, or until
        the release closes them.
        """
        with self._lock:
            reclaim: list[Checkout] = []
            cancel: list[Checkout] = []
            for checkout in list(self.checkouts.values()):
                if checkout.in_use_elsewhere(frames, 0):
                    checkout.cancelled = True
                    cancel.append(checkout)
                else:
                    reclaim.append(checkout)
                    del self.checkouts[id(checkout)]
                    self._straggler_returned(checkout.thread_id)
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
