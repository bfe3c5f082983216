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

from langgraph_scoped_conn.execution import Execution, FailedScope

__all__ = ["RunIndex"]

Target = Execution | FailedScope


class RunIndex:
    """Maps every run id seen (roots and children) to its execution or failed scope."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: run id -> (its execution or failed scope, its root run id)
        self._runs: dict[uuid.UUID, tuple[Target, uuid.UUID]] = {}
        #: root run id -> the ids of its child runs
        self._children: dict[uuid.UUID, list[uuid.UUID]] = {}
        #: tool run id -> the tool's name, for leak reports; pruned with its root
        self._names: dict[uuid.UUID, str] = {}
        #: root run id -> what it holds (an execution it must release, or a failed scope)
        self._roots: dict[uuid.UUID, Target] = {}

    def bind_root(self, run_id: uuid.UUID, target: Target) -> None:
        """Map the root run ``run_id`` to ``target``."""
        with self._lock:
            self._bind(run_id, target)

    def _bind(self, run_id: uuid.UUID, target: Target) -> None:
        self._runs[run_id] = (target, run_id)
        self._children[run_id] = []
        self._roots[run_id] = target
        if isinstance(target, Execution):
            target.run_ids.append(run_id)

    def link(self, run_id: uuid.UUID, parent_run_id: uuid.UUID, name: str | None) -> bool:
        """Map a child run to its parent's execution; False if the parent is unknown."""
        with self._lock:
            entry = self._runs.get(parent_run_id)
            if entry is None:
                return False
            self._runs[run_id] = entry  # the same (target, root) pair as its parent
            self._children[entry[1]].append(run_id)
            if name is not None:
                self._names[run_id] = name
            return True

    def end_root(self, run_id: uuid.UUID) -> Target | None:
        """Forget a root run and its children; return what it held (None for a child run)."""
        target = self._roots.pop(run_id, None)  # atomic: a child's end takes no lock
        if target is None:
            return None
        with self._lock:
            self._forget(run_id)
            if isinstance(target, Execution) and run_id in target.run_ids:
                target.run_ids.remove(run_id)
        return target

    def forget_execution(self, execution: Execution) -> None:
        """Forget every root run of an execution that ended (released, reaped, closed)."""
        if not execution.run_ids:
            return
        with self._lock:
            for run_id in execution.run_ids:
                self._forget(run_id)
                self._roots.pop(run_id, None)
            execution.run_ids.clear()

    def _forget(self, run_id: uuid.UUID) -> None:
        self._runs.pop(run_id, None)
        for child in self._children.pop(run_id, ()):
            self._runs.pop(child, None)
            self._names.pop(child, None)

    def target(self, run_id: uuid.UUID) -> Target | None:
        """The execution or failed scope ``run_id`` belongs to."""
        entry = self._runs.get(run_id)
        return entry[0] if entry is not None else None

    def name(self, run_id: uuid.UUID | None) -> str | None:
        """The tool name recorded for ``run_id``, if any."""
        return self._names.get(run_id) if run_id is not None else None

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
