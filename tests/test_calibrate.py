"""``rnnkit calibrate``: the dispatch crossovers measured on this machine, kept per thread count,
and what automatic dispatch does with them (and with a damaged file)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import rnnkit
from rnnkit.backends import Request
from rnnkit.backends.cpu import CpuBackend, build, calibrate, dispatch
from rnnkit.cli import main

needs_kernels = pytest.mark.skipif(
    build.unavailable() is not None, reason=f"cpu kernels unavailable: {build.unavailable()}"
)

S = dispatch.S


@pytest.fixture
def calibrated(monkeypatch, tmp_path):
    """The calibration kept in tmp_path (none yet), read afresh."""
    path = tmp_path / "dispatch-test.json"
    monkeypatch.setattr(dispatch, "calibration_path", lambda: path)
    monkeypatch.setattr(dispatch, "_calibrations", None)
    return path


def gru_request(threads_shape=S, training=True, **kw):
    t, b, i, h = threads_shape
    return Request(
        mode="gru", steps=t, batch=b, input_size=i, hidden_size=h, requires_grad=training, **kw
    )


@needs_kernels
def test_measure_times_each_point_against_torch_nn():
    lines = []
    table = calibrate.measure(
        cells=("gru",), shapes=("S",), precisions=("fp32",), pairs=1, progress=lines.append
    )
    assert set(table) == {("gru", False, "fp32", True), ("gru", False, "fp32", False)}
    for points in table.values():
        (point,) = points
        assert point[:4] == S and point.ratio > 0
    assert len(lines) == 2 and "gru fp32 training at S: the cpu kernels at" in lines[0]


@needs_kernels
def test_measure_includes_the_bidirectional_lstm_with_lengths_at_m(monkeypatch):
    monkeypatch.setitem(calibrate.SHAPES, "M", (6, 3, 4, 5))  # small: the point, not its speed
    table = calibrate.measure(cells=("lstm",), shapes=("M",), precisions=("fp32",), pairs=1)
    assert ("lstm", True, "fp32", True) in table and ("lstm", True, "fp32", False) in table
    assert table[("lstm", True, "fp32", True)][0][:4] == (6, 3, 4, 5)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"cells": ("lstm", "elman")}, r"^cell 'elman'; expected one of lstm, gru, rnn_tanh$"),
        ({"shapes": ("XL",)}, r"^shape 'XL'; expected one of S, M, L$"),
        ({"precisions": ("fp16",)}, r"^precision 'fp16'; expected fp32 or bf16$"),
        ({"pairs": 0}, r"^pairs = 0; expected at least 1$"),
    ],
)
def test_measure_names_a_bad_argument(kw, match):
    with pytest.raises(ValueError, match=match):
        calibrate.measure(**kw)


def test_dispatch_follows_this_machines_table_at_its_thread_count(calibrated, monkeypatch):
    backend = CpuBackend()
    assert backend.slower(gru_request()) is None  # the shipped table: the kernels won at S
    dispatch.save_calibration({("gru", False, "fp32", True): (dispatch.Point(*S, 0.5),)}, 2)
    torch.set_num_threads(2)
    reason = backend.slower(gru_request())
    assert reason is not None and "the cpu kernels at 0.50x torch.nn" in reason
    assert "measured on this machine by `rnnkit calibrate` at 2 threads" in reason
    assert backend.slower(gru_request(training=False)) is None  # not calibrated: shipped table
    gru = rnnkit.GRU(S[2], S[3])
    x = torch.randn(S[0], S[1], S[2])
    assert rnnkit.explain(gru, x).backend == "native"
    with torch.no_grad():
        assert rnnkit.explain(gru, x).backend == "cpu"
    try:
        torch.set_num_threads(1)  # no table for one thread: the shipped one decides
        assert backend.slower(gru_request()) is None
    finally:
        torch.set_num_threads(2)
    # read back by a fresh process's first call
    monkeypatch.setattr(dispatch, "_calibrations", None)
    assert backend.slower(gru_request()) is not None


def test_cells_the_calibration_left_out_follow_the_shipped_table(calibrated, monkeypatch):
    monkeypatch.setattr(
        dispatch, "MEASURED", {("lstm", False, "fp32", True): (dispatch.Point(*S, 0.8),)}
    )
    dispatch.save_calibration({("gru", False, "fp32", True): (dispatch.Point(*S, 2.0),)}, 2)
    reason = CpuBackend().slower(
        Request(mode="lstm", steps=S[0], batch=S[1], input_size=S[2], hidden_size=S[3],
                requires_grad=True)
    )  # fmt: skip
    assert reason is not None and "0.80x torch.nn; BENCHMARKS.md" in reason


def test_bf16_points_serve_either_step_source(calibrated):
    # the shipped table tells oneDNN's bf16 step apart; a calibration measured whichever the
    # machine picks, under one name
    dispatch.save_calibration({("gru", False, "bf16", True): (dispatch.Point(*S, 0.7),)}, 2)
    for precision in ("bf16", "bf16-onednn"):
        point = dispatch.nearest("gru", False, precision, True, S)
        assert point is not None and point.ratio == 0.7
        assert dispatch.deciding("gru", False, precision, True) is not None


def test_the_file_keeps_every_thread_count(calibrated):
    dispatch.save_calibration({("gru", False, "fp32", True): (dispatch.Point(*S, 0.5),)}, 1)
    dispatch.save_calibration({("rnn_tanh", False, "fp32", False): (dispatch.Point(*S, 3.0),)}, 2)
    data = json.loads(calibrated.read_text())
    assert data["format"] == 1 and set(data["threads"]) == {"1", "2"}
    assert data["threads"]["1"]["points"] == {"gru|none|fp32|train": [[*S, 0.5]]}
    assert data["threads"]["2"]["points"] == {"rnn_tanh|none|fp32|infer": [[*S, 3.0]]}
    one = dispatch.calibration(1)
    assert one is not None and one.table == {
        ("gru", False, "fp32", True): (dispatch.Point(*S, 0.5),)
    }
    assert dispatch.forget_calibration() and not calibrated.exists()
    assert dispatch.calibration(1) is None and not dispatch.forget_calibration()


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        json.dumps({"format": 99, "threads": {}}),
        json.dumps({"format": 1, "threads": {"2": {"date": "x", "points": {"gru|none|fp32": []}}}}),
        json.dumps(
            {"format": 1, "threads": {"2": {"date": "x", "points": {
                "gru|none|fp32|train": [[100, 8, 64, 64, -1.0]]}}}}
        ),
        json.dumps(
            {"format": 1, "threads": {"2": {"date": "x", "points": {
                "gru|none|fp32|train": [[True, 8, 64, 64, 0.5]]}}}}
        ),
        json.dumps({"format": 1, "threads": {"two": {"date": "x", "points": {}}}}),
        json.dumps([1, 2]),
        b"\xff\xfe not text",
    ],
)  # fmt: skip
def test_a_damaged_file_is_named_and_the_shipped_table_decides(calibrated, text):
    if isinstance(text, bytes):
        calibrated.write_bytes(text)
    else:
        calibrated.write_text(text)
    with pytest.warns(UserWarning, match=r"^rnnkit: the dispatch table .* is damaged \("):
        assert dispatch.calibration(2) is None
    assert CpuBackend().slower(gru_request()) is None  # the shipped table, no exception
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # named once per process, not at every call
        CpuBackend().slower(gru_request())


@needs_kernels
def test_cli_measures_shows_and_resets(calibrated, capsys):
    args = ["calibrate", "--threads", "2", "--cells", "rnn", "--shapes", "S"]
    assert main([*args, "--precision", "fp32", "--pairs", "1"]) == 0
    out = capsys.readouterr().out
    assert "measuring at 2 threads" in out and "rnn fp32 training at S" in out
    assert f"wrote {calibrated}" in out
    measured = dispatch.calibration(2)
    assert measured is not None and set(measured.table) == {
        ("rnn_tanh", False, "fp32", True), ("rnn_tanh", False, "fp32", False),
    }  # fmt: skip
    assert main(["calibrate", "--threads", "2", "--show"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("measured on this machine by `rnnkit calibrate` at 2 threads")
    assert "rnn_tanh fp32 training: T100 B8 I64 H64" in out and "anything else: the shipped" in out
    assert main(["calibrate", "--reset"]) == 0
    assert capsys.readouterr().out.startswith("forgot calibration")
    assert main(["calibrate", "--threads", "2", "--show"]) == 0
    assert capsys.readouterr().out.startswith("the shipped table (")


@needs_kernels
def test_cli_says_when_it_cannot_write_the_table(calibrated, capsys, monkeypatch):
    def refuse(table, threads):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(dispatch, "save_calibration", refuse)
    args = ["calibrate", "--cells", "gru", "--shapes", "S", "--precision", "fp32", "--pairs", "1"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"rnnkit: error: cannot write {calibrated}: ") and err.count("\n") == 1


@pytest.mark.parametrize(
    "args,message",
    [
        (["--pairs", "0"], "rnnkit: error: --pairs 0; expected >= 1"),
        (["--threads", "0"], "rnnkit: error: --threads 0; expected >= 1"),
        (["--cells", "elman"], "invalid choice: 'elman'"),
        (["--show", "--reset"], "not allowed with argument"),
    ],
)
def test_cli_names_a_bad_option(calibrated, capsys, args, message):
    assert main(["calibrate", *args]) == 2
    assert message in capsys.readouterr().err
    assert not calibrated.exists()


def test_cli_says_when_the_kernels_cannot_run_here(calibrated, capsys, monkeypatch):
    monkeypatch.setattr(build, "unavailable", lambda: "no C++ compiler found")
    assert main(["calibrate", "--cells", "gru", "--shapes", "S"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "rnnkit: error: the cpu kernels are unavailable here (no C++ compiler found); nothing to "
        "calibrate\n"
    )
    assert not calibrated.exists()
