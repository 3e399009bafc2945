"""The recipes' optimizer step: torch's default AdamW (``foreach`` on the CPU) against
:func:`rnnkit.train.adamw` (torch's fused kernel), on a recipe's default model, alone and inside
the recipe's whole training step (forward, backward, optimizer, the weights' moving average).

    python benchmarks/bench_optimizer.py                       # g2p's default pair, 2 threads
    python benchmarks/bench_optimizer.py --task translate --threads 1

Measured as DESIGN.md says: the two called alternately (A B A B ..., after a warm-up of each, by
:func:`rnnkit.backends.cpu.calibrate.interleaved`, as bench_rnn.py does); reported: the medians
and the ratio default / fused (> 1: the fused step is faster). The whole-step comparison trains
two copies of one initialisation on the same batches, each with its optimizer.
"""

from __future__ import annotations

import argparse
import copy
import statistics
from collections.abc import Callable

import torch

from rnnkit import tasks
from rnnkit.backends.cpu.calibrate import interleaved
from rnnkit.train import adamw, average_of, update_average


def medians(cases: dict[str, Callable[[], None]], pairs: int) -> dict[str, float]:
    """Median seconds of each of the two ``cases``, called alternately ``pairs`` times."""
    (a, run_a), (b, run_b) = cases.items()
    ta, tb = interleaved(run_a, run_b, pairs)
    return {a: statistics.median(ta), b: statistics.median(tb)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="g2p", help="the recipe whose default model is stepped")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--rounds",
        type=int,
        default=12,
        help="tens of optimizer steps, fives of training steps, per case",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")

    cls = tasks.get(args.task)
    task = cls(cls.make_config({}))
    task.device = cpu
    splits = task.load_splits()
    task.set_vocab(task.fit_vocab(splits["train"]))
    data = task.encode(splits["train"])
    torch.manual_seed(0)
    model = task.build_model()
    model.train()
    n = sum(p.numel() for p in model.parameters())
    print(f"{args.task}: {n:,} parameters, {args.threads} threads")

    # The optimizer alone: the same gradients every step.
    alone = {}
    for name in ("default", "fused"):
        params = [p.detach().clone().requires_grad_() for p in model.parameters()]
        for p in params:
            p.grad = torch.randn_like(p)
        opt = adamw(params, 2e-3, 0.0, cpu) if name == "fused" else torch.optim.AdamW(params)
        alone[name] = opt.step
    t = medians(alone, 10 * args.rounds)
    print(
        f"optimizer step: default {t['default'] * 1e3:.2f} ms, fused {t['fused'] * 1e3:.2f} ms, "
        f"default / fused = {t['default'] / t['fused']:.2f}"
    )

    # The whole training step, each optimizer on its own copy of the model.
    order = task.epoch_batches(data, torch.Generator().manual_seed(0))
    batches = [task.collate(data, b) for b in order[: 5 * args.rounds + 5]]

    def trainer(fused: bool) -> Callable[[], None]:
        mine = copy.deepcopy(model)
        opt = (
            adamw(mine.parameters(), 2e-3, 0.0, cpu)
            if fused
            else torch.optim.AdamW(mine.parameters(), lr=2e-3)
        )
        average = average_of(mine)
        state = {"k": 0}

        def step() -> None:
            batch = batches[state["k"] % len(batches)]
            state["k"] += 1
            loss, _ = task.loss(mine, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            update_average(average, mine, 0.999, state["k"])

        return step

    whole = {"default": trainer(False), "fused": trainer(True)}
    t = medians(whole, 5 * args.rounds)
    print(
        f"training step: default {t['default'] * 1e3:.1f} ms, fused {t['fused'] * 1e3:.1f} ms, "
        f"default / fused = {t['default'] / t['fused']:.3f}"
    )


if __name__ == "__main__":
    main()
