"""The cpu backend's LayerNorm LSTM and GRU kernels equal the reference backend: outputs, final
states and every gradient (input, initial states, weights, LayerNorm gains and biases), through
Recurrent, Bidirectional and Stacked, with and without lengths and initial states; gradcheck and
opcheck in float64 through the custom op; no_grad; explain; what check accepts; gate outputs,
variational dropout, and zoneout and state dropout inside the kernels (same seed, same masks)."""

from __future__ import annotations

import pytest
import torch
from conftest import GRAD_TOL, OUT_TOL
from torch.utils._pytree import tree_leaves

import rnnkit
from rnnkit.backends.cpu import CpuBackend, build, layernorm
from rnnkit.cells import LayerNormGRUCell, LayerNormLSTMCell

CELLS = {"lstm_layernorm": LayerNormLSTMCell, "gru_layernorm": LayerNormGRUCell}
T, B, I, H = 7, 5, 4, 6
# Right-padded lengths with a 0, a 1 and a full-length T, in no particular order.
LENGTHS = {"none": None, "mixed": [3, T, 0, 1, 5]}


@pytest.fixture(scope="module", autouse=True)
def kernels():
    reason = build.unavailable()
    if reason is not None:
        pytest.skip(f"the C++ kernels are unavailable: {reason}")


def make_cell(mode: str, input_size: int, **kw) -> torch.nn.Module:
    """A cell with LayerNorm gains about 0.5 and every other parameter perturbed, so each
    gain and bias gets a distinct gradient.

    The recurrent LayerNorm rescales W_hh h_{t-1} to unit variance, so with gains near 1 the step
    can amplify a rounding error several-fold: at T = 7 the reference's own fp32 gradients then
    stray from float64 by more than GRAD_TOL. With gains about 0.5 both fp32 results stay within
    a quarter of the tolerances of float64 (measured over every case below).
    """
    cell = CELLS[mode](input_size, H, **kw)
    with torch.no_grad():
        for name, p in cell.named_parameters():
            if name.startswith("ln_") and name.endswith("weight"):
                p.mul_(0.5).add_(0.1 * torch.randn_like(p))
            else:
                p.add_(0.2 * torch.randn_like(p))
    return cell


def make_layer(mode: str, direction: str, num_layers: int, **kw) -> torch.nn.Module:
    """Recurrent (forward or reverse) or Bidirectional, stacked num_layers deep."""
    torch.manual_seed(0)

    def one(input_size: int) -> torch.nn.Module:
        if direction == "bi":
            return rnnkit.Bidirectional(
                rnnkit.Recurrent(make_cell(mode, input_size, **kw)),
                rnnkit.Recurrent(make_cell(mode, input_size, **kw), reverse=True),
            )
        return rnnkit.Recurrent(make_cell(mode, input_size, **kw), reverse=direction == "reverse")

    if num_layers == 1:
        return one(I)
    width = 2 * H if direction == "bi" else H
    return rnnkit.Stacked([one(I), *(one(width) for _ in range(num_layers - 1))])


def initial_state(mode: str, direction: str, num_layers: int):
    """A random state in the layer's structure, every tensor requiring grad."""
    g = torch.Generator().manual_seed(1)

    def cell_state():
        h = torch.randn(B, H, generator=g).requires_grad_()
        if mode == "gru_layernorm":
            return h
        return (h, torch.randn(B, H, generator=g).requires_grad_())

    def one():
        return (cell_state(), cell_state()) if direction == "bi" else cell_state()

    return one() if num_layers == 1 else tuple(one() for _ in range(num_layers))


def run(module, backend: str, x, state, lengths):
    """Outputs, final states and the gradients of a fixed random loss w.r.t. every input."""
    with rnnkit.use_backend(backend):
        out, final = module(x, state, lengths=lengths)
    values = [out, *tree_leaves(final)]
    g = torch.Generator().manual_seed(2)
    loss = sum((v * torch.randn(v.shape, generator=g)).sum() for v in values)
    names = ["x", *(n for n, _ in module.named_parameters())]
    inputs = [x, *module.parameters()]
    states = tree_leaves(state) if state is not None else []
    names += [f"state[{k}]" for k in range(len(states))]
    grads = torch.autograd.grad(loss, inputs + states)
    return values, dict(zip(names, grads, strict=True))


def assert_same(module, x, state, lengths):
    ref_values, ref_grads = run(module, "reference", x, state, lengths)
    cpu_values, cpu_grads = run(module, "cpu", x, state, lengths)
    for k, (r, c) in enumerate(zip(ref_values, cpu_values, strict=True)):
        torch.testing.assert_close(
            c, r, atol=OUT_TOL, rtol=OUT_TOL, msg=lambda m, k=k: f"value {k}: {m}"
        )
    assert ref_grads.keys() == cpu_grads.keys()
    for name, r in ref_grads.items():
        torch.testing.assert_close(
            cpu_grads[name], r, atol=GRAD_TOL, rtol=GRAD_TOL, msg=lambda m, n=name: f"{n}: {m}"
        )


@pytest.mark.parametrize("mode", list(CELLS))
def test_without_bias_and_other_eps_equal_reference(mode):
    for kw in ({"bias": False}, {"eps": 1e-2}):
        module = make_layer(mode, "bi", 1, **kw)
        x = torch.randn(T, B, I, generator=torch.Generator().manual_seed(3), requires_grad=True)
        assert_same(module, x, initial_state(mode, "bi", 1), LENGTHS["mixed"])


@pytest.mark.parametrize("mode", list(CELLS))
def test_padded_outputs_are_exactly_zero_and_length_zero_keeps_the_state(mode):
    module = make_layer(mode, "bi", 2)
    state = initial_state(mode, "bi", 2)
    lengths = LENGTHS["mixed"]
    with rnnkit.use_backend("cpu"):
        out, final = module(torch.randn(T, B, I), state, lengths=lengths)
    for b, n in enumerate(lengths):
        assert torch.equal(out[n:, b], torch.zeros_like(out[n:, b]))
    empty = lengths.index(0)
    for got, given in zip(tree_leaves(final[0]), tree_leaves(state[0]), strict=True):
        assert torch.equal(got[empty], given[empty])


@pytest.mark.parametrize("mode", list(CELLS))
def test_no_grad_and_inference_mode(mode):
    module = make_layer(mode, "bi", 2)
    x = torch.randn(T, B, I)
    with rnnkit.use_backend("reference"), torch.no_grad():
        expected = module(x, lengths=LENGTHS["mixed"])[0]
    with rnnkit.use_backend("cpu"):
        with torch.no_grad():
            out = module(x, lengths=LENGTHS["mixed"])[0]
        assert not out.requires_grad
        torch.testing.assert_close(out, expected, atol=OUT_TOL, rtol=OUT_TOL)
        with torch.inference_mode():
            out = module(x, lengths=LENGTHS["mixed"])[0]
        torch.testing.assert_close(out, expected, atol=OUT_TOL, rtol=OUT_TOL)


@pytest.mark.parametrize("mode", list(CELLS))
def test_row_passes_split_across_threads_equal_reference(mode):
    """A batch and width large enough that the per-row passes and the gain sums run in several
    chunks with two threads; float64, so only a wrong split could differ."""
    torch.manual_seed(0)
    layer = rnnkit.Recurrent(CELLS[mode](3, 64, dtype=torch.float64), reverse=True)
    x = torch.randn(4, 300, 3, dtype=torch.float64, requires_grad=True)
    lengths = torch.randint(0, 5, (300,), generator=torch.Generator().manual_seed(1))
    results = []
    for backend in ("reference", "cpu", "cpu"):
        with rnnkit.use_backend(backend):
            out, final = layer(x, lengths=lengths)
        values = [out, *tree_leaves(final)]
        loss = sum((v * v.detach().cos()).sum() for v in values)
        results.append(values + list(torch.autograd.grad(loss, [x, *layer.parameters()])))
    for r, c, again in zip(*results, strict=True):
        torch.testing.assert_close(c, r, atol=1e-10, rtol=1e-10)
        assert torch.equal(c, again)  # deterministic


def test_torch_compile_fullgraph():
    module = make_layer("lstm_layernorm", "bi", 1)
    x = torch.randn(T, B, I)
    with rnnkit.use_backend("cpu"):
        expected = module(x)[0]
        compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
        out = compiled(x)[0]
    torch.testing.assert_close(out, expected, atol=OUT_TOL, rtol=OUT_TOL)
    out.sum().backward()
    assert module.backward_layer.cell.ln_c.weight.grad is not None


def test_explain_names_cpu_and_declines_with_reasons():
    x = torch.randn(T, B, I)
    for mode in CELLS:
        explanation = rnnkit.explain(make_layer(mode, "bi", 2), x, lengths=LENGTHS["mixed"])
        assert explanation.backend == "cpu", str(explanation)
        layer = rnnkit.Recurrent(make_cell(mode, I), zoneout=0.1, dropout_state=0.2).train()
        assert rnnkit.explain(layer, x).backend == "cpu"
    backend = CpuBackend()
    for mode in CELLS:
        assert backend.check(rnnkit.backends.Request(mode=mode)) is None
        assert backend.check(rnnkit.backends.Request(mode=mode, dtype=torch.float64)) is None
        for flag in ("zoneout", "state_dropout", "variational", "gates"):
            assert backend.check(rnnkit.backends.Request(mode=mode, **{flag: True})) is None
        every = {"zoneout": True, "state_dropout": True, "variational": True, "gates": True}
        assert backend.check(rnnkit.backends.Request(mode=mode, **every)) is None
        assert backend.check(rnnkit.backends.Request(mode=mode, gates=True)) is None
        assert "bfloat16" in backend.check(rnnkit.backends.Request(mode=mode, dtype=torch.bfloat16))
        assert "cuda" in backend.check(rnnkit.backends.Request(mode=mode, device_type="cuda"))


# -- the in-kernel regularisers: zoneout and state dropout ---------------------------------------

# State dropout scales h_{t-1} by 1 / (1 - p) into the recurrent LayerNorm; at p = 0.3 the fp32
# gradients of a 2-layer bidirectional LSTM stack (both backends) stray from float64 by up to
# 2 GRAD_TOL, so these use p = 0.2; test_state_dropout_float64_equals_reference covers p = 0.3
# in float64, where the two agree to 1e-12.
REGS = {
    "state": {"dropout_state": 0.2},
    "zoneout": {"zoneout": 0.2, "zoneout_cell": 0.4},
    "all": {
        "dropout_input": 0.2,
        "dropout_state": 0.2,
        "dropout_output": 0.3,
        "zoneout": 0.3,
        "zoneout_cell": 0.2,
    },
}


def make_reg_layer(mode: str, direction: str, num_layers: int, regs: dict) -> torch.nn.Module:
    """make_layer with ``regs`` on every Recurrent."""
    torch.manual_seed(0)

    def one(input_size: int) -> torch.nn.Module:
        def rec(reverse: bool) -> rnnkit.Recurrent:
            return rnnkit.Recurrent(make_cell(mode, input_size), reverse=reverse, **regs)

        if direction == "bi":
            return rnnkit.Bidirectional(rec(False), rec(True))
        return rec(direction == "reverse")

    if num_layers == 1:
        return one(I)
    width = 2 * H if direction == "bi" else H
    return rnnkit.Stacked([one(I), *(one(width) for _ in range(num_layers - 1))])


def assert_same_seeded(module, x, state, lengths, seed: int = 11):
    """assert_same with the masks of both backends drawn after ``torch.manual_seed(seed)``."""
    results = {}
    for backend in ("reference", "cpu"):
        torch.manual_seed(seed)
        results[backend] = run(module, backend, x, state, lengths)
    (ref_values, ref_grads), (cpu_values, cpu_grads) = results["reference"], results["cpu"]
    for k, (r, c) in enumerate(zip(ref_values, cpu_values, strict=True)):
        torch.testing.assert_close(
            c, r, atol=OUT_TOL, rtol=OUT_TOL, msg=lambda m, k=k: f"value {k}: {m}"
        )
    assert ref_grads.keys() == cpu_grads.keys()
    for name, r in ref_grads.items():
        torch.testing.assert_close(
            cpu_grads[name], r, atol=GRAD_TOL, rtol=GRAD_TOL, msg=lambda m, n=name: f"{n}: {m}"
        )


@pytest.mark.parametrize("mode", list(CELLS))
def test_state_dropout_float64_equals_reference(mode):
    module = make_reg_layer(mode, "bi", 2, {"dropout_state": 0.3, "zoneout": 0.2}).train()
    module.double()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, B, I, generator=g, dtype=torch.float64, requires_grad=True)
    state = torch.utils._pytree.tree_map(
        lambda t: t.detach().double().requires_grad_(), initial_state(mode, "bi", 2)
    )
    results = {}
    for backend in ("reference", "cpu"):
        torch.manual_seed(11)
        results[backend] = run(module, backend, x, state, LENGTHS["mixed"])
    (ref_values, ref_grads), (values, grads) = results["reference"], results["cpu"]
    for r, c in zip(ref_values, values, strict=True):
        torch.testing.assert_close(c, r, atol=1e-10, rtol=1e-10)
    for name, r in ref_grads.items():
        torch.testing.assert_close(grads[name], r, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("direction", ["forward", "bi"])
@pytest.mark.parametrize("mode", list(CELLS))
def test_eval_mode_zoneout_is_the_expectation(mode, direction):
    module = make_reg_layer(mode, direction, 2, REGS["all"]).eval()
    x = torch.randn(T, B, I, generator=torch.Generator().manual_seed(3), requires_grad=True)
    assert rnnkit.explain(module, x, lengths=LENGTHS["mixed"]).backend == "cpu"
    assert_same_seeded(module, x, initial_state(mode, direction, 2), LENGTHS["mixed"])
    with torch.no_grad():  # nothing saved
        outs = {}
        for backend in ("reference", "cpu"):
            with rnnkit.use_backend(backend):
                outs[backend] = module(x, lengths=LENGTHS["mixed"])[0]
    torch.testing.assert_close(outs["cpu"], outs["reference"], atol=OUT_TOL, rtol=OUT_TOL)


# -- the custom op itself, in float64 -------------------------------------------------------------

GC_T, GC_B, GC_I, GC_H = 4, 3, 2, 3


def op_args(mode: str, lengths, bias: bool = True):
    """layernorm_forward's tensor arguments (x, h0, c0, w_ih, w_hh, b_ih, b_hh, six LayerNorm
    gains and biases, lengths), random float64."""
    g = torch.Generator().manual_seed(5)
    lstm = mode == "lstm_layernorm"
    gates = (4 if lstm else 3) * GC_H

    def rand(*shape, shift=0.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) + shift).requires_grad_()

    x = rand(GC_T, GC_B, GC_I)
    h0, c0 = rand(GC_B, GC_H), rand(GC_B, GC_H) if lstm else None
    w_ih, w_hh = rand(gates, GC_I), rand(gates, GC_H)
    b_ih, b_hh = (rand(gates), rand(gates)) if bias else (None, None)
    norms = [rand(gates, shift=1.0), rand(gates), rand(gates, shift=1.0), rand(gates)]
    norms += [rand(GC_H, shift=1.0), rand(GC_H)] if lstm else [None, None]
    lens = None if lengths is None else torch.tensor(lengths)
    return [x, h0, c0, w_ih, w_hh, b_ih, b_hh, *norms, lens]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("lengths", [None, [3, 0, 4]], ids=["none", "mixed"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("mode", list(CELLS))
def test_gradcheck_float64(mode, reverse, lengths, bias):
    args = op_args(mode, lengths, bias)
    mode_id = layernorm.MODE_IDS[mode]
    slots = [k for k, a in enumerate(args[:13]) if a is not None]

    def f(*tensors):
        full = list(args)
        for k, t in zip(slots, tensors, strict=True):
            full[k] = t
        out, h_n, c_n, *_ = layernorm.layernorm_forward(*full, 1e-5, mode_id, reverse, True)
        return (out, h_n, c_n) if mode == "lstm_layernorm" else (out, h_n)

    inputs = [args[k] for k in slots]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def fixed_masks(mode: str, kind: str):
    """state_mask (B, H), zone_h, zone_c: training's 0/1 masks (T, B, H) or eval's (H,)."""
    g = torch.Generator().manual_seed(9)
    lstm = mode == "lstm_layernorm"
    mask = torch.empty(GC_B, GC_H, dtype=torch.float64).bernoulli_(0.7, generator=g) / 0.7
    if kind == "eval":
        zone = [torch.full((GC_H,), p, dtype=torch.float64) for p in (0.3, 0.2)]
        return None, zone[0], zone[1] if lstm else None

    def hold(p):
        return (torch.rand(GC_T, GC_B, GC_H, generator=g) < p).double()

    return mask, hold(0.4), hold(0.3) if lstm else None


@pytest.mark.parametrize("kind", ["train", "eval"])
@pytest.mark.parametrize("lengths", [None, [3, 0, 4]], ids=["none", "mixed"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("mode", list(CELLS))
def test_gradcheck_float64_with_regularisers(mode, reverse, lengths, kind):
    args = op_args(mode, lengths)
    masks = fixed_masks(mode, kind)
    mode_id = layernorm.MODE_IDS[mode]
    slots = [k for k, a in enumerate(args[:13]) if a is not None]

    def f(*tensors):
        full = list(args)
        for k, t in zip(slots, tensors, strict=True):
            full[k] = t
        out, h_n, c_n, *_ = layernorm.layernorm_forward(*full, 1e-5, mode_id, reverse, True, *masks)
        return (out, h_n, c_n) if mode == "lstm_layernorm" else (out, h_n)

    inputs = [args[k] for k in slots]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mode", list(CELLS))
def test_opcheck_with_regularisers(mode):
    args = op_args(mode, [3, 0, 4])
    masks = fixed_masks(mode, "train")
    torch.library.opcheck(
        layernorm.layernorm_forward,
        (*args, 1e-5, layernorm.MODE_IDS[mode], True, True, *masks),
    )


@pytest.mark.parametrize(
    "mode, lengths, bias, reverse",
    [
        ("lstm_layernorm", None, True, False),
        ("lstm_layernorm", [3, 0, 4], False, True),
        ("gru_layernorm", None, False, True),
        ("gru_layernorm", [3, 0, 4], True, False),
    ],
)
def test_opcheck(mode, lengths, bias, reverse):
    args = op_args(mode, lengths, bias)
    torch.library.opcheck(
        layernorm.layernorm_forward, (*args, 1e-5, layernorm.MODE_IDS[mode], reverse, True)
    )


def test_op_errors_echo_the_bad_value():
    args = op_args("gru_layernorm", [3, 0, 4])
    with torch.no_grad():
        bad = list(args)
        bad[-1] = torch.tensor([3, 0, 9])
        with pytest.raises(RuntimeError, match=r"lengths\[2\] = 9; expected 0 <= len <= T = 4"):
            layernorm.layernorm_forward(*bad, 1e-5, 1, False, False)
        bad = list(args)
        bad[9] = bad[9][:-1]  # ln_hh_w
        with pytest.raises(RuntimeError, match=r"ln_hh_w has shape \[8\]; expected \(9,\)"):
            layernorm.layernorm_forward(*bad, 1e-5, 1, False, False)
        bad = list(args)
        bad[4] = bad[4].float()  # w_hh
        with pytest.raises(RuntimeError, match="w_hh has dtype Float; expected Double like x"):
            layernorm.layernorm_forward(*bad, 1e-5, 1, False, False)
