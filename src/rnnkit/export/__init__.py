"""Export rnnkit's layers: ``torch.export``, and ONNX with dynamic T and B, ``lengths=`` and
initial/final states, checked in onnxruntime.

How it works
------------
While a model is exported, the dispatch (:mod:`rnnkit.backends`) runs every layer built from
rnnkit's cells on the ``export`` backend (:mod:`rnnkit.backends.export`), whatever backend the
layer names: each layer becomes one op, ``rnnkit::export_layer``, whose arguments say
everything (weights by the cell table's names, lengths, direction, eval-mode zoneout), with a
reference kernel and a fake one. So ``torch.export.export`` gives a graph with one rnnkit op per
layer and no graph break, T and B dynamic.

ONNX: ``backends.export.legacy`` lowers the op for the TorchScript-based exporter (a symbolic);
``backends.export.dynamo`` is what a layer emits instead under ``torch.onnx.export(..., dynamo=True)``
(the default), whose translation table is closed to libraries. Both use ONNX's own RNN, GRU
and LSTM operators where they compute the layer exactly (``sequence_lens`` = lengths,
peepholes as ``P``, ``direction`` forward, reverse or bidirectional, GRU with
``linear_before_reset=1``, which is torch's GRU) and an ONNX Loop/Scan over the cell's step
for the rest (the LayerNorm cells, projections, zoneout, float64).

Export a model in eval mode: regularisers are then no-ops, zoneout its expectation.

Recipes
-------
``rnnkit export RUN_DIR --onnx model.onnx`` writes a trained recipe's model, checked in
onnxruntime on the validation split first (:mod:`.recipes`).

The ONNX checks need the ``onnx`` extra: ``pip install "rnnkit[onnx]"`` (onnx, onnxscript,
onnxruntime). Importing this package needs none of them.
"""

from __future__ import annotations

from ..backends.export import ExportBackend, export_layer

__all__ = ["ExportBackend", "export_layer"]
