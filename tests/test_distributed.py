"""Training with several processes (torchrun, gloo on the CPU): the same weights as one process
with the global batch, an exact resume after every process was killed, rank 0 alone writing and
reporting, and errors that stop every rank instead of leaving some waiting."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from recipe_helpers import TINY, cli_args, need_data
from safetensors import safe_open
from safetensors.torch import load_file
from test_train import assert_same_run

from rnnkit.distributed import World
from rnnkit.errors import CheckpointError, ProcessLost
from rnnkit.tasks.speech import SpeechConfig, SpeechTask
from rnnkit.train import _global_batches, train

SRC = str(Path(__file__).resolve().parents[1] / "src")
ENV = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
for _name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(_name, None)
#: Weights of 2 processes vs 1 process with the same global batch, after a few AdamW steps.
WEIGHT_TOL = 1e-5
LAUNCH_TIMEOUT = 180  # seconds; a hang (a rank left waiting at a collective) fails the test

# 60 utterances, 4 per process per batch: 8 global batches per epoch.
PER_PROCESS = {**TINY["speech"], "batch_size": 4, "epochs": 2}


pytestmark = pytest.mark.usefixtures("one_thread")


def _args(task: str, out: Path, overrides: dict, *extra: str) -> list[str]:
    return [
        "train", task, "--out", str(out), *cli_args(overrides), "--threads", "1",
        "--no-progress", "--device", "cpu", *extra,
    ]  # fmt: skip


def torchrun(*args: str, processes: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node=N -m rnnkit.cli ARGS`` (rendezvous on localhost)."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={processes}", "-m", "rnnkit.cli", *args,
    ]  # fmt: skip
    return subprocess.run(
        command, env=ENV, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, check=False
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(
    *args: str,
    processes: int = 2,
    program: tuple[str, ...] = ("-m", "rnnkit.cli"),
    env: dict[str, str] | None = None,
) -> list[subprocess.Popen]:
    """The ranks of ``rnnkit ARGS`` (``python PROGRAM ARGS``) started with the environment
    torchrun gives them (without torchrun's own process: cheaper, and each rank can be killed on
    its own), plus ``env``."""
    port, procs = _free_port(), []
    for rank in range(processes):
        rank_env = {
            **ENV, **(env or {}), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(processes),
            "LOCAL_WORLD_SIZE": str(processes), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }  # fmt: skip
        command = [sys.executable, *program, *args]
        procs.append(
            subprocess.Popen(
                command, env=rank_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    return procs


def finish(procs: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
    """(exit status, stdout, stderr) of each rank, once all have ended."""
    try:
        outs = [proc.communicate(timeout=LAUNCH_TIMEOUT) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    return [(proc.returncode, *out) for proc, out in zip(procs, outs, strict=True)]


def _step(path: Path) -> int:
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads(f.metadata()["progress"])["step"]
    except Exception:  # not written yet
        return -1


def _weights(run: Path) -> dict[str, torch.Tensor]:
    """The weights at the end of training (the resume checkpoint's, not the best epoch's)."""
    return {
        k: v for k, v in load_file(run / "resume.safetensors").items() if k.startswith("model.")
    }


@pytest.mark.slow
def test_two_processes_reach_the_weights_of_one_with_the_global_batch(tmp_path):
    need_data("speech")
    # No dropout (one process draws other masks) and no convolutional branch: its batch
    # normalisation takes each process's own statistics, not the global batch's.
    overrides = {**PER_PROCESS, "dropout": 0.0, "fcn_channels": 0}
    one = train("speech", {**overrides, "batch_size": 8}, out=tmp_path / "one", progress=False)
    done = torchrun(*_args("speech", tmp_path / "two", overrides))
    assert done.returncode == 0, done.stderr[-3000:]
    # Rank 0 alone reports: the metrics once, as the last lines of stdout.
    lines = done.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["valid", "test"], done.stdout
    assert done.stderr.count("speech: training") == 1
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert (two["world_size"], one["world_size"]) == (2, 1)
    assert two["device"] == "cpu" and two["precision"] == "fp32"
    assert two["config"]["batch_size"] == 4
    # Rank 0 alone writes: the run directory holds one run's files and nothing else.
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(
        p.name for p in (tmp_path / "one").iterdir()
    )
    steps = [_step(tmp_path / d / "resume.safetensors") for d in ("one", "two")]
    assert steps[0] == steps[1] == 2 * 8
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=WEIGHT_TOL, atol=WEIGHT_TOL, msg=key)
    # The training loss is the global batch's, as one process computes it.
    for h1, h2 in zip(one["history"], two["history"], strict=True):
        assert h2["train_loss"] == pytest.approx(h1["train_loss"], abs=1e-5)
        assert h2["batches"] == h1["batches"] == 8


@pytest.mark.slow
@pytest.mark.parametrize("ensemble", [1, 2])
def test_two_processes_train_an_encoder_decoder_as_one(tmp_path, ensemble):
    """The encoder-decoders' loss is a method of their own, not the module's call: its gradients
    are still averaged over the processes (an ensemble's members' too)."""
    need_data("g2p")
    overrides = {
        **TINY["g2p"], "limit": 64, "batch_size": 8, "epochs": 1, "dropout": 0.0,
        "ensemble": ensemble, "beam_size": 1, "average": 0.0,
    }  # fmt: skip
    train("g2p", {**overrides, "batch_size": 16}, out=tmp_path / "one", progress=False)
    done = torchrun(*_args("g2p", tmp_path / "two", overrides))
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=WEIGHT_TOL, atol=WEIGHT_TOL, msg=key)


@pytest.mark.slow
def test_a_killed_two_process_run_resumes_exactly(tmp_path):
    need_data("speech")
    # Dropout on: each rank's random generator must come back as it was.
    overrides = {**PER_PROCESS, "epochs": 3, "checkpoint_every": 1}
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    for status, _, err in finish(spawn(*_args("speech", whole, overrides))):
        assert status == 0, err[-3000:]

    # Both processes killed at once, as when the machine fails.
    procs = spawn(*_args("speech", killed, overrides))
    try:
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        while _step(killed / "resume.safetensors") < 11 and procs[0].poll() is None:
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.005)
        for proc in procs:
            os.kill(proc.pid, signal.SIGKILL)
    finally:
        statuses = finish(procs)
    assert statuses[0][0] == -signal.SIGKILL, statuses[0][2][-3000:]
    assert not (killed / "metrics.json").exists()
    reached = _step(killed / "resume.safetensors")
    assert 11 <= reached < 24

    # One process cannot continue it: the batch order needs the same number.
    with pytest.raises(CheckpointError, match=r"run of 2 process\(es\) .*nproc-per-node=2"):
        train("speech", {}, out=killed, resume=True, progress=False)
    done = torchrun("train", "speech", "--out", str(killed), "--resume", "--threads", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"step {reached}" in done.stderr
    assert_same_run(whole, killed)
    metrics = json.loads((killed / "metrics.json").read_text())
    assert metrics["world_size"] == 2


#: One rank of a speech run (python -c RECORD_RATES OUT OVERRIDES) that writes the learning rate
#: of each of its optimizer steps to OUT.rates.RANK.json.
RECORD_RATES = """
import json, os, sys
import torch
from rnnkit.train import train

torch.set_num_threads(1)
rates, step = [], torch.optim.AdamW.step

def record(self, *args, **kwargs):
    rates.append(self.param_groups[0]["lr"])
    return step(self, *args, **kwargs)

torch.optim.AdamW.step = record
train("speech", json.loads(sys.argv[2]), out=sys.argv[1], progress=False, device="cpu")
with open(f"{sys.argv[1]}.rates.{os.environ['RANK']}.json", "w") as f:
    json.dump(rates, f)
"""


@pytest.mark.slow
def test_every_rank_steps_with_the_same_rate_under_a_schedule_by_time(tmp_path):
    need_data("speech")
    # The time limit ends the run long before its epochs: the rate follows the time spent, as
    # rank 0's clock says, on every rank (or the replicas' weights drift apart).
    overrides = {
        **PER_PROCESS, "epochs": 1000, "lr_schedule": "linear", "schedule_by_time": True,
        "max_minutes": 0.05,
    }  # fmt: skip
    run = tmp_path / "run"
    ranks = finish(spawn(str(run), json.dumps(overrides), program=("-c", RECORD_RATES)))
    for status, _, err in ranks:
        assert status == 0, err[-3000:]
    rates = [json.loads(Path(f"{run}.rates.{rank}.json").read_text()) for rank in (0, 1)]
    assert len(rates[0]) > 2 * 8, "the run ended within two epochs"
    assert rates[0] == rates[1]


ON_MAIN_EXITS = """
import sys, torch
from rnnkit.distributed import World
world = World.from_env()
world.start(torch.device("cpu"))
try:
    world.on_main(lambda: sys.exit(3))
finally:
    world.close()
"""


@pytest.mark.slow
def test_an_exit_on_rank_0_ends_every_rank():
    """sys.exit inside rank 0's share of the work ends the other ranks with the same status, at
    once, rather than leaving them at the collective until its timeout."""
    ranks = finish(spawn(program=("-c", ON_MAIN_EXITS)))
    assert [status for status, _, _ in ranks] == [3, 3], [err[-2000:] for _, _, err in ranks]


@pytest.mark.slow
def test_an_error_on_rank_0_stops_every_rank_with_one_line(tmp_path):
    need_data("speech")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")  # a run directory that is not new
    ranks = finish(spawn(*_args("speech", run, PER_PROCESS)))  # a hang fails at the timeout
    assert [status for status, _, _ in ranks] == [2, 2]  # every rank stops, with rank 0's status
    errors = [line for _, _, err in ranks for line in err.splitlines() if "error" in line]
    assert len(errors) == 1, errors  # said once, by rank 0
    assert errors[0].startswith("rnnkit: error: ") and "already holds a run" in errors[0]


FAILS_ON_RANK_1 = """
import torch
from rnnkit.distributed import World
from rnnkit.errors import DataMissing
world = World.from_env()
world.start(torch.device("cpu"))
try:
    with world.together():
        if world.rank == 1:
            raise DataMissing("the data is not installed on this machine")
except DataMissing as e:
    print(f"{e}|{getattr(e, 'shared', False)}")
finally:
    world.close()
"""


@pytest.mark.slow
def test_an_error_of_one_rank_before_training_stops_every_rank_rank_0_naming_it():
    ranks = finish(spawn(program=("-c", FAILS_ON_RANK_1)))
    assert [status for status, _, _ in ranks] == [0, 0], [err[-2000:] for *_, err in ranks]
    assert [out.strip() for _, out, _ in ranks] == [
        "rank 1 of 2: the data is not installed on this machine|False",
        "the data is not installed on this machine|True",
    ]


@pytest.mark.parametrize(
    "case",
    ["missing data", "unknown option", "device"],  # each starts two processes
)
@pytest.mark.slow
def test_an_error_every_rank_hits_before_training_is_said_once(tmp_path, case):
    """An error each rank hits on its own before the first step (before the processes join, or
    after) is printed by rank 0 alone; every rank exits with its status."""
    need_data("speech")
    args, env, expected = _args("speech", tmp_path / "run", PER_PROCESS), {}, "--device cuda:7"
    if case == "missing data":  # packages of the speech data's name that hold none of it
        shadow = tmp_path / "shadow"
        for module in ("sktime", "aeon"):
            (shadow / module).mkdir(parents=True)
            (shadow / module / "__init__.py").write_text("")
        env = {"PYTHONPATH": str(shadow) + os.pathsep + ENV["PYTHONPATH"]}
        expected = "the Japanese Vowels .ts files not found"
    elif case == "unknown option":
        args, expected = [*args, "--hiden-size", "8"], "--hiden-size (did you mean --hidden-size?)"
    else:
        args = [*args, "--device", "cuda:7"]
    ranks = finish(spawn(*args, env=env))
    statuses = [status for status, _, _ in ranks]
    assert statuses[0] in (1, 2) and statuses[1] == statuses[0], [e[-2000:] for *_, e in ranks]
    said = [err.count("rnnkit: error:") for _, _, err in ranks]
    assert said == [1, 0], [err[-2000:] for _, _, err in ranks]  # once, by rank 0
    assert expected in ranks[0][2] and "Traceback" not in ranks[0][2] + ranks[1][2]
    assert not (tmp_path / "run").exists()


# -- the batches each process takes ---------------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 3, 7, 8, 13])
@pytest.mark.parametrize("world", [2, 3])
def test_shards_cut_a_batch_in_order_into_near_equal_parts(size, world):
    task = SpeechTask(SpeechConfig())
    batch = list(range(100, 100 + size))
    parts = [task.shard(batch, rank, world) for rank in range(world)]
    assert [i for part in parts for i in part] == batch
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_global_batches_are_those_of_one_process_with_a_larger_batch():
    need_data("speech")
    task = SpeechTask(SpeechConfig(limit=60, batch_size=4))
    splits = task.load_splits()
    task.set_vocab(task.fit_vocab(splits["train"]))
    data = task.encode(splits["train"])
    wide = SpeechTask(SpeechConfig(limit=60, batch_size=12))
    expected = wide.epoch_batches(data, torch.Generator().manual_seed(5))
    assert _global_batches(task, data, torch.Generator().manual_seed(5), 3) == expected
    assert task.config.batch_size == 4  # the task itself is left as it was


def test_one_process_world_touches_nothing_distributed(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    world = World.from_env()
    assert (world.rank, world.size, world.distributed) == (0, 1, False)
    assert world.sum([1.5, 2.0]) == [1.5, 2.0] and world.share("x") == "x"
    assert world.gather(3) == [3] and world.on_main(lambda: 4) == 4


def test_a_broken_torchrun_environment_is_one_line(monkeypatch):
    from rnnkit.errors import DeviceError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(DeviceError, match=r"WORLD_SIZE = 2 but RANK = None"):
        World.from_env()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(DeviceError, match=r"WORLD_SIZE = 'two'; expected an integer"):
        World.from_env()


GLOO_RESET = (
    "[/src/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:8600: "
    "Connection reset by peer. This is typically caused by a remote worker hanging or bugs in "
    "the application.\nmore"
)


def test_a_collective_whose_peer_is_gone_is_one_line_naming_the_rank():
    world = World(rank=1, size=3)
    with pytest.raises(ProcessLost) as caught, world.collective("an all-reduce"):
        raise RuntimeError(GLOO_RESET)
    assert str(caught.value) == (
        "rank 1 of 3: an all-reduce failed (Read error [127.0.0.1]:8600: Connection reset by "
        "peer): another process of this run stopped or cannot be reached (its own output says why)"
    )
    assert caught.value.__suppress_context__  # the transport's traceback is not printed
    with pytest.raises(ProcessLost, match=r"rank 1 of 3: a broadcast failed \(NCCL timeout\)"):
        with world.collective("a broadcast"):
            raise torch.distributed.DistBackendError("NCCL timeout")


@pytest.mark.parametrize(
    "error", [RuntimeError("shape mismatch: [2, 3] vs [3, 2]"), ValueError("/gloo/ bad value")]
)
def test_an_error_that_is_not_the_transport_passes_through_a_collective(error):
    with pytest.raises(type(error), match=re.escape(str(error))):
        with World(rank=0, size=2).collective("an all-reduce"):
            raise error


@pytest.mark.slow
def test_a_charlm_bptt_the_global_streams_cannot_hold_is_refused_before_anything_is_written(
    tmp_path,
):
    """--bptt reads batch_size streams per process: with 2 processes, 32 streams of 40 characters
    need more than the 1,000 characters that one process's 16 would fit in."""
    need_data("charlm")
    run = tmp_path / "run"
    overrides = {**TINY["charlm"], "limit": 1000, "batch_size": 16, "bptt": 40}
    ranks = finish(spawn(*_args("charlm", run, overrides)))
    assert [status for status, _, _ in ranks] == [2, 2], [err[-2000:] for _, _, err in ranks]
    err = ranks[0][2]
    assert "Traceback" not in err, err
    assert ranks[1][2].count("error") == 0, ranks[1][2][-2000:]  # rank 0 alone says it
    assert (
        "bptt = 40 with 32 streams (16 per process x 2 processes) needs 1320 characters of "
        "training text; it has 1000"
    ) in err
    assert not run.exists()  # a run directory --out could not start again at


@pytest.mark.slow
@pytest.mark.parametrize("killed", [0, 1])
def test_a_rank_killed_mid_run_stops_the_other_with_one_line_that_says_how_to_go_on(
    tmp_path, killed
):
    """A peer gone in the middle of a collective (the OOM killer, a lost machine): the other
    rank stops at once with status 1 and one line naming itself and the resume command, not
    gloo's traceback, and not after the collective's 30-minute timeout."""
    need_data("speech")
    run = tmp_path / "run"
    procs = spawn(*_args("speech", run, {**PER_PROCESS, "epochs": 1000, "checkpoint_every": 1}))
    try:
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        while _step(run / "resume.safetensors") < 9 and procs[0].poll() is None:
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.005)
        os.kill(procs[killed].pid, signal.SIGKILL)
        gone = time.monotonic()
        procs[1 - killed].wait(timeout=60)
        waited = time.monotonic() - gone
    finally:
        ranks = finish(procs)
    status, _, err = ranks[1 - killed]
    assert status == 1, err[-3000:]
    assert waited < 30
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1, errors
    line, survivor = errors[0], 1 - killed
    assert line.startswith(f"rnnkit: error: rank {survivor} of 2: "), line
    assert " failed (" in line and "Traceback" not in line, line
    assert "another process of this run stopped or cannot be reached" in line, line
    assert f"--nproc-per-node=2 $(which rnnkit) train speech --out {run} --resume`" in line, line
    last = "the last checkpoint" if survivor == 0 else "rank 0's last checkpoint"
    assert line.endswith(f"continues it from {last} in {run}"), line
    assert _step(run / "resume.safetensors") >= 9  # the checkpoint is there to go on from


#: One rank of a diverging speech run (python -c DIVERGES OUT OVERRIDES) that prints, while the
#: error is still held, how many DistributedDataParallel wrappers are alive and whether the
#: process group is gone.
DIVERGES = """
import gc, json, sys
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from rnnkit.errors import TrainingDiverged
from rnnkit.train import train

torch.set_num_threads(1)
try:
    train("speech", json.loads(sys.argv[2]), out=sys.argv[1], progress=False, device="cpu")
except TrainingDiverged as e:
    alive = sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())
    print(f"{type(e).__name__} {alive} {dist.is_initialized()}")
"""


@pytest.mark.slow
def test_a_failed_two_process_run_frees_its_replica_before_leaving_the_group(tmp_path):
    """The wrapper's reducer holds the process group; freed after the group was left (with the
    error that holds the training frames), it would destroy the group with the GIL held and
    could wait forever for a gloo thread that needs the GIL. None may outlive train()."""
    need_data("speech")
    overrides = {**PER_PROCESS, "clip": 0, "lr": 3e37}
    ranks = finish(spawn(str(tmp_path / "run"), json.dumps(overrides), program=("-c", DIVERGES)))
    assert [out.strip() for _, out, _ in ranks] == ["TrainingDiverged 0 False"] * 2, [
        err[-2000:] for *_, err in ranks
    ]


@pytest.mark.slow
def test_a_diverging_two_process_run_says_so_once(tmp_path):
    """Every rank sees the same all-reduced loss, so every rank stops at the same batch with
    status 1; rank 0 alone prints the line."""
    need_data("speech")
    overrides = {**PER_PROCESS, "clip": 0, "checkpoint_every": 1}
    ranks = finish(spawn(*_args("speech", tmp_path / "run", overrides, "--lr", "3e37")))
    assert [status for status, _, _ in ranks] == [1, 1], [e[-2000:] for *_, e in ranks]
    said = [err.count("rnnkit: error: training diverged at epoch") for _, _, err in ranks]
    assert said == [1, 0], [err[-2000:] for _, _, err in ranks]
    assert "Traceback" not in ranks[0][2] + ranks[1][2]
