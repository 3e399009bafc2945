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
    "python benchmarks/bench_rnn.py --threads 2 --backend cpu --precision fp32|bf16; fp32 and "
    "bf16-onednn re-measured 2026-12-02 with the steps split by batch where measured faster"
)


class Point(NamedTuple):
    """One measured shape and torch.nn's time over the kernels' (> 1: the kernels won)."""

    steps: int
    batch: int
    input_size: int
    hidden: int
    ratio: float


S, M, L = (100, 8, 64, 64), (100, 32, 128, 256), (200, 64, 256, 512)

#: (mode, lengths given, precision, training) -> the measured points: BENCHMARKS.md's 2-thread
#: tables (``--backend cpu``, wall time, interleaved medians, quiet machine).
MEASURED: dict[tuple[str, bool, str, bool], tuple[Point, ...]] = {
    ("lstm", False, "fp32", True): (Point(*S, 1.38), Point(*M, 1.30), Point(*L, 1.30)),
    ("lstm", False, "fp32", False): (Point(*S, 1.29), Point(*M, 0.93), Point(*L, 1.02)),
    ("gru", False, "fp32", True): (Point(*S, 6.07), Point(*M, 2.03), Point(*L, 1.57)),
    ("gru", False, "fp32", False): (Point(*S, 3.49), Point(*M, 1.67), Point(*L, 1.58)),
    ("rnn_tanh", False, "fp32", True): (Point(*S, 3.69), Point(*M, 1.81), Point(*L, 1.40)),
    ("rnn_tanh", False, "fp32", False): (Point(*S, 2.80), Point(*M, 1.89), Point(*L, 1.41)),
    # a 2-layer bidirectional LSTM, lengths uniform in [T/4, T] against pack_padded_sequence
    ("lstm", True, "fp32", True): (Point(*M, 3.58),),
    ("lstm", True, "fp32", False): (Point(*M, 1.39),),
    # bf16 with MKL's GEMMs alone (no onednn extra)
    ("lstm", False, "bf16", True): (Point(*S, 0.88), Point(*M, 1.12), Point(*L, 0.71)),
    ("lstm", False, "bf16", False): (Point(*S, 0.51), Point(*M, 0.37), Point(*L, 0.37)),
    ("gru", False, "bf16", True): (Point(*S, 4.04), Point(*M, 2.09), Point(*L, 1.40)),
    ("gru", False, "bf16", False): (Point(*S, 3.15), Point(*M, 1.47), Point(*L, 1.15)),
    ("rnn_tanh", False, "bf16", True): (Point(*S, 5.01), Point(*M, 1.91), Point(*L, 1.42)),
    ("rnn_tanh", False, "bf16", False): (Point(*S, 4.94), Point(*M, 1.68), Point(*L, 1.52)),
    ("lstm", True, "bf16", True): (Point(*M, 4.74),),
    ("lstm", True, "bf16", False): (Point(*M, 1.89),),
    # bf16 with the onednn extra installed (its matmul runs the bf16 step on packed weights)
    ("lstm", False, "bf16-onednn", True): (Point(*M, 1.44), Point(*L, 1.21)),
    ("lstm", False, "bf16-onednn", False): (Point(*M, 0.93), Point(*L, 0.84)),
    ("gru", False, "bf16-onednn", True): (Point(*M, 3.03), Point(*L, 2.44)),
    ("gru", False, "bf16-onednn", False): (Point(*M, 3.16), Point(*L, 2.35)),
    ("rnn_tanh", False, "bf16-onednn", True): (Point(*M, 3.21), Point(*L, 1.87)),
    ("rnn_tanh", False, "bf16-onednn", False): (Point(*M, 3.97), Point(*L, 2.10)),
    ("lstm", True, "bf16-onednn", True): (Point(*M, 6.60),),
    ("lstm", True, "bf16-onednn", False): (Point(*M, 2.61),),
}


def nearest(
    mode: str, lengths: bool, precision: str, training: bool, shape: tuple[int, int, int, int]
) -> Point | None:
    """The measured point nearest to ``shape`` (T, B, I, H), or None where nothing was measured
    for this cell, lengths, precision and mode."""
    global _nearest_of
    if _nearest_of is not MEASURED:  # the table was replaced (re-measured, or in a test)
        _nearest.clear()
        _nearest_of = MEASURED
    key = (mode, lengths, precision, training, shape)
    if key not in _nearest:
        if len(_nearest) >= 4096:
            _nearest.clear()
        _nearest[key] = _find_nearest(mode, lengths, precision, training, shape)
    return _nearest[key]


#: nearest's answers (asked at every call: worked out once per shape)
_nearest: dict[tuple, Point | None] = {}
_nearest_of: dict | None = None  # the table those answers come from


def _find_nearest(
    mode: str, lengths: bool, precision: str, training: bool, shape: tuple[int, int, int, int]
) -> Point | None:
    points = MEASURED.get((mode, lengths, precision, training))
    if not points:
        return None

    def distance(p: Point) -> float:
        measured = (p.steps, p.batch, p.input_size, p.hidden)
        return sum(
            abs(math.log(max(a, 1) / max(b, 1))) for a, b in zip(shape, measured, strict=True)
        )

    return min(points, key=distance)
