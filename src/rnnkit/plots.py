"""Pictures of what a recurrent model does: gate activations over the tokens of one sequence, and
the attention weights a classifier puts on each word."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

__all__ = ["attention_strips", "gate_heatmap"]

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


def _figure(width: float, height: float) -> Any:
    """A matplotlib Figure drawn by Agg, outside pyplot: the caller's pyplot backend and open
    figures are left as they were."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - depends on the install
        raise ImportError(
            "plotting needs matplotlib: pip install matplotlib (or rnnkit[plot])"
        ) from None
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


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
    width = max(4.0, 0.35 * len(tokens) + 1.5)
    height = max(2.5, 0.12 * values.shape[0] + 1.2)
    fig = _figure(width, height)
    ax = fig.subplots()
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
    return path


def attention_strips(
    rows: Sequence[tuple[str, str, Sequence[str], Sequence[float]]],
    path: str | Path,
    dpi: int = 100,
) -> Path:
    """Save a PNG with one heat strip per text: each word in a cell coloured by its weight.

    ``rows``: ``(title, label, words, weights)`` per text, e.g. a sentence, its predicted label,
    its tokens and the attention weight of each (they sum to 1 over a text). One colour scale
    (0 .. the largest weight shown) serves every strip. Returns the path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not rows:
        raise ValueError("no rows to draw; expected at least one (title, label, words, weights)")
    for title, _, words, weights in rows:
        if len(words) != len(weights):
            raise ValueError(f"{len(words)} words but {len(weights)} weights for {title!r}")
    import matplotlib

    cmap = matplotlib.colormaps["Reds"]
    top = max(max(w, default=0.0) for *_, w in rows) or 1.0
    cell_w = 0.11  # inches per character
    widths = [max(sum(max(len(t), 3) + 2 for t in words) * cell_w, 2.0) for _, _, words, _ in rows]
    fig = Figure(figsize=(min(max(widths) + 0.6, 30.0), 0.95 * len(rows) + 0.3))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), 1, squeeze=False)[:, 0]
    for ax, (title, label, words, weights) in zip(axes, rows, strict=True):
        x = 0.0
        for word, w in zip(words, weights, strict=True):
            span = (max(len(word), 3) + 2) * cell_w
            colour: Any = cmap(w / top)
            ax.add_patch(matplotlib.patches.Rectangle((x, 0), span, 1, color=colour))
            ax.text(
                x + span / 2, 0.5, word, ha="center", va="center", fontsize=9,
                color="white" if w / top > 0.6 else "black",
            )  # fmt: skip
            x += span
        ax.set_xlim(0, max(widths))
        ax.set_ylim(0, 1)
        ax.set_axis_off()
        ax.set_title(f"{label}: {title[:100]}", fontsize=9, loc="left")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=dpi)
    return path
