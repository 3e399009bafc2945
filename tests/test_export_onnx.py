"""ONNX export, checked in onnxruntime: every cell x one and two layers x forward, reverse and
bidirectional x with and without ``lengths=`` (a 0, a 1 and T among them), states in and out,
at a T and B other than the example's, through both of torch's exporters (the TorchScript-based
one and ``dynamo=True``, the default); a pytorch/examples-style model with rnnkit.GRU; and
``rnnkit export`` of trained recipes.

Needs the ``onnx`` extra (onnx, onnxscript, onnxruntime); skipped without it.
"""

from __future__ import annotations

import errno
import io
import os
import re
import warnings
from pathlib import Path

import pytest
import torch
from conftest import OUT_TOL
from export_helpers import CELLS, LAYERS, check_inputs, example, labels, mixed, zoo
from recipe_helpers import TINY, cli_args, need_data
from torch import nn

pytest.importorskip("onnx", reason='pip install "rnnkit[onnx]"')
pytest.importorskip("onnxscript", reason='pip install "rnnkit[onnx]"')
ort = pytest.importorskip("onnxruntime", reason='pip install "rnnkit[onnx]"')

import rnnkit  # noqa: E402
from rnnkit import cli  # noqa: E402
from rnnkit.backends.export import legacy  # noqa: E402

#: ``dynamo=True`` takes about a second per layer to export (three for a Scan), so it gets each
#: cell as a bidirectional layer with and without lengths, and
#: :func:`test_dynamo_onnx_directions_zoneout_sizes_of_one` the single directions and a stack;
#: the TorchScript-based exporter gets every layer of the zoo, for every cell.
DYNAMO_LAYERS = ("bi1",)
#: (cell, layer): two forward layers, reverse on ONNX's own operator and as a Scan, zoneout (a
#: Scan), a batch-first drop-in.
DIRECTIONS = [
    ("gru", "uni2"),
    ("lstm_peephole", "rev1"),
    ("gru_layernorm", "rev1"),
    ("lstm", "bi1-zoneout"),
    ("rnn_relu", "drop-in-uni1"),
]


# every test here exports through onnxscript and runs onnxruntime: slow (python -m pytest -m slow)
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


def onnx_dynamo(module, args, dynamic_shapes) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, args, dynamic_shapes=dynamic_shapes, dynamo=True, verbose=False
        )
    return program.model_proto.SerializeToString()


def onnx_legacy(module, args, names: list[str], axes: dict, opset: int | None = None) -> bytes:
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, args, f, dynamo=False, input_names=names, dynamic_axes=axes,
            opset_version=opset,
        )  # fmt: skip
    return f.getvalue()


def run_ort(model: bytes | str, inputs: list[torch.Tensor]) -> list:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert len(names) == len(inputs), (names, len(inputs))
    return session.run(None, {n: t.numpy() for n, t in zip(names, inputs, strict=True)})


def assert_matches(got: list, expected, names: list[str], tol: float = OUT_TOL) -> None:
    assert len(got) == len(expected)
    for name, g, e in zip(names, got, expected, strict=True):
        torch.testing.assert_close(
            torch.from_numpy(g), e.detach(), atol=tol, rtol=tol, msg=lambda m, n=name: f"{n}: {m}"
        )


def zoo_dynamo(module) -> bytes:
    shapes = {
        "x": {0: "T", 1: "B"},
        "lengths": {0: "B"},
        "states": [{axis: "B"} for axis in module.state_axes()],
    }
    return onnx_dynamo(module, example(module), shapes)


def zoo_legacy(module, opset: int | None = None) -> bytes:
    x, lengths, states = example(module)
    names = ["x", "lengths"] + [f"state{k}" for k in range(len(states))]
    axes = {"x": {0: "T", 1: "B"}, "lengths": {0: "B"}}
    axes |= {f"state{k}": {a: "B"} for k, a in enumerate(module.state_axes())}
    return onnx_legacy(module, (x, lengths, states), names, axes, opset)


def check_zoo(module, model: bytes, **shape) -> None:
    x, lengths, states = check_inputs(module, **shape)
    expected = module(x, lengths, states)
    assert_matches(run_ort(model, [x, lengths, *states]), expected, labels(module))


@pytest.mark.parametrize("cell", list(CELLS))
def test_dynamo_onnx_equals_rnnkit(cell: str) -> None:
    module = zoo(cell, DYNAMO_LAYERS)
    check_zoo(module, zoo_dynamo(module))


def test_dynamo_onnx_directions_zoneout_sizes_of_one() -> None:
    """Single directions, zoneout, a drop-in; also at B = 1 and T = 1 (the example has B and T
    >= 2: torch.export treats 0 and 1 as constants)."""
    module = mixed(DIRECTIONS)
    model = zoo_dynamo(module)
    check_zoo(module, model)
    check_zoo(module, model, lengths=[1], steps=1)
    check_zoo(module, model, lengths=[0], steps=4)


class _AfterLinear(nn.Module):
    """A Linear, then a layer lowered to a Scan (its input computed from parameters), with
    lengths; then a GRU lowered to ONNX's own, reading the Scan's output."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 6)
        self.layer = layer
        self.top = rnnkit.Recurrent(rnnkit.GRUCell(layer.output_size, 5))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        out = self.layer(self.proj(x), lengths=lengths)[0]
        return self.top(out, lengths=lengths)[0]


@pytest.mark.parametrize(
    "layer",
    [
        lambda: rnnkit.Recurrent(rnnkit.LayerNormLSTMCell(6, 7)),
        lambda: rnnkit.LSTM(6, 7, proj_size=4, bidirectional=True),
        lambda: rnnkit.GRU(6, 7, zoneout=0.2),
    ],
    ids=["layernorm", "projection", "zoneout"],
)
def test_dynamo_onnx_of_a_scan_layer_reading_a_computed_input(layer) -> None:
    """The Scan's operands come from other ops (here a Linear, whose output torch treats as
    needing gradients): the batch and the steps stay dynamic."""
    torch.manual_seed(0)
    module = _AfterLinear(layer()).eval()
    x, lengths = torch.randn(5, 3, 3), torch.tensor([5, 2, 4])
    shapes = {"x": {0: "T", 1: "B"}, "lengths": {0: "B"}}
    model = onnx_dynamo(module, (x, lengths), shapes)
    for steps, batch_lengths in ((8, [8, 1, 0, 6]), (2, [2])):
        x = torch.randn(steps, len(batch_lengths), 3)
        lengths = torch.tensor(batch_lengths)
        with torch.no_grad():
            expected = module(x, lengths)
        assert_matches(run_ort(model, [x, lengths]), [expected], ["out"])


@pytest.mark.parametrize("opset", [16, 17])
def test_dynamo_onnx_of_scan_layers_at_an_earlier_opset(opset: int) -> None:
    """Layers lowered to a Scan (LayerNorm, projection, zoneout) exported with an opset below
    the exporter's own 18: the graph converted down loads in onnxruntime and computes what the
    layers do (a Split inside the Scan's body kept its opset-18 form, which onnxruntime refused)."""
    module = mixed([("gru_layernorm", "rev1"), ("lstm_proj", "uni1"), ("lstm", "bi1-zoneout")])
    shapes = {
        "x": {0: "T", 1: "B"},
        "lengths": {0: "B"},
        "states": [{axis: "B"} for axis in module.state_axes()],
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, example(module), dynamic_shapes=shapes, dynamo=True, verbose=False,
            opset_version=opset,
        )  # fmt: skip
    check_zoo(module, program.model_proto.SerializeToString())


#: (cell, layer) of an ExportedProgram handed on to torch.onnx.export: ONNX's own GRU and LSTM
#: (their gates reordered), peepholes, a Scan (LayerNorm, projection), a drop-in.
PROGRAM = [
    ("gru", "bi1"),
    ("lstm", "rev1"),
    ("lstm_peephole", "uni1"),
    ("gru_layernorm", "bi1"),
    ("lstm_proj", "drop-in-bi2"),
]


def test_an_exported_program_exports_to_onnx_without_a_translation_table() -> None:
    """torch.export.export(model), then torch.onnx.export(program): rnnkit's op is lowered as
    under torch.onnx.export(model), no custom_translation_table from the user; T and B stay
    dynamic, lengths from 0 to T; the program itself keeps the op."""
    module = mixed(PROGRAM)
    steps, batch = torch.export.Dim("T"), torch.export.Dim("B")
    shapes = {
        "x": {0: steps, 1: batch},
        "lengths": {0: batch},
        "states": [{axis: batch} for axis in module.state_axes()],
    }
    program = torch.export.export(module, example(module), dynamic_shapes=shapes)
    op = torch.ops.rnnkit.export_layer.default
    ops = sum(n.target is op for n in program.graph.nodes)
    assert ops == 2 * (len(PROGRAM) + 1)  # with and without lengths; the drop-in: two layers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(program, verbose=False)
    model = onnx_program.model_proto.SerializeToString()
    check_zoo(module, model)
    check_zoo(module, model, lengths=[1], steps=1)
    assert sum(n.target is op for n in program.graph.nodes) == ops  # left as it was
    x, lengths, states = example(module)
    got, want = program.module()(x, lengths, states), module(x, lengths, states)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=OUT_TOL, rtol=OUT_TOL)


@pytest.mark.parametrize("cell", list(CELLS))
def test_torchscript_onnx_equals_rnnkit(cell: str) -> None:
    module = zoo(cell, LAYERS)
    check_zoo(module, zoo_legacy(module))


def test_torchscript_onnx_below_opset_17_writes_layernorm_out() -> None:
    module = zoo("gru_layernorm", ("uni1", "bi1"))
    check_zoo(module, zoo_legacy(module, opset=14))


def test_the_loop_lowering_of_every_native_cell(monkeypatch) -> None:
    """The Loop over the cell's step, for the cells that ONNX's own operators otherwise run."""
    monkeypatch.setattr(legacy, "NATIVE", False)
    for cell in ("rnn_tanh", "gru", "lstm", "lstm_peephole"):
        module = zoo(cell, ("rev1", "bi1"))
        check_zoo(module, zoo_legacy(module))


def test_torchscript_onnx_float64_and_sizes_of_one() -> None:
    """float64 runs as a Loop (onnxruntime's RNN operators are float32 only); B = 1, T = 1."""
    module = zoo("lstm", ("uni1", "bi1", "drop-in-uni1"), dtype=torch.float64)
    model = zoo_legacy(module)
    for shape in ({}, {"lengths": [1], "steps": 1}, {"lengths": [0, 2], "steps": 3}):
        x, lengths, states = check_inputs(module, torch.float64, **shape)
        got = run_ort(model, [x, lengths, *states])
        assert_matches(got, module(x, lengths, states), labels(module), tol=1e-9)


class WordLanguageModel(nn.Module):
    """pytorch/examples' word_language_model RNNModel, its nn.GRU swapped for rnnkit.GRU."""

    def __init__(self, ntoken: int, ninp: int, nhid: int, nlayers: int, dropout: float = 0.5):
        super().__init__()
        self.ntoken = ntoken
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = rnnkit.GRU(ninp, nhid, nlayers, dropout=dropout)
        self.decoder = nn.Linear(nhid, ntoken)
        self.nhid, self.nlayers = nhid, nlayers

    def forward(self, input: torch.Tensor, hidden: torch.Tensor):
        emb = self.drop(self.encoder(input))
        output, hidden = self.rnn(emb, hidden)
        output = self.drop(output)
        decoded = self.decoder(output).view(-1, self.ntoken)
        return nn.functional.log_softmax(decoded, dim=1), hidden

    def init_hidden(self, bsz: int) -> torch.Tensor:
        weight = next(self.parameters())
        return weight.new_zeros(self.nlayers, bsz, self.nhid)


def test_a_word_language_model_with_rnnkit_gru_exports_as_the_example_does(tmp_path) -> None:
    model = WordLanguageModel(50, 16, 16, 2).eval()
    seq_len, batch_size = 7, 3
    dummy_input = torch.LongTensor(seq_len * batch_size).zero_().view(-1, batch_size)
    hidden = model.init_hidden(batch_size)
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (dummy_input, hidden), path)  # main.py's --onnx-export
    tokens = torch.randint(0, 50, (seq_len, batch_size))
    hidden = torch.randn(2, batch_size, 16)
    expected = model(tokens, hidden)
    got = run_ort(str(path), [tokens, hidden])  # the weights may be stored beside it
    assert_matches(got, expected, ["log-probabilities", "hidden"])


# -- rnnkit export ------------------------------------------------------------------------------


def _train(task: str, out, **overrides) -> None:
    """A tiny run: one epoch, greedy decoding (what is exported is checked, not learnt)."""
    quick = {"epochs": 1} | ({"beam_size": 1} if "beam_size" in TINY[task] else {})
    argv = ["train", task, "--out", str(out), "--no-progress", "--threads", "1"]
    assert cli.main(argv + cli_args(TINY[task] | quick | overrides)) == 0


def _export(capsys, run, path, *extra: str) -> tuple[int, str, str]:
    code = cli.main(["export", str(run), "--onnx", str(path), *extra])
    out, err = capsys.readouterr()
    return code, out, err


def test_rnnkit_export_of_a_classifier(capsys, tmp_path) -> None:
    need_data("speech")
    _train("speech", tmp_path / "run")
    capsys.readouterr()
    code, out, err = _export(capsys, tmp_path / "run", tmp_path / "speech.onnx")
    assert code == 0, err
    assert re.search(r"on \d+ validation examples: max \|difference\| [0-9.e+-]+ \(in logits", out)
    assert "wrote" in out and (tmp_path / "speech.onnx").stat().st_size > 0
    from rnnkit.train import load_run

    _, model = load_run(tmp_path / "run")
    x, lengths = torch.randn(5, 11, 12), torch.tensor([11, 1, 7, 3, 9])
    assert_matches(
        run_ort(str(tmp_path / "speech.onnx"), [x, lengths]), [model(x, lengths)], ["logits"]
    )


def test_an_ensemble_with_a_right_to_left_member_exports_both_directions(capsys, tmp_path):
    """Members 0 and 1 left to right, member 2 right to left: the first pair of graphs is the
    pair's (each member's state, the mean logits), the second member 2's, each checked against
    its members along their greedy path (23 + 12 outputs)."""
    need_data("g2p")
    _train("g2p", tmp_path / "run", ensemble=3, right_to_left=True)
    capsys.readouterr()
    code, out, err = _export(capsys, tmp_path / "run", tmp_path / "g2p.onnx", "--limit", "40")
    assert code == 0, err
    assert "right-to-left members' decoder step" in out
    assert re.search(r"on 40 validation examples: max \|difference\| .*; 35 outputs compared", out)
    names = ("encoder", "decoder_step", "reverse_encoder", "reverse_decoder_step")
    for name in names:
        assert (tmp_path / f"g2p.{name}.onnx").stat().st_size > 0
    # the reverse step is member 2's: its logits from member 2's initial state
    from rnnkit.export.recipes import _flat
    from rnnkit.train import load_run

    _, model = load_run(tmp_path / "run")
    src, lengths = torch.tensor([[5, 6, 7], [8, 9, 0]]), torch.tensor([3, 2])
    backward = model.members[2]
    state = backward.start(src, lengths)
    encoder = ort.InferenceSession(str(tmp_path / "g2p.reverse_encoder.onnx"))
    step = ort.InferenceSession(str(tmp_path / "g2p.reverse_decoder_step.onnx"))
    got = encoder.run(None, {"src": src.numpy(), "src_lengths": lengths.numpy()})
    token = torch.full((2,), backward.config.bos_id)
    feed = {i.name: v for i, v in zip(step.get_inputs()[1:], got, strict=True)}
    logits = step.run(None, {"token": token.numpy()} | feed)[0]
    want, _ = backward.step(token, state)
    torch.testing.assert_close(torch.from_numpy(logits), want.detach(), atol=OUT_TOL, rtol=OUT_TOL)
    assert len(_flat(state)) == len(got)


@pytest.mark.parametrize("ensemble", [1, 2])
def test_rnnkit_export_of_an_encoder_decoder_writes_two_graphs(capsys, tmp_path, ensemble):
    """One model: the encoder's 7 state tensors, then 8 steps of the logits and the 4 that a step
    changes; an ensemble of two: each member's state, the step's logits their mean."""
    need_data("g2p")
    _train("g2p", tmp_path / "run", ensemble=ensemble, right_to_left=False)
    capsys.readouterr()
    code, out, err = _export(capsys, tmp_path / "run", tmp_path / "g2p.onnx", "--limit", "40")
    assert code == 0, err
    outputs = 12 if ensemble == 1 else 23
    assert re.search(
        rf"on 40 validation examples: max \|difference\| .*; {outputs} outputs compared", out
    )
    for name in ("g2p.encoder.onnx", "g2p.decoder_step.onnx"):
        assert (tmp_path / name).stat().st_size > 0
    assert not (tmp_path / "g2p.onnx").exists()


def test_rnnkit_export_of_the_character_lm_refuses_a_difference(capsys, tmp_path, monkeypatch):
    """The whole path but the writing (which the other two tests see): the check, here made
    to fail by 1, refuses to write anything."""
    need_data("charlm")
    _train("charlm", tmp_path / "run")
    capsys.readouterr()
    from rnnkit.export import recipes

    real = recipes.CharLMExporter.check

    def off(self, *args, **kwargs):
        result = real(self, *args, **kwargs)
        result.difference += 1.0
        return result

    monkeypatch.setattr(recipes.CharLMExporter, "check", off)
    code, out, err = _export(capsys, tmp_path / "run", tmp_path / "lm.onnx", "--limit", "600")
    assert re.search(
        r"on 600 validation characters: max \|difference\| 1 .*; 3 outputs compared", out
    )
    assert code == 1 and "nothing was written" in err and "> --tolerance 0.0001" in err
    assert list(tmp_path.glob("*.onnx")) == [] and list(tmp_path.glob(".rnnkit-export-*")) == []


def test_rnnkit_export_refuses_bad_arguments(capsys, tmp_path) -> None:
    code, _, err = _export(capsys, tmp_path / "nothing", tmp_path / "m.onnx")
    assert code == 2 and "not a directory" in err
    code, _, err = _export(capsys, tmp_path, tmp_path / "m.txt")
    assert code == 2 and "ending in .onnx" in err
    code, _, err = _export(capsys, tmp_path, tmp_path / "m.onnx", "--tolerance", "nan")
    assert code == 2 and "--tolerance nan" in err
    code, _, err = _export(capsys, tmp_path, tmp_path / "m.onnx", "--limit", "-5")
    assert code == 2 and "--limit -5; expected a number of examples >= 0" in err


def test_rnnkit_export_onto_a_directory_is_refused_before_exporting(capsys, tmp_path) -> None:
    need_data("speech")
    _train("speech", tmp_path / "run")
    capsys.readouterr()
    (tmp_path / "speech.onnx").mkdir()
    code, out, err = _export(capsys, tmp_path / "run", tmp_path / "speech.onnx")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert f"{tmp_path / 'speech.onnx'} is a directory; expected a file name" in err
    assert not list((tmp_path / "speech.onnx").iterdir())


def test_rnnkit_export_where_it_cannot_write_is_one_line(capsys, tmp_path, monkeypatch) -> None:
    need_data("speech")
    _train("speech", tmp_path / "run")
    capsys.readouterr()
    if Path("/proc/self").is_dir():  # a directory no one can create files in, root included
        code, out, err = _export(capsys, tmp_path / "run", "/proc/speech.onnx")
        assert code == 1 and out == "" and len(err.strip().splitlines()) == 1, err
        assert err.startswith("rnnkit: error: --onnx /proc/speech.onnx: cannot create files in")
        assert "expected a writable directory" in err
    from rnnkit.export import recipes

    def disk_full(graph, path):
        path.write_bytes(b"\x08\x09")  # part of the file got out
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(recipes, "_export", disk_full)
    code, out, err = _export(capsys, tmp_path / "run", tmp_path / "speech.onnx")
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "cannot write" in err and "No space left on device" in err
    assert "nothing was written" in err
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no draft left behind


def test_torchscript_onnx_of_a_custom_cell_reads_lengths_from_its_input() -> None:
    """The custom cell's loop is unrolled over the example's steps; the lengths are the graph's
    input, not the example's longest one baked in."""
    from test_export import _Elman

    layer = rnnkit.Recurrent(_Elman(3, 5)).eval()
    x = torch.randn(5, 3, 3)
    model = onnx_legacy(
        layer, (x, None, torch.tensor([3, 2, 1])), ["x", "lengths"], {"lengths": {0: "B"}}
    )
    lengths = torch.tensor([5, 4, 2])
    assert_matches(run_ort(model, [x, lengths]), layer(x, lengths=lengths), ["output", "h_n"])


def test_the_decoder_step_of_a_zero_bridge_reads_each_state_input(tmp_path) -> None:
    """With ``bridge="zero"`` the decoder's initial h and c are one tensor; exported, the step
    still reads h0 and c0 as the two inputs they are (checked along the greedy path, where
    they differ after the first step)."""
    from types import SimpleNamespace

    from rnnkit.export import recipes
    from rnnkit.models.seq2seq import Seq2Seq, Seq2SeqConfig

    torch.manual_seed(0)
    config = Seq2SeqConfig(
        src_vocab=15, tgt_vocab=12, embed_size=6, encoder_hidden=5, encoder_layers=1,
        decoder_hidden=7, attention_size=4, bridge="zero",
    )  # fmt: skip
    model = Seq2Seq(config).eval()
    g = torch.Generator().manual_seed(1)
    items = [torch.randint(3, 15, (n,), generator=g).tolist() for n in (5, 3, 7, 2, 1, 4)]
    data, task = SimpleNamespace(items=items), SimpleNamespace(eval_batch_size=4)
    exporter = recipes.Seq2SeqExporter()
    sessions = []
    for k, graph in enumerate(exporter.graphs(model, task, data)):
        recipes._export(graph, tmp_path / f"{k}.onnx")
        sessions.append(ort.InferenceSession(str(tmp_path / f"{k}.onnx")))
    assert [i.name for i in sessions[1].get_inputs()][1:3] == ["h0", "c0"]
    check = exporter.check(model, task, data, sessions, 0)
    assert check.difference <= recipes.TOLERANCE, (check.difference, check.worst)


def test_torchscript_onnx_refuses_a_packed_sequence_in_one_line() -> None:
    from test_export import PACKED, _PackedLSTM

    x, lengths = torch.randn(3, 5, 3), torch.tensor([5, 2, 4])
    with pytest.raises(ValueError, match=PACKED):
        onnx_legacy(_PackedLSTM().eval(), (x, lengths), ["x", "lengths"], {})


def test_torchscript_onnx_refuses_lengths_of_another_batch_naming_them() -> None:
    gru = rnnkit.GRU(3, 5).eval()
    x, lengths = torch.randn(5, 3, 3), torch.tensor([5, 2])
    with pytest.raises(
        ValueError, match=r"^lengths has 2 entries; expected one per sequence, B = 3"
    ):
        onnx_legacy(gru, (x, None, lengths), ["x", "lengths"], {})
