"""Render ``RESULTS.md`` and the README's benchmark table from the result files.

Each benchmark's runs are ``<name>.run<i>.json`` (``run_all.py --repeat N``), else
``<name>.json``.  Every figure (``figures.py``) gets one column per run and a verdict
that holds only if it held in every run; ``RESULTS.md`` adds each run's machine and
the last run's tables.  Only what a result file holds is shown.

Run: ``python -m benchmarks.render`` (writes ``benchmarks/RESULTS.md`` from
``benchmarks/results/``), ``--results DIR`` (writes ``DIR/RESULTS.md``), ``--readme``
(prints the README's table instead).
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.figures import BENCHMARKS, Figure, figures, fmt, tables

HERE = Path(__file__).resolve().parent


def load(results: Path) -> dict[str, list[dict[str, Any]]]:
    """Benchmark name -> its runs, in run order (only benchmarks with a result file)."""
    out = {}
    for name in BENCHMARKS:
        numbered = {
            int(m.group(1)): p
            for p in results.glob(f"{name}.run*.json")
            if (m := re.fullmatch(rf"{name}\.run(\d+)\.json", p.name))
        }
        paths = [numbered[i] for i in sorted(numbered)] or list(results.glob(f"{name}.json"))
        if paths:
            out[name] = [json.loads(p.read_text()) for p in paths]
    return out


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    for row in rows:
        cells = (fmt(c).replace("|", "\\|").replace("\n", " ") for c in row)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(figure: Figure, values: list[Any]) -> str:
    held = [figure.holds(v) for v in values]
    if not figure.target or None in held:
        return "-"
    missed = held.count(False)
    return "holds" if not missed else f"**missed** ({missed} of {len(held)})"


def figure_rows(
    runs: dict[str, list[dict[str, Any]]], readme: bool
) -> tuple[list[str], list[list[Any]]]:
    """The figures table: benchmark, figure, target, one column per run, verdict."""
    width = max((len(r) for r in runs.values()), default=1)
    rows = []
    for name, results in runs.items():
        for f in figures(name):
            if readme and not f.readme:
                continue
            values = [f.value(r) for r in results]
            cells = values + [None] * (width - len(values))
            rows.append([name, f.label, f.target or "-", *cells, verdict(f, values)])
    headers = ["benchmark", "figure", "target", *(f"run {i + 1}" for i in range(width)), "verdict"]
    return headers, rows


def readme_table(results: Path) -> str:
    """The README's one table: every figure with a README target, every run."""
    return md_table(*figure_rows(load(results), readme=True))


def machine_line(i: int, result: dict[str, Any]) -> str:
    m, p = result["machine"], result["params"]
    sizes = ", ".join(
        f"{k}={v}" for k, v in p.items() if isinstance(v, int | float) and k != "quick"
    )
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    return (
        f"- run {i + 1}: {m['date']}, code {m['code'].split()[0]}, {m['nproc']} CPU ({m['cpu']}), "
        f"load {m['load_avg_at_start']}; {sizes}{' (quick)' if p.get('quick') else ''}; {versions}"
    )


def results_md(results: Path) -> str:
    runs = load(results)
    out = [
        "# Benchmark results",
        "",
        "Rendered by `python -m benchmarks.render` from the result files of "
        "`python -m benchmarks.run_all --repeat 3`; every ratio is taken within one run. "
        "A verdict holds only if it held in every run.",
        "",
        "## The README's table",
        "",
        readme_table(results),
    ]
    for name, rs in runs.items():
        out += ["", f"## {name}", "", BENCHMARKS[name] + ".", ""]
        out += [machine_line(i, r) for i, r in enumerate(rs)]
        out += ["", md_table(*figure_rows({name: rs}, readme=False))]
        for title, columns, rows in tables(name, rs[-1]):
            cells = [[row.get(c.key) for c in columns] for row in rows]
            out += [
                "",
                f"`{title}`, run {len(rs)}:",
                "",
                md_table([c.header for c in columns], cells),
            ]
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default=str(HERE / "results"), help="result directory")
    parser.add_argument("--readme", action="store_true", help="print the README's table")
    args = parser.parse_args(argv)
    results = Path(args.results)
    if args.readme:
        print(readme_table(results))
        return 0
    out = HERE / "RESULTS.md" if results.resolve() == (HERE / "results") else results / "RESULTS.md"
    out.write_text(results_md(results))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
