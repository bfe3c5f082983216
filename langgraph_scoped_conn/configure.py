"""The process-default manager: configure(), aconfigure() and get_connection_manager().

One :class:`~langgraph_scoped_conn.ExecutionConnectionManager` serves the whole process
unless code names another.  :func:`configure` replaces it, closing the old one on the
calling thread; :func:`aconfigure` closes the old one in a worker thread.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from langgraph_scoped_conn.manager import ExecutionConnectionManager
from langgraph_scoped_conn.settings import call_site, options_with_env

__all__ = ["aconfigure", "configure", "get_connection_manager", "swap_default_manager"]

logger = logging.getLogger("langgraph_scoped_conn")

_default_lock = threading.Lock()
_default_manager: ExecutionConnectionManager | None = None
_default_site = ""  # where the default was installed, for the replace warning


def get_connection_manager() -> ExecutionConnectionManager:
    """The process-default manager, created on first use from ``SCOPED_CONN_*`` variables."""
    global _default_manager, _default_site  # noqa: PLW0603
    manager = _default_manager
    if manager is not None:  # the hot path: every callback event looks it up
        return manager
    with _default_lock:
        if _default_manager is None:
            url, options = options_with_env(None, {})
            _default_manager = ExecutionConnectionManager(url, **options)
            _default_site = f"first use at {call_site()}"
        return _default_manager


def swap_default_manager(
    manager: ExecutionConnectionManager | None, *, _site: str | None = None
) -> ExecutionConnectionManager | None:
    """Install ``manager`` as the process default without closing the old one; return the old.

    For tests and app factories that manage the managers' lives themselves.
    """
    global _default_manager, _default_site
    with _default_lock:
        old, _default_manager = _default_manager, manager
        old_site, _default_site = _default_site, _site or call_site()
    live = old.active_executions() if old is not None and _site is not None else []
    if live:
        msg = "configure() at %s replaces the manager installed by %s while executions are open"
        logger.warning(
            msg + " (%s): they are released now. Configure once, at startup",
            *(_site, old_site, ", ".join(live[:5])),
        )
    return old


def configure(database_url: str | None = None, **options: Any) -> ExecutionConnectionManager:
    """Replace the process-default manager, closing the old one, and return the new one.

    ``database_url`` falls back to ``SCOPED_CONN_DATABASE_URL``, then ``DATABASE_URL``;
    options not passed (see the docs) to ``SCOPED_CONN_<OPTION>``, then the defaults.
    The old manager is closed on the calling thread (live executions released, with a
    WARNING naming both call sites); from async code use :func:`aconfigure`.

    Raises:
        ConfigurationError: an option is unknown or out of range, or the URL is invalid.
            The old manager is kept in that case.
    """
    url, options = options_with_env(database_url, options)
    new = ExecutionConnectionManager(url, **options)
    old = swap_default_manager(new, _site=call_site())
    if old is not None:
        old.close()
    return new


async def aconfigure(database_url: str | None = None, **options: Any) -> ExecutionConnectionManager:
    """Async twin of :func:`configure`: the old manager is closed in a worker thread."""
    url, options = options_with_env(database_url, options)
    new = ExecutionConnectionManager(url, **options)
    old = swap_default_manager(new, _site=call_site())
    if old is not None:
        await old.aclose()
    return new
