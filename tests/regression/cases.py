"""The regression cases: small seeded modules whose outputs each release saves and later ones keep.

``python tests/regression/cases.py`` writes ``outputs-<version>.pt`` for the current version;
``tests/test_regression.py`` checks every saved file against the code as it is now.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import rnnkit

HERE = Path(__file__).parent

CASES = {
    "rnn_relu_2layer": (rnnkit.RNN, {"nonlinearity": "relu", "num_layers": 2}),
    "lstm_bi_proj": (rnnkit.LSTM, {"bidirectional": True, "proj_size": 3}),
    "gru_bi_3layer_batch_first": (
        rnnkit.GRU,
        {"num_layers": 3, "bidirectional": True, "batch_first": True},
    ),
}
T, B, I, H = 7, 4, 5, 6
#: One set with a length-0 sequence (the reference loop runs it) and one torch's ops can pack.
LENGTHS = {"with_zero": [7, 0, 3, 1], "packable": [7, 2, 3, 1]}


def build(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    cls, kw = CASES[name]
    torch.manual_seed(1234)
    module = cls(I, H, **kw)
    x = torch.randn(B, T, I) if kw.get("batch_first") else torch.randn(T, B, I)
    return module, x


def outputs(name: str, state_dict=None) -> dict[str, torch.Tensor]:
    module, x = build(name)
    if state_dict is not None:
        module.load_state_dict(state_dict)
    result = {}
    for label, lengths in LENGTHS.items():
        out, hn = module(x, lengths=lengths)
        hn = hn if isinstance(hn, tuple) else (hn,)
        result[f"{label}.output"] = out.detach()
        result |= {f"{label}.state{k}": s.detach() for k, s in enumerate(hn)}
    return result


def save() -> Path:
    data = {}
    for name in CASES:
        module, _ = build(name)
        data[name] = {"state_dict": module.state_dict(), "outputs": outputs(name)}
    path = HERE / f"outputs-{rnnkit.__version__}.pt"
    torch.save(data, path)
    return path


if __name__ == "__main__":
    sys.exit(print(save()))
