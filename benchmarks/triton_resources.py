"""What the triton backend's kernels cost on chip, without a GPU: compile every kernel the
backend launches for the benchmark shapes for a CUDA target and report each one's registers
per thread and spill stack (bytes per thread), from the cubin.

    python benchmarks/triton_resources.py                    # sm_90 (H100, H200), S/M/L
    python benchmarks/triton_resources.py --capability 80 --shapes M

A spill stack above 0 means the kernel keeps part of its state in local memory (slower); the
kernel shape ("persistent" or "stepwise") is the backend's own choice for that size.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from rnnkit.backends.triton import ahead

SHAPES = {"S": 64, "M": 256, "L": 512}  # H of DESIGN.md's shapes
CELLS = {  # name -> (mode, projection size as a fraction of H)
    "rnn_tanh": ("rnn_tanh", 0),
    "lstm": ("lstm", 0),
    "lstm_proj": ("lstm", 2),
    "lstm_peephole": ("lstm_peephole", 0),
    "gru": ("gru", 0),
    "lstm_layernorm": ("lstm_layernorm", 0),
    "gru_layernorm": ("gru_layernorm", 0),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--capability", type=int, default=90)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--cells", nargs="+", default=list(CELLS), choices=list(CELLS))
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    a = p.parse_args()
    print(f"sm_{a.capability}: registers / spill bytes per thread, forward | backward kernels")
    print("| shape | cell | dtype | kernel | warps | forward | backward | projection kernels |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in a.shapes:
        H = SHAPES[shape]
        for name in a.cells:
            mode, proj = CELLS[name]
            for dt in a.dtypes:
                compiled = {
                    c.kernel: c
                    for c in ahead.compile_layer(
                        mode, H, proj_size=H // proj if proj else 0, dtype=DTYPES[dt],
                        batch=64, capability=a.capability,
                    )
                }  # fmt: skip
                f, b = compiled["forward_kernel"], compiled["backward_kernel"]
                shape_of = "stepwise" if f.constants["STEPWISE"] else "persistent"
                extra = ""
                if "proj_forward_kernel" in compiled:
                    pf, pb = compiled["proj_forward_kernel"], compiled["proj_backward_kernel"]
                    extra = f"{pf.registers}/{pf.spill_stack} \\| {pb.registers}/{pb.spill_stack}"
                print(
                    f"| {shape} | {name} | {dt} | {shape_of} | {f.num_warps} | "
                    f"{f.registers}/{f.spill_stack} | {b.registers}/{b.spill_stack} | {extra} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
