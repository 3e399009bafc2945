"""Models built from rnnkit layers: classifiers, language models, attention, encoder–decoders."""

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
from .classifier import ClassifierEnsemble, SequenceClassifier, make_encoder, pool
from .lm import CharLM
from .seq2seq import (
    DecoderState,
    EncoderOutput,
    EnsembleState,
    Hypotheses,
    Seq2Seq,
    Seq2SeqConfig,
    Seq2SeqEnsemble,
    decoder_io,
    plot_attention,
    reverse_targets,
    sequence_loss,
    summarise_final_state,
)

__all__ = [
    "ATTENTIONS",
    "Attention",
    "BahdanauAttention",
    "CharLM",
    "ClassifierEnsemble",
    "DecoderState",
    "EncoderOutput",
    "EnsembleState",
    "Hypotheses",
    "LuongConcatAttention",
    "LuongDotAttention",
    "LuongGeneralAttention",
    "Seq2Seq",
    "Seq2SeqConfig",
    "Seq2SeqEnsemble",
    "SequenceClassifier",
    "build_attention",
    "decoder_io",
    "length_mask",
    "make_encoder",
    "masked_softmax",
    "plot_attention",
    "pool",
    "reverse_targets",
    "sequence_loss",
    "summarise_final_state",
]
