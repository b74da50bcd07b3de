"""The package as a user meets it: public names, type information, and the error when the
compiled cores are missing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import macula

CORES = ("trie", "cache", "routing", "codec")
PUBLIC = (
    "TopicTrie",
    "validate_filter",
    "validate_topic",
    "parse_shared",
    "TTLCache",
    "RoutingTable",
    "BatchEncoder",
    "FrameDecoder",
    "FrameError",
)


def test_public_names_come_from_the_compiled_cores() -> None:
    for name in PUBLIC:
        obj = getattr(macula, name)
        assert obj.__module__.startswith("macula._ext."), (name, obj.__module__)
        assert name in macula.__all__


def test_cores_are_compiled_extension_modules() -> None:
    import importlib

    for core in CORES:
        mod = importlib.import_module(f"macula._ext.{core}")
        assert mod.__file__ is not None and mod.__file__.endswith((".so", ".pyd")), mod.__file__


def test_typing_information_ships_with_the_package() -> None:
    pkg = Path(macula.__file__).parent
    assert (pkg / "py.typed").is_file()
    for core in CORES:
        assert (pkg / "_ext" / f"{core}.pyi").is_file(), core


def test_import_without_built_extensions_fails_with_instructions(tmp_path: Path) -> None:
    # A copy of the pure-Python part of the package only: what a user has after cloning the
    # repo and putting it on sys.path without building.
    src = Path(macula.__file__).parent
    dst = tmp_path / "macula"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-c", "import macula"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: macula's compiled extensions are not built"), last
    assert "pip install" in last and "build_ext --inplace" in last
