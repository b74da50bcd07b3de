"""The Python examples in docs/ run as written."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _python_blocks(path: Path) -> list[str]:
    text = path.read_text()
    return [block.split("```")[0] for block in text.split("```python\n")[1:]]


def test_wire_example_runs_and_delivers() -> None:
    blocks = _python_blocks(ROOT / "docs" / "WIRE.md")
    assert blocks, "docs/WIRE.md lost its example"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(blocks[-1], "docs/WIRE.md", "exec"), {"__name__": "docs_example"})
    assert out.getvalue().strip() == "1 b'hello'"
