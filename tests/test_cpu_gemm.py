"""The cpu kernels' GEMM layer: every source gives the same results, the choice is measured at
first use of a shape class and cached (in memory and on disk, per machine), ``RNNKIT_GEMM``
forces a source, and :func:`rnnkit.explain` shows the plan. With ``lengths=``, the bulk GEMMs
cover the valid rows only and the results equal those of each sequence run alone.

The onednn source (the optional ``onednn-cpu-gomp`` wheel, opened at run time): each GEMM the
kernels call equals the float64 product, whole layers equal the mkl source's, and without the
wheel it is unavailable, never chosen, and a clear error when forced. Its tests skip where the
wheel is not installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
    monkeypatch.setattr(gemm, "_plans", {})
    monkeypatch.setattr(gemm, "_loaded", False)
    monkeypatch.delenv(gemm.ENV, raising=False)
    return path


def forced_pair(source: str) -> str:
    """What explain says of the plan RNNKIT_GEMM=source forces."""
    return f"step {source}, bulk {gemm._bulk_for(source)}"


def assert_matches(got, want, got_grads, want_grads):
    """Outputs and gradients equal, to the kernels' float32 tolerances."""
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, rtol=OUT_TOL, atol=OUT_TOL)
    for a, e in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, e, rtol=GRAD_TOL, atol=GRAD_TOL)


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
    assert_matches(got, want, got_grads, want_grads)
    assert f"forced by {gemm.ENV}" in str(rnnkit.explain(module, x))
    assert forced_pair(source) in str(rnnkit.explain(module, x))


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


def test_entries_of_another_shape_in_the_file_are_measured_again(fresh, monkeypatch):
    """The measurements file holds, under a shape class's key, what this version did not write
    (an edited file, another version's layout): that class is measured again, not a TypeError
    at every call."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # the split is measured too
    module = rnnkit.GRU(I, H, backend="cpu")
    x = torch.randn(T, B, I)
    rnnkit.explain(module, x)
    data = json.loads(fresh.read_text())
    assert any(k.startswith("split:") for k in data)
    for entry in data.values():
        entry["gflops"] = 12.5 if "best" in entry else None
        if "split" in entry:
            entry["split"] = "no"
    fresh.write_text(json.dumps(data))
    gemm._memory.clear()
    gemm._plans.clear()
    gemm._loaded = False  # a new process reads the file
    assert "measured now" in str(rnnkit.explain(module, x))
    module(x)
    assert all(isinstance(e["gflops"], dict) for e in json.loads(fresh.read_text()).values())


def test_the_step_source_is_chosen_in_the_schedule_it_runs(fresh, monkeypatch):
    """One source is the fastest threaded per step, another the fastest of all with the steps
    split by batch: the second is chosen, split, as its split time is what a call costs."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.delenv(gemm.SPLIT_ENV, raising=False)
    sources = [s for s in gemm.SOURCES if gemm.available(s, False)]
    split_fast, step_fast = sources[0], sources[1]
    fake = {(split_fast, "split"): 4e-4, (step_fast, "step"): 8e-4, (step_fast, "split"): 9e-4}

    def timed(candidates, bf16, m, n, k):
        out = {}
        for c in candidates:
            if isinstance(c, tuple):  # the step: (source, schedule)
                out[c] = fake.get(c, 1e-3)
            else:  # the bulk: by source
                out[c] = 1e-3
        return out

    monkeypatch.setattr(gemm, "_interleaved", timed)
    module = rnnkit.GRU(I, H, backend="cpu")
    shown = str(rnnkit.explain(module, torch.randn(T, B, I)))
    assert f"step {split_fast}," in shown and "steps split by batch" in shown, shown
    splits = {k: e["split"] for k, e in gemm._memory.items() if k.startswith("split:")}
    assert any(k.startswith(f"split:{split_fast}:") and v for k, v in splits.items()), splits
    assert any(k.startswith(f"split:{step_fast}:") and not v for k, v in splits.items()), splits


def test_rnnkit_gemm_names_a_source(fresh, monkeypatch):
    monkeypatch.setenv(gemm.ENV, "openblas")
    with pytest.raises(ValueError, match=r"RNNKIT_GEMM = 'openblas'; expected one of"):
        rnnkit.GRU(I, H, backend="cpu")(torch.randn(T, B, I))


@pytest.mark.parametrize("source", gemm.SOURCES)
@pytest.mark.parametrize("cls", [rnnkit.GRU, rnnkit.LSTM])
def test_rnnkit_gemm_is_honoured_under_torch_compile(fresh, monkeypatch, source, cls):
    """The source RNNKIT_GEMM forces is the one the compiled graph's op runs (its gemm_step and
    gemm_bulk arguments), as in an eager call, with the eager call's results and gradients."""
    if not gemm.available(source, False):
        pytest.skip(f"{source} is unavailable here")
    monkeypatch.setenv(gemm.ENV, source)
    torch.manual_seed(0)
    module = cls(I, H, backend="cpu")
    x = torch.randn(T, B, I)
    assert forced_pair(source) in str(rnnkit.explain(module, x))
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend=capture)
    got, got_grads = step(compiled, x)
    torch._dynamo.reset()
    ops = [
        n
        for gm in graphs
        for n in gm.graph.nodes
        if n.op == "call_function" and n.target is torch.ops.rnnkit.layer_forward.default
    ]
    assert ops, "the compiled graph holds no rnnkit.layer_forward op"
    wanted = gemm.SOURCES.index(source)
    wanted_bulk = gemm.SOURCES.index(gemm._bulk_for(source))
    for node in ops:
        step_source, bulk_source = node.args[9:11]
        assert (step_source, bulk_source) == (wanted, wanted_bulk), (
            f"compiled with {gemm.ENV}={source}: step {gemm.SOURCES[step_source]}, bulk "
            f"{gemm.SOURCES[bulk_source]}"
        )
    want, want_grads = step(module, x)
    assert_matches(got, want, got_grads, want_grads)


@pytest.mark.parametrize("variable,value", [(gemm.ENV, "openblas"), (gemm.SPLIT_ENV, "sometimes")])
def test_a_bad_value_is_named_where_dispatch_then_picks_torchs_op(
    fresh, monkeypatch, variable, value
):
    """At a shape where torch's fused op measured faster, automatic dispatch leaves the call to
    it; the variable's bad value is still an error, as at the shapes the kernels run."""
    from rnnkit.backends.cpu import dispatch

    slower = [p for p in dispatch.MEASURED[("lstm", False, "fp32", False)] if p.ratio < 1.0]
    if not slower:
        pytest.skip("the kernels measured faster than torch's op at every shape")
    point = slower[0]
    lstm = rnnkit.LSTM(point.input_size, point.hidden)
    x = torch.randn(point.steps, point.batch, point.input_size)
    with torch.no_grad():
        assert rnnkit.explain(lstm, x).backend == "native"
        monkeypatch.setenv(variable, value)
        with pytest.raises(ValueError, match=rf"^{variable} = '{value}'; expected"):
            lstm(x)
        with pytest.raises(ValueError, match=rf"^{variable} = '{value}'; expected"):
            rnnkit.explain(lstm, x)


def test_probe_reports_positive_times_for_each_available_source():
    for source in gemm.SOURCES:
        if gemm.available(source, False):
            assert gemm.probe(source, False, "step", 8, 24, 8, budget=1e-4) > 0
            assert gemm.probe(source, False, "bulk", 64, 24, 8, budget=1e-4) > 0
            assert gemm.probe(source, False, "split", 8, 24, 8, budget=1e-4) > 0


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


# -- the onednn source ---------------------------------------------------------------------------

#: float32 products of a few dozen terms: the float64 product to float32 rounding
PRODUCT_TOL = 1e-5


def needs_onednn(bf16: bool = False) -> None:
    if not gemm.available("onednn", False):
        pytest.skip(f"oneDNN is not available: {gemm.onednn_problem()}")
    if bf16 and not (gemm.bf16_supported() and gemm.available("onednn", True)):
        pytest.skip("no native bf16 matmul from oneDNN here")


def product(a, b, c, ta, tb, beta, bf16):
    """op(A) . op(B) + beta C in float64, of A and B rounded to bfloat16 with bf16 (the products
    of bfloat16 numbers are exact in float64: what a bf16 x bf16 -> f32 GEMM accumulates)."""
    if bf16:
        a, b = a.bfloat16(), b.bfloat16()
    a, b = a.double(), b.double()
    return (a.t() if ta else a) @ (b.t() if tb else b) + beta * c.double()


def operands(m, n, k, ta, tb, strided):
    """A stored as op(A) needs, B likewise, C (m, n); rows padded (lda > cols) when strided."""

    def matrix(rows, cols):
        pad = 3 if strided else 0
        return torch.randn(rows, cols + pad)[:, :cols]

    a = matrix(k, m) if ta else matrix(m, k)
    b = matrix(n, k) if tb else matrix(k, n)
    return a, b, matrix(m, n)


# How the kernels call each GEMM (ops.cpp's gemm_compute): the step's packed weight (forward
# h . W_hh^T, backward dG . W_hh; on all its rows or fewer, as with lengths), the step's plain
# GEMM (with lengths), and the bulk GEMMs:
# input projection x . W_ih^T, dx = dG . W_ih, weight gradients dG^T . x, the bias gradients'
# ones (1, R) . dG; as plain strided GEMMs and as Operands (rounded once).
CALLS = [
    ("packed", False, True),
    ("packed", False, False),
    ("packed_rows", False, True),
    ("packed_rows", False, False),
    ("step", False, True),
    ("step", False, False),
    ("bulk", False, True),
    ("bulk", False, False),
    ("bulk", True, False),
    ("operand", False, True),
    ("operand", False, False),
    ("operand", True, False),
]
SIZES = [(1, 24, 9), (7, 17, 1), (5, 40, 33), (33, 19, 64)]  # (M, N, K): M = 1, K = 1, N odd


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("beta", [0.0, 1.0])
@pytest.mark.parametrize(("how", "ta", "tb"), CALLS)
def test_onednn_gemms_equal_the_float64_product(how, ta, tb, beta, bf16):
    needs_onednn(bf16)
    import rnnkit.backends.cpu.ops  # noqa: F401  (the kernels' ops)

    sid = gemm.SOURCES.index("onednn")
    for m, n, k in SIZES:
        for strided in [False] if how == "operand" else [False, True]:
            a, b, c = operands(m, n, k, ta, tb, strided)
            want = product(a, b, c, ta, tb, beta, bf16)
            torch.ops.rnnkit_cpu.gemm_compute(sid, bf16, how, a, b, c, ta, tb, beta)
            scale = float(want.abs().max()) + 1.0
            err = float((c.double() - want).abs().max()) / scale
            assert err < PRODUCT_TOL, f"{how} ta={ta} tb={tb} M,N,K={m},{n},{k}: {err:.2e}"


def test_onednn_packed_step_runs_again_with_new_data():
    # the step's primitive and memory objects are reused: each call reads the data it is given
    needs_onednn()
    import rnnkit.backends.cpu.ops  # noqa: F401

    sid = gemm.SOURCES.index("onednn")
    for _ in range(3):
        a, b, c = operands(6, 30, 10, False, True, False)
        want = product(a, b, c, False, True, 0.0, False)
        torch.ops.rnnkit_cpu.gemm_compute(sid, False, "packed", a, b, c, False, True, 0.0)
        torch.testing.assert_close(c.double(), want, rtol=PRODUCT_TOL, atol=PRODUCT_TOL)


PARITY = {"gru": rnnkit.GRU, "lstm": rnnkit.LSTM, "rnn": rnnkit.RNN}


def _baseline(bf16: bool) -> str:
    return "mkl" if gemm.available("mkl", bf16) else "torch"


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("name", list(PARITY))
def test_onednn_layers_equal_the_mkl_source(monkeypatch, name, bidirectional, bf16):
    # forward and backward of whole layers with lengths (the step's packed and plain GEMMs, the
    # bulk ones over the valid rows), both directions on two threads
    needs_onednn(bf16)
    torch.manual_seed(0)
    t, b, i, h = 7, 16, 24, 40
    module = PARITY[name](i, h, bidirectional=bidirectional, backend="cpu")
    x = torch.randn(t, b, i)
    lengths = torch.tensor([7, 3, 0, 5, 1, 7, 6, 2, 4, 7, 5, 3, 1, 6, 2, 7])

    def run(source):
        monkeypatch.setenv(gemm.ENV, source)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            assert f"step {source}, bulk {source}" in str(rnnkit.explain(module, x))
            return step(module, x, lengths)

    want, want_grads = run(_baseline(bf16))
    got, got_grads = run("onednn")
    if bf16:
        from test_cpu_bf16 import BF16_TOL, close

        for k, (a, e) in enumerate(
            zip(got + list(got_grads), want + list(want_grads), strict=True)
        ):
            close(a, e, BF16_TOL, f"tensor {k}")
    else:
        assert_matches(got, want, got_grads, want_grads)


def test_a_cached_choice_without_onednn_is_measured_again(fresh):
    # an entry from before the wheel was installed did not measure onednn: measured anew
    needs_onednn()
    module = rnnkit.GRU(I, H, backend="cpu")
    x = torch.randn(T, B, I)
    assert "measured now" in str(rnnkit.explain(module, x))
    sources = [e for k, e in gemm._memory.items() if not k.startswith("split:")]
    for entry in sources:
        assert "onednn" in entry["gflops"]
        entry["gflops"].pop("onednn")
        entry["best"] = "mkl" if "mkl" in entry["gflops"] else "torch"
    gemm._plans.clear()  # a new process, which reads such entries
    assert "measured now" in str(rnnkit.explain(module, x))
    assert all(
        "onednn" in e["gflops"] for k, e in gemm._memory.items() if not k.startswith("split:")
    )
    assert "measured earlier on this machine" in str(rnnkit.explain(module, x))


def test_without_the_wheel_onednn_is_unavailable_and_never_chosen(fresh, monkeypatch):
    missing = Path("/nonexistent/lib/libdnnl.so.3")
    monkeypatch.setattr(gemm, "onednn_library", lambda: missing)
    monkeypatch.setattr(gemm, "_onednn_problems", {})
    assert not gemm.available("onednn", False)
    assert str(missing) in gemm.onednn_problem()
    module = rnnkit.GRU(I, H, backend="cpu")
    x = torch.randn(T, B, I)
    assert "onednn" not in str(rnnkit.explain(module, x))
    assert gemm._memory and all("onednn" not in e["gflops"] for e in gemm._memory.values())
    monkeypatch.setenv(gemm.ENV, "onednn")
    with pytest.raises(RuntimeError, match=r"pip install onednn-cpu-gomp==2023\.2\.0") as e:
        module(x)
    assert "\n" not in str(e.value)
    monkeypatch.setattr(gemm, "onednn_library", lambda: None)
    monkeypatch.setattr(gemm, "_onednn_problems", {})
    with pytest.raises(RuntimeError, match="onednn-cpu-gomp package is not installed"):
        module(x)


@pytest.mark.slow
def test_a_library_that_fails_to_open_leaves_the_kernels_working(tmp_path):
    # In a fresh process (the library is opened once per process): RNNKIT_ONEDNN_LIBRARY names
    # a file that is no library. The kernels' own op says unavailable, auto runs without it, and
    # forcing it names the cause and the package.
    bogus = tmp_path / "libdnnl.so.3"
    bogus.write_text("not a shared library\n")
    script = f"""
import os, pathlib, torch, rnnkit
from rnnkit.backends.cpu import gemm
gemm._file = lambda: pathlib.Path({str(tmp_path / "gemm.json")!r})  # the measurements aside
assert not gemm.available("onednn", False)
assert not torch.ops.rnnkit_cpu.gemm_available({gemm.SOURCES.index("onednn")}, False)
print("problem:", gemm.onednn_problem())
m = rnnkit.GRU(3, 4, backend="cpu")
x = torch.randn(2, 1, 3)
m(x)
os.environ["RNNKIT_GEMM"] = "onednn"
try:
    m(x)
except RuntimeError as e:
    print("error:", e)
"""
    src = str(Path(rnnkit.__file__).resolve().parents[1])  # this checkout's rnnkit
    env = {
        **os.environ,
        gemm.ONEDNN_ENV: str(bogus),
        "RNNKIT_GEMM": "auto",
        "RNNKIT_CACHE": str(build.cache_dir()),
        "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
    }
    run = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert any(line.startswith("problem: cannot open " + str(bogus)) for line in lines), run.stdout
    error = next(line for line in lines if line.startswith("error:"))
    assert "RNNKIT_GEMM = 'onednn' but oneDNN cannot be used" in error
    assert "pip install onednn-cpu-gomp==2023.2.0" in error


# -- the avx2 source -----------------------------------------------------------------------------

# Sizes that reach every edge of its kernel: M past and short of its 6-row tiles, N past and
# short of its 16-column panels, K within, at and past its 256-deep blocks.
AVX2_SIZES = [(1, 24, 9), (7, 17, 1), (5, 40, 33), (13, 100, 300), (6, 16, 256), (12, 33, 513)]


def needs_avx2() -> None:
    if not gemm.available("avx2", False):
        pytest.skip("the cpu kernels were compiled without AVX2 and FMA")


@pytest.mark.parametrize("beta", [0.0, 1.0, 0.5])
@pytest.mark.parametrize("how", ["packed", "packed_rows"])
@pytest.mark.parametrize("tb", [True, False], ids=["forward", "backward"])
def test_avx2_step_equals_the_float64_product(how, tb, beta):
    # the step as the kernels run it: forward h . W_hh^T, backward dG . W_hh, on the rows the
    # weight was packed for or fewer (lengths), rows strided or not; with beta 0 whatever C held
    # (NaN here) must not reach the result
    needs_avx2()
    sid = gemm.SOURCES.index("avx2")
    torch.manual_seed(0)
    for m, n, k in AVX2_SIZES:
        for strided in (False, True):
            a, b, c = operands(m, n, k, False, tb, strided)
            if beta == 0.0:
                c.fill_(float("nan"))
            want = product(a, b, c.nan_to_num(), False, tb, beta, False)
            torch.ops.rnnkit_cpu.gemm_compute(sid, False, how, a, b, c, False, tb, beta)
            scale = float(want.abs().max()) + 1.0
            err = float((c.double() - want).abs().max()) / scale
            assert err < PRODUCT_TOL, (
                f"{how} tb={tb} M,N,K={m},{n},{k} strided={strided}: {err:.2e}"
            )


def test_avx2_is_measured_for_the_step_alone(fresh):
    needs_avx2()
    module = rnnkit.LSTM(I, H, backend="cpu")
    x = torch.randn(T, B, I)
    assert "bulk avx2" not in str(rnnkit.explain(module, x))
    steps = {k: e for k, e in gemm._memory.items() if k.startswith("step:")}
    bulks = {k: e for k, e in gemm._memory.items() if k.startswith("bulk:")}
    assert steps and bulks
    assert all("avx2" in e["gflops"] for e in steps.values())
    assert all("avx2" not in e["gflops"] for e in bulks.values())


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("name", list(PARITY))
def test_avx2_layers_equal_the_mkl_source(monkeypatch, name, bidirectional):
    # whole layers with lengths, forward and backward, the steps split by batch and not
    needs_avx2()
    torch.manual_seed(0)
    t, b, i, h = 7, 16, 24, 40
    module = PARITY[name](i, h, bidirectional=bidirectional, backend="cpu")
    x = torch.randn(t, b, i)
    lengths = torch.tensor([7, 3, 0, 5, 1, 7, 6, 2, 4, 7, 5, 3, 1, 6, 2, 7])
    monkeypatch.setenv(gemm.ENV, _baseline(False))
    want, want_grads = step(module, x, lengths)
    monkeypatch.setenv(gemm.ENV, "avx2")
    for split in ("on", "off"):
        monkeypatch.setenv(gemm.SPLIT_ENV, split)
        got, got_grads = step(module, x, lengths)
        assert_matches(got, want, got_grads, want_grads)


def test_forcing_avx2_where_it_cannot_run_is_a_clear_error(fresh, monkeypatch):
    real = gemm.available
    monkeypatch.setattr(gemm, "available", lambda s, bf16: s != "avx2" and real(s, bf16))
    monkeypatch.setenv(gemm.ENV, "avx2")
    with pytest.raises(
        RuntimeError, match=r"^RNNKIT_GEMM = 'avx2' but .* without AVX2 and FMA"
    ) as e:
        rnnkit.GRU(I, H, backend="cpu")(torch.randn(T, B, I))
    assert "\n" not in str(e.value)
