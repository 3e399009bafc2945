"""The dispatch point: explain(), forced backends, and the global default."""

from __future__ import annotations

import pytest
import torch
from test_errors import _Custom

import rnnkit
from rnnkit import backends

T, B, I, H = 5, 3, 4, 6


@pytest.fixture
def reference_and_native(monkeypatch) -> None:
    """Only the two backends every install has, so choices do not depend on fused kernels."""
    backends.available()  # make sure the built-in backends are registered
    keep = {k: v for k, v in backends._registry.items() if k in ("reference", "native")}
    monkeypatch.setattr(backends, "_registry", keep)


def test_explain_reports_native_for_a_plain_call(reference_and_native) -> None:
    lstm = rnnkit.LSTM(I, H, num_layers=2, bidirectional=True)
    e = rnnkit.explain(lstm, torch.randn(T, B, I))
    assert e.backend == "native"
    assert "torch's fused RNN op" in e.reason
    e = rnnkit.explain(lstm, torch.randn(T, B, I), lengths=[5, 3, 1])
    assert e.backend == "native"


def test_explain_reports_reference_where_native_cannot_run(reference_and_native) -> None:
    gru = rnnkit.GRU(I, H)
    e = rnnkit.explain(gru, torch.randn(T, B, I), lengths=[5, 0, 2])
    assert e.backend == "reference"
    assert "not native: a length of 0 cannot be packed" in e.reason
    e = rnnkit.explain(
        rnnkit.Recurrent(rnnkit.GRUCell(I, H), reverse=True),
        torch.randn(T, B, I),
        lengths=[5, 1, 2],
    )
    assert e.backend == "reference"
    assert "no single reversed direction" in e.reason
    custom = rnnkit.Recurrent(_Custom())
    e = rnnkit.explain(custom, torch.randn(T, B, I))
    assert e.backend == "reference"
    assert "custom cell" in e.reason


def test_explain_forced_and_wrappers(reference_and_native) -> None:
    gru = rnnkit.GRU(I, H, backend="reference")
    e = rnnkit.explain(gru, torch.randn(T, B, I))
    assert (e.backend, e.reason) == ("reference", "asked for by name ('reference')")
    bi = rnnkit.Bidirectional(
        rnnkit.Recurrent(_Custom()), rnnkit.Recurrent(rnnkit.GRUCell(I, H), reverse=True)
    )
    stack = rnnkit.Stacked([bi, rnnkit.Recurrent(rnnkit.LSTMCell(2 * H, H))])
    e = rnnkit.explain(stack, torch.randn(T, B, I))
    labels = [label for label, _ in e.layers]
    assert labels == ["0.forward._Custom", "0.backward.GRUCell", "1.LSTMCell"]
    assert e.layers[0][1].backend == "reference"
    assert e.backend == "mixed"
    assert [c.backend for _, c in e.layers] == ["reference", "native", "native"]
    assert "0.forward._Custom: reference" in str(e)


@pytest.mark.parametrize(
    "module", [torch.nn.LSTM(I, H), torch.nn.Sequential(rnnkit.LSTM(I, H)), None]
)
def test_explain_of_something_else_names_what_it_expects(module) -> None:
    with pytest.raises(
        TypeError, match=f"{type(module).__name__} is not an rnnkit recurrent layer"
    ):
        rnnkit.explain(module, torch.randn(T, B, I))


def test_use_backend_and_default() -> None:
    assert rnnkit.get_default_backend() == "auto"
    lstm = rnnkit.LSTM(I, H)
    with rnnkit.use_backend("reference"):
        assert rnnkit.get_default_backend() == "reference"
        assert rnnkit.explain(lstm, torch.randn(T, B, I)).backend == "reference"
    assert rnnkit.get_default_backend() == "auto"
    rnnkit.set_default_backend("reference")
    try:
        assert rnnkit.explain(lstm, torch.randn(T, B, I)).backend == "reference"
    finally:
        rnnkit.set_default_backend("auto")
    assert set(rnnkit.available_backends()) >= {"auto", "reference", "native"}


def test_requests_describe_the_call() -> None:
    lstm = rnnkit.LSTM(I, H, num_layers=2, bidirectional=True, proj_size=2)
    [(label, req, name)] = lstm.dispatch_requests(torch.randn(T, B, I), [5, 0, 1])
    assert (label, name) == ("LSTM", None)
    assert req == backends.Request(
        mode="lstm",
        num_layers=2,
        bidirectional=True,
        proj=True,
        lengths="has_zero",
        requires_grad=True,
        dropout=False,
        layer="LSTM",
        steps=T,
        batch=B,
        input_size=I,
        hidden_size=H,
    )
    with torch.no_grad():
        [(_, req, _)] = lstm.dispatch_requests(torch.randn(T, B, I))
    assert not req.requires_grad and req.lengths == "none"


def test_default_backend_is_process_wide_and_use_backend_is_scoped() -> None:
    import threading

    seen = []
    rnnkit.set_default_backend("reference")
    try:
        worker = threading.Thread(target=lambda: seen.append(rnnkit.get_default_backend()))
        worker.start()
        worker.join()
        with rnnkit.use_backend("native"):
            inner = threading.Thread(target=lambda: seen.append(rnnkit.get_default_backend()))
            inner.start()
            inner.join()
            seen.append(rnnkit.get_default_backend())
    finally:
        rnnkit.set_default_backend("auto")
    assert seen == ["reference", "reference", "native"]


class _Incomplete:
    """A backend object missing what the dispatch reads, piece by piece."""

    def __init__(self, **attrs: object) -> None:
        self.__dict__.update(attrs)


def _ok(request):
    return None


@pytest.mark.parametrize(
    "attrs,problem",
    [
        ({"name": "mine", "check": _ok, "run_layer": _ok}, "no priority"),
        ({"name": "mine", "priority": "5", "check": _ok, "run_layer": _ok}, "priority = '5'"),
        ({"name": "auto", "priority": 5, "check": _ok, "run_layer": _ok}, "name = 'auto'"),
        ({"priority": 5, "check": _ok, "run_layer": _ok}, "no name"),
        ({"name": "mine", "priority": 5, "check": _ok}, r"no method run_layer\(\)"),
    ],
)
def test_a_backend_missing_part_of_the_contract_is_refused_when_registered(attrs, problem) -> None:
    """Refused at register(), the table left as it was: accepted, it would break every later
    call of every layer (the dispatch sorts backends by priority)."""
    before = rnnkit.available_backends()
    with pytest.raises(
        TypeError, match=rf"^_Incomplete cannot be registered as a backend: {problem}"
    ):
        backends.register(_Incomplete(**attrs))
    assert rnnkit.available_backends() == before
    out, _ = rnnkit.GRU(3, 4)(torch.randn(2, 1, 3))
    assert out.shape == (2, 1, 4)
