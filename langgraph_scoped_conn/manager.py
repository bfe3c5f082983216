"""ExecutionConnectionManager: the public facade over executions, runs and pools.

The manager composes the pieces below it and owns everything that is per manager: the
:class:`~langgraph_scoped_conn.registry.Registry` of executions, the
:class:`~langgraph_scoped_conn.runs.RunIndex` of LangGraph run ids, the
:class:`~langgraph_scoped_conn.engine.PoolHandle` of each URL, the
:class:`~langgraph_scoped_conn.schema_cache.SchemaCache` of reflected schemas, and the
:class:`~langgraph_scoped_conn.release.Releaser` that does the blocking work.

Sync and async are chosen by the caller's API:
:meth:`~ExecutionConnectionManager.release_execution` blocks,
:meth:`~ExecutionConnectionManager.arelease_execution` awaits a release thread.  Upkeep
(reaping expired executions, closing connections ended executions left unused) runs on
the release threads, never inside another execution's open.  The process-default
manager lives in :mod:`langgraph_scoped_conn.configure`.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
import traceback
import uuid
from typing import TYPE_CHECKING, Any

from langgraph_scoped_conn.errors import ScopeUnavailableError
from langgraph_scoped_conn.execution import Execution, FailedScope, Release
from langgraph_scoped_conn.pools import PoolObserver, Pools
from langgraph_scoped_conn.redaction import redact_url
from langgraph_scoped_conn.registry import Registry
from langgraph_scoped_conn.release import AsyncResource, Releaser
from langgraph_scoped_conn.runs import RunIndex
from langgraph_scoped_conn.schema_cache import SchemaCache
from langgraph_scoped_conn.settings import ScopedConnSettings
from langgraph_scoped_conn.stats import RetiredCounters, build_stats
from langgraph_scoped_conn.urls import parse_url

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

    # SQLAlchemy is imported on first use, so `import langgraph_scoped_conn` stays cheap
    from langgraph_scoped_conn.engine import PoolHandle, ScopedEngine

__all__ = ["ExecutionConnectionManager", "PoolObserver", "manager_of"]

logger = logging.getLogger("langgraph_scoped_conn")


class ExecutionConnectionManager:
    """The registry of executions and of the pools their resources draw from.

    One manager is shared by every thread, event loop and run of a process; it is
    not bound to any event loop.  The process default is returned by
    :func:`~langgraph_scoped_conn.get_connection_manager` and replaced by
    :func:`~langgraph_scoped_conn.configure`.

    Args:
        database_url: the default URL.  ``None`` falls back to ``DATABASE_URL``.
        **options: the options of :class:`~langgraph_scoped_conn.settings.ScopedConnSettings`
            (``strategy``, ``max_connections``, ``pool_timeout`` ...; see the docs).

    Raises:
        ConfigurationError: an option is unknown or out of range.
    """

    def __init__(self, database_url: str | None = None, **options: Any) -> None:
        self.settings = ScopedConnSettings.from_options(database_url, **options)
        if self.settings.database_url:
            parse_url(self.settings.database_url)  # fail early, with the password redacted
        self._registry = Registry(self)
        lifetime = self.settings.max_scope_lifetime
        #: seconds between two reaping passes, None without a lifetime (settings are frozen)
        self._reap_every = None if lifetime is None else self._registry.reap_interval(lifetime)
        self._runs = RunIndex()
        self._retired = RetiredCounters()
        self._releaser = Releaser(count=self._registry.count, disposed=self._retired.add)
        self._lock = threading.Lock()
        #: the pools of each URL, created on first use
        self.pools = Pools(
            self.settings,
            describe_holders=self.describe_holders,
            find_deadlock=self._find_deadlock,
            on_wait=self._schedule_upkeep,
        )
        #: reflected schemas, one reflection per URL and options
        self.schema_cache = SchemaCache(self)
        #: warnings logged once per manager (see :meth:`warn_once`)
        self._warned: set[str] = set()
        if self.settings.warm_schema:  # reflect on a release thread; the first run waits for it
            self._releaser.call(self._warm_schema)

    @property
    def counters(self) -> dict[str, int]:
        """The manager's counters (scopes opened, closed, reaped, leaks reclaimed ...)."""
        return self._registry.counters

    # -- executions ----------------------------------------------------------------

    def open_execution(
        self,
        execution_id: str | None = None,
        *,
        root_run: uuid.UUID | None = None,
        exclusive: bool = True,
    ) -> Execution:
        """Open the execution ``execution_id``, or join it if it is already open.

        Every call must be matched by one :meth:`release_execution`; the execution's
        resources are released when the last holder releases it.  With ``root_run``,
        that run id is bound to the execution and holds it (see :meth:`end_run`).

        Raises:
            ScopeUnavailableError: ``root_run`` is already a live run's id, or
                ``exclusive`` and another live run holds the execution.
        """
        self._schedule_upkeep()
        bind = None
        if root_run is not None:
            runs = self._runs
            loop = asyncio._get_running_loop()  # an async run's loop (see end_orphaned_runs)

            def bind(execution: Execution) -> None:
                runs.bind_root(root_run, execution, exclusive=exclusive, loop=loop)

        execution = self._registry.open(execution_id, bind)
        logger.debug("execution %s opened", execution.execution_id)
        return execution

    def release_execution(self, execution: Execution, *, reason: str = "ended") -> None:
        """Drop one hold on ``execution``; release its resources when none is left (blocking).

        Idle connections go back to the pool; those whose session the execution changed
        are reset first.  A connection still checked out is closed at once (counted as a
        leak, an open transaction rolled back by the server) unless another thread uses
        it: a statement in flight, or a transaction between statements for a moment (a
        sync node still running after its run was cancelled); that one is released when
        its thread returns it.  The closing runs on the calling thread; use
        :meth:`arelease_execution` from async code.
        """
        self._releaser.run(self._detach(execution, reason))

    async def arelease_execution(self, execution: Execution, *, reason: str = "ended") -> None:
        """Like :meth:`release_execution`, awaiting the blocking part on a release thread.

        The release is handed over before the first await, and the await is shielded:
        a cancellation of the calling task cannot drop it.
        """
        await self._releaser.arun(self._detach(execution, reason))

    def _detach(self, execution: Execution, reason: str) -> Release | None:
        release = self._registry.detach(execution, reason=reason, force=False)
        if release is not None:
            self._name_outstanding(release)
            self._runs.forget_execution(execution)
        return release

    def _name_outstanding(self, release: Release | None) -> None:
        """Work out which node and tool took the connections an ended execution still had.

        Only for a report, and while the run index still knows the run's tools; the
        usual end (nothing taken back, nothing left out) costs nothing here.
        """
        if release is None or not (release.reclaim or release.draining or release.cancel):
            return
        for checkout in (*release.reclaim, *release.execution.outstanding()):
            if checkout.origin is None:
                checkout.origin = self._runs.origin(checkout.context)

    # -- ExecutionOwner ----------------------------------------------------------------

    def execution_drained(self, execution: Execution) -> None:
        """An ended execution's last connection came back: dispose its own pools."""
        self._registry.drained(execution)
        handles = list(execution.handles.values())
        if handles:
            self._releaser.submit(Release(execution, "drained", handles=handles))

    # -- upkeep --------------------------------------------------------------------

    def reclaim_abandoned(self) -> int:
        """Close connections of ended executions that nobody uses any more (blocking).

        A sync node still running after its run was cancelled keeps its connections
        while it uses them: a statement in flight, or a transaction for a moment; one
        it no longer uses is closed here.

        Returns:
            How many connections were closed.
        """
        closed = 0
        for release in self._registry.abandoned():
            closed += len(release.reclaim)
            self._releaser.run(release)
        return closed

    def drain(self, timeout: float | None = 10.0) -> bool:
        """Close abandoned connections and wait for releases on the release threads.

        A connection an ended run's thread holds inside a transaction is closed once its
        grace is over: this waits for that too, within ``timeout``.

        Returns:
            True if nothing is pending any more.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        self.end_orphaned_runs()
        while True:
            # read before the reclaim: a grace found over here is over for the reclaim
            # too, which then closes that connection (read after, a grace ending between
            # the two returned with the connection still out)
            in_grace = self._registry.in_grace()
            self.reclaim_abandoned()
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            done = self._releaser.drain(left)
            if not in_grace:
                return done
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.02)

    async def adrain(self, timeout: float | None = 10.0) -> bool:  # noqa: ASYNC109
        """Async twin of :meth:`drain`; does not block the event loop."""
        return await asyncio.to_thread(self.drain, timeout)

    def _schedule_upkeep(self) -> None:
        """Hand reaping and abandoned-connection closing to a release thread when due."""
        if self._registry.upkeep_due(self._reap_every):
            self._releaser.call(self.upkeep)

    def upkeep(self) -> None:
        """Reap expired executions and close abandoned connections (blocking)."""
        self._registry.upkeep_started()
        self.end_orphaned_runs()
        self.reclaim_abandoned()
        if self.settings.max_scope_lifetime is not None:
            self.reap(wait=False)

    def reap_interval(self) -> float:
        """Seconds between two passes of a periodic reaper (the HTTP app's lifespan)."""
        return self._registry.reap_interval(self.settings.max_scope_lifetime)

    # -- resources ---------------------------------------------------------------

    def resolve_target(self, url: str | URL | None) -> tuple[URL, PoolHandle | None]:
        """The parsed URL and its shared pool (``None`` for strategy per_execution)."""
        return self.pools.resolve(url)

    def pool_for(self, url: str | URL | None = None) -> PoolHandle:
        """The shared pool for ``url`` (the configured URL by default), created on first use.

        Raises:
            ConfigurationError: with strategy ``per_execution``, which has no shared pool.
        """
        return self.pools.shared(url)

    def engine_for(
        self, execution: Execution, url: str | URL | None = None, **options: Any
    ) -> ScopedEngine:
        """A new scoped engine of ``execution`` (recorded under ``sql_engines``)."""
        parsed, handle = self.pools.resolve(url)
        if handle is None:
            key = parsed.render_as_string(hide_password=True)

            def create() -> PoolHandle:
                return self.pools.new_for_execution(parsed, execution.execution_id)

            handle = execution.handle_for(key, create)
        engine = handle.scoped_engine(execution, **options)
        execution.add("engines", engine)
        return engine

    def track(self, execution: Execution, obj: Any) -> Any:
        """Attach ``obj`` (anything with ``close``, ``aclose`` or ``dispose``) to ``execution``."""
        if not any(callable(getattr(obj, m, None)) for m in ("close", "dispose", "aclose")):
            raise TypeError(
                f"track_connection() needs an object with close(), aclose() or dispose(); "
                f"got {type(obj).__name__}"
            )
        if not callable(getattr(obj, "close", None)):
            try:
                loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            if loop is not None:  # closed later on the loop that owns it
                obj = AsyncResource(obj, loop)
        stack = "".join(traceback.format_stack()[:-1]) if self.settings.debug else None
        execution.add_custom(obj, self._runs.origin(contextvars.copy_context()), stack)
        return obj

    def invalidate_schema_cache(self) -> None:
        """Forget reflected schemas and the catalogs of functions and relations (the
        read-only guard's, and the write-mode check of :mod:`~langgraph_scoped_conn.stateless`)."""
        self.schema_cache.clear()
        for handle in self.pools.handles():
            handle.catalog.clear()

    def _warm_schema(self) -> None:
        """``warm_schema=True``: reflect the configured URL now, on a release thread.

        The first ``get_scoped_sql_database()`` with no options (the same cache key) then
        finds it ready, or waits for this one reflection instead of starting its own.
        """
        try:
            self.schema_cache.warm()
        except Exception as exc:  # the first SQLDatabase reflects (and raises) instead
            logger.warning(
                "warm_schema: reflecting the schema ahead of the first run failed (%s: %s); "
                "the first SQLDatabase will reflect it",
                type(exc).__name__,
                redact_url(str(exc)),
            )

    def warn_once(self, key: str) -> bool:
        """True the first time ``key`` is asked for: a warning this manager logs once."""
        with self._lock:
            if key in self._warned:
                return False
            self._warned.add(key)
            return True

    # -- LangGraph run ids ---------------------------------------------------------

    def end_run(self, run_id: uuid.UUID, *, reason: str = "ended") -> None:
        """A run ended: release its execution if it was a root, and forget its run ids.

        A child run's id stays mapped until its root run ends (a straggler thread of a
        cancelled run may still look it up), so a node's or tool's end costs no lock.
        The blocking part of the release runs on a release thread: a callback must
        not block the thread (or event loop) that runs the graph.
        """
        runs = self._runs
        root = runs.root(run_id)
        if root is not None:
            target = None if root.released else root.target
            release = None
            if isinstance(target, Execution):
                release = self._registry.detach(target, reason=reason, force=False)
                if release is not None:
                    self._name_outstanding(release)
            runs.end_root(root)
            if release is not None:
                runs.forget_execution(release.execution)
                self._releaser.submit(release)
        # a child's end: one dict lookup, no lock
        if self._registry.draining:
            self._schedule_upkeep()

    def end_orphaned_runs(self) -> int:
        """End the root runs whose event loop closed before their end was reported.

        See :meth:`~langgraph_scoped_conn.runs.RunIndex.orphaned`: ``asyncio.run``
        can cancel LangGraph's report of a run's error before it is sent.  Runs from
        upkeep, :meth:`drain` and :meth:`reap`.

        Returns:
            How many runs were ended.
        """
        orphans = self._runs.orphaned()
        for run_id in orphans:
            target = self._runs.root_target(run_id)
            if isinstance(target, Execution):
                logger.warning(
                    "run %s of execution %s: its event loop closed before the run's end was "
                    "reported (asyncio.run cancels the runs still going when its main "
                    "coroutine ends, as an abatch or gather does after one run's error); "
                    "releasing the execution now",
                    run_id,
                    target.execution_id,
                )
            self.end_run(run_id, reason="ended with its event loop")
        return len(orphans)

    def bind_failed_run(self, run_id: uuid.UUID, error: BaseException) -> None:
        """Remember that the scope of root run ``run_id`` could not be opened."""
        self._runs.bind_failed(run_id, FailedScope(error))
        self._registry.count("scope_open_failures")

    def link_run(
        self,
        run_id: uuid.UUID,
        parent_run_id: uuid.UUID,
        name: str | None = None,
        tool_call_id: str | None = None,
    ) -> bool:
        """Map a child run to the execution of its parent, if the parent is known.

        Returns:
            True if the parent was known (the run is now mapped), False for a new root.
        """
        return self._runs.link(run_id, parent_run_id, name, tool_call_id)

    def execution_for_run(self, run_id: uuid.UUID | None) -> Execution | None:
        """The execution that ``run_id`` belongs to, or ``None``.

        Raises:
            ScopeUnavailableError: the run's scope failed to open.
        """
        if run_id is None:
            return None
        target = self._runs.target(run_id)
        if isinstance(target, FailedScope):
            error = target.error
            raise ScopeUnavailableError(
                f"the execution scope of this run could not be opened "
                f"({type(error).__name__}: {redact_url(str(error))}); no connection is handed "
                "out without a scope. Fix the cause above and run again"
            )
        return target

    def execution(self, execution_id: str) -> Execution | None:
        """The open execution with this id, if any."""
        return self._registry.get(execution_id)

    def active_executions(self) -> list[str]:
        """Ids of the open executions."""
        return self._registry.open_ids()

    def tracked_runs(self) -> int:
        """How many run ids the registry maps right now (for leak checks)."""
        return self._runs.size()

    # -- reaping -------------------------------------------------------------------

    def reap(
        self,
        *,
        max_age: float | None = None,
        execution_id: str | None = None,
        reason: str = "reaped",
        wait: bool = True,
    ) -> list[str]:
        """Release executions older than ``max_age`` (default ``max_scope_lifetime``) (blocking).

        With ``execution_id``, release that one execution whatever its age.  Live
        executions younger than the limit are never touched.  Statements still running
        for a released execution are cancelled on the server first; their connections
        keep their slots until the statements end (``wait`` waits up to a second for
        that, so the caller sees the slots back).  ``reason`` is what the log says
        (``"released by request"`` for the cleanup route).

        Returns:
            The ids that were released.
        """
        if execution_id is None:
            self.end_orphaned_runs()
        now = time.monotonic()
        limit = max_age if max_age is not None else self.settings.max_scope_lifetime
        released = []
        for execution in self._registry.expired(limit, execution_id):
            release = self._registry.force_release(execution, reason)
            if release is None:
                continue
            self._name_outstanding(release)
            self._runs.forget_execution(execution)
            age = now - execution.created
            if reason == "reaped":
                logger.warning(
                    "reaped execution %s after %.1fs (max_scope_lifetime=%s)",
                    execution.execution_id,
                    age,
                    limit,
                )
            else:
                logger.warning("execution %s %s after %.1fs", execution.execution_id, reason, age)
            self._releaser.run(release)
            if wait and release.cancel:
                self._releaser.wait_cancelled(release)
            released.append(execution.execution_id)
        return released

    # -- deadlocks -----------------------------------------------------------------

    def _find_deadlock(self, handle: PoolHandle) -> str | None:
        """Name the executions that hold all of ``handle``'s connections and wait for one."""
        pool = handle.budget_pool
        if pool is None:
            return None
        return self._registry.find_deadlock(
            handle,
            size=pool.capacity(),
            waiting=handle.waiting_executions(),
            waiting_threads=pool.waiting,
        )

    # -- stats ---------------------------------------------------------------------

    def describe_holders(self, limit: int = 10) -> str:
        """A short ``id(n), ...`` list of the executions that hold connections."""
        rows = sorted(self._registry.holders(), key=lambda r: -r[1])
        text = ", ".join(f"{eid}({n})" for eid, n in rows[:limit])
        if len(rows) > limit:
            text += f", and {len(rows) - limit} more"
        return text

    def observe_pools(self, observer: PoolObserver) -> None:
        """Tell ``observer(pool_name, used_by, event, seconds)`` of every pool's events.

        ``event`` is ``"wait"`` (a checkout waited for the budget), ``"use"`` (a
        connection came back after that long) or ``"create"`` (a server connection took
        that long to open).  Pools of every strategy, now and later; per checkout, so
        keep it cheap (OpenTelemetry histograms).
        """
        self.pools.observe(observer)

    def has_observers(self) -> bool:
        """True once something observes the pools (pools outside the manager then report)."""
        return self.pools.has_observers()

    def unobserve_pools(self, observer: PoolObserver) -> None:
        """Stop telling ``observer`` of pool events (no error if it was not observing)."""
        self.pools.unobserve(observer)

    def notify_observers(self, pool_name: str, used_by: str, event: str, seconds: float) -> None:
        """Pass a pool event on to the observers (pools outside the manager call this)."""
        self.pools.notify(pool_name, used_by, event, seconds)

    def add_langgraph_pool(self, used_by: str, pool: Any) -> None:
        """Show a checkpointer's or store's pool in the stats (``pool.snapshot(used_by)``)."""
        self.pools.add_langgraph(used_by, pool)

    def remove_langgraph_pool(self, pool: Any) -> None:
        self.pools.remove_langgraph(pool)

    def get_stats(self) -> dict[str, Any]:
        """Stats in the guide's shape, plus pool measures and counters (see the docs)."""
        snapshot = self._registry.snapshot()
        handles = self.pools.handles() + snapshot["execution_handles"]
        return build_stats(
            executions=snapshot["executions"],
            counters=snapshot["counters"],
            pools=[h.snapshot() for h in handles],
            langgraph_pools=self.pools.langgraph_rows(),
            retired=self._retired.snapshot(),
            draining=snapshot["draining"],
            pending_releases=self._releaser.pending(),
            tracked_runs=self._runs.size(),
            settings={
                "strategy": self.settings.strategy,
                "max_connections": self.settings.max_connections,
                "max_connections_per_execution": self.settings.max_connections_per_execution,
            },
        )

    # -- shutdown ------------------------------------------------------------------

    def close(self) -> None:
        """Release every execution and dispose every pool this manager owns (blocking).

        Statements still running are cancelled; checked-out connections nobody uses
        are closed; idle pooled connections are closed.  The manager cannot be used
        afterwards.
        """
        for execution in self._registry.everything():
            release = self._registry.force_release(execution, "closed with its manager")
            self._name_outstanding(release)
            self._runs.forget_execution(execution)
            self._releaser.run(release)
            if release is not None and release.cancel:
                self._releaser.wait_cancelled(release)
        self.drain(timeout=30)
        handles = self.pools.close()
        self._runs.clear()
        for handle in handles:
            handle.dispose()
        self._releaser.shutdown()
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
            f"active_executions={len(self._registry)}>"
        )


def manager_of(execution: Execution) -> ExecutionConnectionManager:
    """The manager an execution belongs to."""
    manager = execution.owner
    assert isinstance(manager, ExecutionConnectionManager)
    return manager
