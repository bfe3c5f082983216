"""Options of a connection manager: validation, defaults and ``SCOPED_CONN_*`` variables.

Pure code: nothing here opens a connection or imports SQLAlchemy (but to turn a
``sqlalchemy.engine.URL`` given as ``database_url`` into text).  URLs are parsed in
:mod:`langgraph_scoped_conn.urls`; passwords are hidden by
:mod:`langgraph_scoped_conn.redaction`.
"""

from __future__ import annotations

import dataclasses
import difflib
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

from langgraph_scoped_conn.errors import ConfigurationError
from langgraph_scoped_conn.redaction import redact_url

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

__all__ = [
    "ENV_PREFIX",
    "STRATEGIES",
    "ScopedConnSettings",
    "Strategy",
    "call_site",
    "options_with_env",
]

logger = logging.getLogger("langgraph_scoped_conn")

Strategy = Literal["auto", "shared", "per_execution", "pooler"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)

#: Upper bounds: a value above one is a mistake (a unit slip), refused at configure().
#: PostgreSQL's statement_timeout is a 32-bit number of milliseconds.
_MAX_STATEMENT_TIMEOUT = 2_147_483.0
_MAX_POOL_TIMEOUT = 86_400.0  # a day
_MAX_SCOPE_LIFETIME = 30 * 86_400.0
_MAX_RECYCLE = 365 * 86_400
_MAX_CONNECTIONS = 10_000
_MAX_QUERY_LENGTH = 1_000_000
_MAX_RESULT_ROWS = 10_000_000
_MAX_RESULT_BYTES = 1 << 30
#: create_engine() arguments the package sets itself from checked settings
_OWN_ENGINE_OPTIONS = {
    "poolclass": "max_connections",
    "pool_size": "max_connections",
    "max_overflow": "max_connections",
    "pool": "max_connections",
    "pool_timeout": "pool_timeout",
    "pool_recycle": "pool_recycle",
    "pool_pre_ping": "pool_pre_ping",
}


@dataclasses.dataclass(frozen=True, slots=True)
class ScopedConnSettings:
    """Validated options of an :class:`~langgraph_scoped_conn.ExecutionConnectionManager`.

    See the configuration reference in the docs for the meaning of each field.
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
    max_result_rows: int = 1000
    max_result_bytes: int = 262_144
    allow_functions: tuple[str, ...] = ()
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
        _whole("max_connections", self.max_connections, _MAX_CONNECTIONS)
        _whole(
            "max_connections_per_execution", self.max_connections_per_execution, _MAX_CONNECTIONS
        )
        _whole("max_query_length", self.max_query_length, _MAX_QUERY_LENGTH)
        _whole("max_result_rows", self.max_result_rows, _MAX_RESULT_ROWS)
        _whole("max_result_bytes", self.max_result_bytes, _MAX_RESULT_BYTES)
        _whole("pool_recycle", self.pool_recycle, _MAX_RECYCLE, allow=(-1,))
        _seconds("pool_timeout", self.pool_timeout, _MAX_POOL_TIMEOUT, optional=False)
        _seconds("max_scope_lifetime", self.max_scope_lifetime, _MAX_SCOPE_LIFETIME)
        _seconds("statement_timeout", self.statement_timeout, _MAX_STATEMENT_TIMEOUT)
        if not isinstance(self.application_name, str) or len(self.application_name) > 40:
            raise ConfigurationError(
                "application_name must be a string of at most 40 characters "
                "(PostgreSQL truncates it at 63 bytes and the package appends the execution id)"
            )
        functions: object = self.allow_functions
        if isinstance(functions, str) or not isinstance(functions, tuple | list | frozenset | set):
            raise ConfigurationError(
                "allow_functions must be a list of function names such as "
                f"['my_schema.safe_fn', 'gen_random_uuid'], got {functions!r}"
            )
        names = tuple(sorted({str(n).strip().lower() for n in functions if str(n).strip()}))
        bad = [n for n in names if not _FUNCTION_NAME(n)]
        if bad:
            raise ConfigurationError(
                f"allow_functions: {bad[0]!r} is not a function name; give names such as "
                "'gen_random_uuid' or 'my_schema.my_function', without arguments"
            )
        object.__setattr__(self, "allow_functions", names)
        if not isinstance(self.engine_options, Mapping):
            raise ConfigurationError(
                "engine_options must be a dict of create_engine() keyword arguments, got "
                f"{type(self.engine_options).__name__}"
            )
        own = sorted(set(self.engine_options) & set(_OWN_ENGINE_OPTIONS))
        if "pool_reset_on_return" in self.engine_options and self.strategy != "per_execution":
            own.append("pool_reset_on_return")
        if own:
            instead = sorted({_OWN_ENGINE_OPTIONS.get(k, "strategy='per_execution'") for k in own})
            raise ConfigurationError(
                f"engine_options may not set {', '.join(own)}: the package sets it from its own "
                f"checked settings (the budget pool and session reset depend on them); set "
                f"{', '.join(instead)} instead"
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
    elif get_origin(hint) is tuple:  # allow_functions: comma-separated names
        return tuple(part.strip() for part in text.split(",") if part.strip())
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


#: ``name`` or ``schema.name``: the form allow_functions takes
_FUNCTION_NAME = re.compile(r"(?:[a-z_][a-z0-9_$]*\.)?[a-z_][a-z0-9_$]*").fullmatch


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _seconds(name: str, value: object, limit: float, *, optional: bool = True) -> None:
    if value is None and optional:
        return
    if not _is_number(value) or not math.isfinite(value) or not 0 < value <= limit:  # type: ignore[arg-type,operator]
        also = ", or None to disable" if optional else ""
        raise ConfigurationError(
            f"{name}={value!r} must be a number of seconds above 0 and at most {limit:g}{also}"
        )


def _whole(name: str, value: object, limit: int, allow: tuple[int, ...] = ()) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigurationError(f"{name}={value!r} must be a whole number")
    if value in allow:
        return
    if not 1 <= value <= limit:
        raise ConfigurationError(
            f"{name}={value!r} must be a whole number of at least 1 and at most {limit}"
        )
