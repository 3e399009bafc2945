"""Shared helpers and tolerances for the verification chain."""

from __future__ import annotations

import pytest
import torch

#: fp32 tolerance for outputs and final states (DESIGN.md: verification chain).
OUT_TOL = 1e-5
#: fp32 tolerance for every gradient.
GRAD_TOL = 1e-4

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _shipped_dispatch_table(monkeypatch) -> None:
    """Automatic dispatch follows the shipped crossover table in tests, whatever
    `rnnkit calibrate` measured on this machine (the calibration's tests opt back in)."""
    from rnnkit.backends.cpu import dispatch

    monkeypatch.setattr(dispatch, "_calibrations", {})


@pytest.fixture
def one_thread():
    """One torch thread for the test (for modules of tiny tensors, where a second thread only
    waits at every op on a busy machine); the count is restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def assert_close(actual, expected, tol: float, what: str = "") -> None:
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


def grads(loss: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """d loss / d tensor for each tensor (zeros where a tensor does not reach the loss)."""
    out = torch.autograd.grad(loss, tensors, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(out, tensors, strict=True)]


def weighted_sum(*tensors: torch.Tensor) -> torch.Tensor:
    """A loss that weighs every element differently, so gradients check every position."""
    total = torch.zeros(())
    for k, t in enumerate(tensors):
        w = torch.linspace(-1.0, 1.0, t.numel(), dtype=t.dtype).reshape(t.shape).cos() + 0.1 * k
        total = total + (t * w).sum()
    return total
