"""Property-based checks over random shapes, lengths, directions and layer counts."""

from __future__ import annotations

import torch
from conftest import OUT_TOL, assert_close
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnnkit
from rnnkit import lengths as L

CLASSES = {
    "rnn": (rnnkit.RNN, torch.nn.RNN),
    "lstm": (rnnkit.LSTM, torch.nn.LSTM),
    "gru": (rnnkit.GRU, torch.nn.GRU),
}


@st.composite
def configs(draw):
    steps = draw(st.integers(1, 7))
    batch = draw(st.integers(1, 5))
    lengths = draw(st.lists(st.integers(0, steps), min_size=batch, max_size=batch))
    return {
        "kind": draw(st.sampled_from(sorted(CLASSES))),
        "steps": steps,
        "lengths": lengths,
        "input_size": draw(st.integers(1, 5)),
        "hidden_size": draw(st.integers(1, 6)),
        "num_layers": draw(st.integers(1, 3)),
        "bidirectional": draw(st.booleans()),
        "batch_first": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16)),
    }


@settings(max_examples=60, deadline=None)
@given(configs())
def test_lengths_contract_and_torch_parity(cfg) -> None:
    torch.manual_seed(cfg["seed"])
    ours, theirs = CLASSES[cfg["kind"]]
    kw = {k: cfg[k] for k in ("num_layers", "bidirectional", "batch_first")}
    mine = ours(cfg["input_size"], cfg["hidden_size"], **kw)
    ref = theirs(cfg["input_size"], cfg["hidden_size"], **kw)
    ref.load_state_dict(mine.state_dict())
    batch, steps, lengths = len(cfg["lengths"]), cfg["steps"], cfg["lengths"]
    x = torch.randn(batch, steps, cfg["input_size"])
    if not cfg["batch_first"]:
        x = x.transpose(0, 1)
    out, hn = mine(x, lengths=lengths)
    h_n = hn[0] if isinstance(hn, tuple) else hn
    out_tm = out if not cfg["batch_first"] else out.transpose(0, 1)
    valid = L.mask(torch.tensor(lengths), steps)  # (T, B)
    # padded outputs are exactly zero; length-0 sequences keep the zero initial state
    assert torch.count_nonzero(out_tm[~valid]) == 0
    zero = torch.tensor(lengths) == 0
    assert torch.count_nonzero(h_n[:, zero]) == 0
    # the rest equals torch.nn on packed input
    keep = [b for b, n in enumerate(lengths) if n > 0]
    if keep:
        sub = x[keep] if cfg["batch_first"] else x[:, keep]
        packed = pack_padded_sequence(
            sub, torch.tensor([lengths[b] for b in keep]), cfg["batch_first"], False
        )
        out_r, hn_r = ref(packed)
        out_r = pad_packed_sequence(out_r, cfg["batch_first"], total_length=steps)[0]
        mine_sub = out[keep] if cfg["batch_first"] else out[:, keep]
        assert_close(mine_sub, out_r, OUT_TOL, "output")
        h_r = hn_r[0] if isinstance(hn_r, tuple) else hn_r
        assert_close(h_n[:, keep], h_r, OUT_TOL, "h_n")


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 8), st.lists(st.integers(0, 8), min_size=1, max_size=6))
def test_reverse_padded_is_an_involution_that_keeps_padding(steps, raw) -> None:
    lengths = torch.tensor([min(n, steps) for n in raw])
    x = torch.randn(steps, len(raw), 2)
    y = L.reverse_padded(x, lengths)
    assert torch.equal(L.reverse_padded(y, lengths), x)
    for b, n in enumerate(lengths.tolist()):
        assert torch.equal(y[:n, b], x[:n, b].flip(0))
        assert torch.equal(y[n:, b], x[n:, b])


@settings(max_examples=40, deadline=None)
@given(configs())
def test_reference_and_auto_backends_agree(cfg) -> None:
    torch.manual_seed(cfg["seed"])
    ours, _ = CLASSES[cfg["kind"]]
    kw = {k: cfg[k] for k in ("num_layers", "bidirectional", "batch_first")}
    mod = ours(cfg["input_size"], cfg["hidden_size"], **kw)
    shape = (len(cfg["lengths"]), cfg["steps"], cfg["input_size"])
    x = torch.randn(shape) if cfg["batch_first"] else torch.randn(shape).transpose(0, 1)
    with rnnkit.use_backend("reference"):
        a = mod(x, lengths=cfg["lengths"])
    b = mod(x, lengths=cfg["lengths"])
    assert_close(a, b, OUT_TOL, "reference vs auto")
