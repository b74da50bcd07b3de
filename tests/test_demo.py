"""``macula demo`` and its process launcher (:class:`macula.demo.LocalMesh`), for real:
node subprocesses joined over QUIC, clients crossing the mesh, and nothing left behind.

Leftovers are found through the environment: every test gives its processes a marker
(``TMPDIR`` pointing at the test's own directory, inherited by every node and anything a
node starts), then scans ``/proc/*/environ`` for it once the demo or the mesh is gone.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from macula.demo import LocalMesh, MeshStartError, parse_ready

REPO = Path(__file__).resolve().parent.parent


def _with_marker(tmp: Path) -> list[int]:
    """Pids of live processes whose environment holds ``TMPDIR=<tmp>``."""
    marker = f"TMPDIR={tmp}".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            env = Path(f"/proc/{name}/environ").read_bytes().split(b"\0")
            state = Path(f"/proc/{name}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in env and state != b"Z":
            found.append(int(name))
    return found


def _no_leftovers(tmp: Path) -> None:
    deadline = time.monotonic() + 5
    while _with_marker(tmp) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _with_marker(tmp) == [], "processes of the demo are still running"
    assert [p.name for p in tmp.iterdir() if p.name.startswith("macula-demo-")] == []


def _demo(tmp: Path, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TMPDIR=str(tmp), PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "macula", "demo", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=tmp)


def test_demo_crosses_the_mesh_and_reports_it(tmp_path: Path) -> None:
    proc = _demo(tmp_path, "--seconds", "3")
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    # one line per measured second, then the summary
    seconds = re.findall(r"^ +(\d+)s +([\d,]+) ", out, re.M)
    assert [s for s, _ in seconds] == ["1", "2", "3"], out
    delivered = {int(n): int(got.replace(",", ""))
                 for n, got in re.findall(r"^  delivered on node (\d+) \(.*?\): ([\d,]+) of",
                                          out, re.M)}
    assert set(delivered) == {2, 3}, out
    assert all(v > 0 for v in delivered.values()), out
    across = [int(v.replace(",", "")) for v in
              re.findall(r"from node \d+ \(across the mesh\): ([\d,]+) of", out)]
    assert len(across) == 3 and all(v > 0 for v in across), out  # 1->2, 3->2, 1->3
    calls = re.search(r"^  calls node 1 -> node 3: ([\d,]+) ok, ([\d,]+) failed", out, re.M)
    assert calls is not None, out
    assert int(calls.group(1).replace(",", "")) > 0 and calls.group(2) == "0", out
    # the publishing nodes forwarded over the mesh and node 2 received (its STATS)
    rows = {int(r[0]): [int(x.replace(",", "")) for x in r[1:]] for r in re.findall(
        r"^ +(\d) +([\d,]+) +([\d,]+) +([\d,]+) +([\d,]+) +([\d,]+) +([\d,]+) +([\d,]+) "
        r"+([\d,]+)$", out, re.M)}
    assert rows[1][0] > 0 and rows[2][1] > 0, out
    assert rows[1][6] > 0 and rows[3][7] > 0, out  # calls forwarded by 1, served by 3
    assert "ok: messages and calls crossed the mesh" in out
    _no_leftovers(tmp_path)


def test_a_node_that_fails_to_start_is_named_and_nothing_is_left(tmp_path: Path) -> None:
    proc = _demo(tmp_path, "--seconds", "1", "--node-arg=--no-such-option", timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "node 1 exited with code 2 before it was ready" in proc.stderr
    assert "unrecognized arguments: --no-such-option" in proc.stderr
    _no_leftovers(tmp_path)


def test_bad_demo_options_are_refused(tmp_path: Path) -> None:
    proc = _demo(tmp_path, "--nodes", "1", timeout=30)
    assert proc.returncode == 2
    assert "--nodes must be >= 2, not 1" in proc.stderr
    _no_leftovers(tmp_path)


def test_a_later_node_failing_stops_the_ones_already_running(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    mesh = LocalMesh(3, args_per_node=[[], ["--mesh-port", "banana"], []], tmp_dir=str(tmp_path))
    with pytest.raises(MeshStartError, match=r"node 2 exited with code 2 before it was ready"
                       r"(.|\n)*--mesh-port: invalid int value: 'banana'"):
        mesh.start()
    first = mesh.nodes[0]
    assert first.ready["endpoints"].startswith("tcp://127.0.0.1:")  # it had started
    assert first.proc.returncode == 0  # and was stopped by SIGTERM, cleanly
    assert len(mesh.nodes) == 3 and all(n.proc.returncode is not None for n in mesh.nodes)
    _no_leftovers(tmp_path)


def test_a_silent_node_times_out_and_is_killed(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # a "python" that ignores SIGTERM and never prints the ready line
    fake = tmp_path / "silent-python"
    fake.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(60)
        """))
    fake.chmod(0o755)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    mesh = LocalMesh(2, python=str(fake), ready_timeout=0.5, stop_timeout=0.5,
                     tmp_dir=str(tmp_path))
    t0 = time.monotonic()
    with pytest.raises(MeshStartError, match=r"node 1 printed no ready line within 0.5 s"):
        mesh.start()
    assert time.monotonic() - t0 < 10
    assert mesh.nodes[0].proc.returncode == -9  # SIGKILL after the stop timeout
    _no_leftovers(tmp_path)


def test_local_mesh_nodes_report_the_contract_and_stop_cleanly(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    with LocalMesh(2, tmp_dir=str(tmp_path)) as mesh:
        ids = [n.node_id for n in mesh.nodes]
        assert all(re.fullmatch(r"[0-9a-f]{64}", i) for i in ids) and ids[0] != ids[1]
        assert all(re.fullmatch(r"127\.0\.0\.1:\d+", n.mesh) for n in mesh.nodes)
        assert mesh.nodes[0].endpoint != mesh.nodes[1].endpoint
        assert "--seed" in mesh.nodes[1].proc.args and "--seed" not in mesh.nodes[0].proc.args
        root = Path(mesh.root or "")
        assert (root / "node1").is_dir()
        # the leftover detector sees the running nodes (so its empty answer later means it)
        assert {n.proc.pid for n in mesh.nodes} <= set(_with_marker(tmp_path))
    assert mesh.stop() == [0, 0]  # both exited 0 on SIGTERM; stop() is idempotent
    assert not root.exists()
    _no_leftovers(tmp_path)


def test_parse_ready_reads_the_fields_and_refuses_other_lines() -> None:
    line = ("macula node ready endpoints=tcp://127.0.0.1:5,ipc:///x mesh=127.0.0.1:6 "
            f"node_id={'ab' * 32} metrics=off")
    assert parse_ready(line) == {"endpoints": "tcp://127.0.0.1:5,ipc:///x",
                                 "mesh": "127.0.0.1:6", "node_id": "ab" * 32,
                                 "metrics": "off"}
    with pytest.raises(ValueError, match="not a ready line"):
        parse_ready("macula node stopped")
    with pytest.raises(ValueError, match="is not key=value"):
        parse_ready("macula node ready endpoints=tcp://x oops")
    with pytest.raises(ValueError, match="no endpoints= field"):
        parse_ready("macula node ready mesh=127.0.0.1:6")
