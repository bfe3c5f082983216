"""pgbouncer: scale-out through a real PgBouncer, the pooler's pool choice, and budget sizing.

Needs the ``pgbouncer`` binary (Debian package ``pgbouncer``).  Three parts against one
throwaway PostgreSQL (max_connections=30, 3 reserved):

1. scale-out: 4 spawned processes run K/4 executions each of a wrapped ToolNode graph
   whose tool runs 3 queries (``tests/pgbouncer_worker.py``), straight to PostgreSQL,
   through PgBouncer (transaction mode, pool 5) with psycopg2 and with psycopg 3, and a
   control with psycopg's own ``prepare_threshold=5`` instead of the package's ``None``;
2. pool choice: checkout + ``select 1`` + checkin with the package's budget pool against
   a new connection per checkout (a NullPool), through PgBouncer and directly;
3. sizing: 4 processes, each with the budget and a checkpointer pool (2 connections),
   sized by the README formula and at twice it, directly and through PgBouncer.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

import langgraph_scoped_conn as lsc
from benchmarks import harness
from benchmarks.harness import APP_PASSWORD, APP_USER, BENCH_DB
from langgraph_scoped_conn.testing import PgBouncer, pgbouncer_binary, scram_secret
from tests.pgbouncer_worker import run_worker

SERVER_MAX_CONNECTIONS = 30
RESERVED = 3
BOUNCER_POOL = 5
WORKERS = 4
CHECKPOINTER_POOL = 2
SIZES = {
    "runs": (1000, 200, "executions per mode (K/4 per process)"),
    "concurrency": (16, 16, "runs in flight per process"),
    "budget": (5, 5, "max_connections per process"),
    "ops": (300, 100, "checkouts per pool-choice cell"),
}


def run_mode(
    name: str,
    server: harness.BenchServer,
    url: str,
    *,
    runs: int,
    concurrency: int,
    budget: int,
    bouncer: PgBouncer | None = None,
    options: dict[str, Any] | None = None,
    checkpointer: str | None = None,
) -> dict[str, Any]:
    """``WORKERS`` spawned processes, ``runs / WORKERS`` executions each; sampled on both sides."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(WORKERS + 1), ctx.Queue()
    kwargs = {
        "options": options,
        "checkpointer_conninfo": checkpointer,
        "checkpointer_pool_size": CHECKPOINTER_POOL,
    }
    procs = [
        ctx.Process(
            target=run_worker,
            args=(w, url, runs // WORKERS, concurrency, budget, barrier, results),
            kwargs=kwargs,
        )
        for w in range(WORKERS)
    ]
    backends = server.backend_sampler(interval=0.01)
    clients = harness.Sampler(lambda: _clients(bouncer) if bouncer else 0, 0.01)
    try:
        for p in procs:
            p.start()
        with backends, clients:
            barrier.wait(timeout=240)
            reports = [results.get(timeout=600) for _ in procs]
        for p in procs:
            p.join(timeout=60)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        backends.close()
    latencies = [x for r in reports for x in r["latencies"]]
    errors: dict[str, int] = {}
    for r in reports:
        for t, n in r["errors"].items():
            errors[t] = errors.get(t, 0) + n
    elapsed = max(r["elapsed"] for r in reports)
    ok = sum(r["ok"] for r in reports)
    return {
        "name": name,
        "ok": ok,
        "failed": sum(r["failed"] + r["wrong"] for r in reports),
        "errors": errors,
        "peak_server": backends.peak,
        "peak_clients": int(clients.peak) if bouncer else None,
        "exec_per_s": round(ok / elapsed, 1) if elapsed else 0.0,
        "p50_ms": round(harness.median(latencies) * 1000, 1),
        "p99_ms": round(harness.percentile(latencies, 99) * 1000, 1),
        "left_in_use": sum(r["connections_in_use"] + r["active_executions"] for r in reports),
    }


def _clients(bouncer: PgBouncer) -> int:
    """PgBouncer's client connections (active + waiting) for the bench database."""
    for row in bouncer.show("pools", user=APP_USER, password=APP_PASSWORD):
        if row["database"] == BENCH_DB:
            return int(row["cl_active"]) + int(row["cl_waiting"])
    return 0


def pool_choice(direct_url: str, bouncer_url: str, ops: int) -> list[dict[str, Any]]:
    """Milliseconds per checkout + ``select 1`` + checkin, budget pool against NullPool."""
    rows = []
    for target, url in (("PgBouncer", bouncer_url), ("PostgreSQL", direct_url)):
        manager = lsc.ExecutionConnectionManager(url, max_connections=5)
        null = create_engine(url.replace("?pgbouncer=true", ""), poolclass=NullPool)
        ms = {}
        try:
            with lsc.ExecutionScope(manager=manager):
                engines = {"pool": lsc.create_execution_scoped_engine_sync(), "new": null}
                for kind, engine in engines.items():
                    for i in range(ops + 1):  # the first one warms up
                        if i == 1:
                            t0 = time.perf_counter()
                        with engine.connect() as conn:
                            conn.execute(text("select 1"))
                    ms[kind] = (time.perf_counter() - t0) * 1000 / ops
        finally:
            manager.close()
            null.dispose()
        rows.append(
            {
                "target": target,
                "pool_ms": round(ms["pool"], 3),
                "new_ms": round(ms["new"], 3),
                "new_over_pool": round(ms["new"] / ms["pool"], 2),
            }
        )
    return rows


def sizing(
    server: harness.BenchServer, bouncer: PgBouncer | None, args: Any
) -> list[dict[str, Any]]:
    """Without ``bouncer``: direct at the formula's budget and at twice it; with it: PgBouncer
    at twice it.  The formula: (max_connections - reserved) // processes - checkpointer pool."""
    fit = (SERVER_MAX_CONNECTIONS - RESERVED) // WORKERS - CHECKPOINTER_POOL
    if bouncer is None:
        scenarios = [
            ("direct, formula budget", server.url(), fit, WORKERS * (fit + 2), True),
            ("direct, 2x the formula", server.url(), 2 * fit, WORKERS * (2 * fit + 2), False),
        ]
    else:
        url = bouncer.url(BENCH_DB, user=APP_USER, password=APP_PASSWORD)
        scenarios = [("PgBouncer, 2x the formula", url, 2 * fit, BOUNCER_POOL + WORKERS * 2, True)]
    out = []
    for name, url, budget, predicted, within in scenarios:
        m = run_mode(
            name,
            server,
            url,
            runs=args.runs,
            concurrency=max(args.concurrency, 2 * budget),
            budget=budget,
            bouncer=bouncer,
            options={"pool_timeout": 60},
            checkpointer=server.conninfo("checkpointer"),
        )
        first = max(m["errors"].items(), key=lambda kv: kv[1])[0] if m["errors"] else ""
        out.append(
            m
            | {
                "budget": budget,
                "predicted_peak": predicted,
                "within": within,
                "first_error": first.split("failed: ", 1)[-1][:90],
            }
        )
    return out


def setup_checkpointer(server: harness.BenchServer) -> None:
    import psycopg
    from langgraph.checkpoint.postgres import PostgresSaver

    with psycopg.connect(server.conninfo("checkpointer"), autocommit=True) as conn:
        PostgresSaver(conn).setup()  # type: ignore[arg-type]


def run_all(server: harness.BenchServer, args: Any) -> dict[str, Any]:
    """The three parts, sizing's direct scenarios first (PgBouncer keeps idle connections)."""
    admin = server.admin()
    try:
        secret = scram_secret(admin, APP_USER)
    finally:
        admin.close()
    setup_checkpointer(server)
    sized = sizing(server, None, args)
    with PgBouncer.running(
        server_port=server.cluster.port, users={APP_USER: secret}, pool_size=BOUNCER_POOL
    ) as bouncer:

        def via(driver: str) -> str:
            return bouncer.url(BENCH_DB, user=APP_USER, password=APP_PASSWORD, driver=driver)

        sizes = {"runs": args.runs, "concurrency": args.concurrency, "budget": args.budget}
        control = {"engine_options": {"connect_args": {"prepare_threshold": 5}}}
        modes = [
            run_mode("direct", server, server.url(), **sizes),
            run_mode("pgbouncer psycopg2", server, via("psycopg2"), bouncer=bouncer, **sizes),
            run_mode("pgbouncer psycopg3", server, via("psycopg"), bouncer=bouncer, **sizes),
            run_mode(
                "control: prepare_threshold=5",
                server,
                via("psycopg"),
                bouncer=bouncer,
                options=control,
                **sizes,
            ),
        ]
        choice = pool_choice(server.url(), via("psycopg2"), args.ops)
        sized += sizing(server, bouncer, args)
    return {"table": modes, "pool_choice": choice, "sizing": sized}


def checks(result: dict[str, Any], budget: int) -> dict[str, int]:
    direct, p2, p3, control = result["table"]
    return {
        "bouncer_failed": p2["failed"] + p3["failed"],
        "bouncer_peak": max(p2["peak_server"], p3["peak_server"]),
        "held": sum(m["left_in_use"] for m in result["table"]),
        "control_failed": control["failed"],
        "direct_over": int(direct["peak_server"] > WORKERS * budget),
        "sizing_failed": sum(s["failed"] for s in result["sizing"] if s["within"]),
        "oversized_failed": sum(s["failed"] for s in result["sizing"] if not s["within"]),
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = harness.parse(harness.arguments(__doc__, SIZES), argv)
    machine = harness.machine_info()
    if pgbouncer_binary() is None:
        harness.console.print("[red]pgbouncer is not installed: apt-get install -y pgbouncer")
        return 2
    with harness.bench_server(SERVER_MAX_CONNECTIONS) as server:
        result = run_all(server, args)
    for m in [*result["table"], *result["sizing"]]:
        for t, n in sorted(m["errors"].items(), key=lambda kv: -kv[1])[:3]:
            harness.console.print(f"[dim]{m['name']}: {n}x {t}[/dim]")
    result["checks"] = checks(result, args.budget)
    return harness.finish("pgbouncer", args, machine, result)


if __name__ == "__main__":
    raise SystemExit(main())
