"""charlm's truncated BPTT (``--bptt N``): the training text is read as contiguous streams, the
state carried from batch to batch, saved in every resume checkpoint so a resumed run is exact."""

from __future__ import annotations

import itertools

import pytest
import torch
from recipe_helpers import TINY, need_data
from safetensors.torch import load_file
from test_train import Killed, assert_same_run, kill_at

from rnnkit.errors import RecipeError
from rnnkit.tasks.charlm import CharLMConfig, CharLMTask
from rnnkit.train import train

BPTT = {**TINY["charlm"], "bptt": 16, "batch_size": 4, "epochs": 2, "checkpoint_every": 3}


def test_stream_batches_read_each_stream_in_order():
    task = CharLMTask(CharLMConfig(bptt=10, batch_size=3))
    data = torch.arange(1000)
    batches = task.epoch_batches(data, torch.Generator().manual_seed(0))
    per = (1000 - 1 - batches[0][0]) // 3
    assert len(batches) == per // 10
    for k in range(1, len(batches)):  # window k of stream s follows window k-1 of stream s
        assert [b - a for a, b in zip(batches[k - 1], batches[k], strict=True)] == [10] * 3
    starts = batches[0]
    assert [b - a for a, b in itertools.pairwise(starts)] == [per] * 2  # contiguous
    windows = task.collate(data, batches[1])
    assert torch.equal(windows["x"][0], data[starts[0] + 10 : starts[0] + 20])
    assert torch.equal(windows["y"][0], data[starts[0] + 11 : starts[0] + 21])
    with pytest.raises(RecipeError, match="bptt = 400 with 3 streams needs"):
        task.config.bptt = 400
        task.epoch_batches(data, torch.Generator().manual_seed(0))


def test_the_state_is_carried_from_batch_to_batch_and_restarts_each_epoch():
    need_data("charlm")
    task = CharLMTask(CharLMConfig(**{k: v for k, v in BPTT.items() if k != "checkpoint_every"}))
    splits = task.load_splits()
    task.set_vocab(task.fit_vocab(splits["train"]))
    data = task.encode(splits["train"])
    model = task.build_model()
    batches = task.epoch_batches(data, torch.Generator().manual_seed(0))
    task.start_epoch()
    assert task.carry_state() == {}
    _first, _ = task.loss(model, task.collate(data, batches[0]))
    carried = task.carry_state()
    assert set(carried) == {"state0", "state1"}  # the LSTM's h and c, detached
    assert all(not t.requires_grad and t.shape[-2] == 4 for t in carried.values())
    with_state, _ = task.loss(model, task.collate(data, batches[1]))
    task.start_epoch()
    without, _ = task.loss(model, task.collate(data, batches[1]))
    assert not torch.allclose(with_state, without)


@pytest.mark.slow
def test_a_bptt_run_resumes_exactly_with_its_carried_state(tmp_path):
    need_data("charlm")
    torch.set_num_threads(1)
    train("charlm", BPTT, out=tmp_path / "whole", progress=False)
    run = tmp_path / "killed"
    with pytest.raises(Killed):
        train("charlm", BPTT, out=run, progress=False, hook=kill_at(5))
    saved = load_file(run / "resume.safetensors")
    assert {"rng.carry_state0", "rng.carry_state1"} <= saved.keys()
    train("charlm", {}, out=run, resume=True, progress=False)
    assert_same_run(tmp_path / "whole", run)
