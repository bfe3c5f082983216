"""A hypothesis state machine over the registry, checked against pg_stat_activity.

Each execution lives on a thread of its own (a one-worker executor, whose context
keeps the scope's context variable between steps).  The machine opens scopes,
creates engines and SQLDatabase objects, checks connections out and returns them,
tracks raw psycopg2 connections, and ends scopes either normally on their own
thread or by a cancel from another thread.  After every step it checks:

* no resource outlives its scope: every connection an ended scope held, and every
  tracked connection it owned, is gone from the server;
* the stats match the server's view: connections in use per execution and in total,
  idle pool connections, open executions.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg2
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import text

import langgraph_scoped_conn as lsc
from langgraph_scoped_conn import ExecutionConnectionManager
from tests.conftest import Database, assert_clean

BUDGET = 4
PER_EXECUTION = 2


@dataclass(eq=False)
class _Scope:
    name: str
    worker: concurrent.futures.ThreadPoolExecutor
    scope: lsc.ExecutionScope
    held: list[Any] = field(default_factory=list)  # SQLAlchemy Connections checked out
    tracked: list[str] = field(default_factory=list)  # application_names of tracked conns
    held_at_end: int = 0

    def run(self, fn: Any, *args: Any) -> Any:
        return self.worker.submit(fn, *args).result(timeout=30)


#: How often each rule did something, over all examples (to show the run exercised them).
_done: dict[str, int] = {}


_names = itertools.count(1)
_totals: dict[str, int] = {}


def _count(rule_name: str) -> None:
    _done[rule_name] = _done.get(rule_name, 0) + 1


class RegistryMachine(RuleBasedStateMachine):
    scopes = Bundle("scopes")

    def __init__(self, db: Database) -> None:
        super().__init__()
        self.db = db
        # a manager (and application_name) per example, so a failing example cannot
        # leak into the next one, not even on the server
        self.app = f"lsc-sm-pool-{next(_names)}"
        self.manager = ExecutionConnectionManager(
            db.url,
            application_name=self.app,
            max_connections=BUDGET,
            max_connections_per_execution=PER_EXECUTION,
            pool_timeout=5,
            max_scope_lifetime=None,
        )
        self.live: dict[str, _Scope] = {}
        self.ended_tracked: list[str] = []  # tracked by scopes that have ended
        self.admin = db.server.admin()

    # -- helpers -----------------------------------------------------------------------

    def _server(self) -> dict[str, int]:
        with self.admin.cursor() as cur:
            cur.execute(
                "select application_name, count(*) from pg_stat_activity "
                "where datname = %s and backend_type = 'client backend' group by 1",
                (self.db.name,),
            )
            return {name: int(n) for name, n in cur.fetchall()}

    def _held_total(self) -> int:
        return sum(len(s.held) for s in self.live.values())

    # -- rules -------------------------------------------------------------------------

    @precondition(lambda self: len(self.live) < 4)
    @rule(target=scopes)
    def open_scope(self) -> _Scope:
        name = f"sm-{next(_names)}"
        worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=name)
        entry = _Scope(name, worker, lsc.ExecutionScope(name, manager=self.manager))
        entry.run(entry.scope.__enter__)
        self.live[name] = entry
        _count("open")
        return entry

    @precondition(lambda self: self.live)
    @rule(entry=scopes, use_database=st.booleans())
    def check_out(self, entry: _Scope, use_database: bool) -> None:
        if entry.name not in self.live or len(entry.held) >= PER_EXECUTION:
            return
        if self._held_total() >= BUDGET:
            return

        def work() -> Any:
            if use_database:
                db = lsc.create_execution_scoped_sql_database_sync()
                assert db.run("select count(*) from customers") == "[(50,)]"
            engine = lsc.create_execution_scoped_engine_sync()
            conn = engine.connect()
            conn.execute(text("select 1"))
            return conn

        entry.held.append(entry.run(work))
        _count("check_out")

    @precondition(lambda self: self.live)
    @rule(entry=scopes, data=st.data())
    def give_back(self, entry: _Scope, data: st.DataObject) -> None:
        if entry.name not in self.live or not entry.held:
            return
        conn = entry.held.pop(data.draw(st.integers(0, len(entry.held) - 1)))
        entry.run(conn.close)
        _count("give_back")

    @precondition(lambda self: self.live)
    @rule(entry=scopes)
    def track(self, entry: _Scope) -> None:
        if entry.name not in self.live or len(entry.tracked) >= 2:
            return
        app = f"lsc-sm-{entry.name}-{len(entry.tracked)}"
        url = self.db.url.replace("postgresql+psycopg2", "postgresql")

        def work() -> None:
            lsc.track_connection(psycopg2.connect(url, application_name=app))

        entry.run(work)
        entry.tracked.append(app)
        _count("track")

    @rule(entry=consumes(scopes))
    def close(self, entry: _Scope) -> None:
        """The run ends on its own thread; connections it did not return are reclaimed."""
        if entry.name not in self.live:
            return
        entry.run(entry.scope.__exit__, None, None, None)
        self._ended(entry)
        _count("close" if entry.held_at_end else "close_clean")

    @rule(entry=consumes(scopes))
    def cancel(self, entry: _Scope) -> None:
        """The run is cancelled: its scope ends from another thread, mid-work."""
        if entry.name not in self.live:
            return
        entry.scope.__exit__(asyncio.CancelledError, asyncio.CancelledError(), None)
        self._ended(entry)
        _count("cancel" if entry.held_at_end else "cancel_clean")

    def _ended(self, entry: _Scope) -> None:
        del self.live[entry.name]
        entry.held_at_end = len(entry.held)
        self.ended_tracked += entry.tracked
        # a cancel from another thread leaves a connection held inside a transaction to
        # its thread for a moment (END_GRACE); nothing uses it here, so it is closed then
        self.manager.drain(10)
        for conn in entry.held:
            assert conn.invalidated, "a connection outlived its scope"
        entry.held.clear()
        entry.worker.shutdown(wait=True)

    # -- invariants --------------------------------------------------------------------

    @invariant()
    def stats_match_the_server(self) -> None:
        self.manager.drain(10)
        deadline = time.monotonic() + 10
        while True:
            stats = self.manager.get_stats()
            server = self._server()
            expected_tracked = {a for s in self.live.values() for a in s.tracked}
            seen_tracked = {a for a in server if a.startswith("lsc-sm-sm-")}
            pool = server.get(self.app, 0)
            settled = (
                seen_tracked == expected_tracked
                and pool == stats["connections_in_use"] + stats["connections_idle"]
            )
            if settled or time.monotonic() > deadline:
                break
            time.sleep(0.02)  # a closed socket's backend leaves pg_stat_activity a moment later
        # no resource outlives its scope
        assert not seen_tracked & set(self.ended_tracked)
        assert seen_tracked == expected_tracked
        # the stats match the server's view
        assert stats["active_executions"] == len(self.live)
        assert set(stats["executions"]) == set(self.live)
        for name, entry in self.live.items():
            assert stats["executions"][name]["connections_in_use"] == len(entry.held)
            assert stats["executions"][name]["custom_connections"] == len(entry.tracked)
        assert stats["connections_in_use"] == self._held_total()
        assert pool == stats["connections_in_use"] + stats["connections_idle"]
        assert stats["peak_connections"] <= BUDGET

    def teardown(self) -> None:
        try:
            for entry in list(self.live.values()):
                entry.run(entry.scope.__exit__, None, None, None)
                self._ended(entry)
            assert_clean(self.manager)
            stats = self.manager.get_stats()
            assert stats["scopes_opened"] == stats["scopes_closed"]
            _totals["leaks_reclaimed"] += stats["leaks_reclaimed"]
        finally:
            self.manager.close()
            self.admin.close()


def test_registry_state_machine(pg_db: Database) -> None:
    _done.clear()
    _totals.clear()
    _totals["leaks_reclaimed"] = 0
    run_state_machine_as_test(
        lambda: RegistryMachine(pg_db),
        settings=settings(
            max_examples=20,
            stateful_step_count=15,
            derandomize=True,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
    # every rule ran, and scopes ended both while holding connections and not
    assert set(_done) >= {"open", "check_out", "give_back", "track", "close", "cancel"}, _done
    assert _totals["leaks_reclaimed"] > 0
    assert pg_db.backends("lsc-sm-%") == 0  # no pool or tracked connection left
