"""The cpu kernels' GEMM layer: every source gives the same results, the choice is measured at
first use of a shape class and cached (in memory and on disk, per machine), ``RNNKIT_GEMM``
forces a source, and :func:`rnnkit.explain` shows the plan. With ``lengths=``, the bulk GEMMs
cover the valid rows only and the results equal those of each sequence run alone."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import GRAD_TOL, OUT_TOL, weighted_sum

import rnnkit
from rnnkit.backends.cpu import build, gemm
from rnnkit.cells.table import SPECS

T, B, I, H = 6, 5, 7, 9


@pytest.fixture(scope="module", autouse=True)
def kernels():
    reason = build.unavailable()
    if reason is not None:
        pytest.skip(f"the C++ kernels are unavailable: {reason}")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty measurement cache in tmp_path (the kernels' own cache is left alone)."""
    path = tmp_path / "gemm-test.json"
    monkeypatch.setattr(gemm, "_file", lambda: path)
    monkeypatch.setattr(gemm, "_memory", {})
    monkeypatch.setattr(gemm, "_loaded", False)
    monkeypatch.delenv(gemm.ENV, raising=False)
    return path


def step(module, x, lengths=None):
    x = x.detach().requires_grad_()
    out, h = module(x, lengths=lengths)
    tensors = [out, *(h if isinstance(h, tuple) else (h,))]
    params = [x, *module.parameters()]
    return tensors, torch.autograd.grad(weighted_sum(*tensors), params)


@pytest.mark.parametrize("source", gemm.SOURCES)
@pytest.mark.parametrize("cls", [rnnkit.GRU, rnnkit.LSTM])
def test_every_source_computes_what_the_default_computes(monkeypatch, source, cls):
    if not gemm.available(source, False):
        pytest.skip(f"{source} is not available here")
    torch.manual_seed(0)
    module = cls(I, H, num_layers=2, bidirectional=True, backend="cpu")
    x = torch.randn(T, B, I)
    lengths = torch.tensor([6, 2, 0, 5, 1])
    reference = cls(I, H, num_layers=2, bidirectional=True, backend="reference")
    reference.load_state_dict(module.state_dict())
    want, want_grads = step(reference, x, lengths)
    monkeypatch.setenv(gemm.ENV, source)
    got, got_grads = step(module, x, lengths)
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, rtol=OUT_TOL, atol=OUT_TOL)
    for a, e in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, e, rtol=GRAD_TOL, atol=GRAD_TOL)
    assert f"forced by {gemm.ENV}" in str(rnnkit.explain(module, x))
    assert f"step {source}, bulk {source}" in str(rnnkit.explain(module, x))


@pytest.mark.parametrize("source", gemm.SOURCES)
def test_every_source_runs_bf16_operands_with_fp32_accumulation(source):
    if not (gemm.bf16_supported() and gemm.available(source, True)):
        pytest.skip(f"no bf16 GEMM from {source} here")
    import rnnkit.backends.cpu.ops as ops

    torch.manual_seed(0)
    cell = rnnkit.GRUCell(I, H)
    w = [cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh]
    x, h0 = torch.randn(T, B, I), torch.zeros(B, H)
    empty = x.new_empty(0)
    gru = SPECS["gru"].kernel_id
    args = ([x], [h0], [t.detach() for t in w], [empty] * 3, None, gru, [False], 1e-5, False)
    sid = gemm.SOURCES.index(source)
    fp32 = ops.layer_forward(*args, sid, sid, False)[0]
    bf16 = ops.layer_forward(*args, sid, sid, True)[0]
    err = float((bf16 - fp32).abs().max())
    assert 1e-6 < err < 3e-2  # bf16 operands round, float32 accumulation keeps them close


def test_the_choice_is_measured_once_and_cached_on_disk(fresh):
    module = rnnkit.GRU(I, H, backend="cpu")
    x = torch.randn(T, B, I)
    first = str(rnnkit.explain(module, x))
    assert "measured now" in first
    assert "measured earlier on this machine" in str(rnnkit.explain(module, x))
    data = json.loads(fresh.read_text())
    step_key = next(k for k in data if k.startswith("step:fp32:"))
    assert data[step_key]["best"] in gemm.SOURCES
    assert all(v > 0 for v in data[step_key]["gflops"].values())
    gemm._memory.clear()
    gemm._loaded = False  # a new process reads the file
    assert "measured earlier on this machine" in str(rnnkit.explain(module, x))


def test_rnnkit_gemm_names_a_source(fresh, monkeypatch):
    monkeypatch.setenv(gemm.ENV, "openblas")
    with pytest.raises(ValueError, match=r"RNNKIT_GEMM = 'openblas'; expected one of"):
        rnnkit.GRU(I, H, backend="cpu")(torch.randn(T, B, I))


def test_probe_reports_positive_times_for_each_available_source():
    for source in gemm.SOURCES:
        if gemm.available(source, False):
            assert gemm.probe(source, False, "step", 8, 24, 8, budget=1e-4) > 0
            assert gemm.probe(source, False, "bulk", 64, 24, 8, budget=1e-4) > 0


def test_the_ops_refuse_an_unknown_source():
    import rnnkit.backends.cpu.ops as ops

    x = torch.randn(T, B, I)
    cell = rnnkit.RNNCell(I, H)
    w = [cell.weight_ih.detach(), cell.weight_hh.detach(), cell.bias_ih.detach(),
         cell.bias_hh.detach()]  # fmt: skip
    empty = x.new_empty(0)
    with pytest.raises(RuntimeError, match="gemm_bulk = 7; expected a GEMM source"):
        ops.layer_forward([x], [torch.zeros(B, H)], w, [empty] * 3, None, SPECS["rnn_tanh"].kernel_id, [False], 1e-5,
                          False, 0, 7, False)  # fmt: skip


@pytest.mark.parametrize("cls", [rnnkit.GRU, rnnkit.LSTM, rnnkit.RNN])
def test_lengths_equal_each_sequence_run_alone(cls):
    # The bulk GEMMs over the valid rows only: each sequence's results and its share of the
    # weight gradients equal running it alone at its own length.
    torch.manual_seed(0)
    module = cls(I, H, bidirectional=True, backend="cpu")
    lengths = [6, 2, 4, 1, 3]
    x = torch.randn(T, len(lengths), I)
    out, _ = module(x, lengths=torch.tensor(lengths))
    (out * torch.linspace(0, 1, out.numel()).reshape(out.shape)).sum().backward()
    together = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    for b, n in enumerate(lengths):
        o, _ = module(x[:n, b : b + 1])
        torch.testing.assert_close(out[:n, b : b + 1], o, rtol=OUT_TOL, atol=OUT_TOL)
        assert out[n:, b].abs().max() == 0 if n < T else True
        w = torch.linspace(0, 1, out.numel()).reshape(out.shape)[:n, b : b + 1]
        (o * w).sum().backward()
    for a, e in zip(together, [p.grad for p in module.parameters()], strict=True):
        torch.testing.assert_close(a, e, rtol=GRAD_TOL, atol=GRAD_TOL)
