"""The cpu kernels' scratch pool: large arrays kept between calls, released on request, and no
result that depends on what a reused block held before."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import rnnkit
from rnnkit.backends.cpu import build, release_memory, scratch_memory


@pytest.fixture(autouse=True)
def _kernels():
    reason = build.unavailable()
    if reason is not None:
        pytest.skip(f"the C++ kernels are unavailable: {reason}")
    yield
    release_memory()


def _train_step(gru: torch.nn.Module, x: torch.Tensor) -> None:
    y, h = gru(x)
    (y.sum() + h.sum()).backward()


def test_large_arrays_are_kept_between_calls_and_reused() -> None:
    # T*B*G floats = 50*32*768*4 bytes: several megabytes per array, pooled
    gru = rnnkit.GRU(64, 256, backend="cpu")
    x = torch.randn(50, 32, 64, requires_grad=True)
    release_memory()
    assert scratch_memory()[0] == 0
    _train_step(gru, x)
    kept = scratch_memory()[0]
    assert kept >= 50 * 32 * 768 * 4
    for _ in range(3):
        _train_step(gru, x)
    assert scratch_memory()[0] == kept  # the same blocks again, none added


def test_release_memory_frees_what_is_kept_and_can_set_the_limit() -> None:
    gru = rnnkit.GRU(64, 256, backend="cpu")
    x = torch.randn(50, 32, 64, requires_grad=True)
    _, limit = scratch_memory()
    _train_step(gru, x)
    assert scratch_memory()[0] > 0
    release_memory()
    assert scratch_memory() == (0, limit)
    try:
        release_memory(0)
        _train_step(gru, x)
        assert scratch_memory() == (0, 0)
    finally:
        release_memory(limit / (1 << 20))
    assert scratch_memory()[1] == limit
    with pytest.raises(ValueError, match=r"limit_mb = -1; expected a number >= 0"):
        release_memory(-1)


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), 1e14, "64"])
def test_a_refused_limit_leaves_the_pool_as_it_was(bad) -> None:
    """release_memory(limit_mb) checks the limit before it frees anything: one it refuses
    (none at all, NaN, more bytes than an int64 holds, not a number) names itself and changes
    nothing, the limit included."""
    gru = rnnkit.GRU(64, 256, backend="cpu")
    x = torch.randn(50, 32, 64, requires_grad=True)
    _train_step(gru, x)
    before = scratch_memory()
    assert before[0] > 0
    with pytest.raises((ValueError, TypeError), match=r"^limit_mb = .*; expected a number"):
        release_memory(bad)
    assert scratch_memory() == before


_POISONED = textwrap.dedent(
    """
    import torch, rnnkit
    torch.manual_seed(0)
    T, B, I, H = 30, 72, 20, 128  # hprev (T, B, H) is over a megabyte: pooled
    lengths = torch.randint(1, T + 1, (B,))
    lengths[0], lengths[1] = 0, T
    makers = {
        "gru": lambda: rnnkit.GRU(I, H, bidirectional=True),
        "lstm_proj": lambda: rnnkit.LSTM(I, H, proj_size=40, bidirectional=True),
        "rnn": lambda: rnnkit.RNN(I, H, num_layers=2),
        "gru_layernorm": lambda: rnnkit.Recurrent(rnnkit.LayerNormGRUCell(I, H)),
        "lstm_zoneout": lambda: rnnkit.Recurrent(
            rnnkit.LSTMCell(I, H), zoneout=0.2, zoneout_cell=0.1, dropout_state=0.2
        ),
    }
    for name, make in makers.items():
        module = make()
        x = torch.randn(T, B, I, requires_grad=True)
        results = {}
        for backend in ("reference", "cpu", "cpu"):  # the second cpu run reuses the blocks
            torch.manual_seed(1)
            module.zero_grad()
            x.grad = None
            with rnnkit.use_backend(backend):
                y = module(x, lengths=lengths)[0]
            (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
            got = [t.detach() for t in [y, x.grad, *(p.grad for p in module.parameters())]]
            assert all(bool(t.isfinite().all()) for t in got), (name, backend)
            if backend in results:
                ref = results["reference"]
                err = max(
                    float((a - b).abs().max() / b.abs().max().clamp(min=1))
                    for a, b in zip(got, ref)
                )
                assert err < 1e-5, (name, backend, err)
            results[backend] = got
    print("ok")
    """
)


@pytest.mark.slow
def test_no_result_reads_scratch_it_did_not_write() -> None:
    # Every block handed out is filled with NaN bytes first: a kernel that read a value it had
    # not written (a padded row, a reused block) would give NaN or differ from the reference.
    env = {**os.environ, "RNNKIT_CPU_SCRATCH_POISON": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _POISONED], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")


@pytest.mark.parametrize("value", ["512MB", "-1", "1.5", "lots", "512 "])
def test_a_bad_scratch_limit_in_the_environment_is_named(monkeypatch, value) -> None:
    """The kernels read RNNKIT_CPU_SCRATCH_MB as a whole number of megabytes; anything else is
    an error naming it, not the default taken silently."""
    monkeypatch.setattr(build, "_environment_checked", False)
    monkeypatch.setenv(build.SCRATCH_ENV, value)
    gru = rnnkit.GRU(3, 5, backend="cpu")
    with pytest.raises(ValueError, match=rf"^RNNKIT_CPU_SCRATCH_MB = '{value}'; expected a whole"):
        gru(torch.randn(4, 2, 3))
    with pytest.raises(ValueError, match=r"RNNKIT_CPU_SCRATCH_MB = "):
        scratch_memory()
    for good in ("", "0", "256", " 64"):
        monkeypatch.setenv(build.SCRATCH_ENV, good)
        gru(torch.randn(4, 2, 3))
