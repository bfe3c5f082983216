"""Options of a connection manager: validation, defaults, URL handling and redaction.

Pure code: nothing here opens a connection.  Heavy imports (SQLAlchemy) happen
inside the functions that need them.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import logging
import math
import os
import re
import sys
import types
import typing
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal, get_args, get_origin
from urllib.parse import unquote_plus

from langgraph_scoped_conn.errors import ConfigurationError

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

__all__ = [
    "ENV_PREFIX",
    "STRATEGIES",
    "ScopedConnSettings",
    "Strategy",
    "options_with_env",
    "redact_url",
    "safe_url",
    "shown_url",
]

logger = logging.getLogger("langgraph_scoped_conn")

Strategy = Literal["auto", "shared", "per_execution", "pooler"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)

#: Ports and host suffixes of transaction-mode poolers (PgBouncer, Supabase Supavisor).
_POOLER_PORTS = frozenset({6432, 6543})
_POOLER_HOST_SUFFIXES = (".pooler.supabase.com",)

# The scheme is optional: "//user:pw@host" (a mistyped scheme) is redacted too.  The
# password runs to the last "@" of its line: a password with an un-encoded "@" or space is
# hidden whole, not cut at its first "@" (which would show the rest).
_USERINFO = re.compile(r"(?:[a-zA-Z][\w+.-]*:)?//[^:/@\s]*:(?P<pw>[^\n]*)@")
#: a URL with no scheme at all, ``user:pw@host/db`` (a mistyped URL in an error message)
_BARE_USERINFO = re.compile(r"(?<![\w/:@%.+-])[\w.%+-]+:(?P<pw>[^\s:/@][^\n]*)@")
#: ``key=value`` (keyword DSN, query string) or ``"key": value`` (dict, JSON); the key may
#: be quoted or percent-encoded
_PAIR = re.compile(r"(?<![\w%.+-])(?P<q>['\"]?)(?P<key>[\w%.+-]+)(?P=q)[ \t]*(?P<sep>[=:])[ \t]*")
#: keys whose value is a secret, searched in the percent-decoded, lower-cased key:
#: ``password``, ``PASSWORD``, ``sslpassword``, ``db_passwd``, ``client_secret``, and
#: ``pass``, ``pwd`` or ``token`` as a whole word (``access_token``, not ``max_tokens``)
_SECRET_KEY = re.compile(
    r"password|passwd|passphrase|secret|(?<![a-z0-9])(?:pass|pwd|token)(?![a-z0-9])"
)
#: a text that is one URL or one keyword DSN (nothing else): values may hold spaces then
_WHOLE = re.compile(r"\s*(?:(?:[a-zA-Z][\w+.-]*:)?//|[\w.-]+\s*=)")
# a doubled quote does not end the value either (in doubt, hide more)
_QUOTED = {
    q: re.compile(rf"{q}(?:[^{q}\\\n]|\\.|{q}{q})*(?:(?P<close>{q})|(?=\n)|\Z)") for q in "'\""
}
#: where an unquoted value ends, by (in a query string?, the whole text is one URL/DSN?).
#: In a query string a value runs to the next ``&name=``, so a raw "&" does not end it.
_VALUE = {
    (True, False): re.compile(r"(?:[^\s&]|&(?![\w%.+-]+=))*"),
    (True, True): re.compile(r"(?:[^\n&]|&(?![\w%.+-]+=))*"),
    (False, False): re.compile(r"\S*"),
    (False, True): re.compile(r"(?:\S|[ \t]++(?![\w%.+-]+[ \t]*=))*"),
}


def redact_url(text: str) -> str:
    """Replace every password in ``text`` with ``***``; the one redaction of the package.

    Hides the password of URL userinfo (``//user:***@host``), the value of any secret
    query parameter or keyword, in any case, percent-encoded or not, wherever it stands
    (``?password=``, ``&PassWord=``, ``?%70assword=``, ``sslpassword=``), of libpq keyword
    DSNs (``password=***``, ``password = '***'``) and of dict or JSON renderings
    (``'password': '***'``).  Works on text that is not a valid URL too, so it is safe
    for error messages.  When ``text`` is one URL or DSN and nothing else, a value may
    hold spaces: it runs to the next parameter (``&name=`` or `` name=``).  In doubt it
    hides more, never less: overlapping secrets are hidden as one.
    """
    whole = "\n" not in text and _WHOLE.match(text) is not None
    spans = [m.span("pw") for m in _USERINFO.finditer(text)]
    spans += [m.span("pw") for m in _BARE_USERINFO.finditer(text)]
    for m in _PAIR.finditer(text):
        if m["sep"] == ":" and not m["q"]:
            continue  # "user:pw" or "scheme:": only a quoted key takes a colon
        if not _SECRET_KEY.search(unquote_plus(m["key"]).lower()):
            continue
        start = m.end()
        in_query = m.start() > 0 and text[m.start() - 1] in "?&"
        quote = text[start : start + 1]
        if quote in _QUOTED and not in_query:
            found = _QUOTED[quote].match(text, start)
            assert found is not None  # the pattern matches any text from a quote
            closed = found["close"] is not None
            spans.append((start + 1, found.end() - 1 if closed else found.end()))
        else:
            found = _VALUE[in_query, whole].match(text, start)
            assert found is not None  # the patterns match the empty string
            spans.append((start, len(found.group().rstrip(" \t")) + start))
    out, pos = [], 0
    for begin, end in _merge(spans):
        out += [text[pos:begin], "***"]
        pos = end
    out.append(text[pos:])
    return "".join(out)


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for begin, end in sorted(s for s in spans if s[1] > s[0]):
        if merged and begin <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((begin, end))
    return merged


def safe_url(url: URL) -> str:
    """``url`` as text to show: no password, no secret query parameter.

    ``render_as_string(hide_password=True)`` hides only the userinfo password; a
    ``?password=`` or ``?sslpassword=`` in the query would still show.  Use this
    wherever a parsed URL is logged, shown in stats or in a repr.
    """
    return redact_url(url.render_as_string(hide_password=True))


@dataclasses.dataclass(frozen=True, slots=True)
class ScopedConnSettings:
    """Validated options of an :class:`~langgraph_scoped_conn.ExecutionConnectionManager`.

    See the README's configuration table for the meaning of each field.
    """

    database_url: str | None = None
    strategy: Strategy = "auto"
    max_connections: int = 10
    max_connections_per_execution: int = 5
    pool_timeout: float = 20.0
    pool_recycle: int = 1800
    pool_pre_ping: bool = True
    max_scope_lifetime: float | None = 3600.0
    read_only: bool = False
    statement_timeout: float | None = 30.0
    max_query_length: int = 20_000
    application_name: str = "langgraph_scoped_conn"
    tag_connections: bool = False
    cache_reflection: bool = True
    warm_schema: bool = False
    debug: bool = False
    engine_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        url: object = self.database_url
        if url is not None and not isinstance(url, str):
            from sqlalchemy.engine import URL

            if not isinstance(url, URL):
                raise ConfigurationError(
                    f"database_url must be a string or a sqlalchemy URL, got {type(url).__name__}"
                )
            # str(URL) hides the password, so keep the full rendering
            object.__setattr__(self, "database_url", url.render_as_string(hide_password=False))
        if self.strategy not in STRATEGIES:
            raise ConfigurationError(
                f"strategy={self.strategy!r} is not known; use one of {', '.join(STRATEGIES)}"
            )
        _positive_int("max_connections", self.max_connections)
        _positive_int("max_connections_per_execution", self.max_connections_per_execution)
        _positive_int("max_query_length", self.max_query_length)
        _positive_int("pool_recycle", self.pool_recycle, allow=(-1,))
        if not _is_seconds(self.pool_timeout):
            raise ConfigurationError(
                f"pool_timeout={self.pool_timeout!r} must be a finite number of seconds above 0"
            )
        for name in ("max_scope_lifetime", "statement_timeout"):
            value = getattr(self, name)
            if value is not None and not _is_seconds(value):
                raise ConfigurationError(
                    f"{name}={value!r} must be a finite number of seconds above 0, "
                    "or None to disable"
                )
        if not isinstance(self.application_name, str) or len(self.application_name) > 40:
            raise ConfigurationError(
                "application_name must be a string of at most 40 characters "
                "(PostgreSQL truncates it at 63 bytes and the package appends the execution id)"
            )
        if not isinstance(self.engine_options, Mapping):
            raise ConfigurationError(
                "engine_options must be a dict of create_engine() keyword arguments, got "
                f"{type(self.engine_options).__name__}"
            )
        bad = {"poolclass", "pool_size", "max_overflow", "pool"} & set(self.engine_options)
        if bad:
            raise ConfigurationError(
                f"engine_options may not set {', '.join(sorted(bad))}: the package sizes the pool "
                "from max_connections; set max_connections instead"
            )

    def __repr__(self) -> str:
        # the dataclass repr would show the URL's password and the engine options' values
        fields = ", ".join(f"{k}={v!r}" for k, v in self.public_dict().items())
        return f"ScopedConnSettings({fields})"

    @classmethod
    def from_options(cls, database_url: str | None = None, **options: Any) -> ScopedConnSettings:
        """Build settings from keyword options, naming any option that is not known."""
        known = {f.name for f in dataclasses.fields(cls)} - {"database_url"}
        unknown = set(options) - known
        if unknown:
            raise ConfigurationError(
                f"unknown option(s) {', '.join(sorted(unknown))}; "
                f"known options are {', '.join(sorted(known))}"
            )
        return cls(database_url=database_url, **options)

    def replace(self, **changes: Any) -> ScopedConnSettings:
        """Return a copy with ``changes`` applied and validated."""
        return dataclasses.replace(self, **changes)

    def resolve_url(self, override: str | URL | None = None) -> str | URL:
        """Return the URL to use: ``override``, else the configured one, else ``DATABASE_URL``.

        A ``sqlalchemy.engine.URL`` override is returned as is (``str()`` of it would
        hide the password).

        Raises:
            ConfigurationError: when none of the three is set.
        """
        if override is not None and not isinstance(override, str):
            return override
        url = override or self.database_url or os.environ.get("DATABASE_URL")
        if not url:
            raise ConfigurationError(
                "no database URL: pass database_url=..., call "
                "langgraph_scoped_conn.configure(database_url=...), or set DATABASE_URL"
            )
        return url

    def public_dict(self) -> dict[str, Any]:
        """The settings as a JSON-safe dict with every password redacted."""
        out = dataclasses.asdict(self)
        out["database_url"] = redact_url(self.database_url) if self.database_url else None
        out["engine_options"] = sorted(self.engine_options)
        return out


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


def resolve_strategy(strategy: Strategy, url: URL) -> Literal["shared", "per_execution", "pooler"]:
    """Turn ``"auto"`` into ``"pooler"`` for transaction poolers and ``"shared"`` otherwise.

    Raises:
        ConfigurationError: ``strategy="pooler"`` with a database other than PostgreSQL.
    """
    if strategy == "pooler" and not url.get_backend_name().startswith("postgresql"):
        raise ConfigurationError(
            f"strategy='pooler' is for PostgreSQL behind PgBouncer or Supavisor; "
            f"{url.get_backend_name()!r} URLs need strategy='shared' (or 'auto')"
        )
    if strategy != "auto":
        return strategy
    return "pooler" if looks_like_pooler(url) else "shared"


def looks_like_pooler(url: URL) -> bool:
    """True when ``url`` points at PgBouncer or Supabase Supavisor in transaction mode.

    That is: ``?pgbouncer=true`` (Prisma's flag; removed before the driver sees the
    URL), port 6432 (PgBouncer) or 6543 (Supavisor transaction mode), or a host under
    ``.pooler.supabase.com`` (Supavisor's session port 5432 is detected too: the
    ``pooler`` strategy is safe in session mode as well, only less necessary).
    """
    if not url.get_backend_name().startswith("postgresql"):
        return False
    if str(url.query.get("pgbouncer", "")).lower() in {"1", "true", "yes"}:
        return True
    host = (url.host or "").lower()
    return url.port in _POOLER_PORTS or host.endswith(_POOLER_HOST_SUFFIXES)


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


# -- options from the environment ---------------------------------------------------------

#: ``SCOPED_CONN_<OPTION>`` sets an option of :func:`~langgraph_scoped_conn.configure`
ENV_PREFIX = "SCOPED_CONN_"
#: variables under the prefix that belong to other modules, not to the settings
_OTHER_ENV = frozenset({"SCOPED_CONN_DEBUG_TOKEN"})
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def options_with_env(
    database_url: str | None, options: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> tuple[str | None, dict[str, Any]]:
    """Fill in the options the caller did not pass from ``SCOPED_CONN_<OPTION>`` variables.

    Each value is parsed by the option's type (``none`` turns an optional one off;
    ``engine_options`` is JSON); blank values are ignored.  Explicit arguments win.  A
    variable under the prefix that is a near miss of an option's name is logged as a
    WARNING; other unknown ones (``SCOPED_CONN_DEBUG_TOKEN``, the HTTP module's) are
    left alone.

    Raises:
        ConfigurationError: naming the variable and what it expects.
    """
    env = os.environ if environ is None else environ
    hints = typing.get_type_hints(ScopedConnSettings)
    merged = dict(options)
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX) or name in _OTHER_ENV:
            continue
        option, raw = name.removeprefix(ENV_PREFIX).lower(), env[name]
        if option not in hints:
            close = difflib.get_close_matches(option, list(hints), n=1, cutoff=0.8)
            if close:
                logger.warning(
                    "%s is not an option and is ignored; did you mean %s%s?",
                    name,
                    ENV_PREFIX,
                    close[0].upper(),
                )
            continue
        if not raw.strip() or option in merged:
            continue
        if option == "database_url":
            database_url = database_url or raw.strip()
            continue
        value = _parse_env(name, raw.strip(), hints[option])
        try:
            ScopedConnSettings(**{option: value})
        except ConfigurationError as exc:
            raise ConfigurationError(redact_url(f"{name}={raw!r}: {exc}")) from None
        merged[option] = value
    return database_url, merged


def _parse_env(name: str, text: str, hint: Any) -> Any:
    args = get_args(hint)
    optional = get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args
    if optional:
        if text.lower() in ("none", "null"):
            return None
        hint = next(a for a in args if a is not type(None))
    expected: str
    if get_origin(hint) is Literal:
        if text in get_args(hint):
            return text
        expected = f"one of {', '.join(get_args(hint))}"
    elif hint is bool:
        if text.lower() in _TRUE | _FALSE:
            return text.lower() in _TRUE
        expected = "true or false (also 1/0, yes/no, on/off)"
    elif hint is int:
        try:
            return int(text)
        except ValueError:
            expected = "a whole number"
    elif hint is float:
        try:
            return float(text)
        except ValueError:
            expected = "a number of seconds"
    elif hint is str:
        return text
    else:  # engine_options
        try:
            value = json.loads(text)
        except ValueError:
            value = None
        if isinstance(value, dict):
            return value
        expected = 'a JSON object of create_engine() arguments, e.g. {"echo": true}'
    if optional:
        expected += ", or none to disable"
    raise ConfigurationError(redact_url(f"{name}={text!r} must be {expected}"))


def call_site(skip: str = __name__.rpartition(".")[0]) -> str:
    """``file:line`` of the innermost caller outside the package, for messages."""
    frame = sys._getframe(1)
    while frame.f_back is not None and frame.f_globals.get("__name__", "").startswith(skip):
        frame = frame.f_back
    return f"{frame.f_code.co_filename}:{frame.f_lineno}"


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_seconds(value: object) -> bool:
    return _is_number(value) and math.isfinite(value) and value > 0  # type: ignore[arg-type,operator]


def _positive_int(name: str, value: object, allow: tuple[int, ...] = ()) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or (value < 1 and value not in allow):
        raise ConfigurationError(f"{name}={value!r} must be a whole number of at least 1")
