"""What the export tests share: a cell's layers gathered in one module (a "zoo"), exported
once, and the eager run it is compared with.

A zoo runs each of its layers twice, with ``lengths=`` and without, each time from an initial
state given as an input, and returns every output and final state. The layers (:data:`LAYERS`):
one :class:`rnnkit.Recurrent` forwards and one reversed, two stacked, one
:class:`rnnkit.Bidirectional`, two stacked bidirectional layers, one with zoneout (eval: its
expectation, which ONNX's own operators cannot compute, so it runs as a Loop/Scan), and for the
torch.nn cells the drop-ins (two bidirectional layers; one batch-first layer).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

import rnnkit

I, H = 3, 5
#: The example the zoo is exported with ...
EXAMPLE_T, EXAMPLE_B = 5, 3
EXAMPLE_LENGTHS = [5, 2, 4]
#: ... and the shapes it is checked at: lengths with a 0, a 1 and a T, another T and B.
T, B = 9, 6
LENGTHS = [9, 3, 0, 5, 1, 2]

CELLS = {
    "rnn_tanh": lambda i: rnnkit.RNNCell(i, H, nonlinearity="tanh"),
    "rnn_relu": lambda i: rnnkit.RNNCell(i, H, nonlinearity="relu"),
    "lstm": lambda i: rnnkit.LSTMCell(i, H),
    "lstm_proj": lambda i: rnnkit.LSTMCell(i, H, proj_size=3),
    "gru": lambda i: rnnkit.GRUCell(i, H),
    "lstm_peephole": lambda i: rnnkit.PeepholeLSTMCell(i, H),
    "lstm_layernorm": lambda i: rnnkit.LayerNormLSTMCell(i, H),
    "gru_layernorm": lambda i: rnnkit.LayerNormGRUCell(i, H),
}
DROP_INS = {
    "rnn_tanh": lambda **kw: rnnkit.RNN(I, H, nonlinearity="tanh", **kw),
    "rnn_relu": lambda **kw: rnnkit.RNN(I, H, nonlinearity="relu", **kw),
    "lstm": lambda **kw: rnnkit.LSTM(I, H, **kw),
    "lstm_proj": lambda **kw: rnnkit.LSTM(I, H, proj_size=3, **kw),
    "gru": lambda **kw: rnnkit.GRU(I, H, **kw),
}


LAYERS = (
    "uni1", "rev1", "uni2", "bi1", "bi2", "bi1-zoneout", "drop-in-bi2", "drop-in-uni1",
)  # fmt: skip


def layers_of(cell: str, names: tuple[str, ...] = LAYERS) -> dict[str, nn.Module]:
    """The zoo's layers over ``cell`` (see the module docstring) by name: those of ``names``
    that ``cell`` has (the drop-ins exist for the torch.nn cells only)."""

    def recurrent(i: int, reverse: bool = False, **kw: Any) -> rnnkit.Recurrent:
        return rnnkit.Recurrent(CELLS[cell](i), reverse=reverse, **kw)

    def bidirectional(i: int, **kw: Any) -> rnnkit.Bidirectional:
        return rnnkit.Bidirectional(recurrent(i, **kw), recurrent(i, reverse=True, **kw))

    out = CELLS[cell](I).output_size
    # zoneout_cell where the cell has a cell state (a cell of h alone refuses it)
    cell_zoneout = (
        {"zoneout_cell": 0.2} if isinstance(CELLS[cell](I).initial_state(1), tuple) else {}
    )
    make = {
        "uni1": lambda: recurrent(I),
        "rev1": lambda: recurrent(I, reverse=True),
        "uni2": lambda: rnnkit.Stacked([recurrent(I), recurrent(out)]),
        "bi1": lambda: bidirectional(I),
        "bi2": lambda: rnnkit.Stacked([bidirectional(I), bidirectional(2 * out)]),
        "bi1-zoneout": lambda: bidirectional(I, zoneout=0.3, **cell_zoneout),
    }
    if cell in DROP_INS:
        make["drop-in-bi2"] = lambda: DROP_INS[cell](num_layers=2, bidirectional=True, dropout=0.3)
        make["drop-in-uni1"] = lambda: DROP_INS[cell](batch_first=True)
    return {name: make[name]() for name in names if name in make}


def _perturb(module: nn.Module) -> None:
    """Parameters off their initial values (LayerNorm gains about 0.5, as the conformance
    suite does), so every one of them matters."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if ".ln_" in f".{name}" and name.endswith("weight"):
                p.mul_(0.5).add_(0.1 * noise)
            else:
                p.add_(0.2 * noise)


def initial_state(layer: nn.Module, batch: int, generator: torch.Generator) -> Any:
    """A random initial state in the layer's own layout."""

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator)

    if isinstance(layer, rnnkit.Recurrent):
        sizes = layer.cell.state_sizes
        return rand(batch, sizes[0]) if len(sizes) == 1 else tuple(rand(batch, n) for n in sizes)
    if isinstance(layer, rnnkit.Bidirectional):
        return tuple(
            initial_state(d, batch, generator) for d in (layer.forward_layer, layer.backward_layer)
        )
    if isinstance(layer, rnnkit.Stacked):
        return tuple(initial_state(child, batch, generator) for child in layer.layers)
    h0 = rand(layer.num_layers * layer.num_directions, batch, layer.state_size)
    if isinstance(layer, rnnkit.LSTM):
        return (h0, rand(layer.num_layers * layer.num_directions, batch, layer.hidden_size))
    return h0


def batch_axis(layer: nn.Module) -> int:
    """Where B is in each of the layer's state tensors."""
    return 1 if isinstance(layer, rnnkit.RNN | rnnkit.LSTM | rnnkit.GRU) else 0


class Zoo(nn.Module):
    """``forward(x (T, B, I), lengths (B,), states: list[Tensor])``: every layer with and without
    lengths, from the states (one flat list, :meth:`states`), all results in one flat tuple."""

    def __init__(self, layers: dict[str, nn.Module]) -> None:
        super().__init__()
        self.names = list(layers)
        self.layers = nn.ModuleList(layers.values())
        g = torch.Generator()
        self._specs = []  # per layer: the state's structure and its number of tensors
        for layer in self.layers:
            leaves, spec = tree_flatten(initial_state(layer, 1, g))
            self._specs.append((spec, len(leaves)))

    def states(self, batch: int, seed: int = 1) -> list[Tensor]:
        g = torch.Generator().manual_seed(seed)
        return [s for layer in self.layers for s in tree_flatten(initial_state(layer, batch, g))[0]]

    def state_axes(self) -> list[int]:
        """The batch axis of each tensor of :meth:`states`."""
        return [
            batch_axis(layer)
            for layer, (_, n) in zip(self.layers, self._specs, strict=True)
            for _ in range(n)
        ]

    def forward(self, x: Tensor, lengths: Tensor, states: list[Tensor]) -> tuple[Tensor, ...]:
        results = []
        k = 0
        for layer, (spec, n) in zip(self.layers, self._specs, strict=True):
            state = tree_unflatten(list(states[k : k + n]), spec)
            k += n
            inp = x.transpose(0, 1) if getattr(layer, "batch_first", False) else x
            for given in (lengths, None):
                out, final = layer(inp, state, lengths=given)
                results += [out, *tree_flatten(final)[0]]
        return tuple(results)


def zoo(cell: str, names: tuple[str, ...] = LAYERS, dtype: torch.dtype = torch.float32) -> Zoo:
    """The layers ``names`` of ``cell`` in a zoo, in eval mode."""
    return mixed([(cell, name) for name in names], dtype)


def mixed(layers: list[tuple[str, str]], dtype: torch.dtype = torch.float32) -> Zoo:
    """A zoo of (cell, layer name) pairs, cells mixed, in eval mode."""
    torch.manual_seed(0)
    chosen = {
        f"{cell} {name}": layer
        for cell, name in layers
        for layer in layers_of(cell, (name,)).values()
    }
    module = Zoo(chosen).to(dtype)
    _perturb(module)
    return module.eval()


def example(module: Zoo) -> tuple[Tensor, Tensor, list[Tensor]]:
    """The inputs the zoo is exported with, in its dtype."""
    dtype = next(module.parameters()).dtype
    x = torch.randn(EXAMPLE_T, EXAMPLE_B, I, dtype=dtype)
    return x, torch.tensor(EXAMPLE_LENGTHS), [s.to(dtype) for s in module.states(EXAMPLE_B, seed=2)]


def check_inputs(
    module: Zoo, dtype: torch.dtype = torch.float32, lengths: list[int] = LENGTHS, steps: int = T
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Inputs at a T and B other than the example's (by default)."""
    batch = len(lengths)
    x = torch.randn(steps, batch, I, generator=torch.Generator().manual_seed(3), dtype=dtype)
    return x, torch.tensor(lengths), [s.to(dtype) for s in module.states(batch, seed=4)]


def labels(module: Zoo) -> list[str]:
    """A name for each of the zoo's results, for messages."""
    names = []
    for name, (_, n) in zip(module.names, module._specs, strict=True):
        for given in ("lengths", "full"):
            names += [f"{name} {given} output"] + [f"{name} {given} state[{k}]" for k in range(n)]
    return names
