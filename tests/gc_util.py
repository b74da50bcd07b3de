"""Collector and memory helpers shared by the core tests (trie, cache, routing, codec).

* :func:`gc_disabled`: the collector off for a block, so that an object still alive after
  its last plain reference went is held by a reference cycle alone (``gc.collect()`` must
  then free it: the core's ``tp_traverse`` sees the cycle).
* :func:`gc_every_allocation`: the collector on, collecting at (nearly) every allocation of
  a tracked object, so that a finaliser parked in a cycle runs inside the next core call
  that allocates; the old threshold and enabled state come back on every way out.
* :func:`traced_growth`: bytes a repeated cycle of operations leaves behind (tracemalloc),
  measured after a warm-up so caches and free lists are already at their steady size.
"""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def gc_disabled() -> Iterator[None]:
    """The collector off inside the block (as it was before, after it)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@contextmanager
def gc_every_allocation() -> Iterator[None]:
    """The collector on with a generation-0 threshold of 1 inside the block. Make the
    cyclic garbage before entering: the first tracked allocation in the block collects it."""
    old = gc.get_threshold()
    was = gc.isenabled()
    gc.enable()
    try:
        gc.set_threshold(1)
        yield
    finally:
        gc.set_threshold(*old)
        if not was:
            gc.disable()


def traced_growth(cycle: Callable[[], object], *, warmup: int, settle: int, rounds: int) -> int:
    """Bytes still allocated after ``rounds`` more calls of ``cycle`` than after the first
    ``warmup + settle`` (the last ``settle`` already traced), with a collection before each
    reading so that only memory the cycle really keeps is counted."""
    for _ in range(warmup):
        cycle()
    gc.collect()
    tracemalloc.start()
    try:
        for _ in range(settle):
            cycle()
        gc.collect()
        first = tracemalloc.get_traced_memory()[0]
        for _ in range(rounds):
            cycle()
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - first
    finally:
        tracemalloc.stop()
