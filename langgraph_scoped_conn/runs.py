"""LangGraph run id -> execution: root runs, their child runs, tool names and failed scopes.

Inside a node or tool, ``config["run_id"]`` is ``None``; what is always there is
``config["callbacks"].parent_run_id``, the run id of the node or tool itself.  The
callback handler records every run it sees under its root run's execution here, so
that id is enough to find the execution.  A root run's children are forgotten when
the root run ends.  No I/O.
"""

from __future__ import annotations

import threading
import uuid
from typing import Any

from langgraph_scoped_conn.execution import Execution, FailedScope

__all__ = ["RunIndex"]

Target = Execution | FailedScope


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


class RunIndex:
    """Maps every run id seen (roots and children) to its execution or failed scope.

    Keys are the ids' ints (:func:`_key`).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: run id -> (its execution or failed scope, its root run id)
        self._runs: dict[Any, tuple[Target, Any]] = {}
        #: root run id -> the ids of its child runs
        self._children: dict[Any, list[Any]] = {}
        #: tool run id -> the tool's name, for leak reports; pruned with its root
        self._names: dict[Any, str] = {}
        #: root run id -> what it holds (an execution it must release, or a failed scope)
        self._roots: dict[Any, Target] = {}

    def bind_root(self, run_id: uuid.UUID, target: Target) -> None:
        """Map the root run ``run_id`` to ``target``."""
        key = _key(run_id)
        with self._lock:
            self._runs[key] = (target, key)
            self._children[key] = []
            self._roots[key] = target
            if isinstance(target, Execution):
                target.run_ids.append(key)

    def link(self, run_id: uuid.UUID, parent_run_id: uuid.UUID, name: str | None = None) -> bool:
        """Map a child run to its parent's execution; False if the parent is unknown.

        Every child run start comes here, so it takes no lock: each step is one atomic
        dict or list operation.  The race with the root's end (:meth:`_forget`, under the
        lock) is settled after the append: if the root's children list is gone, the
        forget may have missed this run, and it removes its own entries.
        """
        entry = self._runs.get(_key(parent_run_id))
        if entry is None:
            return False
        key = _key(run_id)
        root = entry[1]
        self._runs[key] = entry  # the same (target, root) pair as its parent
        if name is not None:
            self._names[key] = name
        children = self._children.get(root)
        if children is not None:
            children.append(key)
        if children is None or self._children.get(root) is not children:  # root ended meanwhile
            self._runs.pop(key, None)
            self._names.pop(key, None)
        return True

    def end_root(self, run_id: uuid.UUID) -> Target | None:
        """Forget a root run and its children; return what it held (None for a child run)."""
        key = _key(run_id)
        target = self._roots.pop(key, None)  # atomic: a child's end takes no lock
        if target is None:
            return None
        with self._lock:
            self._forget(key)
            if isinstance(target, Execution) and key in target.run_ids:
                target.run_ids.remove(key)
        return target

    def forget_execution(self, execution: Execution) -> None:
        """Forget every root run of an execution that ended (released, reaped, closed)."""
        if not execution.run_ids:
            return
        with self._lock:
            for key in execution.run_ids:
                self._forget(key)
                self._roots.pop(key, None)
            execution.run_ids.clear()

    def _forget(self, key: Any) -> None:
        self._runs.pop(key, None)
        # popped first: a link() that appends after this sees the root gone and cleans up
        for child in self._children.pop(key, ()):
            self._runs.pop(child, None)
            self._names.pop(child, None)

    def target(self, run_id: uuid.UUID) -> Target | None:
        """The execution or failed scope ``run_id`` belongs to."""
        entry = self._runs.get(_key(run_id))
        return entry[0] if entry is not None else None

    def name(self, run_id: uuid.UUID | None) -> str | None:
        """The tool name recorded for ``run_id``, if any."""
        return self._names.get(_key(run_id)) if run_id is not None else None

    def size(self) -> int:
        """How many entries the index holds (for leak checks)."""
        with self._lock:
            return len(self._runs) + len(self._children) + len(self._names) + len(self._roots)

    def clear(self) -> None:
        with self._lock:
            self._runs.clear()
            self._children.clear()
            self._names.clear()
            self._roots.clear()
