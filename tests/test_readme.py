"""The README keeps its promises: short, the two commands as CI runs them, the facts right.

Its code blocks run in ``tests/test_docs.py`` like every page's.  The quickstart is the
python blocks right after a ``<!-- quickstart -->`` line: ``tests/test_packaging.py`` runs
them, in order, as one script, in a fresh venv holding only the built wheel.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARKER = "<!-- quickstart -->"
#: the two set-up commands a fresh machine needs, exactly as .ci/run and the docs say
DEMO_COMMAND = "pip install '.[demo,plot]' && python -m langgraph_scoped_conn demo"
TEST_COMMAND = "pip install -e '.[test]' && python -m pytest"
GUIDE = "*Execution-Scoped Connection Cleanup*"


def readme() -> str:
    return README.read_text(encoding="utf-8")


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


def test_the_quickstart_is_there() -> None:
    blocks = quickstart_blocks(readme())
    assert len(blocks) >= 2
    assert "with_scoped_connections" in blocks[0]


def test_the_readme_is_at_most_300_lines() -> None:
    assert len(readme().splitlines()) <= 300


def test_the_two_commands_are_there_as_written_and_nothing_else_to_set_up() -> None:
    text = readme()
    section = text.split("## The two commands", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)```", section, re.S)
    assert [c.strip() for c in commands] == [DEMO_COMMAND, TEST_COMMAND]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "pip install -e '.[test]'" in ci and "python -m pytest" in ci


def test_the_timings_are_measured_not_promised() -> None:
    section = readme().split("## The two commands", 1)[1].split("\n## ", 1)[0]
    timing = section.split("**How long they take.**", 1)[1].split("\n\n", 1)[0]
    if "TODO" not in timing:  # once measured: a date, the machine, a figure for each command
        assert re.search(r"\b20\d\d-\d\d-\d\d\b", timing), timing
        assert "2-core" in timing or "2 cores" in timing, timing
        assert len(re.findall(r"\d+ (?:min|s)\b", timing)) >= 2, timing


def test_the_guide_is_named_where_it_is_first_mentioned() -> None:
    text = readme()
    first = re.search(r"\bguide\b", text)
    assert first is not None
    assert text[: first.start()].rstrip().endswith(GUIDE), text[first.start() - 80 : first.end()]


def test_the_python_versions_are_the_classifiers() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    versions = sorted(
        c.rsplit(" :: ", 1)[1]
        for c in project["classifiers"]
        if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)
    )
    assert versions == ["3.11", "3.12", "3.13"]
    assert f"Python {', '.join(versions[:-1])} and {versions[-1]}" in readme()
    assert project["requires-python"] == f">={versions[0]}"


def test_it_says_the_package_is_not_on_pypi_yet() -> None:
    text = readme()
    assert "reserved for the first" in text
    assert "does not work today" in text


def test_the_chart_is_shown_and_exists() -> None:
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", readme())
    assert "docs/images/demo-backends.png" in images
    assert all((ROOT / image).is_file() for image in images)


def test_the_benchmark_table_sits_between_its_markers() -> None:
    text = readme()
    assert text.count("<!-- bench:start -->") == 1
    assert text.count("<!-- bench:end -->") == 1
    assert text.index("<!-- bench:start -->") < text.index("<!-- bench:end -->")


def test_the_studio_section_uses_the_studio_extra() -> None:
    section = readme().split("## LangGraph Studio", 1)[1].split("\n## ", 1)[0]
    assert "pip install '.[studio]'" in section
    assert "langgraph-cli" not in section  # the extra brings it: one way to install
