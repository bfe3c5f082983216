"""A throwaway PgBouncer in transaction mode, and the multi-process workload run through it.

:class:`PgBouncer` writes a ``pgbouncer.ini`` and a ``userlist.txt`` into a temporary
directory and starts the Debian ``pgbouncer`` binary in the foreground on 127.0.0.1 and
a free port (never a Unix socket, never a well-known port).  PgBouncer refuses to run
as root, so as root it runs as the ``postgres`` system user, like ``tests.pgcluster``.

Authentication matches the cluster's: ``auth_type = scram-sha-256`` with the role's
SCRAM *secret* (``pg_authid.rolpassword``) in the userlist, so no plaintext password is
written to disk; PgBouncer reuses the client's SCRAM proof to log in to the server.

The second half, :func:`run_worker`, is what each spawned worker process runs: K/4
executions of a wrapped LangGraph graph whose SQL tool queries through PgBouncer.  It
lives here, not in a test module, so ``multiprocessing`` (spawn) can import it cheaply
and ``benchmarks/bench_pgbouncer.py`` can reuse it.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# module level: the tool's and node's annotations are resolved from these globals
from langchain_core.runnables import RunnableConfig
from langgraph.graph import MessagesState

from tests.pgcluster import free_port

__all__ = ["PgBouncer", "pgbouncer_binary", "run_worker", "scram_secret"]

_ADMIN_COMMANDS = frozenset({"RECONNECT", "PAUSE", "RESUME", "KILL", "RELOAD"})

#: The Debian/Ubuntu package that provides the binary (``apt-get install -y pgbouncer``).
DEBIAN_PACKAGE = "pgbouncer"


def pgbouncer_binary() -> str | None:
    """Path of the ``pgbouncer`` binary, or ``None`` when it is not installed."""
    found = shutil.which("pgbouncer")
    if found:
        return found
    for candidate in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer", "/usr/local/bin/pgbouncer"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def scram_secret(admin_conn: Any, role: str) -> str:
    """The SCRAM-SHA-256 secret of ``role`` from ``pg_authid`` (needs a superuser connection)."""
    with admin_conn.cursor() as cur:
        cur.execute("select rolpassword from pg_authid where rolname = %s", (role,))
        row = cur.fetchone()
    if row is None or not str(row[0] or "").startswith("SCRAM-SHA-256$"):
        raise RuntimeError(
            f"role {role!r} has no SCRAM-SHA-256 password; set one with "
            "password_encryption = 'scram-sha-256' before starting PgBouncer"
        )
    return str(row[0])


class PgBouncer:
    """One PgBouncer process in front of one PostgreSQL server.

    Every database name is forwarded to the same-named database on the server (the
    ``*`` fallback entry), so one bouncer serves every test database.  Pools are per
    (database, user) pair and hold at most ``pool_size`` server connections
    (``default_pool_size``, no reserve pool, ``max_db_connections`` the same).

    Args:
        server_port: the PostgreSQL port.
        users: role name -> SCRAM secret (or plaintext password) for ``userlist.txt``.
        pool_size: ``default_pool_size`` and ``max_db_connections``.
        max_client_conn: how many client connections PgBouncer accepts in all.
        server_host: the PostgreSQL host (the throwaway clusters listen on 127.0.0.1).
        pool_mode: ``transaction`` (the point of these tests), ``session`` or ``statement``.
    """

    def __init__(
        self,
        *,
        server_port: int,
        users: dict[str, str],
        server_host: str = "127.0.0.1",
        pool_size: int = 3,
        max_client_conn: int = 400,
        pool_mode: str = "transaction",
    ) -> None:
        if pgbouncer_binary() is None:
            raise RuntimeError(
                f"pgbouncer is not installed; install it with `apt-get install -y {DEBIAN_PACKAGE}`"
            )
        self.server_host = server_host
        self.server_port = server_port
        self.users = dict(users)
        self.pool_size = pool_size
        self.max_client_conn = max_client_conn
        self.pool_mode = pool_mode
        self.port = 0
        self.root = Path(tempfile.mkdtemp(prefix="lsc-pgbouncer-"))
        self.ini = self.root / "pgbouncer.ini"
        self.userlist = self.root / "userlist.txt"
        self.logfile = self.root / "pgbouncer.log"
        self._proc: subprocess.Popen[bytes] | None = None

    # -- files -------------------------------------------------------------------------

    def _write_files(self) -> None:
        lines = [f'"{user}" "{secret}"' for user, secret in self.users.items()]
        self.userlist.write_text("\n".join(lines) + "\n")
        users = ", ".join(self.users)
        self.ini.write_text(
            "\n".join(
                [
                    "[databases]",
                    f"* = host={self.server_host} port={self.server_port}",
                    "",
                    "[pgbouncer]",
                    "listen_addr = 127.0.0.1",
                    f"listen_port = {self.port}",
                    "unix_socket_dir =",
                    f"pool_mode = {self.pool_mode}",
                    f"default_pool_size = {self.pool_size}",
                    "min_pool_size = 0",
                    "reserve_pool_size = 0",
                    f"max_db_connections = {self.pool_size}",
                    f"max_client_conn = {self.max_client_conn}",
                    "auth_type = scram-sha-256",
                    f"auth_file = {self.userlist}",
                    f"admin_users = {users}",
                    f"stats_users = {users}",
                    "ignore_startup_parameters = extra_float_digits",
                    "server_login_retry = 1",
                    "query_wait_timeout = 60",
                    f"logfile = {self.logfile}",
                    "log_connections = 0",
                    "log_disconnections = 0",
                    "",
                ]
            )
        )
        os.chmod(self.root, 0o700)
        os.chmod(self.userlist, 0o600)
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            for p in (self.root, self.ini, self.userlist):
                os.chown(p, pw.pw_uid, pw.pw_gid)

    # -- process -----------------------------------------------------------------------

    def start(self) -> PgBouncer:
        """Start PgBouncer in the foreground and wait until it accepts connections."""
        if self._proc is not None:
            raise RuntimeError("PgBouncer is already running")
        self.port = free_port()
        self._write_files()
        binary = pgbouncer_binary()
        assert binary is not None
        kwargs: dict[str, Any] = {}
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            kwargs = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        self._proc = subprocess.Popen(
            [binary, str(self.ini)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.root,
            **kwargs,
        )
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                break
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1),
            ):
                return
            time.sleep(0.05)
        log = self.logfile.read_text()[-2000:] if self.logfile.exists() else "(no log)"
        self.stop()
        raise RuntimeError(f"PgBouncer did not start on 127.0.0.1:{self.port}; log:\n{log}")

    def stop(self) -> None:
        """Stop the process this object started (SIGTERM, then SIGKILL after 10 s)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    @classmethod
    @contextlib.contextmanager
    def running(cls, **kwargs: Any) -> Iterator[PgBouncer]:
        bouncer = cls(**kwargs).start()
        try:
            yield bouncer
        finally:
            bouncer.destroy()

    # -- clients -----------------------------------------------------------------------

    def url(
        self,
        database: str,
        *,
        user: str,
        password: str,
        driver: str = "psycopg2",
        flag: bool = True,
    ) -> str:
        """A client URL through PgBouncer; ``flag`` adds ``?pgbouncer=true`` (auto-detection)."""
        query = "?pgbouncer=true" if flag else ""
        return f"postgresql+{driver}://{user}:{password}@127.0.0.1:{self.port}/{database}{query}"

    def show(self, what: str, *, user: str, password: str) -> list[dict[str, Any]]:
        """Rows of ``SHOW <what>`` from the admin console (``pools``, ``clients``, ``servers``).

        ``what`` may also be an admin command such as ``RECONNECT <db>`` (no rows).
        """
        import psycopg2

        conn = psycopg2.connect(
            host="127.0.0.1", port=self.port, user=user, password=password, dbname="pgbouncer"
        )
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                verb = what.split(maxsplit=1)[0].upper()
                command = what if verb in _ADMIN_COMMANDS else f"SHOW {what}"
                cur.execute(command)
                if cur.description is None:
                    return []
                names = [d[0] for d in cur.description]
                return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
        finally:
            conn.close()

    def __repr__(self) -> str:
        state = "running" if self._proc is not None else "stopped"
        return f"PgBouncer(127.0.0.1:{self.port}, pool_size={self.pool_size}, {state})"


# -- the workload of one worker process -------------------------------------------------------

#: Each tool call runs this many statements, like the storm benchmark's tool.
QUERIES_PER_TOOL_CALL = 3


def build_graph(checkpointer: Any = None) -> Any:
    """A wrapped ToolNode graph: agent -> SQL tool (3 queries) -> agent -> end."""
    from langchain_core.messages import AIMessage, ToolMessage
    from langchain_core.tools import tool
    from langgraph.graph import END, START, StateGraph
    from langgraph.prebuilt import ToolNode, tools_condition

    from langgraph_scoped_conn import get_scoped_sql_database, with_scoped_connections

    @tool
    def count_orders(customer_id: int, config: RunnableConfig) -> str:
        """Count the orders of one customer."""
        db = get_scoped_sql_database(config)
        result = ""
        for _ in range(QUERIES_PER_TOOL_CALL):
            # the same text again and again: psycopg 3 would prepare it server-side
            result = db.run(f"select count(*) from orders where customer_id = {customer_id}")
        return result

    def agent(state: MessagesState) -> dict[str, Any]:
        last = state["messages"][-1]
        if isinstance(last, ToolMessage):
            return {"messages": [AIMessage(content=f"orders: {last.content}")]}
        customer = int(str(last.content))
        call = {"name": "count_orders", "args": {"customer_id": customer}, "id": f"c{customer}"}
        return {"messages": [AIMessage(content="", tool_calls=[call])]}

    builder = StateGraph(MessagesState)
    builder.add_node("agent", agent)
    builder.add_node("tools", ToolNode([count_orders]))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", tools_condition, ["tools", END])
    builder.add_edge("tools", "agent")
    return with_scoped_connections(builder.compile(checkpointer=checkpointer))


def expected_answer(customer_id: int) -> str:
    """The graph's answer for ``customer_id`` on the sample schema (500 orders, 50 customers)."""
    count = sum(1 for g in range(1, 501) if 1 + g % 50 == customer_id)
    return f"orders: [({count},)]"


def run_worker(
    worker: int,
    url: str,
    runs: int,
    concurrency: int,
    max_connections: int,
    barrier: Any = None,
    results: Any = None,
    options: dict[str, Any] | None = None,
    checkpointer_conninfo: str | None = None,
    checkpointer_pool_size: int = 0,
) -> dict[str, Any]:
    """Run ``runs`` executions of the graph with ``concurrency`` in flight; report the outcome.

    Meant to be the target of a spawned process: it configures its own process-default
    manager on ``url`` (the strategy is detected from the URL), waits at ``barrier`` so
    every worker starts together, and puts its report on ``results`` when given.  The
    report never contains the URL.

    With ``checkpointer_conninfo``, the graph also checkpoints every step with
    langgraph-checkpoint-postgres' ``AsyncPostgresSaver`` over a psycopg
    ``AsyncConnectionPool`` of ``checkpointer_pool_size`` connections (its tables must
    exist already), as a deployed agent does: that pool counts against the server's
    max_connections too.
    """
    import asyncio

    import langgraph_scoped_conn as lsc

    manager = lsc.configure(url, max_connections=max_connections, **(options or {}))
    try:
        report = asyncio.run(
            _session(
                worker,
                runs,
                concurrency,
                barrier,
                checkpointer_conninfo,
                checkpointer_pool_size,
            )
        )
        manager.drain(timeout=30)
        stats = manager.get_stats()
        report.update(
            worker=worker,
            pid=os.getpid(),
            strategy=stats["strategy"],
            active_executions=stats["active_executions"],
            connections_in_use=stats["connections_in_use"],
            peak_open=stats["peak_connections"],
            checkout_waits=stats["checkout_waits"],
            tracked_runs=manager.tracked_runs(),
        )
    finally:
        manager.close()
    if results is not None:
        results.put(report)
    return report


async def _session(
    worker: int,
    runs: int,
    concurrency: int,
    barrier: Any,
    checkpointer_conninfo: str | None,
    checkpointer_pool_size: int,
) -> dict[str, Any]:
    import asyncio

    from langgraph_scoped_conn.redaction import redact_url

    saver_pool: Any = None
    try:
        checkpointer = None
        if checkpointer_conninfo:
            from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
            from psycopg.rows import dict_row
            from psycopg_pool import AsyncConnectionPool

            saver_pool = AsyncConnectionPool(
                checkpointer_conninfo,
                min_size=1,
                max_size=checkpointer_pool_size,
                kwargs={"autocommit": True, "prepare_threshold": 0, "row_factory": dict_row},
                open=False,
            )
            await saver_pool.open(wait=True)
            checkpointer = AsyncPostgresSaver(saver_pool)
        graph = build_graph(checkpointer)
        # warm the imports and the reflection cache before the clock starts
        config = {"configurable": {"thread_id": f"w{worker}-warm"}}
        await graph.ainvoke({"messages": [("user", "1")]}, config)
    except BaseException:
        if barrier is not None:
            barrier.abort()  # the parent and the other workers stop waiting at once
        if saver_pool is not None:
            await saver_pool.close()
        raise

    errors: dict[str, int] = {}
    wrong = 0
    latencies: list[float] = []
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        nonlocal wrong
        customer = 1 + (worker + i) % 5  # few distinct texts: each repeats on a connection
        config = {"configurable": {"thread_id": f"w{worker}-{i}"}}
        async with gate:
            start = time.perf_counter()
            try:
                out = await graph.ainvoke({"messages": [("user", str(customer))]}, config)
            except Exception as exc:
                key = redact_url(f"{type(exc).__name__}: {exc}").splitlines()[0][:200]
                errors[key] = errors.get(key, 0) + 1
                return
            latencies.append(time.perf_counter() - start)
            if out["messages"][-1].content != expected_answer(customer):
                wrong += 1

    try:
        if barrier is not None:
            await asyncio.to_thread(barrier.wait, 180)
        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(runs)))
        elapsed = time.perf_counter() - started
    finally:
        if saver_pool is not None:
            await saver_pool.close()
    return {
        "ok": len(latencies) - wrong,
        "wrong": wrong,
        "failed": sum(errors.values()),
        "errors": errors,
        "elapsed": elapsed,
        "latencies": latencies,
    }
