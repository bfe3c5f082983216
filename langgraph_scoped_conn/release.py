"""The blocking side of ending an execution: cancel, close, dispose.

A :class:`~langgraph_scoped_conn.execution.Release` says what an ended execution left;
:class:`Releaser` carries it out:

1. statements still running for a force-released execution are cancelled on the
   server, and their threads get ``cancel_grace`` seconds to return the connections
   (which then go back to the pool, reset, with their backend idle);
2. connections still checked out are closed (counted as leaks), so the server slot
   is freed;
3. tracked custom resources are closed, and per-execution pools disposed.

The caller picks how: :meth:`Releaser.run` blocks, :meth:`Releaser.submit` hands
the work to the package's own release threads, and :meth:`Releaser.arun` does that
and awaits it, shielded, so a cancellation of the awaiting task cannot drop it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from langgraph_scoped_conn.execution import Checkout, Execution, Release
from langgraph_scoped_conn.settings import redact_url

__all__ = ["Releaser", "close_resource"]

logger = logging.getLogger("langgraph_scoped_conn")

#: Seconds a thread whose statement was cancelled gets to return its connection.
CANCEL_GRACE = 1.0


class Releaser:
    """Runs releases, inline or on a small pool of release threads.

    Args:
        count: adds to one of the manager's counters (``leaks_reclaimed``, ``release_errors``).
        disposed: called with each pool handle after it was disposed.
    """

    def __init__(self, *, count: Callable[[str], None], disposed: Callable[[Any], None]) -> None:
        self._count = count
        self._disposed = disposed
        self._lock = threading.Lock()
        self._pending: set[concurrent.futures.Future[None]] = set()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    # -- how ---------------------------------------------------------------------------

    def run(self, release: Release | None) -> None:
        """Carry out ``release`` on this thread (blocking)."""
        if release is not None and not release.is_empty():
            self._finalize(release)

    def submit(self, release: Release | None) -> concurrent.futures.Future[None] | None:
        """Carry out ``release`` on a release thread; returns at once."""
        if release is None or release.is_empty():
            return None
        return self.call(self._finalize, release)

    def call(self, fn: Callable[..., None], *args: Any) -> concurrent.futures.Future[None]:
        """Run ``fn(*args)`` on a release thread (upkeep work); returns at once."""
        with self._lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    max_workers=2, thread_name_prefix="langgraph-scoped-conn-release"
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

    def _done(self, future: concurrent.futures.Future[None]) -> None:
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

    # -- what --------------------------------------------------------------------------

    def _finalize(self, release: Release) -> None:
        execution = release.execution
        reclaim = list(release.reclaim)
        if release.cancel:
            reclaim += self._cancel(execution, release.cancel)
        for checkout in reclaim:
            self._reclaim(checkout, release.reason)
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

    def _cancel(self, execution: Execution, checkouts: Sequence[Checkout]) -> list[Checkout]:
        """Cancel the checkouts' running statements; return those not returned in time.

        The budget slot of a cancelled connection comes back only when its thread
        returns it (its backend then idle) or when it is closed here, never while the
        server still runs its statement.
        """
        for checkout in checkouts:
            fairy = checkout.fairy
            dbapi = getattr(fairy, "dbapi_connection", None) if fairy is not None else None
            cancel = getattr(dbapi, "cancel", None) or getattr(dbapi, "interrupt", None)
            if cancel is None:
                continue
            try:
                cancel()
            except Exception as exc:
                self._failed(execution, "cancelling a running statement", exc)
        deadline = time.monotonic() + CANCEL_GRACE
        while time.monotonic() < deadline and execution.still_out(checkouts):
            time.sleep(0.005)
        return execution.take(checkouts)

    def _reclaim(self, checkout: Checkout, reason: str) -> None:
        execution = checkout.execution
        self._count("leaks_reclaimed")
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
                # raise ConnectionReclaimedError instead of reconnecting if used again
                connection.invalidate()
            elif fairy.is_valid:
                fairy.invalidate()  # closes the DBAPI connection and returns the slot
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
