"""Compare two commits on one benchmark: the same scripts, alternating processes, ratios.

Each round runs the benchmark once per side, each in its own process, the order
flipped every round (old, new, new, old, ...), so drift in the machine's load hits
both alike; every figure of the benchmark (``figures.py``) is reported per round as
``new / old``, with the median.  A side is a commit (checked out into a temporary
worktree, removed afterwards) or a checkout's directory; this checkout's
``benchmarks/*.py`` (and the support package, if the side predates it) are copied into
any other side first, so both run the same harness.

Run: ``python -m benchmarks.compare_commits acquire --old HEAD~1`` (new: this
checkout), ``--new <commit or dir>``, ``--rounds 4``, ``--args="--n 1000"`` (with ``=``:
the value starts with a dash).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from benchmarks import harness
from benchmarks.figures import BENCHMARKS, figures, fmt

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SUPPORT = Path("langgraph_scoped_conn") / "testing"


@contextlib.contextmanager
def checkout(side: str) -> Iterator[Path]:
    """A directory holding ``side``: itself if it is one, else a temporary worktree."""
    made = not Path(side).is_dir()
    path = Path(tempfile.mkdtemp(prefix="lsc-compare-")) / "tree" if made else Path(side).resolve()
    if made:
        git("worktree", "add", "--detach", str(path), side)
    try:
        if path != ROOT:
            for script in HERE.glob("*.py"):
                shutil.copy2(script, path / "benchmarks" / script.name)
            if not (path / SUPPORT).exists():
                shutil.copytree(ROOT / SUPPORT, path / SUPPORT)
        yield path
    finally:
        if made:
            git("worktree", "remove", "--force", str(path))
            path.parent.rmdir()


def git(*args: str) -> None:
    subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True)


def run_side(root: Path, bench: str, args: list[str], out: Path) -> dict[str, Any]:
    """One run of ``bench`` in ``root``'s checkout; its result."""
    cmd = [sys.executable, "-m", f"benchmarks.bench_{bench}", *args]
    cmd += ["--out", "compare", "--results", str(out)]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, check=False)
    path = out / "compare.json"
    if not path.exists():
        harness.console.print(proc.stdout[-3000:], proc.stderr[-3000:])
        raise SystemExit(f"{bench} in {root} wrote no result (exit code {proc.returncode})")
    result: dict[str, Any] = json.loads(path.read_text())
    path.unlink()
    return result


def compare(bench: str, sides: dict[str, Path], rounds: int, args: list[str]) -> dict[str, Any]:
    """``rounds`` alternating rounds; per figure, each side's values and new/old per round."""
    values: dict[str, dict[str, list[Any]]] = {"old": {}, "new": {}}
    codes = {}
    with tempfile.TemporaryDirectory(prefix="lsc-compare-out-") as tmp:
        for r in range(rounds):
            for side in ("old", "new") if r % 2 == 0 else ("new", "old"):
                result = run_side(sides[side], bench, args, Path(tmp))
                codes[side] = result["machine"]["code"]
                for f in figures(bench):
                    values[side].setdefault(f.label, []).append(f.value(result))
                harness.console.print(f"round {r + 1} {side}: {codes[side]}")
    summary = {}
    for f in figures(bench):
        old, new = values["old"][f.label], values["new"][f.label]
        pairs = [n / o for o, n in zip(old, new, strict=True) if _number(o) and _number(n) and o]
        summary[f.label] = {"old": old, "new": new, "new_over_old": [round(p, 3) for p in pairs]}
    return {"benchmark": bench, "codes": codes, "rounds": rounds, "args": args, "figures": summary}


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def report(result: dict[str, Any]) -> None:
    rows = [
        (
            label,
            " ".join(fmt(x) for x in s["old"]),
            " ".join(fmt(x) for x in s["new"]),
            " ".join(f"{x:.3f}" for x in s["new_over_old"]),
            harness.median(s["new_over_old"]) if s["new_over_old"] else None,
        )
        for label, s in result["figures"].items()
    ]
    title = f"{result['benchmark']}: old {result['codes']['old']} vs new {result['codes']['new']}"
    columns = ["figure", "old per round", "new per round", "new/old per round", "median"]
    harness.console.print(harness.table(title, columns, rows))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bench", choices=list(BENCHMARKS))
    parser.add_argument("--old", default="HEAD~1", help="a commit or a checkout (HEAD~1)")
    parser.add_argument("--new", default=str(ROOT), help="a commit or a checkout (this one)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds, each runs both sides")
    parser.add_argument("--args", default="", help="the benchmark's arguments, one string")
    args = parser.parse_args(argv)
    with checkout(args.old) as old, checkout(args.new) as new:
        result = compare(args.bench, {"old": old, "new": new}, args.rounds, shlex.split(args.args))
    report(result)
    out = harness.RESULTS_DIR / f"compare_{args.bench}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    harness.console.print(f"[dim]wrote {out}[/dim]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
