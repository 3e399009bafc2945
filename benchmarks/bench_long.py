"""Checkpointed BPTT over long sequences: peak memory growth and time of one training step.

    python benchmarks/bench_long.py                       # T in 1k 4k 16k 64k, LSTM B16 I64 H256
    python benchmarks/bench_long.py --steps 1024 4096 --checkpoint auto 64 --markdown

For each T, one training step (forward + backward of a loss over the output and the final states)
of ``rnnkit.LSTM(I, H, backend="cpu")`` with ``checkpoint=None`` (every step's activations kept) and with
``checkpoint=K`` ("auto": about sqrt(T)). Memory: each configuration runs in a fresh subprocess;
the growth is the process's peak resident set during the step (VmHWM, reset just before it)
minus its resident set before the step (the input, the model and the loaded kernels are there
before), with malloc returning every block of 64 KiB or more to the system when it is freed
(MALLOC_MMAP_THRESHOLD_), so that the resident set follows the live tensors. Time: the configurations of one
T run interleaved in one process (A B A B ...) after a warm-up; the median step time and the
ratio checkpointed / plain. Cases whose plain run would not fit in memory are skipped and say so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

import rnnkit

B, I, H = 16, 64, 256
BACKEND = "cpu"  # rnnkit's fused kernels (automatic dispatch hands a plain LSTM to oneDNN)


def step(model: torch.nn.Module, x: torch.Tensor) -> None:
    out, (h, c) = model(x)
    (out.sum() + h.sum() + c.sum()).backward()


def _status(field: str) -> int:
    """A size from /proc/self/status (Linux), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    """Start the peak resident set (VmHWM) afresh from the current one (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def child(steps: int, checkpoint: str) -> None:
    """Runs in a subprocess: print the peak memory growth of one training step, in bytes."""
    torch.manual_seed(0)
    every = (
        None if checkpoint == "none" else checkpoint if checkpoint == "auto" else int(checkpoint)
    )
    model = rnnkit.LSTM(I, H, checkpoint=every, backend=BACKEND)
    # load the kernels and run every code path once (a checkpointed one needs T > K)
    warm = int(checkpoint) * 2 + 1 if checkpoint not in ("none", "auto") else 300
    step(model, torch.randn(warm, B, I, requires_grad=True))
    x = torch.randn(steps, B, I, requires_grad=True)
    model.zero_grad(set_to_none=True)
    reset_peak()
    before = _status("VmRSS")
    step(model, x)
    print(json.dumps({"growth": _status("VmHWM") - before}))


def memory(steps: int, checkpoint: str) -> int:
    # Large blocks straight from mmap and back to the system when freed: the resident set then
    # follows the live tensors instead of what malloc keeps cached.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(
        [sys.executable, __file__, "--child", str(steps), checkpoint],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    return int(json.loads(done.stdout.strip().splitlines()[-1])["growth"])


def times(steps: int, checkpoints: list[str], pairs: int) -> dict[str, float]:
    torch.manual_seed(0)
    models = {}
    for c in checkpoints:
        every = None if c == "none" else c if c == "auto" else int(c)
        models[c] = rnnkit.LSTM(I, H, checkpoint=every, backend=BACKEND)
    x = torch.randn(steps, B, I, requires_grad=True)
    for m in models.values():
        step(m, x)  # warm-up
    samples: dict[str, list[float]] = {c: [] for c in checkpoints}
    for _ in range(pairs):
        for c, m in models.items():
            start = time.perf_counter()
            step(m, x)
            samples[c].append(time.perf_counter() - start)
    return {c: statistics.median(v) for c, v in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--checkpoint", nargs="+", default=["auto"], help="K values or 'auto'")
    parser.add_argument("--pairs", type=int, default=3, help="interleaved timing rounds per T")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--max-plain-gb", type=float, default=10.0,
                        help="skip the plain run where it would grow past this (about 0.25 GB per 1k steps)")  # fmt: skip
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        child(int(args.child[0]), args.child[1])
        return
    rows = []
    for steps in args.steps:
        configs = ["none", *args.checkpoint]
        if steps / 1024 * 0.25 > args.max_plain_gb:
            configs = args.checkpoint
        t = times(steps, configs, args.pairs)
        for c in configs:
            mem = memory(steps, c)
            rows.append({"T": steps, "checkpoint": c, "growth_gb": mem / 1e9, "step_s": t[c]})
        if "none" not in configs:
            rows.append({"T": steps, "checkpoint": "none", "growth_gb": None, "step_s": None})
    by = {(r["T"], r["checkpoint"]): r for r in rows}
    for r in rows:
        plain = by.get((r["T"], "none"))
        ok = plain and plain["growth_gb"] and r["growth_gb"]
        r["memory_ratio"] = plain["growth_gb"] / r["growth_gb"] if ok else None
        r["time_ratio"] = r["step_s"] / plain["step_s"] if ok else None
    info = {
        "torch": torch.__version__,
        "threads": args.threads,
        "machine": platform.processor() or platform.machine(),
        "shape": {"B": B, "I": I, "H": H},
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "rows": rows}, f, indent=2)
    if args.markdown:
        print(f"LSTM B={B} I={I} H={H}, one training step, {args.threads} threads\n")
        print("| T | checkpoint | peak memory growth | step time | memory saved | time cost |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            if r["growth_gb"] is None:
                print(f"| {r['T']} | none | not run (> {args.max_plain_gb} GB) | | | |")
                continue
            mr = (
                f"{r['memory_ratio']:.1f}x less"
                if r["memory_ratio"] and r["checkpoint"] != "none"
                else ""
            )
            tr = f"{r['time_ratio']:.2f}x" if r["time_ratio"] and r["checkpoint"] != "none" else ""
            print(
                f"| {r['T']} | {r['checkpoint']} | {r['growth_gb']:.2f} GB | {r['step_s']:.2f} s | {mr} | {tr} |"
            )
    else:
        for r in rows:
            print(r)


if __name__ == "__main__":
    main()
