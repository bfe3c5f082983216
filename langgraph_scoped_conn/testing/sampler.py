"""Server-side counts of client backends, read from ``pg_stat_activity``.

:func:`count_backends` reads the count once; :class:`BackendSampler` reads it again and
again on a background thread while the code under test runs, so a test or a benchmark
can assert the peak the server saw rather than trust the package's own counters.
"""

from __future__ import annotations

import functools
import re
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["BackendSampler", "count_backends"]

#: The application_name of a sampler's own connection when it connects from a URL.
SAMPLER_APPLICATION_NAME = "lsc-backend-sampler"


def count_backends(
    conn: Any,
    *,
    database: str | None = None,
    user: str | None = None,
    application_name_like: str = "%",
    exclude_application_names: Iterable[str] = (),
) -> int:
    """Client backends in ``pg_stat_activity`` that match every filter given.

    The backend of ``conn`` itself is never counted.

    Args:
        conn: a DB-API connection (psycopg2 or psycopg 3) in autocommit mode; inside a
            transaction the server would answer from one statistics snapshot.
        database: only backends connected to this database.
        user: only backends logged in as this role.
        application_name_like: a LIKE pattern the backend's application_name must match.
        exclude_application_names: application names not to count.

    Returns:
        The count.
    """
    sql = (
        "select count(*) from pg_stat_activity where backend_type = 'client backend' "
        "and pid <> pg_backend_pid() and application_name like %s"
    )
    params: list[object] = [application_name_like]
    if database is not None:
        sql += " and datname = %s"
        params.append(database)
    if user is not None:
        sql += " and usename = %s"
        params.append(user)
    for name in exclude_application_names:
        sql += " and application_name <> %s"
        params.append(name)
    with conn.cursor() as cur:
        cur.execute(sql, params)
        return int(cur.fetchone()[0])


def _connect_url(url: str) -> Any:
    """A psycopg2 connection from a libpq or SQLAlchemy URL (``postgresql+driver://``)."""
    import psycopg2

    dsn = re.sub(r"^postgres(?:ql)?(?:\+\w+)?://", "postgresql://", url)
    return psycopg2.connect(dsn, application_name=SAMPLER_APPLICATION_NAME)


class BackendSampler:
    """Counts matching client backends on a background thread while its block runs.

    ``with sampler: ...`` samples until the block ends; ``samples`` then holds every
    count read, ``peak`` the largest and ``cpu_seconds`` the CPU time the sampling
    thread used.  Each block starts afresh, so one sampler can measure several blocks.

    The sampler's connection is opened when a block starts and closed when it ends,
    unless :meth:`open` opened it first: then it stays open for every block until
    :meth:`close` (so repeated blocks do not pay for a login).  Connect as a superuser
    to use one of the server's reserved slots instead of the code under test's.

    Args:
        connect: a URL (``postgresql://`` or SQLAlchemy's ``postgresql+driver://``,
            connected with psycopg2), or a callable returning a DB-API connection;
            the sampler switches it to autocommit.
        database, user, application_name_like, exclude_application_names: which
            backends to count, as in :func:`count_backends`.
        interval: seconds between two reads (0: read as fast as the server answers).

    Example:
        with BackendSampler(admin_url, database="app", user="app_role") as sampler:
            run_the_load()
        assert sampler.peak <= 5, sampler.samples
    """

    def __init__(
        self,
        connect: str | Callable[[], Any],
        *,
        database: str | None = None,
        user: str | None = None,
        application_name_like: str = "%",
        exclude_application_names: Iterable[str] = (),
        interval: float = 0.005,
    ) -> None:
        self._connect: Callable[[], Any] = (
            functools.partial(_connect_url, connect) if isinstance(connect, str) else connect
        )
        self._filters: dict[str, Any] = {
            "database": database,
            "user": user,
            "application_name_like": application_name_like,
            "exclude_application_names": tuple(exclude_application_names),
        }
        self.interval = interval
        self.samples: list[int] = []
        self.cpu_seconds = 0.0
        self._conn: Any = None
        self._close_after_block = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def peak(self) -> int:
        """The largest count read in the last block (0 before any)."""
        return max(self.samples, default=0)

    def open(self) -> BackendSampler:
        """Connect now and keep the connection for every block until :meth:`close`."""
        if self._conn is None:
            conn = self._connect()
            conn.autocommit = True
            self._conn = conn
        return self

    def close(self) -> None:
        """Close the sampler's connection (a running block is stopped first)."""
        self._stop_thread()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _run(self) -> None:
        start = time.thread_time()
        try:
            while not self._stop.is_set():
                self.samples.append(count_backends(self._conn, **self._filters))
                self._stop.wait(self.interval)
        except BaseException as exc:  # re-raised by __exit__, on the caller's thread
            self._error = exc
        finally:
            self.cpu_seconds = time.thread_time() - start

    def _stop_thread(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            thread.join(timeout=30)

    def __enter__(self) -> BackendSampler:
        if self._thread is not None:
            raise RuntimeError("this BackendSampler is already sampling")
        self._close_after_block = self._conn is None
        self.open()
        self.samples = []
        self.cpu_seconds = 0.0
        self._error = None
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="backend-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._stop_thread()
        if self._close_after_block:
            self.close()
        error, self._error = self._error, None
        if error is not None and exc_type is None:
            raise RuntimeError("the backend sampler's thread failed") from error
