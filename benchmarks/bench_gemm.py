"""The GEMM probe: each source of the cpu kernels' GEMM layer, in float32 and bfloat16, on the
shapes a GRU's training step runs, as the kernels call them (GFLOP/s; S step in µs per call).

    python benchmarks/bench_gemm.py                    # threads 1 and 2, fp32 and bf16
    python benchmarks/bench_gemm.py --threads 2 --markdown --json gemm.json

Shapes (DESIGN.md's S, M, L; a GRU: G = 3H): the recurrent step C (B, G) = h (B, H) . W_hh^T
with W_hh prepared once per call (S, M, L); at L the input projection (T*B, G) = x (T*B, I) .
W_ih^T and the weight gradient dW_hh (G, H) = dG^T (G, T*B) . hprev (T*B, H). The sources are
rnnkit.backends.cpu.gemm.SOURCES, each measured alone for --seconds; bf16 rows round the
operands to bfloat16 (the conversion is timed) and accumulate in float32.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess

import torch

from rnnkit.backends.cpu import gemm

#: name -> (role, M, N, K) as gemm.probe takes them
SHAPES = {
    "L step": ("step", 64, 1536, 512),
    "M step": ("step", 32, 768, 256),
    "S step": ("step", 8, 192, 64),
    "L input projection": ("bulk", 12800, 1536, 256),
    "L weight gradient": ("wgrad", 1536, 512, 12800),
}


def lscpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return platform.processor()
    keep = [line for line in out.splitlines() if line.startswith(("Model name", "Model:"))]
    flags = next((line for line in out.splitlines() if line.startswith("Flags")), "")
    wanted = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "amx_bf16", "amx_tile", "avx2")
    have = [f for f in flags.split() if f in wanted]
    return "; ".join(s.split(":", 1)[1].strip() for s in keep) + "; flags: " + " ".join(have)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seconds", type=float, default=0.3, help="per source and shape")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    rows = []
    for bf16 in (False, True):
        if bf16 and not gemm.bf16_supported():
            print("no bf16 instructions (torch's check): bf16 rows skipped")
            continue
        for source in gemm.SOURCES:
            if not gemm.available(source, bf16):
                continue
            row = {"source": source, "precision": "bf16" if bf16 else "fp32", "cells": {}}
            for name, (role, m, n, k) in SHAPES.items():
                cells = []
                for threads in args.threads:
                    torch.set_num_threads(threads)
                    seconds = gemm.probe(source, bf16, role, m, n, k, budget=args.seconds)
                    rate = 2.0 * m * n * k / seconds / 1e9
                    cells.append({"threads": threads, "gflops": rate, "us": seconds * 1e6})
                row["cells"][name] = cells
                shown = " / ".join(
                    f"{c['us']:.1f} us" if name == "S step" else f"{c['gflops']:.0f}" for c in cells
                )
                print(f"{source:6s} {row['precision']} {name:20s} {shown}", flush=True)
            rows.append(row)
    machine = lscpu()
    print(machine)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "torch": torch.__version__, "rows": rows}, f, indent=1)
    if args.markdown:
        threads = " / ".join(str(t) for t in args.threads)
        print()
        print(f"| source | precision | {' | '.join(SHAPES)} |")
        print("|---|---|" + "---:|" * len(SHAPES))
        for row in rows:
            cells = []
            for name, values in row["cells"].items():
                if name == "S step":
                    cells.append(" / ".join(f"{v['us']:.1f} µs" for v in values))
                else:
                    cells.append(" / ".join(f"{v['gflops']:.0f}" for v in values))
            print(f"| {row['source']} | {row['precision']} | {' | '.join(cells)} |")
        print(f"\nGFLOP/s at {threads} threads (S step: µs per call); {machine}")


if __name__ == "__main__":
    main()
