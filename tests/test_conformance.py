"""The backend conformance suite: every registered backend equals the reference backend.

For each backend (every name in ``rnnkit.available_backends()`` but "auto" and "reference": a
backend registered before the tests are collected is enrolled too), over every built-in cell,
one layer forwards and reversed, bidirectional, a two-layer bidirectional stack (built from
Recurrent/Bidirectional/Stacked, and as a torch.nn drop-in), lengths with a 0, a 1 and a T, each
regulariser alone and all together (same seed, same masks), gate outputs, checkpointed BPTT,
float32 and float64:

* a call the backend accepts (``check`` gives None) equals the reference: outputs (exactly zero
  at padded steps), final states, gates, and the gradients of the input, of every initial state
  and of every parameter;
* a call it declines raises :class:`rnnkit.BackendUnavailable` naming the reason when the
  backend is forced, and automatic dispatch runs it elsewhere (automatic dispatch equals the
  reference on every case);
* bad input gets the same clear error on every backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from conftest import GRAD_TOL, OUT_TOL
from torch.utils._pytree import tree_leaves

import rnnkit
from rnnkit import backends
from rnnkit.cells.table import SPECS

T, B, I, H = 6, 4, 3, 5
#: lengths with a 0, a 1 and a T, in no particular order
MIXED = [T, 1, 0, 3]
#: float64: the backends agree with the reference to rounding
F64_TOL = 1e-9

CELLS = {
    "rnn_tanh": lambda i, **kw: rnnkit.RNNCell(i, H, nonlinearity="tanh", **kw),
    "rnn_relu": lambda i, **kw: rnnkit.RNNCell(i, H, nonlinearity="relu", **kw),
    "lstm": lambda i, **kw: rnnkit.LSTMCell(i, H, **kw),
    "lstm_proj": lambda i, **kw: rnnkit.LSTMCell(i, H, proj_size=3, **kw),
    "gru": lambda i, **kw: rnnkit.GRUCell(i, H, **kw),
    "lstm_peephole": lambda i, **kw: rnnkit.PeepholeLSTMCell(i, H, **kw),
    "lstm_layernorm": lambda i, **kw: rnnkit.LayerNormLSTMCell(i, H, **kw),
    "gru_layernorm": lambda i, **kw: rnnkit.LayerNormGRUCell(i, H, **kw),
}
DROP_INS = {
    "rnn_tanh": lambda **kw: rnnkit.RNN(I, H, nonlinearity="tanh", **kw),
    "rnn_relu": lambda **kw: rnnkit.RNN(I, H, nonlinearity="relu", **kw),
    "lstm": lambda **kw: rnnkit.LSTM(I, H, **kw),
    "lstm_proj": lambda **kw: rnnkit.LSTM(I, H, proj_size=3, **kw),
    "gru": lambda **kw: rnnkit.GRU(I, H, **kw),
}
REGULARISERS = {
    "none": {},
    "zoneout": {"zoneout": 0.3, "zoneout_cell": 0.2},
    "state": {"dropout_state": 0.2},
    "variational": {"dropout_input": 0.3, "dropout_output": 0.25},
    "dropconnect": {"weight_drop": 0.4},
    "all": {
        "dropout_input": 0.2, "dropout_state": 0.2, "dropout_output": 0.2, "zoneout": 0.2,
        "weight_drop": 0.3,
    },
}  # fmt: skip
STRUCTURES = ("forward", "reverse", "bidirectional", "stack", "drop-in")


def _backends() -> list[str]:
    return [n for n in backends.available() if n not in ("auto", "reference")]


@dataclass(frozen=True)
class Case:
    cell: str
    structure: str
    lengths: bool = True
    regularisers: str = "none"
    gates: bool = False
    training: bool = True
    dtype: torch.dtype = torch.float32
    bias: bool = True
    checkpoint: int | None = None

    @property
    def id(self) -> str:
        parts = [self.cell, self.structure, "lengths" if self.lengths else "full"]
        parts += [] if self.regularisers == "none" else [self.regularisers]
        parts += ["gates"] if self.gates else []
        parts += [] if self.training else ["eval"]
        parts += ["f64"] if self.dtype == torch.float64 else []
        parts += [] if self.bias else ["no-bias"]
        parts += [] if self.checkpoint is None else [f"checkpoint{self.checkpoint}"]
        return "-".join(parts)


def _cases() -> list[Case]:
    cases = []
    for cell in CELLS:
        for structure in STRUCTURES:
            if structure == "drop-in" and cell not in DROP_INS:
                continue
            for lengths in (False, True):
                cases.append(Case(cell, structure, lengths))
        for reg in REGULARISERS:
            if reg != "none":
                cases.append(Case(cell, "bidirectional", regularisers=reg))
        cases.append(Case(cell, "stack", regularisers="all"))
        cases.append(Case(cell, "reverse", regularisers="zoneout", training=False))
        cases.append(Case(cell, "stack", regularisers="all", dtype=torch.float64))
        cases.append(Case(cell, "forward", bias=False))
        cases.append(Case(cell, "stack", regularisers="all", checkpoint=2))
        cases.append(
            Case(
                cell,
                "reverse",
                regularisers="zoneout",
                checkpoint=4,
                gates=bool(SPECS[cell.removesuffix("_proj")].gate_outputs),
            )
        )
        if SPECS[cell.removesuffix("_proj")].gate_outputs:
            cases.append(Case(cell, "reverse", gates=True))
            cases.append(Case(cell, "forward", regularisers="all", gates=True))
            if cell in DROP_INS:
                cases.append(Case(cell, "drop-in", regularisers="all", gates=True))
    for cell in DROP_INS:
        cases.append(Case(cell, "drop-in", regularisers="all"))
        cases.append(Case(cell, "drop-in", regularisers="variational", checkpoint=3))
    return cases


CASES = _cases()


def _perturb(module: torch.nn.Module) -> None:
    """Every parameter moved off its initial value, so each gets a distinct gradient. LayerNorm
    gains about 0.5: at gain 1 the recurrent LayerNorm amplifies fp32 rounding step by step for
    the reference as much as for a fused kernel."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if ".ln_" in f".{name}" and name.endswith("weight"):
                p.mul_(0.5).add_(0.1 * noise)
            else:
                p.add_(0.2 * noise)


def build(case: Case) -> torch.nn.Module:
    torch.manual_seed(0)
    regs = dict(REGULARISERS[case.regularisers])
    if SPECS[case.cell.removesuffix("_proj")].family != "lstm":
        regs.pop("zoneout_cell", None)  # a cell of one state tensor refuses it
    kw = {} if case.bias else {"bias": False}
    if case.structure == "drop-in":
        module = DROP_INS[case.cell](
            num_layers=2, bidirectional=True, dropout=0.3, checkpoint=case.checkpoint, **kw, **regs
        )
    else:

        def recurrent(i: int, reverse: bool = False) -> rnnkit.Recurrent:
            cell = CELLS[case.cell](i, **kw)
            return rnnkit.Recurrent(cell, reverse=reverse, checkpoint=case.checkpoint, **regs)

        def bidirectional(i: int) -> rnnkit.Bidirectional:
            return rnnkit.Bidirectional(recurrent(i), recurrent(i, reverse=True))

        if case.structure in ("forward", "reverse"):
            module = recurrent(I, reverse=case.structure == "reverse")
        elif case.structure == "bidirectional":
            module = bidirectional(I)
        else:
            first = bidirectional(I)
            module = rnnkit.Stacked([first, bidirectional(first.output_size)], dropout=0.3)
    module = module.to(case.dtype)
    _perturb(module)
    return module.train(case.training)


def initial_state(module: torch.nn.Module, case: Case):
    """A random initial state in the module's own layout, every tensor requiring grad."""
    g = torch.Generator().manual_seed(1)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=case.dtype).requires_grad_()

    def of(layer):
        if isinstance(layer, rnnkit.Recurrent):
            sizes = layer.cell.state_sizes
            return rand(B, sizes[0]) if len(sizes) == 1 else tuple(rand(B, n) for n in sizes)
        if isinstance(layer, rnnkit.Bidirectional):
            return (of(layer.forward_layer), of(layer.backward_layer))
        if isinstance(layer, rnnkit.Stacked):
            return tuple(of(child) for child in layer.layers)
        h0 = rand(layer.num_layers * layer.num_directions, B, layer.state_size)
        if isinstance(layer, rnnkit.LSTM):
            return (h0, rand(layer.num_layers * layer.num_directions, B, layer.hidden_size))
        return h0

    return of(module)


def run(module, case: Case, backend: str, padding: list[float] | None = None):
    """Outputs, final states, gates and the gradient of a fixed loss w.r.t. every input.
    ``padding``: one value per sequence written into its padded steps of the input."""
    x = torch.randn(T, B, I, generator=torch.Generator().manual_seed(3), dtype=case.dtype)
    for b, value in enumerate(padding or ()):
        x[MIXED[b] :, b] = value
    x.requires_grad_()
    state = initial_state(module, case)
    lengths = MIXED if case.lengths else None
    kw = {"return_gates": True} if case.gates else {}
    torch.manual_seed(5)  # the regulariser masks and the dropout between layers
    with rnnkit.use_backend(backend):
        out, final, *gates = module(x, state, lengths=lengths, **kw)
    values = {"output": out}
    values |= {f"state[{k}]": s for k, s in enumerate(tree_leaves(final))}
    values |= {f"gate {k}": g for k, g in enumerate(tree_leaves(gates))}
    g = torch.Generator().manual_seed(2)
    loss = sum(
        (v * torch.randn(v.shape, generator=g, dtype=v.dtype)).sum()
        for k, v in values.items()
        if not k.startswith("gate")  # fused backends may return gates detached
    )
    inputs = {"x": x}
    inputs |= {f"initial state[{k}]": s for k, s in enumerate(tree_leaves(state))}
    inputs |= dict(module.named_parameters())
    grads = torch.autograd.grad(loss, list(inputs.values()), allow_unused=True)
    grads = {
        f"d {name}": torch.zeros_like(t) if gr is None else gr
        for (name, t), gr in zip(inputs.items(), grads, strict=True)
    }
    return values, grads


def assert_equal_to_reference(module, case: Case, backend: str) -> None:
    out_tol, grad_tol = (F64_TOL, F64_TOL) if case.dtype == torch.float64 else (OUT_TOL, GRAD_TOL)
    ref_values, ref_grads = run(module, case, "reference")
    values, grads = run(module, case, backend)
    assert values.keys() == ref_values.keys()
    for name, r in ref_values.items():
        torch.testing.assert_close(
            values[name], r, atol=out_tol, rtol=out_tol, msg=lambda m, n=name: f"{n}: {m}"
        )
    for name, r in ref_grads.items():
        torch.testing.assert_close(
            grads[name], r, atol=grad_tol, rtol=grad_tol, msg=lambda m, n=name: f"{n}: {m}"
        )
    if case.lengths:  # padded steps give exactly zero, on every backend
        for b, n in enumerate(MIXED):
            padded = values["output"][n:, b]
            assert torch.equal(padded, torch.zeros_like(padded)), f"output[{n}:, {b}] is not 0"


def request_of(module, case: Case) -> backends.Request:
    x = torch.randn(T, B, I, dtype=case.dtype, requires_grad=True)
    requests = module.dispatch_requests(x, MIXED if case.lengths else None)
    assert len(requests) == 1, "each structure of the suite runs as one call"
    return requests[0][1]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
@pytest.mark.parametrize("backend", _backends())
def test_backend_equals_reference(backend: str, case: Case) -> None:
    module = build(case)
    request = request_of(module, case)
    chosen = backends.select(request, "auto")[0]  # registers the built-ins
    reason = backends._registry[backend].check(request)
    if reason is None:
        assert_equal_to_reference(module, case, backend)
        return
    with pytest.raises(
        rnnkit.BackendUnavailable, match=f"backend {backend!r} cannot run this call"
    ):
        run(module, case, backend)
    assert chosen.name != backend  # automatic dispatch runs it elsewhere (checked below)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_automatic_dispatch_equals_reference(case: Case) -> None:
    assert_equal_to_reference(build(case), case, "auto")


@pytest.mark.parametrize("cell", ["lstm", "gru", "lstm_layernorm"])
@pytest.mark.parametrize("backend", ["reference", *_backends()])
def test_nan_and_inf_in_padding_reach_no_output_and_no_gradient(backend: str, cell: str) -> None:
    case = Case(cell, "stack", regularisers="all")
    module = build(case)
    backends.select(request_of(module, case), "auto")  # registers the built-ins
    reason = backends._registry[backend].check(request_of(module, case))
    if reason is not None:
        pytest.skip(f"{backend} declines the call: {reason}")
    want_values, want_grads = run(module, case, backend)
    values, grads = run(module, case, backend, padding=[0.0, float("nan"), float("-inf"), 1e38])
    for name, want in (want_values | want_grads).items():
        got = (values | grads)[name]
        torch.testing.assert_close(
            got, want, atol=OUT_TOL, rtol=OUT_TOL, msg=lambda m, n=name: f"{n}: {m}"
        )
    for b, n in enumerate(MIXED):
        padded = grads["d x"][n:, b]
        assert torch.equal(padded, torch.zeros_like(padded)), f"d x[{n}:, {b}] is not 0"


def test_the_suite_covers_every_cell_structure_and_regulariser() -> None:
    assert {c.cell for c in CASES} == set(CELLS)
    assert {c.structure for c in CASES} == set(STRUCTURES)
    assert {c.regularisers for c in CASES} == set(REGULARISERS)
    assert {c.cell.removesuffix("_proj") for c in CASES} == set(SPECS)


@pytest.mark.parametrize("lengths", [[], [0, 0]], ids=["empty batch", "empty sequences"])
@pytest.mark.parametrize("backend", ["reference", *_backends()])
@pytest.mark.parametrize("cell", list(DROP_INS))
def test_a_batch_without_a_step_runs_and_backpropagates(backend: str, cell: str, lengths) -> None:
    """An empty batch with ``lengths=[]`` (the last slice of a dataset) or a batch of empty
    sequences only: zero outputs and initial states, of the shapes a call without lengths
    gives, and a loss over them backpropagates (zero gradients), as on every other batch."""
    module = DROP_INS[cell](num_layers=2, bidirectional=True, backend=backend)
    x = torch.randn(T, len(lengths), I, requires_grad=True)
    backends.select(request_of_call(module, x, lengths), "auto")  # registers the built-ins
    reason = backends._registry[backend].check(request_of_call(module, x, lengths))
    if reason is not None:
        pytest.skip(f"{backend} declines the call: {reason}")
    got = tree_leaves(module(x, lengths=torch.tensor(lengths, dtype=torch.long)))
    want = tree_leaves(module(torch.zeros_like(x)))  # the shapes
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape, f"{tuple(a.shape)}, without lengths {tuple(b.shape)}"
        assert torch.count_nonzero(a) == 0
    loss = sum(t.sum() for t in got)
    for g in torch.autograd.grad(loss, [x, *module.parameters()]):
        assert torch.count_nonzero(g) == 0


def request_of_call(module, x, lengths) -> backends.Request:
    return module.dispatch_requests(x, lengths)[0][1]


# -- errors: the same clear message whichever backend runs -----------------------------------------

ERRORS = {
    "lengths above T": (lambda m, x: m(x, lengths=[T + 1, 1, 1, 1]), ValueError, r"lengths\[0\] = 7 > T = 6"),
    "negative length": (lambda m, x: m(x, lengths=[T, -1, 1, 1]), ValueError, r"lengths\[1\] = -1 < 0"),
    "lengths count": (lambda m, x: m(x, lengths=[T, 1]), ValueError, "lengths has 2 entries"),
    "features": (lambda m, x: m(x[..., :2]), ValueError, "input has 2 features"),
    "input dtype": (lambda m, x: m(x.double()), ValueError, r"input dtype \(torch.float64\) does not match"),
    "state shape": (lambda m, x: m(x, torch.zeros(2, B + 1, H)), ValueError, r"h_0 has shape \(2, 5, 5\)"),
}  # fmt: skip


@pytest.mark.parametrize("error", list(ERRORS))
@pytest.mark.parametrize("backend", ["reference", *_backends()])
def test_errors_are_the_same_on_every_backend(backend: str, error: str) -> None:
    call, kind, message = ERRORS[error]
    module = rnnkit.GRU(I, H, num_layers=2, backend=backend)
    with pytest.raises(kind, match=message):
        call(module, torch.randn(T, B, I))
