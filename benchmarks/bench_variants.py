"""Regularisers and the peephole LSTM on the cpu backend: training step, interleaved medians.

    python benchmarks/bench_variants.py                     # shapes S M, every case, 1 thread
    python benchmarks/bench_variants.py --shapes S --cases lstm_zoneout peephole --cpu-time
    python benchmarks/bench_variants.py --json out.json --markdown

For each case (a peephole LSTM; an LSTM or GRU with zoneout, state dropout, variational dropout,
or all regularisers together, DropConnect included) the training step (forward + backward of a
loss over the output and final states, fp32, one layer, one direction, training mode so the
masks are drawn every step) is timed three ways, interleaved A B A C A B ... after warm-up:

* A: the case on backend "cpu" (the fused kernels);
* B: the plain cell (no regulariser; an LSTM for the peephole case) on backend "cpu":
  overhead = A / B, target <= 1.5;
* C: the case on backend "reference" (the Python loop): speed-up = C / A, target >= 5.

Reported: median times and the median of the per-pair ratios. Shapes (DESIGN.md):
S = (T100, B8, I64, H64), M = (T100, B32, I128, H256). ``--threads`` defaults to 1.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

import rnnkit
from rnnkit.cells import PeepholeLSTMCell

SHAPES = {"S": (100, 8, 64, 64), "M": (100, 32, 128, 256)}
ALL = {
    "dropout_input": 0.25,
    "dropout_state": 0.25,
    "dropout_output": 0.25,
    "zoneout": 0.1,
    "weight_drop": 0.25,
}
REGS = {
    "zoneout": {"zoneout": 0.1},
    "state": {"dropout_state": 0.25},
    "variational": {"dropout_input": 0.25, "dropout_output": 0.25},
    "all": ALL,
}
CASES = ["peephole", "peephole_all"] + [f"{c}_{r}" for c in ("lstm", "gru") for r in REGS]
#: (A, B) pairs per measurement, and (A, C) pairs against the slow reference loop.
DEFAULT_PAIRS = {"S": (15, 5), "M": (8, 3)}

_CLOCK = time.perf_counter  # --cpu-time: time.thread_time, which other processes cannot inflate


@dataclass
class Row:
    case: str
    shape: str
    cpu_ms: float
    plain_ms: float
    reference_ms: float
    overhead: float  # cpu / plain, median over pairs
    speedup: float  # reference / cpu, median over pairs
    pairs: int
    reference_pairs: int


def _modules(case: str, i: int, h: int) -> tuple[nn.Module, nn.Module]:
    """(the case, the plain cell it is measured against), same weights where they overlap."""
    torch.manual_seed(0)
    if case.startswith("peephole"):
        regs = ALL if case == "peephole_all" else {}
        return (
            rnnkit.Recurrent(PeepholeLSTMCell(i, h), **regs),
            rnnkit.Recurrent(rnnkit.LSTMCell(i, h)),
        )
    cell, reg = case.split("_", 1)
    cls = rnnkit.LSTM if cell == "lstm" else rnnkit.GRU
    return cls(i, h, **REGS[reg]), cls(i, h)


def _step(module: nn.Module, backend: str, x: torch.Tensor) -> Callable[[], None]:
    params = list(module.parameters())

    def run() -> None:
        for p in params:
            p.grad = None
        with rnnkit.use_backend(backend):
            out, state = module(x)
        loss = out.sum() + sum(s.sum() for s in torch.utils._pytree.tree_leaves(state))
        loss.backward()

    return run


def _timed(fn: Callable[[], None]) -> float:
    start = _CLOCK()
    fn()
    return _CLOCK() - start


def measure(case: str, shape: str, pairs: int, ref_pairs: int) -> Row:
    steps, batch, i, h = SHAPES[shape]
    variant, plain = _modules(case, i, h)
    variant.train()
    plain.train()
    x = torch.randn(steps, batch, i, requires_grad=True)
    a, b, c = _step(variant, "cpu", x), _step(plain, "cpu", x), _step(variant, "reference", x)
    for fn in (a, b, a, b, c):  # warm-up (and the first-use build)
        fn()
    ta, tb, tc, overhead, speedup = [], [], [], [], []
    for k in range(pairs):
        t_a, t_b = _timed(a), _timed(b)
        ta.append(t_a)
        tb.append(t_b)
        overhead.append(t_a / t_b)
        if k < ref_pairs:
            t_a, t_c = _timed(a), _timed(c)
            ta.append(t_a)
            tc.append(t_c)
            speedup.append(t_c / t_a)
    return Row(
        case=case,
        shape=shape,
        cpu_ms=1e3 * statistics.median(ta),
        plain_ms=1e3 * statistics.median(tb),
        reference_ms=1e3 * statistics.median(tc),
        overhead=statistics.median(overhead),
        speedup=statistics.median(speedup),
        pairs=pairs,
        reference_pairs=ref_pairs,
    )


def _markdown(rows: list[Row]) -> str:
    lines = [
        "| case | shape | cpu ms | plain cell (cpu) ms | reference ms | cpu / plain (<= 1.5) | "
        "reference / cpu (>= 5) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.case} | {r.shape} | {r.cpu_ms:.1f} | {r.plain_ms:.1f} | {r.reference_ms:.1f} | "
            f"{r.overhead:.2f} | {r.speedup:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    global _CLOCK
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--cases", nargs="+", choices=CASES, default=CASES)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pairs", type=int, help="A B pairs (default: S 15, M 8)")
    parser.add_argument("--reference-pairs", type=int, help="A C pairs (default: S 5, M 3)")
    parser.add_argument("--cpu-time", action="store_true", help="per-thread CPU time, not wall")
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.cpu_time:
        if args.threads != 1:
            parser.error("--cpu-time measures the calling thread only: use it with --threads 1")
        _CLOCK = time.thread_time
    rows = []
    for shape in args.shapes:
        pairs, ref_pairs = DEFAULT_PAIRS[shape]
        pairs = args.pairs or pairs
        ref_pairs = min(pairs, args.reference_pairs or ref_pairs)
        for case in args.cases:
            row = measure(case, shape, pairs, ref_pairs)
            rows.append(row)
            print(
                f"{row.case:16s} {row.shape}  cpu {row.cpu_ms:8.1f} ms  plain {row.plain_ms:8.1f} ms"
                f"  reference {row.reference_ms:8.1f} ms  cpu/plain {row.overhead:5.2f}"
                f"  reference/cpu {row.speedup:6.1f}",
                flush=True,
            )
    if args.markdown:
        print(_markdown(rows))
    if args.json:
        meta = {
            "torch": torch.__version__,
            "threads": args.threads,
            "clock": "thread_time" if args.cpu_time else "perf_counter",
            "machine": platform.machine(),
        }
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": [asdict(r) for r in rows]}, f, indent=1)


if __name__ == "__main__":
    main()
