"""The registry of executions and what each one holds.

This module owns the bookkeeping: which executions are open, which engines,
SQLDatabase objects, custom resources and checked-out connections belong to each,
which LangGraph run ids map to which execution, and the counters behind
:func:`get_connection_stats`.  It imports neither LangGraph nor LangChain.

Locking: one short :class:`threading.Lock` guards the maps.  Blocking work
(closing connections, disposing engines, calling ``close()`` on custom resources)
runs outside the lock, and off the event loop when called from one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import sys
import threading
import time
import traceback
import uuid
import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Literal

from langgraph_scoped_conn.errors import (
    ConfigurationError,
    ExecutionConnectionLimitError,
    NoActiveScopeError,
    ScopeClosedError,
    ScopeUnavailableError,
)
from langgraph_scoped_conn.settings import ScopedConnSettings, parse_url, redact_url

if TYPE_CHECKING:
    from sqlalchemy.engine import URL
    from sqlalchemy.pool import PoolProxiedConnection

    from langgraph_scoped_conn.pool import PoolHandle, ScopedEngine

__all__ = ["Execution", "ExecutionConnectionManager"]

logger = logging.getLogger("langgraph_scoped_conn")

State = Literal["open", "draining", "closed"]

#: How many locks the executions of one manager share (see Execution._mutex).
_STRIPES = 64

#: Names the graph node / tool running in the current context, for leak reports; it is
#: given the manager, which knows the names of the tool runs it has seen.
AttributionProvider = Callable[["ExecutionConnectionManager"], "str | None"]
_attribution_provider: AttributionProvider | None = None


def set_attribution_provider(provider: AttributionProvider | None) -> None:
    """Install the function that names the running node (set by the LangGraph layer)."""
    global _attribution_provider  # noqa: PLW0603
    _attribution_provider = provider


class Checkout:
    """One connection checked out by an execution, from checkout until it is returned."""

    __slots__ = (
        "connection",
        "execution",
        "fairy",
        "frame",
        "node",
        "stack",
        "started",
        "thread_id",
    )

    def __init__(self, execution: Execution, fairy: PoolProxiedConnection, frame: Any) -> None:
        self.execution = execution
        self.fairy = fairy
        self.connection: weakref.ref[Any] | None = None  # the SQLAlchemy Connection, if any
        self.frame = frame
        self.thread_id = threading.get_ident()
        self.started = time.monotonic()
        self.node = (
            _attribution_provider(execution.manager) if _attribution_provider is not None else None
        )
        self.stack = (
            "".join(traceback.format_stack(frame)) if execution.manager.settings.debug else None
        )

    def returned(self) -> None:
        """Called from the pool's checkin event when the connection comes back."""
        self.execution.checkout_returned(self)

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


class Execution:
    """The resources of one execution (one LangGraph run, or one ExecutionScope)."""

    __slots__ = (
        "_cond",
        "_mutex",
        "_waiters",
        "_warned_straggler",
        "cached",
        "checkouts",
        "closed_by",
        "created",
        "custom",
        "custom_origins",
        "databases",
        "engines",
        "execution_id",
        "handles",
        "manager",
        "refcount",
        "run_ids",
        "state",
    )

    def __init__(self, manager: ExecutionConnectionManager, execution_id: str) -> None:
        self.manager = manager
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
        self.handles: dict[str, PoolHandle] = {}
        self.checkouts: dict[int, Checkout] = {}
        self.run_ids: list[uuid.UUID] = []  # the root runs mapped to this execution
        self.closed_by: int | None = None
        # striped: executions share a few locks, so opening one allocates none. ``_mutex``
        # guards the maps; ``_cond`` (on the same lock) is only for per-execution cap waits
        stripe = hash(execution_id) % _STRIPES
        self._mutex = manager._mutexes[stripe]
        self._cond = manager._conditions[stripe]
        self._waiters = 0  # threads waiting on the per-execution cap
        self._warned_straggler = False

    # -- connections ---------------------------------------------------------------

    def checkout(self, handle: PoolHandle, frame: Any) -> PoolProxiedConnection:
        """Check out a connection from ``handle`` on behalf of this execution."""
        from langgraph_scoped_conn.pool import CHECKOUT_KEY

        settings = self.manager.settings
        cap = settings.max_connections_per_execution
        with self._mutex:
            self._check_usable()
            if len(self.checkouts) >= cap:
                self._wait_below_cap(cap, settings.pool_timeout)
                self._check_usable()  # the scope may have ended while this thread waited
            reserved = object()
            self.checkouts[id(reserved)] = reserved  # type: ignore[assignment]
        try:
            fairy = handle.engine.pool.connect()
        except BaseException:
            with self._mutex:
                del self.checkouts[id(reserved)]
                self._wake_waiters()
                drained = self.state == "draining" and not self.checkouts
                if drained:
                    self.state = "closed"
            if drained:  # the scope ended while this checkout was in flight
                self.manager._finish_draining(self)
            raise
        record = Checkout(self, fairy, frame)
        with self._mutex:
            del self.checkouts[id(reserved)]
            self.checkouts[id(record)] = record
        fairy.info[CHECKOUT_KEY] = record
        return fairy

    def _wait_below_cap(self, cap: int, timeout: float) -> None:
        """Wait (holding ``_mutex``) until this execution holds fewer than ``cap`` connections."""
        deadline = time.monotonic() + timeout
        self._waiters += 1
        try:
            while len(self.checkouts) >= cap:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._cond.wait(remaining):
                    if len(self.checkouts) < cap:
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
        """Wake threads waiting on the cap (holding ``_mutex``); the condition is shared."""
        if self._waiters:
            self._cond.notify_all()

    def _check_usable(self) -> None:
        if self.state == "open":
            return
        thread = threading.get_ident()
        if thread != self.closed_by and not _loop_running():
            # a sync node still running in a worker thread after its run was cancelled:
            # it keeps working; its connections are released as they come back
            if not self._warned_straggler:
                self._warned_straggler = True
                logger.warning(
                    "execution %s has ended but a worker thread still uses its connections; "
                    "they are released as they are returned",
                    self.execution_id,
                )
            if self.state == "closed":
                self.state = "draining"
                self.manager._add_draining(self)
            return
        raise ScopeClosedError(
            f"execution {self.execution_id!r} has ended; its engines and SQLDatabase objects "
            "cannot be used after the scope exits. Get a new one inside the next execution"
        )

    def checkout_returned(self, checkout: Checkout) -> None:
        """Forget a checkout that came back to the pool, and finish draining if it was the last."""
        with self._mutex:
            if self.checkouts.pop(id(checkout), None) is None:
                return
            checkout.frame = None
            checkout.fairy = None  # type: ignore[assignment]
            self._wake_waiters()
            drained = self.state == "draining" and not self.checkouts
            if drained:
                self.state = "closed"
        if drained:
            self.manager._finish_draining(self)

    def held(self) -> int:
        """Connections checked out by this execution right now."""
        return sum(isinstance(c, Checkout) for c in list(self.checkouts.values()))

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


class FailedScope:
    """Stands for the scope of a root run that could not be opened; its tools get the error."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class _Release:
    """The blocking part of closing one execution, run outside the registry lock."""

    __slots__ = ("custom", "execution", "handles", "reason", "reclaim")

    def __init__(
        self,
        execution: Execution,
        reclaim: list[Checkout],
        custom: list[Any],
        handles: list[PoolHandle],
        reason: str,
    ) -> None:
        self.execution = execution
        self.reclaim = reclaim
        self.custom = custom
        self.handles = handles
        self.reason = reason

    def is_empty(self) -> bool:
        return not (self.reclaim or self.custom or self.handles)


class ExecutionConnectionManager:
    """The registry of executions and of the pools their resources draw from.

    One manager is shared by every thread, event loop and run of a process; it is
    not bound to any event loop.  The process default is returned by
    :func:`~langgraph_scoped_conn.get_connection_manager` and replaced by
    :func:`~langgraph_scoped_conn.configure`.

    Args:
        database_url: the default URL.  ``None`` falls back to ``DATABASE_URL``.
        **options: the options of :class:`~langgraph_scoped_conn.settings.ScopedConnSettings`
            (``strategy``, ``max_connections``, ``pool_timeout`` ...; see the README).

    Raises:
        ConfigurationError: an option is unknown or out of range.
    """

    def __init__(self, database_url: str | None = None, **options: Any) -> None:
        self.settings = ScopedConnSettings.from_options(database_url, **options)
        if self.settings.database_url:
            parse_url(self.settings.database_url)  # fail early, with the password redacted
        self._lock = threading.Lock()
        self._mutexes = tuple(threading.Lock() for _ in range(_STRIPES))
        self._conditions = tuple(threading.Condition(lock) for lock in self._mutexes)
        self._executions: dict[str, Execution] = {}
        self._draining: set[Execution] = set()
        #: every run id seen (roots and children) -> (its execution or failed scope, its root)
        self._runs: dict[uuid.UUID, tuple[Execution | FailedScope, uuid.UUID]] = {}
        #: root run id -> the ids of its child runs, pruned when the root run ends
        self._children: dict[uuid.UUID, list[uuid.UUID]] = {}
        #: tool run id -> the tool's name, for leak reports; pruned with its root
        self._run_names: dict[uuid.UUID, str] = {}
        #: root run id -> the execution it holds (released when the root run ends)
        self._root_runs: dict[uuid.UUID, Execution] = {}
        self._failed_roots: dict[uuid.UUID, FailedScope] = {}
        self._handles: dict[tuple[str, str], PoolHandle] = {}
        # URL text as given -> its handle, so the per-call lookup skips parsing the URL
        self._handles_by_text: dict[str, PoolHandle] = {}
        self._reflection: dict[Any, Any] = {}
        self._pending: set[concurrent.futures.Future[None]] = set()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._closed = False
        self._retired_counters: dict[str, int] = {}
        self._last_reap = time.monotonic()
        self.counters = {
            "scopes_opened": 0,
            "scopes_closed": 0,
            "scopes_reaped": 0,
            "leaks_reclaimed": 0,
            "release_errors": 0,
            "deferred_releases": 0,
            "scope_open_failures": 0,
        }

    # -- executions ----------------------------------------------------------------

    def open_execution(
        self, execution_id: str | None = None, *, root_run: uuid.UUID | None = None
    ) -> Execution:
        """Open the execution ``execution_id``, or join it if it is already open.

        Every call must be matched by one :meth:`release_execution`; the execution's
        resources are released when the last holder releases it.  With ``root_run``,
        that run id is bound to the execution and holds it (see :meth:`end_run`).
        """
        if execution_id is None:
            execution_id = os.urandom(16).hex()  # as unique as uuid4().hex, 4x cheaper
        elif not isinstance(execution_id, str) or not execution_id:
            raise ConfigurationError(
                f"execution_id={execution_id!r} must be a non-empty string, or None to make one up"
            )
        self._maybe_reap()
        with self._lock:
            if self._closed:
                raise ScopeUnavailableError(
                    "this ExecutionConnectionManager is closed; call configure() or create a "
                    "new manager before opening executions"
                )
            execution = self._executions.get(execution_id)
            if execution is not None:
                execution.refcount += 1
                if root_run is not None:
                    self._bind_root(root_run, execution)
                return execution
            execution = Execution(self, execution_id)
            self._executions[execution_id] = execution
            self.counters["scopes_opened"] += 1
            if root_run is not None:
                self._bind_root(root_run, execution)
        logger.debug("execution %s opened", execution_id)
        return execution

    def release_execution(self, execution: Execution, *, reason: str = "ended") -> None:
        """Drop one hold on ``execution``; release its resources when none is left.

        Idle connections go back to the pool.  A connection still checked out is
        closed at once (counted as a leak), unless another thread is still running
        the code that checked it out, as a sync node does after its run was
        cancelled; that one is released when the thread returns it.  Blocking I/O
        runs on a background thread when called from an event loop.
        """
        release = self._detach(execution, reason=reason, force=False)
        if release is not None:
            self._run_release(release)

    async def arelease_execution(self, execution: Execution, *, reason: str = "ended") -> None:
        """Like :meth:`release_execution`, awaiting the blocking part in a worker thread."""
        release = self._detach(execution, reason=reason, force=False)
        if release is not None and not release.is_empty():
            await asyncio.to_thread(self._finalize, release)

    def _detach(self, execution: Execution, *, reason: str, force: bool) -> _Release | None:
        closer = threading.get_ident()
        with self._lock:
            if execution.state != "open":
                return None
            execution.refcount -= 1
            if execution.refcount > 0 and not force:
                return None
            execution.refcount = 0
            if self._executions.get(execution.execution_id) is execution:
                del self._executions[execution.execution_id]
            for run_id in execution.run_ids:
                self._forget_root(run_id)
                self._root_runs.pop(run_id, None)
            execution.run_ids.clear()
            self.counters["scopes_closed"] += 1
            if reason == "reaped":
                self.counters["scopes_reaped"] += 1
        reclaim: list[Checkout] = []
        deferred = 0
        with execution._mutex:
            execution.closed_by = closer
            outstanding = list(execution.checkouts.values())
            frames = sys._current_frames() if outstanding else {}
            for checkout in outstanding:
                if not isinstance(checkout, Checkout):
                    deferred += 1  # a checkout in progress in another thread
                elif force or not checkout.in_use_elsewhere(frames, closer):
                    reclaim.append(checkout)
                    del execution.checkouts[id(checkout)]
                else:
                    deferred += 1
            execution.state = "draining" if deferred else "closed"
            execution._wake_waiters()  # they re-check the scope and fail or drain
            del frames
        custom = list(execution.custom)
        handles = [] if deferred else list(execution.handles.values())
        execution.cached.clear()
        if deferred:
            with self._lock:
                self.counters["deferred_releases"] += deferred
            self._add_draining(execution)
            logger.info(
                "execution %s %s with %d connection(s) still in use by a running thread; "
                "they are released when returned",
                execution.execution_id,
                reason,
                deferred,
            )
        else:
            logger.debug("execution %s %s", execution.execution_id, reason)
        return _Release(execution, reclaim, custom, handles, reason)

    def _add_draining(self, execution: Execution) -> None:
        with self._lock:
            self._draining.add(execution)

    def _finish_draining(self, execution: Execution) -> None:
        with self._lock:
            self._draining.discard(execution)
        handles = list(execution.handles.values())
        if handles:
            self._run_release(_Release(execution, [], [], handles, "drained"), background=True)

    def _run_release(self, release: _Release, *, background: bool = False) -> None:
        if release.is_empty():
            return
        if background or _loop_running():
            future = self._release_executor().submit(self._finalize, release)
            with self._lock:
                self._pending.add(future)
            future.add_done_callback(self._pending_done)
        else:
            self._finalize(release)

    def _pending_done(self, future: concurrent.futures.Future[None]) -> None:
        with self._lock:
            self._pending.discard(future)

    def _release_executor(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    max_workers=2, thread_name_prefix="langgraph-scoped-conn-release"
                )
            return self._executor

    def _finalize(self, release: _Release) -> None:
        """Close leaked connections, custom resources and per-execution pools (blocking)."""
        execution = release.execution
        for checkout in release.reclaim:
            self._reclaim(checkout, release.reason)
        for obj in reversed(release.custom):
            try:
                _close_resource(obj)
            except Exception as exc:
                node, stack = execution.custom_origins.get(id(obj), (None, None))
                what = (
                    f"closing tracked resource {type(obj).__name__} "
                    f"(tracked by {node or 'code outside any graph node'})"
                )
                self._release_failed(execution, what, exc, stack=stack)
        for handle in release.handles:
            try:
                handle.dispose()
            except Exception as exc:
                self._release_failed(execution, "disposing its engine", exc)
            self._retire_counters(handle)

    def _reclaim(self, checkout: Checkout, reason: str) -> None:
        execution = checkout.execution
        with self._lock:
            self.counters["leaks_reclaimed"] += 1
        held_for = time.monotonic() - checkout.started
        logger.warning(
            "execution %s %s while a connection was still checked out (acquired by %s, "
            "held %.3fs); closing it so the server slot is freed%s",
            execution.execution_id,
            reason,
            checkout.node or "code outside any graph node",
            held_for,
            f"\nacquired at:\n{checkout.stack}" if checkout.stack else "",
        )
        fairy = checkout.fairy
        connection = checkout.connection() if checkout.connection is not None else None
        checkout.frame = None
        if fairy is None:
            return
        try:
            if connection is not None and not connection.closed and not connection.invalidated:
                # closes the DBAPI connection, returns the slot, and makes the Connection
                # raise ScopeClosedError instead of reconnecting if it is used again
                connection.invalidate()
            elif fairy.is_valid:
                fairy.invalidate()  # closes the DBAPI connection and returns the slot
        except Exception as exc:
            self._release_failed(execution, "closing a leaked connection", exc)
        checkout.fairy = None  # type: ignore[assignment]

    def _release_failed(
        self, execution: Execution, what: str, exc: Exception, *, stack: str | None = None
    ) -> None:
        """Count and log (once, password redacted) a failure while releasing ``execution``."""
        with self._lock:
            self.counters["release_errors"] += 1
        logger.warning(
            "execution %s: %s failed: %s: %s%s",
            execution.execution_id,
            what,
            type(exc).__name__,
            redact_url(str(exc)),
            f"\ntracked at:\n{stack}" if stack else "",
        )

    def reclaim_abandoned(self) -> int:
        """Close connections that ended executions' threads moved on from without returning.

        A sync node still running after its run was cancelled keeps its connections
        until it returns them; one it never returns (a leak) is closed here once that
        thread no longer runs the code that checked it out.  Costs nothing when no
        execution is draining; called on scope open, on run end and by :meth:`drain`.

        Returns:
            How many connections were closed.
        """
        if not self._draining:
            return 0
        with self._lock:
            draining = list(self._draining)
        frames = sys._current_frames()
        closed = 0
        for execution in draining:
            with execution._mutex:
                if execution.state != "draining":
                    continue
                stale = [
                    c
                    for c in execution.checkouts.values()
                    if isinstance(c, Checkout) and not c.in_use_elsewhere(frames, 0)
                ]
                for c in stale:
                    del execution.checkouts[id(c)]
                drained = not execution.checkouts
                if drained:
                    execution.state = "closed"
            if stale:
                closed += len(stale)
                self._run_release(_Release(execution, stale, [], [], "ended"))
            if drained:
                self._finish_draining(execution)
        del frames
        return closed

    def drain(self, timeout: float | None = 10.0) -> bool:
        """Wait until releases handed to the background thread have finished.

        Returns:
            True if nothing is pending any more.
        """
        self.reclaim_abandoned()
        with self._lock:
            pending = list(self._pending)
        _, not_done = concurrent.futures.wait(pending, timeout=timeout)
        return not not_done

    async def adrain(self, timeout: float | None = 10.0) -> bool:  # noqa: ASYNC109
        """Async twin of :meth:`drain`; does not block the event loop."""
        return await asyncio.to_thread(self.drain, timeout)

    # -- resources ---------------------------------------------------------------

    def pool_for(self, url: str | URL | None = None) -> PoolHandle:
        """The shared pool for ``url`` (the configured URL by default), created on first use."""
        from langgraph_scoped_conn.pool import PoolHandle

        raw = self.settings.resolve_url(url)
        text = raw if isinstance(raw, str) else None
        if text is not None:
            found = self._handles_by_text.get(text)
            if found is not None:
                return found
        parsed = parse_url(raw)
        key = (parsed.render_as_string(hide_password=False), "shared")
        with self._lock:
            handle = self._handles.get(key)
            if handle is not None:
                if text is not None:
                    self._handles_by_text[text] = handle
                return handle
            if self._closed:
                raise ScopeUnavailableError("this ExecutionConnectionManager is closed")
            handle = PoolHandle(parsed, self.settings, describe_holders=self.describe_holders)
            self._handles[key] = handle
            if text is not None:
                self._handles_by_text[text] = handle
        logger.info(
            "created %s pool for %s with max_connections=%d",
            handle.strategy,
            handle.safe_url,
            self.settings.max_connections,
        )
        return handle

    def engine_for(
        self, execution: Execution, url: str | URL | None = None, **options: Any
    ) -> ScopedEngine:
        """A new scoped engine of ``execution`` (recorded under ``sql_engines``)."""
        from langgraph_scoped_conn.pool import PoolHandle

        shared = self.pool_for(url)
        handle = shared
        if shared.strategy == "per_execution":
            key = shared.safe_url
            with execution._mutex:
                execution._check_usable()
                handle_or_none = execution.handles.get(key)
            if handle_or_none is None:
                handle_or_none = PoolHandle(
                    shared.url,
                    self.settings,
                    describe_holders=self.describe_holders,
                    per_execution_id=execution.execution_id,
                )
                with execution._mutex:
                    execution.handles.setdefault(key, handle_or_none)
                    handle_or_none = execution.handles[key]
            handle = handle_or_none
        engine = handle.scoped_engine(execution, **options)
        with execution._mutex:
            execution._check_usable()
            execution.engines.append(engine)
        return engine

    def track(self, execution: Execution, obj: Any) -> Any:
        """Attach ``obj`` (anything with ``close``, ``aclose`` or ``dispose``) to ``execution``."""
        if not any(callable(getattr(obj, m, None)) for m in ("close", "dispose", "aclose")):
            raise TypeError(
                f"track_connection() needs an object with close(), aclose() or dispose(); "
                f"got {type(obj).__name__}"
            )
        loop = _running_loop()
        if loop is not None and not callable(getattr(obj, "close", None)):
            obj = _AsyncResource(obj, loop)
        node = _attribution_provider(self) if _attribution_provider is not None else None
        stack = "".join(traceback.format_stack()[:-1]) if self.settings.debug else None
        with execution._mutex:
            execution._check_usable()
            execution.custom.append(obj)
            execution.custom_origins[id(obj)] = (node, stack)
        return obj

    # -- LangGraph run ids ---------------------------------------------------------

    def _bind_root(self, run_id: uuid.UUID, execution: Execution) -> None:
        """Map the root run ``run_id`` to ``execution``, which it holds (holding the lock)."""
        self._runs[run_id] = (execution, run_id)
        self._children[run_id] = []
        execution.run_ids.append(run_id)
        self._root_runs[run_id] = execution

    def end_run(self, run_id: uuid.UUID, *, reason: str = "ended") -> None:
        """A run ended: release its execution if it was a root, and forget its run ids.

        A child run's id stays mapped until its root run ends (a straggler thread of a
        cancelled run may still look it up), so a node's or tool's end costs no lock.
        """
        execution = self._root_runs.pop(run_id, None)  # atomic: no lock on the hot path
        failed = None if execution is not None else self._failed_roots.pop(run_id, None)
        if execution is None and failed is None:
            return  # a child run
        if execution is not None:
            self.release_execution(execution, reason=reason)
        with self._lock:
            self._forget_root(run_id)
            if execution is not None and run_id in execution.run_ids:
                execution.run_ids.remove(run_id)

    def _forget_root(self, run_id: uuid.UUID) -> None:
        """Drop a root run id and its children's from the map (holding the lock)."""
        self._runs.pop(run_id, None)
        for child in self._children.pop(run_id, ()):
            self._runs.pop(child, None)
            self._run_names.pop(child, None)

    def bind_failed_run(self, run_id: uuid.UUID, error: BaseException) -> None:
        """Remember that the scope of root run ``run_id`` could not be opened."""
        failed = FailedScope(error)
        with self._lock:
            self._runs[run_id] = (failed, run_id)
            self._children[run_id] = []
            self._failed_roots[run_id] = failed
            self.counters["scope_open_failures"] += 1

    def link_run(
        self, run_id: uuid.UUID, parent_run_id: uuid.UUID, *, name: str | None = None
    ) -> bool:
        """Map a child run to the execution of its parent, if the parent is known.

        ``name`` (a tool's) is kept for leak reports until the root run ends.

        Returns:
            True if the parent was known (the run is now mapped), False for a new root.
        """
        with self._lock:
            entry = self._runs.get(parent_run_id)
            if entry is None:
                return False
            self._runs[run_id] = entry  # the same (target, root) pair as its parent
            self._children[entry[1]].append(run_id)
            if name is not None:
                self._run_names[run_id] = name
            return True

    def run_name(self, run_id: uuid.UUID | None) -> str | None:
        """The tool name recorded for ``run_id``, if any."""
        return self._run_names.get(run_id) if run_id is not None else None

    def is_known_run(self, run_id: uuid.UUID) -> bool:
        """True if ``run_id`` is mapped to an execution (or to a failed scope)."""
        with self._lock:
            return run_id in self._runs

    def execution_for_run(self, run_id: uuid.UUID | None) -> Execution | None:
        """The open execution that ``run_id`` belongs to, or ``None``.

        Raises:
            ScopeUnavailableError: the run's scope failed to open.
        """
        if run_id is None:
            return None
        with self._lock:
            entry = self._runs.get(run_id)
        target = entry[0] if entry is not None else None
        if isinstance(target, FailedScope):
            error = target.error
            raise ScopeUnavailableError(
                f"the execution scope of this run could not be opened "
                f"({type(error).__name__}: {redact_url(str(error))}); no connection is handed "
                "out without a scope. Fix the cause above and run again"
            ) from None
        return target

    def execution(self, execution_id: str) -> Execution | None:
        """The open execution with this id, if any."""
        with self._lock:
            return self._executions.get(execution_id)

    def active_executions(self) -> list[str]:
        """Ids of the open executions."""
        with self._lock:
            return list(self._executions)

    def tracked_runs(self) -> int:
        """How many run ids the registry maps right now (for leak checks)."""
        with self._lock:
            return (
                len(self._runs)
                + len(self._children)
                + len(self._run_names)
                + len(self._root_runs)
                + len(self._failed_roots)
            )

    # -- reaping -------------------------------------------------------------------

    def reap(
        self,
        *,
        max_age: float | None = None,
        execution_id: str | None = None,
        reason: str = "reaped",
    ) -> list[str]:
        """Release executions older than ``max_age`` (default ``max_scope_lifetime``).

        With ``execution_id``, release that one execution whatever its age.  Live
        executions younger than the limit are never touched.  ``reason`` is what the
        log says happened (``"released by request"`` for the cleanup route).

        Returns:
            The ids that were released.
        """
        now = time.monotonic()
        self._last_reap = now
        limit = max_age if max_age is not None else self.settings.max_scope_lifetime
        with self._lock:
            if execution_id is not None:
                victims = [e for e in (self._executions.get(execution_id),) if e is not None]
            elif limit is None:
                victims = []
            else:
                victims = [e for e in self._executions.values() if now - e.created > limit]
                victims += [e for e in self._draining if now - e.created > limit]
        reaped = []
        for execution in victims:
            release = self._force_release(execution, reason)
            if release is not None:
                if reason == "reaped":
                    logger.warning(
                        "reaped execution %s after %.1fs (max_scope_lifetime=%s)",
                        execution.execution_id,
                        now - execution.created,
                        limit,
                    )
                else:
                    logger.warning(
                        "execution %s %s after %.1fs",
                        execution.execution_id,
                        reason,
                        now - execution.created,
                    )
                self._run_release(release)
                reaped.append(execution.execution_id)
        return reaped

    def _force_release(self, execution: Execution, reason: str) -> _Release | None:
        """Release ``execution`` whoever still holds it, draining or not."""
        if execution.state == "draining":
            return self._force_drain(execution)
        return self._detach(execution, reason=reason, force=True)

    def _force_drain(self, execution: Execution) -> _Release:
        with execution._mutex:
            reclaim = [c for c in execution.checkouts.values() if isinstance(c, Checkout)]
            for c in reclaim:
                del execution.checkouts[id(c)]
            execution.state = "closed"
        with self._lock:
            self._draining.discard(execution)
            self.counters["scopes_reaped"] += 1
        return _Release(execution, reclaim, [], list(execution.handles.values()), "reaped")

    def _maybe_reap(self) -> None:
        self.reclaim_abandoned()
        lifetime = self.settings.max_scope_lifetime
        if lifetime is None:
            return
        now = time.monotonic()
        if now - self._last_reap > min(lifetime / 4, 60.0):
            self._last_reap = now
            self.reap()

    # -- stats ---------------------------------------------------------------------

    def describe_holders(self, limit: int = 10) -> str:
        """A short ``id(n), ...`` list of the executions that hold connections."""
        with self._lock:
            rows = [(e.execution_id, e.held()) for e in self._executions.values()]
            rows += [(f"{e.execution_id} (ended)", e.held()) for e in self._draining]
        rows = sorted((r for r in rows if r[1]), key=lambda r: -r[1])
        text = ", ".join(f"{eid}({n})" for eid, n in rows[:limit])
        if len(rows) > limit:
            text += f", and {len(rows) - limit} more"
        return text

    def get_stats(self) -> dict[str, Any]:
        """Stats in the guide's shape, plus pool measures and counters (see the README)."""
        from langgraph_scoped_conn.stats import build_stats

        with self._lock:
            executions = {e.execution_id: e.describe() for e in self._executions.values()}
            draining = len(self._draining)
            counters = dict(self.counters)
            handles = list(self._handles.values())
            # list() each dict first: engine_for() adds handles under the execution's own lock
            per_exec = [h for e in self._executions.values() for h in list(e.handles.values())]
            per_exec += [h for e in self._draining for h in list(e.handles.values())]
            pending = len(self._pending)
            runs = len(self._runs) + len(self._children) + len(self._run_names)
            runs += len(self._root_runs) + len(self._failed_roots)
            retired = dict(self._retired_counters)
        return build_stats(
            executions=executions,
            counters=counters,
            handles=handles + per_exec,
            retired=retired,
            draining=draining,
            pending_releases=pending,
            tracked_runs=runs,
            settings=self.settings,
        )

    def _retire_counters(self, handle: PoolHandle) -> None:
        c = handle.counters
        with self._lock:
            if handle.retired:
                return
            handle.retired = True
            for name in ("opened", "closed", "checkouts", "checkins", "waits", "timeouts"):
                self._retired_counters[name] = self._retired_counters.get(name, 0) + getattr(
                    c, name
                )
            self._retired_counters["peak_open"] = max(
                self._retired_counters.get("peak_open", 0), c.peak_open
            )

    # -- shutdown ------------------------------------------------------------------

    def close(self) -> None:
        """Release every execution and dispose every pool this manager owns (blocking).

        Checked-out connections are closed; idle pooled connections are closed.  The
        manager cannot be used afterwards.
        """
        with self._lock:
            self._closed = True
            victims = list(self._executions.values()) + list(self._draining)
        for execution in victims:
            release = self._force_release(execution, "closed with its manager")
            if release is not None:
                self._finalize(release)
        self.drain(timeout=30)
        with self._lock:
            handles = list(self._handles.values())
            self._handles.clear()
            self._handles_by_text.clear()
            self._reflection.clear()
            self._runs.clear()
            self._children.clear()
            self._run_names.clear()
            self._root_runs.clear()
            self._failed_roots.clear()
            executor, self._executor = self._executor, None
        for handle in handles:
            handle.dispose()
        if executor is not None:
            executor.shutdown(wait=True)
        logger.debug("connection manager closed")

    async def aclose(self) -> None:
        """Async twin of :meth:`close`: the blocking work runs in a worker thread."""
        await asyncio.to_thread(self.close)

    def __enter__(self) -> ExecutionConnectionManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> ExecutionConnectionManager:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        url = redact_url(self.settings.database_url) if self.settings.database_url else None
        return (
            f"<ExecutionConnectionManager url={url!r} strategy={self.settings.strategy!r} "
            f"max_connections={self.settings.max_connections} "
            f"active_executions={len(self._executions)}>"
        )


def require_execution(execution: Execution | None, what: str) -> Execution:
    """Return ``execution`` or raise :class:`NoActiveScopeError` naming ``what``."""
    if execution is None:
        raise NoActiveScopeError(
            f"{what} was called outside an execution scope; wrap the graph with "
            "with_scoped_connections(...), pass the node's `config`, or use "
            "`with ExecutionScope(...):`"
        )
    return execution


class _AsyncResource:
    """Wraps an object that only has ``aclose()``, remembering the loop it belongs to."""

    def __init__(self, obj: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.obj = obj
        self.loop = loop

    def close(self) -> None:
        if self.loop.is_closed():
            raise RuntimeError(
                f"cannot aclose() {type(self.obj).__name__}: its event loop is closed"
            )
        if _running_loop() is self.loop:
            self.loop.create_task(self.obj.aclose())
            return
        asyncio.run_coroutine_threadsafe(self.obj.aclose(), self.loop).result(timeout=30)


def _close_resource(obj: Any) -> None:
    for name in ("close", "dispose"):
        method = getattr(obj, name, None)
        if callable(method):
            method()
            return


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _loop_running() -> bool:
    return _running_loop() is not None


def iter_checkouts(execution: Execution) -> Iterable[Checkout]:
    """The finished checkouts of ``execution`` (for tests and debugging)."""
    with execution._mutex:
        return [c for c in execution.checkouts.values() if isinstance(c, Checkout)]
