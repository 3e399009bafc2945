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


#: The widest picture :func:`attention_strips` draws (inches); a longer text wraps onto more lines.
STRIPS_WIDTH = 30.0
#: Inches per character of a word's cell in :func:`attention_strips` (a cell holds the word and
#: two characters of margin, three at least).
_CELL = 0.11


def _strip_lines(words: Sequence[str], width: float) -> list[list[tuple[int, str, float]]]:
    """``words`` cut into lines of at most ``width`` inches of cells: (index, shown word, cell
    width) each; a word too long for a line alone is shown cut, ending in an ellipsis."""
    chars = int(width / _CELL) - 2  # the most a cell of one line shows
    lines: list[list[tuple[int, str, float]]] = [[]]
    used = 0.0
    for k, word in enumerate(words):
        shown = word if len(word) <= chars else word[: chars - 1] + "\u2026"
        span = (max(len(shown), 3) + 2) * _CELL
        if lines[-1] and used + span > width:
            lines.append([])
            used = 0.0
        lines[-1].append((k, shown, span))
        used += span
    return lines


def attention_strips(
    rows: Sequence[tuple[str, str, Sequence[str], Sequence[float]]],
    path: str | Path,
    dpi: int = 100,
) -> Path:
    """Save a PNG with one heat strip per text: each word in a cell coloured by its weight.

    ``rows``: ``(title, label, words, weights)`` per text, e.g. a sentence, its predicted label,
    its tokens and the attention weight of each (they sum to 1 over a text). One colour scale
    (0 .. the largest weight shown) serves every strip. A text wider than the picture
    (:data:`STRIPS_WIDTH` inches) goes on over as many lines as it needs, every word at the
    same size. Returns the path written.
    """
    import matplotlib

    if not rows:
        raise ValueError("no rows to draw; expected at least one (title, label, words, weights)")
    for title, _, words, weights in rows:
        if len(words) != len(weights):
            raise ValueError(f"{len(words)} words but {len(weights)} weights for {title!r}")
    cmap = matplotlib.colormaps["Reds"]
    top = max(max(w, default=0.0) for *_, w in rows) or 1.0
    margin = 0.6  # inches around the strips
    lined = [_strip_lines(words, STRIPS_WIDTH - margin) for _, _, words, _ in rows]
    width = max(
        [2.0] + [sum(span for *_, span in line) for lines in lined for line in lines]
    )  # one scale for every strip: a character is as wide in each
    heights = [0.65 * len(lines) + 0.3 for lines in lined]  # the strip's lines and its title
    fig = _figure(width + margin, sum(heights) + 0.3)
    axes = fig.subplots(len(rows), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
    for ax, (title, label, _, weights), lines in zip(axes, rows, lined, strict=True):
        for row, line in enumerate(lines):
            x, y = 0.0, len(lines) - 1 - row  # the first line on top
            for k, shown, span in line:
                w = weights[k]
                colour: Any = cmap(w / top)
                ax.add_patch(matplotlib.patches.Rectangle((x, y + 0.04), span, 0.92, color=colour))
                ax.text(
                    x + span / 2, y + 0.5, shown, ha="center", va="center", fontsize=9,
                    color="white" if w / top > 0.6 else "black",
                )  # fmt: skip
                x += span
        ax.set_xlim(0, width)
        ax.set_ylim(0, len(lines))
        ax.set_axis_off()
        ax.set_title(f"{label}: {title[:100]}", fontsize=9, loc="left")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=dpi)
    return path
