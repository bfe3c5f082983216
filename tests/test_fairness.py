"""Fair admission to the budget, and the per-execution cap, against the real PostgreSQL.

* Under contention (more threads than the budget, each looping acquire/release) every
  thread gets its connections, and no waiter is overtaken more than a bounded number
  of times; the server never sees more backends than the budget.
* A waiter facing a "hog" that releases and re-acquires in a tight loop gets the next
  connection from :class:`BudgetPool`; with SQLAlchemy's plain ``QueuePool`` the hog
  barges ahead of it (the control that shows the test can fail).
* ``max_connections_per_execution`` (default 5): a sixth checkout waits, then raises
  :class:`ExecutionConnectionLimitError`, or gets a connection that comes back in
  time; other executions keep working meanwhile.
"""

from __future__ import annotations

import collections
import contextlib
import random
import sys
import threading
from collections.abc import Iterator
from typing import Any, TypedDict

import pytest
from langchain_core.runnables import RunnableConfig
from langgraph.graph import END, START, StateGraph
from sqlalchemy import create_engine, text
from sqlalchemy.pool import QueuePool

import langgraph_scoped_conn as lsc
from langgraph_scoped_conn import ExecutionConnectionManager
from langgraph_scoped_conn.errors import ExecutionConnectionLimitError
from langgraph_scoped_conn.pool import BudgetPool
from tests.conftest import Database, assert_clean, eventually


@pytest.fixture
def fair_manager(pg_db: Database) -> Iterator[ExecutionConnectionManager]:
    mgr = ExecutionConnectionManager(
        pg_db.url, max_connections=3, pool_timeout=120, application_name="lsc-fair"
    )
    try:
        yield mgr
        assert_clean(mgr)
    finally:
        mgr.close()


# -- every thread gets connections -------------------------------------------------------------

THREADS = 12
ROUNDS = 25


def _record_admissions(pool: BudgetPool) -> tuple[list[int], list[int]]:
    """Record, per admission to ``pool``, how many callers were admitted ahead of it.

    White-box: counts at the points where BudgetPool puts a caller in line and where
    it lets the head of the line take a connection, so the numbers are exact.  Also
    counts the callers served straight from the idle pool while nobody was in line
    (they overtake nobody).
    """
    overtaken: list[int] = []
    direct = [0]
    asked: dict[int, int] = {}
    admitted = [0]

    class Line(collections.deque[object]):
        def append(self, ticket: object) -> None:  # called under the pool's gate
            asked[id(ticket)] = admitted[0]
            super().append(ticket)

    take = pool._get_as_head

    def get_as_head(deadline: float) -> Any:
        ticket = pool._line[0]  # only the head of the line gets here
        overtaken.append(admitted[0] - asked.pop(id(ticket)))
        admitted[0] += 1
        return take(deadline)

    take_idle = pool._take_idle

    def take_idle_directly() -> Any:
        entry = take_idle()
        if entry is not None:
            direct[0] += 1
        return entry

    pool._line = Line()
    pool._get_as_head = get_as_head  # type: ignore[method-assign]
    pool._take_idle = take_idle_directly  # type: ignore[method-assign]
    return overtaken, direct


def test_every_thread_gets_connections_under_contention(
    fair_manager: ExecutionConnectionManager, pg_db: Database
) -> None:
    """12 executions on 12 threads loop acquire/query/release against a budget of 3."""
    pool = fair_manager.pool_for().engine.pool
    assert isinstance(pool, BudgetPool)
    overtaken, direct = _record_admissions(pool)
    got = [0] * THREADS
    errors: list[BaseException] = []
    start = threading.Barrier(THREADS)

    def worker(i: int) -> None:
        rng = random.Random(i)  # seeded: how long each holds its connection
        try:
            with lsc.ExecutionScope(f"fair-{i}", manager=fair_manager):
                engine = lsc.create_execution_scoped_engine_sync()
                start.wait(timeout=60)
                for _ in range(ROUNDS):
                    with engine.connect() as conn:
                        got[i] += 1
                        conn.execute(text("select pg_sleep(:s)"), {"s": rng.choice((0, 0.002))})
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    with pg_db.sampler("lsc-fair%") as sampler:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert got == [ROUNDS] * THREADS  # every thread was served, every time
    assert len(overtaken) + direct[0] == THREADS * ROUNDS  # every admission accounted for
    stats = fair_manager.get_stats()
    assert stats["checkout_waits"] > 0  # there was contention to be fair about
    assert stats["checkout_timeouts"] == 0
    # first come, first served: a caller is passed only by those already in line
    # when it arrived, one each at most
    assert max(overtaken) <= THREADS - 1, max(overtaken)
    assert len(sampler.samples) > 0
    assert 1 <= sampler.peak <= 3  # the server never saw more than the budget


# -- the starved waiter --------------------------------------------------------------------------

HOG_ROUNDS = 20


def _waiting_on_pool(pool: Any) -> int:
    """Threads blocked in the pool's underlying queue, waiting for a connection."""
    return len(pool._pool.not_empty._waiters)


def _hog_and_waiter(url: str, poolclass: type[QueuePool]) -> list[str]:
    """One connection; a hog re-acquires it in a tight loop while a waiter waits.

    Returns the order in which connections were granted after the waiter started
    waiting: ``"H"`` for the hog, ``"W"`` for the waiter.
    """
    engine = create_engine(
        url,
        poolclass=poolclass,
        pool_size=1,
        max_overflow=0,
        pool_timeout=120,
        connect_args={"application_name": "lsc-fair-hog"},
    )
    pool = engine.pool
    order: list[str] = []
    hog_holds, waiter_waits = threading.Event(), threading.Event()

    def hog() -> None:
        conn = pool.connect()
        hog_holds.set()
        waiter_waits.wait(timeout=60)
        for _ in range(HOG_ROUNDS):
            conn.close()  # back to the pool ...
            conn = pool.connect()  # ... and straight back for more
            order.append("H")
            cur = conn.cursor()
            cur.execute("select 1")
            cur.close()
        conn.close()

    def waiter() -> None:
        hog_holds.wait(timeout=60)
        conn = pool.connect()
        order.append("W")
        conn.close()

    old_interval = sys.getswitchinterval()
    threads = [threading.Thread(target=hog), threading.Thread(target=waiter)]
    try:
        threads[0].start()
        assert hog_holds.wait(timeout=60)
        threads[1].start()
        while _waiting_on_pool(pool) == 0 and threads[1].is_alive():
            threading.Event().wait(0.001)
        assert _waiting_on_pool(pool) == 1  # the waiter is blocked on the empty pool
        sys.setswitchinterval(0.5)  # the hog is not pre-empted between release and acquire
        waiter_waits.set()
        for t in threads:
            t.join(timeout=120)
    finally:
        sys.setswitchinterval(old_interval)
        engine.dispose()
    assert not any(t.is_alive() for t in threads)
    return order


def test_a_waiter_is_served_before_a_hog_reacquires(pg_db: Database) -> None:
    order = _hog_and_waiter(pg_db.url, BudgetPool)
    assert order[0] == "W", order  # the hog's first re-acquire queued behind the waiter
    assert order.count("H") == HOG_ROUNDS
    eventually(lambda: pg_db.backends("lsc-fair-hog") == 0, "the hog's pool was disposed")


def test_control_plain_queuepool_lets_the_hog_barge_ahead(pg_db: Database) -> None:
    """The same scenario on SQLAlchemy's QueuePool: the waiter is overtaken."""
    order = _hog_and_waiter(pg_db.url, QueuePool)
    assert order.index("W") >= 1, order


# -- the per-execution cap ---------------------------------------------------------------------


class _State(TypedDict, total=False):
    held: int
    error: str


@pytest.fixture
def capped_manager(pg_db: Database) -> Iterator[ExecutionConnectionManager]:
    """Budget 8, per-execution cap left at its default (5), a short pool_timeout."""
    mgr = ExecutionConnectionManager(
        pg_db.url, max_connections=8, pool_timeout=1.0, application_name="lsc-cap"
    )
    try:
        yield mgr
        assert_clean(mgr)
    finally:
        mgr.close()


def test_one_run_cannot_take_more_than_five(
    capped_manager: ExecutionConnectionManager, pg_db: Database
) -> None:
    assert capped_manager.settings.max_connections_per_execution == 5
    holding_five, others_done = threading.Event(), threading.Event()
    seen: dict[str, Any] = {}

    def greedy(state: _State, config: RunnableConfig) -> _State:
        engine = lsc.get_scoped_engine(config, manager=capped_manager)
        with contextlib.ExitStack() as stack:
            for _ in range(5):
                stack.enter_context(engine.connect()).execute(text("select 1"))
            seen["backends_at_five"] = pg_db.backends("lsc-cap%")
            holding_five.set()
            assert others_done.wait(timeout=60)
            try:
                stack.enter_context(engine.connect())
            except ExecutionConnectionLimitError as exc:
                return {"held": 5, "error": str(exc)}
        return {"held": 6}

    builder = StateGraph(_State)
    builder.add_node("greedy", greedy)
    builder.add_edge(START, "greedy")
    builder.add_edge("greedy", END)
    graph = lsc.with_scoped_connections(builder.compile(), manager=capped_manager)

    result: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: result.update(graph.invoke({})))
    runner.start()
    try:
        assert holding_five.wait(timeout=60)
        # another execution still gets the rest of the budget while the greedy one holds 5
        with lsc.ExecutionScope("other", manager=capped_manager):
            engine = lsc.create_execution_scoped_engine_sync()
            with contextlib.ExitStack() as stack:
                conns = [stack.enter_context(engine.connect()) for _ in range(3)]
                assert [c.execute(text("select 1")).scalar_one() for c in conns] == [1, 1, 1]
                seen["backends_at_eight"] = pg_db.backends("lsc-cap%")
    finally:
        others_done.set()
        runner.join(timeout=60)
    assert result["held"] == 5
    message = result["error"]
    assert "execution '" in message and "already holds 5 connections" in message
    assert "max_connections_per_execution=5" in message
    assert "pool_timeout=1.00s" in message and "raise max_connections_per_execution" in message
    assert seen["backends_at_five"] == 5
    assert seen["backends_at_eight"] == 8  # the budget, all in use, none refused
    assert capped_manager.get_stats()["checkout_timeouts"] == 0  # the budget never ran dry


def test_a_sixth_checkout_waits_for_one_to_come_back(pg_db: Database) -> None:
    slow = ExecutionConnectionManager(
        pg_db.url, max_connections=8, pool_timeout=120, application_name="lsc-cap-wait"
    )
    try:
        with lsc.ExecutionScope("waits", manager=slow) as scope:
            engine = lsc.create_execution_scoped_engine_sync()
            execution = slow.execution(scope.execution_id)
            assert execution is not None
            conns = [engine.connect() for _ in range(5)]
            sixth: dict[str, Any] = {}

            def take_sixth() -> None:
                with engine.connect() as conn:
                    sixth["value"] = conn.execute(text("select 6")).scalar_one()
                    sixth["backends"] = pg_db.backends("lsc-cap-wait%")

            t = threading.Thread(target=take_sixth)
            t.start()
            while not execution._cond._waiters and t.is_alive():  # type: ignore[attr-defined]
                threading.Event().wait(0.001)
            assert "value" not in sixth  # it waits: the cap, not the budget (8), holds it back
            assert slow.get_stats()["executions"]["waits"]["connections_in_use"] == 5
            conns.pop().close()  # one comes back ...
            t.join(timeout=60)
            assert sixth["value"] == 6  # ... and the waiting checkout gets it
            assert sixth["backends"] <= 5
            for c in conns:
                c.close()
        assert_clean(slow)
    finally:
        slow.close()
