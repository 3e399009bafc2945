"""Cells: torch.nn names, shapes and state_dicts, one step each, and the cell contract."""

from __future__ import annotations

import pytest
import torch
from conftest import OUT_TOL, assert_close

import rnnkit

I, H = 4, 6

PAIRS = [
    (lambda: rnnkit.RNNCell(I, H), lambda: torch.nn.RNNCell(I, H)),
    (
        lambda: rnnkit.RNNCell(I, H, nonlinearity="relu", bias=False),
        lambda: torch.nn.RNNCell(I, H, nonlinearity="relu", bias=False),
    ),
    (lambda: rnnkit.LSTMCell(I, H), lambda: torch.nn.LSTMCell(I, H)),
    (lambda: rnnkit.GRUCell(I, H), lambda: torch.nn.GRUCell(I, H)),
]


@pytest.mark.parametrize("make_mine,make_ref", PAIRS)
def test_state_dicts_load_both_ways_and_steps_agree(make_mine, make_ref) -> None:
    torch.manual_seed(5)
    mine = make_mine()
    torch.manual_seed(5)
    ref = make_ref()
    assert list(mine.state_dict()) == list(ref.state_dict())
    for a, b in zip(mine.state_dict().values(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # same init draws in the same order
    ref.load_state_dict(make_mine().state_dict())
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(3, I)
    state = mine.initial_state(3)
    out, new = mine(x, state)
    if isinstance(state, tuple):
        state = tuple(torch.randn_like(s) for s in state)
        out, new = mine(x, state)
        h, c = ref(x, state)
        assert_close(new, (h, c), OUT_TOL, "state")
    else:
        state = torch.randn_like(state)
        out, new = mine(x, state)
        assert_close(new, ref(x, state), OUT_TOL, "state")
    assert_close(out, new[0] if isinstance(new, tuple) else new, 0.0, "out is h")


@pytest.mark.parametrize("make_mine,make_ref", PAIRS)
def test_a_step_without_state_or_batch_and_bad_shapes_as_torch_nn(make_mine, make_ref) -> None:
    mine, ref = make_mine(), make_ref()
    ref.load_state_dict(mine.state_dict())
    name = type(mine).__name__
    x = torch.randn(3, I)

    def h_of(new):  # torch.nn's LSTMCell returns (h, c), the others h
        return new[0] if isinstance(new, tuple) else new

    # no state: zeros, as torch.nn's hx=None
    assert_close(mine(x)[0], h_of(ref(x)), OUT_TOL, "state=None")
    # unbatched (I,) with states (n,): torch.nn's unbatched step
    state = mine.initial_state(1)
    state = state[0] + 0.5 if isinstance(state, torch.Tensor) else tuple(s[0] + 0.5 for s in state)
    out, new = mine(x[0], state)
    assert out.shape == (H,)
    assert_close(new, ref(x[0], state), OUT_TOL, "unbatched step")
    # a state of another batch size is refused, not broadcast over the batch
    with pytest.raises(
        ValueError, match=rf"{name} state(\[0\])? has shape \(1, 6\); expected \(3, 6\)"
    ):
        mine(x, mine.initial_state(1))
    with pytest.raises(
        ValueError, match=r"has shape \(3, 6\); expected \(6,\) for an input of shape \(4,\)"
    ):
        mine(x[0], mine.initial_state(3))
    with pytest.raises(ValueError, match=rf"{name} input has shape \(3, 5\); expected \(B, 4\)"):
        mine(torch.randn(3, I + 1))


def test_initial_state_shapes_and_kernel_modes() -> None:
    lstm = rnnkit.LSTMCell(I, H, proj_size=2)
    h, c = lstm.initial_state(5, dtype=torch.float64)
    assert h.shape == (5, 2) and c.shape == (5, H) and h.dtype == torch.float64
    assert lstm.output_size == 2 and lstm.weight_hh.shape == (4 * H, 2)
    assert lstm.weight_hr.shape == (2, H)
    assert rnnkit.RNNCell(I, H, nonlinearity="relu").kernel_mode() == "rnn_relu"
    assert rnnkit.GRUCell(I, H).kernel_mode() == "gru"

    class Tweaked(rnnkit.GRUCell):
        def forward(self, x, h):
            h, _ = super().forward(x, h)
            return h * 0.5, h * 0.5

    assert Tweaked(I, H).kernel_mode() is None  # a changed step is not the built-in kernel

    class Renamed(rnnkit.GRUCell):
        pass

    assert Renamed(I, H).kernel_mode() == "gru"


def test_a_changed_step_runs_the_reference_loop() -> None:
    class Halved(rnnkit.GRUCell):
        def forward(self, x, h):
            h, _ = super().forward(x, h)
            return h * 0.5, h * 0.5

    cell = Halved(I, H)
    x = torch.randn(3, 2, I)
    out, h = rnnkit.Recurrent(cell)(x)
    state = cell.initial_state(2)
    for t in range(3):
        want, state = cell(x[t], state)
    assert_close(h, state, OUT_TOL, "custom step")
    assert_close(out[-1], want, OUT_TOL, "custom step")
