"""The built wheel holds the package, installs in a fresh venv, and runs the README quickstart.

The wheel is built from this checkout by pyproject.toml's build backend (``pip wheel``, as
``python -m build`` does it); a new venv installs it and its dependencies, from PyPI, with
nothing of this checkout on ``sys.path``, and runs the README's quickstart against a test
database.  ``.ci/run`` also builds the sdist and the wheel with ``python -m build`` and
checks both with ``twine check``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

from langgraph_scoped_conn._version import __version__
from tests.test_readme import README, quickstart_blocks

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def clean_env(**extra: str) -> dict[str, str]:
    """Our environment without anything that would put this checkout or our venv in use."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "DATABASE_URL")
        and not k.startswith(("LSC_", "SCOPED_CONN_"))
    }
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-q",
            "--wheel-dir",
            str(out),
            str(ROOT),
        ],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (built,) = out.glob("langgraph_scoped_conn-*.whl")
    return built


def test_the_wheel_holds_the_package_its_types_and_its_readme(wheel: Path) -> None:
    assert wheel.name == f"langgraph_scoped_conn-{__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (metadata_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = Parser().parsestr(archive.read(metadata_name).decode())
    assert "langgraph_scoped_conn/py.typed" in names
    assert "langgraph_scoped_conn/__init__.pyi" in names
    assert "langgraph_scoped_conn/testing/postgres.py" in names  # the support package ships
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "docs/", "examples/"))]
    assert metadata["Requires-Python"] == ">=3.11"
    assert metadata["Description-Content-Type"] == "text/markdown"
    assert metadata.get_payload().strip() == README.read_text(encoding="utf-8").strip()
    assert {"docs", "demo", "test"} <= set(metadata.get_all("Provides-Extra") or [])


@pytest.mark.timeout(1200)
def test_a_fresh_venv_installs_the_wheel_and_runs_the_readme_quickstart(
    wheel: Path, tmp_path: Path, pg_db
) -> None:
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=1100,
        check=False,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    script = tmp_path / "quickstart.py"
    blocks = quickstart_blocks(README.read_text(encoding="utf-8"))
    where = "import langgraph_scoped_conn as _where\nprint('imported from', _where.__file__)\n"
    script.write_text("\n\n".join([*blocks, where]), encoding="utf-8")
    run = subprocess.run(
        [str(python), str(script)],
        cwd=tmp_path,  # not the checkout: the package must come from the wheel
        env=clean_env(DATABASE_URL=pg_db.url, LSC_CACHE_DIR=str(tmp_path / "cache")),
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert run.returncode == 0, f"the quickstart failed from the wheel:\n{run.stdout}\n{run.stderr}"
    assert f"imported from {env_dir}" in run.stdout, run.stdout
    assert "51 runs" in run.stdout, run.stdout  # the first run and the 50 concurrent ones
