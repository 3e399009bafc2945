"""The export backend: while a model is exported (``torch.export``, ``torch.onnx.export``), every
layer built from rnnkit's cells becomes one portable op, lowered to ONNX's own RNN/GRU/LSTM
operators where they compute it exactly and to a Loop/Scan over the cell's step otherwise. See
:mod:`rnnkit.export` for how it is used and :mod:`.backend` for what it accepts.
"""

from __future__ import annotations

from .backend import ExportBackend
from .ops import export_layer

__all__ = ["ExportBackend", "export_layer"]
