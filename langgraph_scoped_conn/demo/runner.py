"""The demo's workload: N concurrent agent executions, scoped or the naive way.

:func:`run_scoped` runs the SQL agent wrapped with ``with_scoped_connections`` on a
manager of its own, so every connection comes from one budget pool and is released
when each run ends.  :func:`run_naive` runs the same agent the way the guide's
original code did: every tool call builds ``SQLDatabase.from_uri(...)`` and never
disposes it.  Those engines are kept for the length of the run (as a module-level
cache or a long-lived object would keep them), then disposed at the end so the demo
itself leaves nothing behind.  Both return a :class:`RunReport`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from langchain_core.messages import AIMessage

from langgraph_scoped_conn.demo.agent import DatabaseProvider, build_sql_agent, scoped_database
from langgraph_scoped_conn.demo.model import QUERY_TOOL, ScriptedSQLChatModel
from langgraph_scoped_conn.manager import ExecutionConnectionManager
from langgraph_scoped_conn.redaction import redact_url
from langgraph_scoped_conn.urls import parse_url

__all__ = ["QUESTIONS", "ROWS", "RunReport", "is_too_many_clients", "run_naive", "run_scoped"]

#: The questions the demo's executions ask, in turn.
QUESTIONS: tuple[str, ...] = (
    "How many sales are there?",
    "What is the total revenue by store?",
    "Show the top products",
    "What is the average amount of sales?",
    "How many stores by region?",
    "How many products by category?",
    "What is the total revenue by product?",
    "Show the regions",
)

#: Called after each execution finishes, with (finished, total).
Progress = Callable[[int, int], None]

_TOO_MANY = ("too many clients", "remaining connection slots are reserved", "max client conn")


@dataclasses.dataclass
class RunReport:
    """What one mode of the demo did.

    ``too_many_clients`` counts executions that failed because the server refused a
    connection; ``connections_refused`` counts the refused connection attempts.
    ``stats`` is the scoped manager's stats (``None`` for the naive run).
    """

    mode: str
    executions: int
    succeeded: int = 0
    failed: int = 0
    too_many_clients: int = 0
    connections_refused: int = 0
    connections_opened: int = 0
    connections_reused: int = 0
    connections_returned: int = 0
    connections_closed: int = 0
    leaks_reclaimed: int = 0
    peak_connections: int = 0
    open_after_runs: int = 0
    errors: list[str] = dataclasses.field(default_factory=list)
    stats: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        """The report as a JSON-safe dict."""
        return dataclasses.asdict(self)


#: The demo table's rows: (label, :class:`RunReport` field).  Each label says what the
#: row counts, the same way in both modes.
ROWS: tuple[tuple[str, str], ...] = (
    ("executions", "executions"),
    ("succeeded", "succeeded"),
    ("failed", "failed"),
    ("failed with 'too many clients'", "too_many_clients"),
    ("connections opened", "connections_opened"),
    ("connections reused", "connections_reused"),
    ("connections returned to a pool", "connections_returned"),
    ("connections closed", "connections_closed"),
    ("leaks reclaimed", "leaks_reclaimed"),
    ("peak connections", "peak_connections"),
    ("connections open after the runs", "open_after_runs"),
)


def is_too_many_clients(error: BaseException) -> bool:
    """True when ``error`` (or its cause) is the server refusing a connection for lack of slots."""
    seen: BaseException | None = error
    while seen is not None:
        if any(marker in str(seen).lower() for marker in _TOO_MANY):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


async def run_scoped(
    database_url: str,
    executions: int,
    *,
    max_connections: int = 5,
    questions: Sequence[str] = QUESTIONS,
    progress: Progress | None = None,
    leak_every: int = 0,
) -> RunReport:
    """Run ``executions`` concurrent agent runs through one scoped budget pool.

    Args:
        database_url: the database (the sample data must be loaded already).
        executions: how many runs to start at once.
        max_connections: the budget of the manager the runs share.
        questions: asked in turn, one per run.
        progress: called after each run finishes.
        leak_every: when above 0, every ``leak_every``-th run's query tool checks out
            a connection and never returns it (a buggy tool); the scope reclaims it.

    Returns:
        The report, with the manager's stats after every run has ended.
    """
    from langgraph_scoped_conn.graph import with_scoped_connections

    manager = ExecutionConnectionManager(
        database_url, max_connections=max_connections, application_name="lsc-demo"
    )
    report = RunReport("scoped", executions)
    leaked: list[Any] = []
    try:
        graph = with_scoped_connections(
            build_sql_agent(
                ScriptedSQLChatModel(),
                database=_leaky(scoped_database(), leak_every, leaked),
                name="sql_agent_scoped",
            ),
            manager=manager,
        )
        await _run_all(graph, executions, questions, report, progress)
        await manager.adrain()
        stats = manager.get_stats()
    finally:
        await manager.aclose()
    report.stats = stats
    report.connections_opened = stats["connections_opened"]
    report.connections_reused = stats["connections_reused"]
    report.connections_returned = stats["checkins"]
    report.connections_closed = stats["connections_closed"]
    report.leaks_reclaimed = stats["leaks_reclaimed"]
    report.peak_connections = stats["peak_connections"]
    report.open_after_runs = stats["connections_in_use"] + stats["connections_idle"]
    return report


async def run_naive(
    database_url: str,
    executions: int,
    *,
    questions: Sequence[str] = QUESTIONS,
    progress: Progress | None = None,
    leak_every: int = 0,
) -> RunReport:
    """Run the same agent the naive way: ``SQLDatabase.from_uri`` per tool call, never disposed.

    Failures (such as PostgreSQL's "too many clients already") are counted, not raised.
    ``leak_every`` makes the same runs as in :func:`run_scoped` leak a connection.
    """
    naive = _NaiveDatabases(database_url)
    report = RunReport("naive", executions)
    try:
        graph = build_sql_agent(
            ScriptedSQLChatModel(),
            database=_leaky(naive.provide, leak_every, naive.leaked),
            name="sql_agent_naive",
        )
        await _run_all(graph, executions, questions, report, progress)
        report.connections_opened = naive.opened
        report.connections_reused = max(naive.checkouts - naive.opened, 0)
        report.connections_returned = naive.checkins
        report.connections_closed = naive.closed
        report.peak_connections = naive.peak
        report.open_after_runs = naive.opened - naive.closed
    finally:
        await asyncio.to_thread(naive.dispose_all)
    report.connections_refused = naive.refused
    return report


async def _run_all(
    graph: Any,
    executions: int,
    questions: Sequence[str],
    report: RunReport,
    progress: Progress | None,
) -> None:
    async def one(i: int) -> None:
        question = questions[i % len(questions)]
        try:
            out = await graph.ainvoke(
                {"messages": [("user", question)]},
                {"run_name": f"demo-{report.mode}-{i}", "metadata": {"demo_execution": i}},
            )
        except Exception as exc:
            report.failed += 1
            if is_too_many_clients(exc):
                report.too_many_clients += 1
            if len(report.errors) < 5:
                first_line = (str(exc).strip().splitlines() or [""])[0]
                report.errors.append(redact_url(f"{type(exc).__name__}: {first_line}")[:300])
            return
        answer = out["messages"][-1]
        if isinstance(answer, AIMessage) and str(answer.content).startswith("Result:"):
            report.succeeded += 1
        else:
            report.failed += 1
            if len(report.errors) < 5:
                report.errors.append(str(answer.content)[:300])

    tasks = [asyncio.ensure_future(one(i)) for i in range(executions)]
    for done, task in enumerate(asyncio.as_completed(tasks), 1):
        await task
        if progress is not None:
            progress(done, executions)


class _NaiveDatabases:
    """``SQLDatabase.from_uri`` per call, kept and never disposed until :meth:`dispose_all`."""

    def __init__(self, database_url: str) -> None:
        self.url = database_url
        self.lock = threading.Lock()
        self.engines: list[Any] = []
        self.leaked: list[Any] = []
        self.opened = self.closed = self.checkouts = self.checkins = self.peak = self.refused = 0

    def provide(self, runtime: Any) -> Any:
        from sqlalchemy import event

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            from langchain_community.utilities.sql_database import SQLDatabase
        from sqlalchemy import create_engine

        url = parse_url(self.url)
        connect_args = {"application_name": "lsc-demo-naive"} if _is_pg(url) else {}
        # SQLDatabase.from_uri(url) does exactly this; the events count connections
        engine = create_engine(url, connect_args=connect_args)
        event.listen(engine.pool, "connect", lambda *_: self._count(opened=1))
        event.listen(engine.pool, "close", lambda *_: self._count(closed=1))
        event.listen(engine.pool, "close_detached", lambda *_: self._count(closed=1))
        event.listen(engine.pool, "checkout", lambda *_: self._count(checkouts=1))
        event.listen(engine.pool, "checkin", lambda *_: self._count(checkins=1))
        with self.lock:
            self.engines.append(engine)
        try:
            return SQLDatabase(engine)
        except Exception as exc:
            if is_too_many_clients(exc):
                with self.lock:
                    self.refused += 1
            raise

    def _count(
        self, opened: int = 0, closed: int = 0, checkouts: int = 0, checkins: int = 0
    ) -> None:
        with self.lock:
            self.opened += opened
            self.closed += closed
            self.checkouts += checkouts
            self.checkins += checkins
            self.peak = max(self.peak, self.opened - self.closed)

    def dispose_all(self) -> None:
        with self.lock:
            engines, self.engines = self.engines, []
            leaked, self.leaked = self.leaked, []
        for connection in leaked:
            connection.close()
        for engine in engines:
            engine.dispose()


def _leaky(provide: DatabaseProvider, every: int, leaked: list[Any]) -> DatabaseProvider:
    """Wrap ``provide`` so every ``every``-th run's query tool forgets a checked-out connection."""
    if every <= 0:
        return provide

    def provide_and_leak(runtime: Any) -> Any:
        db = provide(runtime)
        config = getattr(runtime, "config", None) or {}
        index = (config.get("metadata") or {}).get("demo_execution")
        tool_call = getattr(runtime, "tool_call_id", "") or ""
        if isinstance(index, int) and index % every == 0 and QUERY_TOOL in tool_call:
            return _LeakAfterQuery(db, leaked)
        return db

    return provide_and_leak


class _LeakAfterQuery:
    """A database whose ``run_no_throw`` forgets one connection after its query.

    The leak comes after the query, as in a tool that opens a connection for a
    follow-up and forgets it: leaking before the query would make each leaky run
    wait for a second connection while holding the first, which with a small budget
    deadlocks the runs against each other until ``pool_timeout``.
    """

    def __init__(self, db: Any, leaked: list[Any]) -> None:
        self._db = db
        self._leaked = leaked

    def run_no_throw(self, *args: Any, **kwargs: Any) -> Any:
        result = self._db.run_no_throw(*args, **kwargs)
        # the bug: a connection checked out and never returned (kept referenced)
        self._leaked.append(self._db._engine.raw_connection())
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)


def _is_pg(url: Any) -> bool:
    return bool(url.get_backend_name() == "postgresql")
