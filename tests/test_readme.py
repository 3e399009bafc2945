"""The README's tour runs as written."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_tour_runs(tmp_path, monkeypatch) -> None:
    text = README.read_text()
    section = text.split("## A short tour", 1)[1]
    (code,) = re.findall(r"```python\n(.*?)```", section.split("\n## ", 1)[0], flags=re.S)
    monkeypatch.chdir(tmp_path)  # the tour saves forget.png
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "forget.png").stat().st_size > 0


def test_the_drop_in_example_runs(tmp_path, monkeypatch) -> None:
    section = README.read_text().split("## Drop-ins for torch.nn", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    monkeypatch.chdir(tmp_path)  # the example saves gru.pt
    namespace: dict = {"__name__": "readme"}
    exec(compile(code, str(README), "exec"), namespace)
    assert (tmp_path / "gru.pt").stat().st_size > 0
    assert type(namespace["model"]).__name__ == "GRU"


def test_the_streaming_example_runs() -> None:
    section = README.read_text().split("## Long sequences and streaming", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    namespace: dict = {"__name__": "readme"}
    exec(compile(code, str(README), "exec"), namespace)
    assert namespace["out"].shape == (100, 8, 32)
    assert not any(t.requires_grad for t in namespace["state"])


@pytest.mark.slow  # two ONNX exports and their onnxruntime checks
def test_the_export_example_runs(tmp_path, monkeypatch) -> None:
    pytest.importorskip("onnxscript", reason='pip install "rnnkit[onnx]"')
    pytest.importorskip("onnxruntime", reason='pip install "rnnkit[onnx]"')
    section = README.read_text().split("## Export to ONNX", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    monkeypatch.chdir(tmp_path)  # the example writes gru.onnx
    namespace: dict = {"__name__": "readme"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(code, str(README), "exec"), namespace)
    out, h_n = namespace["out"], namespace["h_n"]
    expected, expected_h = namespace["gru"](
        namespace["x"], namespace["h0"], lengths=namespace["lengths"]
    )
    assert out.shape == (2, 25, 128) and h_n.shape == (4, 2, 64)
    torch.testing.assert_close(torch.from_numpy(out), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.from_numpy(h_n), expected_h, atol=1e-5, rtol=1e-5)
