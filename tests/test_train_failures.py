"""How a training run ends when something goes wrong: a diverging loss stops at that batch and
keeps the last good checkpoint; a checkpoint holding NaN or a damaged progress record is refused;
a full disk or an unwritable --out is one line; Ctrl-C saves where it stopped, and --resume
continues exactly from there."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from recipe_helpers import TINY, cli_args, need_data
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_train import RESUMABLE, Killed, assert_same_run, kill_at

from rnnkit import cli
from rnnkit.errors import CheckpointError, RecipeError, StorageError, TrainingDiverged
from rnnkit.tasks.speech import SpeechTask
from rnnkit.train import CHECKSUMS, load_run, train

SRC = str(Path(__file__).resolve().parents[1] / "src")
ENV = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}


pytestmark = pytest.mark.usefixtures("one_thread")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "rnnkit.cli", *args, "--threads", "1", "--no-progress"]


def files(run: Path) -> dict[str, bytes]:
    """The run's files (not the lock that a run in progress holds there)."""
    return {p.name: p.read_bytes() for p in run.iterdir() if p.name != ".rnnkit.lock"}


def progress_of(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["progress"])


def one_error_line(err: str) -> str:
    """The last stderr line, which must be the only error output (no traceback)."""
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("rnnkit: "), err
    return last


def damage_tensor(path: Path, name: str, index: int = 0) -> None:
    """Overwrite the bytes of one float32 element of tensor ``name`` in a safetensors file with
    0xFF bytes (a NaN), as a flipped disk sector would."""
    data = bytearray(path.read_bytes())
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    assert header[name]["dtype"] == "F32"
    at = 8 + size + header[name]["data_offsets"][0] + 4 * index
    data[at : at + 4] = b"\xff\xff\xff\xff"
    path.write_bytes(bytes(data))


# -- non-finite values ---------------------------------------------------------------------------


@pytest.mark.slow
def test_a_nan_loss_stops_training_at_that_batch_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    need_data("speech")
    run = tmp_path / "run"
    collate, poison, snapshot = SpeechTask.collate, [False], {}

    def poisoned(self, data, batch):  # the training batch after step 5 holds a NaN feature
        out = collate(self, data, batch)
        if poison[0]:
            poison[0] = False
            out["x"][0, 0, 0] = float("nan")
        return out

    def keep(progress):
        if progress.step == 5:  # the checkpoint of batch 4 is on disk
            snapshot.update(files(run))
            poison[0] = True

    monkeypatch.setattr(SpeechTask, "collate", poisoned)
    with pytest.raises(TrainingDiverged) as caught:
        train("speech", RESUMABLE, out=run, progress=False, hook=keep)
    message = str(caught.value)
    assert "\n" not in message
    assert re.search(r"epoch 1/3, batch 6/\d+: the training loss is nan", message), message
    assert "--lr" in message and "--clip" in message
    assert files(run) == snapshot  # nothing written after the last good checkpoint
    assert progress_of(run / "resume.safetensors")["step"] == 4
    assert not (run / "metrics.json").exists()
    monkeypatch.undo()  # the last good checkpoint resumes to the end
    train("speech", {}, out=run, resume=True, progress=False)
    train("speech", RESUMABLE, out=tmp_path / "whole", progress=False)
    assert_same_run(tmp_path / "whole", run)


def test_a_non_finite_gradient_stops_training(tmp_path, monkeypatch):
    need_data("speech")
    loss, calls = SpeechTask.loss, [0]

    def poisoned(self, model, batch):  # a finite loss whose gradient is NaN (sqrt at 0)
        value, n = loss(self, model, batch)
        calls[0] += 1
        if calls[0] == 3:
            value = value + torch.sqrt(next(model.parameters()).sum() * 0)
        return value, n

    monkeypatch.setattr(SpeechTask, "loss", poisoned)
    with pytest.raises(
        TrainingDiverged, match=r"epoch 1/3, batch 3/\d+: the gradient norm is nan"
    ) as e:
        train("speech", RESUMABLE, out=tmp_path / "run", progress=False)
    # the advice is one a user can follow: a new run in this directory is refused
    assert "start a new run with another --out" in str(e.value)


@pytest.mark.slow
def test_a_diverging_learning_rate_exits_with_one_line(tmp_path):
    need_data("speech")
    run = tmp_path / "run"
    overrides = {**TINY["speech"], "batch_size": 8, "clip": 0, "checkpoint_every": 1}
    done = subprocess.run(
        _cli("train", "speech", "--out", str(run), *cli_args(overrides), "--lr", "3e37"),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    line = one_error_line(done.stderr)
    assert done.returncode == 1, done.stderr
    assert re.search(r"training diverged at epoch \d+/2, batch \d+/\d+: ", line), line
    assert "lower --lr (now 3e+37)" in line and "--clip" in line
    assert not (run / "metrics.json").exists()
    # The checkpoint left behind (after batch 1) holds finite numbers only.
    assert progress_of(run / "resume.safetensors")["step"] >= 1
    for key, value in load_file(run / "resume.safetensors").items():
        assert not value.is_floating_point() or torch.isfinite(value).all(), key


@pytest.fixture(scope="module")
def unfinished(tmp_path_factory):
    """A speech run interrupted after batch 5 (checkpoint after batch 4)."""
    need_data("speech")
    run = tmp_path_factory.mktemp("unfinished") / "run"
    torch.set_num_threads(1)
    with pytest.raises(Killed):
        train("speech", RESUMABLE, out=run, progress=False, hook=kill_at(5))
    return run


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    need_data("speech")
    run = tmp_path_factory.mktemp("finished") / "run"
    torch.set_num_threads(1)
    train("speech", TINY["speech"], out=run, progress=False)
    return run


def copy(run: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(run, to)
    return to


def without_checksums(path: Path) -> None:
    """The checkpoint at ``path`` as versions before checksums wrote it."""
    tensors, meta = read_checkpoint(path)
    del meta[CHECKSUMS]
    save_file(tensors, str(path), metadata=meta)


def test_a_model_with_a_nan_weight_is_refused(finished, tmp_path, capsys):
    run = copy(finished, tmp_path / "run")
    damage_tensor(run / "model.safetensors", "members.0.encoder.bias_hh_l0_reverse", 3)
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'members.0.encoder.bias_hh_l0_reverse' does not match the checksum written with it \(expected [0-9a-f]{16}, read [0-9a-f]{16}\); the file is damaged, or was changed after rnnkit wrote it"):  # fmt: skip
        load_run(run)
    without_checksums(run / "model.safetensors")  # then the NaN itself is what is named
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'members.0.encoder.bias_hh_l0_reverse' holds NaN"):  # fmt: skip
        load_run(run)
    assert cli.main(["evaluate", str(run)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "members.0.encoder.bias_hh_l0_reverse" in one_error_line(err)
    assert cli.main(["predict", str(run), "x.csv"]) == 2


def test_a_resume_checkpoint_with_damaged_weights_is_refused(unfinished, tmp_path):
    run = copy(unfinished, tmp_path / "run")
    damage_tensor(run / "resume.safetensors", "model.members.0.encoder.weight_hh_l0", 10)
    before = files(run)
    with pytest.raises(CheckpointError, match=r"resume.safetensors: tensor 'model.members.0.encoder.weight_hh_l0' does not match the checksum"):  # fmt: skip
        train("speech", {}, out=run, resume=True, progress=False)
    assert files(run) == before
    without_checksums(run / "resume.safetensors")
    before = files(run)
    with pytest.raises(CheckpointError, match=r"resume.safetensors: tensor 'model.members.0.encoder.weight_hh_l0' holds NaN"):  # fmt: skip
        train("speech", {}, out=run, resume=True, progress=False)
    assert files(run) == before


def test_a_flipped_bit_in_a_weight_is_found_and_a_damaged_record_named(finished, tmp_path):
    """A change no other check sees (a finite weight, one bit of its mantissa flipped)."""
    run = copy(finished, tmp_path / "run")
    path = run / "model.safetensors"
    data = bytearray(path.read_bytes())
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    data[8 + size + header["members.0.encoder.weight_ih_l0"]["data_offsets"][0]] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"tensor 'members.0.encoder.weight_ih_l0' does not match the checksum"):  # fmt: skip
        load_run(run)
    tensors, meta = read_checkpoint(path)
    save_file(tensors, str(path), metadata={**meta, CHECKSUMS: "[1, 2]"})
    with pytest.raises(CheckpointError, match=r"its record of checksums is damaged \(a list\)"):
        load_run(run)


NO_METRIC = {
    "epoch": 1,
    "batches": 4,
    "train_loss": 0.7,
    "lr": 0.001,
    "seconds": 1.0,
    "valid": {"loss": 0.5},
}


def rewrite_progress(path: Path, change) -> None:
    meta = read_checkpoint(path)[1]
    rewrite_meta(path, progress=change(json.loads(meta["progress"])))


def read_checkpoint(path: Path) -> tuple[dict, dict]:
    """A checkpoint's tensors and metadata."""
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def rewrite_meta(path: Path, **changes: str) -> None:
    """The checkpoint at ``path`` rewritten with ``changes`` to its metadata."""
    tensors, meta = read_checkpoint(path)
    save_file(tensors, str(path), metadata={**meta, **changes})


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda p: json.dumps({**p, "epoch": "two"}), "epoch = 'two'; expected an integer >= 0"),
        (lambda p: json.dumps({**p, "batch": -3}), "batch = -3; expected an integer >= 0"),
        (lambda p: json.dumps({**p, "batch": 999}), r"batch = 999; the epoch has only \d+"),
        (lambda p: json.dumps({**p, "history": [1]}), r"history\[0\] = 1; expected an object"),
        (  # an epoch's record whose metrics lack the task's (speech: accuracy)
            lambda p: json.dumps({**p, "history": [NO_METRIC]}),
            r"history\[0\]\.valid has no 'accuracy': \{'loss': 0\.5\}",
        ),
        (lambda p: json.dumps({"epoch": 1}), "missing bad_epochs, batch, best"),
        (lambda p: json.dumps({**p, "loss_sum": float("nan")}), "loss_sum = nan; expected"),
        (lambda p: json.dumps([1]), "expected an object"),
        (lambda p: '{"epoch": 1', "Expecting"),
    ],
)
def test_a_damaged_progress_record_is_one_line(unfinished, tmp_path, capsys, change, expected):
    run = copy(unfinished, tmp_path / "run")
    rewrite_progress(run / "resume.safetensors", change)
    before = files(run)
    code = cli.main(["train", "speech", "--out", str(run), "--resume", "--no-progress"])
    _, err = capsys.readouterr()
    line = one_error_line(err)
    assert code == 2, err
    assert "resume.safetensors: its progress record is damaged" in line
    assert re.search(expected, line), line
    assert files(run) == before


def test_damaged_optimizer_scalars_are_one_line(unfinished, tmp_path):
    run = copy(unfinished, tmp_path / "run")
    rewrite_meta(run / "resume.safetensors", optim_scalars='{"0": 5}')
    with pytest.raises(CheckpointError, match="the optimizer or RNG state is damaged"):
        train("speech", {}, out=run, resume=True, progress=False)


def _first_moment(tensors, meta):
    key = next(k for k in sorted(tensors) if k.startswith("optim.") and k.endswith(".exp_avg"))
    return key, tensors[key]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (  # a moment of another shape than its parameter
            lambda t, m: t.update({_first_moment(t, m)[0]: torch.zeros(3)}),
            r"state\[\d+\]\.exp_avg has shape \(3,\); expected \(",
        ),
        (
            lambda t, m: m.update(
                optim_groups=m["optim_groups"].replace('"betas": [0.9, 0.999]', '"betas": [2, 0]')
            ),
            r"param_groups\[0\]\.betas = \[2, 0\]; expected two numbers in \[0, 1\)",
        ),
        (
            lambda t, m: m.update(
                optim_groups=m["optim_groups"].replace('"initial_lr": ', '"initial_lr": "x", "_": ')
            ),
            r"param_groups\[0\]\.initial_lr = 'x'; expected a number >= 0",
        ),
    ],
)
def test_damaged_optimizer_settings_and_moments_are_named(unfinished, tmp_path, change, expected):
    run = copy(unfinished, tmp_path / "run")
    path = run / "resume.safetensors"
    tensors, meta = read_checkpoint(path)
    before = dict(meta), {k: v.shape for k, v in tensors.items()}
    change(tensors, meta)
    assert (meta, {k: v.shape for k, v in tensors.items()}) != before  # the change applied
    del meta[CHECKSUMS]  # as a file from before checksums: what the other checks see
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match="the optimizer or RNG state is damaged") as e:
        train("speech", {}, out=run, resume=True, progress=False)
    assert re.search(expected, str(e.value)), str(e.value)


@pytest.mark.parametrize("saved", [None, False, "yes"])
def test_a_checkpoint_saved_before_fused_steps_resumes_fused(unfinished, tmp_path, saved):
    """A run saved by a version whose AdamW was not fused (``"fused": null``), or whose record of
    it is damaged, resumes with this version's fused steps and finishes."""
    run = copy(unfinished, tmp_path / "run")
    path = run / "resume.safetensors"
    _, meta = read_checkpoint(path)
    groups = json.loads(meta["optim_groups"])
    assert [g["fused"] for g in groups] == [True]  # how this version saves it on the CPU
    rewrite_meta(path, optim_groups=json.dumps([{**g, "fused": saved} for g in groups]))
    train("speech", {}, out=run, resume=True, progress=False)
    assert (run / "metrics.json").exists()
    assert [g["fused"] for g in json.loads(read_checkpoint(path)[1]["optim_groups"])] == [True]


def test_a_resume_removes_the_drafts_a_killed_write_left(unfinished, tmp_path):
    run = copy(unfinished, tmp_path / "run")
    drafts = [run / ".resume.safetensors.4242.tmp", run / ".metrics.json.17.tmp"]
    kept = [run / "notes.tmp", run / ".resume.safetensors.tmp", run / "my.model.safetensors.1.tmp"]
    for path in drafts + kept:
        path.write_bytes(b"\x00" * 64)  # half a file, as a SIGKILL mid-write leaves
    train("speech", {}, out=run, resume=True, progress=False)
    assert not any(p.exists() for p in drafts)
    assert all(p.exists() for p in kept)  # files that are not rnnkit's drafts stay


@pytest.mark.parametrize("value", ["two", "-1", "0"])
def test_a_damaged_process_count_is_named(unfinished, tmp_path, capsys, value):
    run = copy(unfinished, tmp_path / "run")
    rewrite_meta(run / "resume.safetensors", world_size=value)
    before = files(run)
    code = cli.main(["train", "speech", "--out", str(run), "--resume", "--no-progress"])
    _, err = capsys.readouterr()
    assert code == 2, err
    line = one_error_line(err)
    assert f"processes that trained it is damaged (world_size = {value!r}" in line, line
    assert files(run) == before


def test_a_finished_run_of_two_processes_resumed_by_one_is_told_it_has_finished(
    finished, tmp_path, capsys
):
    """As with the same number of processes: nothing to resume; and the number to train it
    further with, in the same line."""
    run = copy(finished, tmp_path / "run")
    rewrite_meta(run / "resume.safetensors", world_size="2")
    before = files(run)
    code = cli.main(["train", "speech", "--out", str(run), "--resume", "--no-progress"])
    _, err = capsys.readouterr()
    assert code == 2, err
    line = one_error_line(err)
    assert "has finished" in line and "nothing to resume" in line, line
    assert "with 2 process(es)" in line and "--nproc-per-node=2" in line, line
    assert files(run) == before


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        (["--epochs", "0"], "epochs = 0; expected > 0"),
        (["--max-minutes", "-1"], "max_minutes = -1.0; expected >= 0"),
        (["--max-minutes", "inf"], "max_minutes = inf; expected a finite number"),
        (["--patience", "-2"], "patience = -2; expected >= 0"),
    ],
)
def test_a_bad_value_given_to_a_resume_is_one_line(unfinished, tmp_path, capsys, option, expected):
    run = copy(unfinished, tmp_path / "run")
    before = files(run)
    code = cli.main(["train", "speech", "--out", str(run), "--resume", "--no-progress", *option])
    _, err = capsys.readouterr()
    assert expected in one_error_line(err)
    assert code == 2, err
    assert files(run) == before


def test_an_unknown_option_given_to_a_resume_is_refused(unfinished, tmp_path, monkeypatch):
    run = copy(unfinished, tmp_path / "run")
    before = files(run)

    def no_loading(self):
        raise AssertionError("the run was resumed with an option it does not have")

    monkeypatch.setattr(SpeechTask, "load_splits", no_loading)
    with pytest.raises(RecipeError, match="hiden_size: not an option of speech"):
        train("speech", {"hiden_size": 8}, out=run, resume=True, progress=False)
    assert files(run) == before


# -- the run directory ---------------------------------------------------------------------------


def test_a_full_disk_is_one_line_and_keeps_the_files(unfinished, tmp_path, capsys, monkeypatch):
    run = copy(unfinished, tmp_path / "run")
    before = files(run)

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 100)  # part of the file got out
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    code = cli.main(["train", "speech", "--out", str(run), "--resume", "--no-progress"])
    _, err = capsys.readouterr()
    line = one_error_line(err)
    assert code == 1, err
    assert "cannot write" in line and "resume.safetensors" in line
    assert "No space left on device" in line and "unchanged" in line
    assert files(run) == before  # no temporary file left, nothing replaced
    monkeypatch.undo()
    train("speech", {}, out=run, resume=True, progress=False)  # the run goes on once there is room


def test_a_disk_full_while_the_run_directory_is_made_leaves_a_run_that_resumes(
    tmp_path, monkeypatch
):
    need_data("speech")
    import rnnkit.train

    write_json, written = rnnkit.train.write_json, []

    def fills_up(path, obj):
        if written:  # the first file of the run directory got out, the second does not
            raise StorageError(f"cannot write {path}: No space left on device")
        written.append(path.name)
        write_json(path, obj)

    run = tmp_path / "run"
    monkeypatch.setattr(rnnkit.train, "write_json", fills_up)
    with pytest.raises(StorageError):
        train("speech", TINY["speech"], out=run, progress=False)
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="already holds a run .*--resume"):
        train("speech", TINY["speech"], out=run, progress=False)
    metrics = train("speech", {}, out=run, resume=True, progress=False)
    assert metrics["epochs_run"] == TINY["speech"]["epochs"]
    assert (run / "vocab.json").exists()


@pytest.mark.slow
def test_a_disk_full_at_the_first_checkpoint_leaves_a_run_that_resumes(tmp_path, monkeypatch):
    # The first epoch's weights got out, its checkpoint did not: --resume starts the run over
    # (it rewrites those weights) instead of refusing a run that a new run refuses too.
    need_data("speech")
    save_file = safetensors.torch.save_file

    def no_room_for_checkpoints(tensors, filename, metadata=None):
        if "resume" in Path(filename).name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        save_file(tensors, filename, metadata=metadata)

    run = tmp_path / "run"
    monkeypatch.setattr(safetensors.torch, "save_file", no_room_for_checkpoints)
    with pytest.raises(StorageError, match="resume.safetensors"):
        train("speech", TINY["speech"], out=run, progress=False)
    monkeypatch.undo()
    assert {p.name for p in run.iterdir()} == {"config.json", "model.safetensors", "vocab.json"}
    train("speech", {}, out=run, resume=True, progress=False)
    train("speech", TINY["speech"], out=tmp_path / "whole", progress=False)
    assert_same_run(tmp_path / "whole", run)


def test_weights_of_a_later_epoch_without_a_checkpoint_are_not_overwritten(finished, tmp_path):
    run = copy(finished, tmp_path / "run")
    for name in ("resume.safetensors", "metrics.json"):  # the weights of its last epoch stay
        (run / name).unlink()
    before = files(run)
    with pytest.raises(CheckpointError, match="no resume.safetensors to continue from"):
        train("speech", {}, out=run, resume=True, progress=False)
    assert files(run) == before


def test_unwritable_out_is_refused_before_the_data_loads(tmp_path, capsys, monkeypatch):
    need_data("speech")

    def no_loading(self):
        raise AssertionError("the data was loaded before --out was checked")

    monkeypatch.setattr(SpeechTask, "load_splits", no_loading)
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory\n")
    cases = [
        (a_file, 2, f"--out {a_file} is a file; expected a directory"),
        (a_file / "run", 2, f"--out {a_file / 'run'}: {a_file} is a file, not a directory"),
    ]
    if Path("/sys").is_dir():  # sysfs: no one, root included, may create files there
        cases.append((Path("/sys/rnnkit-run"), 1, "--out /sys/rnnkit-run: cannot create files in /sys"))  # fmt: skip
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)
    if not os.access(read_only, os.W_OK):  # permissions bind (not root)
        cases.append((read_only / "run", 1, f"cannot create files in {read_only}"))
    try:
        for out, status, message in cases:
            for resume in ([], ["--resume"]):
                argv = ["train", "speech", "--out", str(out), *resume, "--epochs", "1"]
                code = cli.main(argv)
                _, err = capsys.readouterr()
                line = one_error_line(err)
                assert code == status and message in line, (out, resume, err)
    finally:
        read_only.chmod(0o755)
    assert a_file.read_text() == "not a directory\n"


# -- Ctrl-C --------------------------------------------------------------------------------------

ONE_EPOCH_AT_A_TIME = {**RESUMABLE, "batch_size": 4, "checkpoint_every": 0, "patience": 0}


@pytest.mark.slow
def test_ctrl_c_saves_the_batch_reached_and_resume_is_exact(tmp_path):
    need_data("speech")
    run = tmp_path / "run"

    def interrupt(progress):
        if progress.step == 20:  # mid-epoch 2: the last checkpoint is the end of epoch 1
            os.kill(os.getpid(), signal.SIGINT)

    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt, match=r"interrupted at epoch 2/3, batch 5/15"):
        train("speech", ONE_EPOCH_AT_A_TIME, out=run, progress=False, hook=interrupt)
    assert signal.getsignal(signal.SIGINT) == handler  # restored
    saved = progress_of(run / "resume.safetensors")
    assert (saved["epoch"], saved["batch"], saved["step"]) == (1, 5, 20)
    train("speech", {}, out=run, resume=True, progress=False)
    train("speech", ONE_EPOCH_AT_A_TIME, out=tmp_path / "whole", progress=False)
    assert_same_run(tmp_path / "whole", run)


@pytest.mark.slow
def test_sigint_exits_130_after_saving_and_resume_is_exact(tmp_path):
    need_data("speech")
    run = tmp_path / "run"
    # A constant rate: a schedule runs over the epochs set, which this test changes on resume.
    overrides = {**ONE_EPOCH_AT_A_TIME, "epochs": 60, "lr_schedule": "plateau"}
    proc = subprocess.Popen(
        _cli("train", "speech", "--out", str(run), *cli_args(overrides)),
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as from a terminal
    )
    try:
        deadline = time.monotonic() + 120
        while not (run / "resume.safetensors").exists() and proc.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.005)
        time.sleep(0.05)  # into the second epoch
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    line = one_error_line(err)
    reached = re.search(r"interrupted at epoch (\d+)/60, batch (\d+)/15", line)
    assert reached, line
    assert "--resume" in line
    saved = progress_of(run / "resume.safetensors")
    assert (saved["epoch"] + 1, saved["batch"]) == (int(reached[1]), int(reached[2]))
    assert saved["epoch"] < 4
    assert not (run / "metrics.json").exists()
    # Resumed to 4 epochs, the run equals one trained for 4 epochs without a break (the number
    # of epochs may change on resume; the batch order depends on the seed and epoch only).
    train("speech", {"epochs": 4}, out=run, resume=True, progress=False)
    train("speech", {**overrides, "epochs": 4}, out=tmp_path / "whole", progress=False)
    assert_same_run(tmp_path / "whole", run)


@pytest.mark.slow
def test_ctrl_c_in_validation_stops_at_once_and_resume_validates_again(tmp_path, monkeypatch):
    need_data("speech")
    run = tmp_path / "run"
    validate, calls = SpeechTask.validate, [0]

    def interrupted(self, model, data):
        calls[0] += 1
        if calls[0] == 2:  # the validation after epoch 2
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1.0)  # never reached: the interrupt stops validation at once
            raise AssertionError("validation went on after Ctrl-C")
        return validate(self, model, data)

    monkeypatch.setattr(SpeechTask, "validate", interrupted)
    with pytest.raises(KeyboardInterrupt, match=r"interrupted at epoch 2/3, batch 15/15"):
        train("speech", ONE_EPOCH_AT_A_TIME, out=run, progress=False)
    saved = progress_of(run / "resume.safetensors")
    assert (saved["epoch"], saved["batch"], len(saved["history"])) == (1, 15, 1)
    monkeypatch.undo()
    train("speech", {}, out=run, resume=True, progress=False)
    train("speech", ONE_EPOCH_AT_A_TIME, out=tmp_path / "whole", progress=False)
    assert_same_run(tmp_path / "whole", run)
