"""Encoder–decoder: the step-wise decoder is the full decoder, searches agree with each other and
with exhaustive search, padding never matters, and a small task is learned."""

from __future__ import annotations

import functools
import itertools
import math
import re
from dataclasses import replace

import pytest
import torch

import rnnkit
from rnnkit.models import (
    ATTENTIONS,
    CharLM,
    DecoderState,
    Seq2Seq,
    Seq2SeqConfig,
    Seq2SeqEnsemble,
    decoder_io,
    plot_attention,
    reverse_targets,
    seq2seq,
    sequence_loss,
    summarise_final_state,
)

#: fp64 comparisons of the same computation run two ways (batched vs alone, step vs loop).
TOL = {"rtol": 1e-10, "atol": 1e-10}
PAD, BOS, EOS = 0, 1, 2


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Every matrix here is tiny: a second thread only adds synchronisation, and on a busy machine
    # thread contention makes these tests many times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**overrides) -> Seq2SeqConfig:
    kw = dict(
        src_vocab=9,
        tgt_vocab=10,
        embed_size=6,
        encoder_layers=2,
        encoder_hidden=5,
        decoder_hidden=10,
        attention_size=7,
        dropout=0.1,
    )
    kw.update(overrides)
    return Seq2SeqConfig(**kw)


def tiny_model(**overrides) -> Seq2Seq:
    torch.manual_seed(0)
    return Seq2Seq(tiny_config(**overrides)).double().eval()


def source_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    lengths = torch.tensor([7, 2, 5, 1, 4])
    src = torch.randint(3, 9, (5, 7), generator=g)
    src = torch.where(torch.arange(7) < lengths.unsqueeze(1), src, PAD)
    return src, lengths


def target_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    lengths = torch.tensor([3, 6, 1, 4, 0])
    tgt = torch.randint(3, 10, (5, 6), generator=g)
    return torch.where(torch.arange(6) < lengths.unsqueeze(1), tgt, PAD), lengths


VARIANTS = [
    dict(attention=a, decoder_cell=c, input_feeding=f)
    for a in sorted(ATTENTIONS)
    for c in ("lstm", "gru")
    for f in (True, False)
]


def variant_id(v: dict) -> str:
    return f"{v['attention']}-{v['decoder_cell']}-{'feed' if v['input_feeding'] else 'nofeed'}"


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_step_wise_decoder_equals_full_decoder(variant: dict) -> None:
    overrides = dict(variant)
    if variant["attention"] == "dot":
        overrides["decoder_hidden"] = 10  # = memory size, 2 directions * 5
    model = tiny_model(decoder_layers=2, **overrides)
    src, src_lengths = source_batch()
    tgt, tgt_lengths = target_batch()
    tgt_in, _ = decoder_io(tgt, tgt_lengths, model.config)
    logits, weights = model(src, src_lengths, tgt_in, return_attention=True)

    state = model.start(src, src_lengths)
    for t in range(tgt_in.shape[1]):
        step_logits, state = model.step(tgt_in[:, t], state)
        torch.testing.assert_close(step_logits, logits[:, t], **TOL)
        torch.testing.assert_close(state.weights, weights[:, t], **TOL)


@pytest.mark.parametrize("attention", ["dot", "general", "concat"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_whole_sequence_decoder_has_the_step_loops_gradients(attention: str, cell: str) -> None:
    """Luong attention without input feeding runs the decoder cells over all steps at once; its
    loss and every parameter's gradient equal those of the step-by-step loop."""
    model = tiny_model(
        attention=attention, decoder_cell=cell, input_feeding=False, decoder_layers=2
    )
    assert model.parallel_decoder
    src, src_lengths = source_batch()
    tgt, tgt_lengths = target_batch()
    tgt_in, tgt_out = decoder_io(tgt, tgt_lengths, model.config)

    def grads(loss: torch.Tensor) -> dict[str, torch.Tensor]:
        model.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    whole = sequence_loss(model(src, src_lengths, tgt_in), tgt_out, PAD)
    whole_grads = grads(whole)
    state, logits = model.start(src, src_lengths), []
    for t in range(tgt_in.shape[1]):
        step_logits, state = model.step(tgt_in[:, t], state)
        logits.append(step_logits)
    steps = sequence_loss(torch.stack(logits, 1), tgt_out, PAD)
    step_grads = grads(steps)
    torch.testing.assert_close(whole, steps, **TOL)
    assert whole_grads.keys() == step_grads.keys() and len(whole_grads) > 10
    for name, g in step_grads.items():
        torch.testing.assert_close(whole_grads[name], g, **TOL, msg=name)


def test_only_luong_without_input_feeding_decodes_all_steps_at_once() -> None:
    assert not tiny_model(attention="general", input_feeding=True).parallel_decoder
    assert not tiny_model(attention="bahdanau", input_feeding=False).parallel_decoder
    assert tiny_model(attention="concat", input_feeding=False).parallel_decoder


@pytest.mark.parametrize("attention", sorted(ATTENTIONS))
def test_batch_equals_each_example_alone(attention: str) -> None:
    """Padding of the source (and its padded tokens' values) never changes an example's result."""
    model = tiny_model(attention=attention)
    src, src_lengths = source_batch()
    tgt, tgt_lengths = target_batch()
    tgt_in, _ = decoder_io(tgt, tgt_lengths, model.config)
    logits, weights = model(src, src_lengths, tgt_in, return_attention=True)
    valid = torch.arange(7) < src_lengths.unsqueeze(1)  # (B, S)
    assert torch.all(weights.masked_select(~valid.unsqueeze(1)) == 0.0)
    noisy = torch.where(valid, src, 5)  # other token ids at the padded positions
    torch.testing.assert_close(model(noisy, src_lengths, tgt_in), logits, **TOL)
    for b, n in enumerate(src_lengths.tolist()):
        alone = model(src[b : b + 1, :n], [n], tgt_in[b : b + 1])
        torch.testing.assert_close(alone, logits[b : b + 1], **TOL)


def test_beam_size_one_equals_greedy() -> None:
    model = tiny_model()
    src, src_lengths = source_batch()
    for alpha in (0.0, 0.6, 1.0):
        greedy = model.greedy(src, src_lengths, max_len=12)
        beam = model.beam_search(src, src_lengths, beam_size=1, max_len=12, length_penalty=alpha)
        assert torch.equal(beam.tokens, greedy.tokens)
        assert torch.equal(beam.lengths, greedy.lengths)
        torch.testing.assert_close(beam.scores, greedy.scores, **TOL)


@functools.cache
def trained_a_little(steps: int = 60) -> Seq2Seq:
    """A model with a peaked output distribution, so that hypotheses end at different lengths."""
    torch.manual_seed(0)
    model = Seq2Seq(tiny_config(dropout=0.0)).double()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    src, src_lengths = source_batch()
    tgt, tgt_lengths = target_batch()
    tgt_in, tgt_out = decoder_io(tgt, tgt_lengths, model.config)
    for _ in range(steps):
        loss = sequence_loss(model(src, src_lengths, tgt_in), tgt_out, PAD)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("alpha", [0.0, 0.6])
@pytest.mark.parametrize("beam_size", [2, 4])
def test_batched_beam_search_equals_one_at_a_time(beam_size: int, alpha: float) -> None:
    model = trained_a_little()
    src, src_lengths = source_batch()
    batched = model.beam_search(
        src, src_lengths, beam_size=beam_size, max_len=9, length_penalty=alpha
    )
    assert batched.lengths.unique().numel() > 1  # hypotheses of different lengths in one batch
    for b, n in enumerate(src_lengths.tolist()):
        alone = model.beam_search(
            src[b : b + 1, :n], [n], beam_size=beam_size, max_len=9, length_penalty=alpha
        )
        t = alone.tokens.shape[1]
        assert torch.equal(batched.tokens[b, :t], alone.tokens[0])
        assert torch.all(batched.tokens[b, t:] == PAD)
        assert batched.lengths[b] == alone.lengths[0]
        torch.testing.assert_close(batched.scores[b], alone.scores[0], **TOL)


def sequence_log_prob(model: Seq2Seq, src: torch.Tensor, tokens: list[int]) -> float:
    """log p(tokens | src) under the model, as the searches score it (PAD and BOS excluded)."""
    with torch.no_grad():
        return _sequence_log_prob(model, src, tokens)


def _sequence_log_prob(model: Seq2Seq, src: torch.Tensor, tokens: list[int]) -> float:
    tgt_in = torch.tensor([[BOS, *tokens[:-1]]])
    logits = model(src, [src.shape[1]], tgt_in)
    logp = torch.log_softmax(logits[0], -1)
    return float(sum(logp[t, y] for t, y in enumerate(tokens)))


@pytest.mark.parametrize("alpha", [0.0, 0.6, 2.0])
def test_wide_beam_search_is_exhaustive_search(alpha: float) -> None:
    """With a beam wider than every candidate set, beam search returns the best sequence of all.

    Target vocabulary {EOS, a, b} (plus PAD, BOS); every sequence of at most 3 tokens that ends
    with EOS, or that reaches 3 tokens without it, is scored by log p / ((5 + n) / 6) ** alpha.
    """
    torch.manual_seed(0)
    model = Seq2Seq(tiny_config(tgt_vocab=5, dropout=0.0)).double().eval()
    with torch.no_grad():
        model.generator.weight.mul_(8.0)  # a peaked distribution: scores far apart
    src = torch.tensor([[3, 4, 5, 6]])
    max_len = 3
    candidates = []
    for n in range(1, max_len + 1):
        for body in itertools.product([3, 4], repeat=n - 1):
            candidates.append([*body, EOS])
        if n == max_len:
            candidates += [
                [*body, y] for body in itertools.product([3, 4], repeat=n - 1) for y in (3, 4)
            ]
    best_score, best = max(
        (sequence_log_prob(model, src, c) / ((5 + len(c)) / 6) ** alpha, c) for c in candidates
    )
    found = model.beam_search(src, [4], beam_size=27, max_len=max_len, length_penalty=alpha)
    assert found.to_lists(EOS)[0] == [y for y in best if y != EOS]
    n = int(found.lengths[0])
    assert n == len(best)
    assert math.isclose(float(found.scores[0]) / ((5 + n) / 6) ** alpha, best_score, rel_tol=1e-9)


class ScriptedDecoder(Seq2Seq):
    """A decoder whose next-token distribution over (EOS, a, b) is a table of the prefix."""

    A, B = 3, 4

    def __init__(self, table: dict[tuple[int, ...], tuple[float, float, float]]) -> None:
        super().__init__(tiny_config(tgt_vocab=5, dropout=0.0))
        self.table = table

    def start(self, src: torch.Tensor, src_lengths) -> DecoderState:
        z = torch.zeros(src.shape[0], 1, dtype=torch.float64)
        prefix = torch.zeros(src.shape[0], 0, dtype=torch.long)
        ones = torch.ones_like(z, dtype=torch.bool)
        return DecoderState((prefix,), z, z, z.unsqueeze(1), z.unsqueeze(1), ones)

    def step(self, token: torch.Tensor, state: DecoderState):
        prefix = state.cells[0]
        if not bool((token == BOS).all()):
            prefix = torch.cat([prefix, token.unsqueeze(1)], 1)
        logits = torch.full((token.shape[0], 5), -math.inf, dtype=torch.float64)
        for row, p in enumerate(prefix.tolist()):
            probs = self.table.get(tuple(y for y in p if y != PAD), (1 / 3, 1 / 3, 1 / 3))
            logits[row, [EOS, self.A, self.B]] = torch.tensor(probs, dtype=torch.float64).log()
        return logits, replace(state, cells=(prefix,))


def test_beam_search_keeps_a_finished_hypothesis_pushed_out_of_the_beam() -> None:
    """k = 2: "EOS" (p = 0.1) finishes first; then "a a" and "a b" push it out of the beam, but
    every longer hypothesis ends below it (p <= 0.067), so the search must return it."""
    a, b = ScriptedDecoder.A, ScriptedDecoder.B
    table = {(): (0.10, 0.82, 0.08), (a,): (0.01, 0.5, 0.49), (a, a): (0.02, 0.49, 0.49)}
    table[(a, b)] = table[(a, a)]
    model = ScriptedDecoder(table).eval()
    src = torch.tensor([[3, 4], [5, 6]])
    found = model.beam_search(src, [2, 2], beam_size=2, max_len=4, length_penalty=0.0)
    assert found.to_lists(EOS) == [[], []]
    assert found.lengths.tolist() == [1, 1]
    torch.testing.assert_close(found.scores, torch.full((2,), math.log(0.1), dtype=torch.float64))
    assert found.tokens.tolist() == [[EOS, PAD, PAD, PAD]] * 2
    # Wide enough to keep everything, the search agrees.
    wide = model.beam_search(src, [2, 2], beam_size=50, max_len=4, length_penalty=0.0)
    assert wide.to_lists(EOS) == [[], []]


def test_hypotheses_end_at_eos_and_are_padded_after_it() -> None:
    model = trained_a_little()
    src, src_lengths = source_batch()
    for hyp in (
        model.greedy(src, src_lengths, max_len=9),
        model.beam_search(src, src_lengths, beam_size=3, max_len=9),
    ):
        for row, n in zip(hyp.tokens.tolist(), hyp.lengths.tolist(), strict=True):
            assert 1 <= n <= 9
            assert all(y not in (PAD, BOS, EOS) for y in row[: n - 1])
            assert row[n - 1] == EOS or n == 9
            assert all(y == PAD for y in row[n:])
        for ids, n in zip(hyp.to_lists(EOS), hyp.lengths.tolist(), strict=True):
            assert EOS not in ids and len(ids) in (n, n - 1)


def test_max_len_stops_the_searches() -> None:
    model = tiny_model()
    src, src_lengths = source_batch()
    assert model.greedy(src, src_lengths, max_len=2).tokens.shape[1] <= 2
    assert model.beam_search(src, src_lengths, beam_size=3, max_len=2).tokens.shape[1] <= 2
    with pytest.raises(ValueError, match="max_len = 0"):
        model.greedy(src, src_lengths, max_len=0)
    with pytest.raises(ValueError, match="beam_size = 0"):
        model.beam_search(src, src_lengths, beam_size=0)
    for limits in (torch.ones(5, dtype=torch.bool), torch.full((5,), 3.0)):
        with pytest.raises(ValueError, match=f"dtype {limits.dtype}; expected a positive integer"):
            model.greedy(src, src_lengths, max_len=limits)


def test_the_searches_take_numpy_numbers() -> None:
    np = pytest.importorskip("numpy")
    model = trained_a_little()
    src, src_lengths = source_batch()
    greedy = model.greedy(src, src_lengths, max_len=6)
    assert torch.equal(model.greedy(src, src_lengths, max_len=np.int64(6)).tokens, greedy.tokens)
    want = model.beam_search(src, src_lengths, beam_size=3, max_len=6, length_penalty=0.5)
    got = model.beam_search(
        src, src_lengths, beam_size=np.int32(3), max_len=np.int64(6), length_penalty=np.float32(0.5)
    )
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.scores, want.scores)
    for bad in (np.True_, True, torch.tensor(3)):
        with pytest.raises(ValueError, match="beam_size = .*; expected a positive integer"):
            model.beam_search(src, src_lengths, beam_size=bad)


@pytest.mark.parametrize("alpha", [-0.5, math.nan, math.inf, "0.6", None])
def test_a_bad_length_penalty_is_named(alpha) -> None:
    model = tiny_model()
    src, src_lengths = source_batch()
    with pytest.raises(ValueError, match=r"length_penalty = .*; expected a finite number >= 0"):
        tiny_config(length_penalty=alpha)
    if alpha is not None:  # None: the config's
        with pytest.raises(ValueError, match=r"length_penalty = .*; expected a finite number"):
            model.beam_search(src, src_lengths, beam_size=2, max_len=3, length_penalty=alpha)


@pytest.mark.parametrize("beam_size", [1, 3])
def test_a_limit_per_source_equals_each_source_alone(beam_size: int) -> None:
    # a model that never ends: every hypothesis runs to its source's own limit, whatever the
    # other sources of the batch allow
    model = tiny_model()
    with torch.no_grad():
        model.generator.bias[EOS] = -1e4
    src, src_lengths = source_batch()
    limits = 2 * src_lengths + 1

    def search(s, n, limit):
        if beam_size == 1:
            return model.greedy(s, n, max_len=limit)
        return model.beam_search(s, n, beam_size=beam_size, max_len=limit)

    batched = search(src, src_lengths, limits)
    assert batched.lengths.tolist() == limits.tolist()
    for b in range(src.shape[0]):
        alone = search(src[b : b + 1], src_lengths[b : b + 1], int(limits[b]))
        n = int(alone.lengths[0])
        assert torch.equal(batched.tokens[b, :n], alone.tokens[0, :n])
        assert torch.allclose(batched.scores[b], alone.scores[0], rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match=r"max_len = \[3, 0"):
        search(src, src_lengths, torch.tensor([3, 0, 1, 1, 1]))
    with pytest.raises(ValueError, match=r"expected a positive integer or an integer tensor"):
        search(src, src_lengths, torch.tensor([3, 1]))


@pytest.mark.parametrize("beam_size", [1, 3])
def test_recipes_decode_a_source_alike_in_any_batch(beam_size: int) -> None:
    from rnnkit.data import Vocab
    from rnnkit.tasks.common import EncoderDecoderConfig, Seq2SeqHooks

    hooks = Seq2SeqHooks()
    hooks.config, hooks.device = EncoderDecoderConfig(), torch.device("cpu")
    hooks.tgt_vocab = Vocab.from_json([*Vocab.build([]).itos, *"abcdefg"])
    model = tiny_model(src_vocab=12, tgt_vocab=len(hooks.tgt_vocab)).float()
    with torch.no_grad():
        model.generator.bias[Vocab.eos_id] = -1e4  # never ends: each runs to its own limit
    short, long = [5], [5] * 20
    alone = hooks.decode(model, [short], beam_size=beam_size)[0]
    assert len(alone) == 2 * len(short) + 10
    assert hooks.decode(model, [short, long], beam_size=beam_size)[0] == alone


def test_decoder_io() -> None:
    cfg = tiny_config()
    tgt = torch.tensor([[5, 6, 7], [8, 9, 9]])  # the second row's last 9 is padding
    tgt_in, tgt_out = decoder_io(tgt, [3, 2], cfg)
    assert tgt_in.tolist() == [[BOS, 5, 6, 7], [BOS, 8, 9, PAD]]
    assert tgt_out.tolist() == [[5, 6, 7, EOS], [8, 9, EOS, PAD]]


def test_sequence_loss_ignores_padding() -> None:
    logits = torch.randn(2, 3, 5)
    target = torch.tensor([[3, 4, PAD], [2, PAD, PAD]])
    expected = torch.nn.functional.cross_entropy(
        logits[[0, 0, 1], [0, 1, 0]], torch.tensor([3, 4, 2])
    )
    torch.testing.assert_close(sequence_loss(logits, target, PAD), expected)


@pytest.mark.parametrize("feed", [False, True])
def test_model_loss_is_sequence_loss_of_the_logits(feed: bool) -> None:
    """Seq2Seq.loss runs the output layer on non-padding positions only; the loss and every
    gradient equal the loss of the full logits."""
    model = tiny_model(input_feeding=feed, attention="general", dropout=0.0)
    src, src_lengths = source_batch()
    tgt_in, tgt_out = decoder_io(*target_batch(), model.config)

    def grads(loss):
        return torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)

    packed = model.loss(src, src_lengths, tgt_in, tgt_out, label_smoothing=0.1)
    full = sequence_loss(model(src, src_lengths, tgt_in), tgt_out, PAD, 0.1)
    torch.testing.assert_close(packed, full, **TOL)
    for a, b in zip(grads(packed), grads(full), strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, **TOL)


def test_bf16_output_runs_in_training_only() -> None:
    model = Seq2Seq(tiny_config(bf16_output=True, dropout=0.0))
    src, src_lengths = source_batch()
    tgt_in, tgt_out = decoder_io(*target_batch(), model.config)
    exact = Seq2Seq(tiny_config(dropout=0.0))
    exact.load_state_dict(model.state_dict())
    for m in (model, exact):
        m.train()
    fast = model.loss(src, src_lengths, tgt_in, tgt_out)
    slow = exact.loss(src, src_lengths, tgt_in, tgt_out)
    assert fast.dtype == torch.float32 and fast != slow  # bfloat16 products differ...
    torch.testing.assert_close(fast, slow, rtol=2e-2, atol=2e-2)  # ...by bfloat16 rounding
    fast.backward()
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())
    model.eval()
    exact.eval()
    torch.testing.assert_close(model(src, src_lengths, tgt_in), exact(src, src_lengths, tgt_in))


def test_summarise_final_state_reads_the_top_layer_of_every_encoder() -> None:
    x = torch.randn(6, 3, 4)
    lengths = torch.tensor([6, 2, 4])
    lstm = rnnkit.LSTM(4, 5, num_layers=2, bidirectional=True)
    _, (h_n, c_n) = lstm(x, lengths=lengths)
    h, c = summarise_final_state(lstm, (h_n, c_n))
    torch.testing.assert_close(h, torch.cat([h_n[2], h_n[3]], -1))
    torch.testing.assert_close(c, torch.cat([c_n[2], c_n[3]], -1))

    gru = rnnkit.GRU(4, 5)
    _, h_n = gru(x, lengths=lengths)
    h, c = summarise_final_state(gru, h_n)
    assert c is None and torch.equal(h, h_n[0])

    stack = rnnkit.Stacked(
        [
            rnnkit.Bidirectional(
                rnnkit.Recurrent(rnnkit.LSTMCell(4, 5)),
                rnnkit.Recurrent(rnnkit.LSTMCell(4, 5), reverse=True),
            ),
            rnnkit.Bidirectional(
                rnnkit.Recurrent(rnnkit.GRUCell(10, 3)),
                rnnkit.Recurrent(rnnkit.GRUCell(10, 3), reverse=True),
            ),
        ]
    )
    out, finals = stack(x, lengths=lengths)
    h, c = summarise_final_state(stack, finals)
    assert c is None and h.shape == (3, 6)
    # The forward direction ends at each sequence's last step, where the output equals h.
    torch.testing.assert_close(h[:, :3], out[lengths - 1, torch.arange(3), :3])
    torch.testing.assert_close(h[:, 3:], out[0, :, 3:])  # the backward direction ends at t = 0


def test_any_rnnkit_layer_as_encoder() -> None:
    cfg = tiny_config(decoder_cell="gru", attention="general")
    encoders = [
        rnnkit.GRU(6, 4, batch_first=True),
        rnnkit.Stacked(
            [
                rnnkit.Bidirectional(
                    rnnkit.Recurrent(rnnkit.GRUCell(6, 4)),
                    rnnkit.Recurrent(rnnkit.GRUCell(6, 4), reverse=True),
                ),
                rnnkit.Recurrent(rnnkit.LSTMCell(8, 5)),
            ]
        ),
    ]
    src, src_lengths = source_batch()
    tgt, tgt_lengths = target_batch()
    tgt_in, tgt_out = decoder_io(tgt, tgt_lengths, cfg)
    for encoder in encoders:
        model = Seq2Seq(cfg, encoder=encoder)
        loss = sequence_loss(model(src, src_lengths, tgt_in), tgt_out, PAD)
        loss.backward()
        assert all(p.grad is not None for p in model.encoder.layer.parameters())
        model.eval()
        assert model.beam_search(src, src_lengths, beam_size=2, max_len=5).tokens.shape[0] == 5


def test_zero_bridge_starts_from_zeros() -> None:
    model = tiny_model(bridge="zero")
    state = model.start(*source_batch())
    h, c = state.cells[0]
    assert torch.all(h == 0) and torch.all(c == 0)


def test_config_errors_name_the_bad_value() -> None:
    with pytest.raises(ValueError, match="attention = 'luong'"):
        tiny_config(attention="luong")
    with pytest.raises(ValueError, match="decoder_cell = 'rnn'"):
        tiny_config(decoder_cell="rnn")
    with pytest.raises(ValueError, match="embed_size = 0"):
        tiny_config(embed_size=0)
    with pytest.raises(ValueError, match="special ids"):
        tiny_config(bos_id=0)
    for name, value in (("eos_id", 2.5), ("pad_id", 0.0), ("bos_id", True)):
        with pytest.raises(ValueError, match=f"{name} = {value}; expected an integer token id"):
            tiny_config(**{name: value})
    with pytest.raises(ValueError, match="tie_embeddings"):
        tiny_config(tie_embeddings=True)
    with pytest.raises(ValueError, match="expected embed_size = 6"):
        Seq2Seq(tiny_config(), encoder=rnnkit.LSTM(5, 4))
    with pytest.raises(ValueError, match="backend = 'fast'"):
        Seq2Seq(tiny_config(), backend="fast")
    src, src_lengths = source_batch()
    with pytest.raises(ValueError, match=r"tgt_in has shape \(2, 3\); expected \(B, T\)"):
        tiny_model()(src, src_lengths, torch.ones(2, 3, dtype=torch.long))
    for feed in (True, False):  # the step loop, and all steps at once
        model = tiny_model(attention="general", input_feeding=feed)
        empty = torch.ones(5, 0, dtype=torch.long)
        with pytest.raises(ValueError, match=r"tgt_in has shape \(5, 0\); .* and T >= 1"):
            model(src, src_lengths, empty)
        with pytest.raises(ValueError, match=r"tgt_in has shape \(5, 0\); .* and T >= 1"):
            model.loss(src, src_lengths, empty, empty)
    tgt_in, tgt_out = decoder_io(*target_batch(), tiny_config())
    for bad in (tgt_out[:, 1:], tgt_out[1:]):
        with pytest.raises(
            ValueError, match=rf"tgt_out has shape \({bad.shape[0]}, {bad.shape[1]}\)"
        ):
            tiny_model().loss(src, src_lengths, tgt_in, bad)
    assert Seq2SeqConfig(**tiny_config().to_dict()) == tiny_config()


def test_bad_token_ids_are_named() -> None:
    model = tiny_model()
    src, src_lengths = source_batch()
    tgt_in, _ = decoder_io(*target_batch(), model.config)
    bad_src = src.clone()
    bad_src[2, 1] = 9  # src_vocab = 9
    with pytest.raises(ValueError, match=r"src\[2, 1\] = 9; expected a token id in \[0, 9\)"):
        model.greedy(bad_src, src_lengths)
    with pytest.raises(ValueError, match=r"src\[2, 1\] = 9; expected a token id in \[0, 9\)"):
        model.beam_search(bad_src, src_lengths)
    with pytest.raises(TypeError, match=r"src has dtype torch.float32; expected integer"):
        model.start(src.float(), src_lengths)
    bad_tgt = tgt_in.clone()
    bad_tgt[1, 3] = -1
    with pytest.raises(ValueError, match=r"tgt_in\[1, 3\] = -1; expected a token id in \[0, 10\)"):
        model(src, src_lengths, bad_tgt)
    state = model.start(src, src_lengths)
    with pytest.raises(ValueError, match=r"token\[4\] = 10; expected a token id in \[0, 10\)"):
        model.step(torch.tensor([1, 1, 1, 1, 10]), state)
    for token in (torch.ones(3, dtype=torch.long), torch.ones(5, 1, dtype=torch.long)):
        shape = re.escape(str(tuple(token.shape)))
        with pytest.raises(ValueError, match=rf"token has shape {shape}; expected \(B,\) = \(5,\)"):
            model.step(token, state)


def test_attention_heatmap_png(tmp_path) -> None:
    pytest.importorskip("matplotlib", reason="pip install matplotlib")
    model = tiny_model()
    src, src_lengths = source_batch()
    tgt, tgt_lengths = target_batch()
    tgt_in, _ = decoder_io(tgt, tgt_lengths, model.config)
    _, weights = model(src, src_lengths, tgt_in, return_attention=True)
    path = plot_attention(
        weights[0],
        list("abcdefg"),
        ["x", "y", "z", "</s>"],
        tmp_path / "attn.png",
        title="example 0",
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def reverse_task(gen: torch.Generator, n: int, symbols: int = 8, max_len: int = 6):
    """Random strings of 2..max_len symbols (ids 3..) and their reversals."""
    lengths = torch.randint(2, max_len + 1, (n,), generator=gen)
    src = torch.randint(3, 3 + symbols, (n, max_len), generator=gen)
    src = torch.where(torch.arange(max_len) < lengths.unsqueeze(1), src, PAD)
    tgt = torch.stack(
        [torch.cat([s[:k].flip(0), s[k:]]) for s, k in zip(src, lengths, strict=True)]
    )
    return src, lengths, tgt


def test_learns_to_reverse_sequences() -> None:
    """A small reversal task learned to >= 99 % sequence accuracy (greedy) in a few seconds."""
    torch.manual_seed(0)
    cfg = Seq2SeqConfig(
        src_vocab=11,
        tgt_vocab=11,
        embed_size=16,
        encoder_layers=1,
        encoder_hidden=32,
        decoder_hidden=64,
        attention_size=32,
        dropout=0.0,
    )
    model = Seq2Seq(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    test_src, test_lengths, test_tgt = reverse_task(torch.Generator().manual_seed(1), 500)
    expected = [t[:n].tolist() for t, n in zip(test_tgt, test_lengths, strict=True)]
    accuracy = 0.0
    for step in range(1, 401):
        src, lengths, tgt = reverse_task(gen, 64)
        tgt_in, tgt_out = decoder_io(tgt, lengths, cfg)
        loss = sequence_loss(model(src, lengths, tgt_in), tgt_out, PAD)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            model.eval()
            got = model.greedy(test_src, test_lengths, max_len=8).to_lists(EOS)
            model.train()
            accuracy = sum(g == e for g, e in zip(got, expected, strict=True)) / len(expected)
            if accuracy >= 0.99:
                break
    assert accuracy >= 0.99, f"sequence accuracy {accuracy:.3f} after {step} steps"
    model.eval()
    beam = model.beam_search(test_src, test_lengths, beam_size=3, max_len=8).to_lists(EOS)
    assert sum(g == e for g, e in zip(beam, expected, strict=True)) / len(expected) >= 0.99


def test_charlm_sampling_at_a_tiny_temperature_is_the_most_likely_text():
    torch.manual_seed(0)
    model = CharLM(vocab_size=12, embed_size=8, hidden_size=16)
    greedy = model.sample([4, 5], 20, temperature=0, banned=range(4))
    for temperature in (1e-40, 1e-30):  # the logits / temperature overflow float32 unshifted
        gen = torch.Generator().manual_seed(0)
        assert model.sample([4, 5], 20, temperature, gen, banned=range(4)) == greedy


def test_charlm_sampling_at_a_temperature_beyond_float32_draws_without_nan():
    torch.manual_seed(0)
    model = CharLM(vocab_size=12, embed_size=8, hidden_size=16)
    greedy = model.sample([4, 5], 20, temperature=0, banned=range(4))
    gen = torch.Generator().manual_seed(0)
    assert model.sample([4, 5], 20, 1e-320, gen, banned=range(4)) == greedy  # 0 in float32
    for temperature in (1e308, math.inf):  # inf in float32: every allowed id alike
        gen = torch.Generator().manual_seed(0)
        drawn = model.sample([4, 5], 200, temperature, gen, banned=range(4))
        assert set(drawn) == set(range(4, 12))


def test_charlm_sampling_restores_the_training_mode_when_it_fails():
    torch.manual_seed(0)
    model = CharLM(vocab_size=12, embed_size=8, hidden_size=16).train()
    calls = 0

    def fail_on_the_third_step(module, args, output):
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("interrupted")

    hook = model.head.register_forward_hook(fail_on_the_third_step)
    with pytest.raises(RuntimeError, match="interrupted"):
        model.sample([4, 5], 20)
    hook.remove()
    assert model.training
    model.eval()
    model.sample([4, 5], 3)
    assert not model.training


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(prompt=[4, 12]), r"prompt\[1\] = 12; expected an id in \[0, 12\)"),
        (dict(prompt=[-1]), r"prompt\[0\] = -1; expected an id in \[0, 12\)"),
        (dict(banned=[3, 99]), r"banned\[1\] = 99; expected an id in \[0, 12\)"),
        (dict(banned=range(12), temperature=0), r"banned holds every id .*vocab_size = 12"),
        (dict(banned=range(12)), r"banned holds every id"),
        (dict(length=-1), r"length = -1; expected a non-negative integer"),
        (dict(length=2.5), r"length = 2.5; expected a non-negative integer"),
        (dict(temperature=math.nan), r"temperature = nan; expected >= 0"),
        (dict(temperature="0.5"), r"temperature = '0.5'; expected a number >= 0"),
        (dict(temperature=None), r"temperature = None; expected a number >= 0"),
        (dict(prompt=7), r"prompt = 7; expected a sequence of ids in \[0, 12\)"),
    ],
)
def test_charlm_sampling_names_a_bad_argument(kwargs, message):
    torch.manual_seed(0)
    model = CharLM(vocab_size=12, embed_size=8, hidden_size=16).train()
    args = {"prompt": [4, 5], "length": 3, "temperature": 1.0, **kwargs}
    with pytest.raises(ValueError, match=message):
        model.sample(**args)
    assert model.training


def test_charlm_names_a_bad_token_id():
    model = CharLM(vocab_size=12, embed_size=8, hidden_size=16)
    with pytest.raises(ValueError, match=r"x\[1, 2\] = 12; expected a token id in \[0, 12\)"):
        model(torch.tensor([[1, 2, 3], [4, 5, 12]]))


def test_charlm_sampling_takes_ids_from_any_iterable_and_numpy_integers():
    np = pytest.importorskip("numpy")
    torch.manual_seed(0)
    model = CharLM(vocab_size=12, embed_size=8, hidden_size=16)
    want = model.sample([4, 5], 6, temperature=0, banned=[0, 1, 2, 3])
    got = model.sample(
        list(np.array([4, 5])), np.int64(6), temperature=0, banned=(i for i in range(4))
    )
    assert got == want
    assert not {0, 1, 2, 3} & set(got)
    # a prompt of several ids as a NumPy array or a tensor, a temperature as a 0-d tensor
    assert model.sample(np.array([4, 5]), 6, temperature=0, banned=[0, 1, 2, 3]) == want
    assert (
        model.sample(torch.tensor([4, 5]), 6, temperature=torch.tensor(0.0), banned=[0, 1, 2, 3])
        == want
    )


# -- ensembles --------------------------------------------------------------------------------


def tiny_ensemble(size: int = 3, **overrides) -> Seq2SeqEnsemble:
    torch.manual_seed(0)
    return Seq2SeqEnsemble(lambda: Seq2Seq(tiny_config(**overrides)), size).double().eval()


def test_ensemble_step_gives_the_members_mean_probability() -> None:
    model = tiny_ensemble(3)
    src, src_lengths = source_batch()
    token = torch.full((5,), BOS)
    logits, state = model.step(token, model.start(src, src_lengths))
    probs = []
    for m in model.members:  # each member alone, from its own initial state
        member_logits, _ = m.step(token, m.start(src, src_lengths))
        probs.append(torch.softmax(member_logits, -1))
    torch.testing.assert_close(torch.softmax(logits, -1), torch.stack(probs).mean(0), **TOL)
    assert len(state.members) == 3
    mean_weights = torch.stack([s.weights for s in state.members]).mean(0)
    torch.testing.assert_close(state.weights, mean_weights, **TOL)
    # the members differ (each its own initialisation), so the mean is not any one of them
    assert not torch.allclose(probs[0], probs[1])


def test_ensemble_of_one_model_twice_decodes_as_the_model() -> None:
    one = trained_a_little()
    twice = Seq2SeqEnsemble(lambda: one, 2).eval()
    src, src_lengths = source_batch()
    for k in (1, 3):
        a = one.beam_search(src, src_lengths, beam_size=k, max_len=9)
        b = twice.beam_search(src, src_lengths, beam_size=k, max_len=9)
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.lengths, b.lengths)
        torch.testing.assert_close(a.scores, b.scores, **TOL)
    g = twice.greedy(src, src_lengths, max_len=9)
    assert torch.equal(g.tokens, one.greedy(src, src_lengths, max_len=9).tokens)


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_wide_beam_search_of_an_ensemble_is_exhaustive_search(alpha: float) -> None:
    """The ensemble's sequence score is the sum over steps of the log of its members' mean
    next-token probability (the teacher-forced logits of ``forward``), and a beam wider than every
    candidate set finds the best sequence under it."""
    model = tiny_ensemble(2, tgt_vocab=5, dropout=0.0)
    with torch.no_grad():
        for m in model.members:
            m.generator.weight.mul_(8.0)
    src = torch.tensor([[3, 4, 5, 6]])
    max_len = 3
    candidates = [[*body, EOS] for n in range(3) for body in itertools.product([3, 4], repeat=n)]
    candidates += [list(c) for c in itertools.product([3, 4], repeat=3)]
    best_score, best = max(
        (sequence_log_prob(model, src, c) / ((5 + len(c)) / 6) ** alpha, c) for c in candidates
    )
    found = model.beam_search(src, [4], beam_size=27, max_len=max_len, length_penalty=alpha)
    assert found.to_lists(EOS)[0] == [y for y in best if y != EOS]
    n = int(found.lengths[0])
    assert math.isclose(float(found.scores[0]) / ((5 + n) / 6) ** alpha, best_score, rel_tol=1e-9)
    # ...which is not what either member alone would say of every candidate
    alone = [sequence_log_prob(m, src, best) for m in model.members]
    assert all(not math.isclose(a, sequence_log_prob(model, src, best)) for a in alone)


def test_batched_ensemble_beam_search_equals_one_at_a_time() -> None:
    model = tiny_ensemble(2, dropout=0.0)
    src, src_lengths = source_batch()
    batched = model.beam_search(src, src_lengths, beam_size=3, max_len=7)
    for b, n in enumerate(src_lengths.tolist()):
        alone = model.beam_search(src[b : b + 1, :n], [n], beam_size=3, max_len=7)
        t = alone.tokens.shape[1]
        assert torch.equal(batched.tokens[b, :t], alone.tokens[0])
        torch.testing.assert_close(batched.scores[b], alone.scores[0], **TOL)


def test_ensemble_loss_is_the_members_mean_and_trains_each_member() -> None:
    model = tiny_ensemble(3).train()
    src, src_lengths = source_batch()
    tgt_in, tgt_out = decoder_io(*target_batch(), model.config)
    torch.manual_seed(5)
    loss = model.loss(src, src_lengths, tgt_in, tgt_out, label_smoothing=0.1)
    torch.manual_seed(5)  # the same dropout masks, drawn in the same order
    each = [m.loss(src, src_lengths, tgt_in, tgt_out, label_smoothing=0.1) for m in model.members]
    torch.testing.assert_close(loss, torch.stack(each).mean(), **TOL)
    loss.backward()
    for m in model.members:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.generator.parameters())
    model.eval()
    logits, weights = model(src, src_lengths, tgt_in, return_attention=True)
    outs = [m(src, src_lengths, tgt_in, return_attention=True) for m in model.members]
    mean = torch.stack([torch.softmax(o[0], -1) for o in outs]).mean(0)
    torch.testing.assert_close(torch.softmax(logits, -1), mean, **TOL)
    torch.testing.assert_close(weights, torch.stack([o[1] for o in outs]).mean(0), **TOL)


def test_ensemble_errors_name_the_bad_value() -> None:
    for size in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=rf"size = {size!r}; expected at least 1 member"):
            Seq2SeqEnsemble(lambda: Seq2Seq(tiny_config()), size)
    sizes = iter([10, 11])
    with pytest.raises(ValueError, match="member 1 has tgt_vocab = 11; expected 10, as member 0"):
        Seq2SeqEnsemble(lambda: Seq2Seq(tiny_config(tgt_vocab=next(sizes))), 2)
    model = tiny_ensemble(2)
    src, src_lengths = source_batch()
    state = model.members[0].start(src, src_lengths)
    with pytest.raises(ValueError, match="state is DecoderState; expected an EnsembleState of 2"):
        model.step(torch.full((5,), BOS), state)


# -- right-to-left members --------------------------------------------------------------------


def tiny_mixed(size: int = 2, right_to_left: int = 1, **overrides) -> Seq2SeqEnsemble:
    torch.manual_seed(0)
    build = lambda: Seq2Seq(tiny_config(**overrides))  # noqa: E731
    return Seq2SeqEnsemble(build, size, right_to_left).double().eval()


def test_reverse_targets_reverse_each_body_and_keep_eos_last() -> None:
    config = tiny_config()
    tgt, lengths = target_batch()
    tgt_in, tgt_out = decoder_io(tgt, lengths, config)
    rev_in, rev_out = reverse_targets(tgt_out, config)
    assert rev_in.shape == tgt_in.shape and rev_out.shape == tgt_out.shape
    for b, n in enumerate(lengths.tolist()):
        body = tgt[b, :n].tolist()[::-1]
        assert rev_out[b].tolist() == [*body, EOS] + [PAD] * (tgt.shape[1] - n)
        assert rev_in[b].tolist() == [BOS, *body] + [PAD] * (tgt.shape[1] - n)
    # twice reversed is the original
    again_in, again_out = reverse_targets(rev_out, config)
    assert torch.equal(again_in, tgt_in) and torch.equal(again_out, tgt_out)


def test_a_right_to_left_member_learns_the_targets_reversed() -> None:
    model = tiny_mixed(3, right_to_left=1).train()
    assert model.reverse == (False, False, True)
    src, src_lengths = source_batch()
    tgt_in, tgt_out = decoder_io(*target_batch(), model.config)
    rev_in, rev_out = reverse_targets(tgt_out, model.config)
    torch.manual_seed(5)
    loss = model.loss(src, src_lengths, tgt_in, tgt_out, label_smoothing=0.1)
    torch.manual_seed(5)  # the same dropout masks, drawn in the same order
    m0, m1, m2 = model.members
    each = [
        m0.loss(src, src_lengths, tgt_in, tgt_out, label_smoothing=0.1),
        m1.loss(src, src_lengths, tgt_in, tgt_out, label_smoothing=0.1),
        m2.loss(src, src_lengths, rev_in, rev_out, label_smoothing=0.1),
    ]
    torch.testing.assert_close(loss, torch.stack(each).mean(), **TOL)
    # forward covers the left-to-right members only
    model.eval()
    logits = model(src, src_lengths, tgt_in)
    mean = torch.stack([torch.softmax(m(src, src_lengths, tgt_in), -1) for m in (m0, m1)]).mean(0)
    torch.testing.assert_close(torch.softmax(logits, -1), mean, **TOL)


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_a_search_in_both_directions_picks_the_best_candidate_by_both(alpha: float) -> None:
    """With beams wider than every candidate set, every sequence is a candidate, and the search
    returns the one with the highest (log p_left(y) + log p_right(reversed y)) / lp(|y|)."""
    model = tiny_mixed(2, right_to_left=1, tgt_vocab=5, dropout=0.0)
    forward, backward = model.members
    with torch.no_grad():
        for m in model.members:
            m.generator.weight.mul_(8.0)
    src = torch.tensor([[3, 4, 5, 6]])
    bodies = [list(b) for n in range(4) for b in itertools.product([3, 4], repeat=n)]

    def both(body: list[int]) -> float:
        return sequence_log_prob(forward, src, [*body, EOS]) + sequence_log_prob(
            backward, src, [*body[::-1], EOS]
        )

    best_score, best = max((both(b) / ((5 + len(b) + 1) / 6) ** alpha, b) for b in bodies)
    found = model.beam_search(src, [4], beam_size=27, max_len=3, length_penalty=alpha)
    assert found.to_lists(EOS)[0] == best
    lp = ((5 + len(best) + 1) / 6) ** alpha
    assert math.isclose(float(found.scores[0]) / lp, best_score, rel_tol=1e-9)
    # EOS where a search produced it (a body of 3 tokens reached max_len without one)
    assert (found.tokens[0, len(best)] == EOS) == (len(best) < 3)


def test_a_search_in_both_directions_batched_equals_one_at_a_time(monkeypatch) -> None:
    model = tiny_mixed(3, right_to_left=1, dropout=0.0)
    src, src_lengths = source_batch()
    whole_batch = model.beam_search(src, src_lengths, beam_size=3, max_len=7)
    monkeypatch.setattr(seq2seq, "_RESCORE_LOGITS", 1)  # rescored one candidate at a time
    for k in (1, 3):
        batched = model.beam_search(src, src_lengths, beam_size=k, max_len=7)
        for b, n in enumerate(src_lengths.tolist()):
            alone = model.beam_search(src[b : b + 1, :n], [n], beam_size=k, max_len=7)
            t = int(alone.lengths[0])
            assert torch.equal(batched.tokens[b, :t], alone.tokens[0, :t])
            assert torch.all(batched.tokens[b, t:] == PAD)
            assert batched.lengths[b] == alone.lengths[0]
            torch.testing.assert_close(batched.scores[b], alone.scores[0], **TOL)
        if k == 3:
            assert torch.equal(batched.tokens, whole_batch.tokens)
            torch.testing.assert_close(batched.scores, whole_batch.scores, **TOL)
    greedy = model.greedy(src, src_lengths, max_len=7)
    beam1 = model.beam_search(src, src_lengths, beam_size=1, max_len=7)
    assert torch.equal(greedy.tokens, beam1.tokens)
    # per-source limits hold
    limits = torch.tensor([1, 2, 3, 4, 5])
    hyp = model.beam_search(src, src_lengths, beam_size=2, max_len=limits)
    assert all(len(h) <= int(m) for h, m in zip(hyp.to_lists(EOS), limits, strict=True))


def test_right_to_left_errors_name_the_bad_value() -> None:
    build = lambda: Seq2Seq(tiny_config())  # noqa: E731
    for r in (2, 3, -1, 0.5, True):
        with pytest.raises(ValueError, match=rf"right_to_left = {r!r}; expected an integer from"):
            Seq2SeqEnsemble(build, 2, r)


def test_beam_size_one_equals_greedy_on_tied_scores() -> None:
    """Where next tokens tie (an output layer of zeros), beam_size=1 picks what greedy decoding
    picks, the first of them, not what topk happens to return."""
    model = tiny_model()
    with torch.no_grad():
        for p in model.generator.parameters():
            p.zero_()
    src, src_lengths = source_batch()
    greedy = model.greedy(src, src_lengths, max_len=6)
    beam = model.beam_search(src, src_lengths, beam_size=1, max_len=6)
    assert torch.equal(beam.tokens, greedy.tokens)


def test_targets_are_checked_and_a_batch_without_one_has_loss_zero() -> None:
    model = tiny_model(dropout=0.0)
    src, src_lengths = source_batch()
    tgt_in, tgt_out = decoder_io(*target_batch(), model.config)
    bad = tgt_out.clone()
    bad[1, 2] = 10  # tgt_vocab = 10
    with pytest.raises(
        ValueError, match=r"^tgt_out\[1, 2\] = 10; expected a token id in \[0, 10\)"
    ):
        model.loss(src, src_lengths, tgt_in, bad)
    nothing = torch.full_like(tgt_out, PAD)
    loss = model.loss(src, src_lengths, tgt_in, nothing)
    assert loss.item() == 0.0  # no token to learn: 0, not the NaN of a mean over none
    loss.backward()
    logits = model(src, src_lengths, tgt_in)
    assert sequence_loss(logits, nothing, PAD).item() == 0.0


def test_a_right_to_left_member_learns_nothing_from_a_row_without_target() -> None:
    """An ensemble with right-to-left members takes a target row of padding alone, as one
    model does: the loss is the loss of the other rows."""
    torch.manual_seed(0)
    ensemble = Seq2SeqEnsemble(
        lambda: Seq2Seq(tiny_config(dropout=0.0)), 2, right_to_left=1
    ).double()
    src, src_lengths = source_batch()
    tgt_in, tgt_out = decoder_io(*target_batch(), ensemble.config)
    tgt_out[1] = PAD  # row 1: nothing to learn
    keep = [0, 2, 3, 4]
    whole = ensemble.loss(src, src_lengths, tgt_in, tgt_out)
    rest = ensemble.loss(src[keep], src_lengths[keep], tgt_in[keep], tgt_out[keep])
    torch.testing.assert_close(whole, rest, **TOL)


def test_a_zero_dimensional_limit_is_one_limit_for_every_source() -> None:
    model = tiny_model()
    src, src_lengths = source_batch()
    want = model.greedy(src, src_lengths, max_len=3)
    got = model.greedy(src, src_lengths, max_len=torch.tensor(3))
    assert torch.equal(got.tokens, want.tokens)
