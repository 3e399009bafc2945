"""Compile the Triton kernels for a GPU on a machine without one.

The interpreter (TRITON_INTERPRET=1) checks what the kernels compute, not whether a GPU
compiler accepts them: a ``tl.dot`` dimension below 16, a loop-carried value that changes type
or an LLVM crash only show when compiling for a real target. :func:`compile_layer` runs the
backend's own host code for one configuration on CPU tensors with the launches recorded
instead of run, then compiles exactly the specialisations it would have launched (forward and
backward) for a CUDA target such as sm_90 (H100, H200) or sm_80 (A100), and reports each
one's registers and spill stack (from the cubin, when triton ships cuobjdump).

Needs triton, and the kernels defined without the interpreter.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Any

import torch

from ...cells.table import SPECS
from . import ops

__all__ = ["Compiled", "compile_layer"]


@dataclass(frozen=True)
class Compiled:
    """One compiled specialisation: the kernel, its constants, and its resource use (None when
    cuobjdump is not available)."""

    kernel: str
    constants: dict[str, Any]
    num_warps: int
    registers: int | None
    spill_stack: int | None
    shared: int


class _Recorder:
    """Stands in for the kernel module: ``kernel[grid](*args, **kwargs)`` records the first
    launch of each kernel, by argument name, and runs nothing."""

    def __init__(self, kernels: Any) -> None:
        self.kernels = kernels
        self.launches: dict[str, dict[str, Any]] = {}

    def __getattr__(self, name: str) -> Any:
        if not name.endswith("_kernel"):
            raise AttributeError(name)
        recorder = self
        names = getattr(self.kernels, name).arg_names

        class _Launcher:
            def __getitem__(self, grid: tuple[int, ...]) -> Any:
                def launch(*args: Any, **kwargs: Any) -> None:
                    recorder.launches.setdefault(
                        name, {**dict(zip(names, args, strict=False)), **kwargs}
                    )

                return launch

        return _Launcher()


def _record(
    mode: str,
    hidden: int,
    proj_size: int,
    batch: int,
    steps: int,
    directions: int,
    dtype: torch.dtype,
    lengths: bool,
    state_dropout: bool,
    zoneout: str,
) -> dict[str, dict[str, Any]]:
    spec = SPECS[mode]
    gates = spec.gate_count
    D, T, B, I, H = directions, steps, batch, 8, hidden
    P = proj_size or H
    G = gates * H

    def t(*shape: int, dt: torch.dtype = dtype) -> torch.Tensor:
        return torch.randn(*shape).to(dt)

    lstm = gates == 4
    zone_h = zone_c = None
    if zoneout == "train":
        zone_h = (torch.rand(D, T, B, P) < 0.5).float()
        zone_c = (torch.rand(D, T, B, H) < 0.5).float() if lstm else None
    elif zoneout == "eval":
        zone_h = torch.full((D, P), 0.3)
        zone_c = torch.full((D, H), 0.3) if lstm else None
    args = (
        t(T, B, I), None, t(D, B, P), t(D, B, H) if lstm else None, t(D, G, I), t(D, G, P),
        t(D, G), t(D, G), t(D, P, H) if proj_size else None,
        t(D, 3, H) if spec.peephole else None,
        t(D, 2, G) if spec.layernorm else None, t(D, 2, G) if spec.layernorm else None,
        t(D, 2, H) if spec.layernorm and lstm else None,
        torch.randint(0, T + 1, (B,)) if lengths else None,
        t(D, B, P) if state_dropout else None, zone_h, zone_c,
    )  # fmt: skip
    from . import kernels

    recorder = _Recorder(kernels)
    saved_kernels = ops._kernels
    ops._kernels = recorder
    try:
        out = ops.triton_forward(*args, mode, 2 if D == 2 else 0, 1e-5, True)
        x, _, h0, _, w_ih, w_hh, _, _, w_hr, peep, ln_ih, ln_hh, ln_c, lens, sm, zh, zc = args
        ops.triton_backward(
            t(T, B, D * P), t(D, B, P), t(D, B, H) if lstm else None, x, None, h0, w_ih, w_hh,
            w_hr, peep, ln_ih, ln_hh, ln_c, lens, sm, zh, zc, *out[3:], mode, 2 if D == 2 else 0,
            1e-5, True, True,
        )  # fmt: skip
    finally:
        ops._kernels = saved_kernels
    return recorder.launches


def _resources(cubin: bytes) -> tuple[int | None, int | None]:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        report = subprocess.run(
            [tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=False
        ).stdout
    finally:
        os.unlink(f.name)
    regs = re.search(r"REG:(\d+)", report)
    stack = re.search(r"STACK:(\d+)", report)
    return (int(regs.group(1)) if regs else None, int(stack.group(1)) if stack else None)


def compile_layer(
    mode: str,
    hidden: int,
    *,
    proj_size: int = 0,
    batch: int = 16,
    steps: int = 4,
    directions: int = 2,
    dtype: torch.dtype = torch.float32,
    lengths: bool = True,
    state_dropout: bool = True,
    zoneout: str = "train",
    capability: int = 90,
    num_warps: int | None = None,
) -> list[Compiled]:
    """Compile, for CUDA compute capability ``capability``, the forward and backward kernels
    the triton backend launches for one layer of ``mode`` (a key of the cell table) with these
    sizes and options (``zoneout``: "none", "train" (per-step masks) or "eval"); the kernel
    shape follows :func:`ops.kernel_path` (and RNNKIT_TRITON_KERNEL), the warps the backend's
    choice unless ``num_warps`` is given. Raises what the compiler raises."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import mangle_type

    from . import kernels

    if kernels.INTERPRETED:
        raise RuntimeError("the kernels were defined under TRITON_INTERPRET=1: nothing to compile")
    launches = _record(
        mode, hidden, proj_size, batch, steps, directions, dtype, lengths, state_dropout, zoneout
    )
    results = []
    for name, kwargs in launches.items():
        fn = getattr(kernels, name)
        options = {
            "num_warps": num_warps or kwargs.pop("num_warps", 4),
            "enable_fp_fusion": kwargs.pop("enable_fp_fusion", True),
        }
        kwargs.pop("num_warps", None)

        constexprs = {p.name: kwargs[p.name] for p in fn.params if p.is_constexpr}
        signature = {
            p.name: "constexpr" if p.is_constexpr else mangle_type(kwargs[p.name])
            for p in fn.params
        }
        src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32), options=options)
        regs, stack = _resources(compiled.asm["cubin"])
        results.append(
            Compiled(name, constexprs, options["num_warps"], regs, stack, compiled.metadata.shared)
        )
    return results
