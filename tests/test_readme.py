"""The README's quickstart runs exactly as written, so the docs cannot rot.

Convention: every fenced ```python block whose opening fence is the next non-blank
line after a ``<!-- quickstart -->`` line is a quickstart block.  The blocks run in
order, in one namespace (one script), in a subprocess with ``DATABASE_URL`` set to
a fresh test database and a temporary directory as the working directory.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from langgraph_scoped_conn.testing import SUPERUSER_PASSWORD

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- quickstart -->"


def quickstart_blocks(markdown: str) -> list[str]:
    """The quickstart python blocks of ``markdown``, in order.

    Raises:
        ValueError: a marker is not followed by a ```python block, or a block is not closed.
    """
    lines = markdown.splitlines()
    blocks = []
    for i, line in enumerate(lines):
        if line.strip() != MARKER:
            continue
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        if j >= len(lines) or lines[j].strip() != "```python":
            raise ValueError(f"README line {i + 1}: {MARKER} is not followed by a ```python block")
        body = []
        for k in range(j + 1, len(lines)):
            if lines[k].strip() == "```":
                break
            body.append(lines[k])
        else:
            raise ValueError(f"README line {j + 1}: the quickstart block is never closed")
        blocks.append("\n".join(body) + "\n")
    return blocks


def test_block_extraction_follows_the_convention() -> None:
    lines = [
        *("intro", MARKER, "", "```python", "x = 1", "```"),
        *("```python", "not_marked = 1", "```"),
        *(MARKER, "```python", "y = x", "```"),
    ]
    text = "\n".join(lines)
    assert quickstart_blocks(text) == ["x = 1\n", "y = x\n"]
    assert quickstart_blocks("```python\nx = 1\n```\n") == []
    with pytest.raises(ValueError, match="not followed by a ```python block"):
        quickstart_blocks(f"{MARKER}\n```bash\nls\n```\n")


def test_readme_quickstart_runs_as_written(tmp_path: Path, pg_db) -> None:
    blocks = quickstart_blocks(README.read_text(encoding="utf-8"))
    assert blocks, f"README.md has no ```python block after a {MARKER} line"
    script = tmp_path / "quickstart.py"
    script.write_text("\n\n".join(blocks), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LSC_", "DATABASE_URL"))}
    env.update({"DATABASE_URL": pg_db.url, "LSC_CACHE_DIR": str(tmp_path / "cache")})
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, f"the README quickstart failed:\n{proc.stdout}\n{proc.stderr}"
    assert proc.stdout.strip(), "the README quickstart printed nothing"
    assert SUPERUSER_PASSWORD not in proc.stdout + proc.stderr
    # server side: the quickstart's process is gone, and so are its connections
    deadline = time.monotonic() + 15
    while pg_db.backends() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pg_db.backends() == 0
