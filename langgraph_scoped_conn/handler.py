"""ScopedConnectionHandler: opens a scope when a graph run starts and releases it at the end.

The handler is a synchronous langchain-core callback handler with ``run_inline =
True``: LangChain calls it directly on the calling thread (also from the async
callback manager), so the scope exists before the first node runs, and the sync
path never starts an event loop.  The blocking part of a release (closing leaked
connections, cancelling server work) always goes to the package's release threads,
so a callback never blocks the thread or event loop that runs the graph.

Execution id, in order of precedence:

1. the ``execution_id=`` callable, given what LangChain hands the run's callbacks:
   ``{"run_id", "metadata", "tags", "configurable"}``, where ``configurable`` holds the
   configurable values the run's metadata carries (LangGraph copies ``thread_id``,
   ``checkpoint_ns``, ``assistant_id``, ``graph_id`` and ``run_id`` there; put anything
   else your id needs in ``config["metadata"]``);
2. an enclosing :class:`~langgraph_scoped_conn.ExecutionScope` (the run joins it);
3. ``configurable.run_id`` under LangGraph Server (the same across server retries);
4. the root run id, which is the caller's ``config["run_id"]`` when given.

One live execution per run: a callable that returns an id another live run holds, or a
``config["run_id"]`` used by two live invocations, fails that run's scope with an error
naming the id (2. is the way to share an execution on purpose).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from langchain_core.callbacks import BaseCallbackHandler

from langgraph_scoped_conn.configure import get_connection_manager
from langgraph_scoped_conn.current import current_execution
from langgraph_scoped_conn.errors import ConfigurationError
from langgraph_scoped_conn.manager import ExecutionConnectionManager
from langgraph_scoped_conn.redaction import redact_url

__all__ = ["ExecutionIdFactory", "ScopedConnectionHandler"]

logger = logging.getLogger("langgraph_scoped_conn")

ExecutionIdFactory = Callable[[Mapping[str, Any]], str]

#: the configurable keys LangGraph copies into a run's metadata (``_PROPAGATE_TO_METADATA``)
_PROPAGATED = ("thread_id", "checkpoint_id", "checkpoint_ns", "task_id", "run_id")
_SERVER_KEYS = ("assistant_id", "graph_id")


class ScopedConnectionHandler(BaseCallbackHandler):
    """Opens one execution scope per root graph run and releases it when the run ends.

    One instance may serve many concurrent runs (as when a module-level graph is
    served by ``langgraph dev``): all per-run state lives in the manager's registry,
    keyed by run id, and is pruned as runs end.

    Args:
        manager: the manager to use; the process default when ``None`` (looked up at
            each run start, so ``configure()`` after wrapping still takes effect).
        execution_id: a callable that returns the execution id for a run (see the
            module docstring for what it is given).

    Example:
        >>> handler = ScopedConnectionHandler()  # doctest: +SKIP
        >>> graph.invoke(inputs, {"callbacks": [handler]})
    """

    run_inline = True
    raise_error = False
    # plain class attributes, not langchain-core's properties: LangChain reads the
    # matching one before every event it hands a handler (six per two-node run)
    ignore_chain = False
    ignore_retriever = False
    ignore_llm = True
    ignore_chat_model = True
    # langchain-core routes on_tool_start/end/error through ``ignore_agent``: it must stay
    # False, or a tool's own run id is never mapped and the guide's no-argument API fails
    ignore_agent = False
    ignore_retry = True
    ignore_custom_event = True

    def __init__(
        self,
        manager: ExecutionConnectionManager | None = None,
        *,
        execution_id: ExecutionIdFactory | None = None,
    ) -> None:
        self._manager = manager
        self._execution_id = execution_id

    @property
    def manager(self) -> ExecutionConnectionManager:
        """The manager runs are registered with (lookups find it in a run's callbacks)."""
        return self._manager if self._manager is not None else get_connection_manager()

    # -- run starts ----------------------------------------------------------------

    def on_chain_start(
        self,
        serialized: dict[str, Any] | None,
        inputs: Any,
        *,
        run_id: uuid.UUID,
        parent_run_id: uuid.UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        # every node's start comes here: a child's costs one call into the run index
        manager = self._manager if self._manager is not None else get_connection_manager()
        if parent_run_id is None or not manager.link_run(run_id, parent_run_id):
            self._open(manager, run_id, tags, metadata)

    def on_tool_start(
        self,
        serialized: dict[str, Any] | None,
        input_str: str,
        *,
        run_id: uuid.UUID,
        parent_run_id: uuid.UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        name = kwargs.get("name") or (serialized or {}).get("name")
        call_id = kwargs.get("tool_call_id")
        self._start(run_id, parent_run_id, tags, metadata, name=name, tool_call_id=call_id)

    def on_retriever_start(
        self,
        serialized: dict[str, Any] | None,
        query: str,
        *,
        run_id: uuid.UUID,
        parent_run_id: uuid.UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self._start(run_id, parent_run_id, tags, metadata)

    def _start(
        self,
        run_id: uuid.UUID,
        parent_run_id: uuid.UUID | None,
        tags: list[str] | None,
        metadata: Mapping[str, Any] | None,
        *,
        name: str | None = None,
        tool_call_id: str | None = None,
    ) -> None:
        manager = self._manager if self._manager is not None else get_connection_manager()
        if parent_run_id is None or not manager.link_run(run_id, parent_run_id, name, tool_call_id):
            self._open(manager, run_id, tags, metadata)

    def _open(
        self,
        manager: ExecutionConnectionManager,
        run_id: uuid.UUID,
        tags: list[str] | None,
        metadata: Mapping[str, Any] | None,
    ) -> None:
        """A root: no parent, or a parent this manager has not seen (the wrapped graph
        called from inside another runnable, or used as a subgraph of a plain graph)."""
        try:
            chosen, exclusive = self._choose_id(manager, run_id, tags, metadata)
            manager.open_execution(chosen, root_run=run_id, exclusive=exclusive)
        except Exception as exc:
            logger.error(
                "could not open an execution scope for run %s: %s: %s; tools of this run will "
                "get ScopeUnavailableError",
                run_id,
                type(exc).__name__,
                redact_url(str(exc)),
            )
            manager.bind_failed_run(run_id, exc)

    def _choose_id(
        self,
        manager: ExecutionConnectionManager,
        run_id: uuid.UUID,
        tags: list[str] | None,
        metadata: Mapping[str, Any] | None,
    ) -> tuple[str, bool]:
        """The execution id, and whether the run must hold it alone."""
        metadata = metadata or {}
        if self._execution_id is not None:
            configurable = {k: metadata[k] for k in (*_PROPAGATED, *_SERVER_KEYS) if k in metadata}
            run = {
                "run_id": run_id,
                "metadata": dict(metadata),
                "tags": list(tags or ()),
                "configurable": configurable,
            }
            factory = self._execution_id
            try:
                chosen = factory(run)
            except Exception as exc:
                name = getattr(factory, "__qualname__", None) or repr(factory)
                raise ConfigurationError(
                    f"the execution_id callable {name} raised {type(exc).__name__}: {exc}; "
                    f"it was offered metadata keys {sorted(metadata)}, configurable keys "
                    f"{sorted(configurable)}, tags and run_id (put what it needs in "
                    "config['metadata'])"
                ) from exc
            if not isinstance(chosen, str) or not chosen:
                raise TypeError(
                    f"the execution_id callable returned {chosen!r}; it must return a "
                    "non-empty string"
                )
            return chosen, True
        enclosing = current_execution()
        if enclosing is not None and enclosing.owner is manager:
            return enclosing.execution_id, False
        server_run = metadata.get("run_id")
        if server_run:
            return str(server_run), True
        return str(run_id), True

    # -- run ends ------------------------------------------------------------------

    def on_chain_end(self, outputs: Any, *, run_id: uuid.UUID, **kwargs: Any) -> None:
        # every node's end comes here: a child's costs one lookup
        manager = self._manager if self._manager is not None else get_connection_manager()
        manager.end_run(run_id)

    def on_chain_error(self, error: BaseException, *, run_id: uuid.UUID, **kwargs: Any) -> None:
        self._end(run_id, error)

    def on_tool_end(self, output: Any, *, run_id: uuid.UUID, **kwargs: Any) -> None:
        self._end(run_id, None)

    def on_tool_error(self, error: BaseException, *, run_id: uuid.UUID, **kwargs: Any) -> None:
        self._end(run_id, error)

    def on_retriever_end(self, documents: Any, *, run_id: uuid.UUID, **kwargs: Any) -> None:
        self._end(run_id, None)

    def on_retriever_error(self, error: BaseException, *, run_id: uuid.UUID, **kwargs: Any) -> None:
        self._end(run_id, error)

    def _end(self, run_id: uuid.UUID, error: BaseException | None) -> None:
        """Any run's end: a root's releases its execution (a child's costs one lookup)."""
        manager = self._manager if self._manager is not None else get_connection_manager()
        manager.end_run(
            run_id, reason="ended" if error is None else f"ended with {type(error).__name__}"
        )

    def __repr__(self) -> str:
        return f"<ScopedConnectionHandler manager={self._manager!r}>"
