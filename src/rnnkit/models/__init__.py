"""Models built on rnnkit's layers: attention and the attentional encoder–decoder."""

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
from .seq2seq import (
    DecoderState,
    EncoderOutput,
    Hypotheses,
    Seq2Seq,
    Seq2SeqConfig,
    decoder_io,
    plot_attention,
    sequence_loss,
    summarise_final_state,
)

__all__ = [
    "ATTENTIONS",
    "Attention",
    "BahdanauAttention",
    "DecoderState",
    "EncoderOutput",
    "Hypotheses",
    "LuongConcatAttention",
    "LuongDotAttention",
    "LuongGeneralAttention",
    "Seq2Seq",
    "Seq2SeqConfig",
    "build_attention",
    "decoder_io",
    "length_mask",
    "masked_softmax",
    "plot_attention",
    "sequence_loss",
    "summarise_final_state",
]
