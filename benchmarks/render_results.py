"""Render ``benchmarks/RESULTS.md`` from the JSON files in ``benchmarks/results/``.

Only measured numbers go in: every table comes from a result file, with the date,
machine and versions recorded by the run that wrote it.  Benchmarks this file does
not know get their targets table.

Repeated runs (``run_all.py --repeat N`` writes ``<name>.run<i>.json``) render as one
section per name: each run's date, code, machine, load and what bound it, every target
in every run with the spread and a verdict that holds only if it held in every run, then
the latest complete run in full.  A plain ``<name>.json`` renders as before when no run
files of that name exist.  The file opens with a summary of every target across runs,
the table ``readme_table()`` returns for the README.

Run: ``python benchmarks/render_results.py`` (or ``run_all.py --markdown-only``).
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
OUT = HERE / "RESULTS.md"
KNOWN = ("storm", "acquire", "cpu", "overhead", "soak", "pgbouncer", "reset", "compare")
#: the order of names that share a prefix (``run_all.py``'s plan)
ORDER = ("storm", "storm_executor20", "storm_cold")
#: ``<name>.run<i>.json``: run i of ``run_all.py --repeat N``
RUN_FILE = re.compile(r"^(?P<name>.+)\.run(?P<i>[0-9]+)$")
#: result files not rendered (scratch and development runs)
SKIPPED = re.compile(r"_(dev|prof|scratch)[0-9]*$")
#: ``run_all.py``'s log of every run it made (exit code, seconds), by result file
RUN_LOG = "run_all.json"


def _f(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        if abs(x) >= 100:
            return f"{x:,.0f}"
        if abs(x) >= 10:
            return f"{x:.1f}"
        return f"{x:.2f}" if abs(x) >= 1 else f"{x:.3g}"
    if isinstance(x, int):
        return f"{x:,}" if abs(x) >= 10_000 else str(x)
    return str(x).replace("|", "\\|").replace("\n", " ")


def md_table(columns: list[str], rows: list[list[Any]]) -> str:
    align = ["---"] + ["---:"] * (len(columns) - 1)
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(_f(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_line(m: dict[str, Any]) -> str:
    v = m.get("versions", {})
    versions = ", ".join(f"{k} {val}" for k, val in v.items())
    pg = f", PostgreSQL {m['postgresql']}" if m.get("postgresql") else ""
    load = m.get("load_avg_at_start")
    return (
        f"*{m.get('date', '?')}; {m.get('nproc', '?')} CPU ({m.get('cpu', '?')}), "
        f"{m.get('ram_gb', '?')} GB RAM; load average at start {load}; {versions}{pg}.*"
    )


def verdicts(data: dict[str, Any]) -> str:
    rows = [
        [v.get("name"), v.get("target"), v.get("measured"), "holds" if v.get("ok") else "MISSED"]
        for v in data.get("verdicts", [])
        if isinstance(v, dict)
    ]
    return md_table(["target", "asks", "measured", "verdict"], rows) if rows else ""


def storm(d: dict[str, Any]) -> str:
    from statistics import median

    p = d["params"]
    c = d["ceilings"]
    cold = bool(p.get("cold"))
    counted = d.get("round_trips") or {}
    rows = []
    for mode, s in d["summary"].items():
        rows.append(
            [
                f"`{mode}`",
                f"{s['succeeded']}/{s['k'] * s['rounds']}",
                s["failed"],
                s["peak_backends"],
                s["in_use_after"],
                s["backends_after"],
                s["backends_after_cleanup"],
                s["exec_per_s"],
                s["p50_ms"],
                s["p99_ms"],
                s.get("of_budget_ceiling", s.get("of_server_ceiling")),
                s.get("of_executor_ceiling"),
                s["of_cpu_ceiling"],
                s["vs_global"],
                s["cpu_ms_per_exec"],
                s.get("cpu_vs_global"),
                s.get("round_trips_per_exec"),
            ]
        )
    errors = []
    for mode, s in d["summary"].items():
        for text, n in s["errors"].items():
            errors.append(f"- `{mode}`, {n}x: `{text}`")
    slow = [m for m in ("naive", "per_execution") if m in d["summary"]]
    slow_text = (
        f" ({' and '.join(f'`{m}`' for m in slow)}, which run at a few exec/s, in "
        f"{p.get('slow_rounds', p['rounds'])} with K={p.get('slow_k', p['k'])})"
    )
    async_text = (
        " `shared_async`: the same graph with an `async def` tool that awaits `db.arun(...)`."
    )
    out = [
        f"K={p['k']} concurrent `ainvoke` of a ToolNode graph (agent -> tools -> agent) whose "
        f"tool runs `{p['query']}` x{p['queries_per_tool']} through a SQLDatabase; PostgreSQL "
        f"max_connections={p['server_max_connections']} "
        f"(superuser_reserved_connections={p['superuser_reserved_connections']}; the app connects "
        f"as a non-superuser, so 27 slots are its); budget {p['budget']}; asyncio default "
        f"executor: {p['executor_threads']} threads. {p['rounds']} interleaved "
        f"round{'s' * (p['rounds'] != 1)}, compared "
        "modes back to back with the order flipped every round"
        + (slow_text if slow else "")
        + "; medians."
        + (async_text if "shared_async" in d["summary"] else ""),
    ]
    if cold:
        out += [
            "",
            "**Cold storm** (`--cold`): `shared` with the package's defaults but for the "
            "budget, `shared_warm_schema` with `warm_schema=True`; "
            + str(p.get("cold_note") or "a new manager in every shared round's timing")
            + ".",
        ]
    out += [
        "",
        md_table(
            [
                "mode",
                "ok",
                "failed",
                "peak backends",
                "in use after",
                "backends after",
                "after close/gc",
                "exec/s",
                "p50 ms",
                "p99 ms",
                "x budget ceiling",
                "x executor ceiling",
                "x CPU ceiling",
                "x global",
                "CPU ms/exec",
                "CPU x global",
                "round trips/exec",
            ],
            rows,
        ),
        "",
        "Ceilings (exec/s): "
        + ", ".join(
            f"{'budget' if k == 'server' else k} {_f(v)}" for k, v in c.items() if k != "binding"
        )
        + f"; **binding: {'budget' if c['binding'] == 'server' else c['binding']}**"
        + ("" if "cpu" in c else " (CPU ceiling not measured in this run)")
        + ". Budget = budget / (3 x 10 ms); executor = min(budget, executor threads) / "
        "(3 x 10 ms) (sync tools and `arun()` wait in asyncio's default executor); CPU = the "
        "same graph with a no-I/O tool, measured in the same run.",
    ]
    ratios = [
        ("shared_vs_global_per_round", "`shared` / `global` exec/s"),
        ("shared_vs_global_cpu_per_round", "`shared` / `global` CPU per execution"),
        ("shared_async_vs_shared_per_round", "`shared_async` / `shared` exec/s"),
        ("shared_async_vs_shared_cpu_per_round", "`shared_async` / `shared` CPU per execution"),
        ("shared_warm_schema_vs_global_per_round", "`shared_warm_schema` / `global` exec/s"),
        ("cpu_scoped_vs_cpu_per_round", "`cpu_scoped` / `cpu` exec/s"),
    ]
    lines = [
        f"- {label}: {', '.join(f'{x:g}' for x in d[key])} (median {median(d[key]):.3f})"
        for key, label in ratios
        if d.get(key)
    ]
    if lines:
        out += ["", "Per round (paired, the same round):", "", *lines]
    if counted:
        out += [
            "",
            "Round trips per execution: statements the app role sent, from the server's "
            "`log_statement=all` log, in a counting phase after the timed rounds (fresh "
            "engines and managers; one storm of K to open the pool, the next K counted: "
            f"K={p.get('count_k')}, `naive` and `per_execution` K={p.get('count_slow_k')}):",
            "",
            *(
                f"- `{mode}`: {_f(rt.get('per_exec'))} = "
                + ", ".join(
                    f"`{text}` x{n:g}" for text, n in (rt.get("statements_per_exec") or {}).items()
                )
                for mode, rt in counted.items()
            ),
        ]
    elif cold:
        out += ["", "Round trips are not counted with `--cold` (see the warm storms)."]
    if errors:
        out += ["", "Failures:", "", *errors]
    return "\n".join(out)


def acquire(d: dict[str, Any]) -> str:
    summary = d["summary"]
    shared_us = summary["shared"]["median_us"]
    rows = [
        [
            f"`{v}`",
            s["n"],
            s["median_us"],
            s["p10_us"],
            s["p90_us"],
            s.get("p99_us"),
            s["vs_unscoped_warm"],
            round(s["median_us"] / shared_us, 2),
            s.get("round_trips"),
        ]
        for v, s in summary.items()
    ]
    p = d["params"]
    out = [
        "New execution -> SQLDatabase -> first `select 1`, interleaved iteration by "
        f"iteration (n={p['n']}); microseconds. Round trips: statements the app role sent "
        "per execution, from the server's `log_statement=all` log (a separate phase, "
        f"{p.get('count', '?')} executions per variant, {p.get('count_slow', '?')} of the "
        "`per_execution` ones; connection set-up is not a statement and not counted).",
        "",
        md_table(
            [
                "variant",
                "n",
                "median",
                "p10",
                "p90",
                "p99",
                "x unscoped warm",
                "x shared",
                "round trips",
            ],
            rows,
        ),
    ]
    anchors = d.get("anchors", {})
    if anchors:
        out += [
            "",
            "`shared` against each anchor, same run (ratio of medians, and the median of the "
            "per-iteration ratios):",
            "",
            md_table(
                [
                    "anchor",
                    "anchor us",
                    "shared us",
                    "shared / anchor",
                    "paired",
                    "anchor round trips",
                    "shared round trips",
                ],
                [
                    [
                        f"`{a}`",
                        x["anchor_median_us"],
                        x["shared_median_us"],
                        x["shared_over_anchor"],
                        x["shared_over_anchor_paired"],
                        x["anchor_round_trips"],
                        x["shared_round_trips"],
                    ]
                    for a, x in anchors.items()
                ],
            ),
        ]
    statements = [
        f"- `{v}`: "
        + ", ".join(
            f"`{k if len(k) <= 60 else k[:57] + '...'}` x{_f(c)}"
            for k, c in list(s["statements_per_iteration"].items())[:6]
        )
        + (
            f" (+{len(s['statements_per_iteration']) - 6} more)"
            if len(s["statements_per_iteration"]) > 6
            else ""
        )
        for v, s in summary.items()
        if s.get("statements_per_iteration")
    ]
    if statements:
        out += ["", "Statements per execution:", "", *statements]
    parts = d.get("shared_breakdown_us", {})
    out += [
        "",
        "`shared`, median by part: " + ", ".join(f"{k} {_f(v)} us" for k, v in parts.items()) + ".",
    ]
    if "per_execution_over_shared" in d:
        out[-1] += f" `per_execution` / `shared`: {_f(d['per_execution_over_shared'])}x."
    return "\n".join(out)


def cpu(d: dict[str, Any]) -> str:
    base = d["cpu_us"]["global_warm"]["median"]
    rows = [
        [f"`{v}`", s["median"], s["p10"], s["p90"], s["wall_median"], round(s["median"] / base, 3)]
        for v, s in d["cpu_us"].items()
    ]
    per_round = "; ".join(
        f"`{v}` {min(r):.3f}-{max(r):.3f}" for v, r in d["ratios_per_round"].items()
    )
    p = d["params"]
    return "\n".join(
        [
            f"CPU time (`time.thread_time_ns`) per call on {p['database']}, `{p['query']}`; "
            f"{p['rounds']} interleaved rounds x {p['per_round']} calls, medians of the "
            "per-round medians; microseconds.",
            "",
            md_table(["variant", "CPU median", "p10", "p90", "wall median", "x global warm"], rows),
            "",
            f"Per-round ratios to `global_warm`, lowest-highest: {per_round}.",
        ]
    )


def soak(d: dict[str, Any]) -> str:
    cps = d["checkpoints"]
    cols = [
        "executions",
        "rss_mb",
        "tracked_runs",
        "open_executions",
        "draining",
        "pending_releases",
        "reflection_cache",
        "registered_managers",
        "checked_out",
        "live_executions",
    ]
    rows = [[cp.get(c, "") for c in cols] for cp in (cps[0], cps[len(cps) // 2], cps[-1])]
    p = d["params"]
    return "\n".join(
        [
            f"{p['n']:,} executions in one process ({p['warmup']:,} warm-up; every "
            f"{p['graph_every']}th through a wrapped graph), {d['executions_per_s']} exec/s, "
            f"{d['errors']} errors; RSS growth after warm-up **{d['rss_growth_mb']:+.2f} MB**.",
            "",
            md_table(cols, rows),
        ]
    )


def reset(d: dict[str, Any]) -> str:
    rows = [
        [
            f"`{v}`",
            s["n"],
            s["median_us"],
            s["p10_us"],
            s["p90_us"],
            s["vs_unscoped_warm"],
            s.get("median_paired_vs_unscoped_warm"),
            s.get("round_trips_per_call"),
            s.get("server_resets_per_call"),
            s.get("session_resets_per_call"),
            ", ".join(f"{k} x{c:g}" for k, c in s.get("statements_per_call", {}).items()),
        ]
        for v, s in d["summary"].items()
    ]
    cols = [
        "variant",
        "n",
        "median",
        "p10",
        "p90",
        "x unscoped warm",
        "paired",
        "round trips",
        "DISCARD ALL (server)",
        "resets (stats)",
        "statements per call",
    ]
    p = d["params"]
    out = [
        "One call per checkout (only `run()` timed; `discard_all`: `DISCARD ALL` alone on a "
        f"raw connection made dirty untimed first), interleaved iteration by iteration "
        f"(n={p['n']}); microseconds. `dirty` runs `{p.get('dirty_query', '-')}`. Round "
        "trips: statements the app role sent per call, from the server's `log_statement=all` "
        f"log ({p['count']} calls per variant, a separate phase); DISCARD ALL (server): its "
        "lines there per call; resets (stats): the manager's `session_resets` per call.",
        "",
        md_table(cols, rows),
        "",
        f"`write` / `read_only`: {_f(d['write_over_read_only'])}x.",
    ]
    cost = d.get("reset_cost")
    if cost:
        out += [
            "",
            "The reset's cost on a dirty connection:",
            "",
            md_table(
                ["measure", "value"],
                [
                    ["`DISCARD ALL` alone, median us", cost["discard_all_us"]],
                    ["share of a `dirty` call, ratio of medians", cost["share_of_dirty"]],
                    [
                        "share of a `dirty` call, median per iteration",
                        cost["share_of_dirty_paired"],
                    ],
                    ["share of a `write` call, ratio of medians", cost["share_of_write"]],
                    [
                        "share of a `write` call, median per iteration",
                        cost["share_of_write_paired"],
                    ],
                    ["`write` - `read_only`, us", cost["write_minus_read_only_us"]],
                    ["(`write` - `read_only`) / `write`", cost["write_minus_read_only_of_write"]],
                    ["`dirty` - `write`, us", cost["dirty_minus_write_us"]],
                ],
            ),
        ]
    check = d.get("dirty_check")
    if check:
        out += [
            "",
            f"Dirty check: `work_mem` defaults to {check['default']}; one execution set it to "
            f"{check['set_to']}, the next execution on a one-connection manager (same backend: "
            f"{_f(check['same_backend'])}) saw {check['seen_by_next_execution']}; a plain "
            f"engine's next checkout (same backend: {_f(check['plain_engine_same_backend'])}) "
            f"saw {check['plain_engine_seen_next']}.",
        ]
    return "\n".join(out)


def compare(d: dict[str, Any]) -> str:
    p = d["params"]
    out = [
        f"Old `{p['old']}` against new `{p['new']}`: every benchmark once per side per "
        f"round, {p['rounds']} rounds, each run in its own process with the same arguments, "
        "the order flipped every round. Arguments: "
        + "; ".join(f"{k} `{v}`" for k, v in p["args"].items())
        + ".",
    ]
    for name, metrics in d["summary"].items():
        first = d["runs"][name][0]
        out += [
            "",
            f"**{name}** (old {first['old']['code']}, new {first['new']['code']}):",
            "",
            md_table(
                ["metric", "old per round", "new per round", "new/old per round", "new/old median"],
                [
                    [
                        m,
                        " ".join(_f(x) for x in s["old"]),
                        " ".join(_f(x) for x in s["new"]),
                        " ".join(_f(x) for x in s["new_over_old_per_round"]),
                        s["new_over_old_median"],
                    ]
                    for m, s in metrics.items()
                ],
            ),
        ]
    return "\n".join(out)


# -- repeated runs: ``<name>.run<i>.json`` ----------------------------------------------


def text_table(columns: list[str], rows: list[list[Any]]) -> str:
    """A markdown table whose columns are left-aligned (text, not numbers)."""
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join(["---"] * len(columns)) + " |"]
    lines += ["| " + " | ".join(_f(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def load_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _order(name: str) -> tuple[int, int, str]:
    base = name.split("_", maxsplit=1)[0]
    exact = ORDER.index(name) if name in ORDER else len(ORDER)
    return (KNOWN.index(base) if base in KNOWN else 99, exact, name)


def load_results(
    results: Path | None = None,
) -> tuple[dict[str, Path], dict[str, dict[int, Path]]]:
    """``({name: <name>.json}, {name: {i: <name>.run<i>.json}})``, in rendering order."""
    results = results or RESULTS
    singles: dict[str, Path] = {}
    runs: dict[str, dict[int, Path]] = {}
    for path in sorted(results.glob("*.json")):
        m = RUN_FILE.match(path.stem)
        name = m["name"] if m else path.stem
        if SKIPPED.search(name) or name == RUN_LOG.removesuffix(".json"):
            continue
        if m:
            runs.setdefault(name, {})[int(m["i"])] = path
        else:
            singles[name] = path
    runs = {n: dict(sorted(r.items())) for n, r in sorted(runs.items(), key=lambda x: _order(x[0]))}
    return dict(sorted(singles.items(), key=lambda x: _order(x[0]))), runs


def _kind(name: str, data: dict[str, Any]) -> str:
    return str(data.get("benchmark") or name.split("_", maxsplit=1)[0])


def _matching_paren_ends(text: str, start: int) -> bool:
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i == len(text) - 1
    return False


def short_measured(v: dict[str, Any]) -> str:
    """The measured text without a trailing parenthetical (which the full tables keep)."""
    text = " ".join(str(v.get("measured", "")).split())
    cut = text.find(" (")
    if cut > 0 and text.endswith(")") and _matching_paren_ends(text, cut + 1):
        return text[:cut]
    return text


_NUM = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_UNITS = r"x|\u00d7|MB|GB|kB|KB|us|µs|ms|s|%|exec/s"
#: a number at the start of the measured text, with its unit, then the end, "(", "," or ";"
_LEADING = re.compile(rf"\s*(?P<num>{_NUM})\s*(?P<unit>{_UNITS})?(?=\s*(?:$|\(|,|;))")
#: else the first ratio anywhere ("... 1.23x ...")
_RATIO = re.compile(rf"(?<![\w.])(?P<num>{_NUM})\s*(?P<unit>x|\u00d7)(?!\w)")


def figure(v: dict[str, Any]) -> tuple[float, str, str] | None:
    """The verdict's number, its unit and its text as measured, or None.

    From the verdict's ``data`` (``ratio``, ``value``, ``measured`` or ``median``, with
    ``unit`` if given), else the measured text: a number that leads it ("1.39x (206 vs 148
    us)", "+1.05 MB", "6", "+0.055 (...)") or, failing that, the first ratio in it.  Counts
    followed by words ("0 failed", "1 at end, ...") carry none.
    """
    data = v.get("data")
    if isinstance(data, dict):
        for key in ("ratio", "value", "measured", "median"):
            x = data.get(key)
            if isinstance(x, int | float) and not isinstance(x, bool):
                unit = str(data.get("unit") or ("x" if key == "ratio" else ""))
                return float(x), unit, f"{x:.3f}"
    text = str(v.get("measured", ""))
    m = _LEADING.match(text) or _RATIO.search(text)
    if not m:
        return None
    unit = m["unit"] or ""
    return float(m["num"].replace(",", "")), "x" if unit == "\u00d7" else unit, m["num"]


def spread(figures: list[tuple[float, str, str] | None]) -> str:
    """Lowest-highest of the runs' figures ("1.39-1.57x"), "-" if none or units differ."""
    got = [f for f in figures if f is not None]
    if not got or len({f[1] for f in got}) > 1:
        return "-"
    unit = got[0][1]
    decimals = max(len(t.split(".")[1]) if "." in t else 0 for _, _, t in got)
    sign = "+" if any(t.startswith("+") for _, _, t in got) else ""
    lo, hi = min(f[0] for f in got), max(f[0] for f in got)
    fmt = f"{{:{sign},.{decimals}f}}"
    text = fmt.format(lo) if lo == hi else f"{fmt.format(lo)}\u2013{fmt.format(hi)}"
    return text + (unit if unit in ("x", "%") else f" {unit}" if unit else "")


def binds(data: dict[str, Any]) -> str:
    """What bound the run, with its ceilings (exec/s), or "-" when the run does not say."""
    c = data.get("ceilings")
    binding = binding_of(data)
    if not binding:
        return "-"
    if not isinstance(c, dict):
        return str(binding)
    nums = {k: x for k, x in c.items() if isinstance(x, int | float) and not isinstance(x, bool)}
    if binding not in nums:
        return str(binding)
    others = ", ".join(f"{k} {_f(float(x))}" for k, x in nums.items() if k != binding)
    return f"**{binding}**: {_f(float(nums[binding]))} exec/s" + (f" ({others})" if others else "")


def binding_of(data: dict[str, Any]) -> str:
    c = data.get("ceilings")
    return str((c.get("binding") if isinstance(c, dict) else None) or data.get("binding") or "")


def _run_log(results: Path) -> dict[str, Any]:
    log = load_json(results / RUN_LOG) or {}
    runs = log.get("runs")
    return runs if isinstance(runs, dict) else {}


def _machine_short(m: dict[str, Any]) -> str:
    return f"{m.get('nproc', '?')} CPU ({m.get('cpu', '?')}), {m.get('ram_gb', '?')} GB"


def _date(iso: str) -> str:
    """``2026-12-02T18:46:12+00:00`` as ``2026-12-02 18:46`` (the files say UTC)."""
    return iso[:16].replace("T", " ")


def _code(m: dict[str, Any]) -> str:
    code = str(m.get("code", "-"))
    return code.split(" (", maxsplit=1)[0]


def _load_avg(m: dict[str, Any]) -> str:
    load = m.get("load_avg_at_start")
    return ", ".join(_f(float(x)) for x in load) if isinstance(load, list) else "-"


def _runs_word(n: int) -> str:
    words = {1: "One run", 2: "Two runs", 3: "Three runs", 4: "Four runs", 5: "Five runs"}
    return words.get(n, f"{n} runs")


@dataclass
class Target:
    """One verdict across the runs of one benchmark."""

    benchmark: str
    name: str
    asks: str
    runs: list[dict[str, Any] | None]  # the verdict in run i, None if that run lacks it

    @property
    def present(self) -> list[dict[str, Any]]:
        return [v for v in self.runs if v is not None]

    @property
    def missed(self) -> int:
        return sum(1 for v in self.present if not v.get("ok"))

    def verdict(self) -> str:
        n = len(self.present)
        return "holds" if self.missed == 0 else f"**MISSED** ({self.missed} of {n})"

    def cells(self) -> list[str]:
        return ["-" if v is None else short_measured(v) for v in self.runs]

    def spread(self) -> str:
        return spread([figure(v) for v in self.present])


def targets(name: str, datas: list[dict[str, Any] | None]) -> list[Target]:
    """Every verdict name found in any run, in first-seen order, across ``datas``."""
    found: dict[str, Target] = {}
    for i, data in enumerate(datas):
        for v in (data or {}).get("verdicts", []):
            if not isinstance(v, dict) or "name" not in v:
                continue
            key = str(v["name"])
            if key not in found:
                found[key] = Target(name, key, str(v.get("target", "")), [None] * len(datas))
            found[key].runs[i] = v
    return list(found.values())


def profiles(name: str, kind: str, datas: list[dict[str, Any] | None], results: Path) -> list[str]:
    """Profiles recorded for this benchmark: the runs' ``profile`` field and
    ``results/<name or kind>*profile*.txt``; paths from the repository root when inside it."""
    paths: list[Path] = []
    for data in datas:
        p = (data or {}).get("profile")
        if isinstance(p, str) and p:
            path = Path(p) if Path(p).is_absolute() else HERE.parent / p
            paths.append(path)
    for pattern in (f"{name}*profile*.txt", f"{kind}_profile*.txt"):
        paths += sorted(results.glob(pattern))
    out: list[str] = []
    for path in sorted({p for p in paths if p.exists()}, key=lambda p: -p.stat().st_mtime):
        try:
            text = str(path.resolve().relative_to(HERE.parent))
        except ValueError:
            text = str(path)
        if text not in out:
            out.append(text)
    return out


def _missed_line(name: str, kind: str, datas: list[Any], results: Path) -> str:
    found = profiles(name, kind, datas, results)
    if found:
        return "Profile: " + ", ".join(f"`{p}`" for p in found) + "."
    return (
        f"No profile recorded: `python benchmarks/bench_{kind}.py --profile` writes one "
        "(the profiler slows the profiled variant, so not in a timed run)."
    )


def runs_section(
    name: str, files: dict[int, Path], results: Path, single: Path | None = None
) -> list[str]:
    """The runs table, the targets across runs, then the latest complete run in full."""
    datas = [load_json(p) for p in files.values()]
    log = _run_log(results)
    n = len(files)
    done = [i for i, d in enumerate(datas) if d and "machine" in d and "skipped" not in d]
    latest = done[-1] if done else len(datas) - 1
    shown = datas[latest] or {}
    kind = _kind(name, shown)
    rows = []
    for i, (run, path) in zip(range(n), files.items(), strict=True):
        d = datas[i] or {}
        m = d.get("machine") if isinstance(d.get("machine"), dict) else {}
        entry = log.get(path.stem) or {}
        if str(entry.get("started", "")) > str(m.get("date", "~")):
            entry = {}  # the log is of a later run that did not write this file
        seconds: Any = entry.get("seconds")
        if seconds is not None and entry.get("quick"):
            seconds = f"{_f(float(seconds))} (--quick)"
        rows.append(
            [
                f"run {run}",
                _date(str(m.get("date", "-"))) if d else "unreadable",
                _code(m),
                _machine_short(m) if m else "-",
                _load_avg(m),
                binds(d) if "skipped" not in d else f"skipped: {d['skipped']}",
                seconds,
            ]
        )
    out = [
        "",
        f"## {name}",
        "",
        f"{_runs_word(n)}, each in its own process; the full tables below are run "
        f"{list(files)[latest]}'s (`{files[list(files)[latest]].name}`).",
        "",
        text_table(
            ["run", "date (UTC)", "code", "machine", "load average at start", "binds", "seconds"],
            rows,
        ),
    ]
    ts = targets(name, datas)
    if ts:
        out += [
            "",
            f"Targets, {_runs_word(n).lower()}:",
            "",
            text_table(
                ["target", "asks", *(f"run {i}" for i in files), "spread", "verdict"],
                [[t.name, t.asks, *t.cells(), t.spread(), t.verdict()] for t in ts],
            ),
        ]
        if any(t.missed for t in ts):
            out += ["", _missed_line(name, kind, datas, results)]
    if single is not None and single.stat().st_mtime > max(
        p.stat().st_mtime for p in files.values()
    ):
        out += ["", f"(`{single.name}`, a later single run, is not shown.)"]
    out += ["", f"### {name}, run {list(files)[latest]}", ""]
    out += single_section(name, shown, heading=False)
    return out


def single_section(name: str, data: dict[str, Any], heading: bool = True) -> list[str]:
    """One result file rendered as before: machine line, the benchmark's tables, targets."""
    out = ["", f"## {name}", ""] if heading else []
    if isinstance(data.get("machine"), dict):
        out += [machine_line(data["machine"]), ""]
    renderer = RENDERERS.get(_kind(name, data))
    body = ""
    if renderer is not None and "skipped" not in data:
        try:
            body = renderer(data)
        except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError) as exc:
            body = f"(this file's tables could not be rendered: {type(exc).__name__} {exc})"
    if "skipped" in data:
        body = f"Skipped: {data['skipped']}."
    if body:
        out += [body, ""]
    v = verdicts(data)
    if v:
        out += ["Targets:", "", v]
    return out


def summary(results: Path | None = None) -> str:
    """Every target of every benchmark, its value in each run and its verdict, in markdown.

    Benchmarks with ``<name>.run<i>.json`` files show those runs; the others their single
    ``<name>.json``.  Preceded by the dates, the machine and the load, and followed by the
    profile of every missed target.
    """
    results = results or RESULTS
    singles, runs = load_results(results)
    sets: dict[str, list[dict[str, Any] | None]] = {
        n: [load_json(p) for p in files.values()] for n, files in runs.items()
    }
    for n, p in singles.items():
        if n not in sets:
            sets[n] = [load_json(p)]
    sets = dict(sorted(sets.items(), key=lambda x: _order(x[0])))
    width = max((len(d) for d in sets.values()), default=0)
    rows, missed, machines, counts = [], [], [], []
    for name, datas in sets.items():
        ts = targets(name, datas)
        if not ts:
            continue
        machines += [d["machine"] for d in datas if d and isinstance(d.get("machine"), dict)]
        counts.append(len(datas))
        label = (
            name if len(datas) == width else f"{name} ({len(datas)} run{'s' * (len(datas) > 1)})"
        )
        bound = [binding_of(d) for d in datas if d and binding_of(d)]
        if bound:
            label += f", binds: {bound[0] if len(set(bound)) == 1 else ' / '.join(bound)}"
        for t in ts:
            cells = t.cells() + ["-"] * (width - len(datas))
            rows.append([label, t.name, t.asks, *cells, t.spread(), t.verdict()])
        if any(t.missed for t in ts):
            kind = _kind(name, next((d for d in datas if d), {}))
            names = ", ".join(t.name for t in ts if t.missed)
            missed.append(f"- {name} ({names}): " + _missed_line(name, kind, datas, results))
    if not rows:
        return "No results with targets yet: run `python benchmarks/run_all.py --repeat 3`."
    out = [_machines_line(machines, counts), ""]
    out.append(
        text_table(
            [
                "benchmark",
                "target",
                "asks",
                *(f"run {i + 1}" for i in range(width)),
                "spread",
                "verdict",
            ],
            rows,
        )
    )
    if missed:
        out += ["", "Missed, and the profile that shows why:", "", *missed]
    return "\n".join(out)


def _machines_line(machines: list[dict[str, Any]], counts: list[int]) -> str:
    dates = sorted(str(m["date"]) for m in machines if m.get("date"))
    span = f"{_date(dates[0])} to {_date(dates[-1])} UTC" if dates else "date unknown"
    kinds = sorted({_machine_short(m) for m in machines})
    py = sorted({str(m.get("versions", {}).get("python")) for m in machines if m.get("versions")})
    pg = sorted({str(m["postgresql"]).split(" ")[0] for m in machines if m.get("postgresql")})
    codes = sorted({_code(m) for m in machines if m.get("code")})
    loads = [float(x) for m in machines for x in (m.get("load_avg_at_start") or [])[:1]]
    load = f"{min(loads):.2f}-{max(loads):.2f}" if loads else "?"
    return (
        f"*{_runs_word(max(counts))} of each benchmark"
        + ("" if len(set(counts)) == 1 else " (fewer where the label says)")
        + (", interleaved (run 1 of every benchmark, then run 2, ...)" if max(counts) > 1 else "")
        + f", each in its own process; {span}; "
        f"{'; '.join(kinds)} RAM; Python {', '.join(py)}"
        + (f", PostgreSQL {', '.join(pg)}" if pg else "")
        + f"; 1-minute load average at each start {load}"
        + (f"; code {', '.join(codes)}" if codes else "")
        + ". Spread: lowest-highest of the runs; a target holds only if it holds in every run.*"
    )


def readme_table(results: Path | None = None) -> str:
    """The summary table (dates, machine, every target across runs) for the README."""
    from figures import figures_table

    return (
        figures_table(results or RESULTS)
        + "\n\nEvery target of every benchmark, each run's machine and load, and what bound "
        "each storm: `benchmarks/RESULTS.md` (`python benchmarks/run_all.py --repeat 3 "
        "--markdown`)."
    )


def _kept(text: str) -> dict[str, str]:
    """Hand-written blocks to carry over: ``<!-- keep:NAME -->`` ... ``<!-- /keep:NAME -->``."""
    return {
        m["name"]: m[0]
        for m in re.finditer(
            r"<!-- keep:(?P<name>[\w.-]+) -->.*?<!-- /keep:(?P=name) -->", text, re.S
        )
    }


RENDERERS = {
    "storm": storm,
    "acquire": acquire,
    "cpu": cpu,
    "soak": soak,
    "reset": reset,
    "compare": compare,
}


def render(results: Path | None = None, out: Path | None = None) -> Path:
    """Write RESULTS.md (or ``out``) from the JSON files in ``results``; return its path.

    ``<name>.run<i>.json`` files (``run_all.py --repeat N``) render as one section per
    name: its runs, its targets across runs, then the latest complete run in full; a
    plain ``<name>.json`` renders alone as before when no run files of that name exist.
    A summary of every target opens the file.  Blocks between ``<!-- keep:NAME -->``
    and ``<!-- /keep:NAME -->`` in the file being replaced are kept, at the end of
    section NAME.
    """
    results = results or RESULTS
    out = out or OUT
    kept = _kept(out.read_text()) if out.exists() else {}
    sections = [
        "# Benchmark results",
        "",
        "Measured by `python benchmarks/run_all.py --repeat 3 --markdown` (each benchmark "
        "also runs alone: `python benchmarks/bench_<name>.py`). Every comparison was taken in "
        "the same run, interleaved, and is reported as a ratio. The machine was shared with "
        "other workloads while these ran, so absolute numbers are noisy; ratios are the "
        "figures to read. Regenerate this file with `python benchmarks/render_results.py`.",
        "",
        "## Summary",
        "",
        summary(results),
    ]
    singles, runs = load_results(results)
    names = sorted({*singles, *runs}, key=_order)
    for name in names:
        if name in runs:
            part = runs_section(name, runs[name], results, singles.get(name))
        else:
            data = load_json(singles[name])
            if data is None:
                continue
            part = single_section(name, data)
        sections += part
        if name in kept:
            sections += ["", kept.pop(name)]
    if kept:
        sections += ["", "## Notes"]
        for block in kept.values():
            sections += ["", block]
    out.write_text("\n".join(sections).rstrip() + "\n")
    return out


if __name__ == "__main__":
    print(render(), file=sys.stderr)
