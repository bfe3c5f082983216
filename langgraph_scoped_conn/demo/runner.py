"""The demo's workload: N concurrent agent runs, the naive way or the scoped way.

:func:`run_naive` runs the SQL agent the way users of the execution-scoped cleanup
guide write it: each run creates its own engine (``pool_size=2, max_overflow=3``) and
``SQLDatabase`` on its first tool call and disposes the engine when the run ends.
Every run in flight holds a server connection, so N concurrent runs want N
connections.  :func:`run_scoped` runs the same agent wrapped with
``with_scoped_connections`` on a manager of its own: every run draws from one pool
of ``max_connections`` and gives its connections back when it ends.  Both return a
:class:`RunReport`; neither raises for a failed run, they count it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from langchain_core.messages import AIMessage

from langgraph_scoped_conn.demo.agent import DatabaseProvider, build_sql_agent, scoped_database
from langgraph_scoped_conn.demo.model import QUERY_TOOL, ScriptedSQLChatModel
from langgraph_scoped_conn.manager import ExecutionConnectionManager
from langgraph_scoped_conn.redaction import redact_url
from langgraph_scoped_conn.urls import parse_url

__all__ = [
    "NAIVE_APPLICATION",
    "NAIVE_MAX_OVERFLOW",
    "NAIVE_POOL_SIZE",
    "QUESTIONS",
    "SCOPED_APPLICATION",
    "RunReport",
    "is_too_many_clients",
    "run_naive",
    "run_scoped",
]

#: The questions the demo's runs ask, in turn.
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

#: The guide's engine per execution: a pool of 2 plus 3 overflow connections.
NAIVE_POOL_SIZE = 2
NAIVE_MAX_OVERFLOW = 3
#: ``application_name`` of each mode's connections, as pg_stat_activity shows them.
NAIVE_APPLICATION = "lsc-demo-naive"
SCOPED_APPLICATION = "lsc-demo-scoped"

_TOO_MANY = ("too many clients", "remaining connection slots are reserved", "max client conn")
_KEPT_ERRORS = 5


@dataclasses.dataclass
class RunReport:
    """What one mode of the demo did.

    ``too_many_clients`` counts runs that failed because the server refused a
    connection.  ``peak_connections`` is the client's own count of connections open
    at once; ``peak_backends`` is the same measured from the server
    (``pg_stat_activity``, filled in by the demo's sampler; ``None`` without one).
    ``idle_after_runs`` counts connections still open, idle in a pool, once every run
    has ended (before the demo closes them).  ``errors`` maps each distinct failure
    (the server's ``FATAL:`` line when there is one) to the runs it ended.  ``stats`` is
    the scoped manager's ``get_stats()`` (``None`` for the naive run).
    """

    mode: str
    executions: int
    succeeded: int = 0
    failed: int = 0
    too_many_clients: int = 0
    connections_opened: int = 0
    peak_connections: int = 0
    peak_backends: int | None = None
    idle_after_runs: int = 0
    leaks_reclaimed: int = 0
    seconds: float = 0.0
    strategy: str | None = None
    strategy_reason: str | None = None
    errors: dict[str, int] = dataclasses.field(default_factory=dict)
    stats: dict[str, Any] | None = None

    @property
    def finished(self) -> int:
        """Runs that have ended, well or not."""
        return self.succeeded + self.failed

    def as_dict(self) -> dict[str, Any]:
        """The report as a JSON-safe dict."""
        return dataclasses.asdict(self)


#: Called after each run ends, with the report so far.
Progress = Callable[[RunReport], None]


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
    strategy: str = "auto",
    schema: str | None = None,
    questions: Sequence[str] = QUESTIONS,
    progress: Progress | None = None,
    leak_every: int = 0,
) -> RunReport:
    """Run ``executions`` concurrent agent runs through one scoped budget pool.

    Args:
        database_url: the database (the sample data must be loaded already).
        executions: how many runs to start at once.
        max_connections: the budget of the manager the runs share.
        strategy: the manager's ``strategy`` (``auto`` picks one from the URL).
        schema: the PostgreSQL schema holding the sample tables (``None``: the default).
        questions: asked in turn, one per run.
        progress: called after each run ends.
        leak_every: when above 0, every ``leak_every``-th run's query tool checks out
            a connection and never returns it (a buggy tool); the scope reclaims it.

    Returns:
        The report, with the manager's stats after every run has ended.
    """
    from langgraph_scoped_conn.graph import with_scoped_connections

    manager = ExecutionConnectionManager(
        database_url,
        max_connections=max_connections,
        strategy=strategy,
        application_name=SCOPED_APPLICATION,
    )
    report = RunReport("scoped", executions)
    leaked: list[Any] = []
    try:
        graph = with_scoped_connections(
            build_sql_agent(
                ScriptedSQLChatModel(),
                database=_leaky(scoped_database(schema=schema), leak_every, leaked),
                name="sql_agent_scoped",
            ),
            manager=manager,
        )
        await _run_all(graph, executions, questions, report, progress=progress)
        await manager.adrain()
        stats = manager.get_stats()
    finally:
        await manager.aclose()
    report.stats = stats
    report.connections_opened = stats["connections_opened"]
    report.leaks_reclaimed = stats["leaks_reclaimed"]
    report.peak_connections = stats["peak_connections"]
    report.idle_after_runs = stats["connections_idle"] + stats["connections_in_use"]
    pool: dict[str, Any] = next(iter(stats["pools"]), {})
    report.strategy = pool.get("strategy", stats.get("strategy"))
    report.strategy_reason = pool.get("strategy_reason")
    return report


async def run_naive(
    database_url: str,
    executions: int,
    *,
    schema: str | None = None,
    questions: Sequence[str] = QUESTIONS,
    progress: Progress | None = None,
    leak_every: int = 0,
) -> RunReport:
    """Run the same agent the naive way: an engine and ``SQLDatabase`` per run.

    Each run's engine is created on its first tool call and disposed when the run
    ends, as the guide does.  Failures (such as PostgreSQL's "too many clients
    already") are counted, not raised.  ``leak_every`` makes the same runs as in
    :func:`run_scoped` leak a connection (closed when the demo ends).
    """
    naive = _EnginePerRun(database_url, schema)
    report = RunReport("naive", executions)
    try:
        graph = build_sql_agent(
            ScriptedSQLChatModel(),
            database=_leaky(naive.provide, leak_every, naive.leaked),
            name="sql_agent_naive",
        )
        await _run_all(
            graph, executions, questions, report, progress=progress, after_run=naive.end_run
        )
    finally:
        await asyncio.to_thread(naive.dispose_all)
    report.connections_opened = naive.opened
    report.peak_connections = naive.peak
    report.idle_after_runs = 0  # every run disposed its engine
    return report


async def _run_all(
    graph: Any,
    executions: int,
    questions: Sequence[str],
    report: RunReport,
    *,
    progress: Progress | None,
    after_run: Callable[[int], None] | None = None,
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
            _keep(report, _describe(exc))
            return
        finally:
            if after_run is not None:
                await asyncio.to_thread(after_run, i)
        answer = out["messages"][-1]
        if isinstance(answer, AIMessage) and str(answer.content).startswith("Result:"):
            report.succeeded += 1
        else:
            report.failed += 1
            _keep(report, str(answer.content)[:300])

    started = time.perf_counter()
    tasks = [asyncio.ensure_future(one(i)) for i in range(executions)]
    for task in asyncio.as_completed(tasks):
        await task
        report.seconds = time.perf_counter() - started
        if progress is not None:
            progress(report)


def _keep(report: RunReport, error: str) -> None:
    if error in report.errors or len(report.errors) < _KEPT_ERRORS:
        report.errors[error] = report.errors.get(error, 0) + 1


def _describe(error: BaseException) -> str:
    """The server's ``FATAL:`` line when it refused, else the error's type and first line."""
    lines = [line.strip() for line in str(error).strip().splitlines()] or [""]
    fatal = next((line for line in lines if "FATAL:" in line), None)
    if fatal is not None:
        return " ".join(fatal[fatal.index("FATAL:") :].split())[:300]
    return redact_url(f"{type(error).__name__}: {lines[0]}")[:300]


class _EnginePerRun:
    """The guide's design: one engine + ``SQLDatabase`` per run, disposed when the run ends."""

    def __init__(self, database_url: str, schema: str | None) -> None:
        self.url = parse_url(database_url)
        self.schema = schema
        self.lock = threading.Lock()
        self.engines: dict[int, Any] = {}
        self.databases: dict[int, Any] = {}
        self.leaked: list[Any] = []
        self.opened = self.closed = self.peak = 0

    def provide(self, runtime: Any) -> Any:
        """This run's SQLDatabase, built (engine, schema reflection) on its first call."""
        index = _execution_index(runtime)
        with self.lock:
            db = self.databases.get(index)
            if db is not None:
                return db
            engine = self.engines.get(index)
            if engine is None:
                engine = self.engines[index] = self._create_engine()
        # SQLDatabase(engine) reflects the schema: the run's first connection
        db = _sql_database_class()(engine, schema=self.schema)
        with self.lock:
            return self.databases.setdefault(index, db)

    def _create_engine(self) -> Any:
        from sqlalchemy import create_engine, event

        is_pg = self.url.get_backend_name() == "postgresql"
        engine = create_engine(
            self.url,
            pool_size=NAIVE_POOL_SIZE,
            max_overflow=NAIVE_MAX_OVERFLOW,
            connect_args={"application_name": NAIVE_APPLICATION} if is_pg else {},
        )
        event.listen(engine.pool, "connect", lambda *_: self._count(opened=1))
        event.listen(engine.pool, "close", lambda *_: self._count(closed=1))
        event.listen(engine.pool, "close_detached", lambda *_: self._count(closed=1))
        return engine

    def _count(self, opened: int = 0, closed: int = 0) -> None:
        with self.lock:
            self.opened += opened
            self.closed += closed
            self.peak = max(self.peak, self.opened - self.closed)

    def end_run(self, index: int) -> None:
        """The guide's cleanup at the end of an execution: dispose its engine."""
        with self.lock:
            engine = self.engines.pop(index, None)
            self.databases.pop(index, None)
        if engine is not None:
            engine.dispose()

    def dispose_all(self) -> None:
        with self.lock:
            engines, self.engines = list(self.engines.values()), {}
            leaked, self.leaked = self.leaked, []
        for connection in leaked:
            connection.close()
        for engine in engines:
            engine.dispose()


def _sql_database_class() -> Any:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        from langchain_community.utilities.sql_database import SQLDatabase
    return SQLDatabase


def _execution_index(runtime: Any) -> int:
    config = getattr(runtime, "config", None) or {}
    index = (config.get("metadata") or {}).get("demo_execution")
    if not isinstance(index, int):
        raise RuntimeError("the naive demo database needs the run's demo_execution metadata")
    return index


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
