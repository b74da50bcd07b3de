"""The README's example is code a user will paste: it must run as written, and say true things."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks(text: str) -> list[str]:
    """The ```python blocks of a Markdown text (the README, docs/*.md)."""
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_readme_starts_with_the_two_commands() -> None:
    text = README.read_text(encoding="utf-8")
    first_block = re.search(r"```sh\n(.*?)```", text, re.S)
    assert first_block is not None
    assert text.index("```sh") < text.index("\n## "), "the commands come first"
    lines = [ln for ln in first_block.group(1).splitlines() if ln.strip()]
    assert len(lines) == 2
    assert lines[0] == "pip install -e . && python -m macula demo"  # tests/test_demo.py runs it
    assert lines[1] == 'pip install -e ".[test]" && python -m pytest'
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8")
    assert '-m pip install -q -e ".[test]" && $PY -m pytest' in ci


def test_readme_example_runs_and_its_comments_hold() -> None:
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert blocks, "the README has a python example"
    scope: dict[str, Any] = {}
    exec(compile(blocks[0], str(README), "exec"), scope)
    trie, cache, table = scope["trie"], scope["cache"], scope["table"]
    assert sorted(trie.match("sensors/kitchen/temp")) == ["client-1", "client-2"]
    assert cache.get("route", now=59.0) == ["node-a"]
    assert cache.get("route", now=60.0) is None
    assert scope["frames"] is not None and len(scope["frames"]) == 2
    assert table.closest(bytes(32), 20)[0][1] == ("127.0.0.1", 4433)
