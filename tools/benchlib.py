"""Small timing helpers shared by the tools/ benchmarks.

Every figure is a median over ``repeat`` runs of ``number`` calls, reported per call, so that
one noisy run on a shared 2-core machine does not move the result.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


def median_ns(run: Callable[[], object], *, calls: int, repeat: int = 7) -> float:
    """Median nanoseconds per call of ``run``, which itself performs ``calls`` calls.

    ``run`` is timed as a whole (so the caller writes the Python loop it wants measured);
    the garbage collector is off while timing, as in ``timeit``.
    """
    samples = []
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        run()  # warm up caches and branch predictors
        for _ in range(repeat):
            t0 = time.perf_counter_ns()
            run()
            samples.append((time.perf_counter_ns() - t0) / calls)
    finally:
        if was_enabled:
            gc.enable()
    return statistics.median(samples)


@dataclass
class Row:
    """One line of a benchmark table: our figure against the naive reference's."""

    area: str
    case: str
    ours: float
    reference: float | None
    unit: str  # "ns/op", "us/op", "ops/s", "B/sub", ...
    bar: str  # the bar, in words, e.g. "<= 150 ns, >= 6x"
    met: bool | None  # None where there is no bar

    @property
    def ratio(self) -> float | None:
        """How many times better ours is than the reference (higher is better)."""
        if self.reference is None or self.ours == 0 or self.reference == 0:
            return None
        if self.unit.endswith("/s"):
            return self.ours / self.reference
        return self.reference / self.ours


def format_table(rows: list[Row]) -> str:
    header = ("area", "case", "ours", "reference", "ratio", "bar", "met")
    lines = [header]
    for r in rows:
        ref = "-" if r.reference is None else f"{r.reference:,.1f} {r.unit}"
        ratio = "-" if r.ratio is None else f"{r.ratio:,.1f}x"
        met = "-" if r.met is None else ("yes" if r.met else "NO")
        lines.append((r.area, r.case, f"{r.ours:,.1f} {r.unit}", ref, ratio, r.bar, met))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    out = []
    for n, line in enumerate(lines):
        cells = (str(c).ljust(w) for c, w in zip(line, widths, strict=True))
        out.append("| " + " | ".join(cells) + " |")
        if n == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)
