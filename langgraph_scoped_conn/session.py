"""Session hygiene of pooled PostgreSQL connections: what a connection is doing, its reset,
its pre-ping and its ``application_name``.

Everything here works on one DBAPI (driver) connection and knows psycopg2, psycopg 3
and sqlite3; none of it knows executions or pools.
"""

from __future__ import annotations

import logging
import os
import select
import struct
import time
from collections.abc import Callable
from typing import Any

from langgraph_scoped_conn.checkout import Activity
from langgraph_scoped_conn.compat import (
    forget_dbapi_connection,
    forget_prepared_statements,
    statement_lock,
)

__all__ = [
    "RESET_SQL",
    "activity",
    "behind_a_pooler",
    "close_and_wait",
    "close_unused",
    "has_input",
    "reset_session",
    "set_application_name",
]

logger = logging.getLogger("langgraph_scoped_conn")

#: What ``DISCARD ALL`` does, statement by statement (PostgreSQL's documentation lists it
#: so), sent as one simple query: one round trip.  Unlike ``DISCARD ALL`` it may share a
#: message with another statement, and it ends by drawing a new random seed, so a
#: ``setseed()`` of the previous owner does not survive either (``DISCARD ALL`` keeps it).
RESET_SQL = (
    "RESET ALL; CLOSE ALL; SET SESSION AUTHORIZATION DEFAULT; RESET ALL; DEALLOCATE ALL; "
    "UNLISTEN *; SELECT pg_advisory_unlock_all(); DISCARD PLANS; DISCARD TEMP; "
    "DISCARD SEQUENCES"
)

#: libpq's PQtransactionStatus values, shared by psycopg2 and psycopg 3
_TRANS_IDLE, _TRANS_ACTIVE, _TRANS_INTRANS, _TRANS_INERROR = 0, 1, 2, 3


def activity(driver_connection: Any) -> Activity:
    """What a connection is doing right now, read from the driver without I/O.

    ``active``: a statement is in flight (psycopg 3 holds its connection lock,
    libpq says ``ACTIVE``).  ``transaction``: a transaction is open between statements.
    ``idle``: neither.  ``gone``: closed or broken.  Safe to call from any thread.
    """
    if driver_connection is None or getattr(driver_connection, "closed", False):
        return "gone"
    lock = statement_lock(driver_connection)
    if lock is not None and lock.locked():
        return "active"
    info = getattr(driver_connection, "info", None)
    status = getattr(info, "transaction_status", None)  # psycopg 3
    if status is None:
        get_status = getattr(driver_connection, "get_transaction_status", None)  # psycopg2
        if get_status is not None:
            try:
                status = get_status()
            except Exception:
                return "gone"
    if status is not None:
        status = int(status)
        if status == _TRANS_IDLE:
            return "idle"
        if status == _TRANS_ACTIVE:
            return "active"
        if status in (_TRANS_INTRANS, _TRANS_INERROR):
            return "transaction"
        return "gone"
    in_transaction = getattr(driver_connection, "in_transaction", None)  # sqlite3
    if in_transaction is True:
        return "transaction"
    return "idle"


def close_unused(
    fairy: Any,
    connection: Any,
    *,
    grace: float,
    abandon: Callable[[Callable[[], None]], bool] | None = None,
) -> bool:
    """Close a checked-out connection nobody uses, and return its slot to the pool.

    Never under a running statement: psycopg 3's statement lock is held while closing,
    so no statement can start meanwhile; a connection that started one after all (a
    thread came back to it) gets it cancelled, and is closed once it ends within
    ``grace`` seconds, else left to its thread (False).  psycopg2 has no such lock, and
    its ``close()`` waits for a running statement; that one is cancelled first.

    Args:
        fairy: the pool's checked-out connection.
        connection: the SQLAlchemy Connection over it, if any: invalidating that one
            makes it refuse to reconnect (``ConnectionReclaimedError``) when used again.
        abandon: given when the thread that checked it out is alive and is not this
            one: it may be inside SQLAlchemy's check-in of this very connection, so
            SQLAlchemy's objects are left to it and the pool abandons the record
            (``BudgetPool.abandon``, called with the driver's ``close``).  If that
            thread is returning it already, nothing is closed: it comes back as any
            returned connection does.

    Returns:
        True if the connection was closed.
    """
    driver = fairy.driver_connection
    lock = statement_lock(driver)
    if lock is not None and not lock.acquire(blocking=False):
        _cancel_quietly(driver)
        if not lock.acquire(timeout=grace):
            return False
    elif lock is None and activity(driver) == "active":
        _cancel_quietly(driver)
    try:
        if abandon is not None:
            if abandon(lambda: close_and_wait(driver)) and connection is not None:
                forget_dbapi_connection(connection)  # its next use raises, never reconnects
            return True
        close_and_wait(driver)  # the server's backend is gone before the slot is free
        if connection is not None and not connection.closed and not connection.invalidated:
            connection.invalidate()
        elif fairy.is_valid:
            fairy.invalidate()  # closes the DBAPI connection and returns the slot
    finally:
        if lock is not None:
            lock.release()
    return True


#: Seconds :func:`close_and_wait` waits for the server to end a closed connection's backend
BACKEND_EXIT_WAIT = 5.0


def close_and_wait(driver_connection: Any, timeout: float = BACKEND_EXIT_WAIT) -> None:
    """Close a driver connection, and return once the server has ended its backend.

    The server closes its end of the socket last thing as the backend exits, after it
    gave back its connection slot and left ``pg_stat_activity``; a duplicate of the
    socket sees that as end of file.  So a budget slot freed after this never lets the
    server count one backend more than the budget.  Without a socket (SQLite), or past
    ``timeout``, it just returns.
    """
    try:
        copy = os.dup(driver_connection.fileno())
    except Exception:
        copy = None
    try:
        driver_connection.close()
    except Exception as exc:
        logger.debug("could not close a connection: %s", type(exc).__name__)
    if copy is None:
        return
    try:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([copy], [], [], left)
            if ready and not os.read(copy, 65536):
                return  # end of file: the backend has exited
    except OSError:
        return  # reset by the peer: gone as well
    finally:
        os.close(copy)


def behind_a_pooler(dbapi_connection: Any) -> bool:
    """True if a new connection answers through a transaction pooler (one query).

    A pooler (PgBouncer, Supavisor) hands the client a made-up backend key: the pid the
    driver got at login is not the pid the server reports.  False when unsure.
    """
    driver = getattr(dbapi_connection, "driver_connection", dbapi_connection)
    info = getattr(driver, "info", None)
    login_pid = getattr(info, "backend_pid", None)  # psycopg 3
    if login_pid is None and hasattr(driver, "get_backend_pid"):
        login_pid = driver.get_backend_pid()  # psycopg2
    if login_pid is None:
        return False
    try:
        cursor = driver.cursor()
        try:
            cursor.execute("SELECT pg_backend_pid()")
            server_pid = cursor.fetchone()[0]
        finally:
            cursor.close()
        driver.rollback()
    except Exception as exc:  # the caller's own query will report a broken connection
        logger.debug("could not check for a pooler: %s", type(exc).__name__)
        return False
    return bool(login_pid != server_pid)


def _cancel_quietly(driver_connection: Any) -> None:
    try:
        driver_connection.cancel()
    except Exception as exc:
        logger.debug("could not cancel a statement: %s", type(exc).__name__)


def reset_session(driver_connection: Any) -> bool:
    """Reset every piece of session state (one round trip); False if the session is broken.

    Runs :data:`RESET_SQL` and a new random seed in autocommit, never as a prepared
    statement, then makes psycopg 3 forget the statements it had prepared (the reset
    deallocated them on the server).
    """
    seed = struct.unpack("<q", os.urandom(8))[0] / 2**63  # in [-1, 1)
    sql = f"{RESET_SQL}; SELECT setseed({seed!r})"
    try:
        autocommit = driver_connection.autocommit
        driver_connection.autocommit = True
        try:
            cursor = driver_connection.cursor()
            try:
                if hasattr(driver_connection, "prepare_threshold"):  # psycopg 3
                    cursor.execute(sql, prepare=False)
                else:
                    cursor.execute(sql)
            finally:
                cursor.close()
        finally:
            driver_connection.autocommit = autocommit
        forget_prepared_statements(driver_connection)
    except Exception as exc:
        logger.debug("could not reset a session: %s", type(exc).__name__)
        return False
    return True


def has_input(driver_connection: Any) -> bool:
    """True if an idle connection's socket can be read (or cannot be checked).

    An idle PostgreSQL connection is sent nothing unless the server is ending it (a
    restart, ``pg_terminate_backend``, ``idle_session_timeout``): a readable socket means
    the connection is gone, found with a ``poll()`` and no round trip.
    """
    try:
        fd = driver_connection.fileno()
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            return bool(poller.poll(0))
        return bool(select.select([fd], [], [], 0)[0])
    except Exception:
        return True  # ping rather than hand out a connection nobody checked


def set_application_name(driver_connection: Any, name: str) -> bool:
    """Set and commit application_name, so a later rollback keeps it (2 round trips).

    Returns:
        True if it was set.
    """
    try:
        cursor = driver_connection.cursor()
        try:
            cursor.execute("select set_config('application_name', %s, false)", (name,))
        finally:
            cursor.close()
        driver_connection.commit()
    except Exception as exc:  # a broken connection fails the caller's own query instead
        logger.debug("could not set application_name: %s", type(exc).__name__)
        return False
    return True
