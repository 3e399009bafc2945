"""The README's tour runs as written."""

from __future__ import annotations

import re
from pathlib import Path

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
