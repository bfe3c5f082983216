"""Run every ``benchmarks/bench_*.py``, one after the other, each in its own process.

Each benchmark starts its own PostgreSQL, prints rich tables and writes JSON into
``benchmarks/results/``.  Afterwards this prints one table of every target and,
with ``--markdown``, renders ``benchmarks/RESULTS.md`` from the JSON files.

Run: ``python benchmarks/run_all.py`` (full sizes), ``--quick`` (small sizes, a few
minutes), ``--only storm,acquire``, ``--markdown-only`` (re-render RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import RESULTS_DIR, console, table  # noqa: E402

#: Small sizes for ``--quick``; benchmarks not listed run with their defaults.
QUICK_ARGS: dict[str, list[str]] = {
    "storm": ["--k", "300", "--rounds", "2", "--slow-k", "100"],
    "acquire": ["--n", "1000"],
    "soak": ["--n", "10000"],
}


def discover() -> dict[str, Path]:
    """Every ``bench_<name>.py`` next to this file, by ``<name>``."""
    return {p.stem.removeprefix("bench_"): p for p in sorted(HERE.glob("bench_*.py"))}


def run_one(name: str, path: Path, extra: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, str(path), *extra]
    console.rule(f"[bold]{name}[/bold]: {' '.join(Path(c).name for c in cmd[1:])}")
    t0 = time.perf_counter()
    rc = subprocess.call(cmd, cwd=HERE.parent)
    return {"name": name, "rc": rc, "seconds": round(time.perf_counter() - t0, 1)}


def collect_verdicts(since: float) -> list[tuple[str, dict[str, Any]]]:
    """(file, verdict) pairs from result files written after ``since``."""
    out = []
    for path in sorted(RESULTS_DIR.glob("*.json")):
        if path.stat().st_mtime < since:
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        for v in data.get("verdicts", []) if isinstance(data, dict) else []:
            if isinstance(v, dict):
                out.append((path.stem, v))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="comma-separated names (storm,acquire,...)")
    parser.add_argument("--quick", action="store_true", help="small sizes (a few minutes)")
    parser.add_argument(
        "--markdown", action="store_true", help="render benchmarks/RESULTS.md afterwards"
    )
    parser.add_argument(
        "--markdown-only", action="store_true", help="only render RESULTS.md from results/"
    )
    args = parser.parse_args(argv)
    if args.markdown_only:
        from render_results import render

        console.print(f"wrote {render()}")
        return 0
    found = discover()
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(found)
    unknown = [n for n in names if n not in found]
    if unknown:
        parser.error(f"no benchmark named {unknown}; found {', '.join(found)}")
    started = time.time()
    runs = [run_one(n, found[n], QUICK_ARGS.get(n, []) if args.quick else []) for n in names]
    console.rule("[bold]all benchmarks[/bold]")
    console.print(
        table(
            "runs",
            ["benchmark", "exit code", "seconds"],
            [(r["name"], r["rc"], r["seconds"]) for r in runs],
        )
    )
    verdicts = collect_verdicts(started)
    if verdicts:
        console.print(
            table(
                "targets",
                ["result file", "target", "asks", "measured", "verdict"],
                [
                    (
                        f,
                        v.get("name", ""),
                        v.get("target", ""),
                        v.get("measured", ""),
                        "[green]holds[/green]" if v.get("ok") else "[red]MISSED[/red]",
                    )
                    for f, v in verdicts
                ],
            )
        )
    if args.markdown:
        from render_results import render

        console.print(f"wrote {render()}")
    return 0 if all(r["rc"] == 0 for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
