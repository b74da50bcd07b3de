"""The ``macula`` command as a user runs it: a real subprocess, real compiled cores."""

from __future__ import annotations

import subprocess
import sys

import macula


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "macula.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_version_names_the_package_version() -> None:
    proc = _run("version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"macula {macula.__version__} ")


def test_cores_self_check_passes_for_every_core() -> None:
    proc = _run("cores")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["trie", "cache", "routing", "codec"]
    assert all(line.split()[1] == "ok" for line in lines), proc.stdout


def test_unknown_command_is_refused_with_usage() -> None:
    proc = _run("frobnicate")
    assert proc.returncode == 2
    assert "invalid choice: 'frobnicate'" in proc.stderr
