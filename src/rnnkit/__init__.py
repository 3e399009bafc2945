"""rnnkit: recurrent networks for PyTorch.

Cells (one step), the one time loop over any cell (:class:`Recurrent`), :class:`Bidirectional`
and :class:`Stacked` wrappers, torch.nn drop-ins (:class:`RNN`, :class:`LSTM`, :class:`GRU`)
with a correct ``lengths=`` argument, and a dispatch that runs each call on the fastest backend
that computes it exactly (:func:`explain` says which, and why).
"""

from . import functional
from .backends import (
    BackendUnavailable,
    explain,
    get_default_backend,
    set_default_backend,
    use_backend,
)
from .backends import (
    available as available_backends,
)
from .cells import (
    Cell,
    GRUCell,
    LayerNormGRUCell,
    LayerNormLSTMCell,
    LSTMCell,
    PeepholeLSTMCell,
    RNNCell,
)
from .layers import (
    GRU,
    LSTM,
    RNN,
    Bidirectional,
    Recurrent,
    Stacked,
    detach_state,
    top_states,
)

__version__ = "0.1.0"

__all__ = [
    "GRU",
    "LSTM",
    "RNN",
    "BackendUnavailable",
    "Bidirectional",
    "Cell",
    "GRUCell",
    "LSTMCell",
    "LayerNormGRUCell",
    "LayerNormLSTMCell",
    "PeepholeLSTMCell",
    "RNNCell",
    "Recurrent",
    "Stacked",
    "__version__",
    "available_backends",
    "detach_state",
    "explain",
    "functional",
    "get_default_backend",
    "set_default_backend",
    "top_states",
    "use_backend",
]
