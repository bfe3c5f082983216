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


def split_statements(sql: str) -> list[str]:  # noqa: PLR0915 - one pass of a small lexer
    """Split ``sql`` on top-level semicolons, ignoring those in strings and comments.

    Understands single-quoted strings (with ``''`` escapes and ``E''`` backslashes),
    double-quoted identifiers, ``--`` and nested ``/* */`` comments, and
    ``$tag$`` dollar quoting.  Returns the non-empty statements with comments removed.

    Raises:
        UnsafeQueryError: the text ends inside a string, identifier or comment.
    """
    out: list[str] = []
    buf: list[str] = []
    i, n = 0, len(sql)
    while i < n:
        ch = sql[i]
        nxt = sql[i + 1] if i + 1 < n else ""
        if ch == "-" and nxt == "-":
            end = sql.find("\n", i)
            i = n if end < 0 else end
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
            escaped = ch == "'" and i > 0 and sql[i - 1] in "eE"
            j = i + 1
            while True:
                if j >= n:
                    kind = "string" if ch == "'" else "quoted identifier"
                    raise UnsafeQueryError(f"the query ends inside a {kind}; close the quote")
                if escaped and sql[j] == "\\":
                    j += 2
                    continue
                if sql[j] == ch:
                    if j + 1 < n and sql[j + 1] == ch:
                        j += 2
                        continue
                    break
                j += 1
            buf.append(sql[i : j + 1])
            i = j + 1
            continue
        if ch == "$":
            m = re.match(r"\$([A-Za-z_][A-Za-z_0-9]*)?\$", sql[i:])
            if m and not (i > 0 and (sql[i - 1].isalnum() or sql[i - 1] == "_")):
                tag = m.group(0)
                end = sql.find(tag, i + len(tag))
                if end < 0:
                    raise UnsafeQueryError(f"the query ends inside a {tag} quoted string")
                buf.append(sql[i : end + len(tag)])
                i = end + len(tag)
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
