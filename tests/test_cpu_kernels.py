"""The cpu backend's fused C++ kernels: the two custom ops themselves and what the backend adds to
the layers. Parity of whole layers with the reference backend (outputs, states, gates, every
gradient, every cell, direction, stack, lengths pattern and regulariser) is the conformance
suite's (tests/test_conformance.py); here:

* the ops in float64, for every cell (projected and peephole variants included), direction,
  lengths pattern, bias and in-kernel regulariser (state dropout; zoneout in training and eval):
  ``torch.autograd.gradcheck`` of the hand-written backward and ``torch.library.opcheck`` of the
  registration (schema, fake kernel, autograd), for one direction and for both at once (shared
  input or one per direction);
* every argument the op entries check: a bad one is an error that names it;
* determinism, no_grad / inference_mode, row passes split across threads, torch.compile with
  fullgraph, what the backend accepts and declines (explain), the build's sources and jobs, and
  the fallback without a compiler.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from conftest import OUT_TOL
from torch.utils._pytree import tree_leaves

import rnnkit
from rnnkit.backends import Request
from rnnkit.backends import cpu as cpu_backend
from rnnkit.backends.cpu import CpuBackend, build, dispatch, ops
from rnnkit.backends.cpu import gemm as cpu_gemm
from rnnkit.cells.table import BIASES, PROJECTION, SPECS

T, B, I, H = 7, 5, 4, 6
# Right-padded lengths with a 0, a 1 and a full-length T, in no particular order.
MIXED = [3, T, 0, 1, 5]


@pytest.fixture(scope="module", autouse=True)
def kernels():
    reason = build.unavailable()
    if reason is not None:
        pytest.skip(f"the C++ kernels are unavailable: {reason}")


# -- the ops' arguments, from the cell table -----------------------------------------------------

GC_T, GC_B, GC_I, GC_H, GC_P = 4, 3, 2, 3, 2
GC_LENGTHS = [3, 0, 4]
#: The kernels' cells: a mode of the cell table and whether it is projected.
KERNELS = {
    "rnn_tanh": ("rnn_tanh", False),
    "rnn_relu": ("rnn_relu", False),
    "lstm": ("lstm", False),
    "lstm-proj": ("lstm", True),
    "gru": ("gru", False),
    "lstm_peephole": ("lstm_peephole", False),
    "lstm_peephole-proj": ("lstm_peephole", True),
    "lstm_layernorm": ("lstm_layernorm", False),
    "gru_layernorm": ("gru_layernorm", False),
}


def _shape(name: str, gates: int, state: int) -> tuple[int, ...]:
    return {
        "weight_ih": (gates, GC_I),
        "weight_hh": (gates, state),
        "weight_hr": (GC_P, GC_H),
        "weight_ci": (GC_H,),
        "weight_cf": (GC_H,),
        "weight_co": (GC_H,),
        "ln_c.weight": (GC_H,),
        "ln_c.bias": (GC_H,),
    }.get(name, (gates,))


def direction(kernel: str, bias: bool = True, regularisers: str = "off", seed: int = 5):
    """One direction's ``x, states, weights, masks`` for ``kernel``, random float64, every
    tensor that is given requiring grad; an absent weight or mask is an empty tensor.
    ``regularisers``: "off", "train" (a state dropout mask and 0/1 zoneout masks per step) or
    "eval" (zoneout's probabilities)."""
    mode, proj = KERNELS[kernel]
    spec = SPECS[mode]
    g = torch.Generator().manual_seed(seed)
    f64 = {"dtype": torch.float64}
    state = GC_P if proj else GC_H
    gates = spec.gate_count * GC_H
    empty = torch.empty(0, **f64)

    def rand(*shape, shift=0.0):
        return (torch.randn(*shape, generator=g, **f64) + shift).requires_grad_()

    x = rand(GC_T, GC_B, GC_I)
    if mode == "rnn_relu":  # keep pre-activations away from relu's kink
        with torch.no_grad():
            x.add_(0.05 * torch.sign(x))
    states = [rand(GC_B, state), *([rand(GC_B, GC_H)] if spec.has_cell_state else [])]
    weights = []
    for name in spec.weights:
        if (name in BIASES and not bias) or (name == PROJECTION and not proj):
            weights.append(empty)
        else:  # LayerNorm gains about 1
            gain = name.startswith("ln_") and name.endswith("weight")
            weights.append(rand(*_shape(name, gates, state), shift=1.0 if gain else 0.0))
    sizes = (state, GC_H) if spec.has_cell_state else (state,)
    zones = [empty, empty]
    mask = empty
    if regularisers == "train":
        mask = (torch.rand(GC_B, state, generator=g, **f64) < 0.7).double() / 0.7
        for k, n in enumerate(sizes):
            zones[k] = (torch.rand(GC_T, GC_B, n, generator=g, **f64) < 0.4).double()
    elif regularisers == "eval":
        for k, (n, p) in enumerate(zip(sizes, (0.3, 0.6), strict=False)):
            zones[k] = torch.full((n,), p, **f64)
    return x, states, weights, [mask, *zones]


def op_args(kernel: str, reverse, lengths=None, bias=True, regularisers=("off",), own=False):
    """layer_forward's arguments for one direction (``reverse`` a bool) or several (a list),
    saving for backward. ``own``: each direction reads its own input, else they share one."""
    mode, _ = KERNELS[kernel]
    reverse = [reverse] if isinstance(reverse, bool) else list(reverse)
    inputs, states, weights, masks = [], [], [], []
    for d in range(len(reverse)):
        x, s, w, m = direction(kernel, bias, regularisers[d % len(regularisers)], seed=5 + d)
        if d == 0 or own:
            inputs.append(x)
        states += s
        weights += w
        masks += m
    lens = None if lengths is None else torch.tensor(lengths)
    return [inputs, states, weights, masks, lens, SPECS[mode].kernel_id, reverse, 1e-5, True]


def differentiable(args) -> list[torch.Tensor]:
    return [t for group in args[:3] for t in group if t.numel()]


def gradcheck(args, fast: bool = False, op=ops.layer_forward) -> None:
    """gradcheck of every output and final state w.r.t. every input, state and weight (``fast``:
    of random projections of them, gradcheck's fast mode), through ``op`` (the custom op, or the
    eager path the layers take)."""
    tensors = differentiable(args)
    spec = SPECS[KERNELS_BY_ID[args[5]]]
    per = 1 + len(spec.states) + len(ops.SAVED)
    keep = [k for d in range(len(args[6])) for k in range(d * per, d * per + 1 + len(spec.states))]

    def f(*given):
        it = iter(given)
        groups = [[next(it) if t.numel() else t for t in group] for group in args[:3]]
        r = op(*groups, *args[3:])
        return tuple(r[k] for k in keep)

    assert torch.autograd.gradcheck(f, tensors, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=fast)


KERNELS_BY_ID = {s.kernel_id: m for m, s in SPECS.items()}


# -- gradcheck and opcheck in float64 ------------------------------------------------------------


@pytest.mark.parametrize("regularisers", ["off", "train", "eval"])
@pytest.mark.parametrize("lengths", [None, GC_LENGTHS], ids=["full", "lengths"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_gradcheck_one_direction(kernel, reverse, lengths, regularisers):
    gradcheck(op_args(kernel, reverse, lengths, regularisers=(regularisers,)))


@pytest.mark.parametrize(
    ("lengths", "regularisers"),
    [(None, "off"), (GC_LENGTHS, "off"), (GC_LENGTHS, "train"), (None, "eval")],
    ids=["full", "lengths", "lengths-train", "full-eval"],
)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_steps_split_by_batch_equal_the_threaded_steps(kernel, reverse, lengths, regularisers):
    """The steps run on one slice of the batch per thread (split: 3 sequences as 2 and 1; with
    lengths one of them is empty) give what every step threaded gives: outputs, final states and
    every gradient, with regularisers; and gradcheck holds on the split path."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        args = op_args(kernel, reverse, lengths, regularisers=(regularisers,))
        tensors = differentiable(args)
        spec = SPECS[KERNELS_BY_ID[args[5]]]
        results = []
        for split in (False, True):
            r = ops.layer_forward(*args, 0, 0, False, split)
            values = r[: 1 + len(spec.states)]
            loss = sum((v * v.detach().cos()).sum() for v in values)
            results.append(values + list(torch.autograd.grad(loss, tensors)))
        for a, b in zip(*results, strict=True):
            torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-12)
        gradcheck([*args, 0, 0, False, True], fast=True)
    finally:
        torch.set_num_threads(before)


def test_rnnkit_split_forces_the_schedule_and_names_a_bad_value(monkeypatch):
    module = rnnkit.GRU(I, H, backend="cpu")
    x = torch.randn(T, B, I)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setenv(cpu_gemm.SPLIT_ENV, "on")
        assert "steps split by batch" in str(rnnkit.explain(module, x))
        monkeypatch.setenv(cpu_gemm.SPLIT_ENV, "off")
        assert "steps split by batch" not in str(rnnkit.explain(module, x))
        monkeypatch.setenv(cpu_gemm.SPLIT_ENV, "sometimes")
        with pytest.raises(ValueError, match=r"RNNKIT_SPLIT = 'sometimes'; expected auto, on or"):
            module(x)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_gradcheck_of_the_eager_path(kernel):
    # what eager layers call: the C++ ops under a plain autograd.Function
    args = op_args(kernel, [False, True], GC_LENGTHS, regularisers=("train", "eval"))
    gradcheck(args, op=ops.eager_layer_forward)


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_eager_path_equals_the_custom_op(kernel):
    args = op_args(kernel, [False, True], GC_LENGTHS, regularisers=("train", "eval"), own=True)
    results = []
    for op in (ops.layer_forward, ops.eager_layer_forward):
        tensors = differentiable(args)
        for t in tensors:
            t.grad = None
        out = op(*args)
        torch.manual_seed(0)
        sum(o.sum() * (k + 1) for k, o in enumerate(out) if o.requires_grad).backward()
        results.append([*out, *(t.grad for t in tensors)])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("op", [ops.layer_forward, ops.eager_layer_forward], ids=["op", "eager"])
def test_a_second_derivative_raises_and_first_ones_stay_exact(op):
    # the hand-written backward has no derivative: under create_graph=True its gradients are
    # linked to the graph by a node that raises, never entered as constants (which would leave
    # the layer's part out of a second derivative without a word)
    args = op_args("gru", [False, True], GC_LENGTHS, regularisers=("train", "eval"))
    x = args[0][0]

    def first(create_graph: bool):
        out = op(*args)
        # a skip connection: the second derivative has a part that does not cross the layer
        loss = (out[0].sum() + x.pow(3).sum()).pow(2) + out[1].square().sum()
        return torch.autograd.grad(loss, differentiable(args), create_graph=create_graph)

    plain, linked = first(False), first(True)
    for a, b in zip(plain, linked, strict=True):
        assert torch.equal(a, b) and not a.requires_grad and b.requires_grad
    with pytest.raises(RuntimeError, match=r"^a second derivative through rnnkit's C\+\+ CPU"):
        torch.autograd.grad(linked[0].sum(), x)


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_gradcheck_without_bias(kernel):
    gradcheck(op_args(kernel, True, GC_LENGTHS, bias=False))


@pytest.mark.parametrize("own", [False, True], ids=["shared-input", "own-inputs"])
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_gradcheck_both_directions(kernel, own):
    """Both directions in one call, each on its own thread (the cell's math is checked in full
    above; fast mode keeps the thread start per call affordable)."""
    regularisers = ("train", "eval") if own else ("off",)
    args = op_args(kernel, [False, True], GC_LENGTHS, regularisers=regularisers, own=own)
    gradcheck(args, fast=True)


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_opcheck(kernel):
    torch.library.opcheck(ops.layer_forward, op_args(kernel, True, GC_LENGTHS, bias=False))
    both = op_args(kernel, [False, True], GC_LENGTHS, regularisers=("train", "eval"), own=True)
    torch.library.opcheck(ops.layer_forward, both)


def test_backward_without_saving_says_why():
    args = op_args("gru", False)
    args[-1] = False
    out = ops.layer_forward(*args)[0]
    with pytest.raises(RuntimeError, match="ran with save=False"):
        out.sum().backward()


# -- the op entries check every argument ---------------------------------------------------------


def gru_args(**change):
    """layer_forward's arguments for a GRU (T 3, B 2, I 8, H 16) in float64, keyword by keyword
    (w_ih, w_hh, b_ih, b_hh: the four weights), with some replaced."""
    f = {"dtype": torch.float64}
    args = {
        "x": torch.randn(3, 2, 8, **f),
        "h0": torch.zeros(2, 16, **f),
        "c0": None,
        "w_ih": torch.randn(48, 8, **f),
        "w_hh": torch.randn(48, 16, **f),
        "b_ih": torch.randn(48, **f),
        "b_hh": torch.randn(48, **f),
        "w_hr": None,
        "lengths": None,
        "kernel_id": SPECS["gru"].kernel_id,
    }
    args.update(change)
    empty = torch.empty(0, dtype=torch.float64)
    names = ("w_ih", "w_hh", "b_ih", "b_hh", "w_hr")  # the GRU's four, the LSTM's five
    count = 5 if args["kernel_id"] == SPECS["lstm"].kernel_id or args["w_hr"] is not None else 4
    weights = [args[k] if args[k] is not None else empty for k in names[:count]]
    states = [args["h0"], *([args["c0"]] if args["c0"] is not None else [])]
    masks = [empty] * 3
    return [[args["x"]], states, weights, masks, args["lengths"], args["kernel_id"], [False], 0.0,
            True]  # fmt: skip


def _lstm(**change):
    f = {"dtype": torch.float64}
    return {"kernel_id": SPECS["lstm"].kernel_id, "w_ih": torch.randn(64, 8, **f),
            "w_hh": torch.randn(64, 16, **f), "b_ih": None, "b_hh": None, **change}  # fmt: skip


BAD_ARGUMENTS = {
    "w_ih float32": ({"w_ih": torch.randn(48, 8)}, "w_ih has dtype Float; expected Double"),
    "w_hh float32": ({"w_hh": torch.randn(48, 16)}, "w_hh has dtype Float; expected Double"),
    "h0 float32": ({"h0": torch.zeros(2, 16)}, "h0 has dtype Float; expected Double"),
    "bias float32": ({"b_hh": torch.randn(48)}, "b_hh has dtype Float"),
    "bias short": ({"b_ih": torch.randn(47, dtype=torch.float64)}, r"b_ih has shape \[47\]"),
    "one bias": ({"b_hh": None}, "b_ih and b_hh: expected both or neither"),
    "rows not 3H": ({"w_ih": torch.randn(47, 8, dtype=torch.float64)}, "G = 47 rows; expected a"),
    "w_hh columns": (
        {"w_hh": torch.randn(48, 15, dtype=torch.float64)},
        r"w_hh has shape \[48, 15\]",
    ),
    "h0 batch": ({"h0": torch.zeros(3, 16, dtype=torch.float64)}, r"h0 has shape \[3, 16\]"),
    "c0 for a GRU": (
        {"c0": torch.zeros(2, 16, dtype=torch.float64)},
        "states has 2 tensors; expected 1: h0 per direction for the GRU",
    ),
    "lstm without c0": (_lstm(), "states has 1 tensors; expected 2: h0 and c0 per direction"),
    "lstm c0 short": (
        _lstm(c0=torch.zeros(2, 15, dtype=torch.float64)),
        r"c0 has shape \[2, 15\]; expected \(B, H\)",
    ),
    "projection on a GRU": (
        {"w_hr": torch.randn(4, 16, dtype=torch.float64)},
        "weights has 5 tensors; expected 4: the 4 weights per direction of the GRU",
    ),
    "no such kernel": ({"kernel_id": 9}, "kernel_id = 9; expected a kernel_id of the cell table"),
    "lengths float": ({"lengths": torch.tensor([3.0, 1.0])}, "lengths has shape"),
    "lengths too long": ({"lengths": torch.tensor([3, 4])}, r"lengths\[1\] = 4; expected 0 <= len"),
    "x int": ({"x": torch.zeros(3, 2, 8, dtype=torch.int64)}, "x has dtype Long"),
    "x 2-D": ({"x": torch.zeros(3, 8, dtype=torch.float64)}, r"x has shape \[3, 8\]"),
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_layer_forward_names_a_bad_argument(case):
    change, message = BAD_ARGUMENTS[case]
    with pytest.raises(RuntimeError, match=message):
        ops.layer_forward(*gru_args(**change))


def test_layer_forward_checks_the_layernorm_weights_masks_and_directions():
    args = op_args("gru_layernorm", False, GC_LENGTHS)
    with torch.no_grad():
        bad = [list(a) if isinstance(a, list) else a for a in args]
        bad[2][6] = bad[2][6][:-1]  # ln_hh.weight
        with pytest.raises(RuntimeError, match=r"ln_hh_w has shape \[8\]; expected \(G\) = \[9\]"):
            ops.layer_forward(*bad)
        bad = [list(a) if isinstance(a, list) else a for a in args]
        bad[2][7] = torch.empty(0, dtype=torch.float64)  # ln_hh.bias
        with pytest.raises(RuntimeError, match="ln_hh_b is missing; the LayerNorm GRU needs it"):
            ops.layer_forward(*bad)
        bad = [list(a) if isinstance(a, list) else a for a in args]
        bad[3][0] = torch.ones(GC_B, GC_H + 1, dtype=torch.float64)  # state_mask
        with pytest.raises(RuntimeError, match=r"state_mask has shape \[3, 4\]"):
            ops.layer_forward(*bad)
        bad = [list(a) if isinstance(a, list) else a for a in args]
        bad[3] = bad[3][:2]
        with pytest.raises(RuntimeError, match="masks has 2 tensors; expected 3"):
            ops.layer_forward(*bad)
        bad = [list(a) if isinstance(a, list) else a for a in args]
        bad[6] = [False, True]
        with pytest.raises(RuntimeError, match="states has 1 tensors; expected 2"):
            ops.layer_forward(*bad)
        bad = [list(a) if isinstance(a, list) else a for a in args]
        bad[7] = -1.0
        with pytest.raises(RuntimeError, match="eps = -1; expected eps >= 0"):
            ops.layer_forward(*bad)


def test_layer_backward_checks_gradients_and_saved_tensors():
    args = gru_args()
    r = ops.layer_forward(*args)
    out, saved = r[0], r[2:]
    common = {
        "inputs": args[0], "states": args[1], "weights": args[2], "masks": args[3],
        "lengths": None, "kernel_id": args[5], "reverse": [False], "eps": 0.0, "need_dx": True,
    }  # fmt: skip
    good = ops.layer_backward([torch.ones_like(out), None], saved=saved, **common)
    assert good[0].shape == args[0][0].shape
    assert [t.shape for t in good[2:]] == [t.shape for t in args[2]]
    with pytest.raises(RuntimeError, match="grad_out has dtype Float; expected Double"):
        ops.layer_backward([torch.ones(out.shape), None], saved=saved, **common)
    with pytest.raises(RuntimeError, match=r"grad_hn has shape \[2, 15\]"):
        ops.layer_backward([None, torch.ones(2, 15, dtype=torch.float64)], saved=saved, **common)
    act = saved[ops.SAVED.index("act")]
    with pytest.raises(RuntimeError, match=r"act has shape"):
        ops.layer_backward([torch.ones_like(out), None], saved=[act[1:], *saved[1:]], **common)
    with pytest.raises(RuntimeError, match="act has dtype Float"):
        ops.layer_backward([torch.ones_like(out), None], saved=[act.float(), *saved[1:]], **common)
    c = ops.SAVED.index("c")
    extra = [*saved[:c], torch.ones(3, 2, 16, dtype=torch.float64), *saved[c + 1 :]]
    with pytest.raises(RuntimeError, match=r"c has shape \[3, 2, 16\]; expected \(0\)"):
        ops.layer_backward([torch.ones_like(out), None], saved=extra, **common)
    with pytest.raises(RuntimeError, match="saved has 8 tensors; expected 9"):
        ops.layer_backward([torch.ones_like(out), None], saved=saved[:-1], **common)
    empty = [torch.empty(0, dtype=torch.float64)] * len(saved)
    with pytest.raises(RuntimeError, match="the forward was run without saving for backward"):
        ops.layer_backward([torch.ones_like(out), None], saved=empty, **common)


# -- behaviour -----------------------------------------------------------------------------------

MODES = tuple(SPECS)


def layer(mode: str, num_layers: int = 2, cell_kw: dict | None = None, **kw) -> torch.nn.Module:
    """A bidirectional stack of ``mode`` cells (built with ``cell_kw``), num_layers deep."""
    torch.manual_seed(0)
    cell = getattr(rnnkit, SPECS[mode].cell)
    extra = {"nonlinearity": mode[4:]} if mode.startswith("rnn_") else {}
    extra |= cell_kw or {}

    def bidirectional(size: int) -> rnnkit.Bidirectional:
        return rnnkit.Bidirectional(
            rnnkit.Recurrent(cell(size, H, **extra), **kw),
            rnnkit.Recurrent(cell(size, H, **extra), reverse=True, **kw),
        )

    return rnnkit.Stacked(
        [bidirectional(I), *(bidirectional(2 * H) for _ in range(num_layers - 1))]
    )


def run(module, backend: str, x, lengths):
    """Outputs, final states and the gradients of a fixed loss w.r.t. x and every parameter."""
    with rnnkit.use_backend(backend):
        out, final = module(x, lengths=lengths)
    values = [out, *tree_leaves(final)]
    loss = sum((v * v.detach().cos()).sum() for v in values)
    return values + list(torch.autograd.grad(loss, [x, *module.parameters()]))


@pytest.mark.parametrize("mode", MODES)
def test_deterministic(mode):
    module = layer(mode)
    x = torch.randn(T, B, I, generator=torch.Generator().manual_seed(3), requires_grad=True)
    first, second = run(module, "cpu", x, MIXED), run(module, "cpu", x, MIXED)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode", MODES)
def test_row_passes_split_across_threads_equal_reference(mode):
    """A batch and width large enough that the per-row passes and the column sums run in several
    chunks with two threads; float64, so only a wrong split could differ."""
    torch.manual_seed(0)
    cell = getattr(rnnkit, SPECS[mode].cell)
    module = rnnkit.Recurrent(cell(3, 64, dtype=torch.float64), reverse=True)
    x = torch.randn(4, 300, 3, dtype=torch.float64, requires_grad=True)
    lengths = torch.randint(0, 5, (300,), generator=torch.Generator().manual_seed(1))
    reference = run(module, "reference", x, lengths)
    for r, c in zip(reference, run(module, "cpu", x, lengths), strict=True):
        torch.testing.assert_close(c, r, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("mode", MODES)
def test_no_grad_and_inference_mode(mode):
    module = layer(mode)
    x = torch.randn(T, B, I)
    with rnnkit.use_backend("reference"), torch.no_grad():
        expected = module(x, lengths=MIXED)[0]
    with rnnkit.use_backend("cpu"):
        with torch.no_grad():
            out = module(x, lengths=MIXED)[0]
        assert not out.requires_grad
        torch.testing.assert_close(out, expected, atol=OUT_TOL, rtol=OUT_TOL)
        with torch.inference_mode():
            out = module(x, lengths=MIXED)[0]
        torch.testing.assert_close(out, expected, atol=OUT_TOL, rtol=OUT_TOL)


def test_layernorm_eps_reaches_the_kernel():
    module = layer("gru_layernorm", 1, cell_kw={"eps": 0.5})
    x = torch.randn(T, B, I)
    outs = {}
    for backend in ("reference", "cpu"):
        with rnnkit.use_backend(backend), torch.no_grad():
            outs[backend] = module(x, lengths=MIXED)[0]
    torch.testing.assert_close(outs["cpu"], outs["reference"], atol=OUT_TOL, rtol=OUT_TOL)


@pytest.mark.parametrize("lengths", [None, MIXED], ids=["full", "lengths"])
@pytest.mark.parametrize("mode", ["rnn_tanh", "lstm", "gru", "lstm_layernorm", "gru_layernorm"])
def test_nan_and_infinite_inputs_give_the_reference_results(mode, lengths):
    """A NaN in the input makes the activations of its sequence NaN from its step on, as on the
    reference backend, and infinities saturate the gates; the float32 exponential the kernels
    use for sigmoid and tanh stays defined on NaN (a build with UndefinedBehaviorSanitizer,
    RNNKIT_CPU_SANITIZE=1, reported converting it to an integer)."""
    module = layer(mode, 1)
    x = torch.randn(T, B, I)
    x[1, 0, 2] = float("nan")
    x[4, 1, 0] = float("inf")
    x[2, 4, 1] = -float("inf")
    results = {}
    for backend in ("reference", "cpu"):
        results[backend] = run(module, backend, x.clone().requires_grad_(), lengths)
    for got, expected in zip(results["cpu"], results["reference"], strict=True):
        assert torch.equal(got.isnan(), expected.isnan())
        torch.testing.assert_close(got, expected, atol=OUT_TOL, rtol=OUT_TOL, equal_nan=True)


COMPILED = {
    "gru": lambda: rnnkit.GRU(I, H, 2, bidirectional=True),
    "lstm_layernorm": lambda: layer("lstm_layernorm", 1),
    "lstm-zoneout": lambda: rnnkit.LSTM(I, H, 2, bidirectional=True, zoneout=0.2).eval(),
    "lstm_peephole-zoneout": lambda: rnnkit.Recurrent(
        rnnkit.PeepholeLSTMCell(I, H), reverse=True, zoneout=0.2, zoneout_cell=0.4
    ).eval(),
}


@pytest.mark.parametrize("case", list(COMPILED))
def test_torch_compile_fullgraph(case):
    torch.manual_seed(0)
    module = COMPILED[case]()
    x = torch.randn(T, B, I, requires_grad=True)
    with rnnkit.use_backend("cpu"):
        expected = module(x)[0]
        out = torch.compile(module, fullgraph=True, backend="aot_eager")(x)[0]
    torch.testing.assert_close(out, expected, atol=OUT_TOL, rtol=OUT_TOL)
    (dx,) = torch.autograd.grad(out.sum(), [x])
    (want,) = torch.autograd.grad(expected.sum(), [x])
    torch.testing.assert_close(dx, want, atol=OUT_TOL, rtol=OUT_TOL)


# -- what the backend accepts and declines -------------------------------------------------------


@pytest.fixture
def lstm_measured_slower(monkeypatch):
    """A crossover table in which torch's LSTM measured faster at one shape near (T, B, I, H)
    and the kernels faster at a larger one."""
    table = {
        ("lstm", False, "fp32", grad): (
            dispatch.Point(T, B, I, H, 0.8),
            dispatch.Point(200, 64, 256, 512, 1.3),
        )
        for grad in (False, True)
    }
    monkeypatch.setattr(dispatch, "MEASURED", table)


def test_explain_reports_cpu_for_every_cell(lstm_measured_slower):
    x = torch.randn(T, B, I)
    for mode in MODES:
        assert rnnkit.explain(layer(mode), x, lengths=MIXED).backend == "cpu", mode
        plain = rnnkit.explain(layer(mode), x)
        if mode == "lstm":  # torch's fused LSTM measured faster at this shape
            assert plain.backend == "native" and "measured faster for lstm" in plain.reason
        else:
            assert plain.backend == "cpu", f"{mode}: {plain}"
    lstm = rnnkit.LSTM(I, H, proj_size=3)
    assert rnnkit.explain(lstm, x).backend == "cpu"
    regularised = rnnkit.GRU(I, H, 2, bidirectional=True, zoneout=0.2, dropout_state=0.3).eval()
    request = regularised.dispatch_requests(x, MIXED)[0][1]
    assert request.zoneout and not (request.state_dropout or request.variational)
    assert rnnkit.explain(regularised, x, lengths=MIXED).backend == "cpu"


def test_plain_lstm_runs_when_forced_and_names_where_onednn_is_faster(lstm_measured_slower):
    backend = CpuBackend()
    request = rnnkit.LSTM(I, H, 2, bidirectional=True).dispatch_requests(torch.randn(T, B, I))
    reason = backend.slower(request[0][1])
    assert f"nearest measured shape (T{T} B{B} I{I} H{H}: the cpu kernels at 0.80x" in reason
    assert backend.slower(Request(mode="lstm", gates=True)) is None
    forced = rnnkit.LSTM(I, H, backend="cpu")
    assert rnnkit.explain(forced, torch.randn(T, B, I)).backend == "cpu"
    forced(torch.randn(T, B, I))


def test_dispatch_follows_the_nearest_measured_shape(lstm_measured_slower):
    backend = CpuBackend()

    def request(t, b, i, h, **kw):
        return Request(mode="lstm", steps=t, batch=b, input_size=i, hidden_size=h, **kw)

    assert backend.slower(request(T, B, I, H)) is not None
    assert backend.slower(request(150, 48, 200, 400)) is None  # nearer the faster point
    assert backend.slower(request(T, B, I, H, lengths="positive")) is None  # not measured
    assert backend.slower(request(T, B, I, H, zoneout=True)) is None  # torch's op cannot run it
    assert backend.slower(request(T, B, I, H, requires_grad=True)) is not None
    point = dispatch.nearest("lstm", False, "fp32", True, (180, 60, 256, 500))
    assert point is not None and point.ratio == 1.3
    assert dispatch.nearest("gru", True, "bf16", True, (T, B, I, H)) is None


def test_bf16_dispatch_reads_the_points_of_the_step_source(monkeypatch):
    # bf16 was measured twice: with MKL's GEMMs alone and with oneDNN's packed bf16 step
    table = {
        ("gru", False, "bf16", True): (dispatch.Point(T, B, I, H, 0.7),),
        ("gru", False, "bf16-onednn", True): (dispatch.Point(T, B, I, H, 1.4),),
    }
    monkeypatch.setattr(dispatch, "MEASURED", table)
    monkeypatch.setattr(cpu_gemm, "bf16_supported", lambda: True)
    request = Request(
        mode="gru", steps=T, batch=B, input_size=I, hidden_size=H, requires_grad=True,
        dtype=torch.bfloat16,
    )  # fmt: skip
    backend = CpuBackend()
    for step, slower in (("mkl", True), ("onednn", False)):
        plan = cpu_gemm.Plan(step, "mkl", True, "test")
        monkeypatch.setattr(cpu_backend, "gemm_plan", lambda request, plan=plan: plan)
        reason = backend.slower(request)
        assert (reason is not None) == slower, (step, reason)
        if slower:
            assert "measured faster for gru bf16 training" in reason


def test_accepts_every_cell_and_option_and_declines_the_rest():
    backend = CpuBackend()
    every = {"zoneout": True, "state_dropout": True, "variational": True, "gates": True}
    for mode in MODES:
        for options in ({}, *({k: True} for k in every), every):
            for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
                assert backend.check(Request(mode=mode, dtype=dtype, **options)) is None
        assert "int32" in backend.check(Request(mode=mode, dtype=torch.int32))
        assert "cuda" in backend.check(Request(mode=mode, device_type="cuda"))
    assert backend.check(Request(mode="lstm_peephole", proj=True)) is None
    assert "custom cell" in backend.check(Request(mode=None))


def test_every_source_is_compiled_and_every_header_keys_the_cache():
    here = build.SOURCES[0].parent
    assert set(build.SOURCES) == set(here.glob("*.cpp"))
    assert set(build.HEADERS) == set(here.glob("*.h"))


def test_the_build_runs_one_compiler_per_cpu_unless_max_jobs_is_set(monkeypatch):
    monkeypatch.delenv("MAX_JOBS", raising=False)
    with build._max_jobs():
        assert int(os.environ["MAX_JOBS"]) == build._jobs() >= 1
    assert "MAX_JOBS" not in os.environ
    monkeypatch.setenv("MAX_JOBS", "7")
    with build._max_jobs():
        assert os.environ["MAX_JOBS"] == "7"
    assert os.environ["MAX_JOBS"] == "7"


def test_without_compiler_warns_once_and_declines(monkeypatch):
    monkeypatch.setattr(build, "_loaded", False)
    monkeypatch.setattr(build, "_failure", None)
    monkeypatch.setattr(build, "_compiler", lambda: None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = build.unavailable()
        second = build.unavailable()
    assert first == second and "no C++ compiler" in first
    assert len(caught) == 1
    assert CpuBackend().check(Request(mode="gru")) == first


def test_the_callers_subnormal_arithmetic_is_left_as_it_was():
    # The kernels flush subnormals to zero while they run and restore the thread's setting after:
    # torch's own arithmetic in the same thread still produces subnormals.
    tiny = torch.finfo(torch.float32).tiny
    layer = rnnkit.GRU(4, 8, backend="cpu")
    x = torch.randn(3, 2, 4, requires_grad=True)
    out, _ = layer(x)
    out.sum().backward()
    subnormal = torch.tensor(tiny) / 16
    assert 0 < subnormal.item() < tiny


@pytest.mark.slow
def test_a_first_call_leaves_the_pools_threads_with_ieee_arithmetic():
    # A fresh process whose first parallel region runs inside a kernel call (GEMM sources and
    # schedule forced: nothing measured before it): the pool's threads, created then, must not
    # copy the flushing the call sets on its own thread.
    script = textwrap.dedent(
        """
        import torch, rnnkit
        torch.set_num_threads(2)
        layer = rnnkit.GRU(16, 16, backend="cpu")
        out, _ = layer(torch.randn(5, 64, 16, requires_grad=True))
        out.sum().backward()
        x = torch.full((1 << 22,), torch.finfo(torch.float32).tiny / 16)
        print(int(((x * 1) != 0).sum()), x.numel())
        """
    )
    env = {**os.environ, "RNNKIT_GEMM": "mkl", "RNNKIT_SPLIT": "off", "OMP_NUM_THREADS": "2"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    kept, total = map(int, done.stdout.split())
    assert kept == total


def _subnormal_results(x: torch.Tensor) -> int:
    """How many elements of x * 1 stay subnormal: a parallel op, every thread of the pool takes a
    part."""
    return int(((x * 1.0) != 0).sum())


def test_flush_denormals_without_the_kernels_returns_and_restores_the_threads_setting(
    monkeypatch,
):
    """Where the kernels cannot be built, the calling thread alone is set, and what it did before
    comes back, so that denormals_flushed restores it."""
    monkeypatch.setattr(build, "unavailable", lambda: "no C++ compiler (simulated)")
    tiny = torch.full((1,), torch.finfo(torch.float32).tiny)

    def flushing() -> bool:
        return bool(tiny * 0.5 == 0)

    before = flushing()
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush subnormals")
    try:
        assert cpu_backend.flush_denormals(False) is True
        assert not flushing()
        assert cpu_backend.flush_denormals(True) is False
        assert flushing()
        for setting in (True, False):
            torch.set_flush_denormal(setting)
            with cpu_backend.denormals_flushed():
                assert flushing()
            assert flushing() is setting
    finally:
        torch.set_flush_denormal(before)


def test_flush_denormals_reaches_every_thread_of_the_pool_and_restores():
    if build.unavailable() is not None:
        pytest.skip("the C++ kernels are unavailable")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.full((1 << 22,), torch.finfo(torch.float32).tiny / 16)
        assert _subnormal_results(x) == x.numel()
        torch.set_flush_denormal(True)  # the calling thread alone: the other thread's part stays
        partly = _subnormal_results(x)
        torch.set_flush_denormal(False)
        before = cpu_backend.flush_denormals(True)
        flushed = _subnormal_results(x)
        was_on = cpu_backend.flush_denormals(before)
        assert (before, was_on) == (False, True)
        assert flushed == 0
        assert _subnormal_results(x) == x.numel()  # IEEE arithmetic again on every thread
        if torch.get_num_threads() > 1 and os.cpu_count() and os.cpu_count() > 1:
            assert 0 < partly < x.numel()  # what flush_denormals adds to torch's own setting
    finally:
        cpu_backend.flush_denormals(False)
        torch.set_num_threads(threads)
