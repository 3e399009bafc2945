"""--device and --precision: device names and what this machine has (CUDA mocked where a GPU would
be needed), batches and models on the device, autocast in training and evaluation, fp16 loss
scaling that skips overflowing steps and resumes exactly, and checkpoints that move between
devices."""

from __future__ import annotations

import json

import pytest
import torch
from recipe_helpers import TINY, need_data
from safetensors import safe_open
from test_train import Killed, assert_same_run, kill_at

import rnnkit.train as train_module
from rnnkit import devices
from rnnkit.cli import main
from rnnkit.devices import autocast, check_precision, resolve_device, to_device
from rnnkit.distributed import World
from rnnkit.errors import DeviceError, RecipeError, TrainingDiverged
from rnnkit.tasks.speech import SpeechTask
from rnnkit.train import _restore_state, _rng_states, _save_state, evaluate, load_run, train

RESUMABLE = {**TINY["speech"], "epochs": 3, "batch_size": 8, "checkpoint_every": 2}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def two_gpus(monkeypatch):
    """A machine with two CUDA devices, as far as device selection can tell."""
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("rnnkit: error: ")
    return lines[0]


# -- device names -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "gpu",
        "cuda:",
        "cuda:-1",
        "cpu:0",
        "mps:1",
        "CUDA",
        "",
        "tpu",
        "cpu\n",
        "auto\n",
        "cuda:\u0663",
    ],
)
def test_a_device_name_that_means_nothing_is_a_usage_error(name, capsys, tmp_path):
    for argv in (
        ["train", "speech", "--out", str(tmp_path / "run"), "--device", name],
        ["evaluate", str(tmp_path / "run"), "--device", name],
        ["predict", str(tmp_path / "run"), "x.csv", "--device", name],
    ):
        assert main(argv) == 2, argv
        line = one_error_line(capsys.readouterr().err)
        assert f"--device {name!r}; expected auto, cpu, cuda, cuda:N" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_without_a_gpu_is_an_environment_error(name, capsys, tmp_path):
    for argv in (
        ["train", "speech", "--out", str(tmp_path / "run"), "--device", name],
        ["evaluate", str(tmp_path / "run"), "--device", name],
    ):
        assert main(argv) == 1, argv
        line = one_error_line(capsys.readouterr().err)
        assert line.startswith(f"rnnkit: error: --device {name}: ")
        assert "use --device cpu" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_mps_where_there_is_none_is_an_environment_error(capsys, tmp_path):
    assert main(["train", "speech", "--out", str(tmp_path / "run"), "--device", "mps"]) == 1
    assert "MPS backend is not available here" in one_error_line(capsys.readouterr().err)


def test_auto_is_the_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_cuda_devices_are_chosen_by_name_and_by_local_rank(two_gpus):
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match=r"--device cuda:2: 2 CUDA device\(s\) are visible"):
        resolve_device("cuda:2")
    # Under torchrun, each process on a machine takes its own GPU.
    assert resolve_device("auto", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("cuda", local_rank=0) == torch.device("cuda", 0)
    with pytest.raises(DeviceError, match=r"LOCAL_RANK 2 needs cuda:2, but 2 CUDA"):
        resolve_device("cuda", local_rank=2)
    with pytest.raises(RecipeError, match=r"names one GPU for every process") as e:
        resolve_device("cuda:1", local_rank=1)
    assert e.value.exit_code == 2
    with pytest.raises(RecipeError, match=r"several processes on one MPS device"):
        resolve_device("mps", local_rank=0)


def test_bf16_on_a_gpu_without_it_is_an_environment_error(two_gpus, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    with pytest.raises(DeviceError, match=r"Tesla V100 does not support bfloat16; use"):
        check_precision(torch.device("cuda", 0), "bf16")
    check_precision(torch.device("cuda", 0), "fp16")
    check_precision(torch.device("cpu"), "bf16")
    with pytest.raises(RecipeError, match=r"--precision 'fp8'"):
        check_precision(torch.device("cpu"), "fp8")


def test_bad_precision_is_a_usage_error(capsys, tmp_path):
    assert main(["train", "speech", "--out", str(tmp_path / "r"), "--precision", "fp8"]) == 2
    assert "invalid choice: 'fp8'" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "r"), "--precision", "int8"]) == 2


# -- tensors on the device ----------------------------------------------------------------------


def test_batches_move_to_the_device_whole():
    batch = {"x": torch.ones(2, 3), "parts": [torch.zeros(1), (torch.arange(2), 5)], "n": 7}
    moved = to_device(batch, torch.device("meta"))
    assert moved["x"].device.type == "meta" and moved["x"].shape == (2, 3)
    assert moved["parts"][0].device.type == "meta"
    assert isinstance(moved["parts"][1], tuple) and moved["parts"][1][0].device.type == "meta"
    assert moved["parts"][1][1] == 5 and moved["n"] == 7
    assert batch["x"].device.type == "cpu"  # the original is left alone


def test_training_runs_the_loss_on_the_device_under_autocast(tmp_path, monkeypatch):
    need_data("speech")
    seen: list[tuple] = []
    loss = SpeechTask.loss

    def spy(self, model, batch):
        seen.append(
            (
                {t.device.type for t in batch.values()},
                next(model.parameters()).device.type,
                torch.is_autocast_enabled("cpu"),
                torch.get_autocast_dtype("cpu"),
                self.device.type,
            )
        )
        return loss(self, model, batch)

    monkeypatch.setattr(SpeechTask, "loss", spy)
    metrics = train(
        "speech", {**TINY["speech"], "precision": "bf16"}, out=tmp_path / "r", progress=False
    )
    assert seen and all(s == ({"cpu"}, "cpu", True, torch.bfloat16, "cpu") for s in seen)
    assert (metrics["device"], metrics["precision"], metrics["world_size"]) == ("cpu", "bf16", 1)
    assert metrics["device_name"]
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["precision"] == "bf16"


def test_evaluation_follows_the_precision_of_the_run_or_the_one_given(tmp_path, monkeypatch):
    need_data("speech")
    train("speech", {**TINY["speech"], "precision": "bf16"}, out=tmp_path / "r", progress=False)
    modes: list[tuple] = []
    evaluate_split = SpeechTask.evaluate

    def spy(self, model, data):
        modes.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return evaluate_split(self, model, data)

    monkeypatch.setattr(SpeechTask, "evaluate", spy)
    evaluate(tmp_path / "r", device="cpu")
    assert modes == [(True, torch.bfloat16)] * 2
    modes.clear()
    evaluate(tmp_path / "r", device="cpu", precision="fp32")
    assert [enabled for enabled, _ in modes] == [False, False]


# -- fp16 loss scaling ----------------------------------------------------------------------------


def _scale(run) -> float:
    with safe_open(str(run / "resume.safetensors"), framework="pt") as f:
        return json.loads(f.metadata()["scaler"])["scale"]


def test_fp16_skips_overflowing_steps_and_lowers_the_scale(tmp_path, monkeypatch):
    need_data("speech")
    scalers = []

    def huge(device, precision):  # a scale so high that the first steps' gradients overflow
        scaler = torch.amp.GradScaler(device.type, init_scale=2.0**100, enabled=True)
        scalers.append(scaler)
        return scaler

    monkeypatch.setattr(train_module, "grad_scaler", huge)
    metrics = train(
        "speech", {**TINY["speech"], "precision": "fp16"}, out=tmp_path / "r", progress=False
    )
    assert metrics["epochs_run"] == 2  # skipped steps are not divergence
    assert _scale(tmp_path / "r") < 2.0**100  # halved at each overflow, and saved

    monkeypatch.setattr(train_module, "MAX_OVERFLOWS", 3)
    with pytest.raises(TrainingDiverged, match=r"overflowed float16 in 3 steps in a row"):
        train("speech", {**TINY["speech"], "precision": "fp16"}, out=tmp_path / "d", progress=False)


@pytest.mark.slow
def test_an_fp16_run_resumes_exactly_with_its_loss_scale(tmp_path, monkeypatch):
    need_data("speech")

    def lively(device, precision):  # a scale that overflows, falls, grows back, overflows...
        return torch.amp.GradScaler(device.type, init_scale=2.0**28, growth_interval=2)

    monkeypatch.setattr(train_module, "grad_scaler", lively)
    overrides = {**RESUMABLE, "precision": "fp16"}
    train("speech", overrides, out=tmp_path / "whole", progress=False)
    assert _scale(tmp_path / "whole") < 2.0**28
    for step in (5, 8):
        run = tmp_path / f"killed-{step}"
        with pytest.raises(Killed):
            train("speech", overrides, out=run, progress=False, hook=kill_at(step))
        train("speech", {}, out=run, resume=True, progress=False)
        assert_same_run(tmp_path / "whole", run)


@pytest.mark.slow
def test_precision_may_change_when_a_run_is_resumed(tmp_path):
    need_data("speech")
    run = tmp_path / "run"
    with pytest.raises(Killed):
        train("speech", RESUMABLE, out=run, progress=False, hook=kill_at(5))
    metrics = train("speech", {"precision": "bf16"}, out=run, resume=True, progress=False)
    assert metrics["precision"] == "bf16" and metrics["config"]["precision"] == "bf16"


# -- checkpoints between devices ------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:.*to a meta parameter")
def test_a_checkpoint_restores_onto_the_device_of_the_model(tmp_path):
    """The resume checkpoint holds CPU tensors; the weights and the optimizer state land on the
    device the model is on (here "meta", standing for a GPU), the CPU generator continues."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    cpu = torch.device("cpu")
    other = {"torch": torch.manual_seed(7).get_state()}  # rank 1's generator
    torch.rand(3)  # rank 0's has drawn on since
    mine = _rng_states(cpu)
    _save_state(tmp_path / "s", model, opt, train_module.Progress(), [mine, other], scaler, cpu)
    tensors, meta, _ = train_module._read_state(tmp_path / "s", "accuracy")
    assert all(t.device.type == "cpu" for t in tensors.values())
    assert meta["world_size"] == "2"

    moved = torch.nn.Linear(3, 2).to("meta")
    moved_opt = torch.optim.AdamW(moved.parameters())
    rngs = _restore_state(
        tmp_path / "s", tensors, meta, moved, moved_opt, scaler, World(rank=1, size=2), cpu
    )
    for state in moved_opt.state.values():
        assert state["exp_avg"].device.type == "meta"
        assert state["exp_avg_sq"].device.type == "meta"
    assert len(rngs) == 2
    assert torch.equal(torch.get_rng_state(), other["torch"])  # rank 1 took its own generator


def test_a_run_loads_onto_the_device_asked_for(tmp_path, capsys):
    need_data("speech")
    train("speech", TINY["speech"], out=tmp_path / "r", progress=False)
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "r"), "--device", "cpu", "--precision", "bf16"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("test accuracy=")
    utterance = tmp_path / "u.csv"
    utterance.write_text("\n".join(" ".join(["0.1"] * 12) for _ in range(9)))
    assert main(["predict", str(tmp_path / "r"), str(utterance), "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("speaker ")
    task, model = load_run(tmp_path / "r", device="cpu", precision="bf16")
    assert task.device == torch.device("cpu") and task.config.precision == "bf16"
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    with autocast(task.device, "bf16"):
        assert torch.is_autocast_enabled("cpu")
    assert devices.describe(torch.device("cpu"))
