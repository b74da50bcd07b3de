"""The Python examples in docs/ run as written."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from tests.test_readme import python_blocks

ROOT = Path(__file__).resolve().parent.parent


def test_wire_example_runs_and_delivers() -> None:
    blocks = python_blocks((ROOT / "docs" / "WIRE.md").read_text(encoding="utf-8"))
    assert blocks, "docs/WIRE.md lost its example"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(blocks[-1], "docs/WIRE.md", "exec"), {"__name__": "docs_example"})
    assert out.getvalue().strip() == "1 b'hello'"


def test_mesh_example_runs_across_two_nodes() -> None:
    blocks = python_blocks((ROOT / "docs" / "MESH.md").read_text(encoding="utf-8"))
    assert blocks, "docs/MESH.md lost its example"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(blocks[0], "docs/MESH.md", "exec"), {"__name__": "docs_example"})
    assert out.getvalue().split("\n")[:2] == ["sensors/kitchen/temp b'21.5'", "5"]
