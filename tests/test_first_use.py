"""A fresh process's first use of the SQLDatabase adapter (imported lazily, on first use).

The first SQLDatabase of a fresh process, through each entry point, works without the
adapter having been imported before it (and without langchain-community's sunset warning).

A fresh process's first burst: concurrent first uses all succeed.

Reproduction: 8 threads opening executions at once and calling
``get_scoped_sql_database()`` as a fresh process's first use of the adapter failed 7 of 8
calls in 2 of 4 processes (``partially initialized module ... has no attribute``): a lazy
import read ``sys.modules`` while another thread was still importing.  A server that
starts and takes a burst of runs hits exactly this.  Each case runs in many fresh
interpreters, from threads and from tasks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Database, run_fresh

ROOT = Path(__file__).resolve().parents[1]

BURST = """
import asyncio, json, sys, threading, warnings
warnings.simplefilter("error", DeprecationWarning)
import langgraph_scoped_conn as lsc

url, how, first = sys.argv[1], sys.argv[2], sys.argv[3]
lsc.configure(url, max_connections=8, pool_timeout=60)
N = 8
errors, answers = [], []
barrier = threading.Barrier(N)

def first_use():
    if first == "root-names":  # the package's lazily loaded public names
        return lsc.with_scoped_connections, lsc.ScopedSQLDatabaseProxy, lsc.ScopedEngine
    with lsc.ExecutionScope():
        return lsc.get_scoped_sql_database().run("select count(*) from orders")

def in_thread():
    try:
        barrier.wait(30)
        answers.append(str(first_use()))
    except BaseException as exc:
        errors.append(f"{type(exc).__name__}: {exc}")

async def in_tasks():
    # tasks on one loop, each handing its first use to the executor, as async tools do
    from concurrent.futures import ThreadPoolExecutor
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(N))
    async def one():
        await asyncio.sleep(0)
        return await asyncio.to_thread(in_thread)
    await asyncio.gather(*(one() for _ in range(N)))

if how == "threads":
    threads = [threading.Thread(target=in_thread) for _ in range(N)]
    for t in threads: t.start()
    for t in threads: t.join(60)
else:
    asyncio.run(in_tasks())
print(json.dumps({"errors": errors, "answers": len(answers)}))
"""


def run_burst(url: str, how: str, first: str) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCOPED_CONN_")}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run(
        [sys.executable, "-c", BURST, url, how, first],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        env=env,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    outcome: dict[str, object] = json.loads(result.stdout.strip().splitlines()[-1])
    return outcome


@pytest.mark.slow
@pytest.mark.parametrize("first", ["sql-database", "root-names"])
@pytest.mark.parametrize("how", ["threads", "tasks"])
def test_the_first_burst_of_a_fresh_process_all_succeeds(
    how: str, first: str, pg_db: Database
) -> None:
    for _ in range(6):  # fresh interpreters: the race is in the first import only
        outcome = run_burst(pg_db.url, how, first)
        assert outcome == {"errors": [], "answers": 8}, outcome


# -- the first SQLDatabase of a fresh process ---------------------------------------------


FIRST_USE = """
import json, sys, warnings
warnings.simplefilter("error", DeprecationWarning)  # langchain-community's sunset warning too
import langgraph_scoped_conn as lsc
loaded = "langgraph_scoped_conn.sql_database" in sys.modules
manager = lsc.configure(sys.argv[1], max_connections=2)
entry = sys.argv[2]
with lsc.ExecutionScope():
    if entry == "get_scoped_sql_database":
        db = lsc.get_scoped_sql_database()
    elif entry == "get_scoped_sql_database_read_only":
        db = lsc.get_scoped_sql_database(read_only=True)
    else:
        db = lsc.create_execution_scoped_sql_database_sync()
    out = db.run("select count(*) from customers")
manager.close()
print(json.dumps([loaded, out]))
"""


@pytest.mark.usefixtures("no_scoped_conn_env")  # no SCOPED_CONN_* options
@pytest.mark.parametrize(
    "entry",
    [
        "get_scoped_sql_database",
        "get_scoped_sql_database_read_only",
        "create_execution_scoped_sql_database_sync",
    ],
)
def test_the_first_sql_database_of_a_fresh_process(pg_db: Database, entry: str) -> None:
    # nothing has imported the SQLDatabase adapter yet: the lazy import path itself runs
    result = run_fresh(FIRST_USE, pg_db.url, entry)
    assert result.returncode == 0, result.stderr
    loaded, out = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded is False, "the adapter was imported before its first use"
    assert out == "[(50,)]"
