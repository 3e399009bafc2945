"""Outputs saved by earlier releases (tests/regression/outputs-*.pt) are reproduced today."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import OUT_TOL, assert_close

import rnnkit

sys.path.insert(0, str(Path(__file__).parent / "regression"))
import cases

SAVED = sorted((Path(__file__).parent / "regression").glob("outputs-*.pt"))


def test_some_release_saved_outputs() -> None:
    assert SAVED, "no saved regression outputs; run python tests/regression/cases.py"


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("path", SAVED, ids=[p.stem for p in SAVED])
def test_saved_outputs_are_reproduced(path: Path, backend: str) -> None:
    saved = torch.load(path, weights_only=True)
    for name, entry in saved.items():
        with rnnkit.use_backend(backend):
            now = cases.outputs(name, entry["state_dict"])
        assert set(now) == set(entry["outputs"]), f"{path.name}: {name}"
        for key, value in entry["outputs"].items():
            assert_close(now[key], value, OUT_TOL, f"{path.name}: {name}.{key}")
