"""overhead: ``invoke`` of a trivial 2-node graph, wrapped against bare and a no-op handler.

Variants, interleaved round by round in one process, the order flipped every round:

* ``bare``: ``builder.compile()``;
* ``noop_handler``: the same with a do-nothing callback handler: what LangChain's callback
  machinery costs once any handler is present, the floor the package is judged against;
* ``scope_only``: a handler that opens and releases one execution per root run and ignores
  child runs: the execution's own cost, without the run-id map (a diagnostic);
* ``wrapped``: ``with_scoped_connections(builder.compile())``.

The nodes touch no database (the manager's URL is never connected to).  The margin is
``wrapped/bare - noop_handler/bare`` per round; its median is the figure.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, TypedDict

from langgraph.graph import END, START, StateGraph

import langgraph_scoped_conn as lsc
from benchmarks import harness

VARIANTS = ("bare", "noop_handler", "scope_only", "wrapped")
UNUSED_URL = "postgresql+psycopg2://bench@127.0.0.1:1/overhead"
SIZES = {
    "rounds": (300, 60, "interleaved rounds"),
    "per_round": (20, 20, "invokes per variant per round"),
    "warmup": (300, 100, "untimed invokes per variant"),
}


class State(TypedDict):
    n: int


class ScopeOnlyHandler(harness.NoopHandler):
    """Opens and releases one execution per root run; does nothing for child runs."""

    def __init__(self, manager: lsc.ExecutionConnectionManager) -> None:
        self.manager = manager
        self.roots: dict[Any, Any] = {}

    def on_chain_start(self, serialized: Any, inputs: Any, **kw: Any) -> None:
        if kw.get("parent_run_id") is None:
            self.roots[kw["run_id"]] = self.manager.open_execution(str(kw["run_id"]))

    def on_chain_end(self, outputs: Any, **kw: Any) -> None:
        execution = self.roots.pop(kw["run_id"], None)
        if execution is not None:
            self.manager.release_execution(execution)


def build() -> Any:
    builder = StateGraph(State)
    builder.add_node("first", lambda s: {"n": s["n"] + 1})
    builder.add_node("second", lambda s: {"n": s["n"] * 2})
    builder.add_edge(START, "first")
    builder.add_edge("first", "second")
    builder.add_edge("second", END)
    return builder.compile()


def graphs(manager: lsc.ExecutionConnectionManager) -> dict[str, Any]:
    return {
        "bare": build(),
        "noop_handler": build().with_config(callbacks=[harness.NoopHandler()]),
        "scope_only": build().with_config(callbacks=[ScopeOnlyHandler(manager)]),
        "wrapped": lsc.with_scoped_connections(build(), manager=manager),
    }


def per_invoke_us(graph: Any, n: int) -> float:
    """Microseconds per ``invoke``, over ``n`` invokes."""
    t0 = time.perf_counter_ns()
    for i in range(n):
        if graph.invoke({"n": i})["n"] != (i + 1) * 2:
            raise AssertionError("unexpected output")
    return (time.perf_counter_ns() - t0) / 1e3 / n


def run_rounds(args: Any) -> dict[str, list[float]]:
    """µs per invoke of every variant, one value per round."""
    manager = lsc.ExecutionConnectionManager(UNUSED_URL)
    try:
        gs = graphs(manager)
        for g in gs.values():
            per_invoke_us(g, args.warmup)
        us: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for r in range(args.rounds):
            for v in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
                us[v].append(per_invoke_us(gs[v], args.per_round))
        if manager.get_stats()["active_executions"] or manager.tracked_runs():
            raise AssertionError("executions or run ids left behind")
    finally:
        manager.close()
    return us


def summarize(us: dict[str, list[float]]) -> dict[str, Any]:
    bare = harness.median(us["bare"])
    table = [
        {
            "variant": v,
            "us": round(harness.median(xs), 1),
            "p10_us": round(harness.percentile(xs, 10), 1),
            "p90_us": round(harness.percentile(xs, 90), 1),
            "vs_bare": round(harness.median(xs) / bare, 3),
        }
        for v, xs in us.items()
    ]
    margin = [
        round((w - n) / b, 4)
        for w, n, b in zip(us["wrapped"], us["noop_handler"], us["bare"], strict=True)
    ]
    ratios = {r["variant"]: r["vs_bare"] for r in table}
    return {"table": table, "ratios": ratios, "margin": margin}


def main(argv: Sequence[str] | None = None) -> int:
    args = harness.parse(harness.arguments(__doc__, SIZES), argv)
    machine = harness.machine_info()
    return harness.finish("overhead", args, machine, summarize(run_rounds(args)))


if __name__ == "__main__":
    raise SystemExit(main())
