"""Compare two checkouts of the package, old against new, in alternating processes.

Each benchmark runs once per side per round, every run in its own process with the
same arguments; the order flips every round (old, new, new, old, old, new, ...), so
drift in the machine's load hits both sides alike.  A round's ``new / old`` pairs the
two runs next to each other.  The old checkout is a ``git worktree``; this copies the
current ``benchmarks/*.py`` into it first, so both sides run the same scripts.

Run::

    git worktree add /tmp/bench-old bc9acd4
    python benchmarks/compare_commits.py --old /tmp/bench-old --rounds 4
    git worktree remove --force /tmp/bench-old

Writes ``benchmarks/results/compare.json`` (render with ``render_results.py``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import console, median, table, write_result  # noqa: E402

#: benchmark -> (default arguments, {metric: path in its result JSON})
BENCHMARKS: dict[str, tuple[str, dict[str, tuple[str, ...]]]] = {
    "overhead": (
        "--rounds 300 --per-round 20 --warmup 300",
        {
            "wrapped / bare": ("ratio_wrapped_over_bare",),
            "wrapped / bare, median of per-round": ("median_paired_ratio",),
            "no-op handler / bare": ("ratio_noop_handler_over_bare",),
            "wrapped / no-op handler": ("ratio_wrapped_over_noop_handler",),
        },
    ),
    "acquire": (
        "--n 3000 --warmup 200 --slow-every 100000",
        {
            "shared / unscoped warm": ("summary", "shared", "vs_unscoped_warm"),
            "shared us": ("summary", "shared", "median_us"),
            "unscoped warm us": ("summary", "unscoped_warm", "median_us"),
        },
    ),
    "reset": (
        "--n 3000 --warmup 200 --count 200",
        {
            "read_only / unscoped warm": ("summary", "read_only", "vs_unscoped_warm"),
            "write / unscoped warm": ("summary", "write", "vs_unscoped_warm"),
            "write / read_only": ("write_over_read_only",),
            "read_only us": ("summary", "read_only", "median_us"),
            "write us": ("summary", "write", "median_us"),
            "unscoped warm us": ("summary", "unscoped_warm", "median_us"),
            "read_only round trips": ("summary", "read_only", "round_trips_per_call"),
            "write round trips": ("summary", "write", "round_trips_per_call"),
            "unscoped warm round trips": ("summary", "unscoped_warm", "round_trips_per_call"),
        },
    ),
}


def dig(data: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def run_side(root: Path, bench: str, args: list[str], out: str) -> dict[str, Any]:
    script = root / "benchmarks" / f"bench_{bench}.py"
    cmd = [sys.executable, str(script), *args, "--out", out]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, check=False, cwd=root, capture_output=True, text=True)
    path = root / "benchmarks" / "results" / f"{out}.json"
    if not path.exists():
        console.print(proc.stdout[-3000:], proc.stderr[-3000:])
        raise SystemExit(f"{bench} on {root} wrote no result (exit code {proc.returncode})")
    data = json.loads(path.read_text())
    path.unlink()
    data["_seconds"] = round(time.perf_counter() - t0, 1)
    data["_rc"] = proc.returncode
    return data


def report(
    args: argparse.Namespace,
    sides: dict[str, Path],
    names: list[str],
    runs: dict[str, list[dict[str, Any]]],
    machine: dict[str, Any],
    show: bool,
) -> None:
    """Summarise the rounds so far and write the result file (after every round)."""
    summary: dict[str, dict[str, Any]] = {}
    for name in names:
        rows = runs[name]
        summary[name] = {}
        for metric in BENCHMARKS[name][1]:
            old = [x["old"][metric] for x in rows if x["old"][metric] is not None]
            new = [x["new"][metric] for x in rows if x["new"][metric] is not None]
            pairs = [
                x["new"][metric] / x["old"][metric]
                for x in rows
                if x["new"][metric] is not None and x["old"][metric]
            ]
            summary[name][metric] = {
                "old": old,
                "new": new,
                "old_median": median(old) if old else None,
                "new_median": median(new) if new else None,
                "new_over_old_per_round": [round(p, 3) for p in pairs],
                "new_over_old_median": round(median(pairs), 3) if pairs else None,
            }
        if show:
            console.print(
                table(
                    f"{name}: old {rows[0]['old']['code']} vs new {rows[0]['new']['code']}, "
                    f"{len(rows)} rounds, separate processes, order flipped every round",
                    [
                        "metric",
                        "old per round",
                        "new per round",
                        "new/old per round",
                        "new/old med",
                    ],
                    [
                        (
                            m,
                            " ".join(
                                f"{x:.3f}" if isinstance(x, float) else str(x) for x in s["old"]
                            ),
                            " ".join(
                                f"{x:.3f}" if isinstance(x, float) else str(x) for x in s["new"]
                            ),
                            " ".join(f"{x:.3f}" for x in s["new_over_old_per_round"]),
                            s["new_over_old_median"],
                        )
                        for m, s in summary[name].items()
                    ],
                )
            )
    write_result(
        args.out,
        {
            "benchmark": "compare",
            "machine": machine,
            "params": {
                "rounds": len(runs[names[0]]),
                "old": str(sides["old"]),
                "new": str(sides["new"]),
                "args": {n: getattr(args, f"{n.replace('-', '_')}_args") for n in names},
            },
            "runs": runs,
            "summary": summary,
        },
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", default="/tmp/bench-old", help="the old checkout (a worktree)")
    parser.add_argument("--new", default=str(HERE.parent), help="the new checkout (this one)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per side")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="benchmarks to compare")
    for name, (default, _) in BENCHMARKS.items():
        parser.add_argument(f"--{name}-args", default=default, help=f"({default})")
    parser.add_argument("--out", default="compare", help="results file name (compare)")
    args = parser.parse_args(argv)
    sides = {"old": Path(args.old).resolve(), "new": Path(args.new).resolve()}
    if sides["old"] != sides["new"]:
        for script in HERE.glob("*.py"):  # the same scripts on both sides
            shutil.copy2(script, sides["old"] / "benchmarks" / script.name)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    machine: dict[str, Any] = {}
    for r in range(args.rounds):
        order = ("old", "new") if r % 2 == 0 else ("new", "old")
        for name in names:
            bench_args = shlex.split(getattr(args, f"{name.replace('-', '_')}_args"))
            row: dict[str, Any] = {"round": r + 1, "order": "/".join(order)}
            for side in order:
                data = run_side(sides[side], name, bench_args, f"cmp_{name}_{side}_r{r + 1}")
                metrics = {m: dig(data, p) for m, p in BENCHMARKS[name][1].items()}
                row[side] = {
                    "code": data["machine"].get("code"),
                    "load_avg_at_start": data["machine"].get("load_avg_at_start"),
                    "seconds": data["_seconds"],
                    **metrics,
                }
                if side == "new" and not machine:
                    machine = data["machine"]
                console.print(
                    f"round {r + 1} {name:9} {side}: "
                    + ", ".join(
                        f"{m} {v:.3f}" if isinstance(v, float) else f"{m} {v}"
                        for m, v in metrics.items()
                    )
                )
            runs[name].append(row)
        report(args, sides, names, runs, machine, show=r == args.rounds - 1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
