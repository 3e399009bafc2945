"""Models built on rnnkit's layers."""

from .attention import (
    ATTENTIONS,
    Attention,
    BahdanauAttention,
    LuongConcatAttention,
    LuongDotAttention,
    LuongGeneralAttention,
    build_attention,
    length_mask,
    masked_softmax,
)

__all__ = [
    "ATTENTIONS",
    "Attention",
    "BahdanauAttention",
    "LuongConcatAttention",
    "LuongDotAttention",
    "LuongGeneralAttention",
    "build_attention",
    "length_mask",
    "masked_softmax",
]
