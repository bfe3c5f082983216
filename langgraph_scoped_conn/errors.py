"""Exceptions raised by langgraph_scoped_conn.

Every exception shares :class:`ScopedConnectionError` as its base, so callers can
catch the package's errors in one place.  Messages carry the context needed to act
on them and never contain a password or a full DSN.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = [
    "ConfigurationError",
    "ConnectionBudgetExceededError",
    "ConnectionReclaimedError",
    "ExecutionConnectionLimitError",
    "NoActiveScopeError",
    "ReadOnlyViolationError",
    "ScopeClosedError",
    "ScopeUnavailableError",
    "ScopedConnectionError",
    "UnsafeQueryError",
]


class ScopedConnectionError(Exception):
    """Base class of every error raised by langgraph_scoped_conn."""


class ConfigurationError(ScopedConnectionError, ValueError):
    """An option or a database URL is invalid or missing."""


class NoActiveScopeError(ScopedConnectionError, LookupError):
    """A scoped resource was requested outside any execution scope."""


class ScopeUnavailableError(ScopedConnectionError):
    """The run's scope could not be opened, so no scoped resource can be handed out."""


class ScopeClosedError(ScopedConnectionError):
    """A resource was requested through an execution scope that has already ended."""


class ConnectionBudgetExceededError(ScopedConnectionError, TimeoutError):
    """Every connection of the budget stayed in use for longer than ``pool_timeout``."""


class ExecutionConnectionLimitError(ScopedConnectionError, TimeoutError):
    """One execution asked for more than ``max_connections_per_execution`` connections."""


class UnsafeQueryError(ScopedConnectionError, ValueError):
    """The read-only guard refused a statement before it reached the database."""


class ReadOnlyViolationError(ScopedConnectionError):
    """The database refused a write inside a read-only transaction."""


if TYPE_CHECKING:
    from sqlalchemy.exc import ResourceClosedError

    class ConnectionReclaimedError(ScopeClosedError, ResourceClosedError):
        """A connection closed at scope end (it was still checked out) was used again."""


def _define_reclaimed_error() -> type[ScopeClosedError]:
    # defined on first use: inheriting SQLAlchemy's ResourceClosedError means importing
    # SQLAlchemy, which `import langgraph_scoped_conn` avoids
    from sqlalchemy.exc import ResourceClosedError

    class ConnectionReclaimedError(ScopeClosedError, ResourceClosedError):
        """A connection closed at scope end (it was still checked out) was used again."""

    ConnectionReclaimedError.__module__ = __name__
    ConnectionReclaimedError.__qualname__ = "ConnectionReclaimedError"
    return ConnectionReclaimedError


def __getattr__(name: str) -> Any:
    if name == "ConnectionReclaimedError":
        cls = _define_reclaimed_error()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
