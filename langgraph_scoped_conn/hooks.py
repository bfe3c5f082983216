"""Functions the LangGraph and SQLDatabase layers install into the manager below them.

The manager may not import the layers above it (``tests/test_structure.py``), yet two
of its jobs need them: naming the graph node that took a leaked connection, and
reflecting a schema ahead of the first run (``warm_schema=True``).  Those layers
install the functions here when they are imported; :mod:`langgraph_scoped_conn.lookup`,
which installs both, is imported with the package.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from langgraph_scoped_conn.manager import ExecutionConnectionManager

__all__ = [
    "attribute",
    "schema_warmer",
    "set_attribution_provider",
    "set_schema_warmer",
]

#: Names the graph node / tool running in the current context, for leak reports; it is
#: given the manager, which knows the names of the tool runs it has seen.
AttributionProvider = Callable[["ExecutionConnectionManager"], "str | None"]
#: Reflects the manager's configured URL into its schema cache (blocking I/O; it runs on
#: a release thread and logs its own failure).
SchemaWarmer = Callable[["ExecutionConnectionManager"], None]

_attribution_provider: AttributionProvider | None = None
_schema_warmer: SchemaWarmer | None = None


def set_attribution_provider(provider: AttributionProvider | None) -> None:
    """Install the function that names the running node (set by the LangGraph layer)."""
    global _attribution_provider  # noqa: PLW0603
    _attribution_provider = provider


def attribute(manager: ExecutionConnectionManager) -> str | None:
    """The graph node (and tool) running in this context, for leak reports."""
    provider = _attribution_provider
    return provider(manager) if provider is not None else None


def set_schema_warmer(warmer: SchemaWarmer | None) -> None:
    """Install the function that reflects a manager's schema ahead of use."""
    global _schema_warmer  # noqa: PLW0603
    _schema_warmer = warmer


def schema_warmer() -> SchemaWarmer | None:
    """The installed schema warmer, if any."""
    return _schema_warmer
