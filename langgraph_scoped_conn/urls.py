"""Database URLs: parsing, the driver a bare ``postgresql://`` gets, and the pool strategy.

Pure code: nothing here opens a connection.  SQLAlchemy is imported inside the
functions that need it, so ``import langgraph_scoped_conn`` stays cheap.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Literal

from langgraph_scoped_conn.errors import ConfigurationError
from langgraph_scoped_conn.redaction import redact_url, safe_url

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

    from langgraph_scoped_conn.settings import Strategy

__all__ = [
    "ResolvedStrategy",
    "default_pg_driver",
    "looks_like_pooler",
    "parse_url",
    "pooler_reason",
    "resolve_strategy",
    "shown_url",
]

ResolvedStrategy = Literal["shared", "per_execution", "pooler"]

#: Ports and host suffixes of transaction-mode poolers (PgBouncer, Supabase Supavisor).
_POOLER_PORTS = {6432: "PgBouncer's port 6432", 6543: "Supavisor's transaction port 6543"}
_POOLER_HOST_SUFFIXES = (".pooler.supabase.com",)


def parse_url(url: str | URL) -> URL:
    """Parse ``url`` with SQLAlchemy, accepting Supabase/Heroku style ``postgres://``.

    Raises:
        ConfigurationError: with the password redacted, when the URL cannot be parsed.
    """
    from sqlalchemy.engine import URL, make_url
    from sqlalchemy.exc import ArgumentError

    if isinstance(url, URL):
        if url.drivername in ("postgresql", "postgres"):
            chosen = url.set(drivername=f"postgresql+{default_pg_driver()}")
            _remember_implicit(chosen)
            return _password_from_query(chosen)
        return _password_from_query(url)
    if not isinstance(url, str):
        raise ConfigurationError(
            f"database URL must be a string or a sqlalchemy URL, got {type(url).__name__}"
        )
    if url.startswith("postgres://"):
        url = "postgresql://" + url.removeprefix("postgres://")
    implicit = url.startswith("postgresql://")
    if implicit:  # SQLAlchemy would pick psycopg 3, which the core does not depend on
        url = f"postgresql+{default_pg_driver()}://" + url.removeprefix("postgresql://")
    if url.count("@") > 1 and not url.startswith("sqlite"):
        raise ConfigurationError(
            f"the database URL {redact_url(url)!r} has more than one '@', so part of the "
            "password would be read as the host; URL-encode the password, e.g. with "
            "urllib.parse.quote(password, safe='')"
        )
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:  # ValueError: a port that is not a number
        reason = "a port that is not a number" if not isinstance(exc, ArgumentError) else "syntax"
        raise ConfigurationError(
            f"could not parse database URL {redact_url(url)!r} ({reason}); expected a "
            "SQLAlchemy URL such as postgresql://user:password@host:5432/dbname or "
            "sqlite:///path/to/file.db"
        ) from None
    parsed = _password_from_query(parsed)
    if implicit:
        _remember_implicit(parsed)
    # Load the dialect now so a missing driver is reported here, naming the URL safely.
    try:
        parsed.get_dialect()
    except Exception as exc:
        raise ConfigurationError(
            f"no SQLAlchemy dialect/driver for {safe_url(parsed)!r} "
            f"({type(exc).__name__}: {redact_url(str(exc))}); install the driver or fix the scheme"
        ) from None
    return parsed


def default_pg_driver() -> str:
    """The driver a ``postgresql://`` URL without ``+driver`` gets.

    ``psycopg`` (3) when it is importable, else ``psycopg2`` (a core dependency).
    SQLAlchemy 2.1 alone would always pick psycopg 3 and fail without it.
    """
    try:
        found = importlib.util.find_spec("psycopg") is not None
    except (ImportError, ValueError):  # a broken or blocked module
        found = False
    return "psycopg" if found else "psycopg2"


#: renderings of parsed URLs whose driver parse_url chose (the URL had none); bounded
_IMPLICIT_DRIVER: set[str] = set()
_IMPLICIT_LIMIT = 1024


def _remember_implicit(url: URL) -> None:
    if len(_IMPLICIT_DRIVER) >= _IMPLICIT_LIMIT:
        _IMPLICIT_DRIVER.clear()
    _IMPLICIT_DRIVER.add(url.render_as_string(hide_password=False))


def shown_url(url: URL) -> str:
    """``url`` as :func:`safe_url`, with the scheme as the user wrote it.

    A driver that :func:`parse_url` chose for a bare ``postgresql://`` is left out
    (stats show it under ``driver``); an explicit ``+driver`` stays.
    """
    if url.render_as_string(hide_password=False) in _IMPLICIT_DRIVER:
        return safe_url(url.set(drivername=url.get_backend_name()))
    return safe_url(url)


def resolve_strategy(strategy: Strategy, url: URL) -> tuple[ResolvedStrategy, str]:
    """Turn ``"auto"`` into ``"pooler"`` for transaction poolers and ``"shared"`` otherwise.

    Returns:
        The strategy and why it was chosen (for stats, logs and the demo).

    Raises:
        ConfigurationError: ``strategy="pooler"`` with a database other than PostgreSQL.
    """
    if strategy == "pooler" and not url.get_backend_name().startswith("postgresql"):
        raise ConfigurationError(
            f"strategy='pooler' is for PostgreSQL behind PgBouncer or Supavisor; "
            f"{url.get_backend_name()!r} URLs need strategy='shared' (or 'auto')"
        )
    if strategy != "auto":
        return strategy, f"set: strategy={strategy!r}"
    reason = pooler_reason(url)
    if reason is not None:
        return "pooler", f"auto: {reason}"
    if url.get_backend_name().startswith("postgresql"):
        return "shared", "auto: a direct PostgreSQL URL (no pooler port, host or ?pgbouncer=true)"
    return "shared", f"auto: a {url.get_backend_name()} URL"


def pooler_reason(url: URL) -> str | None:
    """Why ``url`` looks like PgBouncer or Supabase Supavisor in transaction mode, or None.

    That is: ``?pgbouncer=true`` (Prisma's flag; removed before the driver sees the
    URL), port 6432 (PgBouncer) or 6543 (Supavisor transaction mode), or a host under
    ``.pooler.supabase.com`` (Supavisor's session port 5432 is detected too: the
    ``pooler`` strategy is safe in session mode as well, only less necessary).
    """
    if not url.get_backend_name().startswith("postgresql"):
        return None
    if str(url.query.get("pgbouncer", "")).lower() in {"1", "true", "yes"}:
        return "the URL has ?pgbouncer=true"
    if url.port in _POOLER_PORTS:
        return f"the URL's port is {_POOLER_PORTS[url.port]}"
    host = (url.host or "").lower()
    if host.endswith(_POOLER_HOST_SUFFIXES):
        return "the host is a Supabase pooler (*.pooler.supabase.com)"
    return None


def looks_like_pooler(url: URL) -> bool:
    """True when :func:`pooler_reason` finds a transaction pooler in ``url``."""
    return pooler_reason(url) is not None


def _password_from_query(url: URL) -> URL:
    """Move a PostgreSQL URL's ``?password=`` into its userinfo password.

    The driver gets the same password either way (SQLAlchemy passes the query as
    keyword arguments, and they win over the userinfo), but SQLAlchemy's own renderings
    (``str(url)``, ``repr(engine.url)``, ``render_as_string(hide_password=True)``) hide
    only the userinfo password.

    Raises:
        ConfigurationError: a ``password`` key in another case (libpq refuses it at
            connect time: option names are lowercase), or ``password`` given twice.
    """
    if not url.get_backend_name().startswith("postgresql"):
        return url
    keys = [k for k in url.query if k.lower() == "password"]
    if not keys:
        return url
    odd = [k for k in keys if k != "password"]
    if odd:
        raise ConfigurationError(
            f"the database URL {safe_url(url)!r} has the query parameter {odd[0]!r}, which is "
            "not a libpq option (option names are lowercase); put the URL-encoded password in "
            "user:password@host, or write ?password=..."
        )
    value = url.query["password"]
    if not isinstance(value, str):
        raise ConfigurationError(
            f"the database URL {safe_url(url)!r} gives password more than once in its query; "
            "give it once"
        )
    return url.difference_update_query(["password"]).set(password=value)
