"""Where the cpu kernels are slower than torch's own fused op, by measurement: the crossovers
:meth:`rnnkit.backends.cpu.CpuBackend.slower` consults.

:data:`MEASURED` holds benchmarks/bench_rnn.py's interleaved medians (torch.nn time / rnnkit's
cpu-kernel time; > 1: the kernels are faster) for the shapes it runs, per cell, lengths or not,
precision and mode, on the machine :data:`MACHINE` names. A request is compared with the
measured shape nearest to it (in log-distance over T, B, I and H); where torch's op measured
faster there, automatic dispatch leaves the call to it. The table is data, not a rule about
vendors: re-measure on another machine with ``python benchmarks/bench_rnn.py --backend cpu
--precision fp32`` (and ``bf16``) to refresh it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

__all__ = ["MACHINE", "MEASURED", "Point", "nearest"]

#: The machine the table was measured on (lscpu), with the command.
MACHINE = (
    "Intel Xeon (KVM, model 167) with avx512f/bw/vl, avx512_bf16, amx_bf16, 2 cores, torch 2.13; "
    "python benchmarks/bench_rnn.py --precision fp32|bf16 (2 threads)"
)


class Point(NamedTuple):
    """One measured shape and torch.nn's time over the kernels' (> 1: the kernels won)."""

    steps: int
    batch: int
    input_size: int
    hidden: int
    ratio: float


S, M, L = (100, 8, 64, 64), (100, 32, 128, 256), (200, 64, 256, 512)

#: (mode, lengths given, precision, training) -> the measured points. Filled from BENCHMARKS.md.
MEASURED: dict[tuple[str, bool, str, bool], tuple[Point, ...]] = {}


def nearest(
    mode: str, lengths: bool, precision: str, training: bool, shape: tuple[int, int, int, int]
) -> Point | None:
    """The measured point nearest to ``shape`` (T, B, I, H), or None where nothing was measured
    for this cell, lengths, precision and mode."""
    points = MEASURED.get((mode, lengths, precision, training))
    if not points:
        return None

    def distance(p: Point) -> float:
        measured = (p.steps, p.batch, p.input_size, p.hidden)
        return sum(
            abs(math.log(max(a, 1) / max(b, 1))) for a, b in zip(shape, measured, strict=True)
        )

    return min(points, key=distance)
