"""Scale-out through a real PgBouncer, the pooler strategy's pool choice, and budget sizing.

Run: ``python benchmarks/bench_pgbouncer.py`` (``--runs 1000`` by default; ``--quick``
for a smoke run).  Needs the ``pgbouncer`` binary (Debian package ``pgbouncer``).

Three parts, all in one run against one throwaway PostgreSQL (max_connections=30):

1. **scale-out**: 4 spawned processes run K/4 executions each of a wrapped ToolNode
   graph whose tool runs 3 queries, (a) straight to PostgreSQL, (b) through PgBouncer
   (transaction mode, default_pool_size=5) with psycopg2, (c) the same with psycopg 3,
   and (d) a control with psycopg's own ``prepare_threshold=5`` instead of the
   package's ``None``.  Reports failures with their text, peak server backends, peak
   PgBouncer clients, exec/s, p50/p99 and ratios to (a).
2. **pool choice**: checkout + one query + checkin through PgBouncer, with the package's
   budget pool (client connections kept) versus a new client connection per checkout
   (what a NullPool does), and the same directly to PostgreSQL.
3. **sizing**: 4 processes, each with the scoped budget *and* a LangGraph checkpointer
   pool (AsyncPostgresSaver, 2 connections), sized by the README formula and 2x over
   it, directly and through PgBouncer: predicted versus measured peak backends, and
   failures ("too many clients") when the formula is broken.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (
    APP_PASSWORD,
    APP_USER,
    BENCH_DB,
    BenchServer,
    Verdict,
    backend_sampler,
    bench_server,
    console,
    machine_info,
    median,
    percentile,
    print_machine,
    print_verdicts,
    table,
    write_result,
)
from langgraph_scoped_conn.testing import PgBouncer, pgbouncer_binary, scram_secret
from tests.pgbouncer_worker import run_worker

SERVER_MAX_CONNECTIONS = 30
RESERVED = 3  # superuser_reserved_connections of the throwaway cluster
BOUNCER_POOL = 5
WORKERS = 4
CHECKPOINTER_POOL = 2


@dataclass
class ModeResult:
    """The outcome of one multi-process mode."""

    name: str
    runs: int
    ok: int = 0
    failed: int = 0
    wrong: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    elapsed: float = 0.0
    exec_per_s: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    peak_server: int = 0
    peak_clients: int | None = None
    server_after: int = 0
    clients_after: int | None = None
    left_in_use: int = 0
    note: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "data"} | self.data


class _ClientSampler:
    """Peak PgBouncer client connections (cl_active + cl_waiting) for the bench database."""

    def __init__(self, bouncer: PgBouncer) -> None:
        self.bouncer = bouncer
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def clients(self) -> int:
        for row in self.bouncer.show("pools", user=APP_USER, password=APP_PASSWORD):
            if row["database"] == BENCH_DB:
                return int(row["cl_active"]) + int(row["cl_waiting"])
        return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.clients())
            self._stop.wait(0.01)

    def __enter__(self) -> _ClientSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def run_mode(
    name: str,
    server: BenchServer,
    url: str,
    *,
    runs: int,
    concurrency: int,
    budget: int,
    bouncer: PgBouncer | None = None,
    options: dict[str, Any] | None = None,
    checkpointer_conninfo: str | None = None,
) -> ModeResult:
    """Spawn WORKERS processes running runs/WORKERS executions each; sample both sides."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(WORKERS + 1)
    results = ctx.Queue()
    per_worker = runs // WORKERS
    procs = [
        ctx.Process(
            target=run_worker,
            args=(w, url, per_worker, concurrency, budget, barrier, results),
            kwargs={
                "options": options,
                "checkpointer_conninfo": checkpointer_conninfo,
                "checkpointer_pool_size": CHECKPOINTER_POOL,
            },
            name=f"bench-pgbouncer-{name}-{w}",
        )
        for w in range(WORKERS)
    ]
    result = ModeResult(name, per_worker * WORKERS)
    reports: list[dict[str, Any]] = []
    sampler = backend_sampler(server, interval=0.01)
    clients = _ClientSampler(bouncer) if bouncer is not None else None
    try:
        for p in procs:
            p.start()
        with sampler:
            if clients is not None:
                clients.__enter__()
            try:
                barrier.wait(timeout=240)
                reports = [results.get(timeout=600) for _ in procs]
            finally:
                if clients is not None:
                    clients.__exit__(None, None, None)
        for p in procs:
            p.join(timeout=60)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=10)
        sampler.close()
    latencies = [x for r in reports for x in r["latencies"]]
    for r in reports:
        result.ok += r["ok"]
        result.failed += r["failed"]
        result.wrong += r["wrong"]
        result.left_in_use += r["connections_in_use"] + r["active_executions"]
        for text, n in r["errors"].items():
            result.errors[text] = result.errors.get(text, 0) + n
    result.elapsed = max((r["elapsed"] for r in reports), default=0.0)
    result.exec_per_s = result.ok / result.elapsed if result.elapsed else 0.0
    result.p50_ms = median(latencies) * 1000
    result.p99_ms = percentile(latencies, 99) * 1000
    result.peak_server = sampler.peak
    if clients is not None:
        result.peak_clients = clients.peak
        result.clients_after = clients.clients()
    result.server_after = server.app_backends()
    result.data["strategy"] = sorted({str(r["strategy"]) for r in reports})
    result.data["peak_client_pool_per_process"] = max((r["peak_open"] for r in reports), default=0)
    return result


# -- pool choice: keep client connections to the pooler, or open one per checkout --------------


def pool_choice(direct_url: str, bouncer_url: str, ops: int) -> list[dict[str, Any]]:
    """Per-checkout cost (checkout + ``select 1`` + checkin), single thread, same run."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    import langgraph_scoped_conn as lsc

    rows = []
    for label, url in (("PgBouncer", bouncer_url), ("PostgreSQL", direct_url)):
        manager = lsc.ExecutionConnectionManager(url, max_connections=5)
        null = create_engine(
            url.replace("?pgbouncer=true", ""),
            poolclass=NullPool,
            connect_args={"application_name": "langgraph_scoped_conn"},
        )
        try:
            with lsc.ExecutionScope(manager=manager):
                engine = lsc.create_execution_scoped_engine_sync()
                timings: dict[str, float] = {}
                for kind, eng in (("budget pool", engine), ("new connection", null)):
                    with eng.connect() as conn:  # warm
                        conn.execute(text("select 1"))
                    start = time.perf_counter()
                    for _ in range(ops):
                        with eng.connect() as conn:
                            conn.execute(text("select 1"))
                    timings[kind] = (time.perf_counter() - start) / ops
            rows.append(
                {
                    "target": label,
                    "strategy": manager.get_stats()["strategy"],
                    "budget_pool_ms": timings["budget pool"] * 1000,
                    "new_connection_ms": timings["new connection"] * 1000,
                    "ratio_new_over_pool": timings["new connection"] / timings["budget pool"],
                }
            )
        finally:
            manager.close()
            null.dispose()
    return rows


# -- sizing ---------------------------------------------------------------------------------------


def formula_budget(
    max_connections: int, reserved: int, others: int, processes: int, saver: int
) -> int:
    """The README formula: the largest budget that cannot exhaust the server."""
    return (max_connections - reserved - others) // processes - saver


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000, help="K: executions per mode (K/4 each)")
    parser.add_argument("--concurrency", type=int, default=16, help="runs in flight per process")
    parser.add_argument("--budget", type=int, default=5, help="max_connections per process")
    parser.add_argument("--ops", type=int, default=300, help="checkouts per pool-choice cell")
    parser.add_argument("--quick", action="store_true", help="K=200, ops=100: a smoke run")
    parser.add_argument("--no-sizing", action="store_true", help="skip the sizing scenarios")
    parser.add_argument("--out", default="pgbouncer", help="results file name (pgbouncer)")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.ops = 200, 100
    info = machine_info()
    print_machine(info)
    if pgbouncer_binary() is None:
        console.print("[red]pgbouncer is not installed: apt-get install -y pgbouncer[/red]")
        write_result(args.out, {"machine": info, "skipped": "pgbouncer binary not installed"})
        return 2
    info["versions"]["pgbouncer"] = _pgbouncer_version()
    have_saver = _have_checkpointer()

    modes: list[ModeResult] = []
    with bench_server(max_connections=SERVER_MAX_CONNECTIONS) as server:
        admin = server.admin()
        try:
            secret = scram_secret(admin, APP_USER)
        finally:
            admin.close()
        sizing: list[dict[str, Any]] = []
        if not args.no_sizing:
            if have_saver:
                _setup_checkpointer(server)
            # first, on a server with no other app connection (PgBouncer keeps idle ones)
            sizing += _sizing(server, None, args, have_saver)
        with PgBouncer.running(
            server_port=server.cluster.port, users={APP_USER: secret}, pool_size=BOUNCER_POOL
        ) as bouncer:

            def via_bouncer(driver: str) -> str:
                return bouncer.url(BENCH_DB, user=APP_USER, password=APP_PASSWORD, driver=driver)

            common = {"runs": args.runs, "concurrency": args.concurrency, "budget": args.budget}
            console.print(f"[bold]scale-out[/bold]: {WORKERS} processes x {args.runs // 4} runs")
            modes.append(run_mode("direct (shared)", server, server.url(), **common))
            modes.append(
                run_mode(
                    "pgbouncer psycopg2", server, via_bouncer("psycopg2"), bouncer=bouncer, **common
                )
            )
            modes.append(
                run_mode(
                    "pgbouncer psycopg3", server, via_bouncer("psycopg"), bouncer=bouncer, **common
                )
            )
            modes.append(
                run_mode(
                    "control: psycopg3 prepare_threshold=5",
                    server,
                    via_bouncer("psycopg"),
                    bouncer=bouncer,
                    options={"engine_options": {"connect_args": {"prepare_threshold": 5}}},
                    **common,
                )
            )
            console.print("[bold]pool choice[/bold]")
            choice = pool_choice(server.url(), via_bouncer("psycopg2"), args.ops)

            if not args.no_sizing:
                sizing += _sizing(server, bouncer, args, have_saver)

    base = modes[0].exec_per_s or 1.0
    rows = [
        (
            m.name,
            f"{m.ok}/{m.runs}",
            m.failed,
            m.peak_server,
            "-" if m.peak_clients is None else m.peak_clients,
            m.server_after,
            "-" if m.clients_after is None else m.clients_after,
            m.exec_per_s,
            m.exec_per_s / base,
            m.p50_ms,
            m.p99_ms,
        )
        for m in modes
    ]
    console.print(
        table(
            f"Scale-out: {WORKERS} processes, budget {args.budget} each, "
            f"PgBouncer default_pool_size={BOUNCER_POOL}, server max_connections="
            f"{SERVER_MAX_CONNECTIONS}",
            [
                "mode",
                "ok",
                "failed",
                "peak server backends",
                "peak PgBouncer clients",
                "server backends after",
                "clients after",
                "exec/s",
                "x direct",
                "p50 ms",
                "p99 ms",
            ],
            rows,
        )
    )
    for m in modes:
        for text, n in sorted(m.errors.items(), key=lambda kv: -kv[1])[:4]:
            console.print(f"[dim]{m.name}: {n} x {text}[/dim]")
    console.print(
        table(
            "Pool choice (per checkout + select 1 + checkin, one thread)",
            ["target", "strategy", "budget pool ms", "new connection ms", "new / pool"],
            [
                (
                    r["target"],
                    r["strategy"],
                    r["budget_pool_ms"],
                    r["new_connection_ms"],
                    r["ratio_new_over_pool"],
                )
                for r in choice
            ],
        )
    )
    if sizing:
        console.print(
            table(
                f"Sizing: server max_connections={SERVER_MAX_CONNECTIONS} (reserved {RESERVED}), "
                f"{WORKERS} processes, checkpointer pool {CHECKPOINTER_POOL} each",
                [
                    "scenario",
                    "budget",
                    "predicted server peak",
                    "measured peak",
                    "ok",
                    "failed",
                    "first error",
                ],
                [
                    (
                        s["scenario"],
                        s["budget"],
                        s["predicted_peak"],
                        s["peak_server"],
                        f"{s['ok']}/{s['runs']}",
                        s["failed"],
                        s["first_error"] or "-",
                    )
                    for s in sizing
                ],
            )
        )

    direct, bounced, bounced3, control = modes
    verdicts = [
        Verdict(
            "pgbouncer: no failures",
            "psycopg2 and psycopg 3 through PgBouncer: 0 failed",
            f"{bounced.failed} and {bounced3.failed} failed",
            bounced.failed == 0 and bounced3.failed == 0 and bounced.wrong == bounced3.wrong == 0,
        ),
        Verdict(
            "pgbouncer: server backends",
            f"peak <= default_pool_size ({BOUNCER_POOL})",
            f"{bounced.peak_server} (psycopg2), {bounced3.peak_server} (psycopg 3)",
            0 < bounced.peak_server <= BOUNCER_POOL and 0 < bounced3.peak_server <= BOUNCER_POOL,
            note=f"while PgBouncer served up to {bounced.peak_clients} client connections",
        ),
        Verdict(
            "pgbouncer: nothing held",
            "no execution or checked-out connection left in any process",
            f"{bounced.left_in_use + bounced3.left_in_use}",
            bounced.left_in_use + bounced3.left_in_use == 0,
        ),
        Verdict(
            "control: prepared statements",
            "psycopg's default prepare_threshold fails behind PgBouncer",
            f"{control.failed} failed",
            control.failed > 0,
            note="shows the 0 above is the package's doing (prepare_threshold=None)",
        ),
        Verdict(
            "direct: peak backends",
            f"<= {WORKERS} x budget ({WORKERS * args.budget})",
            f"{direct.peak_server}",
            direct.peak_server <= WORKERS * args.budget and direct.failed == 0,
        ),
    ]
    if sizing:
        by_name = {s["scenario"]: s for s in sizing}
        within = [s for s in sizing if s["within_formula"]]
        verdicts.append(
            Verdict(
                "sizing: formula holds",
                "budgets from the formula: 0 failures, peak <= predicted",
                ", ".join(f"{s['failed']} failed / peak {s['peak_server']}" for s in within),
                all(s["failed"] == 0 and s["peak_server"] <= s["predicted_peak"] for s in within),
            )
        )
        over = by_name.get("direct, 2x the formula")
        if over is not None:
            verdicts.append(
                Verdict(
                    "sizing: breaking it fails",
                    "a budget over the formula exhausts the server",
                    f"{over['failed']} failed",
                    over["failed"] > 0,
                    note="the control that shows the formula is not slack",
                )
            )
    print_verdicts(verdicts)
    write_result(
        args.out,
        {
            "machine": info,
            "parameters": {
                "runs": args.runs,
                "workers": WORKERS,
                "concurrency_per_process": args.concurrency,
                "budget_per_process": args.budget,
                "pgbouncer_default_pool_size": BOUNCER_POOL,
                "server_max_connections": SERVER_MAX_CONNECTIONS,
                "checkpointer_pool": CHECKPOINTER_POOL,
            },
            "modes": [m.as_dict() for m in modes],
            "ratios_to_direct": {m.name: m.exec_per_s / base for m in modes},
            "pool_choice": choice,
            "sizing": sizing,
            "verdicts": [v.as_dict() for v in verdicts],
        },
    )
    return 0 if all(v.ok for v in verdicts) else 1


def _sizing(
    server: BenchServer, bouncer: PgBouncer | None, args: Any, have_saver: bool
) -> list[dict[str, Any]]:
    """Direct scenarios without ``bouncer``; the PgBouncer scenario with it."""
    saver = CHECKPOINTER_POOL if have_saver else 0
    conninfo = _conninfo(server) if have_saver else None
    fit = formula_budget(SERVER_MAX_CONNECTIONS, RESERVED, 0, WORKERS, saver)
    over = 2 * fit
    console.print(f"[bold]sizing[/bold]: formula budget {fit}, over-sized {over}")
    scenarios: list[tuple[str, str, int, PgBouncer | None, int, bool]]
    if bouncer is None:
        scenarios = [
            ("direct, formula budget", server.url(), fit, None, WORKERS * (fit + saver), True),
            ("direct, 2x the formula", server.url(), over, None, WORKERS * (over + saver), False),
        ]
    else:
        url = bouncer.url(BENCH_DB, user=APP_USER, password=APP_PASSWORD)
        predicted = BOUNCER_POOL + WORKERS * saver
        scenarios = [("PgBouncer, 2x the formula", url, over, bouncer, predicted, True)]
    out = []
    for name, url, budget, bnc, predicted, within in scenarios:
        m = run_mode(
            name,
            server,
            url,
            runs=args.runs,
            concurrency=max(args.concurrency, 2 * budget),
            budget=budget,
            bouncer=bnc,
            options={"pool_timeout": 60},
            checkpointer_conninfo=conninfo,
        )
        first = _short(max(m.errors.items(), key=lambda kv: kv[1])[0]) if m.errors else ""
        out.append(
            {
                "scenario": name,
                "budget": budget,
                "checkpointer_pool": saver,
                "predicted_peak": predicted,
                "server_slots": SERVER_MAX_CONNECTIONS - RESERVED,
                "within_formula": within,
                "peak_server": m.peak_server,
                "runs": m.runs,
                "ok": m.ok,
                "failed": m.failed,
                "first_error": first,
                "exec_per_s": m.exec_per_s,
            }
        )
    return out


def _short(error: str) -> str:
    """The server's reason, without the driver's 'connection to server at ... failed' prefix."""
    reason = error.split("failed: ", 1)[-1] if "failed: " in error else error
    return " ".join(reason.split())[:90]


def _conninfo(server: BenchServer) -> str:
    return (
        f"host=127.0.0.1 port={server.cluster.port} dbname={BENCH_DB} user={APP_USER} "
        f"password={APP_PASSWORD} application_name=checkpointer"
    )


def _have_checkpointer() -> bool:
    try:
        import langgraph.checkpoint.postgres.aio  # noqa: F401
    except ImportError:
        console.print(
            "[yellow]langgraph-checkpoint-postgres is not installed: sizing runs without a "
            "checkpointer pool (pip install langgraph-checkpoint-postgres)[/yellow]"
        )
        return False
    return True


def _setup_checkpointer(server: BenchServer) -> None:
    import psycopg
    from langgraph.checkpoint.postgres import PostgresSaver

    with psycopg.connect(_conninfo(server), autocommit=True) as conn:
        PostgresSaver(conn).setup()  # type: ignore[arg-type]


def _pgbouncer_version() -> str:
    import subprocess

    binary = pgbouncer_binary()
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=False)
    return out.stdout.splitlines()[0].removeprefix("PgBouncer ").strip() if out.stdout else "?"


if __name__ == "__main__":
    raise SystemExit(main())
