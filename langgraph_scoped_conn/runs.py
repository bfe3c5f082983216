"""LangGraph run id -> execution: root runs, their child runs, tool names and failed scopes.

Inside a node or tool, ``config["run_id"]`` is ``None``; what is always there is
``config["callbacks"].parent_run_id``, the run id of the node or tool itself.  The
callback handler records every run it sees under its root run's execution here, so
that id is enough to find the execution.  A root run's children are forgotten when
the root run ends.  No I/O.

One live execution per run: two live root runs with the same run id (a caller that
reuses ``config["run_id"]``) cannot be told apart by their children, so from the
second one's start both get a clear error instead of sharing; and a run never joins an
execution another live run holds unless it was asked to (an enclosing
``ExecutionScope``).
"""

from __future__ import annotations

import asyncio
import contextvars
import sys
import threading
import uuid
import weakref
from typing import Any

from langgraph_scoped_conn.errors import ScopeUnavailableError
from langgraph_scoped_conn.execution import Execution, FailedScope

__all__ = ["RunIndex", "current_tool_call"]

Target = Execution | FailedScope

#: (tool name, tool call id) of the tool call running in this context, set by the
#: ``create_agent`` middleware; names the tool call in leak reports.
current_tool_call: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar(
    "langgraph_scoped_conn_tool_call", default=None
)


#: a run table that held more entries than this at a root run's end has grown: its
#: tables are freed once no root run is live (smaller ones are kept for the next runs)
_GROWN = 512


def _key(run_id: uuid.UUID) -> Any:
    """A run id as a dict key: a UUID's 128-bit int, whose hash is computed in C.

    ``uuid.UUID.__hash__`` is Python code; a run's start and end look ids up several
    times each, on every node of every run.  Anything else (a ``config["run_id"]``
    given as text) is its own key.
    """
    try:
        return run_id.int
    except AttributeError:
        return run_id


def _weak(
    loop: asyncio.AbstractEventLoop | None,
) -> weakref.ref[asyncio.AbstractEventLoop] | None:
    """A weak reference to ``loop``; None without one, or for a loop that allows none."""
    if loop is None:
        return None
    try:
        return weakref.ref(loop)
    except TypeError:  # an event loop class with __slots__ and no __weakref__
        return None


class _Root:
    """A root run: its key, what it holds, the ids of its child runs, how many live
    invocations use its run id, whether it is forgotten, the error its lookups get once
    a second invocation used its id, and the event loop it started on (a weak reference;
    None for a run started off any loop).

    Every run id of the run (its own and its children's) maps to this one object, so a
    child's start and end read their root without another lookup.
    """

    __slots__ = ("children", "failed", "forgotten", "key", "live", "loop", "released", "target")

    def __init__(
        self, key: Any, target: Target, loop: weakref.ref[asyncio.AbstractEventLoop] | None
    ) -> None:
        self.key = key
        self.target = target
        self.children: list[Any] = []
        self.live = 1
        self.released = False
        self.forgotten = False
        #: set when a second live invocation used the run id: what lookups get instead
        self.failed: FailedScope | None = None
        self.loop = loop

    def loop_gone(self) -> bool:
        """True if it started on an event loop that is closed (or collected) now."""
        if self.loop is None:
            return False
        loop = self.loop()
        return loop is None or loop.is_closed()


class RunIndex:
    """Maps every run id seen (roots and children) to its root run's record, and so to
    its execution or failed scope (:meth:`target`).

    Keys are the ids' ints (:func:`_key`).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: run id (a root's or a child's) -> its root run
        self._runs: dict[Any, _Root] = {}
        #: tool run id -> (the tool's name, its tool call id), for leak reports
        self._names: dict[Any, tuple[str, str | None]] = {}
        #: live root run id -> its root run (duplicate ids, forgetting, the orphan scan)
        self._roots: dict[Any, _Root] = {}
        #: execution -> its root runs (live runs that hold it)
        self._roots_of: dict[Execution, list[Any]] = {}
        #: the tables held more than _GROWN runs since they were last freed
        self._grown = False

    def bind_root(
        self,
        run_id: uuid.UUID,
        target: Target,
        *,
        exclusive: bool = True,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        """Map the root run ``run_id`` to ``target``; ``loop``: the event loop it runs on.

        Raises:
            ScopeUnavailableError: ``run_id`` is already a live root run (from then on,
                both runs' lookups get this error), or ``exclusive`` and another live run
                holds the execution.  Nothing is bound then.
        """
        key = _key(run_id)
        with self._lock:
            root = self._roots.get(key)
            if root is not None:
                error = ScopeUnavailableError(
                    f"run id {run_id} is already used by a live run; two invocations with the "
                    "same config['run_id'] cannot be told apart, so neither gets a scoped "
                    "connection from now on. Give each invocation its own run_id (or none)"
                )
                root.live += 1
                root.failed = FailedScope(error)  # every run id of both runs reads it
                raise error
            if exclusive and isinstance(target, Execution) and self._roots_of.get(target):
                raise ScopeUnavailableError(
                    f"execution {target.execution_id!r} is already used by a live run, and two "
                    "runs never share an execution by accident. Make the execution_id "
                    "callable return an id unique per run (e.g. include run['run_id']), or "
                    "open one ExecutionScope around both runs to share it on purpose"
                )
            root = _Root(key, target, None if loop is None else _weak(loop))
            self._runs[key] = root
            self._roots[key] = root
            if isinstance(target, Execution):
                self._roots_of.setdefault(target, []).append(key)

    def bind_failed(self, run_id: uuid.UUID, failed: FailedScope) -> None:
        """Map a root run whose scope could not be opened (unless it is a live run's id)."""
        with self._lock:
            if _key(run_id) in self._roots:
                return  # a duplicate of a live run: bind_root already marked both
        self.bind_root(run_id, failed, exclusive=False)

    def link(
        self,
        run_id: uuid.UUID,
        parent_run_id: uuid.UUID,
        name: str | None = None,
        tool_call_id: str | None = None,
    ) -> bool:
        """Map a child run to its parent's execution; False if the parent is unknown.

        Every child run start comes here, so it takes no lock: each step is one atomic
        dict or list operation.  The race with the root's end (:meth:`_forget`, under the
        lock) is settled after the append: if the root is forgotten by then, the forget
        may have missed this run, and it removes its own entries.
        """
        try:  # _key(), inline: every child run's start comes here
            root = self._runs.get(parent_run_id.int)
        except AttributeError:
            root = self._runs.get(parent_run_id)
        if root is None:
            return False
        key = _key(run_id)
        self._runs[key] = root
        if name is not None:
            self._names[key] = (name, tool_call_id)
        root.children.append(key)
        if root.forgotten:  # the root ended meanwhile
            self._runs.pop(key, None)
            self._names.pop(key, None)
        return True

    def root(self, run_id: uuid.UUID) -> _Root | None:
        """The root run ``run_id``, if this index still holds it (no lock: one lookup)."""
        key: Any
        try:
            key = run_id.int  # _key(run_id), inline: every run's end asks
        except AttributeError:
            key = run_id
        root = self._runs.get(key)
        return root if root is not None and root.key == key else None

    def root_target(self, run_id: uuid.UUID) -> Target | None:
        """What the root run ``run_id`` holds, if it is a live root not yet released."""
        root = self.root(run_id)
        if root is None or root.released:
            return None
        return root.target

    def end_root(self, root: _Root) -> None:
        """The root run ``root`` (from :meth:`root`) ended: stop it holding its execution.

        Its children are forgotten once no live invocation uses the run id any more.
        A child's end need not come here (:meth:`root` tells them apart without a lock).
        """
        with self._lock:
            if root.forgotten:  # its execution ended meanwhile (forget_execution)
                return
            first = not root.released
            root.released = True
            root.live -= 1
            if first and isinstance(root.target, Execution):
                self._unlink(root.target, root.key)
            if root.live <= 0:
                self._forget(root.key)  # after the unlink: the last root's frees the tables

    def orphaned(self) -> list[Any]:
        """Ids of live root runs whose event loop is closed: their end never comes.

        ``asyncio.run`` cancels the tasks still running when its main coroutine ends,
        such as the other runs of an ``abatch`` or ``gather`` that one run's error
        ended.  LangGraph reports a run's error from a shielded task; when that task
        is cancelled before its first step, the handler never hears of the end.  A run
        whose loop is closed cannot go on, so it is over.
        """
        with self._lock:
            keys = [k for k, r in self._roots.items() if not r.released and r.loop_gone()]
        return [uuid.UUID(int=k) if isinstance(k, int) else k for k in keys]

    def forget_execution(self, execution: Execution) -> None:
        """Forget every root run of an execution that ended (released, reaped, closed)."""
        if execution not in self._roots_of:
            return
        with self._lock:
            for key in self._roots_of.pop(execution, ()):
                self._forget(key)

    def _unlink(self, execution: Execution, key: Any) -> None:
        keys = self._roots_of.get(execution)
        if keys is not None and key in keys:
            keys.remove(key)
            if not keys:
                del self._roots_of[execution]

    def _forget(self, key: Any) -> None:
        """Forget the root run ``key`` and its children (under the lock)."""
        if len(self._runs) > _GROWN:
            self._grown = True
        self._runs.pop(key, None)
        root = self._roots.pop(key, None)
        if root is not None:
            # marked first: a link() that appends after this sees it and cleans up
            root.forgotten = True
            for child in root.children:
                self._runs.pop(child, None)
                self._names.pop(child, None)
        if self._grown and not self._roots:
            self._free_tables()

    def _free_tables(self) -> None:
        """Give back the tables a burst of runs grew, once no root run is live.

        A dict keeps its largest table after its entries are deleted: after 10,000
        concurrent runs the run index would hold several MB of empty tables until the
        next burst.  ``clear()`` frees an empty dict's table, and keeps the object, so
        a :meth:`link` racing with this (which never inserts into an emptied table for
        good: it sees its root forgotten and removes its own entry) reads the same dict.
        """
        tables = (self._runs, self._names, self._roots, self._roots_of)
        for table in tables:
            if not table:
                table.clear()
        self._grown = any(tables)  # a racing link(): try again at the next last end

    def target(self, run_id: uuid.UUID) -> Target | None:
        """The execution or failed scope ``run_id`` belongs to."""
        root = self._runs.get(_key(run_id))
        if root is None:
            return None
        return root.target if root.failed is None else root.failed

    def name(self, run_id: uuid.UUID | None) -> str | None:
        """The tool name recorded for ``run_id``, if any."""
        found = self._names.get(_key(run_id)) if run_id is not None else None
        return found[0] if found is not None else None

    def origin(self, context: contextvars.Context) -> str | None:
        """``node 'x' / tool 'y' (call id)`` for code that ran in ``context``, for reports.

        Read from the LangGraph config and the tool call set in that context, when a
        graph was running; the tool's name comes from this index (ask before the root
        run is forgotten).
        """
        node = tool = call_id = None
        config_module = sys.modules.get("langchain_core.runnables.config")
        config = context.get(config_module.var_child_runnable_config) if config_module else None
        if config:
            node = (config.get("metadata") or {}).get("langgraph_node")
            parent = getattr(config.get("callbacks"), "parent_run_id", None)
            found = self._names.get(_key(parent)) if parent is not None else None
            if found is not None:
                tool, call_id = found
        tool_call = context.get(current_tool_call)
        if tool_call is not None:
            tool, call_id = tool_call
        parts = []
        if node:
            parts.append(f"node {node!r}")
        if tool:
            parts.append(f"tool {tool!r}" + (f" (call {call_id})" if call_id else ""))
        return " / ".join(parts) or None

    def size(self) -> int:
        """How many entries the index holds (for leak checks)."""
        with self._lock:
            return len(self._runs) + len(self._names) + len(self._roots) + len(self._roots_of)

    def clear(self) -> None:
        with self._lock:
            for root in self._roots.values():
                root.forgotten = True  # a racing link() removes its own entry
            self._runs.clear()
            self._names.clear()
            self._roots.clear()
            self._roots_of.clear()
            self._grown = False
