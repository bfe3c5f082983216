"""One checked-out connection of an execution: what is recorded at checkout, and what it is
doing now.

A checkout records only what is cheap (the thread, the time, the context); which node
and tool took it is worked out from that context when a leak is reported.  What the
connection is doing is read from the driver through the pool that lent it.
"""

from __future__ import annotations

import contextvars
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from langgraph_scoped_conn.execution import Execution

__all__ = ["Activity", "Checkout"]

#: What a connection is doing, read from the driver: a statement in flight, a transaction
#: open between statements, nothing, or closed.
Activity = Literal["active", "transaction", "idle", "gone"]


class Checkout:
    """One connection checked out by an execution, from checkout until it is returned.

    It records what is cheap to record (the thread, the time, the context) and works out
    the rest (which node and tool took it) only when a leak is reported.
    """

    __slots__ = (
        "cancelled",
        "clean",
        "connection",
        "context",
        "execution",
        "fairy",
        "origin",
        "pool",
        "stack",
        "started",
        "tagged",
        "thread_id",
    )

    def __init__(self, execution: Execution, fairy: Any, pool: Any) -> None:
        self.execution = execution
        self.fairy = fairy
        #: the PoolHandle it came from: it reads the driver's state (:meth:`activity`)
        self.pool = pool
        self.connection: Any = None  # weakref to the SQLAlchemy Connection, if any
        self.thread_id = threading.get_ident()
        self.started = time.monotonic()
        #: the context it was checked out in: names its node and tool for a leak report
        self.context = contextvars.copy_context()
        self.cancelled = False  # its statement was cancelled when the execution was released
        self.clean = False  # nothing run on it in this checkout left session state behind
        self.tagged = False  # its application_name names the execution (set back at checkin)
        self.origin: str | None = None  # "node 'x' / tool 'y'", once worked out for a report
        self.stack = (
            "".join(traceback.format_stack()[:-3]) if execution.owner.settings.debug else None
        )

    def activity(self) -> Activity:
        """What its connection is doing right now, read from the driver (no I/O)."""
        fairy = self.fairy
        if fairy is None:
            return "gone"
        activity: Activity = self.pool.activity(fairy)
        return activity

    def returned(self, dirty: Any = None) -> None:
        """Called by the pool when the connection comes back (``dirty``: see Execution)."""
        self.execution.returned(self, dirty)
