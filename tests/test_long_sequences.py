"""Long sequences: checkpointed BPTT gives the gradients of the plain run while keeping a fraction
of the activations; streaming in chunks with carried state and masks drawn once per sequence
computes exactly what one call over the whole sequence computes."""

from __future__ import annotations

import pytest
import torch
from conftest import OUT_TOL
from torch.utils._pytree import tree_leaves

import rnnkit
from rnnkit import backends

#: float64: checkpointing reorders no arithmetic inside a segment, only where segments meet
F64_TOL = 1e-6
T, B, I, H = 13, 4, 3, 5
LENGTHS = [T, 1, 0, 9]
ALL_REGS = {"dropout_input": 0.2, "dropout_state": 0.2, "zoneout": 0.25, "weight_drop": 0.3}
BACKENDS = [n for n in backends.available() if n != "auto"]

LAYERS = {
    "lstm-drop-in": lambda **kw: rnnkit.LSTM(I, H, num_layers=2, bidirectional=True, **kw),
    "gru-drop-in": lambda **kw: rnnkit.GRU(I, H, **kw),
    "lstm-proj": lambda **kw: rnnkit.LSTM(I, H, proj_size=2, **kw),
    "rnn-relu": lambda **kw: rnnkit.RNN(I, H, nonlinearity="relu", num_layers=2, **kw),
    "peephole-reverse": lambda **kw: rnnkit.Recurrent(
        rnnkit.PeepholeLSTMCell(I, H), reverse=True, **kw
    ),
    "layernorm-gru-bi": lambda **kw: rnnkit.Bidirectional(
        rnnkit.Recurrent(rnnkit.LayerNormGRUCell(I, H), **kw),
        rnnkit.Recurrent(rnnkit.LayerNormGRUCell(I, H), reverse=True, **kw),
    ),
    "layernorm-lstm-stack": lambda **kw: rnnkit.Stacked(
        [
            rnnkit.Recurrent(rnnkit.LayerNormLSTMCell(I, H), **kw),
            rnnkit.Recurrent(rnnkit.LayerNormLSTMCell(H, H), **kw),
        ],
        dropout=0.2,
    ),
}


def loss_and_grads(module, x, lengths, backend: str):
    torch.manual_seed(7)  # the same masks for both runs
    with rnnkit.use_backend(backend):
        out, state = module(x, lengths=lengths)
    values = [out, *tree_leaves(state)]
    loss = sum((v * v.detach().cos()).sum() for v in values)
    grads = torch.autograd.grad(loss, [x, *module.parameters()])
    return values, grads


def accepts(module, x, lengths, backend: str) -> bool:
    with rnnkit.use_backend(backend):
        try:
            rnnkit.explain(module, x, lengths=lengths)
        except rnnkit.BackendUnavailable:
            return False
    return True


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lengths", [None, LENGTHS], ids=["full", "lengths"])
@pytest.mark.parametrize("regs", [{}, ALL_REGS], ids=["plain", "regularisers"])
@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("every", [1, 5])
def test_checkpointed_bptt_equals_the_plain_run(name, regs, lengths, backend, every):
    torch.manual_seed(0)
    plain = LAYERS[name](**regs).double().train()
    torch.manual_seed(0)
    checkpointed = LAYERS[name](checkpoint=every, **regs).double().train()
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    if not accepts(plain, x, lengths, backend):
        pytest.skip(f"{backend} declines this layer (the conformance suite checks it declines)")
    want_values, want_grads = loss_and_grads(plain, x, lengths, backend)
    values, grads = loss_and_grads(checkpointed, x, lengths, backend)
    for got, want in zip(values + list(grads), want_values + list(want_grads), strict=True):
        torch.testing.assert_close(got, want, atol=F64_TOL, rtol=F64_TOL)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_checkpointed_bptt_with_lengths_on_torchs_op(mode, bidirectional):
    # lengths all >= 1, which torch's op packs; a later segment holds the short ones with 0
    torch.manual_seed(0)
    plain = getattr(rnnkit, mode)(I, H, num_layers=2, bidirectional=bidirectional).double()
    checkpointed = getattr(rnnkit, mode)(
        I, H, num_layers=2, bidirectional=bidirectional, checkpoint=4
    ).double()
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    lengths = [T, 1, 3, 9]
    want_values, want_grads = loss_and_grads(plain, x, lengths, "reference")
    values, grads = loss_and_grads(checkpointed, x, lengths, "native")
    for got, want in zip(values + list(grads), want_values + list(want_grads), strict=True):
        torch.testing.assert_close(got, want, atol=F64_TOL, rtol=F64_TOL)


def saved_bytes(module, x) -> int:
    """Bytes autograd keeps for the backward pass of one forward (outside recomputed segments)."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, _ = module(x)
    out.sum().backward()
    return total


@pytest.mark.parametrize("backend", ["cpu", pytest.param("reference", marks=pytest.mark.slow)])
def test_checkpointing_keeps_a_fraction_of_the_activations(backend):
    x = torch.randn(256, 8, 16, requires_grad=True)
    with rnnkit.use_backend(backend):
        plain = saved_bytes(rnnkit.LSTM(16, 32), x)
        kept = saved_bytes(rnnkit.LSTM(16, 32, checkpoint=16), x)
    # without checkpointing the backward keeps ~8 (B, H) tensors per step; with it, the segments'
    # inputs and boundary states only
    assert kept * 4 < plain, (kept, plain)


def test_checkpoint_argument_is_checked_and_auto_is_about_sqrt_t():
    for bad in (0, -3, 2.5, "sometimes", True):
        with pytest.raises(ValueError, match="checkpoint = .*; expected None, a positive integer"):
            rnnkit.GRU(I, H, checkpoint=bad)
    assert rnnkit.layers.recurrent.segment("auto", 16384) == 128
    assert rnnkit.layers.recurrent.segment("auto", 10) == 4
    assert "checkpoint='auto'" in repr(rnnkit.Recurrent(rnnkit.GRUCell(I, H), checkpoint="auto"))


# -- streaming ----------------------------------------------------------------------------------

#: the stacks drop out between their layers: those masks are drawn once per sequence too
STREAMING = {
    "lstm-drop-in-2-layers": lambda **kw: rnnkit.LSTM(I, H, num_layers=2, dropout=0.3, **kw),
    "gru-recurrent": lambda **kw: rnnkit.Recurrent(rnnkit.GRUCell(I, H), **kw),
    "peephole-stack": lambda **kw: rnnkit.Stacked(
        [
            rnnkit.Recurrent(rnnkit.PeepholeLSTMCell(I, H), **kw),
            rnnkit.Recurrent(rnnkit.PeepholeLSTMCell(H, H), **kw),
        ],
        dropout=0.3,
    ),
}
STREAM_REGS = {"zoneout": 0.3, "dropout_input": 0.2, "dropout_state": 0.2, "dropout_output": 0.1,
               "weight_drop": 0.3}  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(STREAMING))
def test_four_chunks_with_carried_state_equal_one_call(name, backend):
    torch.manual_seed(0)
    layer = STREAMING[name](**STREAM_REGS).train()
    steps = 16
    x = torch.randn(steps, B, I, requires_grad=True)
    lengths = torch.tensor([16, 3, 0, 10])
    if not accepts(layer, x, lengths, backend):
        pytest.skip(f"{backend} declines this layer")
    torch.manual_seed(3)
    masks = layer.draw_masks(x, lengths)
    with rnnkit.use_backend(backend):
        whole, whole_state = layer(x, lengths=lengths, masks=masks)
        outs, state = [], None
        for t0 in range(0, steps, 4):
            chunk_lengths = (lengths - t0).clamp(0, 4)
            out, state = layer(x[t0 : t0 + 4], state, lengths=chunk_lengths, masks=masks.at(t0))
            outs.append(out)
    torch.testing.assert_close(torch.cat(outs), whole, atol=OUT_TOL, rtol=OUT_TOL)
    for a, b in zip(tree_leaves(state), tree_leaves(whole_state), strict=True):
        torch.testing.assert_close(a, b, atol=OUT_TOL, rtol=OUT_TOL)
    # and the gradients flow through the carried state as through the one call
    g1 = torch.autograd.grad(whole.square().sum(), x)[0]
    g2 = torch.autograd.grad(torch.cat(outs).square().sum(), x)[0]
    torch.testing.assert_close(g2, g1, atol=1e-4, rtol=1e-4)


def test_masks_drawn_again_differ_and_the_same_masks_repeat_the_call():
    layer = rnnkit.GRU(I, H, num_layers=2, dropout=0.3, zoneout=0.3, dropout_state=0.3).train()
    x = torch.randn(8, B, I)
    m1, m2 = layer.draw_masks(x), layer.draw_masks(x)
    a, _ = layer(x, masks=m1)
    b, _ = layer(x, masks=m1)
    c, _ = layer(x, masks=m2)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_detach_state_cuts_the_graph_for_every_layout():
    x = torch.randn(5, B, I, requires_grad=True)
    layers = [
        rnnkit.LSTM(I, H, num_layers=2),
        rnnkit.GRU(I, H),
        rnnkit.Recurrent(rnnkit.LSTMCell(I, H)),
        rnnkit.Stacked(
            [rnnkit.Recurrent(rnnkit.GRUCell(I, H)), rnnkit.Recurrent(rnnkit.LSTMCell(H, H))]
        ),
    ]
    for layer in layers:
        _, state = layer(x)
        detached = rnnkit.detach_state(state)
        assert type(detached) is type(state)
        for t, d in zip(tree_leaves(state), tree_leaves(detached), strict=True):
            assert t.requires_grad and not d.requires_grad and torch.equal(t, d)
        out, _ = layer(x, detached)  # the carried state goes back in
        assert out.requires_grad
    assert rnnkit.detach_state(None) is None
    with pytest.raises(TypeError, match="state is a str"):
        rnnkit.detach_state("h")


@pytest.mark.parametrize(
    "make",
    [
        lambda: rnnkit.GRU(I, H, bidirectional=True, zoneout=0.1),
        lambda: rnnkit.Recurrent(rnnkit.GRUCell(I, H), reverse=True, zoneout=0.1),
    ],
    ids=["bidirectional", "reversed"],
)
def test_a_reversed_direction_refuses_to_stream(make):
    layer = make().train()
    x = torch.randn(8, B, I)
    masks = layer.draw_masks(x)
    layer(x, masks=masks)  # the whole sequence in one call is fine
    with pytest.raises(ValueError, match="reversed direction.*cannot run a sequence of 8 steps"):
        layer(x[:4], masks=masks)
    with pytest.raises(ValueError, match="chunk by chunk"):
        layer(x[4:], masks=masks.at(4))


def test_masks_drawn_in_the_other_mode_are_refused():
    layer = rnnkit.LSTM(I, H, num_layers=2, dropout=0.5, dropout_state=0.5, zoneout=0.3)
    x = torch.randn(8, B, I)
    trained = layer.train().draw_masks(x)
    with pytest.raises(ValueError, match="drawn in training mode; this call runs in eval mode"):
        layer.eval()(x, masks=trained)  # eval applies no dropout masks
    evaluated = layer.draw_masks(x)
    layer.eval()(x, masks=evaluated)
    with pytest.raises(ValueError, match="drawn in eval mode; this call runs in training mode"):
        layer.train()(x, masks=evaluated)


def test_masks_that_do_not_fit_the_chunk_are_refused():
    layer = rnnkit.LSTM(I, H, zoneout=0.2).train()
    masks = layer.draw_masks(torch.randn(8, B, I))
    with pytest.raises(ValueError, match="drawn for 8 steps; this chunk runs steps 6..9"):
        layer(torch.randn(4, B, I), masks=masks.at(6))
    with pytest.raises(ValueError, match="B = 4; this call has 1 layers and B = 2"):
        layer(torch.randn(4, 2, I), masks=masks)
    with pytest.raises(ValueError, match="t0 = 8; expected a step of the sequence"):
        masks.at(8)
    with pytest.raises(TypeError, match="masks is a dict"):
        layer(torch.randn(4, B, I), masks={})


# (the layer that draws the masks, the layer given them, what the error names)
FOREIGN_MASKS = {
    "another regulariser": (
        lambda: rnnkit.GRU(I, H, zoneout=0.5),
        lambda: rnnkit.GRU(I, H, weight_drop=0.5),
        "no weight_drop mask for a layer with weight_drop = 0.5",
    ),
    "a regulariser more": (
        lambda: rnnkit.GRU(I, H, zoneout=0.5, dropout_state=0.2),
        lambda: rnnkit.GRU(I, H, zoneout=0.5),
        "a dropout_state mask for a layer with dropout_state = 0.0",
    ),
    "another hidden size": (
        lambda: rnnkit.LSTM(I, H, dropout_state=0.2),
        lambda: rnnkit.LSTM(I, H + 1, dropout_state=0.2),
        rf"the dropout_state mask has shape \({B}, {H}\); expected \({B}, {H + 1}\)",
    ),
    "another cell": (
        lambda: rnnkit.LSTM(I, H, zoneout=0.1),
        lambda: rnnkit.GRU(I, H, zoneout=0.1),
        "2 zoneout masks; this layer zones out 1 state tensors",
    ),
    "another dtype": (
        lambda: rnnkit.LSTM(I, H, dropout_input=0.2),
        lambda: rnnkit.LSTM(I, H, dropout_input=0.2, dtype=torch.float64),
        "the dropout_input mask has dtype torch.float32; expected torch.float64",
    ),
    "no dropout between layers": (
        lambda: rnnkit.GRU(I, H, num_layers=2, dropout=0.5, zoneout=0.1),
        lambda: rnnkit.GRU(I, H, num_layers=2, zoneout=0.1),
        "1 dropout masks between layers; this call has 0",
    ),
}


@pytest.mark.parametrize("backend", ["reference", "cpu", "auto"])
@pytest.mark.parametrize("case", list(FOREIGN_MASKS))
def test_masks_of_another_configuration_are_refused_alike_on_every_backend(case, backend):
    """Masks drawn by a layer of other regularisers, sizes or dtype: one ValueError naming the
    difference, the same on every backend (never run with the masks that happen to fit)."""
    drawer, runner, message = FOREIGN_MASKS[case]
    x = torch.randn(8, B, I)
    masks = drawer().train().draw_masks(x)
    layer = runner().train()
    layer.backend = None if backend == "auto" else backend
    x = x.to(next(layer.parameters()).dtype)
    with pytest.raises(ValueError, match=f"masks were drawn for another configuration: {message}"):
        layer(x, masks=masks)
    layer(x, masks=layer.draw_masks(x))  # its own run


def test_a_chunk_starts_at_a_numpy_integer():
    np = pytest.importorskip("numpy")
    layer = rnnkit.GRU(I, H, zoneout=0.3).train()
    x = torch.randn(8, B, I)
    masks = layer.draw_masks(x)
    whole, _ = layer(x, masks=masks)
    outs, state = [], None
    for t0 in np.arange(0, 8, 4):  # np.int64
        out, state = layer(x[t0 : t0 + 4], state, masks=masks.at(t0))
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs), whole, atol=OUT_TOL, rtol=OUT_TOL)
    assert type(masks.at(np.int64(4)).offset) is int
    for bad in (True, 4.0, np.float64(4.0)):
        with pytest.raises(ValueError, match="expected a step of the sequence"):
            masks.at(bad)


@pytest.mark.parametrize("backend", ["reference", "cpu", "auto"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_a_float16_layer_under_bf16_autocast_checkpoints_as_it_runs_whole(backend, bidirectional):
    """The segments are joined outside autocast (whose cat fails on float16 operands under
    bf16 autocast on the CPU): the same outputs, gradients and dtype as the call in one piece,
    and torch.nn's dtype for it."""
    results = []
    for every in (None, 2):
        torch.manual_seed(0)
        layer = rnnkit.GRU(I, H, bidirectional=bidirectional, checkpoint=every).half()
        layer.backend = None if backend == "auto" else backend
        x = torch.randn(7, B, I).half().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, h = layer(x)
        out.float().square().sum().backward()
        results.append((out, h, x.grad))
    torch.manual_seed(0)
    theirs = torch.nn.GRU(I, H, bidirectional=bidirectional).half()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want_dtype = theirs(x.detach())[0].dtype
    (out, h, dx), (out_k, h_k, dx_k) = results
    assert out.dtype == out_k.dtype == want_dtype
    for got, expected in ((out_k, out), (h_k, h), (dx_k, dx)):
        torch.testing.assert_close(got.float(), expected.float(), atol=2e-2, rtol=2e-2)
