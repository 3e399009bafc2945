"""rnnkit vs torch.nn: training step and inference, interleaved, median ratios with min/max.

    python benchmarks/bench_rnn.py                        # every cell, shapes S M L, both modes
    python benchmarks/bench_rnn.py --cells lstm --shapes M --backend reference
    python benchmarks/bench_rnn.py --json out.json --markdown
    python benchmarks/bench_rnn.py --precision bf16       # both sides under bf16 autocast
    python benchmarks/bench_rnn.py --backend cpu --versus-gemm mkl   # the GEMM choice vs MKL

Shapes (DESIGN.md): S = (T100, B8, I64, H64), M = (T100, B32, I128, H256),
L = (T200, B64, I256, H512), fp32, one layer, one direction. The case ``bilstm`` is a 2-layer
bidirectional LSTM at M with lengths uniform in [T/4, T]: rnnkit with ``lengths=`` against torch.nn
with pack_padded_sequence(enforce_sorted=False) and pad_packed_sequence.

The ratio is torch.nn time / rnnkit time for each interleaved pair (A B A B ...) after warm-up;
> 1 means rnnkit is faster. A training step is forward + backward of a loss over the output and
the final states.

With ``--floor`` each row of a single-layer case run by the cpu kernels also gets its GEMM floor:
the time of the step's products alone (the input projection and T recurrent GEMMs forward; in
training also T recurrent GEMMs backward, dx, dW_ih and dW_hh), each timed by itself with the GEMM
source and precision the kernels use for the call (``rnnkit.backends.cpu.gemm.probe``, the fastest
call; the step GEMMs threaded, as the unsplit schedule runs them: where the split is chosen its
own step GEMMs measured 0-5 % faster), summed; ``bound`` = torch.nn time / floor, the highest
ratio these GEMMs allow, and ``gemm share`` = floor / rnnkit time, the part of rnnkit's step that
is GEMM at those rates.

With ``--versus-gemm SOURCE`` the reference side is rnnkit itself (the same module, weights and
backend) with every GEMM forced to SOURCE (``RNNKIT_GEMM``), and the ratio is what the automatic
choice of sources gains over it: the check that the choice is never slower than MKL's path.
``--versus-split on|off`` also forces the reference side's schedule of the steps
(``RNNKIT_SPLIT``): ``--versus-gemm mkl --versus-split off`` is the path before both choices.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnnkit
from rnnkit.backends.cpu.calibrate import interleaved, step_pair

SHAPES = {
    "S": (100, 8, 64, 64),
    "M": (100, 32, 128, 256),
    "L": (200, 64, 256, 512),
}
CELLS = {
    "lstm": (torch.nn.LSTM, rnnkit.LSTM, {}),
    "gru": (torch.nn.GRU, rnnkit.GRU, {}),
    "rnn": (torch.nn.RNN, rnnkit.RNN, {"nonlinearity": "tanh"}),
    "rnn_relu": (torch.nn.RNN, rnnkit.RNN, {"nonlinearity": "relu"}),
}
#: --precision: fp32, or both sides under torch.autocast("cpu") in bfloat16.
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
#: Interleaved pairs per measurement; the large shape takes fewer.
DEFAULT_REPEATS = {"S": 30, "M": 12, "L": 5}


@dataclass
class Row:
    case: str
    shape: str
    mode: str
    precision: str
    backend: str
    torch_ms: float
    rnnkit_ms: float
    ratio: float
    ratio_min: float
    ratio_max: float
    pairs: int
    floor_ms: float | None = None

    @property
    def bound(self) -> float | None:
        """torch.nn time / the GEMM floor: the highest ratio the GEMMs allow."""
        return None if self.floor_ms is None else self.torch_ms / self.floor_ms

    @property
    def gemm_share(self) -> float | None:
        """The GEMM floor / rnnkit's time."""
        return None if self.floor_ms is None else self.floor_ms / self.rnnkit_ms


def gemm_floor(mine: torch.nn.Module, x: torch.Tensor, mode: str) -> float | None:
    """Seconds of the GEMMs of one call of ``mine`` on ``x``, each timed alone with the sources
    and precision the cpu kernels' plan picks for it (under the caller's autocast), the gate
    count from the cell table (None where the module runs more than one layer or direction)."""
    from rnnkit.backends.cpu import gemm, gemm_plan
    from rnnkit.cells.table import SPECS

    requests = mine.dispatch_requests(x)
    if len(requests) != 1 or requests[0][1].bidirectional or requests[0][1].num_layers != 1:
        return None
    request = requests[0][1]
    plan = gemm_plan(request)
    steps, batch, inp, hidden = (
        request.steps, request.batch, request.input_size, request.hidden_size,
    )  # fmt: skip
    g, rows = SPECS[request.mode].gate_count * hidden, steps * batch

    def t(source: str, role: str, m: int, n: int, k: int) -> float:
        return gemm.probe(source, plan.bf16, role, m, n, k, budget=0.05)

    total = t(plan.bulk, "bulk", rows, g, inp) + steps * t(plan.step, "step", batch, g, hidden)
    if mode == "train":
        total += steps * t(plan.step, "step", batch, hidden, g)  # dh += dg . W_hh
        total += t(plan.bulk, "bulk", rows, inp, g)  # dx = dg . W_ih
        total += t(plan.bulk, "wgrad", g, inp, rows) + t(plan.bulk, "wgrad", g, hidden, rows)
    return total


_CLOCK = time.perf_counter  # --cpu-time: time.thread_time, which other processes cannot inflate


def _interleave(a: Callable[[], None], b: Callable[[], None], pairs: int):
    return interleaved(a, b, pairs, clock=_CLOCK)


@contextlib.contextmanager
def _forced_env(env: dict[str, str] | None):
    """The environment variables ``env`` set inside (nothing changed when None)."""
    before = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v


def _step_fns(
    ref, mine, x, mode, mine_kw=None, pack=None, unpack=None, autocast=None, ref_gemm=None
):
    """The two timed callables: torch.nn's ``ref`` (packing with ``pack``/``unpack``), or with
    ``ref_gemm`` (environment variables) rnnkit's ``ref`` under them; and rnnkit's ``mine``."""
    mine_kw = mine_kw or {}
    params = list(ref.parameters()) + list(mine.parameters())

    def context():
        return torch.autocast("cpu", dtype=autocast, enabled=autocast is not None)

    def run_ref():  # torch.nn users pack on every call, so the packing is timed too
        with context(), _forced_env(ref_gemm):
            if ref_gemm is not None:  # rnnkit against itself on another GEMM source
                return ref(x, **mine_kw)
            out, st = ref(x if pack is None else pack(x))
            return (unpack(out) if unpack else out), st

    def run_mine():
        with context():
            return mine(x, **mine_kw)

    return step_pair(run_ref, run_mine, mode == "train", params)


def measure(
    case: str,
    shape: str,
    mode: str,
    backend: str,
    pairs: int,
    precision: str = "fp32",
    versus_gemm: str | None = None,
    floor: bool = False,
    versus_split: str | None = None,
) -> Row:
    steps, batch, inp, hidden = SHAPES[shape]
    autocast = PRECISIONS[precision]
    torch.manual_seed(0)
    if case == "bilstm":
        ref = torch.nn.LSTM(inp, hidden, num_layers=2, bidirectional=True)
        mine = rnnkit.LSTM(inp, hidden, num_layers=2, bidirectional=True, backend=backend)
    else:
        ref_cls, mine_cls, kw = CELLS[case]
        ref = ref_cls(inp, hidden, **kw)
        mine = mine_cls(inp, hidden, **kw, backend=backend)
    mine.load_state_dict(ref.state_dict())
    ref_env = None
    if versus_gemm is not None:
        ref = copy.deepcopy(mine)
        ref_env = {"RNNKIT_GEMM": versus_gemm}
        if versus_split is not None:
            ref_env["RNNKIT_SPLIT"] = versus_split
    x = torch.randn(steps, batch, inp, requires_grad=mode == "train")
    if case == "bilstm":
        lengths = torch.randint(steps // 4, steps + 1, (batch,))

        def pack(x):
            return pack_padded_sequence(x, lengths, enforce_sorted=False)

        def unpack(out):
            return pad_packed_sequence(out, total_length=steps)[0]

        a, b = _step_fns(ref, mine, x, mode, {"lengths": lengths}, pack, unpack, autocast, ref_env)
        with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            with torch.set_grad_enabled(mode == "train"):  # inference rows run under no_grad
                chosen = rnnkit.explain(mine, x, lengths=lengths).backend
    else:
        a, b = _step_fns(ref, mine, x, mode, autocast=autocast, ref_gemm=ref_env)
        with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            with torch.set_grad_enabled(mode == "train"):
                chosen = rnnkit.explain(mine, x).backend
    ta, tb = _interleave(a, b, pairs)
    ratios = [x / y for x, y in zip(ta, tb, strict=True)]
    floor_s = None
    if floor and chosen == "cpu" and case in CELLS:
        with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            floor_s = gemm_floor(mine, x, mode)
    return Row(
        case=case,
        shape=shape,
        mode=mode,
        precision=precision,
        backend=chosen,
        torch_ms=1e3 * statistics.median(ta),
        rnnkit_ms=1e3 * statistics.median(tb),
        ratio=statistics.median(ratios),
        ratio_min=min(ratios),
        ratio_max=max(ratios),
        pairs=pairs,
        floor_ms=None if floor_s is None else 1e3 * floor_s,
    )


def _floor_text(r: Row) -> str:
    if r.floor_ms is None:
        return ""
    return f"floor {r.floor_ms:.2f} ms  bound {r.bound:5.2f}  gemm share {r.gemm_share:.2f}"


def markdown(rows: list[Row]) -> str:
    floors = any(r.floor_ms is not None for r in rows)
    extra = " GEMM floor ms | bound | GEMM share |" if floors else ""
    lines = [
        "| case | shape | mode | precision | rnnkit backend | torch.nn ms | rnnkit ms "
        "| ratio (median) | min–max |" + extra,
        "|---|---|---|---|---|---:|---:|---:|---|" + ("---:|---:|---:|" if floors else ""),
    ]
    for r in rows:
        line = (
            f"| {r.case} | {r.shape} | {r.mode} | {r.precision} | {r.backend} | {r.torch_ms:.2f} | "
            f"{r.rnnkit_ms:.2f} | {r.ratio:.2f} | {r.ratio_min:.2f}–{r.ratio_max:.2f} |"
        )
        if floors:
            if r.floor_ms is None:
                line += " | | |"
            else:
                line += f" {r.floor_ms:.2f} | {r.bound:.2f} | {r.gemm_share:.2f} |"
        lines.append(line)
    return "\n".join(lines)


def environment() -> dict:
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "rnnkit": rnnkit.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.platform(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--cells", nargs="+", default=["lstm", "gru", "rnn", "bilstm"], choices=[*CELLS, "bilstm"]
    )
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument(
        "--modes", nargs="+", default=["train", "infer"], choices=["train", "infer"]
    )
    parser.add_argument("--backend", default="auto", help="rnnkit backend (default: auto)")
    parser.add_argument(
        "--precision",
        default="fp32",
        choices=list(PRECISIONS),
        help="fp32, or bf16: both sides under torch.autocast('cpu', dtype=torch.bfloat16)",
    )
    parser.add_argument(
        "--versus-gemm",
        metavar="SOURCE",
        help="compare against rnnkit itself with every GEMM forced to SOURCE (e.g. mkl) instead "
        "of torch.nn",
    )
    parser.add_argument(
        "--versus-split",
        choices=["on", "off"],
        help="with --versus-gemm: also force the reference side's steps split by batch or not",
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also time each single-layer cpu-kernel case's GEMMs alone: the floor they set and "
        "the ratio bound it gives",
    )
    parser.add_argument("--pairs", type=int, default=None, help="interleaved pairs per row")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time with this thread's CPU time (for a shared machine; use with --threads 1)",
    )
    parser.add_argument("--json", help="write the rows and the environment here")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table at the end")
    args = parser.parse_args(argv)
    if args.versus_split and not args.versus_gemm:
        parser.error("--versus-split needs --versus-gemm (it forces the reference side's schedule)")
    torch.set_num_threads(args.threads)
    if args.cpu_time:
        global _CLOCK
        _CLOCK = time.thread_time

    reference = f"gemm={args.versus_gemm}" if args.versus_gemm else "torch.nn"
    if args.versus_split:
        reference += f",split={args.versus_split}"
    rows = []
    for case in args.cells:
        shapes = ["M"] if case == "bilstm" else args.shapes
        for shape in shapes:
            for mode in args.modes:
                pairs = args.pairs or DEFAULT_REPEATS[shape]
                row = measure(
                    case,
                    shape,
                    mode,
                    args.backend,
                    pairs,
                    args.precision,
                    args.versus_gemm,
                    args.floor,
                    args.versus_split,
                )
                rows.append(row)
                print(
                    f"{row.case:8s} {row.shape} {row.mode:5s} {row.precision} {row.backend:9s} "
                    f"{reference} {row.torch_ms:9.2f} ms  rnnkit {row.rnnkit_ms:9.2f} ms  "
                    f"ratio {row.ratio:5.2f} [{row.ratio_min:.2f}, {row.ratio_max:.2f}]  "
                    f"{_floor_text(row)}",
                    flush=True,
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"environment": environment(), "rows": [asdict(r) for r in rows]}, f, indent=1
            )
    if args.markdown:
        print()
        print(markdown(rows))


if __name__ == "__main__":
    main()
