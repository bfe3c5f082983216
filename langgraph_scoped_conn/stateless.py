"""Which write-mode statements provably leave no session state, so their owner change
needs no reset.

A write-mode ``SQLDatabase`` statement runs in autocommit mode, where no ``ROLLBACK``
undoes what it did to the session, so its connection is reset before another execution
gets it (one round trip, about a third of a new execution's first query).  A statement
skips that reset only when nothing in it can change the session:

* it is a lone ``SELECT``/``WITH``/``VALUES``/``TABLE``/``SHOW``/``EXPLAIN`` statement
  (a cheap first-keyword check: writes are never parsed) that ended without error;
* it passes the read-only guard (:func:`~langgraph_scoped_conn.guard.inspect_read_only_sql`
  with the database's catalog): no ``SELECT INTO``, no row locks, no data-modifying
  ``WITH``, one statement, nothing that watches other sessions;
* every function it names is a built-in that changes nothing
  (:meth:`~langgraph_scoped_conn.guard.FunctionCatalog.builtin`): a user function, even a
  stable one, may ``PERFORM set_config(..., false)``, which nothing undoes here;
* every relation it reads is a table, partitioned table, materialized view or sequence
  without row-level security, or a system one (``pg_catalog``, ``information_schema``),
  or a ``WITH`` query of its own: a view may call any function, and so may a policy;
* and the database has no user-written code (SQL or PL functions, or any volatile one)
  behind an operator, a cast or a domain's ``CHECK``, which a statement reaches without
  naming it.  Operators and casts of extensions (``pgvector``, PostGIS, ``citext``) are
  written in C and installed by a superuser, like the built-ins.

``EXPLAIN ANALYZE`` runs its query, so it gets the query's answer; plain ``EXPLAIN`` only
plans it.  Everything else (``SET``, ``LISTEN``, ``CREATE TEMP TABLE``, ``nextval()``,
``setseed()``, advisory locks, ``random()``, which advances the session's seeded
sequence, and any statement the guard refuses) leaves the connection marked, and it is
reset as before.  Nothing here ever stops a statement from running.

The catalog is read once per URL (by the first read-only query or the first candidate
write-mode statement) and kept until ``invalidate_schema_cache()``: a function, view or
policy created later that shadows a name the catalog saw as safe is not seen until then.
The answer for a statement is kept with the catalog, so one sent again is not parsed
again (the parse costs 20-100 µs; the reset it saves, a round trip).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from langgraph_scoped_conn.errors import UnsafeQueryError
from langgraph_scoped_conn.guard import FunctionCatalog, inspect_read_only_sql

__all__ = ["CATALOG_SQL", "DYNAMIC_SQL", "DatabaseCatalog", "leaves_no_state", "may_read_only"]

#: Functions that run SQL text of their own, which the guard cannot see into: a statement
#: that names one may leave session state (a prepared statement) behind.
DYNAMIC_SQL = re.compile(r"(?i)(?:query|cursor)_to_xml|dblink")
#: Answers kept per catalog for statements sent again (at most this many, this long): a
#: parse costs 20-100 us, a lookup well under one.
_MEMO_SIZE = 256
_MEMO_LENGTH = 4096
#: The first keyword of a statement that may only read; anything else is never parsed.
_READ_KEYWORD = re.compile(r"\s*(?:select|with|values|table|show|explain)\b", re.IGNORECASE)
#: A relation that runs no code of its own when read: y, or n for the others (views,
#: foreign tables, tables with row-level security, temporary ones).
_SAFE_RELATION = (
    "CASE WHEN n.nspname IN ('pg_catalog', 'information_schema') OR (c.relkind IN "
    "('r', 'p', 'm', 'S') AND NOT c.relrowsecurity AND c.relpersistence <> 't') "
    "THEN 'y' ELSE 'n' END"
)
#: Functions that may change something and run when a statement uses an operator, a cast
#: or a domain with a CHECK: volatile ones, and any outside pg_catalog not written in C.
_HIDDEN_CODE = (
    "SELECT count(*)::text FROM pg_catalog.pg_proc p "
    "WHERE (p.provolatile = 'v' OR (p.pronamespace <> 'pg_catalog'::regnamespace "
    "AND p.prolang NOT IN (SELECT oid FROM pg_catalog.pg_language "
    "WHERE lanname IN ('c', 'internal')))) "
    "AND (p.oid IN (SELECT oprcode::oid FROM pg_catalog.pg_operator "
    "UNION SELECT oprrest::oid FROM pg_catalog.pg_operator "
    "UNION SELECT oprjoin::oid FROM pg_catalog.pg_operator "
    "UNION SELECT castfunc FROM pg_catalog.pg_cast) "
    "OR p.oid IN (SELECT d.refobjid FROM pg_catalog.pg_depend d "
    "JOIN pg_catalog.pg_constraint k ON k.oid = d.objid "
    "WHERE d.classid = 'pg_catalog.pg_constraint'::regclass "
    "AND d.refclassid = 'pg_catalog.pg_proc'::regclass AND k.contypid <> 0))"
)
#: Reads the database's functions and their volatility for the guard, the relations and
#: whether each is safe to read (by name, over every schema), and the hidden code count.
CATALOG_SQL = (
    "SELECT 'f', n.nspname, p.proname, p.provolatile::text FROM pg_catalog.pg_proc p "
    "JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace "
    f"UNION ALL SELECT 'r', NULL, c.relname, min({_SAFE_RELATION}) "
    "FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
    "WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S') GROUP BY c.relname "
    f"UNION ALL SELECT 'h', NULL, NULL, ({_HIDDEN_CODE})"
)


class DatabaseCatalog(FunctionCatalog):
    """A :class:`FunctionCatalog` that also knows which relations are safe to read.

    Args:
        rows: :data:`CATALOG_SQL`'s rows, ``(kind, schema, name, value)``.
        allowed: see :class:`FunctionCatalog`.
    """

    def __init__(
        self, rows: Iterable[tuple[str, str | None, str | None, str]], allowed: Iterable[str] = ()
    ) -> None:
        functions: list[tuple[str, str, str]] = []
        #: relation name -> every relation of that name is safe to read
        self.relations: dict[str, bool] = {}
        #: functions behind operators, casts and domain checks that may change something
        self.hidden_code = 0
        #: (statement, max_length) -> leaves_no_state's answer with this catalog
        self.memo: dict[tuple[str, int], bool] = {}
        for kind, schema, name, value in rows:
            if kind == "f" and schema is not None and name is not None:
                functions.append((schema, name, value))
            elif kind == "r" and name is not None:
                self.relations[name] = value == "y"
            elif kind == "h":
                self.hidden_code = int(value)
        super().__init__(functions, allowed)


def may_read_only(command: str) -> bool:
    """True if ``command`` starts like a statement that only reads (no parse, ~0.3 µs)."""
    return _READ_KEYWORD.match(command) is not None


def leaves_no_state(command: str, catalog: DatabaseCatalog, max_length: int) -> bool:
    """True if ``command``, run on its own, provably leaves no session state (see above)."""
    if catalog.hidden_code or not may_read_only(command):
        return False
    key = (command, max_length)
    clean = catalog.memo.get(key)
    if clean is None:
        clean = _leaves_no_state(command, catalog, max_length)
        if len(command) <= _MEMO_LENGTH:
            if len(catalog.memo) >= _MEMO_SIZE:
                catalog.memo.clear()
            catalog.memo[key] = clean
    return clean


def _leaves_no_state(command: str, catalog: DatabaseCatalog, max_length: int) -> bool:
    if DYNAMIC_SQL.search(command):
        return False
    try:
        checked = inspect_read_only_sql(command, max_length=max_length, functions=catalog)
    except UnsafeQueryError:
        return False  # refused by the guard: not provably clean, never refused to run
    ctes = {name for kind, _, name in checked.names if kind == "cte"}
    for kind, schema, name in checked.names:
        if kind == "function" and not catalog.builtin(schema, name):
            return False
        if kind == "relation":
            safe = catalog.relations.get(name)
            if not safe and (safe is not None or schema is not None or name not in ctes):
                return False  # not safe, or neither a known relation nor a WITH query
    return True
