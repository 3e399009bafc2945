"""Evaluation metrics: edit distance, error rates (WER, PER) and BLEU.

Error rates are fractions in [0, 1] (as ``accuracy``); BLEU is on sacreBLEU's 0–100 scale.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

__all__ = ["bleu", "chrf", "edit_distance", "error_rate", "g2p_error_rates"]

SACREBLEU_INSTALL = "pip install sacrebleu"


def edit_distance(hyp: Sequence[Hashable], ref: Sequence[Hashable]) -> int:
    """Levenshtein distance: the fewest insertions, deletions and substitutions turning ``hyp``
    into ``ref``.

        d[i][j] = min(d[i-1][j] + 1, d[i][j-1] + 1, d[i-1][j-1] + (hyp[i-1] != ref[j-1]))
    """
    prev = list(range(len(ref) + 1))  # d[0][j] = j
    for i, h in enumerate(hyp, 1):
        cur = [i]  # d[i][0] = i
        for j, r in enumerate(ref, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (h != r)))
        prev = cur
    return prev[-1]


def error_rate(
    hypotheses: Sequence[Sequence[Hashable]], references: Sequence[Sequence[Hashable]]
) -> float:
    """Corpus error rate: total edit distance / total reference length.

    Over word sequences this is the speech-recognition word error rate; over phoneme sequences the
    phoneme error rate.
    """
    _check_pairs(hypotheses, references)
    edits = sum(edit_distance(h, r) for h, r in zip(hypotheses, references, strict=True))
    total = sum(len(r) for r in references)
    if total == 0:
        raise ValueError("the references are all empty; the error rate is undefined")
    return edits / total


def g2p_error_rates(
    predictions: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]]
) -> dict[str, float]:
    """Word and phoneme error rates of grapheme-to-phoneme predictions.

    ``predictions[i]`` is one phoneme sequence; ``references[i]`` the word's accepted
    pronunciations (one or more). Each word is scored against its closest reference (the fewest
    edits; the first listed on a tie):

        wer = #words whose prediction is not one of its references / #words
        per = sum of edits to the closest reference / sum of that reference's length
    """
    _check_pairs(predictions, references)
    wrong = edits = total = 0
    for k, (pred, refs) in enumerate(zip(predictions, references, strict=True)):
        if not refs:
            raise ValueError(f"references[{k}] is empty; expected at least one pronunciation")
        dist, ref = min(((edit_distance(pred, r), r) for r in refs), key=lambda x: x[0])
        wrong += dist > 0
        edits += dist
        total += len(ref)
    if total == 0:
        raise ValueError("the references are all empty; the phoneme error rate is undefined")
    return {"wer": wrong / len(predictions), "per": edits / total}


def bleu(hypotheses: Sequence[str], references: Sequence[str], tokenize: str = "13a") -> float:
    """Corpus BLEU (0–100) of detokenised ``hypotheses`` against one reference each, by sacreBLEU
    with its default settings (``tokenize="13a"``, exponential smoothing, case-sensitive)."""
    _check_pairs(hypotheses, references)
    try:
        import sacrebleu
    except ImportError:
        raise ImportError(f"bleu needs sacrebleu; install it with: {SACREBLEU_INSTALL}") from None
    return float(
        sacrebleu.corpus_bleu(list(hypotheses), [list(references)], tokenize=tokenize).score
    )


def chrf(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (0–100): the F-score (beta = 2) of character 6-grams, by sacreBLEU with its
    default settings. It credits partly right words, so it moves before BLEU does."""
    _check_pairs(hypotheses, references)
    try:
        import sacrebleu
    except ImportError:
        raise ImportError(f"chrf needs sacrebleu; install it with: {SACREBLEU_INSTALL}") from None
    return float(sacrebleu.corpus_chrf(list(hypotheses), [list(references)]).score)


def _check_pairs(hypotheses: Sequence, references: Sequence) -> None:
    for name, given in (("hypotheses", hypotheses), ("references", references)):
        if isinstance(given, str):  # a string is a sequence too: of one-character sentences
            raise TypeError(f"{name} is a string ({given[:20]!r}); expected a list of sentences")
    if len(hypotheses) != len(references):
        raise ValueError(
            f"{len(hypotheses)} hypotheses but {len(references)} references; expected one each"
        )
    if not hypotheses:
        raise ValueError("no hypotheses; expected at least one")
