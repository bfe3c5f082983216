"""The blocking side of ending an execution: cancel, close, dispose.

A :class:`~langgraph_scoped_conn.execution.Release` says what an ended execution left;
:class:`Releaser` carries it out:

1. statements still running for a force-released execution are cancelled on the
   server (a cancel request, which opens no session); their connections stay checked
   out, holding their budget slots, until their threads return them (reset, their
   backend idle).  A statement that ignores the cancel keeps its slot until it ends:
   nothing is closed under a running statement, so the server never sees more
   backends than the budget;
2. connections nobody uses any more are closed (counted as leaks), which frees the
   server slot; pooled connections whose session the execution changed are reset
   while idle, so nothing of it (an advisory lock, a LISTEN) outlives it;
3. tracked custom resources are closed, and per-execution pools disposed.

Nothing here waits for a statement: one stuck release cannot hold up another.  The
caller picks how: :meth:`Releaser.run` blocks, :meth:`Releaser.submit` hands the work
to the package's release threads (more start as needed, so a custom resource whose
``close()`` hangs holds up only itself), and :meth:`Releaser.arun` does that and awaits
it, shielded, so a cancellation of the awaiting task cannot drop it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from langgraph_scoped_conn.checkout import Checkout
from langgraph_scoped_conn.compat import record_of
from langgraph_scoped_conn.execution import Execution, Release
from langgraph_scoped_conn.redaction import redact_url

__all__ = ["CANCEL_GRACE", "Releaser", "close_resource"]

logger = logging.getLogger("langgraph_scoped_conn")

#: Seconds a forced release (``reap()``, the cleanup route) waits for cancelled
#: statements to end before it returns; the release itself never waits.
CANCEL_GRACE = 1.0
#: Release threads at most; they start only when the ones there are busy.
_RELEASE_THREADS = 32


class Releaser:
    """Runs releases, inline or on a pool of release threads.

    Args:
        count: adds to one of the manager's counters (``leaks_reclaimed``, ``release_errors``).
        disposed: called with each pool handle after it was disposed.
    """

    def __init__(self, *, count: Callable[[str], None], disposed: Callable[[Any], None]) -> None:
        self._count = count
        self._disposed = disposed
        self._lock = threading.Lock()
        self._pending: set[concurrent.futures.Future[Any]] = set()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    # -- how ---------------------------------------------------------------------------

    def run(self, release: Release | None) -> None:
        """Carry out ``release`` on this thread (blocking, but never on a statement)."""
        if release is not None and not release.is_empty():
            self._finalize(release)

    def submit(self, release: Release | None) -> concurrent.futures.Future[Any] | None:
        """Carry out ``release`` on a release thread; returns at once."""
        if release is None or release.is_empty():
            return None
        return self.call(self._finalize, release)

    def call(self, fn: Callable[..., object], *args: Any) -> concurrent.futures.Future[Any]:
        """Run ``fn(*args)`` on a release thread (upkeep work); returns at once."""
        with self._lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    max_workers=_RELEASE_THREADS, thread_name_prefix="langgraph-scoped-conn-release"
                )
            future = self._executor.submit(fn, *args)
            self._pending.add(future)
        future.add_done_callback(self._done)
        return future

    async def arun(self, release: Release | None) -> None:
        """Carry out ``release`` on a release thread and await it.

        The work is already handed over when this is first awaited, and the wait is
        shielded: cancelling the awaiting task stops the wait, never the release.
        """
        future = self.submit(release)
        if future is not None:
            await asyncio.shield(asyncio.wrap_future(future))

    def _done(self, future: concurrent.futures.Future[Any]) -> None:
        with self._lock:
            self._pending.discard(future)

    def pending(self) -> int:
        return len(self._pending)

    def drain(self, timeout: float | None) -> bool:
        """Wait for releases handed to the release threads; True if none is left."""
        with self._lock:
            pending = list(self._pending)
        _, not_done = concurrent.futures.wait(pending, timeout=timeout)
        return not not_done

    def shutdown(self) -> None:
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)

    @staticmethod
    def wait_cancelled(release: Release, timeout: float = CANCEL_GRACE) -> bool:
        """Wait up to ``timeout`` for the cancelled statements of ``release`` to come back.

        For callers that want to report the slots free (``reap()``); True if they did.
        """
        deadline = time.monotonic() + timeout
        execution = release.execution
        while execution.still_out(release.cancel):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True

    # -- what --------------------------------------------------------------------------

    def _finalize(self, release: Release) -> None:
        execution = release.execution
        if release.cancel:
            self._cancel(execution, release.cancel)
        for checkout in release.reclaim:
            self._reclaim(checkout, release.reason)
        for handle, record in release.dirty:
            try:
                handle.reset_if_idle(record, execution.serial)
            except Exception as exc:
                self._failed(execution, "resetting a pooled connection's session", exc)
        for obj in reversed(release.custom):
            try:
                close_resource(obj)
            except Exception as exc:
                node, stack = execution.custom_origins.get(id(obj), (None, None))
                what = (
                    f"closing tracked resource {type(obj).__name__} "
                    f"(tracked by {node or 'code outside any graph node'})"
                )
                self._failed(execution, what, exc, stack=stack)
        for handle in release.handles:
            try:
                handle.dispose()
            except Exception as exc:
                self._failed(execution, "disposing its engine", exc)
            self._disposed(handle)

    def _cancel(self, execution: Execution, checkouts: Sequence[Checkout]) -> None:
        """Ask the server to cancel the checkouts' running statements (no waiting).

        Each connection stays recorded, its budget slot held, until its thread returns
        it; then the pool resets it before anyone else gets it.
        """
        for checkout in checkouts:
            fairy = checkout.fairy
            dbapi = getattr(fairy, "driver_connection", None) if fairy is not None else None
            cancel = getattr(dbapi, "cancel", None) or getattr(dbapi, "interrupt", None)
            if cancel is None:
                continue
            try:
                cancel()
            except Exception as exc:
                self._failed(execution, "cancelling a running statement", exc)

    def _reclaim(self, checkout: Checkout, reason: str) -> None:
        execution = checkout.execution
        self._count("leaks_reclaimed")
        held_for = time.monotonic() - checkout.started
        logger.warning(
            "execution %s %s while a connection was still checked out and unused (acquired "
            "by %s, held %.3fs); closing it so the server slot is freed%s",
            execution.execution_id,
            reason,
            checkout.origin or "code outside any graph node",
            held_for,
            f"\nacquired at:\n{checkout.stack}" if checkout.stack else "",
        )
        fairy = checkout.fairy
        connection = checkout.connection() if checkout.connection is not None else None
        if fairy is None:
            return
        from langgraph_scoped_conn.session import close_unused  # loads SQLAlchemy: not at import

        try:
            abandon = _abandoner(checkout, fairy)
            if not close_unused(fairy, connection, grace=CANCEL_GRACE, abandon=abandon):
                logger.warning(
                    "execution %s: a connection taken as unused started a statement that did "
                    "not end on cancel; its thread returns it when the statement ends",
                    execution.execution_id,
                )
        except Exception as exc:
            self._failed(execution, "closing a leaked connection", exc)
        checkout.fairy = None

    def _failed(
        self, execution: Execution, what: str, exc: Exception, *, stack: str | None = None
    ) -> None:
        """Count and log (once, password redacted) a failure while releasing ``execution``."""
        self._count("release_errors")
        logger.warning(
            "execution %s: %s failed: %s: %s%s",
            execution.execution_id,
            what,
            type(exc).__name__,
            redact_url(str(exc)),
            f"\ntracked at:\n{stack}" if stack else "",
        )


def _abandoner(checkout: Checkout, fairy: Any) -> Callable[[Callable[[], None]], bool] | None:
    """How to close ``checkout``'s connection if its thread may still act on it, else None.

    A thread that is alive and is not this one may be inside SQLAlchemy's check-in of
    the connection right now; only the budget pool can take it from under that thread
    safely (:meth:`~langgraph_scoped_conn.pool.BudgetPool.abandon`).
    """
    owner = checkout.thread_id
    if owner == threading.get_ident() or owner not in {t.ident for t in threading.enumerate()}:
        return None
    pool = getattr(checkout.pool, "budget_pool", None)
    record = record_of(fairy)
    if pool is None or record is None:
        return None
    return functools.partial(pool.abandon, record, fairy)


class AsyncResource:
    """Wraps an object that only has ``aclose()``, remembering the loop it belongs to."""

    def __init__(self, obj: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.obj = obj
        self.loop = loop

    def close(self) -> None:
        if self.loop.is_closed():
            raise RuntimeError(
                f"cannot aclose() {type(self.obj).__name__}: its event loop is closed"
            )
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:  # released on its own loop's thread: waiting would deadlock
            self.loop.create_task(self.obj.aclose())
            return
        asyncio.run_coroutine_threadsafe(self.obj.aclose(), self.loop).result(timeout=30)


def close_resource(obj: Any) -> None:
    """Call ``close()`` or ``dispose()`` on a tracked resource."""
    for name in ("close", "dispose"):
        method = getattr(obj, name, None)
        if callable(method):
            method()
            return
