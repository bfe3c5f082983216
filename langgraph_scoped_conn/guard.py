"""The read-only guard for SQL written by a language model.

The guard is the first of two walls.  It refuses, before anything reaches the
database, what a read-only transaction cannot stop by itself: several statements
in one call (``COMMIT; DROP ...`` would end the read-only transaction), statements
that change session or transaction state (``SET``, ``RESET``, ``BEGIN``,
``COMMIT``...), statements that are not queries, and oversized text.  The second
wall is the database: every guarded statement runs in a read-only transaction with
a statement timeout (see :mod:`langgraph_scoped_conn.sql_database`).
"""

from __future__ import annotations

import re

from langgraph_scoped_conn.errors import UnsafeQueryError

__all__ = ["check_read_only_sql", "split_statements"]

#: First keywords of statements that only read.  Data-modifying CTEs and
#: EXPLAIN ANALYZE of a write are caught by the read-only transaction.
_READ_KEYWORDS = frozenset({"select", "with", "values", "table", "explain", "show"})

_WORD = re.compile(r"[A-Za-z_]+")
#: A word as PostgreSQL's scanner reads it: "$" continues an identifier (a$$ is one word),
#: so it never starts a dollar quote there.  Numbers and $1 parameters are words too.
_TOKEN = re.compile(r"(?:[^\W\d]|_)[\w$]*|\d[\w.$]*|\$\d+", re.UNICODE)
_DOLLAR_TAG = re.compile(r"\$(?:[A-Za-z_][A-Za-z_0-9]*)?\$")


def split_statements(sql: str) -> list[str]:  # noqa: PLR0915 - one pass of a small lexer
    """Split ``sql`` on top-level semicolons, ignoring those in strings and comments.

    Follows PostgreSQL's scanner: single-quoted strings with ``''`` escapes,
    double-quoted identifiers, ``--`` comments (ended by a newline or a carriage
    return), nested ``/* */`` comments, ``$tag$`` dollar quoting, and identifiers
    that contain ``$``.  Returns the non-empty statements with comments removed.

    A backslash right before a quote inside a string is refused: ``E'\\''``, a type
    name ending in ``e`` (``name'\\'``) and ``standard_conforming_strings=off`` read
    it as an escaped quote, plain strings as the end of the string, so the statement
    boundaries would depend on context the guard cannot see.

    Raises:
        UnsafeQueryError: the text ends inside a string, identifier or comment, or
            holds a backslash-escaped quote.
    """
    out: list[str] = []
    buf: list[str] = []
    i, n = 0, len(sql)
    while i < n:
        ch = sql[i]
        nxt = sql[i + 1] if i + 1 < n else ""
        if ch == "-" and nxt == "-":
            while i < n and sql[i] not in "\r\n":
                i += 1
            buf.append(" ")
            continue
        if ch == "/" and nxt == "*":
            depth, i = 1, i + 2
            while i < n and depth:
                if sql.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif sql.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
            if depth:
                raise UnsafeQueryError("the query ends inside a /* comment */; close the comment")
            buf.append(" ")
            continue
        if ch in "'\"":
            j = i + 1
            while True:
                if j >= n:
                    kind = "string" if ch == "'" else "quoted identifier"
                    raise UnsafeQueryError(f"the query ends inside a {kind}; close the quote")
                if sql[j] == ch:
                    if ch == "'" and _odd_backslashes_before(sql, j, i + 1):
                        raise UnsafeQueryError(
                            "the query has a backslash before a quote inside a string (\\'), "
                            "which PostgreSQL reads differently in E'' strings and with "
                            "standard_conforming_strings=off; write a quote inside a string "
                            "as two quotes ('') instead"
                        )
                    if j + 1 < n and sql[j + 1] == ch:
                        j += 2
                        continue
                    break
                j += 1
            buf.append(sql[i : j + 1])
            i = j + 1
            continue
        if ch == "$":
            m = _DOLLAR_TAG.match(sql, i)
            if m:
                tag = m.group(0)
                end = sql.find(tag, i + len(tag))
                if end < 0:
                    raise UnsafeQueryError(f"the query ends inside a {tag} quoted string")
                buf.append(sql[i : end + len(tag)])
                i = end + len(tag)
                continue
        m = _TOKEN.match(sql, i)
        if m:
            buf.append(m.group(0))
            i = m.end()
            continue
        if ch == ";":
            stmt = "".join(buf).strip()
            if stmt:
                out.append(stmt)
            buf = []
            i += 1
            continue
        buf.append(ch)
        i += 1
    stmt = "".join(buf).strip()
    if stmt:
        out.append(stmt)
    return out


def _odd_backslashes_before(sql: str, j: int, start: int) -> bool:
    """True if an odd run of backslashes ends right before ``sql[j]`` (after ``start``)."""
    k = j
    while k > start and sql[k - 1] == "\\":
        k -= 1
    return (j - k) % 2 == 1


def check_read_only_sql(sql: str, *, max_length: int = 20_000) -> str:
    """Return the single statement in ``sql`` if the guard lets it through.

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
    statements = split_statements(sql)
    if not statements:
        raise UnsafeQueryError("the query is empty; send one SELECT statement")
    if len(statements) > 1:
        raise UnsafeQueryError(
            f"the query holds {len(statements)} statements; read-only mode runs exactly one "
            "statement per call, so send them one at a time"
        )
    statement = statements[0]
    m = _WORD.match(statement.lstrip("( \t\r\n"))
    keyword = m.group(0).lower() if m else ""
    if keyword not in _READ_KEYWORDS:
        shown = keyword.upper() or statement[:20]
        raise UnsafeQueryError(
            f"{shown} statements are refused in read-only mode; only "
            f"{', '.join(sorted(k.upper() for k in _READ_KEYWORDS))} queries may run"
        )
    return statement
