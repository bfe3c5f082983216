"""Run the benchmark plan: every benchmark in its own process, N times over, interleaved.

``--repeat N`` runs run 1 of every benchmark, then run 2 of every benchmark, ..., each
writing ``<name>.run<i>.json``, so a slow drift of a shared machine hits them all alike;
without it each runs once to ``<name>.json``.  Then ``RESULTS.md`` is rendered and the
README's table printed (``render.py``).

Run: ``python -m benchmarks.run_all --repeat 3`` (the final figures),
``--quick`` (small sizes, into ``results/quick/``), ``--only storm,acquire``, ``--list``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks import render
from benchmarks.figures import BENCHMARKS
from benchmarks.harness import RESULTS_DIR, console, table

ROOT = Path(__file__).resolve().parent.parent


def set_aside(results: Path, names: Sequence[str]) -> None:
    """Move an earlier series' ``<name>.run<i>.json`` to ``old/<time>/``: runs never mix."""
    old = [p for n in names for p in results.glob(f"{n}.run*.json")]
    if old:
        dest = results / "old" / _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        dest.mkdir(parents=True)
        for p in old:
            p.rename(dest / p.name)
        console.print(f"[dim]moved {len(old)} earlier run file(s) to {dest}[/dim]")


def run_one(name: str, out: str, results: Path, quick: bool) -> tuple[int, float]:
    """``python -m benchmarks.bench_<name>`` from the repository root: (exit code, seconds)."""
    cmd = [sys.executable, "-m", f"benchmarks.bench_{name}", "--out", out]
    cmd += ["--results", str(results), *(["--quick"] if quick else [])]
    console.rule(f"[bold]{out}[/bold]: {' '.join(cmd[1:])}")
    t0 = time.perf_counter()
    rc = subprocess.call(cmd, cwd=ROOT)
    return rc, round(time.perf_counter() - t0, 1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=0, help="runs per benchmark, interleaved")
    parser.add_argument("--quick", action="store_true", help="small sizes, into results/quick/")
    parser.add_argument("--only", default="", help=f"comma-separated: {', '.join(BENCHMARKS)}")
    parser.add_argument("--list", action="store_true", help="print the plan and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, about in BENCHMARKS.items():
            console.print(f"{name:>10}  {about}")
        return 0
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(BENCHMARKS)
    if unknown := set(names) - set(BENCHMARKS):
        parser.error(f"not in the plan: {sorted(unknown)}")
    results = RESULTS_DIR / "quick" if args.quick else RESULTS_DIR
    if args.repeat:
        set_aside(results, names)
    done = []
    for run in range(1, max(args.repeat, 1) + 1):
        for name in names:
            out = f"{name}.run{run}" if args.repeat else name
            done.append((out, *run_one(name, out, results, args.quick)))
    status = {0: "ok", 3: "a target missed"}
    rows = [(out, status.get(rc, f"failed (exit code {rc})"), s) for out, rc, s in done]
    console.print(table("runs", ["result", "outcome", "seconds"], rows))
    render.main(["--results", str(results)])
    console.print(render.readme_table(results))
    return max(rc for _, rc, _ in done)


if __name__ == "__main__":
    raise SystemExit(main())
