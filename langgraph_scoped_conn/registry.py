"""The registry: execution id -> open execution, the draining set, and what to reap.

Pure bookkeeping under one short lock; nothing here does I/O.  Ending an execution
returns a :class:`~langgraph_scoped_conn.execution.Release` for the blocking side
(:mod:`langgraph_scoped_conn.release`) to carry out.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from langgraph_scoped_conn.errors import ConfigurationError, ScopeUnavailableError
from langgraph_scoped_conn.execution import Execution, ExecutionOwner, Release

__all__ = ["Registry"]

logger = logging.getLogger("langgraph_scoped_conn")

#: How many locks the executions of one registry share (see Execution).
_STRIPES = 64
#: an execution table that held more entries than this is freed once empty (see
#: ``RunIndex._free_tables``)
_GROWN = 512


class _Ids:
    """Made-up execution ids: a random per-process prefix and a counter (no syscall per id).

    As unique as ``uuid4().hex`` across processes (the prefix is drawn again in a forked
    child) and never repeated within one; 32 hex digits, like before.
    """

    def __init__(self) -> None:
        self.reset()
        os.register_at_fork(after_in_child=self.reset)

    def reset(self) -> None:
        self.prefix = os.urandom(8).hex()
        self.counter = itertools.count(int.from_bytes(os.urandom(4), "big"))

    def new(self) -> str:
        return f"{self.prefix}{next(self.counter) & 0xFFFFFFFFFFFFFFFF:016x}"


_ids = _Ids()

_COUNTERS = (
    "scopes_opened",
    "scopes_closed",
    "scopes_reaped",
    "leaks_reclaimed",
    "release_errors",
    "deferred_releases",
    "scope_open_failures",
)


class Registry:
    """Open and draining executions of one manager, and the counters about them.

    Args:
        owner: what the executions report to (the manager): it names the running
            node for leak reports and hears when an ended execution has drained.
    """

    def __init__(self, owner: ExecutionOwner) -> None:
        self._owner = owner
        self._lock = threading.Lock()
        locks = [threading.Lock() for _ in range(_STRIPES)]
        self._stripes = tuple((lock, threading.Condition(lock)) for lock in locks)
        self._executions: dict[str, Execution] = {}
        #: the table held more than _GROWN executions since it was last freed
        self._grown = False
        #: ended executions whose connections are still out (read without the lock)
        self.draining: set[Execution] = set()
        self.closed = False
        self.counters = dict.fromkeys(_COUNTERS, 0)
        self._last_upkeep = time.monotonic()
        self._upkeep_pending = False

    def drained(self, execution: Execution) -> None:
        """An ended execution's last connection came back."""
        with self._lock:
            self.draining.discard(execution)

    # -- open and end ----------------------------------------------------------------

    def open(self, execution_id: str | None, bind: Callable[[Execution], None] | None) -> Execution:
        """Open ``execution_id`` (a random id when ``None``), or join it if it is open.

        ``bind`` runs under the lock with the execution before it is opened or joined (to
        map a root run to it); if it raises, nothing is opened or joined.
        """
        if execution_id is None:
            execution_id = _ids.new()
        elif not isinstance(execution_id, str) or not execution_id:
            raise ConfigurationError(
                f"execution_id={execution_id!r} must be a non-empty string, or None to make one up"
            )
        with self._lock:
            if self.closed:
                raise ScopeUnavailableError(
                    "this ExecutionConnectionManager is closed; call configure() or create a "
                    "new manager before opening executions"
                )
            execution = self._executions.get(execution_id)
            if execution is not None:
                if bind is not None:
                    bind(execution)
                execution.hold()
                return execution
            lock, cond = self._stripes[hash(execution_id) % _STRIPES]
            execution = Execution(self._owner, execution_id, lock, cond)
            if bind is not None:
                bind(execution)
            self._executions[execution_id] = execution
            self.counters["scopes_opened"] += 1
        return execution

    def detach(self, execution: Execution, *, reason: str, force: bool) -> Release | None:
        """Drop one hold (every hold with ``force``); end the execution when none is left.

        Returns:
            What to close, or ``None`` if the execution stays open (or already ended).
        """
        with self._lock:
            if execution.state != "open" or not execution.drop(every=force):
                return None
            if self._executions.get(execution.execution_id) is execution:
                if len(self._executions) > _GROWN:
                    self._grown = True
                del self._executions[execution.execution_id]
                if self._grown and not self._executions:
                    self._executions.clear()  # a burst's grown table, given back (see runs.py)
                    self._grown = False
            self.counters["scopes_closed"] += 1
            if reason == "reaped":
                self.counters["scopes_reaped"] += 1
        release = execution.end(force=force, reason=reason, closer=threading.get_ident())
        if release.draining:
            with self._lock:
                self.counters["deferred_releases"] += len(execution.checkouts)
                self.draining.add(execution)
            if execution.is_closed():  # its last connection came back meanwhile
                with self._lock:
                    self.draining.discard(execution)
            logger.info(
                "execution %s %s with %d connection(s) still in use; "
                "they are released when returned",
                execution.execution_id,
                reason,
                len(execution.checkouts),
            )
        else:
            logger.debug("execution %s %s", execution.execution_id, reason)
        return release

    def force_release(self, execution: Execution, reason: str) -> Release | None:
        """End ``execution`` whoever holds it, draining or not (reaper, cleanup, close)."""
        if execution.state == "draining":
            reclaim, cancel = execution.force_drain()
            if reason == "reaped":
                self.count("scopes_reaped")
            if execution.finish_if_drained():  # the draining set and its pools: as usual
                self._owner.execution_drained(execution)
            return Release(execution, reason, reclaim=reclaim, cancel=cancel)
        return self.detach(execution, reason=reason, force=True)

    def abandoned(self) -> list[Release]:
        """Releases for connections of ended executions that nobody uses any more.

        Costs nothing when no execution is draining.
        """
        if not self.draining:
            return []
        with self._lock:
            draining = list(self.draining)
        releases = []
        for execution in draining:
            stale = execution.abandoned()
            if stale:
                releases.append(Release(execution, "ended", reclaim=stale))
            if execution.finish_if_drained():
                self._owner.execution_drained(execution)
        return releases

    def in_grace(self) -> bool:
        """True while an ended execution keeps a connection only for its grace."""
        if not self.draining:
            return False
        with self._lock:
            draining = list(self.draining)
        return any(e.in_grace() for e in draining)

    # -- upkeep policy ---------------------------------------------------------------

    @staticmethod
    def reap_interval(lifetime: float | None) -> float:
        """Seconds between two reaping passes: a quarter of the lifetime, at most a minute."""
        return min(lifetime / 4, 60.0) if lifetime else 60.0

    def upkeep_due(self, interval: float | None) -> bool:
        """True (once, until :meth:`upkeep_started`) when upkeep should run now.

        Reaping is due every ``interval`` seconds (:meth:`reap_interval`; ``None``
        without a lifetime); abandoned connections of draining executions are looked
        for at most 20 times a second.  Runs at every run's start: costs one clock
        read, and nothing without a lifetime and with nothing draining.
        """
        if self._upkeep_pending or (interval is None and not self.draining):
            return False
        since = time.monotonic() - self._last_upkeep
        due = (since > 0.05 and bool(self.draining)) or (interval is not None and since > interval)
        if due:
            self._upkeep_pending = True
        return due

    def upkeep_started(self) -> None:
        self._upkeep_pending = False
        self._last_upkeep = time.monotonic()

    # -- reading -------------------------------------------------------------------

    def get(self, execution_id: str) -> Execution | None:
        """The open execution with this id, if any."""
        with self._lock:
            return self._executions.get(execution_id)

    def open_ids(self) -> list[str]:
        with self._lock:
            return list(self._executions)

    def expired(self, limit: float | None, execution_id: str | None) -> list[Execution]:
        """Executions older than ``limit`` seconds (open or draining), or the one named."""
        now = time.monotonic()
        with self._lock:
            if execution_id is not None:
                return [e for e in (self._executions.get(execution_id),) if e is not None]
            if limit is None:
                return []
            victims = [e for e in self._executions.values() if now - e.created > limit]
            victims += [e for e in self.draining if now - e.created > limit]
            return victims

    def everything(self) -> list[Execution]:
        """Mark the registry closed and return every open and draining execution."""
        with self._lock:
            self.closed = True
            return list(self._executions.values()) + list(self.draining)

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] += n

    def holding(self) -> list[Execution]:
        """Every open or draining execution that holds a connection."""
        with self._lock:
            found = [e for e in self._executions.values() if e.checkouts]
            found += [e for e in self.draining if e.checkouts]
        return found

    def find_deadlock(
        self, pool: Any, *, size: int, waiting: set[Execution], waiting_threads: set[int]
    ) -> str | None:
        """Name the executions that hold all ``size`` connections of ``pool`` and wait for one.

        A held connection can come back only if its execution ends (it will not while it
        waits), its statement in flight ends, or a live thread that is not itself waiting
        returns it.  When every connection of the pool is held by a waiting execution
        and none of them can come back, nobody can go on.  Only connection facts and
        thread liveness are read; a held connection whose checkout thread is alive and
        not waiting may still come back, so it never counts as stuck.

        Args:
            pool: the pool (checkouts record where they came from).
            size: how many connections the pool holds at most.
            waiting: executions with a thread waiting for ``pool`` right now.
            waiting_threads: the ids of the threads waiting for ``pool``.
        """
        if not waiting:
            return None
        held = [(e, c) for e in self.holding() for c in e.checkouts_of(pool)]
        if len(held) < size:
            return None  # some are out of the pool without a record: they may come back
        alive = None
        for execution, checkout in held:
            if execution not in waiting or checkout.activity() == "active":
                return None  # its run may end, or its statement end, and release it
            if checkout.thread_id in waiting_threads:
                continue
            if alive is None:
                alive = {t.ident for t in threading.enumerate()}
            if checkout.thread_id in alive:
                return None  # a running thread may return it
        counts: dict[str, int] = {}
        for execution, _ in held:
            counts[execution.execution_id] = counts.get(execution.execution_id, 0) + 1
        return ", ".join(f"{eid} holds {n} and waits" for eid, n in counts.items())

    def holders(self) -> list[tuple[str, int]]:
        """(execution id, connections held) of every execution that holds some."""
        with self._lock:
            rows = [(e.execution_id, e.held()) for e in self._executions.values()]
            rows += [(f"{e.execution_id} (ended)", e.held()) for e in self.draining]
        return [r for r in rows if r[1]]

    def snapshot(self) -> dict[str, Any]:
        """Plain values for the stats payload."""
        with self._lock:
            live = list(self._executions.values())
            draining = list(self.draining)
            counters = dict(self.counters)
        return {
            "executions": {e.execution_id: e.describe() for e in live},
            "draining": len(draining),
            "counters": counters,
            # list() each dict: an execution adds its own pools under its own lock
            "execution_handles": [h for e in live + draining for h in list(e.handles.values())],
        }

    def __len__(self) -> int:
        return len(self._executions)
