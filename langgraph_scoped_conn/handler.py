"""ScopedConnectionHandler: opens a scope when a graph run starts and releases it at the end.

The handler is a synchronous langchain-core callback handler with ``run_inline =
True``: LangChain calls it directly on the calling thread (also from the async
callback manager), so the scope exists before the first node runs, and the sync
path never starts an event loop.  The blocking part of a release (closing leaked
connections, cancelling server work) always goes to the package's release threads,
so a callback never blocks the thread or event loop that runs the graph.

Execution id, in order of precedence:

1. the ``execution_id=`` callable, given ``{"run_id", "configurable", "context", "metadata",
   "tags"}`` of the run (``configurable`` and ``context`` as passed to ``invoke``/``stream``);
2. an enclosing :class:`~langgraph_scoped_conn.ExecutionScope` (the run joins it);
3. ``configurable.run_id`` under LangGraph Server (the same across server retries);
4. the root run id, which is the caller's ``config["run_id"]`` when given.
"""

from __future__ import annotations

import logging
import sys
import uuid
from collections.abc import Callable, Mapping
from types import FrameType
from typing import Any

from langchain_core.callbacks import BaseCallbackHandler

from langgraph_scoped_conn.errors import ConfigurationError
from langgraph_scoped_conn.lookup import current_execution, register_manager
from langgraph_scoped_conn.manager import ExecutionConnectionManager, get_connection_manager
from langgraph_scoped_conn.settings import redact_url

__all__ = ["ExecutionIdFactory", "ScopedConnectionHandler"]

logger = logging.getLogger("langgraph_scoped_conn")

ExecutionIdFactory = Callable[[Mapping[str, Any]], str]


class ScopedConnectionHandler(BaseCallbackHandler):
    """Opens one execution scope per root graph run and releases it when the run ends.

    One instance may serve many concurrent runs (as when a module-level graph is
    served by ``langgraph dev``): all per-run state lives in the manager's registry,
    keyed by run id, and is pruned as runs end.

    Args:
        manager: the manager to use; the process default when ``None`` (looked up at
            each run start, so ``configure()`` after wrapping still takes effect).
        execution_id: a callable that returns the execution id for a run.

    Example:
        >>> handler = ScopedConnectionHandler()  # doctest: +SKIP
        >>> graph.invoke(inputs, {"callbacks": [handler]})
    """

    run_inline = True
    raise_error = False
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
        self._registered_default: ExecutionConnectionManager | None = None
        if manager is not None:
            register_manager(manager)

    @property
    def manager(self) -> ExecutionConnectionManager:
        """The manager runs are registered with."""
        if self._manager is not None:
            return self._manager
        manager = get_connection_manager()
        if manager is not self._registered_default:  # register once per default, not per event
            register_manager(manager)
            self._registered_default = manager
        return manager

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
        self._start(run_id, parent_run_id, tags, metadata)

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
        self._start(run_id, parent_run_id, tags, metadata, name=name)

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
    ) -> None:
        manager = self._manager if self._manager is not None else self.manager
        if parent_run_id is not None and manager.link_run(run_id, parent_run_id, name=name):
            return
        # a root: no parent, or a parent this manager has not seen (the wrapped graph
        # called from inside another runnable, or used as a subgraph of a plain graph)
        try:
            manager.open_execution(
                self._choose_id(manager, run_id, tags, metadata), root_run=run_id
            )
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
    ) -> str:
        metadata = metadata or {}
        if self._execution_id is not None:
            configurable, context = _run_config()
            run = {
                "run_id": run_id,
                "configurable": configurable,
                "context": context,
                "metadata": dict(metadata),
                "tags": list(tags or ()),
            }
            factory = self._execution_id
            try:
                chosen = factory(run)
            except Exception as exc:
                name = getattr(factory, "__qualname__", None) or repr(factory)
                raise ConfigurationError(
                    f"the execution_id callable {name} raised {type(exc).__name__}: {exc}; "
                    f"it was offered configurable keys {sorted(configurable)}, metadata keys "
                    f"{sorted(metadata)}, context {type(context).__name__}, tags and run_id"
                ) from exc
            if not isinstance(chosen, str) or not chosen:
                raise TypeError(
                    f"the execution_id callable returned {chosen!r}; it must return a "
                    "non-empty string"
                )
            return chosen
        enclosing = current_execution()
        if enclosing is not None and enclosing.owner is manager:
            return enclosing.execution_id
        server_run = metadata.get("run_id")
        if server_run:
            return str(server_run)
        return str(run_id)

    # -- run ends ------------------------------------------------------------------

    def on_chain_end(
        self, outputs: Any, *, run_id: uuid.UUID, parent_run_id: uuid.UUID | None = None, **kw: Any
    ) -> None:
        self._end(run_id, "ended")

    def on_chain_error(
        self,
        error: BaseException,
        *,
        run_id: uuid.UUID,
        parent_run_id: uuid.UUID | None = None,
        **kw: Any,
    ) -> None:
        self._end(run_id, f"ended with {type(error).__name__}")

    def on_tool_end(
        self, output: Any, *, run_id: uuid.UUID, parent_run_id: uuid.UUID | None = None, **kw: Any
    ) -> None:
        self._end(run_id, "ended")

    def on_tool_error(
        self,
        error: BaseException,
        *,
        run_id: uuid.UUID,
        parent_run_id: uuid.UUID | None = None,
        **kw: Any,
    ) -> None:
        self._end(run_id, "ended")

    def on_retriever_end(
        self,
        documents: Any,
        *,
        run_id: uuid.UUID,
        parent_run_id: uuid.UUID | None = None,
        **kw: Any,
    ) -> None:
        self._end(run_id, "ended")

    def on_retriever_error(
        self,
        error: BaseException,
        *,
        run_id: uuid.UUID,
        parent_run_id: uuid.UUID | None = None,
        **kw: Any,
    ) -> None:
        self._end(run_id, "ended")

    def _end(self, run_id: uuid.UUID, reason: str) -> None:
        manager = self._manager if self._manager is not None else self.manager
        manager.end_run(run_id, reason=reason)

    def __repr__(self) -> str:
        return f"<ScopedConnectionHandler manager={self._manager!r}>"


def _stream_codes() -> frozenset[Any]:
    from langgraph.pregel import Pregel

    return frozenset({Pregel.stream.__code__, Pregel.astream.__code__})


_STREAM_CODES: frozenset[Any] | None = None


def _run_config() -> tuple[dict[str, Any], Any]:
    """The ``configurable`` and ``context`` of the graph run starting on this thread.

    LangChain gives a callback only the run's metadata and tags, not its config (and
    ``var_child_runnable_config`` is not set yet when the root run starts), so they are
    read from the ``Pregel.stream`` / ``astream`` call that is starting the run: it sits
    a few frames up, with the merged config in its ``config`` and the runtime context in
    its ``context``.  Empty when the run was not started by a LangGraph graph.
    """
    global _STREAM_CODES  # noqa: PLW0603
    if _STREAM_CODES is None:
        _STREAM_CODES = _stream_codes()
    frame: FrameType | None = sys._getframe(2)
    for _ in range(40):  # the stream call is 3-4 frames up; don't walk a deep stack
        if frame is None:
            break
        if frame.f_code in _STREAM_CODES:
            config = frame.f_locals.get("config") or {}
            configurable = config.get("configurable") or {}
            public = {k: v for k, v in configurable.items() if not str(k).startswith("__pregel_")}
            return public, frame.f_locals.get("context")
        frame = frame.f_back
    return {}, None
