"""The cpu backend's kernels in isolation: GEMM sources, per-shape times, and GFLOP/s.

    python benchmarks/bench_cpu_kernels.py gemm              # MKL (torch.mm) vs oneDNN matmul
    python benchmarks/bench_cpu_kernels.py cells --shapes L  # torch.nn vs rnnkit cpu, min and median
    python benchmarks/bench_cpu_kernels.py cells --threads 1 --cells lstm --modes train

``gemm`` times the GEMM shapes the kernels issue (the input projection of all steps, the
per-step recurrent product, the weight gradients) through torch.mm (MKL sgemm), torch.matmul and
oneDNN's linear with a prepacked weight (``torch.ops.mkldnn._linear_pointwise``). ``cells`` times
torch.nn against rnnkit (backend "cpu"), interleaved A B A B after warm-up, and reports the
median ratio with min/max, the best times, and the rnnkit training step's GFLOP/s (the matrix
products of forward and backward; gate passes not counted).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnnkit

SHAPES = {"S": (100, 8, 64, 64), "M": (100, 32, 128, 256), "L": (200, 64, 256, 512)}
GATES = {"lstm": 4, "gru": 3, "rnn": 1, "rnn_relu": 1, "bilstm": 4}


def _best(fn, repeats: int) -> tuple[float, float]:
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts), statistics.median(ts)


def gemm(args) -> None:
    cases = []
    for name, (t, b, i, h) in SHAPES.items():
        g = 4 * h
        cases += [
            (f"{name} input projection (T*B, I) x (I, 4H)", t * b, i, g),
            (f"{name} recurrent step (B, H) x (H, 4H)", b, h, g),
            (f"{name} backward step (B, 4H) x (4H, H)", b, g, h),
        ]
    cases.append(("square 2048", 2048, 2048, 2048))
    print(f"{'shape':48s} {'M':>6s} {'K':>5s} {'N':>5s}  torch.mm  oneDNN-linear   GFLOP/s (best)")
    for label, m, k, n in cases:
        a, w = torch.randn(m, k), torch.randn(n, k)
        wt = w.t().contiguous()
        bias = torch.zeros(n)
        reps = max(5, min(2000, int(2e9 / (2 * m * n * k))))
        t_mm, _ = _best(lambda a=a, wt=wt: torch.mm(a, wt), reps)
        t_dnn, _ = _best(
            lambda a=a, w=w, bias=bias: torch.ops.mkldnn._linear_pointwise(
                a, w, bias, "none", [], ""
            ),
            reps,
        )
        flop = 2 * m * n * k
        print(
            f"{label:48s} {m:6d} {k:5d} {n:5d}  {flop / t_mm / 1e9:8.1f}  {flop / t_dnn / 1e9:13.1f}"
        )


def _modules(case: str, shape: str):
    _, _, i, h = SHAPES[shape]
    torch.manual_seed(0)
    if case == "bilstm":
        ref = torch.nn.LSTM(i, h, num_layers=2, bidirectional=True)
        mine = rnnkit.LSTM(i, h, num_layers=2, bidirectional=True, backend="cpu")
    elif case in ("lstm", "gru"):
        ref = getattr(torch.nn, case.upper())(i, h)
        mine = getattr(rnnkit, case.upper())(i, h, backend="cpu")
    else:
        act = "relu" if case == "rnn_relu" else "tanh"
        ref = torch.nn.RNN(i, h, nonlinearity=act)
        mine = rnnkit.RNN(i, h, nonlinearity=act, backend="cpu")
    mine.load_state_dict(ref.state_dict())
    return ref, mine


def _train_flop(case: str, shape: str) -> float:
    t, b, i, h = SHAPES[shape]
    g = GATES[case] * h
    if case == "bilstm":  # two directions; layer 2 reads 2H features
        return 3 * 2 * (2 * t * b * g * (i + h) + 2 * t * b * g * (2 * h + h))
    forward = 2 * t * b * g * (i + h)  # input projection + recurrent steps
    backward = 2 * t * b * g * (i + h) * 2  # dx, dh per step; dW_ih, dW_hh
    return forward + backward


def cells(args) -> None:
    # --cpu-time: this thread's CPU time, robust to other processes on a shared machine
    # (meaningful with --threads 1 only).
    clock = time.thread_time if args.cpu_time else time.perf_counter
    for case in args.cells:
        # bilstm: 2-layer bidirectional LSTM at M, lengths uniform in [T/4, T]; torch.nn packed.
        for shape in ["M"] if case == "bilstm" else args.shapes:
            for mode in args.modes:
                ref, mine = _modules(case, shape)
                t, b, i, _ = SHAPES[shape]
                x = torch.randn(t, b, i, requires_grad=mode == "train")
                lengths = torch.randint(t // 4, t + 1, (b,)) if case == "bilstm" else None

                def run(m, x=x, lengths=lengths, t=t, mine=mine):
                    if lengths is None:
                        return m(x)
                    if m is mine:
                        return m(x, lengths=lengths)
                    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
                    out, st = m(packed)
                    return pad_packed_sequence(out, total_length=t)[0], st

                def step(m, run=run, mode=mode):
                    if mode == "infer":
                        with torch.no_grad():
                            run(m)
                        return
                    for p in m.parameters():
                        p.grad = None
                    out, st = run(m)
                    st = st if isinstance(st, tuple) else (st,)
                    (out.sum() + sum(s.sum() for s in st)).backward()

                pairs = args.pairs or {"S": 40, "M": 15, "L": 6}[shape]
                step(ref), step(mine), step(ref), step(mine)
                ta, tb = [], []
                for _ in range(pairs):
                    for m, ts in ((ref, ta), (mine, tb)):
                        s = clock()
                        step(m)
                        ts.append(clock() - s)
                ratios = [a / b for a, b in zip(ta, tb, strict=True)]
                gf = ""
                if mode == "train":
                    gf = f"  {_train_flop(case, shape) / min(tb) / 1e9:6.1f} GFLOP/s (best)"
                print(
                    f"{case:8s} {shape} {mode:5s} torch.nn {1e3 * statistics.median(ta):8.2f} ms "
                    f"(best {1e3 * min(ta):8.2f})  rnnkit {1e3 * statistics.median(tb):8.2f} ms "
                    f"(best {1e3 * min(tb):8.2f})  ratio {statistics.median(ratios):5.2f} "
                    f"[{min(ratios):.2f}, {max(ratios):.2f}]  best/best {min(ta) / min(tb):5.2f}"
                    + gf,
                    flush=True,
                )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=["gemm", "cells"])
    parser.add_argument("--cells", nargs="+", default=list(GATES), choices=list(GATES))
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument(
        "--modes", nargs="+", default=["train", "infer"], choices=["train", "infer"]
    )
    parser.add_argument("--pairs", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cpu-time", action="store_true", help="time by thread CPU time")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    {"gemm": gemm, "cells": cells}[args.what](args)


if __name__ == "__main__":
    main()
