"""Rows of a query, within the caps: how many rows and how much text one call returns.

A read-only query runs as a server-side cursor, its rows fetched a batch at a time, so
the rows past ``max_result_rows`` / ``max_result_bytes`` never reach the process; a
plain result is read with ``fetchmany``.  When a result is cut, :func:`collecting_cuts`
hands the caller a note to append to the text it returns.  SQLAlchemy results in, lists
of row dicts (as ``SQLDatabase`` returns them) out; no SQL of its own but the FETCH.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

__all__ = ["CURSOR", "collecting_cuts", "fetch_comment", "fetch_cursor", "rows", "rows_within"]

#: The server-side cursor a read-only query's rows are fetched from.
CURSOR = "lsc_result"
#: Rows the first FETCH asks for; later ones are sized to what is left of the caps.
FIRST_FETCH = 100


class Cut:
    """What :func:`collecting_cuts` yields: the note of a cut result, else ``""``."""

    __slots__ = ("note",)

    def __init__(self) -> None:
        self.note = ""


_cut: contextvars.ContextVar[Cut | None] = contextvars.ContextVar(
    "langgraph_scoped_conn_cut", default=None
)


@contextlib.contextmanager
def collecting_cuts() -> Iterator[Cut]:
    """Collect, for the code inside, the note of any result cut at the caps."""
    cut = Cut()
    token = _cut.set(cut)
    try:
        yield cut
    finally:
        _cut.reset(token)


def fetch_comment(sql: str) -> str:
    """`` /* sql */`` for a FETCH, with anything that could end or nest the comment broken up.

    Also ``%``: the drivers read text SQLAlchemy hands them with parameters as a format.
    """
    safe = sql.replace("*/", "* /").replace("/*", "/ *").replace("%", "%%")
    return f" /* {safe} */"


def fetch_cursor(
    connection: Any, fetch_: str, *, comment: str, max_rows: int, max_bytes: int
) -> Any:
    """Fetch :data:`CURSOR`'s rows a batch at a time, stopping at the caps.

    The first FETCH asks for up to :data:`FIRST_FETCH` rows; each later one for as many
    as the caps leave room for at the rows' average size so far.  The server keeps every
    other row.  Each FETCH carries ``comment`` (the query), so ``pg_stat_activity`` and
    the server log show what runs.
    """
    if fetch_ != "all":  # one row, or a frozen result of at most the capped rows
        count = 1 if fetch_ == "one" else max_rows + 1
        result = connection.exec_driver_sql(f"FETCH FORWARD {count} FROM {CURSOR}{comment}")
        return rows_within(result, fetch_, max_rows=max_rows, max_bytes=max_bytes)
    fetched: list[Any] = []
    size = 0
    batch = min(max_rows + 1, FIRST_FETCH)
    while True:
        result = connection.exec_driver_sql(f"FETCH FORWARD {batch} FROM {CURSOR}{comment}")
        if not result.returns_rows:
            break
        got = result.fetchall()
        fetched += got
        size += sum(len(repr(tuple(row))) for row in got)
        if len(got) < batch or len(fetched) > max_rows or size > max_bytes:
            break
        average = max(size / len(fetched), 1.0)
        batch = max(1, min(max_rows + 1 - len(fetched), int((max_bytes - size) / average) + 1))
    return [row._asdict() for row in _kept(fetched, max_rows, max_bytes)]


def rows_within(cursor: Any, fetch_: str, *, max_rows: int, max_bytes: int) -> Any:
    """The rows of a plain result within the caps (``fetchmany``), shaped as :func:`rows`."""
    if fetch_ == "one" or not cursor.returns_rows:
        return rows(cursor, fetch_)
    if fetch_ == "cursor":
        frozen = cursor.freeze()
        kept = _kept(frozen.data, max_rows, max_bytes)
        frozen.data = kept
        return frozen
    if fetch_ != "all":
        raise ValueError("Fetch parameter must be either 'one', 'all', or 'cursor'")
    got = cursor.fetchmany(max_rows + 1)
    cursor.close()
    return [row._asdict() for row in _kept(got, max_rows, max_bytes)]


def rows(cursor: Any, fetch_: str) -> Any:
    """The rows of a result, as ``SQLDatabase._execute`` returns them (no caps)."""
    if not cursor.returns_rows:
        return []
    if fetch_ == "all":
        return [x._asdict() for x in cursor.fetchall()]
    if fetch_ == "one":
        first = cursor.fetchone()
        return [] if first is None else [first._asdict()]
    if fetch_ == "cursor":
        return cursor.freeze()
    raise ValueError("Fetch parameter must be either 'one', 'all', or 'cursor'")


def _kept(rows: list[Any], max_rows: int, max_bytes: int) -> list[Any]:
    """The first rows that fit ``max_rows`` and ``max_bytes`` (the first row always);
    a note for the caller when some were left out."""
    kept = rows[:max_rows]
    size = 0
    for i, row in enumerate(kept):
        size += len(repr(tuple(row)))
        if size > max_bytes and i > 0:
            kept = kept[:i]
            break
    if len(kept) < len(rows):
        cut = _cut.get()
        if cut is not None:
            cut.note = (
                f"\n(Result cut: the query returned more than fits in max_result_rows="
                f"{max_rows} rows / max_result_bytes={max_bytes}. Add a LIMIT, filter or "
                "aggregate to see what you need.)"
            )
    return kept
