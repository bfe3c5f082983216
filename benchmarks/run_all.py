"""Run the benchmark plan: every figure, each run in its own process, N times over.

The plan (``PLAN``) names each run: a ``benchmarks/bench_*.py`` script and its arguments
(``storm`` and ``storm_executor20`` are the same script with 6 and 20 executor threads).
Each run starts its own PostgreSQL, prints rich tables and writes JSON into
``benchmarks/results/``.  With ``--repeat N`` every entry runs N times, writing
``<name>.run<i>.json``, interleaved: run 1 of every entry, then run 2 of every entry,
..., so a slow drift of the shared machine hits every benchmark alike.  Without it each
entry runs once and writes ``<name>.json``.  Afterwards this prints every target across
the runs and, with ``--markdown``, renders ``benchmarks/RESULTS.md``.

Run: ``python benchmarks/run_all.py --repeat 3 --markdown`` (every figure three times,
then RESULTS.md), ``--quick`` (small sizes), ``--only storm,acquire``, ``--list``,
``--markdown-only`` (re-render RESULTS.md), ``--readme`` (put the summary table between
``<!-- bench:start -->`` and ``<!-- bench:end -->`` in README.md, or print it).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import RESULTS_DIR, console, table  # noqa: E402

README = HERE.parent / "README.md"
README_START = "<!-- bench:start -->"
README_END = "<!-- bench:end -->"
#: this script's log of every run (exit code, seconds), by result file name
RUN_LOG = RESULTS_DIR / "run_all.json"


@dataclass(frozen=True)
class Entry:
    """One named run of the plan: ``benchmarks/<script> <args> --out <name>``."""

    name: str
    script: str
    args: tuple[str, ...] = ()
    about: str = ""


PLAN: tuple[Entry, ...] = (
    Entry("storm", "bench_storm.py", (), "K=1000 ainvoke storm, asyncio's default executor"),
    Entry(
        "storm_executor20",
        "bench_storm.py",
        ("--executor-threads", "20"),
        "the same with 20 executor threads (the budget), so the executor does not bind",
    ),
    Entry("storm_cold", "bench_storm.py", ("--cold",), "the cold storm: a new manager per round"),
    Entry("acquire", "bench_acquire.py", (), "new execution -> SQLDatabase -> first query"),
    Entry("cpu", "bench_cpu.py", (), "CPU per call on SQLite, scoped against a warm global"),
    Entry("overhead", "bench_overhead.py", (), "wrapped against bare trivial graph invoke"),
    Entry("reset", "bench_reset.py", (), "what DISCARD ALL on check-in costs"),
    Entry("soak", "bench_soak.py", (), "100,000 executions: memory and maps do not grow"),
    Entry("pgbouncer", "bench_pgbouncer.py", (), "4 processes through PgBouncer, and sizing"),
)

#: Small sizes for ``--quick``, by script, appended to the entry's own arguments.
QUICK_ARGS: dict[str, list[str]] = {
    "bench_storm.py": ["--k", "300", "--rounds", "2", "--slow-k", "100"],
    "bench_acquire.py": ["--n", "1000"],
    "bench_cpu.py": ["--rounds", "10"],
    "bench_overhead.py": ["--rounds", "60"],
    "bench_reset.py": ["--n", "1000"],
    "bench_soak.py": ["--n", "10000"],
    "bench_pgbouncer.py": ["--quick"],
}


def plan() -> list[Entry]:
    """``PLAN``, then any ``bench_<name>.py`` it does not name, with its defaults."""
    named = {e.script for e in PLAN}
    extra = [
        Entry(p.stem.removeprefix("bench_"), p.name)
        for p in sorted(HERE.glob("bench_*.py"))
        if p.name not in named
    ]
    return [*PLAN, *extra]


def missing_options(entry: Entry) -> list[str]:
    """Options of ``entry`` its script does not define (yet): such a run is skipped."""
    source = (HERE / entry.script).read_text()
    return [a for a in entry.args if a.startswith("--") and f'"{a}"' not in source]


def out_name(entry: Entry, run: int, repeat: int) -> str:
    return f"{entry.name}.run{run}" if repeat else entry.name


def run_one(entry: Entry, out: str, extra: list[str], label: str) -> dict[str, Any]:
    """Run one entry in its own process; its exit code, seconds and whether it wrote ``out``."""
    path = RESULTS_DIR / f"{out}.json"
    cmd = [sys.executable, str(HERE / entry.script), *entry.args, *extra, "--out", out]
    record: dict[str, Any] = {
        "name": entry.name,
        "out": out,
        "script": entry.script,
        "args": [*entry.args, *extra],
        "started": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    missing = missing_options(entry)
    if missing:
        console.rule(f"[bold]{label}[/bold]: skipped")
        console.print(f"[yellow]{entry.script} has no {', '.join(missing)} (yet)[/yellow]")
        return record | {"rc": None, "seconds": 0.0, "wrote": False, "skipped": missing}
    console.rule(f"[bold]{label}[/bold]: {' '.join(Path(c).name for c in cmd[1:])}")
    before = path.stat().st_mtime if path.exists() else None
    t0 = time.perf_counter()
    rc = subprocess.call(cmd, cwd=HERE.parent)
    seconds = round(time.perf_counter() - t0, 1)
    wrote = path.exists() and path.stat().st_mtime != before
    return record | {"rc": rc, "seconds": seconds, "wrote": wrote}


def set_aside(names: list[str]) -> Path | None:
    """Move earlier ``<name>.run<i>.json`` of these names to ``results/old/<time>/``.

    A new ``--repeat`` series then never mixes with the runs of an earlier one (a
    ``--repeat 2`` after a ``--repeat 3`` would otherwise leave an old run 3).
    """
    old = [p for n in names for p in sorted(RESULTS_DIR.glob(f"{n}.run*.json"))]
    if not old:
        return None
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    dest = RESULTS_DIR / "old" / stamp
    dest.mkdir(parents=True, exist_ok=True)
    for p in old:
        p.rename(dest / p.name)
    console.print(f"[dim]moved {len(old)} earlier run file(s) to {dest.relative_to(HERE)}[/dim]")
    return dest


def log_run(record: dict[str, Any]) -> None:
    """Add one run to ``results/run_all.json`` (kept across invocations, by result file)."""
    try:
        log = json.loads(RUN_LOG.read_text())
    except (OSError, ValueError):
        log = {}
    if not isinstance(log.get("runs"), dict):
        log = {"runs": {}}
    log["runs"][record["out"]] = record
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    tmp = RUN_LOG.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(log, indent=2) + "\n")
    tmp.replace(RUN_LOG)


def print_summary(records: list[dict[str, Any]], names: list[str], repeat: int) -> None:
    """The runs (exit code, seconds, what bound them), then every target across the runs."""
    import render_results as rr

    rows = []
    for r in records:
        data = rr.load_json(RESULTS_DIR / f"{r['out']}.json") if r.get("wrote") else None
        status = "skipped" if r.get("skipped") else r["rc"]
        rows.append(
            (
                r["out"],
                status,
                r["seconds"],
                "yes" if r.get("wrote") else "[red]no[/red]",
                (rr.binding_of(data) if data else "") or "-",
            )
        )
    console.rule("[bold]all runs[/bold]")
    console.print(table("runs", ["result file", "exit code", "seconds", "wrote", "binds"], rows))
    total = sum(r["seconds"] for r in records)
    console.print(f"total {total / 60:.1f} min")
    want = {r["out"] for r in records if r.get("wrote")}
    singles, runs = rr.load_results(RESULTS_DIR)
    trows = []
    width = repeat or 1
    for name in names:
        files = runs.get(name, {}) if repeat else {1: singles[name]} if name in singles else {}
        files = {i: p for i, p in files.items() if p.stem in want}
        if not files:
            continue
        datas = [rr.load_json(files[i]) if i in files else None for i in range(1, width + 1)]
        for t in rr.targets(name, datas):
            verdict = t.verdict().replace("**MISSED**", "[red]MISSED[/red]")
            trows.append((name, t.name, t.asks, *t.cells(), t.spread(), verdict))
    if trows:
        cols = ["benchmark", "target", "asks", *(f"run {i}" for i in range(1, width + 1))]
        console.print(table("targets across runs", [*cols, "spread", "verdict"], trows))


def update_readme() -> str:
    """Replace the text between the README's bench markers with the summary table.

    Returns what it did; prints the table instead when the markers are not there.
    """
    from render_results import readme_table

    text = readme_table()
    readme = README.read_text() if README.exists() else ""
    start, end = readme.find(README_START), readme.find(README_END)
    if start < 0 or end < start:
        print(text)
        return f"no {README_START} ... {README_END} in {README.name}: printed the table"
    new = readme[: start + len(README_START)] + "\n\n" + text + "\n\n" + readme[end:]
    README.write_text(new)
    return f"updated the table in {README}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="comma-separated plan names (storm,acquire,...)")
    parser.add_argument(
        "--repeat",
        type=int,
        default=0,
        help="run every entry N times, interleaved, to <name>.run<i>.json (default: once, "
        "to <name>.json)",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes (a few minutes)")
    parser.add_argument("--list", action="store_true", help="print the plan and exit")
    parser.add_argument(
        "--markdown", action="store_true", help="render benchmarks/RESULTS.md afterwards"
    )
    parser.add_argument(
        "--markdown-only", action="store_true", help="only render RESULTS.md from results/"
    )
    parser.add_argument(
        "--readme",
        action="store_true",
        help="put the summary table into README.md between the bench markers (or print it); "
        "runs no benchmark unless --markdown is given too",
    )
    args = parser.parse_args(argv)
    entries = plan()
    if args.list:
        for e in entries:
            console.print(f"{e.name:>18}  {e.script} {' '.join(e.args)}  [dim]{e.about}[/dim]")
        return 0
    if args.markdown_only or (args.readme and not args.markdown):
        if args.markdown_only:
            from render_results import render

            console.print(f"wrote {render()}")
        if args.readme:
            console.print(update_readme())
        return 0
    if args.repeat < 0:
        parser.error("--repeat must be at least 1")
    by_name = {e.name: e for e in entries}
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(by_name)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        parser.error(f"no plan entry named {unknown}; the plan: {', '.join(by_name)}")
    if args.repeat:
        set_aside(names)
    records = []
    for run in range(1, max(args.repeat, 1) + 1):
        for name in names:
            entry = by_name[name]
            extra = QUICK_ARGS.get(entry.script, []) if args.quick else []
            label = f"{name}, run {run} of {args.repeat}" if args.repeat else name
            record = run_one(entry, out_name(entry, run, args.repeat), extra, label)
            record["run"] = run
            record["quick"] = args.quick
            log_run(record)
            records.append(record)
    print_summary(records, names, args.repeat)
    if args.markdown:
        from render_results import render

        console.print(f"wrote {render()}")
        if args.readme:
            console.print(update_readme())
    return 0 if all(r["rc"] == 0 or r.get("skipped") for r in records) else 1


if __name__ == "__main__":
    raise SystemExit(main())
