"""Streaming inference: a unidirectional classifier reads a sequence as it arrives, each frame
once from the state it reached, and gives after each frame the logits of the sequence so
far; ``rnnkit predict RUN --stream FILE`` prints that running prediction frame by frame."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import OUT_TOL
from recipe_helpers import TINY, need_data

from rnnkit.models import ClassifierEnsemble, SequenceClassifier
from rnnkit.models.classifier import POOLING
from rnnkit.train import predict, train

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.mark.parametrize("pooling", POOLING)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_pushing_frames_gives_the_logits_of_the_prefix(cell, pooling):
    torch.manual_seed(0)
    model = SequenceClassifier(5, input_size=4, cell=cell, hidden_size=6, num_layers=2,
                               bidirectional=False, pooling=pooling).eval()  # fmt: skip
    streams_exactly(model, torch.randn(3, 9, 4), (1, 3, 1, 4))  # pieces of any size


def streams_exactly(model, x: torch.Tensor, pieces: tuple[int, ...]) -> None:
    """Pushing ``x`` (B, T, features) in ``pieces`` gives after each piece the logits the model
    gives for the frames read so far."""
    reader = model.stream()
    seen = 0
    for n in pieces:
        logits = reader.push(x[:, seen : seen + n])
        seen += n
        with torch.no_grad():
            want = model(x[:, :seen], torch.full((len(x),), seen))
        torch.testing.assert_close(logits, want, atol=OUT_TOL, rtol=OUT_TOL)


def _held(reader) -> int:
    """How many numbers the stream keeps between pushes."""
    held = 0
    for value in vars(reader).values():
        for t in value if isinstance(value, tuple | list) else (value,):
            held += t.numel() if isinstance(t, torch.Tensor) else 0
    return held


@pytest.mark.parametrize("pooling", POOLING)
def test_a_long_stream_keeps_no_more_than_a_short_one(pooling):
    """The running pooling holds totals, not every output so far: after 300 frames the stream
    keeps what it kept after 3, and its logits are still the model's for all 300."""
    torch.manual_seed(0)
    model = SequenceClassifier(4, input_size=3, hidden_size=5, bidirectional=False,
                               pooling=pooling).eval()  # fmt: skip
    x = 3 * torch.randn(2, 300, 3)  # large scores: the attention's running maximum moves
    reader = model.stream()
    for t in range(3):
        reader.push(x[:, t : t + 1])
    early = _held(reader)
    for t in range(3, 300, 7):
        logits = reader.push(x[:, t : t + 7])
    assert _held(reader) == early
    with torch.no_grad():
        want = model(x, [300, 300])
    torch.testing.assert_close(logits, want, atol=OUT_TOL, rtol=OUT_TOL)


@pytest.mark.parametrize("kernel", [1, 3, 4])
def test_a_convolution_front_streams_exactly(kernel):
    torch.manual_seed(0)
    model = SequenceClassifier(5, input_size=4, hidden_size=6, bidirectional=False,
                               conv_channels=7, conv_kernel=kernel).eval()  # fmt: skip
    streams_exactly(model, torch.randn(2, 8, 4), (1, 2, 1, 4))  # shorter and longer than it


def test_an_ensemble_streams_exactly():
    torch.manual_seed(0)
    model = ClassifierEnsemble(
        lambda: SequenceClassifier(3, input_size=4, hidden_size=5, bidirectional=False,
                                   pooling="meanmax"), 2
    ).eval()  # fmt: skip
    streams_exactly(model, torch.randn(2, 7, 4), (3, 1, 3))
    bidirectional = ClassifierEnsemble(lambda: SequenceClassifier(3, input_size=4), 2)
    with pytest.raises(ValueError, match="bidirectional"):
        bidirectional.stream()


def test_a_bidirectional_classifier_cannot_stream():
    model = SequenceClassifier(5, input_size=4, hidden_size=6, bidirectional=True)
    with pytest.raises(ValueError, match="bidirectional encoder reads each sequence from its end"):
        model.stream()


def frames_csv(path: Path, count: int) -> Path:
    path.write_text(
        "\n".join(",".join(f"{0.1 * (i + j):.2f}" for j in range(12)) for i in range(count))
    )
    return path


@pytest.mark.slow
def test_predict_stream_prints_the_running_prediction_per_frame(tmp_path):
    need_data("speech")
    run = tmp_path / "run"
    uni = {**TINY["speech"], "bidirectional": False, "fcn_channels": 0}
    train("speech", uni, out=run, progress=False)
    utterance = frames_csv(tmp_path / "utterance.csv", 7)
    lines = list(predict(run, [str(utterance)], {"stream": True}))
    assert [line.split("\t")[0] for line in lines] == [f"frame {k}" for k in range(1, 8)]
    (whole,) = predict(run, [str(utterance)])
    speaker, prob, _ = whole.split("\t")
    _, last_speaker, last_prob = lines[-1].split("\t")
    assert last_speaker == speaker  # after the last frame: the prediction of the utterance
    assert abs(float(last_prob) - float(prob)) < 1e-3
    # from standard input, through the command line, as the lines arrive
    done = subprocess.run(
        [sys.executable, "-m", "rnnkit.cli", "predict", str(run), "--stream", "-"],
        input=utterance.read_text(),
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": SRC},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == lines


def test_predict_stream_refuses_a_bidirectional_model_and_bad_frames(tmp_path):
    need_data("speech")
    run = tmp_path / "run"
    train("speech", {**TINY["speech"], "epochs": 1}, out=run, progress=False)  # bidirectional
    utterance = frames_csv(tmp_path / "u.csv", 3)
    with pytest.raises(Exception, match="--stream needs a unidirectional model"):
        list(predict(run, [str(utterance)], {"stream": True}))
    # the convolutional branch reads each utterance whole
    branch = tmp_path / "branch"
    train(
        "speech",
        {**TINY["speech"], "epochs": 1, "bidirectional": False},
        out=branch,
        progress=False,
    )
    with pytest.raises(Exception, match="--stream needs a model without the convolutional branch"):
        list(predict(branch, [str(utterance)], {"stream": True}))
    uni = tmp_path / "uni"
    train(
        "speech",
        {**TINY["speech"], "epochs": 1, "bidirectional": False, "fcn_channels": 0},
        out=uni,
        progress=False,
    )
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join([",".join(["0.1"] * 12), ",".join(["0.1"] * 11 + ["nan"])]))
    lines = predict(uni, [str(bad)], {"stream": True})
    assert next(lines).startswith(
        "frame 1\t"
    )  # the first frame is answered before the second is read
    with pytest.raises(
        Exception, match=r"bad.csv line 2, column 12: nan; expected a finite number"
    ):
        next(lines)
    with pytest.raises(Exception, match="--stream reads one source; got 2 inputs"):
        predict(uni, [str(bad), str(bad)], {"stream": True})
