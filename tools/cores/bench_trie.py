"""Benchmarks of the topic trie against the dict-of-dicts reference (tools/cores/naive_trie.py).

    python tools/bench_cores.py --only trie [--quick]
    python tools/cores/bench_trie.py [--quick]

The workload (``make_workload``): 100,000 subscriptions over an IoT-style tree
``telemetry/<region>/<site>/<device>/<metric>`` (exact, ``+`` and ``#`` filters; about 14
matching filters per published topic) and 100,000 topics drawn from the tree.  Both tries
are built from the same subscriptions and must give the same answer for every topic before
anything is timed.

Cases:

* ``match`` throughput, topics/s, the result list included (the issue's bar: at least
  1,500,000 topics/s and 6x the reference);
* ``match_filters`` throughput (ours only has it; the reference column is its ``match``);
* build: ``add`` of the 100,000 subscriptions into an empty trie, ns per subscription;
* ``remove`` of all of them, ns per subscription;
* memory: bytes per subscription as tracemalloc sees it (our C arrays come from PyMem, so
  they are counted), the subscription strings themselves excluded (both sides share them).
"""

from __future__ import annotations

import gc
import os
import sys
import time
import tracemalloc

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from macula import TopicTrie
from tools.benchlib import Row, format_table, median_ns
from tools.cores.naive_trie import NaiveTrie, make_workload


def _bytes_per_sub(build: object, n: int) -> float:
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        obj = build()  # type: ignore[operator]
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    del obj
    return (after - before) / n


def rows(quick: bool) -> list[Row]:
    n_subs = 10_000 if quick else 100_000
    n_topics = 10_000 if quick else 100_000
    repeat = 3 if quick else 7
    wl = make_workload(n_subs, n_topics)
    subs, topics = wl.subscriptions, wl.topics
    out: list[Row] = []

    ours, naive = TopicTrie(), NaiveTrie()
    for f, k in subs:
        ours.add(f, k)
        naive.add(f, k)
    total = filters = 0
    for t in topics:
        got = ours.match(t)
        want = naive.match(t)
        if len(got) != len(want) or set(got) != set(want):
            raise AssertionError(f"trie and reference disagree on {t!r}")
        total += len(got)
        filters += len(ours.match_filters(t))
    per_topic = total / len(topics)

    def ours_match() -> None:
        match = ours.match
        for t in topics:
            match(t)

    def naive_match() -> None:
        match = naive.match
        for t in topics:
            match(t)

    def ours_filters() -> None:
        match = ours.match_filters
        for t in topics:
            match(t)

    r_ours = 1e9 / median_ns(ours_match, calls=len(topics), repeat=repeat)
    r_naive = 1e9 / median_ns(naive_match, calls=len(topics), repeat=max(3, repeat // 2))
    case = (f"match, {n_subs:,} subs, {per_topic:.1f} keys "
            f"({filters / len(topics):.1f} filters)/topic")
    out.append(
        Row("trie", case, r_ours, r_naive, "topics/s", ">= 1.5M/s, >= 6x",
            r_ours >= 1_500_000 and r_ours / r_naive >= 6)
    )
    r_filt = 1e9 / median_ns(ours_filters, calls=len(topics), repeat=repeat)
    out.append(Row("trie", "match_filters (ref: its match)", r_filt, r_naive, "topics/s", "-",
                   None))

    # -- build and remove -------------------------------------------------------------------
    def build_ours() -> TopicTrie:
        t = TopicTrie()
        add = t.add
        for f, k in subs:
            add(f, k)
        return t

    def build_naive() -> NaiveTrie:
        t = NaiveTrie()
        add = t.add
        for f, k in subs:
            add(f, k)
        return t

    t_build = median_ns(build_ours, calls=len(subs), repeat=max(3, repeat // 2))
    t_build_naive = median_ns(build_naive, calls=len(subs), repeat=max(3, repeat // 2))
    out.append(Row("trie", f"build: add {n_subs:,} subs", t_build, t_build_naive, "ns/op", "-",
                   None))

    samples = []
    for _ in range(max(3, repeat // 2)):
        t = build_ours()
        remove = t.remove
        gc.disable()
        t0 = time.perf_counter_ns()
        for f, k in subs:
            remove(f, k)
        samples.append((time.perf_counter_ns() - t0) / len(subs))
        gc.enable()
        if len(t) or t.node_count:
            raise AssertionError("remove left subscriptions or nodes behind")
    samples.sort()
    out.append(Row("trie", "remove every sub", samples[len(samples) // 2], None, "ns/op", "-",
                   None))

    # -- memory ----------------------------------------------------------------------------
    b_ours = _bytes_per_sub(build_ours, len(subs))
    b_naive = _bytes_per_sub(build_naive, len(subs))
    out.append(Row("trie", "memory per subscription (tracemalloc)", b_ours, b_naive, "B/sub",
                   "report", None))
    return out


if __name__ == "__main__":
    print(format_table(rows(quick="--quick" in sys.argv)))
