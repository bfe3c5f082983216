"""memory: 10,000 executions opened and closed at once; what the process keeps afterwards.

Each measurement runs in a fresh process (memory freed by one mode stays with the
allocator and would blur the next): K concurrent ``ainvoke`` of the storm's 3-tool-call
graph (``select 1`` per call, 20 executor threads, budget 10), then every execution
closed, the manager drained and a full collection.  Modes: ``global_from_uri`` (the
tutorial's global SQLDatabase) and ``shared`` (the package), the order flipped every
round.  Each child reports RSS before (after a warm-up of 100 runs), its peak, after
close, and after a second pass of the same K (memory a later pass reuses does not grow
it).  One more ``shared`` child runs a smaller pass (``--traced-k``) under ``tracemalloc``
and lists the allocations still alive after close, by line and by stack: where the
retained memory goes.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import queue
import sys
import time
import tracemalloc
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from benchmarks import harness
from benchmarks.bench_storm import prepare, storm

MODES = ("global_from_uri", "shared")
THREADS, BUDGET = 20, 10
SIZES = {
    "k": (10_000, 2_000, "executions open at once, per pass"),
    "rounds": (1, 1, "rounds of one child per mode"),
    "traced_k": (1_000, 200, "executions of the traced pass (tracemalloc makes a run ~13x slower)"),
    "top": (12, 8, "allocation sites listed"),
}


def one_pass(setup: Any, k: int) -> int:
    """K concurrent runs, then wait for every release; the runs that succeeded."""
    executor = ThreadPoolExecutor(THREADS, thread_name_prefix="memory")
    result = asyncio.run(storm(setup.graph, k, executor))
    if setup.manager is not None:
        setup.manager.drain(timeout=60)
    harness.full_gc()
    return len(result["latencies"])


def allocations(before: Any, after: Any, top: int) -> list[dict[str, Any]]:
    """The ``top`` allocation sites grown from ``before`` to ``after``, then the top 3 stacks."""
    rows = []
    for key, limit, depth in (("lineno", top, 1), ("traceback", 3, 8)):
        for stat in after.compare_to(before, key)[:limit]:
            frames = list(stat.traceback)[-depth:][::-1]  # innermost first
            rows.append(
                {
                    "by": key,
                    "where": " <- ".join(f"{_short(f.filename)}:{f.lineno}" for f in frames),
                    "kb": round(stat.size_diff / 1024, 1),
                    "count": stat.count_diff,
                }
            )
    return rows


def _short(path: str) -> str:
    """A file's path from its package on (site-packages, the standard library, this checkout)."""
    stdlib = f"/lib/python{sys.version_info.major}.{sys.version_info.minor}/"
    for marker in ("site-packages/", stdlib, f"{harness.HERE.parent}/"):
        if marker in path:
            return path.partition(marker)[2]
    return path


def child(mode: str, url: str, k: int, trace: bool, top: int, results: Any) -> None:
    """One fresh process: warm up, a pass (traced or twice), report on ``results``."""
    setup = prepare(mode, url, BUDGET, sql="select 1")
    try:
        one_pass(setup, 100)
        report: dict[str, Any] = {"mode": mode, "rss_before_mb": round(harness.rss_mb(), 1)}
        if trace:
            tracemalloc.start(10)
            before = tracemalloc.take_snapshot()
            report["ok"] = one_pass(setup, k)
            snapshot = tracemalloc.take_snapshot()
            after, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            report["traced_peak_mb"] = round(peak / 2**20, 1)
            report["traced_after_mb"] = round(after / 2**20, 2)
            report["allocations"] = allocations(before, snapshot, top)
        else:
            rss = harness.Sampler(harness.rss_mb, 0.02)
            with rss:
                report["ok"] = one_pass(setup, k)
            report["rss_peak_mb"] = round(rss.peak, 1)
            report["rss_after_mb"] = round(harness.rss_mb(), 1)
            report["ok"] += one_pass(setup, k)
            report["rss_second_mb"] = round(harness.rss_mb(), 1)
    finally:
        setup.close()
    results.put(report)


def spawn(url: str, mode: str, k: int, trace: bool, top: int) -> dict[str, Any]:
    """Run :func:`child` in a fresh process; its report."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=child, args=(mode, url, k, trace, top, results))
    t0 = time.perf_counter()
    proc.start()
    try:
        while True:
            try:
                report: dict[str, Any] = results.get(timeout=1)
                break
            except queue.Empty:
                if not proc.is_alive():
                    raise RuntimeError(f"the {mode} child died (exit {proc.exitcode})") from None
    finally:
        proc.join(timeout=60)
    shown = {k: v for k, v in report.items() if k != "allocations"}
    took = time.perf_counter() - t0
    harness.console.print(f"{mode}{' traced' if trace else ''} ({took:.0f} s): {shown}")
    return report


def summarize(reports: list[dict[str, Any]], traced: dict[str, Any]) -> dict[str, Any]:
    table = [
        r
        | {
            "retained_mb": round(r["rss_after_mb"] - r["rss_before_mb"], 1),
            "retained_second_mb": round(r["rss_second_mb"] - r["rss_before_mb"], 1),
        }
        for r in reports
    ]

    def per_round(mode: str, key: str) -> list[float]:
        return [r[key] for r in table if r["mode"] == mode]

    return {
        "table": table,
        "rss_after_over_global_mb": [
            round(s - g, 1)
            for s, g in zip(
                per_round("shared", "rss_after_mb"),
                per_round("global_from_uri", "rss_after_mb"),
                strict=True,
            )
        ],
        "retained_mb": {m: per_round(m, "retained_mb") for m in MODES},
        "second_pass_growth_mb": {
            m: [
                round(b - a, 1)
                for a, b in zip(
                    per_round(m, "rss_after_mb"), per_round(m, "rss_second_mb"), strict=True
                )
            ]
            for m in MODES
        },
        "allocations": traced["allocations"],
        "traced": {k: v for k, v in traced.items() if k != "allocations"},
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = harness.parse(harness.arguments(__doc__, SIZES), argv)
    machine = harness.machine_info()
    reports = []
    with harness.bench_server() as server:
        for rnd in range(args.rounds):
            for mode in MODES if rnd % 2 == 0 else MODES[::-1]:
                reports.append(spawn(server.url(), mode, args.k, False, args.top) | {"round": rnd})
        traced = spawn(server.url(), "shared", args.traced_k, True, args.top)
    return harness.finish("memory", args, machine, summarize(reports, traced))


if __name__ == "__main__":
    raise SystemExit(main())
