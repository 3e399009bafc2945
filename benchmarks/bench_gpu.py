"""The triton backend on a CUDA machine: the conformance suite on cuda, then a speed table.

    python benchmarks/bench_gpu.py --json gpu.json                       # everything
    python benchmarks/bench_gpu.py --skip-speed                          # conformance only
    python benchmarks/bench_gpu.py --skip-conformance --shapes S --batches 8 64

1. Conformance: every case of ``tests/test_conformance.py``, on cuda: the triton backend
   against the reference backend (both on cuda, the same seed, so the same regulariser masks):
   outputs (exactly zero at padded steps), final states, gates and every gradient, at the
   suite's fp32 tolerances; once with the kernel shape dispatch picks and once with the
   one-launch-per-step kernels forced (RNNKIT_TRITON_KERNEL=stepwise). Then bfloat16 and
   float16 (fp32 accumulation and cell state) against the fp32 reference, at a 16-bit
   tolerance. Cases run in worker processes (--workers) to spread Triton's compile time.
2. Speed: training step (forward + backward of ``out.sum() + states.sum()``) and inference
   (no_grad, eval mode), shapes S = (T100, I64, H64), M = (T100, I128, H256),
   L = (T200, I256, H512) with B in {1, 8, 64, 256}, fp32: the plain LSTM and GRU on triton
   against cuDNN (``backend="native"``); variants and regularisers on triton against the
   reference loop (``backend="reference"``). A and B interleaved (A B A B ...) after warm-up,
   CUDA-synchronised wall time; the median ratio with [min, max] (> 1: triton is faster).
   Targets (issue 13): variants and regularisers >= 10x the reference loop; plain cells
   >= 0.8x cuDNN at B >= 64 and >= 1.5x at B <= 8.

Keep a run short (a GPU is often lent for minutes): ``--budget-min`` stops the speed table
when the time is spent and says so.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

import rnnkit  # noqa: E402
from rnnkit.backends.triton import ops  # noqa: E402

SHAPES = {"S": (100, 64, 64), "M": (100, 128, 256), "L": (200, 256, 512)}  # T, I, H
#: XS: a check of this script itself (e.g. --device cpu under TRITON_INTERPRET=1), not a benchmark
SHAPES["XS"] = (4, 4, 8)
BATCHES = (1, 8, 64, 256)
ROUNDS = {"S": 9, "M": 5, "L": 3, "XS": 2}
DEVICE = "cuda"  # --device
LOW = {"bfloat16": torch.bfloat16, "float16": torch.float16}
LOW_TOL = 3e-2  # 16-bit: relative error of each tensor (norm of the difference / norm)


# -- 1. conformance ------------------------------------------------------------------------------


def _conformance_case(task: tuple[int, str, str]) -> dict[str, Any]:
    """One case of the suite on ``device``, triton against reference; ``kernel``: "auto" or a
    forced kernel shape."""
    import test_conformance as tc
    from torch.utils._pytree import tree_leaves, tree_map

    index, kernel, device = task
    if kernel == "auto":
        os.environ.pop(ops.KERNEL_ENV, None)
    else:
        os.environ[ops.KERNEL_ENV] = kernel
    case = tc.CASES[index]
    result = {"case": case.id, "kernel": kernel}
    module = tc.build(case).to(device)
    x = torch.randn(tc.T, tc.B, tc.I, dtype=case.dtype, device=device)
    lengths = tc.MIXED if case.lengths else None
    request = module.dispatch_requests(x, lengths)[0][1]
    reason = rnnkit.backends._registry["triton"].check(request)
    if reason is not None:
        return {**result, "status": "declined", "detail": reason}

    def run(backend: str):
        x = torch.randn(tc.T, tc.B, tc.I, generator=torch.Generator().manual_seed(3))
        x = x.to(case.dtype).to(device).requires_grad_()
        state = tree_map(
            lambda t: t.detach().to(device).requires_grad_(), tc.initial_state(module, case)
        )
        kw = {"return_gates": True} if case.gates else {}
        torch.manual_seed(5)
        with rnnkit.use_backend(backend):
            out, final, *gates = module(x, state, lengths=lengths, **kw)
        values = {"output": out}
        values |= {f"state[{k}]": s for k, s in enumerate(tree_leaves(final))}
        values |= {f"gate {k}": g for k, g in enumerate(tree_leaves(gates))}
        g = torch.Generator().manual_seed(2)
        loss = sum(
            (v * torch.randn(v.shape, generator=g, dtype=v.dtype).to(device)).sum()
            for k, v in values.items()
            if not k.startswith("gate")
        )
        inputs = {"x": x}
        inputs |= {f"initial state[{k}]": s for k, s in enumerate(tree_leaves(state))}
        inputs |= dict(module.named_parameters())
        grads = torch.autograd.grad(loss, list(inputs.values()), allow_unused=True)
        values |= {
            f"d {n}": torch.zeros_like(t) if d is None else d
            for (n, t), d in zip(inputs.items(), grads, strict=True)
        }
        return values

    try:
        ref, got = run("reference"), run("triton")
        for name, r in ref.items():
            tol = tc.OUT_TOL if not name.startswith("d ") else tc.GRAD_TOL
            torch.testing.assert_close(
                got[name], r, atol=tol, rtol=tol, msg=lambda m, n=name: f"{n}: {m}"
            )
        if case.lengths:
            for b, n in enumerate(tc.MIXED):
                padded = got["output"][n:, b]
                assert torch.equal(padded, torch.zeros_like(padded)), f"output[{n}:, {b}] is not 0"
        return {**result, "status": "pass", "detail": ""}
    except Exception as e:  # report every failure, do not stop at the first
        return {**result, "status": "fail", "detail": f"{type(e).__name__}: {e}"[:2000]}


def _low_precision_case(task: tuple[str, str, str]) -> dict[str, Any]:
    """A bidirectional layer with lengths in bf16/fp16 on triton against the fp32 reference."""
    import test_conformance as tc

    cell, dtype, device = task
    os.environ.pop(ops.KERNEL_ENV, None)
    case = tc.Case(cell, "bidirectional")
    module = tc.build(case).to(device)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(tc.T, tc.B, tc.I, generator=g).to(device)

    def run(m, x, backend):
        x = x.clone().requires_grad_()
        with rnnkit.use_backend(backend):
            out, _ = m(x, lengths=tc.MIXED)
        out.float().pow(2).sum().backward()
        return [out.float(), x.grad.float(), *(p.grad.float() for p in m.parameters())]

    ref = run(module, x, "reference")
    low = tc.build(case).to(device).to(LOW[dtype])
    got = run(low, x.to(LOW[dtype]), "triton")
    worst = max(
        float((a - b).norm() / b.norm().clamp_min(1e-12)) for a, b in zip(got, ref, strict=True)
    )
    status = "pass" if worst <= LOW_TOL else "fail"
    return {
        "case": f"{cell}-bidirectional-lengths",
        "kernel": dtype,
        "status": status,
        "detail": f"max relative error {worst:.2e}",
    }


def conformance(workers: int, device: str, limit: int | None) -> list[dict[str, Any]]:
    import test_conformance as tc

    cases = range(len(tc.CASES))[:limit]
    tasks = [(k, kernel, device) for kernel in ("auto", "stepwise") for k in cases]
    low = [(cell, dtype, device) for dtype in LOW for cell in tc.CELLS] if device == "cuda" else []
    ctx = mp.get_context("spawn")
    results = []
    with ctx.Pool(workers) as pool:
        for r in pool.imap_unordered(_conformance_case, tasks):
            results.append(r)
        for r in pool.imap_unordered(_low_precision_case, low):
            results.append(r)
    return results


# -- 2. speed ------------------------------------------------------------------------------------


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _time(fn: Callable[[], Any]) -> float:
    _sync()
    t = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t


def _step(
    module: torch.nn.Module,
    x: torch.Tensor,
    lengths: torch.Tensor | None,
    train: bool,
    backend: str,
) -> Callable[[], None]:
    def training() -> None:
        with rnnkit.use_backend(backend):
            out, state = module(x, lengths=lengths)
        loss = out.sum() + sum(s.sum() for s in torch.utils._pytree.tree_leaves(state))
        loss.backward()

    def inference() -> None:
        with torch.no_grad(), rnnkit.use_backend(backend):
            module(x, lengths=lengths)

    return training if train else inference


_ALL = {
    "zoneout": 0.1,
    "dropout_state": 0.25,
    "dropout_input": 0.25,
    "dropout_output": 0.25,
    "weight_drop": 0.5,
}

# name -> (build(I, H), baseline backend, lengths with zeros?)
CASES: dict[str, tuple[Callable[[int, int], torch.nn.Module], str, bool]] = {
    "lstm": (lambda i, h: rnnkit.LSTM(i, h), "native", False),
    "gru": (lambda i, h: rnnkit.GRU(i, h), "native", False),
    "gru-zero-lengths": (lambda i, h: rnnkit.GRU(i, h), "reference", True),
    "peephole": (lambda i, h: rnnkit.Recurrent(rnnkit.PeepholeLSTMCell(i, h)), "reference", False),
    "layernorm-lstm": (
        lambda i, h: rnnkit.Recurrent(rnnkit.LayerNormLSTMCell(i, h)),
        "reference",
        False,
    ),
    "layernorm-gru": (
        lambda i, h: rnnkit.Recurrent(rnnkit.LayerNormGRUCell(i, h)),
        "reference",
        False,
    ),
    "zoneout-lstm": (
        lambda i, h: rnnkit.Recurrent(rnnkit.LSTMCell(i, h), zoneout=0.1),
        "reference",
        False,
    ),
    "all-lstm": (lambda i, h: rnnkit.Recurrent(rnnkit.LSTMCell(i, h), **_ALL), "reference", False),
}


def speed(
    shapes: list[str], batches: list[int], cases: list[str], deadline: float
) -> list[dict[str, Any]]:
    rows = []
    for shape in shapes:
        T, I, H = SHAPES[shape]
        for B in batches:
            for name in cases:
                build, baseline, zeros = CASES[name]
                for train in (True, False):
                    if time.perf_counter() > deadline:
                        return rows
                    torch.manual_seed(0)
                    module = build(I, H).to(DEVICE).train(train)
                    x = torch.randn(T, B, I, device=DEVICE, requires_grad=train)
                    lengths = None
                    if zeros:
                        lengths = torch.randint(T // 4, T + 1, (B,), device=DEVICE)
                        lengths[0] = 0
                    fns = {b: _step(module, x, lengths, train, b) for b in ("triton", baseline)}
                    choice = rnnkit.explain(module, x, lengths=lengths)  # automatic dispatch
                    for fn in fns.values():  # warm-up, and the Triton compile
                        fn()
                        fn()
                    times: dict[str, list[float]] = {b: [] for b in fns}
                    for _ in range(ROUNDS[shape]):
                        for backend, fn in fns.items():
                            times[backend].append(_time(fn))
                    ratios = [b / a for a, b in zip(times["triton"], times[baseline], strict=True)]
                    rows.append({
                        "shape": shape, "B": B, "case": name, "mode": "train" if train else "infer",
                        "baseline": ("cuDNN" if DEVICE == "cuda" else "native") if baseline == "native" else baseline,
                        "triton_ms": 1e3 * statistics.median(times["triton"]),
                        "baseline_ms": 1e3 * statistics.median(times[baseline]),
                        "ratio": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
                        "kernel": ops.kernel_path(
                            _mode(name), H, H, False, torch.float32
                        ),
                        "auto": choice.backend,
                    })  # fmt: skip
                    print(_row(rows[-1]), flush=True)
    return rows


def _mode(case: str) -> str:
    return {
        "peephole": "lstm_peephole", "layernorm-lstm": "lstm_layernorm",
        "layernorm-gru": "gru_layernorm", "gru-zero-lengths": "gru",
    }.get(case, case.split("-")[-1])  # fmt: skip


def _target(row: dict[str, Any]) -> str:
    if row["baseline"] == "reference":
        return "ok" if row["ratio"] >= 10 else "MISSED (>= 10x)"
    need = 0.8 if row["B"] >= 64 else 1.5
    return "ok" if row["ratio"] >= need else f"MISSED (>= {need}x)"


def _row(r: dict[str, Any]) -> str:
    return (
        f"| {r['shape']} | {r['B']} | {r['case']} | {r['mode']} | {r['kernel']} | "
        f"{r['triton_ms']:.2f} | {r['baseline']} {r['baseline_ms']:.2f} | "
        f"{r['ratio']:.2f} [{r['min']:.2f}, {r['max']:.2f}] | {_target(r)} |"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=max(1, min(12, (os.cpu_count() or 2) - 2)))
    p.add_argument("--skip-conformance", action="store_true")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--budget-min", type=float, default=8.0, help="stop the speed table after this")
    p.add_argument("--limit", type=int, help="only the first N conformance cases")
    p.add_argument(
        "--device", default="cuda", help="cpu: check this script under TRITON_INTERPRET=1"
    )
    p.add_argument("--json", type=Path, help="write everything measured here")
    a = p.parse_args(argv)
    global DEVICE
    DEVICE = a.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA device (torch.cuda.is_available() is False)")
    start = time.perf_counter()
    import triton

    name = torch.cuda.get_device_name() if DEVICE == "cuda" else f"{DEVICE} (not a benchmark)"
    env = {
        "device": name, "torch": torch.__version__, "triton": triton.__version__,
        "cuda": torch.version.cuda, "interpreter": os.environ.get("TRITON_INTERPRET", "0"),
    }  # fmt: skip
    print(f"# {env}", flush=True)
    report: dict[str, Any] = {"env": env}
    if not a.skip_conformance:
        results = conformance(a.workers, DEVICE, a.limit)
        counts = {s: sum(r["status"] == s for r in results) for s in ("pass", "fail", "declined")}
        report["conformance"] = {"counts": counts, "results": results}
        took = time.perf_counter() - start
        print(f"conformance on {DEVICE}: {counts} in {took:.0f} s", flush=True)
        for r in results:
            if r["status"] == "fail":
                print(f"FAIL {r['case']} [{r['kernel']}]: {r['detail']}", flush=True)
    if not a.skip_speed:
        print(
            "| shape | B | case | mode | kernel | triton ms | baseline ms | ratio [min, max] | target |"
        )
        print("|---|---|---|---|---|---|---|---|---|", flush=True)
        deadline = start + 60 * a.budget_min
        rows = speed(a.shapes, a.batches, a.cases, deadline)
        report["speed"] = rows
        if time.perf_counter() > deadline:
            print(f"(stopped: the {a.budget_min} min budget was spent)", flush=True)
    report["seconds"] = time.perf_counter() - start
    if a.json:
        a.json.write_text(json.dumps(report, indent=1))
    print(f"# done in {report['seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
