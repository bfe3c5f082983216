"""Every code block of README.md and docs/*.md is executed or checked, so the docs cannot rot.

What happens to a fenced block depends on its language; a block in any other language,
or in none, fails the test:

* ``python``: a page's python blocks run in order, as one script, in a subprocess whose
  ``DATABASE_URL`` is a fresh test database holding the small customers/orders schema,
  with a temporary directory as its working directory.  Afterwards the server must show
  no connection left to that database, and the output no password.  A page that calls
  ``init_chat_model`` gets the offline scripted model from it (a prelude patches
  ``langchain.chat_models.init_chat_model``), so the examples run without an API key.
* ``bash``: every command (lines joined at ``\\``, split at ``&&``) must be one this test
  knows how to check, and passes that check: extras named in ``pip install`` exist in
  pyproject.toml, the demo's arguments parse, files and modules named exist, a ``curl``
  names a route of the debug app, environment variables named are ones the code reads.
* ``sql``: runs on the test database as a superuser, inside a transaction rolled back.
* ``json``: parses.
* ``dotenv``: every variable is ``DATABASE_URL``, ``SCOPED_CONN_DEBUG_TOKEN`` or a
  ``SCOPED_CONN_<OPTION>`` whose value the settings accept.
* ``mermaid``: every code name in it (``CamelCase``, ``name.attribute``) is in the package.

A python block right after ``<!-- not-run: reason -->`` is left out of its page's script;
there may be at most :data:`MAX_NOT_RUN` such blocks in all, each with a reason.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from langgraph_scoped_conn.settings import ENV_PREFIX, ScopedConnSettings, options_with_env
from langgraph_scoped_conn.testing import SUPERUSER_PASSWORD

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
EXTRAS = set(PYPROJECT["project"]["optional-dependencies"])
MARKERS = {m.split(":")[0] for m in PYPROJECT["tool"]["pytest"]["ini_options"]["markers"]}
NOT_RUN = re.compile(r"<!--\s*not-run:(.*?)-->")
MAX_NOT_RUN = 2
LANGUAGES = {"python", "bash", "sql", "json", "dotenv", "mermaid"}
#: the model the docs' agents ask for is the offline scripted one: no API key in CI
MODEL_PRELUDE = """\
import langchain.chat_models as _docs_chat_models
from langgraph_scoped_conn.demo import ScriptedSQLChatModel as _DocsModel

_docs_chat_models.init_chat_model = lambda *args, _model=_DocsModel, **kwargs: _model()
del _docs_chat_models, _DocsModel
"""


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


@dataclass(frozen=True)
class Block:
    """One fenced code block of a page."""

    page: Path
    line: int  # of the opening fence, 1-based
    language: str
    body: str
    not_run: str | None  # the reason given in a <!-- not-run: ... --> right before it

    @property
    def where(self) -> str:
        return f"{page_id(self.page)}:{self.line}"


def blocks_of(text: str, page: Path) -> list[Block]:
    """The fenced code blocks of ``text``, in order.

    Raises:
        ValueError: a block is never closed.
    """
    lines = text.splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        stripped = lines[i].strip()
        if not stripped.startswith("```"):
            i += 1
            continue
        language = stripped[3:].strip()
        indent = len(lines[i]) - len(lines[i].lstrip())
        before = next((lines[k].strip() for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        marker = NOT_RUN.fullmatch(before)
        body: list[str] = []
        j = i + 1
        while j < len(lines) and lines[j].strip() != "```":
            body.append(lines[j][indent:])
            j += 1
        if j == len(lines):
            raise ValueError(f"{page_id(page)}:{i + 1}: the ``` block is never closed")
        reason = marker.group(1).strip() if marker else None
        out.append(Block(page, i + 1, language, "\n".join(body) + "\n", reason))
        i = j + 1
    return out


def all_blocks() -> list[Block]:
    return [b for page in PAGES for b in blocks_of(page.read_text(encoding="utf-8"), page)]


def test_block_extraction_follows_the_convention() -> None:
    text = "\n".join(
        [
            "intro",
            "```python",
            "x = 1",
            "```",
            "<!-- not-run: needs a key -->",
            "",
            "```bash",
            "ls",
            "```",
            "- item:",
            "  ```json",
            "  {}",
            "  ```",
        ]
    )
    found = blocks_of(text, ROOT / "README.md")
    assert [(b.line, b.language, b.body, b.not_run) for b in found] == [
        (2, "python", "x = 1\n", None),
        (7, "bash", "ls\n", "needs a key"),
        (11, "json", "{}\n", None),
    ]
    with pytest.raises(ValueError, match="never closed"):
        blocks_of("```python\nx = 1\n", ROOT / "README.md")


def test_every_block_is_in_a_language_this_test_runs_or_checks() -> None:
    odd = [f"{b.where} ({b.language or 'no language'})" for b in all_blocks()]
    odd = [where for where, b in zip(odd, all_blocks(), strict=True) if b.language not in LANGUAGES]
    assert odd == [], f"blocks that nothing runs or checks: {odd}"


def test_blocks_left_out_are_few_and_say_why() -> None:
    left_out = [b for b in all_blocks() if b.not_run is not None]
    assert all(b.not_run for b in left_out), [b.where for b in left_out if not b.not_run]
    assert all(b.language == "python" for b in left_out), [b.where for b in left_out]
    assert len(left_out) <= MAX_NOT_RUN, [f"{b.where}: {b.not_run}" for b in left_out]


# -- python: each page's blocks as one script -------------------------------------------


def page_script(page: Path) -> str | None:
    """The page's python blocks in order, each headed by where it comes from; None if none."""
    blocks = [
        b
        for b in blocks_of(page.read_text(encoding="utf-8"), page)
        if b.language == "python" and b.not_run is None
    ]
    if not blocks:
        return None
    parts = [f"# --- {b.where} ---\n{b.body}" for b in blocks]
    if any("init_chat_model" in b.body for b in blocks):
        parts.insert(0, f"# --- tests/test_docs.py: MODEL_PRELUDE ---\n{MODEL_PRELUDE}")
    return "\n".join(parts)


PYTHON_PAGES = [p for p in PAGES if page_script(p) is not None]


def script_env(database_url: str, tmp_path: Path) -> dict[str, str]:
    """The environment of a reader: ours without the package's and the tests' variables."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LSC_", "SCOPED_CONN_", "DATABASE_URL", "PYTHONPATH"))
    }
    env.update(
        {
            "DATABASE_URL": database_url,
            "LSC_CACHE_DIR": str(tmp_path / "cache"),
            "PYTHONPATH": str(ROOT),  # this checkout, whatever the venv's install points at
        }
    )
    return env


@pytest.mark.parametrize("page", PYTHON_PAGES, ids=page_id)
def test_the_python_blocks_of_each_page_run_as_written(page: Path, tmp_path: Path, pg_db) -> None:
    script = tmp_path / f"{page.stem}.py"
    script.write_text(page_script(page) or "", encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=script_env(pg_db.url, tmp_path),
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{page_id(page)}'s python blocks failed:\n{out[-6000:]}"
    assert SUPERUSER_PASSWORD not in out
    # server side: the script's process is gone, and so are its connections
    deadline = time.monotonic() + 15
    while pg_db.backends() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pg_db.backends() == 0, f"{page_id(page)} left connections open"


# -- bash: every command is one we know and it checks out --------------------------------


def commands_of(body: str) -> Iterator[str]:
    """The commands of a bash block: comments dropped, ``\\`` lines joined, split at ``&&``."""
    joined = re.sub(r"\\\n\s*", " ", body)
    for raw in joined.splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        yield from (part.strip() for part in line.split("&&"))


#: environment variables the docs may name, besides SCOPED_CONN_<OPTION>; each must be
#: read somewhere in the code (checked below)
KNOWN_ENV = {
    "DATABASE_URL",
    "TEST_DATABASE_URL",
    "SCOPED_CONN_DEBUG_TOKEN",
    "LSC_TEST_POSTGRES",
    "LSC_POSTGRES_BINDIR",
    "LSC_PGBOUNCER_BINARY",
    "LSC_CHAT_MODEL",
    "LSC_CACHE_DIR",
}
CODE_TEXT = "\n".join(
    p.read_text(encoding="utf-8")
    for p in [*(ROOT / "langgraph_scoped_conn").rglob("*.py"), ROOT / "tests" / "conftest.py"]
)


def check_env_name(name: str) -> None:
    if name.startswith(ENV_PREFIX) and name != "SCOPED_CONN_DEBUG_TOKEN":
        option = name.removeprefix(ENV_PREFIX).lower()
        assert option in ScopedConnSettings.__dataclass_fields__, f"{name}: no option {option}"
        return
    assert name in KNOWN_ENV, f"{name} is not a variable the docs may name"
    assert f'"{name}"' in CODE_TEXT or f"'{name}'" in CODE_TEXT, f"no code reads {name}"


def check_pip(args: list[str]) -> None:
    targets = [a for a in args if not a.startswith("-")]
    assert targets, "pip install of nothing"
    for target in targets:
        name, _, extras = target.partition("[")
        assert name.lower().replace("_", "-") != "langgraph-scoped-conn", (
            f"{target}: the package is not on PyPI yet; install it from a clone (pip install .)"
        )
        if name == ".":
            named = set(extras.rstrip("]").split(",")) - {""}
            assert named <= EXTRAS, f"{target}: no extra {sorted(named - EXTRAS)} in pyproject"


def check_demo(args: list[str]) -> None:
    from langgraph_scoped_conn.__main__ import _parser

    assert args[:1] == ["demo"], args
    try:
        _parser().parse_args(args)
    except SystemExit as exc:  # argparse's way of refusing arguments
        raise AssertionError(f"the demo does not take {shlex.join(args)}") from exc


def check_pytest(args: list[str]) -> None:
    it = iter(args)
    for arg in it:
        if arg == "-m":
            words = set(re.findall(r"[a-z_]+", next(it))) - {"and", "or", "not"}
            assert words <= MARKERS, f"no marker {sorted(words - MARKERS)} in pyproject"
        elif not arg.startswith("-"):
            assert (ROOT / arg.split("::")[0]).exists(), f"no {arg}"


def check_script(path: str, args: list[str]) -> None:
    """A repository script or module: it exists, and so does each option it is given."""
    source = (ROOT / path).read_text(encoding="utf-8")
    for arg in args:
        if arg.startswith("--"):
            assert f'"{arg.split("=")[0]}"' in source, f"{path} has no option {arg}"


def check_python(args: list[str]) -> None:
    if args[:2] == ["-m", "pip"]:
        assert args[2] == "install", args
        check_pip(args[3:])
    elif args[:2] == ["-m", "langgraph_scoped_conn"]:
        check_demo(args[2:])
    elif args[:2] == ["-m", "pytest"]:
        check_pytest(args[2:])
    elif args[:2] == ["-m", "build"]:
        pass  # pyproject.toml's build backend; .ci/run builds and checks the distributions
    elif args[:1] == ["-m"] and args[1].startswith("benchmarks."):
        check_script(args[1].replace(".", "/") + ".py", args[2:])
    elif args and args[0].endswith(".py"):
        check_script(args[0], args[1:])
    else:
        raise AssertionError(f"python {shlex.join(args)} is not a command this test checks")


def check_curl(args: list[str]) -> None:
    from langgraph_scoped_conn import http

    urls = [a for a in args if a.startswith("http")]
    assert len(urls) == 1, args
    path = "/" + urls[0].split("://", 1)[1].split("/", 1)[1]
    routes = {r.path: r.methods for r in http.create_routes(token="t")}  # type: ignore[attr-defined]
    assert path in routes, f"{path} is not a route of langgraph_scoped_conn.http"
    method = args[args.index("-X") + 1] if "-X" in args else "GET"
    assert method in routes[path], f"{method} {path} is not served"


def check_command(command: str, cwd: Path = ROOT) -> None:
    """Check one command run in ``cwd`` (a directory of the repository)."""
    words = shlex.split(command)
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        check_env_name(words.pop(0).split("=")[0])
    if words[:1] == ["export"]:
        for word in words[1:]:
            check_env_name(word.split("=")[0])
        return
    program, args = words[0], words[1:]
    assert program in CHECKS, f"{command!r}: this test has no check for {program}"
    if program == "langgraph":
        check_langgraph(args, cwd)
    else:
        CHECKS[program](args)


def check_langgraph(args: list[str], cwd: Path = ROOT) -> None:
    assert args[:1] == ["dev"], args
    config = args[args.index("--config") + 1] if "--config" in args else "langgraph.json"
    assert (cwd / config).is_file(), f"no {config} in {cwd.relative_to(ROOT)}/"
    studio = PYPROJECT["project"]["optional-dependencies"]["studio"]
    assert any(d.startswith("langgraph-cli") for d in studio), "the studio extra lost the CLI"


def subcommand(*allowed: str) -> Callable[[list[str]], None]:
    """A check that the program is given one of ``allowed`` first (nothing else is used)."""

    def check(args: list[str]) -> None:
        assert args[:1] and args[0] in allowed, f"unexpected arguments {args}"

    return check


def check_pip_command(args: list[str]) -> None:
    assert args[:1] == ["install"], f"pip {shlex.join(args)}"
    check_pip(args[1:])


def check_mkdocs(args: list[str]) -> None:
    assert args[:1] == ["build"], args
    assert (ROOT / "mkdocs.yml").exists()
    docs = PYPROJECT["project"]["optional-dependencies"]["docs"]
    assert any(d.startswith("mkdocs-material") for d in docs), "the docs extra lost mkdocs"


CHECKS: dict[str, Callable[[list[str]], None]] = {
    "pip": check_pip_command,
    "python": check_python,
    "python3": check_python,
    "langgraph-scoped-conn": check_demo,
    "curl": check_curl,
    "langgraph": check_langgraph,
    "mkdocs": check_mkdocs,
    "twine": subcommand("check"),
    "git": subcommand("clone"),
    "apt-get": subcommand("install"),
    "cd": lambda args: None,  # followed by test_each_shell_command_is_one_that_works
    ".ci/run": lambda args: None,
}


def bash_blocks() -> list[Block]:
    return [b for b in all_blocks() if b.language == "bash"]


@pytest.mark.parametrize("block", bash_blocks(), ids=lambda b: b.where)
def test_each_shell_command_is_one_that_works(block: Block) -> None:
    commands = list(commands_of(block.body))
    assert commands, f"{block.where}: an empty bash block"
    cwd = ROOT  # every block starts at the root of a clone
    for command in commands:
        check_command(command, cwd)
        if command.startswith("cd "):
            cwd = (cwd / shlex.split(command)[1]).resolve()
            assert cwd.is_dir() and ROOT in (cwd, *cwd.parents), f"{block.where}: {command}"


@pytest.mark.parametrize(
    ("command", "wrong"),
    [
        ("pip install langgraph-scoped-conn", "not on PyPI"),
        ("pip install '.[no_such_extra]'", "no extra"),
        ("python -m langgraph_scoped_conn demo --no-such-option", "does not take"),
        ("python -m pytest -m 'not no_such_marker'", "no marker"),
        ("curl http://localhost:8000/no/such/route", "is not a route"),
        ("SCOPED_CONN_MAX_CONECTIONS=3 python -m pytest", "no option"),
        ("rm -rf /", "no check for rm"),
    ],
)
def test_the_command_checks_catch_a_wrong_command(command: str, wrong: str) -> None:
    with pytest.raises(AssertionError, match=wrong):
        check_command(command)


# -- sql, json, dotenv, mermaid ----------------------------------------------------------


def blocks_in(language: str) -> list[Block]:
    return [b for b in all_blocks() if b.language == language]


@pytest.mark.parametrize("block", blocks_in("sql"), ids=lambda b: b.where)
def test_each_sql_block_runs_on_postgresql(block: Block, pg_db) -> None:
    conn = pg_db.server.admin(pg_db.name)
    conn.autocommit = False
    try:
        with conn.cursor() as cur:
            cur.execute(block.body)
    finally:
        conn.rollback()
        conn.close()


@pytest.mark.parametrize("block", blocks_in("json"), ids=lambda b: b.where)
def test_each_json_block_parses(block: Block) -> None:
    json.loads(block.body)


@pytest.mark.parametrize("block", blocks_in("dotenv"), ids=lambda b: b.where)
def test_each_dotenv_block_sets_only_known_options(block: Block) -> None:
    variables = {}
    for line in block.body.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, sep, value = line.partition("=")
            assert sep, f"{block.where}: {line!r} is not NAME=value"
            check_env_name(name.strip())
            variables[name.strip()] = value.strip()
    url, options = options_with_env(None, {}, environ=variables)  # raises on a bad value
    named = {k for k in variables if k.startswith(ENV_PREFIX) and k != "SCOPED_CONN_DEBUG_TOKEN"}
    assert len(options) + (url is not None) == len(named), (options, named)


@pytest.mark.parametrize("block", blocks_in("mermaid"), ids=lambda b: b.where)
def test_each_diagram_names_only_what_the_package_has(block: Block) -> None:
    # CamelCase class names and snake_case function, method and option names
    names = set(re.findall(r"\b[A-Z]\w*[a-z]\w*[A-Z]\w*\b|\b[a-z]+_[a-z_]+\b", block.body))
    assert names, "a diagram that names nothing in the code"
    missing = sorted(n for n in names if n not in CODE_TEXT)
    assert missing == [], f"{block.where} names what the package does not have: {missing}"


# -- no code block outside a fence ---------------------------------------------------------

LIST_ITEM = re.compile(r"\s*(?:[-*+]|\d+\.)\s")


def indented_code_lines(text: str) -> list[int]:
    """Lines that start an indented code block (4 spaces after a blank line, outside a list).

    Markdown renders those as code too, and nothing here would run or check them.
    """
    found: list[int] = []
    in_fence = in_list = False
    previous = ""
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip().startswith("```"):
            in_fence = not in_fence
        elif not in_fence and line.strip():
            if LIST_ITEM.match(line):
                in_list = True
            elif not line.startswith(" "):
                in_list = False
            elif line.startswith("    ") and not previous.strip() and not in_list:
                found.append(number)
        previous = line
    return found


def test_the_indented_code_finder_finds_one() -> None:
    assert indented_code_lines("text\n\n    formula = 1\n") == [3]
    assert indented_code_lines("1. item\n\n    more of the item\n") == []
    assert indented_code_lines("```\n\n    in a fence\n```\n") == []


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_no_page_has_an_indented_code_block(page: Path) -> None:
    assert indented_code_lines(page.read_text(encoding="utf-8")) == []


# -- the reference pages name everything the code has --------------------------------------


def page_text(name: str) -> str:
    return (ROOT / "docs" / name).read_text(encoding="utf-8")


def unnamed(names: object, text: str) -> list[str]:
    """The names of ``names`` that ``text`` never shows as ``code``."""
    return sorted(n for n in set(names) if f"`{n}`" not in text)  # type: ignore[call-overload]


def test_the_configuration_page_names_every_option() -> None:
    options = ScopedConnSettings.__dataclass_fields__
    table = page_text("configuration.md").split("## Options", 1)[1].split("\n## ", 1)[0]
    assert unnamed(options, table) == []


def test_the_stats_tables_name_every_key(pg_db) -> None:
    import langgraph_scoped_conn as lsc

    text = page_text("observability.md").split("## Prometheus", 1)[0]
    for strategy in ("shared", "per_execution"):
        with lsc.ExecutionConnectionManager(pg_db.url, strategy=strategy) as manager:
            with lsc.ExecutionScope(manager=manager) as scope:
                lsc.get_scoped_sql_database(manager=manager).run("select 1")
                stats = manager.get_stats()
                execution = stats["executions"][scope.execution_id]
            assert unnamed(stats, text) == [], strategy
            assert unnamed(execution, text) == [], strategy
            for row in stats["pools"]:
                assert unnamed(row, text) == [], strategy
    assert "execution_id" in {k for row in stats["pools"] for k in row}  # per_execution's rows
    from langgraph_scoped_conn import stats as keys

    langgraph_rows = (keys.RETURNS_BAD, keys.CONNECTIONS_LOST)  # the checkpointer's pools
    assert unnamed(langgraph_rows, text) == []


def test_the_metrics_section_names_every_metric() -> None:
    pytest.importorskip("prometheus_client")
    from langgraph_scoped_conn import metrics

    text = page_text("observability.md")
    families = [*metrics.GAUGES, *metrics.COUNTERS, *metrics.POOL_GAUGES, *metrics.POOL_COUNTERS]
    assert unnamed([*families, *metrics.POOL_SUMMARIES], text) == []
    otel_source = (ROOT / "langgraph_scoped_conn" / "otel.py").read_text(encoding="utf-8")
    instruments = set(re.findall(r'"(db\.client\.connection\.[a-z_.]+)"', otel_source))
    instruments -= {"db.client.connection.pool.name", "db.client.connection.state"}
    assert len(instruments) == 8
    assert unnamed(instruments, text) == []


def test_the_module_table_names_every_module() -> None:
    package = ROOT / "langgraph_scoped_conn"
    modules = {p.name for p in package.glob("*.py")} - {"__init__.py", "_version.py"}
    modules |= {f"{p.name}/" for p in package.iterdir() if (p / "__init__.py").exists()}
    table = page_text("how-it-works.md").split("## The modules", 1)[1]
    assert unnamed(modules, table) == []


def test_the_docs_name_every_public_name() -> None:
    stub = (ROOT / "langgraph_scoped_conn" / "__init__.pyi").read_text(encoding="utf-8")
    public = set(re.findall(r"\b(\w+) as \1\b", stub)) - {"__version__"}
    assert len(public) > 30, public
    text = "\n".join(p.read_text(encoding="utf-8") for p in PAGES)
    missing = sorted(n for n in public if not re.search(rf"\b{n}\b", text))
    assert missing == [], f"public names no page mentions: {missing}"


def test_every_relative_link_points_at_a_file() -> None:
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if not re.match(r"[a-z]+:", target) and not (page.parent / target).exists():
                broken.append(f"{page_id(page)}: {target}")
    assert broken == []
