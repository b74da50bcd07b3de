"""The chaos harness (tools/chaos.py, docs/CHAOS.md) on a bounded subset, and its accounting.

``test_guarantees_under_fault``: three real ``macula node`` processes in network namespaces
the harness builds, a QoS 1 publisher on node 1 and a subscriber on node 3, one fault, then
the guarantees the mesh must keep: no acknowledged message lost, none seen twice by the
application, and delivery back after the fault (within the run's generous bounds, no
timing goal: the time itself is the tool's output). It needs root, ``ip`` and ``nft``: in CI
(``CI`` set; .ci/run installs iproute2 and nftables, CI runs as root) their absence FAILS
the test; elsewhere it is skipped with the reason. Marked ``chaos``
(``python -m pytest -m chaos`` runs these alone). About 40 s in all.

``test_accounting``: the harness's arithmetic (lost, duplicated, not owed, resume) on a
hand-made ledger; runs anywhere.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tools import chaos

pytestmark = pytest.mark.chaos

# Short runs: 500 msg/s (2 cores shared by three nodes, the clients and the harness),
# 1.5 s of traffic before the fault, 5 s after, up to 6 s to drain.
SUBSET = {
    "resubscribe": chaos.Settings(rate=500, pre=2.0, post=5.0, drain=6.0, duration=0.5),
    "sigstop": chaos.Settings(rate=500, pre=2.0, post=5.0, drain=6.0, duration=10.0),
}


def _require_environment() -> None:
    problems = chaos.check_environment()
    if not problems:
        return
    reason = "the chaos harness cannot run here: " + "; ".join(problems)
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must run it: CI runs as root and .ci/run installs "
                    "iproute2 and nftables)")
    pytest.skip(reason)


@pytest.mark.parametrize("scenario", sorted(SUBSET))
def test_guarantees_under_fault(scenario: str) -> None:
    _require_environment()
    r = chaos.run_scenario(scenario, SUBSET[scenario])
    figures = (f"{scenario}: sent {r.sent}, acknowledged {r.acknowledged}, refused "
               f"{r.refused}, received {r.received}, lost {r.lost} {r.lost_by_phase}, "
               f"duplicated {r.duplicated}, resume {r.resume}, not owed {r.not_owed}, "
               f"NO_SUBSCRIBERS while subscribed and lost {r.no_subscribers_lost}, subscriber "
               f"session {r.subscriber_session}, client log {r.client_log}, counters "
               f"{r.counters}, timeline {r.events}")
    assert r.error is None, f"the harness failed: {r.error}\n{figures}"
    # nothing of this run is left behind, nothing of it is in the root namespace
    leftovers = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                               check=True).stdout
    assert f"{chaos.PREFIX}-{r.run_id}-" not in leftovers
    assert not os.path.exists(os.path.join(chaos.TMP_ROOT, f"{chaos.PREFIX}-{r.run_id}"))
    root_addrs = subprocess.run(["ip", "-4", "addr"], capture_output=True, text=True,
                                check=True).stdout
    assert chaos.SUBNET + "." not in root_addrs
    # the traffic really ran and crossed the mesh before the fault
    assert r.sent > 0 and r.acknowledged > 0 and r.latency_p50_ms is not None, figures
    # the guarantees
    assert r.lost == 0, f"acknowledged QoS 1 messages were lost\n{figures}"
    assert r.duplicated == 0, f"the application saw duplicates\n{figures}"
    assert r.resume is not None, f"delivery did not resume after the fault\n{figures}"


def test_accounting() -> None:
    """Owed/not owed, lost by phase, duplicates, refusals and resume from a made-up run."""

    async def scenario() -> chaos.Result:
        run = chaos.Run(chaos.Settings(rate=10, pre=1, post=1), fault_duration=1.0)
        led = run.ledger
        run.t0 = 100.0
        run.fault_start, run.fault_end = 102.0, 104.0
        run.not_owed.append((102.5, 103.0))
        # seq: (published at, PUBACK, receptions at)
        plan: list[tuple[float, str | None, list[float]]] = [
            (100.0, "OK", [100.01]),             # 0 delivered
            (101.0, "OK", []),                   # 1 lost before the fault
            (101.5, "OK", [101.6, 101.7]),       # 2 duplicated
            (102.1, "OK", []),                   # 3 lost during
            (102.7, "OK", []),                   # 4 not owed (unsubscribed)
            (102.8, "OK", [102.9]),              # 5 not owed, received anyway
            (103.5, "NO_SUBSCRIBERS", []),       # 6 refused, lost to the application
            (104.0, "OK", [104.9]),              # 7 first published after the end: resume
            (104.2, "OK", [104.5]),              # 8 published later, received sooner
            (104.4, "OK", []),                   # 9 lost after
            (104.6, "TimeoutError", [104.7]),    # 10 no PUBACK but received
        ]
        for seq, (at, outcome, recvs) in enumerate(plan):
            led.sent = seq + 1
            led.sent_at[seq] = at
            led.outcome[seq] = outcome
            for t in recvs:
                led.received(seq, t)
        led.received(99, 105.0)  # never sent
        return run.result("made-up")

    r = asyncio.run(scenario())
    assert r.sent == 11
    assert r.acknowledged == 9
    assert r.refused == {"NO_SUBSCRIBERS": 1, "TimeoutError": 1}
    assert r.received == 6 and r.deliveries == 7
    assert r.duplicated == 1
    assert r.lost == 3 and r.lost_by_phase == {"before": 1, "during": 1, "after": 1}
    assert r.not_owed == 2 and r.not_owed_received == 1
    assert r.no_subscribers_lost == 1
    assert r.received_unacknowledged == 1
    assert r.resume == pytest.approx(0.5)  # seq 8 arrived at 104.5, 0.5 s after the end
    assert r.fault == {"start": 2.0, "end": 4.0}
    assert r.latency_p50_ms == pytest.approx(100.0)  # seqs 0 and 2: 10 and 100 ms
    assert r.fault_latency_p50_ms == pytest.approx(100.0)  # seq 5 (the only one received)
    assert any("1 out of range" in e for e in r.events)
