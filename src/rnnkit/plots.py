"""Pictures of what a recurrent layer does: gate activations over the tokens of one sequence."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from torch import Tensor

__all__ = ["gate_heatmap"]

#: Colour range per gate: sigmoid gates in [0, 1], tanh candidates in [-1, 1], c unbounded.
_RANGES = {
    "i": (0, 1),
    "f": (0, 1),
    "o": (0, 1),
    "r": (0, 1),
    "z": (0, 1),
    "g": (-1, 1),
    "n": (-1, 1),
}


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - depends on the install
        raise ImportError(
            "plotting needs matplotlib: pip install matplotlib (or rnnkit[plot])"
        ) from None
    return plt


def gate_heatmap(
    gates: Mapping[str, Tensor],
    gate: str,
    tokens: Sequence[str],
    path: str | Path,
    sequence: int = 0,
    batch_first: bool = False,
    units: int | None = 64,
    dpi: int = 100,
) -> Path:
    """Save a PNG heatmap of one gate over the tokens of one sequence.

    ``gates`` is what a layer returns with ``return_gates=True`` (e.g. ``gates["f"]``, the forget
    gate, of shape (T, B, H), or (B, T, H) with ``batch_first``). Columns are the ``tokens`` (the
    first ``len(tokens)`` steps of sequence ``sequence``), rows the first ``units`` hidden units.
    Returns the path written.
    """
    if gate not in gates:
        raise KeyError(f"gate = {gate!r} is not among the returned gates {sorted(gates)}")
    values = gates[gate].detach().float().cpu()
    values = values[sequence] if batch_first else values[:, sequence]  # (T, H)
    if len(tokens) > values.shape[0]:
        raise ValueError(f"{len(tokens)} tokens for a sequence of T = {values.shape[0]} steps")
    values = values[: len(tokens), :units].T  # (units, len(tokens))
    plt = _pyplot()
    width = max(4.0, 0.35 * len(tokens) + 1.5)
    height = max(2.5, 0.12 * values.shape[0] + 1.2)
    fig, ax = plt.subplots(figsize=(width, height))
    low, high = _RANGES.get(gate, (None, None))
    image = ax.imshow(values.numpy(), aspect="auto", cmap="viridis", vmin=low, vmax=high)
    ax.set_xticks(range(len(tokens)))
    ax.set_xticklabels(tokens, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("unit")
    ax.set_title(f"gate {gate!r}, sequence {sequence}")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
