"""ScopedConnectionMiddleware: ``create_agent`` middleware that names each tool call's
connections and turns the package's errors into tool results the model can act on.

It does not open or release anything: that stays with the callback handler
(:func:`~langgraph_scoped_conn.with_scoped_connections`), whose run-end callbacks fire
on every way a run ends.  Requires the ``agents`` extra (``langchain``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from langchain.agents.middleware import AgentMiddleware, AgentState, ToolCallRequest
from langchain_core.messages import ToolMessage
from langgraph.types import Command

from langgraph_scoped_conn.errors import (
    ConnectionBudgetExceededError,
    ExecutionConnectionLimitError,
    ReadOnlyViolationError,
    UnsafeQueryError,
)
from langgraph_scoped_conn.redaction import redact_url
from langgraph_scoped_conn.runs import current_tool_call

__all__ = ["DEFAULT_ADVICE", "ScopedConnectionMiddleware"]

logger = logging.getLogger("langgraph_scoped_conn")

#: What the model is told for each error it can act on.  ``{error}`` is the error's own
#: message; the budget errors leave it out, as it names other executions (other users).
DEFAULT_ADVICE: Mapping[type[Exception], str] = {
    ConnectionBudgetExceededError: (
        "The database is busy: no connection came free in time, so the query did not run. "
        "Do not call this tool again right away; answer with what you already know, or say "
        "that the database is busy and to try again later."
    ),
    ExecutionConnectionLimitError: (
        "This run asked for more database connections at once than it may hold, so the "
        "query did not run. Make database tool calls one at a time."
    ),
    UnsafeQueryError: (
        "The query was refused before it ran: {error}. Only queries that read data may run; "
        "fix the query and call the tool again."
    ),
    ReadOnlyViolationError: (
        "The database refused the statement: {error}. Only queries that read data may run; "
        "rewrite it as a SELECT, or say that the change cannot be made here."
    ),
}

ToolResult = ToolMessage | Command[Any]


class ScopedConnectionMiddleware(AgentMiddleware[AgentState[Any], Any]):
    """Names each tool call's connections, and returns budget and read-only errors to the model.

    For :func:`langchain.agents.create_agent`.  Around each tool call it sets
    :data:`~langgraph_scoped_conn.runs.current_tool_call` to ``(tool name, tool call id)``,
    so every checkout inside knows its tool call: a leak report says ``tool 'x' (call
    <id>)``, and with ``tag_connections=True`` the connection's ``application_name``
    carries the id (``pg_stat_activity``).  The tool runs in that context whether it is
    sync or async and whichever thread ToolNode's executor picks (each call has its own
    copy of the context).

    A :class:`~langgraph_scoped_conn.errors.ConnectionBudgetExceededError`,
    :class:`~langgraph_scoped_conn.errors.ExecutionConnectionLimitError`,
    :class:`~langgraph_scoped_conn.errors.UnsafeQueryError` or
    :class:`~langgraph_scoped_conn.errors.ReadOnlyViolationError` raised by the tool comes
    back as an error ``ToolMessage`` (``status="error"``) with advice the model can
    follow, instead of failing the run; the full error is logged at WARNING.  Other
    exceptions, interrupts and ``Command`` results pass through unchanged.

    It does not release connections, and cannot: an ``after_agent`` hook is a graph node,
    which does not run when the run fails, is cancelled or its stream is closed.  Wrap the
    agent with :func:`~langgraph_scoped_conn.with_scoped_connections`, whose callback
    handler releases the run's scope on every one of those.

    Args:
        advice: error class -> text for the model (``{error}`` is the error's message);
            :data:`DEFAULT_ADVICE` by default.  A subclass matches its base's entry.

    Example:
        >>> middleware = [ScopedConnectionMiddleware()]  # doctest: +SKIP
        >>> agent = with_scoped_connections(create_agent(model, tools, middleware=middleware))
    """

    def __init__(self, *, advice: Mapping[type[Exception], str] | None = None) -> None:
        super().__init__()
        self.advice = dict(DEFAULT_ADVICE if advice is None else advice)
        self._caught = tuple(self.advice)

    def wrap_tool_call(
        self,
        request: ToolCallRequest,
        handler: Callable[[ToolCallRequest], ToolResult],
    ) -> ToolResult:
        token = current_tool_call.set(_named(request))
        try:
            return handler(request)
        except self._caught as exc:
            return self._tool_error(request, exc)
        finally:
            current_tool_call.reset(token)

    async def awrap_tool_call(
        self,
        request: ToolCallRequest,
        handler: Callable[[ToolCallRequest], Awaitable[ToolResult]],
    ) -> ToolResult:
        token = current_tool_call.set(_named(request))
        try:
            return await handler(request)
        except self._caught as exc:
            return self._tool_error(request, exc)
        finally:
            current_tool_call.reset(token)

    def _tool_error(self, request: ToolCallRequest, exc: Exception) -> ToolMessage:
        call = request.tool_call
        message = redact_url(str(exc))
        logger.warning(
            "tool %r (call %s) failed with %s, returned to the model as a tool error: %s",
            call["name"],
            call["id"],
            type(exc).__name__,
            message,
        )
        advice = next(text for cls, text in self.advice.items() if isinstance(exc, cls))
        return ToolMessage(
            content=advice.replace("{error}", message),
            name=call["name"],
            tool_call_id=call["id"] or "",
            status="error",
        )


def _named(request: ToolCallRequest) -> tuple[str, str]:
    call = request.tool_call
    return call["name"], call["id"] or ""
