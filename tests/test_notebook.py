"""examples/notebooks/quickstart.ipynb runs top to bottom, offline, and is stored without outputs.

It is executed with nbclient on a python3 (ipykernel) kernel, against the test
PostgreSQL through ``DATABASE_URL`` and against the embedded SQLite sample.  The
notebook's own asserts check the stats; this test checks the server side.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from langgraph_scoped_conn.testing import SUPERUSER_PASSWORD

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "notebooks" / "quickstart.ipynb"


def execute(tmp_path: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb, kernel_name="python3", timeout=180, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    return nb


def outputs_text(nb: nbformat.NotebookNode) -> str:
    parts = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            parts.append(output.get("text", ""))
            parts.append(output.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def wait_for_no_backends(pg_db, deadline_s: float = 15.0) -> int:
    """Backends of the database, polled until 0 (a closed socket ends its backend shortly after)."""
    end = time.monotonic() + deadline_s
    while True:
        n = pg_db.backends()
        if n == 0 or time.monotonic() > end:
            return n
        time.sleep(0.1)


@pytest.mark.slow
def test_notebook_runs_on_postgres(tmp_path: Path, pg_db, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", pg_db.url)
    monkeypatch.setenv("LSC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("LSC_CHAT_MODEL", raising=False)
    nb = execute(tmp_path)
    text = outputs_text(nb)
    assert "open executions after close(): 0 | connections in use: 0" in text
    assert "'rows': '[(3000,)]'" in text
    assert SUPERUSER_PASSWORD not in text
    assert not (tmp_path / "cache").exists()  # PostgreSQL was used, not the SQLite sample
    assert pg_db.query("select count(*) from sales") == [(3000,)]
    assert wait_for_no_backends(pg_db) == 0


@pytest.mark.slow
def test_notebook_runs_offline_on_sqlite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("LSC_CHAT_MODEL", raising=False)
    monkeypatch.setenv("LSC_CACHE_DIR", str(tmp_path / "cache"))
    nb = execute(tmp_path)
    assert (tmp_path / "cache" / "store-v1.sqlite").exists()
    assert "runs: 13 | peak connections:" in outputs_text(nb)


def test_notebook_is_stored_without_outputs() -> None:
    raw = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    nbformat.validate(nbformat.reads(json.dumps(raw), as_version=4))
    code = [c for c in raw["cells"] if c["cell_type"] == "code"]
    assert code, "the notebook has no code cells"
    for cell in code:
        assert cell["outputs"] == [], f"outputs left in cell {cell.get('id')}"
        assert cell["execution_count"] is None, f"execution count left in cell {cell.get('id')}"
