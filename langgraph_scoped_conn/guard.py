"""The read-only guard for SQL written by a language model.

The guard is the first of two walls.  It refuses, before anything reaches the
database, what a read-only transaction cannot stop by itself: several statements
in one call (``COMMIT; DROP ...`` would end the read-only transaction), statements
that change session or transaction state (``SET``, ``RESET``, ``BEGIN``,
``COMMIT``, ``PREPARE``, ``LISTEN``...), statements that are not queries, and
oversized text.  The second wall is the database: every guarded statement runs in a
read-only transaction with a statement timeout that is rolled back (see
:mod:`langgraph_scoped_conn.sql_database`).

On PostgreSQL the text is parsed by PostgreSQL's own parser (libpg_query, through
pglast), so statement boundaries, dollar quotes, comments and identifiers are read
exactly as the server reads them: an earlier hand-written lexer took ``€$a$`` for a
dollar quote where PostgreSQL reads one identifier, and let ``COMMIT; DELETE`` through.
The whole parse tree is walked; only one plain query is accepted.

A read-only transaction does not stop a query from reaching other sessions or the
server: any role may signal and watch sessions of its own role, take advisory locks,
write WAL messages, send notifications or read files it is granted.  So every function
a query calls must be one the server marks immutable or stable (``pg_proc.provolatile``,
read once per database by the SQLDatabase adapter), or one of a few harmless volatile
ones (:data:`HARMLESS_VOLATILE`, such as ``random()``), or one the user allowed; and
none of the functions and relations that expose other sessions or run SQL text the
guard cannot see (:data:`SESSION_FUNCTIONS`, :data:`SESSION_RELATIONS`) is named.

SQLite has no such parser here; a small lexer reads its text the way SQLite's
tokenizer does, and ``PRAGMA query_only`` is the second wall.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Iterator
from typing import Any

from langgraph_scoped_conn.errors import UnsafeQueryError

__all__ = [
    "HARMLESS_VOLATILE",
    "SESSION_FUNCTIONS",
    "SESSION_RELATIONS",
    "CheckedQuery",
    "FunctionCatalog",
    "check_read_only_sql",
    "inspect_read_only_sql",
    "split_sqlite_statements",
]

#: Volatile functions that read nothing outside the query and change nothing.
HARMLESS_VOLATILE = frozenset(
    {
        "random",
        "random_normal",
        "clock_timestamp",
        "timeofday",
        "gen_random_uuid",
        "pg_sleep",  # it holds a slot, no more than a slow query does (statement_timeout)
        "pg_sleep_for",
        "pg_sleep_until",
        "uuidv4",
        "uuidv7",
        "uuid_generate_v1",
        "uuid_generate_v1mc",
        "uuid_generate_v4",
    }
)
#: Of those, the ones that advance the session's random sequence, which a reset re-seeds.
_SEEDED = frozenset({"random", "random_normal"})
#: Functions refused whatever their volatility: they watch other sessions (most are
#: marked stable), or run SQL text or read a relation by a name the guard cannot see.
SESSION_FUNCTIONS = frozenset(
    {
        "pg_stat_get_activity",
        "pg_stat_get_progress_info",
        "pg_stat_get_wal_senders",
        "pg_stat_get_wal_receiver",
        "pg_stat_get_subscription",
        "pg_stat_get_subscription_stats",
        "pg_blocking_pids",
        "pg_safe_snapshot_blocking_pids",
        "pg_isolation_test_session_is_blocked",
        "pg_lock_status",
        "pg_prepared_xact",
        "pg_stat_statements",
        "pg_stat_statements_info",
        "query_to_xml",
        "query_to_xmlschema",
        "query_to_xml_and_xmlschema",
        "cursor_to_xml",
        "cursor_to_xmlschema",
        "table_to_xml",
        "table_to_xmlschema",
        "table_to_xml_and_xmlschema",
        "schema_to_xml",
        "schema_to_xmlschema",
        "schema_to_xml_and_xmlschema",
        "database_to_xml",
        "database_to_xmlschema",
        "database_to_xml_and_xmlschema",
        "ts_stat",
        "ts_rewrite",
    }
)
_SESSION_PREFIXES = ("pg_stat_get_backend_", "dblink")
#: Views and tables refused by name: other sessions' state and SQL, files, large objects.
SESSION_RELATIONS = frozenset(
    {
        "pg_stat_activity",
        "pg_locks",
        "pg_stat_ssl",
        "pg_stat_gssapi",
        "pg_stat_replication",
        "pg_stat_replication_slots",
        "pg_replication_slots",
        "pg_stat_wal_receiver",
        "pg_stat_subscription",
        "pg_prepared_xacts",
        "pg_stat_statements",
        "pg_stat_statements_info",
        "pg_largeobject",
        "pg_largeobject_metadata",
        "pg_file_settings",
        "pg_hba_file_rules",
        "pg_ident_file_mappings",
        "pg_authid",
        "pg_shadow",
    }
)
_SESSION_RELATION_PREFIXES = ("pg_stat_progress_",)
#: provolatile codes, worst last
_VOLATILITY_ORDER = {"i": 0, "s": 1, "v": 2}
_NAMES = {"i": "immutable", "s": "stable", "v": "volatile"}


def _worse(volatility: str, than: str | None) -> bool:
    return than is None or _VOLATILITY_ORDER[volatility] > _VOLATILITY_ORDER[than]


@dataclasses.dataclass(frozen=True, slots=True)
class CheckedQuery:
    """A statement the guard let through.

    Attributes:
        text: the statement as written, without a trailing ``;`` or outer comments.
        cursor: True for a query a cursor can run (``DECLARE ... FOR``), so its rows
            can be fetched a few at a time; False for ``EXPLAIN`` and ``SHOW``.
        names: ``(kind, schema, name)`` of each function called (``"function"``),
            relation read (``"relation"``) and ``WITH`` query (``"cte"``) it names.
    """

    text: str
    cursor: bool
    names: tuple[tuple[str, str | None, str], ...] = ()


class FunctionCatalog:
    """Which functions a database has, and how volatile each is (from ``pg_proc``).

    Built from ``(schema, name, provolatile)`` rows; a name with several overloads
    counts as its most volatile one, an unqualified name as its most volatile in any
    schema.

    Args:
        rows: ``pg_proc`` joined with ``pg_namespace``.
        allowed: names allowed whatever they are, lower case: ``fn`` (in any schema) or
            ``schema.fn`` (called so, or unqualified when every ``fn`` is allowed).
    """

    def __init__(self, rows: Iterable[tuple[str, str, str]], allowed: Iterable[str] = ()) -> None:
        self._any: dict[str, str] = {}
        self._qualified: dict[tuple[str, str], str] = {}
        self._schemas: dict[str, set[str]] = {}
        for schema, name, volatility in rows:
            self._schemas.setdefault(name, set()).add(schema)
            if _worse(volatility, self._any.get(name)):
                self._any[name] = volatility
            if _worse(volatility, self._qualified.get((schema, name))):
                self._qualified[schema, name] = volatility
        self.allowed = frozenset(allowed)

    def refusal(self, schema: str | None, name: str) -> str | None:
        """Why a call of ``schema.name`` (``name`` when unqualified) is refused, or None."""
        shown = f"{schema}.{name}" if schema else name
        if name in self.allowed or shown in self.allowed:
            return None
        schemas = self._schemas.get(name, ())
        if not schema and schemas and all(f"{s}.{name}" in self.allowed for s in schemas):
            return None  # unqualified, and every function of that name is allowed
        if name in SESSION_FUNCTIONS or name.startswith(_SESSION_PREFIXES):
            return (
                f"{shown}() reaches other sessions, or runs SQL the guard cannot see, "
                "and is refused in read-only mode"
            )
        volatility = self._qualified.get((schema, name)) if schema else self._any.get(name)
        if volatility is None:
            return (
                f"{shown}() is not a function the read-only guard knows (it was not in the "
                "database's catalog when the guard read it); check the name, or, if it was "
                "created since, call invalidate_schema_cache()"
            )
        if volatility == "v" and name not in HARMLESS_VOLATILE:
            return (
                f"{shown}() is volatile (it may change or reach state outside the query) and "
                "is refused in read-only mode; only immutable and stable functions may run, "
                "plus those listed in allow_functions"
            )
        return None

    def builtin(self, schema: str | None, name: str) -> bool:
        """True if a call of ``schema.name`` (``name`` unqualified) can only reach built-in
        functions that leave no session state: every function of that name lives in
        ``pg_catalog`` (or the call names it), is immutable or stable or harmless
        volatile (but ``random()``: its sequence is the session's), and none is allowed
        by ``allow_functions`` (a user function may ``set_config()`` even when stable).
        """
        if schema not in (None, "pg_catalog"):
            return False
        if any(entry.rpartition(".")[2] == name for entry in self.allowed):
            return False  # named in allow_functions, in whichever schema
        if schema is None and self._schemas.get(name) != {"pg_catalog"}:
            return False  # unknown, or also in another schema that may come first
        volatility = self._qualified.get(("pg_catalog", name))
        if volatility == "v":
            return name in HARMLESS_VOLATILE and name not in _SEEDED
        return volatility is not None

    def volatility(self, name: str) -> str | None:
        """``immutable``, ``stable`` or ``volatile`` for an unqualified name, if known."""
        code = self._any.get(name)
        return _NAMES.get(code) if code else None


_SEND_ONE = "send one SELECT statement"
#: What PostgreSQL's scanner reads as white space (not U+00A0, part of an identifier).
_PG_SPACE = " \t\n\r\f\v"

#: Statement types that are never queries, named by the keyword a model would recognise.
_WRITE_NODES = {
    "InsertStmt": "INSERT",
    "UpdateStmt": "UPDATE",
    "DeleteStmt": "DELETE",
    "MergeStmt": "MERGE",
}
#: What EXPLAIN can wrap besides a query, for the refusal message.
_EXPLAINED = {
    **_WRITE_NODES,
    "CreateTableAsStmt": "CREATE TABLE AS",
    "DeclareCursorStmt": "DECLARE",
    "ExecuteStmt": "EXECUTE",
}


def check_read_only_sql(
    sql: str,
    *,
    max_length: int = 20_000,
    dialect: str = "postgresql",
    functions: FunctionCatalog | None = None,
) -> str:
    """Return the single statement in ``sql`` if the guard lets it through.

    See :func:`inspect_read_only_sql`, which also says whether a cursor can run it.
    """
    return inspect_read_only_sql(
        sql, max_length=max_length, dialect=dialect, functions=functions
    ).text


def inspect_read_only_sql(
    sql: str,
    *,
    max_length: int = 20_000,
    dialect: str = "postgresql",
    functions: FunctionCatalog | None = None,
) -> CheckedQuery:
    """Check ``sql`` with the read-only guard and return what it let through.

    On PostgreSQL (the default ``dialect``) the statement must be one plain query:
    ``SELECT`` (also ``VALUES``, ``TABLE name`` and ``WITH`` of plain queries),
    ``EXPLAIN`` of such a query, or ``SHOW``.  Anywhere in its parse tree there may
    be no ``INSERT``/``UPDATE``/``DELETE``/``MERGE`` (data-modifying ``WITH``), no
    ``SELECT ... INTO`` and no ``FOR UPDATE``/``FOR SHARE`` row locks, no relation of
    :data:`SESSION_RELATIONS`, and, with ``functions``, no call that the catalog
    refuses (:meth:`FunctionCatalog.refusal`).  The returned text is the statement as
    written, from its first token to its last, without a trailing ``;`` or surrounding
    comments.

    With ``dialect="sqlite"`` the statement must start with ``SELECT``, ``WITH``,
    ``VALUES`` or ``EXPLAIN``; ``PRAGMA query_only`` refuses writes.

    Raises:
        UnsafeQueryError: naming what was refused and what to send instead.
    """
    if not isinstance(sql, str):
        raise UnsafeQueryError(f"the query must be a string of SQL, got {type(sql).__name__}")
    if len(sql) > max_length:
        raise UnsafeQueryError(
            f"the query is {len(sql)} characters long, above the limit of {max_length} "
            "(max_query_length); send a shorter query"
        )
    if "\x00" in sql:
        raise UnsafeQueryError("the query contains a NUL character; remove it")
    if dialect == "postgresql":
        return _check_postgresql(sql, functions)
    if dialect == "sqlite":
        return CheckedQuery(_check_sqlite(sql), cursor=False)
    raise UnsafeQueryError(
        f"read-only mode cannot check {dialect} SQL; only postgresql and sqlite are supported"
    )


# -- PostgreSQL ------------------------------------------------------------------------


def _check_postgresql(sql: str, functions: FunctionCatalog | None) -> CheckedQuery:
    # parse_sql_json is libpg_query's own output, 20-50x cheaper than building pglast's
    # Python AST; the tokens are only needed for backslashes, comments and messages
    from pglast.parser import ParseError, parse_sql_json, scan

    try:
        parsed = parse_sql_json(sql)
        tree = json.loads(parsed)
        tokens = scan(sql) if ("\\" in sql or "--" in sql or "/*" in sql) else None
    except ParseError as exc:
        raise UnsafeQueryError(f"the query is not valid SQL: {exc.args[0]}; {_SEND_ONE}") from exc
    except RecursionError as exc:  # pragma: no cover - libpg_query refuses deep nesting first
        raise UnsafeQueryError(f"the query is nested too deeply; {_SEND_ONE}") from exc
    if tokens is not None:
        _refuse_backslash_quotes(sql, tokens)
    statements = tree.get("stmts", [])
    if not statements:
        raise UnsafeQueryError(f"the query is empty; {_SEND_ONE}")
    if len(statements) > 1:
        raise UnsafeQueryError(
            f"the query holds {len(statements)} statements; read-only mode runs exactly one "
            "statement per call, so send them one at a time"
        )
    raw = statements[0]
    ((name, fields),) = raw["stmt"].items()
    if name == "ExplainStmt":
        explained = next(iter(fields["query"]))
        if explained != "SelectStmt":
            raise UnsafeQueryError(
                f"EXPLAIN {_EXPLAINED.get(explained, explained)} is refused in read-only mode "
                "(EXPLAIN ANALYZE would run it); EXPLAIN only a SELECT query"
            )
    elif name not in ("SelectStmt", "VariableShowStmt"):
        raise UnsafeQueryError(
            f"{_statement_name(name, sql, tokens if tokens is not None else scan(sql))} "
            "statements are refused in read-only mode; "
            "only SELECT, WITH, VALUES, TABLE, EXPLAIN and SHOW queries may run"
        )
    _refuse_nodes(parsed)
    names = _refuse_names(raw, functions)
    cursor = name == "SelectStmt"
    if tokens is not None:
        code = [t for t in tokens if t.name not in ("SQL_COMMENT", "C_COMMENT", "ASCII_59")]
        return CheckedQuery(sql[code[0].start : code[-1].end + 1], cursor, names)
    # no comment in the text: the statement runs from its location (a byte offset) to
    # its length, or to the end; the rest is PostgreSQL's whitespace and a ";"
    data = sql.encode()
    begin = raw.get("stmt_location", 0)
    length = raw.get("stmt_len", 0)
    text = data[begin : begin + length] if length else data[begin:]
    statement = text.decode().strip(_PG_SPACE).rstrip(";").rstrip(_PG_SPACE)
    return CheckedQuery(statement, cursor, names)


def _refuse_names(
    tree: Any, functions: FunctionCatalog | None
) -> tuple[tuple[str, str | None, str], ...]:
    """Refuse relations that expose other sessions, then calls the catalog refuses.

    Each kind in the order written, so a refusal names the first offender.  Returns
    every name seen (see :attr:`CheckedQuery.names`).
    """
    named = sorted(_named(tree), key=lambda n: (n[0] != "relation", n[3]))
    for kind, schema, name, _ in named:
        if kind == "cte":
            continue
        if kind == "relation":
            if name in SESSION_RELATIONS or name.startswith(_SESSION_RELATION_PREFIXES):
                raise UnsafeQueryError(
                    f"the query reads {name}, which shows other sessions, server files or "
                    "large objects, and is refused in read-only mode; query your own tables"
                )
        elif functions is not None:
            reason = functions.refusal(schema, name)
            if reason is not None:
                raise UnsafeQueryError(reason)
        elif name in SESSION_FUNCTIONS or name.startswith(_SESSION_PREFIXES):
            raise UnsafeQueryError(FunctionCatalog(()).refusal(schema, name) or name)
    return tuple((kind, schema, name) for kind, schema, name, _ in named)


def _named(tree: Any) -> Iterator[tuple[str, str | None, str, int]]:
    """``("function" | "relation" | "cte", schema, name, location)`` of each call,
    relation and ``WITH`` query."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            call = node.get("FuncCall")
            if isinstance(call, dict):
                parts = [p["String"]["sval"] for p in call.get("funcname", ()) if "String" in p]
                if parts:
                    schema = parts[-2] if len(parts) > 1 else None
                    yield "function", schema, parts[-1], call.get("location", 0)
            relation = node.get("RangeVar")
            if isinstance(relation, dict) and "relname" in relation:
                location = relation.get("location", 0)
                yield "relation", relation.get("schemaname"), relation["relname"], location
            cte = node.get("CommonTableExpr")
            if isinstance(cte, dict) and "ctename" in cte:
                yield "cte", None, cte["ctename"], cte.get("location", 0)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def _statement_name(name: str, sql: str, tokens: Any) -> str:
    """The keyword a model would use for node ``name``: DELETE for a WITH ... DELETE too."""
    if name in _WRITE_NODES:
        return _WRITE_NODES[name]
    for token in tokens:
        if token.name not in ("SQL_COMMENT", "C_COMMENT", "ASCII_40"):  # comments and "("
            return sql[token.start : token.end + 1].upper()
    return name  # pragma: no cover - a statement always has a first keyword


#: A node or field name in libpg_query's JSON: a key, so a quote follows it directly;
#: inside a string value every quote is escaped, so string constants never match.
_NODE_KEY = re.compile(r'"([A-Za-z]+Stmt|intoClause|lockingClause)":')


def _refuse_nodes(parsed: str) -> None:
    """Refuse writes, SELECT INTO and row locks anywhere in the parse tree (its JSON text)."""
    for match in _NODE_KEY.finditer(parsed):
        _check_node(match.group(1))


def _check_node(name: str) -> None:
    if name in _WRITE_NODES:
        raise UnsafeQueryError(
            f"the query holds a data-modifying {_WRITE_NODES[name]} (in a WITH clause "
            "or subquery), which read-only mode refuses; send a SELECT that only reads"
        )
    if name == "intoClause":  # only SelectStmt has one
        raise UnsafeQueryError(
            "SELECT ... INTO creates a table and is refused in read-only mode; "
            "send the SELECT without INTO"
        )
    if name == "lockingClause":
        raise UnsafeQueryError(
            "the query locks rows (FOR UPDATE / FOR NO KEY UPDATE / FOR SHARE / "
            "FOR KEY SHARE), which read-only mode refuses; send the SELECT "
            "without the FOR ... clause"
        )
    if name not in ("SelectStmt", "RawStmt", "ExplainStmt", "VariableShowStmt"):
        raise UnsafeQueryError(  # pragma: no cover - the grammar nests only queries
            f"the query holds a {name} statement, which read-only mode refuses; {_SEND_ONE}"
        )


def _refuse_backslash_quotes(sql: str, tokens: Any) -> None:
    """Refuse a backslash right before a quote in a '...' or E'...' string constant.

    pglast reads plain strings as ``standard_conforming_strings=on`` does; a server (or
    database, or role) where an admin set it off reads ``'a\\'`` as an escaped quote, so
    the string and the statement would end elsewhere than the guard saw.  E'' strings
    are refused the same way, so one rule covers both.  Dollar quotes are literal.
    """
    for token in tokens:
        if token.name != "SCONST":
            continue
        text = sql[token.start : token.end + 1]
        if text[:1] not in ("'", "E", "e"):
            continue  # $tag$...$tag$
        body = text[text.index("'") + 1 :]
        for i, ch in enumerate(body):
            if ch == "'" and _odd_backslashes_before(body, i, 0):
                raise UnsafeQueryError(
                    "the query has a backslash before a quote inside a string (\\'), "
                    "which PostgreSQL reads differently in E'' strings and with "
                    "standard_conforming_strings=off; write a quote inside a string "
                    "as two quotes ('') instead"
                )


def _odd_backslashes_before(text: str, j: int, start: int) -> bool:
    """True if an odd run of backslashes ends right before ``text[j]`` (after ``start``)."""
    k = j
    while k > start and text[k - 1] == "\\":
        k -= 1
    return (j - k) % 2 == 1


# -- SQLite ----------------------------------------------------------------------------

#: First keywords of SQLite statements that only read (EXPLAIN only lists bytecode).
_SQLITE_READ_KEYWORDS = ("EXPLAIN", "SELECT", "VALUES", "WITH")

#: SQLite's IdChar: ASCII letters, digits, "_", "$" and every byte >= 0x80 (so every
#: non-ASCII character of the UTF-8 text).  "$" also starts a $name parameter.
_SQLITE_WORD = re.compile(r"[A-Za-z0-9_$\u0080-\U0010ffff]+")


def split_sqlite_statements(sql: str) -> list[str]:
    """Split SQLite ``sql`` on top-level semicolons, as SQLite's tokenizer reads it.

    Strings ``'...'`` and identifiers ``"..."`` and ```...``` with doubled-quote
    escapes, ``[...]`` identifiers (no escapes), ``--`` comments to the end of the
    line, ``/* */`` comments (not nested), and words of letters, digits, ``_``,
    ``$`` and non-ASCII characters.  SQLite has no dollar quoting and no backslash
    escapes.  Returns the non-empty statements with comments removed.

    Raises:
        UnsafeQueryError: the text ends inside a string, identifier or comment.
    """
    out: list[str] = []
    buf: list[str] = []
    i, n = 0, len(sql)
    while i < n:
        ch = sql[i]
        if sql.startswith("--", i):
            end = sql.find("\n", i)
            i = n if end < 0 else end
            buf.append(" ")
        elif sql.startswith("/*", i):
            end = sql.find("*/", i + 2)
            if end < 0:
                raise UnsafeQueryError("the query ends inside a /* comment */; close the comment")
            i = end + 2
            buf.append(" ")
        elif ch in "'\"`[":
            close = "]" if ch == "[" else ch
            j = i + 1
            while True:
                j = sql.find(close, j)
                if j < 0:
                    kind = "string" if ch == "'" else "quoted identifier"
                    raise UnsafeQueryError(f"the query ends inside a {kind}; close the quote")
                if close != "]" and sql.startswith(close * 2, j):
                    j += 2
                    continue
                break
            buf.append(sql[i : j + 1])
            i = j + 1
        elif ch == ";":
            stmt = "".join(buf).strip()
            if stmt:
                out.append(stmt)
            buf = []
            i += 1
        else:
            m = _SQLITE_WORD.match(sql, i)
            end = m.end() if m else i + 1
            buf.append(sql[i:end])
            i = end
    stmt = "".join(buf).strip()
    if stmt:
        out.append(stmt)
    return out


def _check_sqlite(sql: str) -> str:
    statements = split_sqlite_statements(sql)
    if not statements:
        raise UnsafeQueryError(f"the query is empty; {_SEND_ONE}")
    if len(statements) > 1:
        raise UnsafeQueryError(
            f"the query holds {len(statements)} statements; read-only mode runs exactly one "
            "statement per call, so send them one at a time"
        )
    statement = statements[0]
    m = _SQLITE_WORD.match(statement.lstrip("( \t\r\n\f"))
    keyword = m.group(0).upper() if m else ""
    if keyword not in _SQLITE_READ_KEYWORDS:
        shown = keyword or statement[:20]
        raise UnsafeQueryError(
            f"{shown} statements are refused in read-only mode; only "
            f"{', '.join(_SQLITE_READ_KEYWORDS)} queries may run"
        )
    return statement
