"""Cell variants and regularisers on the fused cpu backend: what each costs over the plain fused
cell, and how much faster it is than the reference loop.

    python benchmarks/bench_variants.py --threads 1 --cpu-time --markdown
    python benchmarks/bench_variants.py --shapes M --cases peephole zoneout

Every case is one ``rnnkit.Recurrent`` layer in training mode (so the regularisers are active),
training step = forward + backward of ``out.sum() + states.sum()`` with the input requiring
grad, fp32. Three runs are interleaved (variant on ``cpu``, plain cell on ``cpu``, variant on
``reference``) after warm-up; the script prints the median time of each and the median per-round
ratios with min/max: ``variant / plain`` (the cost of the option, target <= 1.5x at M) and
``reference / variant`` (the speed-up over the Python loop, target >= 5x at S and M).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import rnnkit

SHAPES = {"S": (100, 8, 64, 64), "M": (100, 32, 128, 256)}
ROUNDS = {"S": 15, "M": 7}

_VARIATIONAL = {"dropout_input": 0.25, "dropout_output": 0.25}
#: Every regulariser at once; zoneout_cell (the cell state's) for the LSTM family only.
_ALL_GRU = {
    "zoneout": 0.1,
    "dropout_state": 0.25,
    "dropout_input": 0.25,
    "dropout_output": 0.25,
    "weight_drop": 0.5,
}
_ALL = {**_ALL_GRU, "zoneout_cell": 0.05}

# name -> (cell class, plain cell class it is compared with, Recurrent keyword arguments)
CASES: dict[str, tuple[type, type, dict[str, Any]]] = {
    "peephole": (rnnkit.PeepholeLSTMCell, rnnkit.LSTMCell, {}),
    "layernorm-lstm": (rnnkit.LayerNormLSTMCell, rnnkit.LSTMCell, {}),
    "layernorm-gru": (rnnkit.LayerNormGRUCell, rnnkit.GRUCell, {}),
    "zoneout-lstm": (rnnkit.LSTMCell, rnnkit.LSTMCell, {"zoneout": 0.1, "zoneout_cell": 0.05}),
    "zoneout-gru": (rnnkit.GRUCell, rnnkit.GRUCell, {"zoneout": 0.1}),
    "state-dropout-lstm": (rnnkit.LSTMCell, rnnkit.LSTMCell, {"dropout_state": 0.25}),
    "state-dropout-gru": (rnnkit.GRUCell, rnnkit.GRUCell, {"dropout_state": 0.25}),
    "variational-lstm": (rnnkit.LSTMCell, rnnkit.LSTMCell, _VARIATIONAL),
    "variational-gru": (rnnkit.GRUCell, rnnkit.GRUCell, _VARIATIONAL),
    "weight-drop-lstm": (rnnkit.LSTMCell, rnnkit.LSTMCell, {"weight_drop": 0.5}),
    "all-lstm": (rnnkit.LSTMCell, rnnkit.LSTMCell, _ALL),
    "all-gru": (rnnkit.GRUCell, rnnkit.GRUCell, _ALL_GRU),
    "all-peephole": (rnnkit.PeepholeLSTMCell, rnnkit.LSTMCell, _ALL),
    "all-layernorm-lstm": (rnnkit.LayerNormLSTMCell, rnnkit.LSTMCell, _ALL),
    "all-layernorm-gru": (rnnkit.LayerNormGRUCell, rnnkit.GRUCell, _ALL_GRU),
}

_CLOCK: Callable[[], float] = time.perf_counter


def _step(layer: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def go() -> None:
        out, state = layer(x)
        leaves = state if isinstance(state, tuple) else (state,)
        (out.sum() + sum(s.sum() for s in leaves)).backward()
        x.grad = None
        layer.zero_grad(set_to_none=True)

    return go


def _timed(fn: Callable[[], None]) -> float:
    start = _CLOCK()
    fn()
    return _CLOCK() - start


def measure(case: str, shape: str, rounds: int) -> dict[str, Any]:
    cell_cls, plain_cls, regs = CASES[case]
    steps, batch, inputs, hidden = SHAPES[shape]
    torch.manual_seed(0)
    variant = rnnkit.Recurrent(cell_cls(inputs, hidden), backend="cpu", **regs).train()
    plain = rnnkit.Recurrent(plain_cls(inputs, hidden), backend="cpu").train()
    reference = rnnkit.Recurrent(cell_cls(inputs, hidden), backend="reference", **regs).train()
    x = torch.randn(steps, batch, inputs, requires_grad=True)
    runs = {"variant": _step(variant, x), "plain": _step(plain, x), "ref": _step(reference, x)}
    for fn in runs.values():  # warm-up (the first call also builds the kernels)
        fn()
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for k, fn in runs.items():
            times[k].append(_timed(fn))
    cost = [v / p for v, p in zip(times["variant"], times["plain"], strict=True)]
    speedup = [r / v for r, v in zip(times["ref"], times["variant"], strict=True)]
    return {
        "case": case,
        "shape": shape,
        "explain": str(rnnkit.explain(variant, x)),
        **{f"{k}_ms": 1e3 * statistics.median(v) for k, v in times.items()},
        "cost": statistics.median(cost),
        "cost_min": min(cost),
        "cost_max": max(cost),
        "speedup": statistics.median(speedup),
        "speedup_min": min(speedup),
        "speedup_max": max(speedup),
        "rounds": rounds,
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| case | shape | fused ms | plain fused ms | reference ms | variant / plain (≤ 1.5 at M) "
        "| reference / variant (≥ 5) |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['shape']} | {r['variant_ms']:.1f} | {r['plain_ms']:.1f} | "
            f"{r['ref_ms']:.1f} | {r['cost']:.2f} [{r['cost_min']:.2f}, {r['cost_max']:.2f}] | "
            f"{r['speedup']:.2f} [{r['speedup_min']:.2f}, {r['speedup_max']:.2f}] |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds per row")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time with the process's CPU time (for a shared machine; use with --threads 1)",
    )
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table at the end")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.cpu_time:
        global _CLOCK
        _CLOCK = time.process_time

    rows = []
    for shape in args.shapes:
        for case in args.cases:
            try:
                row = measure(case, shape, args.rounds or ROUNDS[shape])
            except rnnkit.BackendUnavailable as e:
                print(f"{case:20s} {shape}  not fused: {e}", flush=True)
                continue
            rows.append(row)
            print(
                f"{case:20s} {shape}  fused {row['variant_ms']:8.1f} ms  plain {row['plain_ms']:8.1f}"
                f" ms  reference {row['ref_ms']:8.1f} ms  cost {row['cost']:.2f}  "
                f"speed-up {row['speedup']:.2f}",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.markdown:
        print()
        print(markdown(rows))


if __name__ == "__main__":
    main()
