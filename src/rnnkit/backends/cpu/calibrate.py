"""``rnnkit calibrate``: the dispatch crossovers measured on the machine that runs.

For each cell torch's fused op runs (LSTM, GRU, Elman RNN), at DESIGN.md's S, M and L shapes,
training and inference, in float32 and (where the CPU has bf16 instructions) under bfloat16
autocast, plus the 2-layer bidirectional LSTM with lengths against torch.nn with packing at M:
torch.nn and rnnkit with ``backend="cpu"`` run interleaved (A B A B ..., after a warm-up), and
the median of torch.nn's time over the kernels' is kept (> 1: the kernels are faster). The
table is saved for the current thread count (:func:`.dispatch.save_calibration`) and automatic
dispatch reads it from then on, in this process and every later one on this machine.

benchmarks/bench_rnn.py times with the same pieces (:func:`step_pair`, :func:`interleaved`).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator

import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from . import dispatch, gemm

__all__ = ["CELLS", "PAIRS", "SHAPES", "interleaved", "measure", "step_pair"]

#: The shapes measured (T, B, I, H): DESIGN.md's S, M and L.
SHAPES = {"S": dispatch.S, "M": dispatch.M, "L": dispatch.L}
#: Interleaved pairs per point; the large shape takes fewer.
PAIRS = {"S": 20, "M": 8, "L": 4}
#: The dispatch table's cell names and the torch.nn class with its arguments for each.
CELLS = {"lstm": ("LSTM", {}), "gru": ("GRU", {}), "rnn_tanh": ("RNN", {"nonlinearity": "tanh"})}
_SHOWN = {"rnn_tanh": "rnn"}


def _loss(out: torch.Tensor, states: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    leaves = states if isinstance(states, tuple) else (states,)
    return out.float().sum() + sum(s.float().sum() for s in leaves)


def step_pair(
    run_ref: Callable[[], tuple],
    run_mine: Callable[[], tuple],
    training: bool,
    params: list[torch.Tensor],
) -> tuple[Callable[[], None], Callable[[], None]]:
    """The two timed callables from two forward calls that return (out, states): inference
    under no_grad, or a training step (gradients cleared, forward, backward of the sum of the
    output and the final states)."""
    if not training:

        def infer(fn: Callable[[], tuple]) -> Callable[[], None]:
            def go() -> None:
                with torch.no_grad():
                    fn()

            return go

        return infer(run_ref), infer(run_mine)

    def train(fn: Callable[[], tuple]) -> Callable[[], None]:
        def go() -> None:
            for p in params:
                p.grad = None
            out, st = fn()
            _loss(out, st).backward()

        return go

    return train(run_ref), train(run_mine)


def interleaved(
    a: Callable[[], None],
    b: Callable[[], None],
    pairs: int,
    warmup: int = 2,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[list[float], list[float]]:
    """Seconds of ``a`` and of ``b`` in ``pairs`` alternating calls (A B A B ...) after
    ``warmup`` calls of each."""
    for _ in range(warmup):
        a()
        b()
    ta, tb = [], []
    for _ in range(pairs):
        start = clock()
        a()
        ta.append(clock() - start)
        start = clock()
        b()
        tb.append(clock() - start)
    return ta, tb


@contextlib.contextmanager
def _autocast(precision: str) -> Iterator[None]:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        yield


def _ratio(
    mode: str, lengths: bool, precision: str, training: bool, shape: tuple, pairs: int
) -> float | None:
    """torch.nn's median time over the cpu kernels' for one point (None where torch's op cannot
    run it here)."""
    import rnnkit

    steps, batch, inp, hidden = shape
    torch.manual_seed(0)
    cls, kw = CELLS[mode]
    extra = {"num_layers": 2, "bidirectional": True} if lengths else {}
    ref = getattr(torch.nn, cls)(inp, hidden, **kw, **extra)
    mine = getattr(rnnkit, cls)(inp, hidden, **kw, **extra, backend="cpu")
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(steps, batch, inp, requires_grad=training)
    given = torch.randint(steps // 4, steps + 1, (batch,)) if lengths else None

    def run_ref() -> tuple:
        with _autocast(precision):
            if given is None:
                return ref(x)
            out, st = ref(pack_padded_sequence(x, given, enforce_sorted=False))
            return pad_packed_sequence(out, total_length=steps)[0], st

    def run_mine() -> tuple:
        with _autocast(precision):
            return mine(x) if given is None else mine(x, lengths=given)

    params = [*ref.parameters(), *mine.parameters()]
    a, b = step_pair(run_ref, run_mine, training, params)
    try:
        a()
    except RuntimeError:  # e.g. no bf16 primitive for torch's op on this CPU: nothing to weigh
        return None
    ta, tb = interleaved(a, b, pairs)
    return statistics.median(x / y for x, y in zip(ta, tb, strict=True))


def measure(
    cells: tuple[str, ...] = tuple(CELLS),
    shapes: tuple[str, ...] = tuple(SHAPES),
    precisions: tuple[str, ...] | None = None,
    lengths: bool = True,
    pairs: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[tuple[str, bool, str, bool], tuple[dispatch.Point, ...]]:
    """The crossover table (:data:`.dispatch.MEASURED`'s layout) measured here and now at the
    current thread count: ``cells`` at ``shapes``, training and inference, in ``precisions``
    (default: fp32, and bf16 where :func:`.gemm.bf16_supported`), and with ``lengths`` the
    2-layer bidirectional LSTM with lengths at M; ``pairs`` per point (default :data:`PAIRS`).
    ``progress`` receives a line per point."""
    for cell in cells:
        if cell not in CELLS:
            raise ValueError(f"cell {cell!r}; expected one of {', '.join(CELLS)}")
    for shape in shapes:
        if shape not in SHAPES:
            raise ValueError(f"shape {shape!r}; expected one of {', '.join(SHAPES)}")
    if precisions is None:
        precisions = ("fp32", "bf16") if gemm.bf16_supported() else ("fp32",)
    for precision in precisions:
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision {precision!r}; expected fp32 or bf16")
    if pairs is not None and pairs < 1:
        raise ValueError(f"pairs = {pairs}; expected at least 1")
    points = [(c, False, s) for c in cells for s in shapes]
    if lengths and "lstm" in cells and "M" in shapes:
        points.append(("lstm", True, "M"))
    table: dict[tuple[str, bool, str, bool], list[dispatch.Point]] = {}
    for precision in precisions:
        for cell, with_lengths, name in points:
            for training in (True, False):
                shape = SHAPES[name]
                ratio = _ratio(cell, with_lengths, precision, training, shape, pairs or PAIRS[name])
                what = (
                    f"{'2-layer bidirectional ' if with_lengths else ''}{_SHOWN.get(cell, cell)}"
                    f"{' with lengths' if with_lengths else ''} {precision} "
                    f"{'training' if training else 'inference'} at {name}"
                )
                if ratio is None:
                    line = f"{what}: torch's op cannot run it here; the cpu kernels take it"
                else:
                    line = f"{what}: the cpu kernels at {ratio:.2f}x torch.nn"
                    key = (cell, with_lengths, precision, training)
                    table.setdefault(key, []).append(dispatch.Point(*shape, round(ratio, 3)))
                if progress is not None:
                    progress(line)
    return {k: tuple(v) for k, v in table.items()}
