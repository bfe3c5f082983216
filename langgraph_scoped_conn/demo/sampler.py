"""Server backends over time, read from ``pg_stat_activity`` on a background thread.

The sampler holds one connection of its own (``application_name`` ``lsc-demo-sampler``,
opened before the runs start so a full server cannot refuse it) and every
``interval`` seconds counts the client backends of its database per
``application_name``.  The demo names each mode's connections differently, so one
sampler measures both, from the server's side.
"""

from __future__ import annotations

import threading
import time
from typing import Any

__all__ = ["SAMPLER_APPLICATION", "BackendSampler", "Sample"]

SAMPLER_APPLICATION = "lsc-demo-sampler"

#: (seconds on the ``time.monotonic`` clock, client backends per application_name)
Sample = tuple[float, dict[str, int]]

_COUNT = (
    "select application_name, count(*) from pg_stat_activity "
    "where datname = current_database() and backend_type = 'client backend' "
    "and pid <> pg_backend_pid() group by application_name"
)


class BackendSampler:
    """Counts a database's client backends per application_name, every ``interval`` seconds.

    Use as ``with BackendSampler(url) as sampler: ...``.  Entering connects (errors
    are raised there); leaving stops the thread and closes the connection.

    Args:
        database_url: a SQLAlchemy PostgreSQL URL of the database to watch; its user
            must see the demo's backends (the same user, or a superuser).
        interval: seconds between samples.
    """

    def __init__(self, database_url: str, *, interval: float = 0.01) -> None:
        self.database_url = database_url
        self.interval = interval
        self.samples: list[Sample] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._engine: Any = None
        self.error: BaseException | None = None

    def __enter__(self) -> BackendSampler:
        from sqlalchemy import create_engine
        from sqlalchemy.pool import NullPool

        from langgraph_scoped_conn.urls import parse_url

        url = parse_url(self.database_url)
        self._engine = create_engine(
            url,
            poolclass=NullPool,
            isolation_level="AUTOCOMMIT",  # each sample a transaction: a fresh snapshot
            connect_args={"application_name": SAMPLER_APPLICATION},
        )
        connection = self._engine.connect()
        try:
            self._sample(connection)
        except BaseException:
            connection.close()
            self._engine.dispose()
            raise
        self._thread = threading.Thread(
            target=self._run, args=(connection,), name="lsc-demo-sampler", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._engine is not None:
            self._engine.dispose()

    def _run(self, connection: Any) -> None:
        try:
            while not self._stop.wait(self.interval):
                self._sample(connection)
        except Exception as exc:  # a server gone away ends the chart, not the demo
            self.error = exc
        finally:
            connection.close()

    def _sample(self, connection: Any) -> None:
        rows = connection.exec_driver_sql(_COUNT).all()
        sample = (time.monotonic(), {str(app or ""): int(n) for app, n in rows})
        with self._lock:
            self.samples.append(sample)

    def between(self, start: float, end: float) -> list[Sample]:
        """The samples taken from ``start`` to ``end`` (``time.monotonic`` seconds)."""
        with self._lock:
            return [s for s in self.samples if start <= s[0] <= end]

    def latest(self, application: str) -> int:
        """The last count of ``application``'s backends (0 before the first sample)."""
        with self._lock:
            return self.samples[-1][1].get(application, 0) if self.samples else 0

    def wait_until_gone(self, application: str, timeout: float = 10.0) -> bool:
        """Wait until no backend of ``application`` is left; False after ``timeout``."""
        asked = time.monotonic()
        while time.monotonic() < asked + timeout:
            time.sleep(self.interval)
            with self._lock:
                last = self.samples[-1] if self.samples else None
            if last is not None and last[0] > asked and last[1].get(application, 0) == 0:
                return True
        return False
