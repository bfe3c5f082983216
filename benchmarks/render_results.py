"""Render ``benchmarks/RESULTS.md`` from the JSON files in ``benchmarks/results/``.

Only measured numbers go in: every table comes from a result file, with the date,
machine and versions recorded by the run that wrote it.  Benchmarks this file does
not know get their targets table.

Run: ``python benchmarks/render_results.py`` (or ``run_all.py --markdown-only``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
OUT = HERE / "RESULTS.md"
KNOWN = ("storm", "acquire", "cpu", "overhead", "soak", "pgbouncer", "reset", "compare")


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
    p = d["params"]
    c = d["ceilings"]
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
                s["of_server_ceiling"],
                s.get("of_executor_ceiling"),
                s["of_cpu_ceiling"],
                s["vs_global"],
                s["cpu_ms_per_exec"],
            ]
        )
    errors = []
    for mode, s in d["summary"].items():
        for text, n in s["errors"].items():
            errors.append(f"- `{mode}`, {n}x: `{text}`")
    out = [
        f"K={p['k']} concurrent `ainvoke` of a ToolNode graph (agent -> tools -> agent) whose "
        f"tool runs `{p['query']}` x{p['queries_per_tool']} through a SQLDatabase; PostgreSQL "
        f"max_connections={p['server_max_connections']} "
        f"(superuser_reserved_connections={p['superuser_reserved_connections']}; the app connects "
        f"as a non-superuser, so 27 slots are its); budget {p['budget']}; asyncio default "
        f"executor: {p['executor_threads']} threads. {p['rounds']} interleaved rounds "
        f"(`naive` and `per_execution`, which run at a few exec/s, in "
        f"{p.get('slow_rounds', p['rounds'])} with K={p.get('slow_k', p['k'])}); medians.",
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
                "x server ceiling",
                "x executor ceiling",
                "x CPU ceiling",
                "x global",
                "CPU ms/exec",
            ],
            rows,
        ),
        "",
        "Ceilings (exec/s): "
        + ", ".join(f"{k} {_f(v)}" for k, v in c.items() if k != "binding")
        + f"; **binding: {c['binding']}**. Server = budget / (3 x 10 ms); executor = "
        "min(budget, executor threads) / (3 x 10 ms); CPU = the same graph with a no-I/O "
        "tool, measured in the same run.",
        "",
        f"`shared` / `global` per round: {d.get('shared_vs_global_per_round')}; "
        f"`cpu_scoped` / `cpu` per round: {d.get('cpu_scoped_vs_cpu_per_round')}.",
    ]
    if errors:
        out += ["", "Failures:", "", *errors]
    return "\n".join(out)


def acquire(d: dict[str, Any]) -> str:
    rows = [
        [
            f"`{v}`",
            s["n"],
            s["median_us"],
            s["p10_us"],
            s["p90_us"],
            s["vs_unscoped_warm"],
            round(s["median_us"] / d["summary"]["shared"]["median_us"], 2),
        ]
        for v, s in d["summary"].items()
    ]
    parts = d.get("shared_breakdown_us", {})
    return "\n".join(
        [
            "New execution -> SQLDatabase -> first `select 1`, interleaved iteration by "
            f"iteration (n={d['params']['n']}); microseconds.",
            "",
            md_table(["variant", "n", "median", "p10", "p90", "x unscoped warm", "x shared"], rows),
            "",
            "`shared`, median by part: "
            + ", ".join(f"{k} {_f(v)} us" for k, v in parts.items())
            + ".",
        ]
    )


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
            s.get("round_trips_per_call"),
            s.get("session_resets_per_call"),
            ", ".join(f"{k} x{c:g}" for k, c in s.get("statements_per_call", {}).items()),
        ]
        for v, s in d["summary"].items()
    ]
    cols = ["variant", "n", "median", "p10", "p90", "x unscoped warm", "round trips", "resets"]
    return "\n".join(
        [
            "One `select 1` per checkout (only `run()` timed), interleaved iteration by "
            f"iteration (n={d['params']['n']}); microseconds. Round trips: statements the app "
            "role sent per call, from the server's `log_statement=all` log "
            f"({d['params']['count']} calls per variant, a separate phase).",
            "",
            md_table([*cols, "statements per call"], rows),
            "",
            f"`write` / `read_only`: {_f(d['write_over_read_only'])}x.",
        ]
    )


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


RENDERERS = {
    "storm": storm,
    "acquire": acquire,
    "cpu": cpu,
    "soak": soak,
    "reset": reset,
    "compare": compare,
}


def render() -> Path:
    sections = [
        "# Benchmark results",
        "",
        "Measured by `python benchmarks/run_all.py` (each benchmark also runs alone: "
        "`python benchmarks/bench_<name>.py`). Every comparison was taken in the same run, "
        "interleaved, and is reported as a ratio. The machine was shared with other "
        "workloads while these ran, so absolute numbers are noisy; ratios are the figures "
        "to read. Regenerate this file with `python benchmarks/render_results.py`.",
    ]
    files = {p.stem: p for p in sorted(RESULTS.glob("*.json"))}
    order = sorted(
        files, key=lambda n: (KNOWN.index(n.split("_")[0]) if n.split("_")[0] in KNOWN else 99, n)
    )
    for name in order:
        if name.endswith(("_dev", "_prof")):
            continue
        data = json.loads(files[name].read_text())
        if not isinstance(data, dict):
            continue
        kind = str(data.get("benchmark", name))
        body = RENDERERS.get(kind, lambda d: "")(data)
        sections += ["", f"## {name}", ""]
        if isinstance(data.get("machine"), dict):
            sections += [machine_line(data["machine"]), ""]
        if body:
            sections += [body, ""]
        v = verdicts(data)
        if v:
            sections += ["Targets:", "", v]
    OUT.write_text("\n".join(sections).rstrip() + "\n")
    return OUT


if __name__ == "__main__":
    print(render(), file=sys.stderr)
