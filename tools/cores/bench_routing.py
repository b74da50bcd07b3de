"""Benchmarks of the Kademlia routing table against the naive reference
(tools/cores/naive_routing.py).

    python tools/bench_cores.py --only routing [--quick]
    python tools/cores/bench_routing.py [--quick]

Cases (ours and the reference timed in the same run, after checking they give the same
answers; tables built from fixed seeds):

* closest(target, 20) over 10,000 contacts (k = 10,000, so that all 10,000 random ids are
  stored: with k = 20 only ~20 log2(N) fit), against the issue's reference, a full
  ``sorted(ids, key=lambda i: int.from_bytes(i, "big") ^ t)`` of the 10,000 ids; targets
  rotate over 1,000 random ids.  The issue's bar: <= 10 us and >= 300x.
* closest(target, 20) in a realistic k = 20 table filled from 100,000 random candidate ids
  (~300 stored), against the naive table's closest (the same sort over what it stores);
* add: filling a 10,000-contact table (k = 10,000) from empty, ns per add; a k = 20 table
  offered 20,000 random ids (most find their bucket full: LRS returned, newcomer queued);
  re-adding (refreshing) a known contact;
* bucket_of.
"""

from __future__ import annotations

import os
import random
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from macula import RoutingTable
from tools.benchlib import Row, format_table, median_ns
from tools.cores.naive_routing import NaiveRoutingTable, make_ids

SELF_ID = bytes(range(32))


def rows(quick: bool) -> list[Row]:
    repeat = 5 if quick else 11
    out: list[Row] = []
    rng = random.Random(1)
    targets = [rng.randbytes(32) for _ in range(1000)]

    # -- closest over 10,000 contacts: the bar ---------------------------------------
    ids = make_ids(10_000, seed=7)
    big = RoutingTable(SELF_ID, 10_000)
    naive_big = NaiveRoutingTable(SELF_ID, 10_000)
    for i, x in enumerate(ids):
        assert big.add(x, ("10.0.0.1", i), now=0.0) is None
        naive_big.add(x, ("10.0.0.1", i), now=0.0)
    assert len(big) == len(naive_big) == 10_000
    for t in targets[:20]:
        assert big.closest(t, 20) == naive_big.closest(t, 20)

    rounds = 20 if quick else 100

    def ours_closest() -> None:
        closest = big.closest
        for _ in range(rounds):
            for t in targets:
                closest(t, 20)

    def sort_all() -> None:
        for t in targets[:3]:
            ti = int.from_bytes(t, "big")
            sorted(ids, key=lambda i: int.from_bytes(i, "big") ^ ti)

    t_ours = median_ns(ours_closest, calls=rounds * len(targets), repeat=repeat) / 1000
    t_sort = median_ns(sort_all, calls=3, repeat=repeat) / 1000
    out.append(
        Row(
            "routing",
            "closest(t, 20), 10,000 contacts (k=10,000) vs sorted() of all",
            t_ours,
            t_sort,
            "us/op",
            "<= 10 us, >= 300x",
            t_ours <= 10 and t_sort / t_ours >= 300,
        )
    )

    # -- a realistic k = 20 table -------------------------------------------------------------
    candidates = make_ids(20_000 if quick else 100_000, seed=8)
    real = RoutingTable(SELF_ID)
    naive_real = NaiveRoutingTable(SELF_ID)
    for i, x in enumerate(candidates):
        assert real.add(x, i, now=0.0) == naive_real.add(x, i, now=0.0)
    stored = len(real)
    assert stored == len(naive_real)
    for t in targets[:50]:
        assert real.closest(t, 20) == naive_real.closest(t, 20)

    def ours_real() -> None:
        closest = real.closest
        for _ in range(rounds):
            for t in targets:
                closest(t, 20)

    def naive_closest() -> None:
        closest = naive_real.closest
        for t in targets[:100]:
            closest(t, 20)

    t_ours = median_ns(ours_real, calls=rounds * len(targets), repeat=repeat)
    t_naive = median_ns(naive_closest, calls=100, repeat=repeat)
    out.append(
        Row(
            "routing",
            f"closest(t, 20), k=20 table of {stored} (from {len(candidates):,} ids)",
            t_ours,
            t_naive,
            "ns/op",
            "-",
            None,
        )
    )

    # -- add ------------------------------------------------------------------------------------
    fill = ids if not quick else ids[:2000]
    contact = ("10.0.0.1", 4433)

    def ours_fill() -> None:
        add = RoutingTable(SELF_ID, 10_000).add
        for x in fill:
            add(x, contact, 0.0)

    def naive_fill() -> None:
        add = NaiveRoutingTable(SELF_ID, 10_000).add
        for x in fill:
            add(x, contact, 0.0)

    t_ours = median_ns(ours_fill, calls=len(fill), repeat=repeat)
    t_naive = median_ns(naive_fill, calls=len(fill), repeat=repeat)
    out.append(
        Row(
            "routing",
            f"add new id, fill to {len(fill):,} (k=10,000)",
            t_ours,
            t_naive,
            "ns/op",
            "-",
            None,
        )
    )

    offered = candidates[:20_000]

    def ours_offer() -> None:
        add = RoutingTable(SELF_ID).add
        for x in offered:
            add(x, contact, 0.0)

    def naive_offer() -> None:
        add = NaiveRoutingTable(SELF_ID).add
        for x in offered:
            add(x, contact, 0.0)

    t_ours = median_ns(ours_offer, calls=len(offered), repeat=repeat)
    t_naive = median_ns(naive_offer, calls=len(offered), repeat=repeat)
    out.append(
        Row(
            "routing",
            "add, k=20 table offered 20,000 ids (mostly full: queued)",
            t_ours,
            t_naive,
            "ns/op",
            "-",
            None,
        )
    )

    known = [x for x, _ in real.closest(targets[0], 20)]
    reps = 500 if quick else 5000

    def ours_refresh() -> None:
        add = real.add
        for _ in range(reps):
            for x in known:
                add(x, contact, 1.0)

    def naive_refresh() -> None:
        add = naive_real.add
        for _ in range(reps):
            for x in known:
                add(x, contact, 1.0)

    t_ours = median_ns(ours_refresh, calls=reps * len(known), repeat=repeat)
    t_naive = median_ns(naive_refresh, calls=reps * len(known), repeat=repeat)
    out.append(
        Row(
            "routing",
            "add known id (refresh, move to MRS), k=20 table",
            t_ours,
            t_naive,
            "ns/op",
            "-",
            None,
        )
    )

    # -- bucket_of ------------------------------------------------------------------------------
    assert [real.bucket_of(x) for x in ids[:100]] == [naive_real.bucket_of(x) for x in ids[:100]]
    sample = ids[:1000]

    def ours_bucket_of() -> None:
        bucket_of = real.bucket_of
        for _ in range(reps // 50):
            for x in sample:
                bucket_of(x)

    def naive_bucket_of() -> None:
        bucket_of = naive_real.bucket_of
        for _ in range(reps // 50):
            for x in sample:
                bucket_of(x)

    calls = reps // 50 * len(sample)
    t_ours = median_ns(ours_bucket_of, calls=calls, repeat=repeat)
    t_naive = median_ns(naive_bucket_of, calls=calls, repeat=repeat)
    out.append(Row("routing", "bucket_of", t_ours, t_naive, "ns/op", "-", None))
    return out


if __name__ == "__main__":
    print(format_table(rows(quick="--quick" in sys.argv)))
