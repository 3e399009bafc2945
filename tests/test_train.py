"""The shared training loop: exact resume (after an exception and after SIGKILL), run-directory
safety (nothing overwritten, corrupt files named), early stopping and the time limit."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from recipe_helpers import TINY, cli_args, need_data
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from rnnkit.errors import CheckpointError
from rnnkit.tasks.speech import SpeechTask
from rnnkit.train import adamw, default_out, evaluate, load_run, predict, train

SRC = str(Path(__file__).resolve().parents[1] / "src")
# Several batches per epoch and a checkpoint after every other batch.
RESUMABLE = {**TINY["speech"], "epochs": 3, "batch_size": 8, "checkpoint_every": 2}


pytestmark = pytest.mark.usefixtures("one_thread")


class Killed(Exception):
    pass


def kill_at(step: int):
    def hook(progress):
        if progress.step == step:
            raise Killed

    return hook


def assert_same_run(a: Path, b: Path) -> None:
    """Two runs ended with bit-identical weights, optimizer state and metrics."""
    for name in ("model.safetensors", "resume.safetensors"):
        ta, tb = load_file(a / name), load_file(b / name)
        assert ta.keys() == tb.keys()
        for key in ta:
            assert torch.equal(ta[key], tb[key]), f"{name}: {key} differs"
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    assert ma["valid"] == mb["valid"] and ma["test"] == mb["test"]
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in ma["history"]]
    assert strip == [{k: v for k, v in h.items() if k != "seconds"} for h in mb["history"]]


@pytest.mark.slow
def test_resume_after_an_interruption_gives_identical_weights(tmp_path):
    need_data("speech")
    train("speech", RESUMABLE, out=tmp_path / "whole", progress=False)
    for step in (5, 8, 11):  # mid-epoch after a checkpoint, at an epoch's end, mid-epoch again
        run = tmp_path / f"killed-{step}"
        with pytest.raises(Killed):
            train("speech", RESUMABLE, out=run, progress=False, hook=kill_at(step))
        assert not (run / "metrics.json").exists()
        train("speech", {}, out=run, resume=True, progress=False)
        assert_same_run(tmp_path / "whole", run)


@pytest.mark.slow
def test_resume_in_an_epoch_of_another_length_keeps_the_schedule(tmp_path):
    need_data("charlm")
    # 4010 characters in windows of 32 from a random offset: 124 or 125 windows, 4 or 5 batches
    # of 31, so the second epoch is a batch longer than the first.
    overrides = {**TINY["charlm"], "limit": 4010, "batch_size": 31, "epochs": 2}
    overrides["lr_schedule"] = "linear"
    whole = train("charlm", overrides, out=tmp_path / "whole", progress=False)
    assert [h["batches"] for h in whole["history"]] == [4, 5]
    run = tmp_path / "killed"
    with pytest.raises(Killed):  # in the second epoch, after the first epoch's checkpoint
        train("charlm", overrides, out=run, progress=False, hook=kill_at(5))
    train("charlm", {}, out=run, resume=True, progress=False)
    assert_same_run(tmp_path / "whole", run)


def assert_started_over_matches(task, overrides, tmp_path, written):
    """Kill ``task`` before its first checkpoint (after it wrote ``written``), resume it, and
    check it ends as the run that was never interrupted."""
    run = tmp_path / "run"
    with pytest.raises(Killed):
        train(task, overrides, out=run, progress=False, hook=kill_at(1))
    assert (run / written).exists() and not (run / "resume.safetensors").exists()
    train(task, {}, out=run, resume=True, progress=False)
    train(task, overrides, out=tmp_path / "whole", progress=False)
    assert_same_run(tmp_path / "whole", run)


@pytest.mark.slow
def test_resume_before_the_first_checkpoint_starts_over(tmp_path):
    need_data("speech")
    assert_started_over_matches("speech", RESUMABLE, tmp_path, "config.json")


def test_a_sentiment_run_started_over_begins_from_the_word_vectors(tmp_path):
    # Killed before its first checkpoint, the run is started over by --resume from the saved
    # vocab.json: it must begin from the GloVe vectors as the uninterrupted run does, not from
    # random embeddings (nor freeze random rows with --freeze-vectors).
    need_data("sentiment")
    need_data("glove")
    overrides = {**TINY["sentiment"], "vectors": "glove50", "epochs": 1, "ensemble": 1}
    overrides.pop("embed_size")
    assert_started_over_matches("sentiment", overrides, tmp_path, "vocab.json")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "rnnkit.cli", *args, "--threads", "1", "--no-progress"]


def _step(path: Path) -> int:
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads(f.metadata()["progress"])["step"]
    except Exception:  # not written yet
        return -1


@pytest.mark.slow
def test_sigkill_then_resume_gives_identical_weights(tmp_path):
    need_data("speech")
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    overrides = {**RESUMABLE, "epochs": 6, "checkpoint_every": 1}
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    train("speech", overrides, out=whole, progress=False)  # uninterrupted, in this process
    proc = subprocess.Popen(
        _cli("train", "speech", "--out", str(killed), *cli_args(overrides)),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while _step(killed / "resume.safetensors") < 12 and proc.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "metrics.json").exists()
    done = subprocess.run(
        _cli("train", "speech", "--out", str(killed), "--resume"),
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    assert "resuming" in done.stderr
    assert done.stdout.strip().splitlines()[-1].startswith("test accuracy=")
    assert_same_run(whole, killed)


def test_resuming_a_finished_run_is_refused(tmp_path):
    need_data("speech")
    run = tmp_path / "run"
    train("speech", TINY["speech"], out=run, progress=False)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(CheckpointError, match=r"has finished .*nothing to resume"):
        train("speech", {}, out=run, resume=True, progress=False)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_resume_with_different_options_is_refused(tmp_path):
    need_data("speech")
    run = tmp_path / "run"
    with pytest.raises(Killed):
        train("speech", RESUMABLE, out=run, progress=False, hook=kill_at(5))
    with pytest.raises(CheckpointError, match=r"hidden_size = 16 in the run, 32 given"):
        train("speech", {"hidden_size": 32}, out=run, resume=True, progress=False)
    with pytest.raises(CheckpointError, match="holds a speech run, not sentiment"):
        train("sentiment", {}, out=run, resume=True, progress=False)
    with pytest.raises(CheckpointError, match="nothing to resume"):
        train("speech", {}, out=tmp_path / "empty", resume=True, progress=False)
    # The number of epochs may change: the run goes on to the new end.
    metrics = train("speech", {"epochs": 4}, out=run, resume=True, progress=False)
    assert metrics["epochs_run"] == 4 and metrics["config"]["epochs"] == 4


def test_options_raised_on_a_resume_hold_when_it_is_resumed_again(tmp_path):
    need_data("speech")
    run = tmp_path / "run"
    train("speech", {**TINY["speech"], "epochs": 1}, out=run, progress=False)  # 4 batches
    with pytest.raises(Killed):  # in the second epoch, which --epochs 2 allowed
        train("speech", {"epochs": 2}, out=run, resume=True, progress=False, hook=kill_at(6))
    metrics = train("speech", {}, out=run, resume=True, progress=False)
    assert metrics["epochs_run"] == 2 and metrics["stopped"] == "2 epochs"
    assert [h["batches"] for h in metrics["history"]] == [4, 4]
    assert json.loads((run / "config.json").read_text())["config"]["epochs"] == 2


def test_a_new_run_never_overwrites_an_old_one(tmp_path):
    need_data("speech")
    run = tmp_path / "run"
    train("speech", TINY["speech"], out=run, progress=False)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(CheckpointError, match=r"already holds a run .*--resume"):
        train("speech", TINY["speech"], out=run, progress=False)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def test_default_run_directory_is_never_reused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert default_out("speech", resume=False) == Path("runs/speech")
    Path("runs/speech").mkdir(parents=True)
    assert default_out("speech", resume=False) == Path("runs/speech")  # empty: fine
    Path("runs/speech/config.json").write_text("{}")
    assert default_out("speech", resume=False) == Path("runs/speech-2")
    assert default_out("speech", resume=True) == Path("runs/speech")


def test_runs_started_side_by_side_never_share_a_run_directory(tmp_path, monkeypatch):
    # Seeds trained side by side, each with the default --out: the second starts while the
    # first still loads its data (nothing written yet), and must neither train into the first's
    # directory nor have its files replaced by the first's.
    need_data("speech")
    monkeypatch.chdir(tmp_path)
    load, started = SpeechTask.load_splits, []

    def load_while_another_starts(self):
        if not started:
            started.append(True)
            for out, resume in (("runs/speech", False), ("runs/speech", True)):
                with pytest.raises(CheckpointError, match="runs/speech is in use by another"):
                    train("speech", TINY["speech"], out=out, resume=resume, progress=False)
            train("speech", {**TINY["speech"], "seed": 1}, progress=False)
        return load(self)

    monkeypatch.setattr(SpeechTask, "load_splits", load_while_another_starts)
    first = train("speech", TINY["speech"], progress=False)
    seeds = {
        d: json.loads((tmp_path / "runs" / d / "config.json").read_text())["config"]["seed"]
        for d in ("speech", "speech-2")
    }
    assert seeds == {"speech": 0, "speech-2": 1}
    metrics = json.loads((tmp_path / "runs/speech/metrics.json").read_text())
    assert metrics["seed"] == 0 and metrics["test"] == first["test"]
    names = {p.name for p in (tmp_path / "runs/speech").iterdir()}
    assert "model.safetensors" in names and ".rnnkit.lock" not in names  # gone with the run


def test_corrupt_files_are_named_and_left_alone(tmp_path):
    need_data("speech")
    run = tmp_path / "run"
    with pytest.raises(Killed):
        train("speech", RESUMABLE, out=run, progress=False, hook=kill_at(9))
    state = run / "resume.safetensors"
    state.write_bytes(state.read_bytes()[:100])
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(CheckpointError, match=r"resume.safetensors cannot be read .*corrupt"):
        train("speech", {}, out=run, resume=True, progress=False)
    model = run / "model.safetensors"
    model.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match=r"model.safetensors cannot be read .*corrupt"):
        evaluate(run)
    (run / "config.json").write_text('{"task": "speech", "config": {"hidden_si')
    with pytest.raises(CheckpointError, match=r"config.json cannot be read .*corrupt"):
        evaluate(run)
    (run / "config.json").write_text('{"task": "speech", "config": {"hidden_sighs": 3}}')
    with pytest.raises(CheckpointError, match="does not describe a speech config"):
        evaluate(run)
    before.pop("model.safetensors")
    after = {p.name: p.read_bytes() for p in run.iterdir()}
    assert all(after[k] == v for k, v in before.items() if k != "config.json")


def test_a_damaged_subword_model_in_vocab_json_is_named(tmp_path):
    # translate's vocab.json holds its sentencepiece model (base64): a damaged one is a
    # CheckpointError naming the file for evaluate, predict and --resume alike.
    pytest.importorskip("sentencepiece")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"task": "translate", "config": {}}))
    damaged = base64.b64encode(b"\x0a\x05piece\x12\x03").decode("ascii")  # cut short
    vocab = {"units": "unigram", "tags": True, "sentencepiece": damaged}
    (run / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(CheckpointError, match=r"run/vocab.json is damaged: .*sentencepiece"):
        load_run(run)


def test_a_config_naming_an_unknown_task_is_named(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"task": "speach", "config": {}}')
    for command in (lambda: evaluate(run), lambda: predict(run, ["x"])):
        with pytest.raises(CheckpointError, match=r"run/config.json names a task .*'speach'"):
            command()
    with pytest.raises(CheckpointError, match=r"run/config.json names a task .*'speach'"):
        train("speech", {}, out=run, resume=True, progress=False)


def test_weights_that_do_not_fit_the_config_are_named(tmp_path):
    need_data("speech")
    a, b = tmp_path / "a", tmp_path / "b"
    train("speech", TINY["speech"], out=a, progress=False)
    train("speech", {**TINY["speech"], "hidden_size": 8}, out=b, progress=False)
    (a / "model.safetensors").write_bytes((b / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="does not fit the model that config.json and vocab"):
        evaluate(a)


@pytest.mark.parametrize("task", [pytest.param("g2p", marks=pytest.mark.slow), "speech"])
def test_a_run_saved_before_ensembles_loads_as_one_model(tmp_path, task):
    """A config saved without ``ensemble`` (the option did not exist) was one model, whatever
    the recipe's default is now: evaluate, predict and resume read it so."""
    need_data(task)
    run = tmp_path / "run"
    train(task, {**TINY[task], "ensemble": 1}, out=run, progress=False)
    saved = json.loads((run / "config.json").read_text())
    del saved["config"]["ensemble"]
    (run / "config.json").write_text(json.dumps(saved))
    _, model = load_run(run)
    assert not hasattr(model, "members")
    assert evaluate(run)["test"]["n"] > 0
    train(task, {"epochs": TINY[task]["epochs"] + 1}, out=run, resume=True, progress=False)
    assert json.loads((run / "config.json").read_text())["config"]["ensemble"] == 1


@pytest.mark.slow
def test_a_run_saved_before_right_to_left_members_loads_with_none(tmp_path):
    """A g2p config saved without ``right_to_left`` had every member write left to right, though
    g2p's default now splits its ensemble between the two directions."""
    need_data("g2p")
    run = tmp_path / "run"
    train("g2p", {**TINY["g2p"], "right_to_left": False}, out=run, progress=False)
    saved = json.loads((run / "config.json").read_text())
    del saved["config"]["right_to_left"]
    (run / "config.json").write_text(json.dumps(saved))
    _, model = load_run(run)
    assert model.reverse == (False, False)
    assert evaluate(run)["test"]["n"] > 0
    # today's default: the second member writes right to left
    train("g2p", TINY["g2p"], out=tmp_path / "now", progress=False)
    assert load_run(tmp_path / "now")[1].reverse == (False, True)


@pytest.mark.slow
def test_a_speech_run_saved_before_the_conv_branch_loads_without_it(tmp_path):
    """A speech config saved without ``fcn_channels`` had no convolutional branch, though speech
    now has one by default."""
    need_data("speech")
    run = tmp_path / "run"
    train("speech", {**TINY["speech"], "fcn_channels": 0}, out=run, progress=False)
    saved = json.loads((run / "config.json").read_text())
    del saved["config"]["fcn_channels"]
    (run / "config.json").write_text(json.dumps(saved))
    _, model = load_run(run)
    assert all(member.branch is None for member in model.members)
    assert evaluate(run)["test"]["n"] > 0
    today = {k: v for k, v in TINY["speech"].items() if k != "fcn_channels"}  # the default
    train("speech", {**today, "epochs": 1}, out=tmp_path / "now", progress=False)
    assert all(m.branch is not None for m in load_run(tmp_path / "now")[1].members)


@pytest.mark.slow
def test_early_stopping_and_time_limit(tmp_path):
    need_data("speech")
    frozen = train(
        "speech",
        {**TINY["speech"], "epochs": 5, "lr": 0.0, "patience": 2, "keep": "best"},
        out=tmp_path / "frozen",
        progress=False,
    )
    assert frozen["epochs_run"] == 3 and frozen["best_epoch"] == 1
    assert frozen["stopped"] == "no better validation accuracy in 2 epochs"
    timed = train(
        "speech",
        {**TINY["speech"], "epochs": 50, "max_minutes": 1e-6},
        out=tmp_path / "timed",
        progress=False,
    )
    assert timed["epochs_run"] == 1 and timed["stopped"].startswith("time limit")
    assert timed["history"][0]["batches"] == 1


def test_learning_rate_decays_after_each_epoch_without_improvement(tmp_path):
    need_data("speech")
    # A rate far below float32 resolution leaves the weights as they are: from the second epoch
    # on, no epoch improves, and each multiplies the rate by lr_decay.
    run = train(
        "speech",
        {
            **TINY["speech"],
            "epochs": 4,
            "lr": 1e-12,
            "lr_decay": 0.5,
            "patience": 0,
            "lr_schedule": "plateau",
            "keep": "best",
        },
        out=tmp_path / "decay",
        progress=False,
    )
    assert run["best_epoch"] == 1
    assert [h["lr"] for h in run["history"]] == [1e-12, 1e-12, 5e-13, 2.5e-13]


def test_lr_factor_of_the_schedules():
    from rnnkit.train import lr_factor

    assert [lr_factor("plateau", k, 4) for k in range(5)] == [1.0] * 5
    assert [lr_factor("linear", k, 4) for k in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    cosine = [lr_factor("cosine", k, 4) for k in range(5)]
    torch.testing.assert_close(torch.tensor(cosine), torch.tensor([1.0, 0.8536, 0.5, 0.1464, 0.0]),
                               atol=1e-4, rtol=0)  # fmt: skip
    assert lr_factor("linear", 9, 4) == 0.0  # past the end (more epochs on a resume): none
    # With a time budget the schedule stands at the further along of steps and time spent.
    assert lr_factor("linear", 1, 4, seconds=30.0, budget=60.0) == 0.5
    assert lr_factor("linear", 3, 4, seconds=30.0, budget=60.0) == 0.25
    assert lr_factor("linear", 1, 4, seconds=90.0, budget=60.0) == 0.0
    assert lr_factor("cosine", 0, 4, seconds=30.0, budget=60.0) == pytest.approx(0.5)
    assert lr_factor("plateau", 1, 4, seconds=90.0, budget=60.0) == 1.0
    # decay_share: held at lr, then falling over the last share of the run.
    held = [lr_factor("linear", k, 8, decay_share=0.25) for k in range(9)]
    assert held == [1.0] * 7 + [0.5, 0.0]
    assert lr_factor("linear", 0, 8, seconds=45.0, budget=60.0, decay_share=0.5) == 0.5
    assert lr_factor("cosine", 7, 8, decay_share=0.25) == pytest.approx(0.5)


def test_decay_share_holds_the_rate_then_falls_to_zero(tmp_path):
    need_data("speech")
    config = {**TINY["speech"], "epochs": 4, "batch_size": 8, "lr": 0.01, "lr_schedule": "linear",
              "decay_share": 0.5, "keep": "last"}  # fmt: skip
    run = train("speech", config, out=tmp_path / "run", progress=False)
    per_epoch = run["history"][0]["batches"]
    rates = [h["lr"] for h in run["history"]]
    assert rates[:2] == [0.01, 0.01]  # the first half: held
    # Each epoch records the rate of its last step; epoch 3's falls within the second half.
    assert rates[2] == pytest.approx(
        0.01 * (1 - ((3 * per_epoch - 1) / (4 * per_epoch) - 0.5) / 0.5)
    )
    assert rates[3] < rates[2] < 0.01 and rates[3] < 0.01 / per_epoch


@pytest.mark.slow
def test_a_schedule_by_time_reaches_zero_when_the_time_limit_ends_the_run(tmp_path):
    need_data("speech")
    from rnnkit.train import lr_factor

    config = {**TINY["speech"], "epochs": 100_000, "lr": 0.01, "lr_schedule": "linear",
              "keep": "last", "max_minutes": 0.03, "schedule_by_time": True}  # fmt: skip
    run = train("speech", config, out=tmp_path / "run", progress=False)
    assert run["stopped"].startswith("time limit")
    per_epoch = run["history"][0]["batches"]
    rates = [h["lr"] for h in run["history"]]
    assert rates == sorted(rates, reverse=True)
    # Far fewer steps than the epochs hold were taken, yet the rate fell by the time spent:
    # well below the rate of the steps' share, near 0 at the end.
    steps = len(rates) * per_epoch
    assert rates[-1] < 0.01 * lr_factor("linear", steps, 100_000 * per_epoch) / 2
    assert rates[-1] < 0.01 * 0.5


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_a_schedule_lowers_the_rate_every_step_to_zero_at_the_end(tmp_path, schedule):
    need_data("speech")
    from rnnkit.train import lr_factor

    config = {**TINY["speech"], "epochs": 3, "batch_size": 8, "lr": 0.01,
              "lr_schedule": schedule, "keep": "best", "lr_decay": 1.0}  # fmt: skip
    run = train("speech", config, out=tmp_path / "run", progress=False)
    per_epoch = run["history"][0]["batches"]
    total = 3 * per_epoch
    # Each epoch records the rate of its last step, (epoch * per_epoch - 1) steps in.
    for k, h in enumerate(run["history"], 1):
        want = 0.01 * lr_factor(schedule, k * per_epoch - 1, total)
        assert h["lr"] == pytest.approx(want, rel=1e-9), (k, h["lr"], want)
    assert run["history"][-1]["lr"] < 0.01 / total


@pytest.mark.slow
def test_keep_last_keeps_the_last_epoch_without_early_stopping(tmp_path):
    need_data("speech")
    # lr 0: no epoch is better than the first, so "best" keeps epoch 1 and stops by patience;
    # "last" trains every epoch and keeps the weights the run ended with.
    config = {**TINY["speech"], "epochs": 4, "lr": 0.0, "patience": 1, "keep": "last"}
    run = train("speech", config, out=tmp_path / "last", progress=False)
    assert run["epochs_run"] == 4 and run["best_epoch"] == 4
    assert run["stopped"] == "4 epochs"
    config = {**TINY["speech"], "epochs": 4, "batch_size": 8, "keep": "last"}
    run = train("speech", config, out=tmp_path / "trained", progress=False)
    kept = load_file(tmp_path / "trained" / "model.safetensors")
    state = load_file(tmp_path / "trained" / "resume.safetensors")
    for key in kept:
        assert torch.equal(kept[key], state[f"model.{key}"]), key


@pytest.mark.slow
def test_resume_with_averaged_weights_gives_identical_weights(tmp_path):
    need_data("speech")
    averaged = {**RESUMABLE, "average": 0.9}
    train("speech", averaged, out=tmp_path / "whole", progress=False)
    saved = load_file(tmp_path / "whole" / "resume.safetensors")
    assert any(k.startswith("average.") for k in saved)
    for step in (5, 8):  # mid-epoch after a checkpoint, at an epoch's end
        run = tmp_path / f"killed-{step}"
        with pytest.raises(Killed):
            train("speech", averaged, out=run, progress=False, hook=kill_at(step))
        train("speech", {}, out=run, resume=True, progress=False)
        assert_same_run(tmp_path / "whole", run)


@pytest.mark.parametrize("keep", ["best", "last"])
@pytest.mark.slow
def test_a_finished_run_given_more_epochs_trains_on_from_its_last_weights(tmp_path, keep):
    """The final evaluation loads the kept weights (best, or the average); the checkpoint left
    after it still holds the weights training reached, so more epochs go on from them exactly."""
    need_data("speech")
    config = {**RESUMABLE, "lr_schedule": "plateau", "average": 0.9, "keep": keep, "patience": 0}
    train("speech", config, out=tmp_path / "whole", progress=False)
    run = tmp_path / "run"
    train("speech", {**config, "epochs": 2}, out=run, progress=False)
    train("speech", {"epochs": 3}, out=run, resume=True, progress=False)
    assert_same_run(tmp_path / "whole", run)


def test_averaged_weights_are_the_moving_average_that_is_kept():
    from torch import nn

    from rnnkit.train import average_of, update_average

    model = nn.Linear(3, 2)
    averaged = average_of(model)
    assert not any(p.requires_grad for p in averaged.parameters())
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    update_average(averaged, model, decay=0.99, step=1)  # d = min(0.99, 2 / 11)
    d = 2 / 11
    torch.testing.assert_close(averaged.weight, d * start + (1 - d) * model.weight)
    before = averaged.weight.clone()
    update_average(averaged, model, decay=0.5, step=1000)  # d = 0.5
    torch.testing.assert_close(averaged.weight, 0.5 * before + 0.5 * model.weight)


def test_an_averaged_run_keeps_the_average_and_trains_as_a_plain_one(tmp_path):
    need_data("speech")
    # Stopped in the first batch of the second epoch: the checkpoint on disk is the first epoch's,
    # saved after its validation.
    for name, extra in (("plain", {}), ("avg", {"average": 0.9})):
        with pytest.raises(Killed):
            config = {**RESUMABLE, **extra}
            train("speech", config, out=tmp_path / name, progress=False, hook=kill_at(9))
    plain = load_file(tmp_path / "plain" / "resume.safetensors")
    state = load_file(tmp_path / "avg" / "resume.safetensors")
    kept = load_file(tmp_path / "avg" / "model.safetensors")
    assert not any(k.startswith("average.") for k in plain)
    for key in kept:
        # The live weights train exactly as without averaging; the weights kept (validated and
        # saved as the best) are the average, which differs from them.
        assert torch.equal(state[f"model.{key}"], plain[f"model.{key}"]), key
        assert torch.equal(kept[key], state[f"average.{key}"]), key
    key = next(k for k in kept if k.endswith("weight_ih_l0"))
    assert not torch.allclose(kept[key], state[f"model.{key}"])


def _flushing() -> bool:
    """Whether this thread's arithmetic flushes subnormals to zero."""
    return (torch.tensor(torch.finfo(torch.float32).tiny) / 16).item() == 0


@pytest.mark.parametrize("flush", [True, False])
def test_training_on_the_cpu_flushes_subnormals_and_restores_after(tmp_path, flush):
    need_data("speech")
    seen = []
    config = {**TINY["speech"], "epochs": 1, "flush_denormals": flush}
    assert not _flushing()
    train("speech", config, out=tmp_path / "run", progress=False,
          hook=lambda p: seen.append(_flushing()))  # fmt: skip
    assert seen and set(seen) == {flush}
    assert not _flushing()  # the caller's setting is back


def test_the_fused_adamw_takes_the_default_adamws_steps():
    """The recipes' optimizer is torch's fused AdamW where the device has it, with the learning
    rate and weight decay it is given: its steps are the default implementation's to rounding."""
    torch.manual_seed(0)
    shapes = [(64, 32), (64,), (7, 3, 5)]
    start = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(5)]
    runs = {}
    for name, make in {
        "fused": lambda ps: adamw(ps, 3e-3, 0.1, torch.device("cpu")),
        "default": lambda ps: torch.optim.AdamW(ps, lr=3e-3, weight_decay=0.1),
    }.items():
        params = [nn.Parameter(t.clone()) for t in start]
        opt = make(params)
        for step in grads:
            for p, g in zip(params, step, strict=True):
                p.grad = g.clone()
            opt.step()
        runs[name] = (opt, params)
    assert runs["fused"][0].defaults["fused"] is True
    assert runs["default"][0].defaults["fused"] is None
    for a, b, s in zip(runs["fused"][1], runs["default"][1], start, strict=True):
        assert not torch.equal(a, s)  # the steps moved it
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # where torch has no fused kernel for the device, torch's default
    meta = adamw([nn.Parameter(torch.zeros(3, device="meta"))], 1e-3, 0.0, torch.device("meta"))
    assert meta.defaults["fused"] is None


def test_eta_is_the_rate_so_far_and_never_negative():
    from rnnkit.train import _clock, _eta

    assert _eta(30, 20.0, 10) == 60.0  # 10 batches in 20 s, 30 to go
    assert _eta(-1, 20.0, 10) == 0.0  # an epoch one batch longer than the bar counts
    assert _eta(5, 0.0, 0) == 0.0
    assert _clock(_eta(-1, 20.0, 10)) == "0:00:00"
