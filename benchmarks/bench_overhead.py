"""overhead: ``invoke`` of a wrapped against a bare trivial 2-node graph, as a ratio.

Variants, interleaved round by round in one process (the order flips every round,
so drift in machine load hits all of them alike):

* ``bare``: ``builder.compile()``;
* ``noop_handler``: the same graph with a do-nothing ``run_inline`` callback handler,
  which shows what LangChain's callback machinery costs once any handler is present;
* ``scope_only``: a handler that opens and releases one execution per root run through
  the manager's public API and ignores child runs: the cost of the execution itself,
  without the run-id map (a diagnostic, not something to deploy: nodes could not find
  their scope from their config);
* ``wrapped``: ``with_scoped_connections(builder.compile())``, which opens and closes
  one execution scope per run and maps every child run id to it.

The two nodes touch no database: the benchmark isolates the cost the wrapper adds to
every run.  The manager is given a URL it never connects to.  The target (issue 3) is
``wrapped / bare <= 1.10``; the performance issue asks for ``wrapped / bare <=
noop_handler / bare + 0.02`` in each run (the margin over the callback machinery's floor).

Run: ``python benchmarks/bench_overhead.py`` (``--rounds``, ``--per-round``, ``--profile``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, TypedDict

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    RESULTS_DIR,
    NoopHandler,
    Verdict,
    console,
    machine_info,
    median,
    percentile,
    print_machine,
    print_verdicts,
    table,
    write_result,
)
from langgraph.graph import END, START, StateGraph

import langgraph_scoped_conn as lsc

TARGET = 1.10
MARGIN_TARGET = 0.02
VARIANTS = ("bare", "noop_handler", "scope_only", "wrapped")
#: never connected to: the trivial graph opens no connection
UNUSED_URL = "postgresql+psycopg2://bench@127.0.0.1:1/overhead"


class State(TypedDict):
    n: int


class ScopeOnlyHandler(NoopHandler):
    """Opens and releases one execution per root run; does nothing for child runs."""

    def __init__(self, manager: lsc.ExecutionConnectionManager) -> None:
        self.manager = manager
        self.roots: dict[Any, Any] = {}

    def on_chain_start(self, serialized: Any, inputs: Any, **kw: Any) -> None:
        if kw.get("parent_run_id") is None:
            run_id = kw["run_id"]
            self.roots[run_id] = self.manager.open_execution(str(run_id))

    def on_chain_end(self, outputs: Any, **kw: Any) -> None:
        execution = self.roots.pop(kw["run_id"], None)
        if execution is not None:
            self.manager.release_execution(execution)


def build() -> Any:
    def first(state: State) -> State:
        return {"n": state["n"] + 1}

    def second(state: State) -> State:
        return {"n": state["n"] * 2}

    builder = StateGraph(State)
    builder.add_node("first", first)
    builder.add_node("second", second)
    builder.add_edge(START, "first")
    builder.add_edge("first", "second")
    builder.add_edge("second", END)
    return builder.compile()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=300, help="interleaved rounds")
    parser.add_argument("--per-round", type=int, default=20, help="invokes per variant per round")
    parser.add_argument("--warmup", type=int, default=300, help="untimed invokes per variant")
    parser.add_argument("--profile", action="store_true", help="pyinstrument the wrapped variant")
    parser.add_argument("--out", default="overhead", help="results file name (overhead)")
    args = parser.parse_args(argv)
    info = machine_info()
    print_machine(info)

    manager = lsc.ExecutionConnectionManager(UNUSED_URL)
    graphs = {
        "bare": build(),
        "noop_handler": build().with_config(callbacks=[NoopHandler()]),
        "scope_only": build().with_config(callbacks=[ScopeOnlyHandler(manager)]),
        "wrapped": lsc.with_scoped_connections(build(), manager=manager),
    }
    per_invoke: dict[str, list[float]] = {v: [] for v in VARIANTS}  # µs, one value per round
    paired: list[float] = []  # wrapped / bare within each round
    margins: list[float] = []  # wrapped / bare - noop_handler / bare within each round

    def run_round(variant: str, n: int) -> float:
        graph = graphs[variant]
        t0 = time.perf_counter_ns()
        for i in range(n):
            out = graph.invoke({"n": i})
            if out["n"] != (i + 1) * 2:
                raise AssertionError(f"{variant}: unexpected output {out!r}")
        return (time.perf_counter_ns() - t0) / 1e3 / n

    try:
        for v in VARIANTS:
            run_round(v, args.warmup)
        for r in range(args.rounds):
            order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
            this_round = {v: run_round(v, args.per_round) for v in order}
            for v, us in this_round.items():
                per_invoke[v].append(us)
            paired.append(this_round["wrapped"] / this_round["bare"])
            margins.append(
                (this_round["wrapped"] - this_round["noop_handler"]) / this_round["bare"]
            )
        stats = manager.get_stats()
        if stats["active_executions"] or manager.tracked_runs():
            raise AssertionError(f"scopes or run ids left behind: {stats['executions']}")
        scopes = stats["scopes_opened"]
        profile_path = None
        if args.profile:
            from pyinstrument import Profiler

            profiler = Profiler(interval=0.0001)
            profiler.start()
            run_round("wrapped", max(args.rounds * args.per_round // 4, 200))
            profiler.stop()
            profile_path = RESULTS_DIR / f"{args.out}_profile.txt"
            RESULTS_DIR.mkdir(parents=True, exist_ok=True)
            profile_path.write_text(profiler.output_text(unicode=False, color=False))
            console.print(f"[dim]profile written to {profile_path}[/dim]")
    finally:
        manager.close()

    medians = {v: median(per_invoke[v]) for v in VARIANTS}
    ratio = medians["wrapped"] / medians["bare"]
    margin = median(margins)
    floor = medians["noop_handler"] / medians["bare"]
    paired_ratio = median(paired)
    rows = [
        (
            v,
            medians[v],
            percentile(per_invoke[v], 10),
            percentile(per_invoke[v], 90),
            medians[v] / medians["bare"],
        )
        for v in VARIANTS
    ]
    console.print(
        table(
            f"invoke of a trivial 2-node graph, µs per invoke "
            f"({args.rounds} rounds x {args.per_round} invokes, interleaved)",
            ["variant", "median", "p10", "p90", "x bare"],
            rows,
        )
    )
    console.print(
        f"wrapped / bare: [bold]{ratio:.3f}x[/bold] (ratio of medians); "
        f"median of per-round ratios {paired_ratio:.3f}x; "
        f"handler share over a no-op handler: {medians['wrapped'] / medians['noop_handler']:.3f}x"
    )
    console.print(
        f"margin over the no-op handler (wrapped/bare - noop/bare): [bold]{margin:+.3f}[/bold] "
        f"(rounds p10-p90 {percentile(margins, 10):+.3f} to {percentile(margins, 90):+.3f}); "
        f"of which the execution alone (scope_only - noop): "
        f"{(medians['scope_only'] - medians['noop_handler']) / medians['bare']:+.3f}, "
        f"the run-id map and the rest (wrapped - scope_only): "
        f"{(medians['wrapped'] - medians['scope_only']) / medians['bare']:+.3f}"
    )
    verdicts = [
        Verdict(
            "overhead: margin over a no-op handler",
            f"wrapped/bare <= noop/bare + {MARGIN_TARGET:.2f}",
            f"{margin:+.3f} (floor noop/bare {floor:.3f}x; rounds p10-p90 "
            f"{percentile(margins, 10):+.3f} to {percentile(margins, 90):+.3f})",
            margin <= MARGIN_TARGET,
            data={"value": margin, "per_round": margins},
        ),
        Verdict(
            "overhead",
            f"wrapped / bare <= {TARGET:.2f}x",
            f"{ratio:.3f}x",
            ratio <= TARGET,
            note=(
                "a no-op callback handler alone costs "
                f"{medians['noop_handler'] / medians['bare']:.3f}x: LangChain builds callback "
                "managers and run ids for every node once any handler is present"
            ),
        ),
    ]
    print_verdicts(verdicts)
    write_result(
        args.out,
        {
            "benchmark": "overhead",
            "machine": info,
            "params": {
                "rounds": args.rounds,
                "per_round": args.per_round,
                "warmup": args.warmup,
                "graph": "StateGraph: START -> first -> second -> END, no database access",
            },
            "us_per_invoke": {
                v: {
                    "median": medians[v],
                    "p10": percentile(per_invoke[v], 10),
                    "p90": percentile(per_invoke[v], 90),
                }
                for v in VARIANTS
            },
            "ratio_wrapped_over_bare": ratio,
            "median_paired_ratio": paired_ratio,
            "ratio_noop_handler_over_bare": medians["noop_handler"] / medians["bare"],
            "ratio_wrapped_over_noop_handler": medians["wrapped"] / medians["noop_handler"],
            "margin_over_noop_handler": margin,
            "margin_per_round": margins,
            "ratio_scope_only_over_bare": medians["scope_only"] / medians["bare"],
            "scopes_opened": scopes,
            "profile": str(profile_path.relative_to(RESULTS_DIR.parent.parent))
            if profile_path
            else None,
            "verdicts": [v.as_dict() for v in verdicts],
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
