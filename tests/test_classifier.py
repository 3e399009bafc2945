"""SequenceClassifier's attention pooling, pretrained and frozen word vectors, the GloVe loader,
and the attention heat strip."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from recipe_helpers import need_data

from rnnkit.models import ClassifierEnsemble, SequenceClassifier
from rnnkit.models.classifier import POOLING, ConvBranch, ConvFront, SelfAttentionPool, pool
from rnnkit.plots import attention_strips

#: fp32 tolerance for outputs (DESIGN.md: verification chain).
OUT_TOL = 1e-5


def test_attention_pool_weights_cover_valid_steps_only():
    attn = SelfAttentionPool(6, 5)
    out = torch.randn(3, 4, 6)
    lengths = torch.tensor([4, 2, 0])
    pooled, weights = attn(out, lengths)
    assert pooled.shape == (3, 6) and weights.shape == (3, 4)
    torch.testing.assert_close(weights[:2].sum(-1), torch.ones(2), rtol=OUT_TOL, atol=OUT_TOL)
    assert (weights[1, 2:] == 0).all() and (weights[2] == 0).all() and (pooled[2] == 0).all()
    # The pooled vector is the weighted sum of the valid steps; padding never enters it.
    expected = (weights[1, :2, None] * out[1, :2]).sum(0)
    torch.testing.assert_close(pooled[1], expected, rtol=OUT_TOL, atol=OUT_TOL)
    noisy = out.clone()
    noisy[1, 2:] = 1e3
    again, w_again = attn(noisy, lengths)
    torch.testing.assert_close(again, pooled, rtol=0, atol=0)
    torch.testing.assert_close(w_again, weights, rtol=0, atol=0)


@pytest.mark.parametrize("garbage", [float("nan"), float("inf")])
def test_attention_pool_ignores_nan_or_inf_in_padding(garbage):
    torch.manual_seed(0)
    attn = SelfAttentionPool(6, 5)
    out = torch.randn(3, 4, 6)
    lengths = torch.tensor([4, 2, 0])
    pooled, weights = attn(out, lengths)
    noisy = out.clone().requires_grad_(True)
    with torch.no_grad():
        noisy[1, 2:] = garbage
        noisy[2] = garbage
    again, w_again = attn(noisy, lengths)
    torch.testing.assert_close(again, pooled, rtol=0, atol=0)
    torch.testing.assert_close(w_again, weights, rtol=0, atol=0)
    again.sum().backward()
    assert torch.isfinite(noisy.grad).all() and (noisy.grad[1, 2:] == 0).all()
    assert all(torch.isfinite(p.grad).all() for p in attn.parameters())


@pytest.mark.parametrize("pooling", POOLING)
def test_prediction_does_not_depend_on_padding(pooling):
    model = SequenceClassifier(2, vocab_size=30, embed_size=8, hidden_size=6, pooling=pooling)
    model.eval()
    x = torch.randint(4, 30, (2, 7))
    x[1, 3:] = 0
    alone = model(x[1:, :3], torch.tensor([3]))
    batched = model(x, torch.tensor([7, 3]))
    torch.testing.assert_close(batched[1:], alone, rtol=OUT_TOL, atol=OUT_TOL)
    logits, weights = model(x, torch.tensor([7, 3]), return_attention=True)
    assert logits.shape == (2, 2)
    if pooling.startswith("attention"):
        assert weights.shape == (2, 7) and (weights[1, 3:] == 0).all()
    else:
        assert weights is None


@pytest.mark.parametrize("pooling", POOLING)
@pytest.mark.parametrize("conv_channels", [0, 3])
def test_lengths_as_a_list_equal_lengths_as_a_tensor(pooling, conv_channels):
    torch.manual_seed(0)
    model = SequenceClassifier(
        2, vocab_size=30, embed_size=8, hidden_size=6, pooling=pooling, conv_channels=conv_channels
    ).eval()
    x = torch.randint(4, 30, (3, 7))
    expected = model(x, torch.tensor([7, 3, 0]))
    for lengths in ([7, 3, 0], (7, 3, 0)):
        torch.testing.assert_close(model(x, lengths), expected, rtol=0, atol=0)
    assert model.explain(x, [7, 3, 0]).backend == model.explain(x, torch.tensor([7, 3, 0])).backend
    with pytest.raises(ValueError, match="lengths\\[0\\] = 8 > T = 7"):
        model(x, [8, 3, 0])


def test_an_ensemble_takes_lengths_as_a_list():
    ensemble = _ensemble(2, pooling="attention").eval()
    x = torch.randn(2, 7, 4)
    expected = ensemble(x, torch.tensor([7, 3]))
    torch.testing.assert_close(ensemble(x, [7, 3]), expected, rtol=0, atol=0)


def test_pretrained_vectors_and_frozen_rows():
    vectors = torch.randn(10, 4)
    frozen = torch.zeros(10, dtype=torch.bool)
    frozen[4:8] = True
    model = SequenceClassifier(
        2, vocab_size=10, embed_size=4, hidden_size=3, vectors=vectors, frozen=frozen, unk_id=3
    )
    weight = model.embedding.weight
    assert (weight[0] == 0).all()  # padding
    torch.testing.assert_close(weight[1:], vectors[1:], rtol=0, atol=0)
    before = weight.detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.0)
    x = torch.tensor([[4, 5, 8, 9], [6, 7, 8, 3]])
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(
            model(x, torch.tensor([4, 4])), torch.tensor([0, 1])
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.embedding.weight.detach()
    assert torch.equal(after[4:8], before[4:8])  # the frozen rows stay exactly as loaded
    assert not torch.equal(after[8:10], before[8:10])  # the others learn
    with pytest.raises(ValueError, match=r"vectors have shape \(9, 4\); expected"):
        SequenceClassifier(2, vocab_size=10, embed_size=4, vectors=torch.zeros(9, 4))


@pytest.mark.parametrize("copy_by", ["deepcopy", "pickle", "torch.save"])
def test_frozen_rows_stay_frozen_in_a_copy_of_the_model(copy_by):
    frozen = torch.zeros(10, dtype=torch.bool)
    frozen[4:8] = True
    torch.manual_seed(0)
    model = SequenceClassifier(2, vocab_size=10, embed_size=4, hidden_size=3, frozen=frozen)
    if copy_by == "deepcopy":
        model = copy.deepcopy(model)
    elif copy_by == "pickle":
        model = pickle.loads(pickle.dumps(model))
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        model = torch.load(buffer, weights_only=False)
    x = torch.tensor([[4, 5, 8, 9], [6, 7, 8, 3]])
    model(x, [4, 4]).sum().backward()
    grad = model.embedding.weight.grad
    assert (grad[4:8] == 0).all()  # the frozen rows get no gradient
    assert (grad[8:10] != 0).any()  # the others do


def test_bad_inputs_are_named():
    tokens = SequenceClassifier(2, vocab_size=10, embed_size=4, hidden_size=3)
    x = torch.tensor([[4, 5, 8, 9], [6, 7, 10, 3]])
    with pytest.raises(ValueError, match=r"x\[1, 2\] = 10; expected a token id in \[0, 10\)"):
        tokens(x, [4, 4])
    with pytest.raises(ValueError, match=r"x has shape \(4,\); expected \(B, T\) token ids"):
        tokens(x[0], [4])
    with pytest.raises(TypeError, match=r"x has dtype torch.float32; expected integer token ids"):
        tokens(x.float(), [4, 4])
    frames = SequenceClassifier(2, input_size=3, hidden_size=3, bidirectional=False)
    with pytest.raises(ValueError, match=r"x has shape \(5, 3\); expected \(B, T, features\)"):
        frames(torch.randn(5, 3), [5])
    with pytest.raises(ValueError, match=r"x has shape \(2, 3\); expected \(B, T, features\)"):
        frames.stream().push(torch.randn(2, 3))


@pytest.mark.parametrize("how", ["max", "mean", "meanmax", "attention"])
def test_poolings_take_lengths_as_a_list(how):
    torch.manual_seed(0)
    out = torch.randn(3, 5, 4)
    if how == "attention":
        pooling = SelfAttentionPool(4, 6)
        torch.testing.assert_close(pooling(out, [5, 0, 2]), pooling(out, torch.tensor([5, 0, 2])))
        with pytest.raises(ValueError, match=r"lengths\[0\] = 6 > T = 5"):
            pooling(out, [6, 0, 2])
    else:
        want = pool(out, torch.tensor([5, 0, 2]), how)
        torch.testing.assert_close(pool(out, [5, 0, 2], how), want, rtol=0, atol=0)
        with pytest.raises(ValueError, match=r"lengths has 2 entries; expected one per sequence"):
            pool(out, [5, 0], how)


def test_token_dropout_uses_the_unknown_id():
    model = SequenceClassifier(2, vocab_size=10, embed_size=4, token_dropout=0.999, unk_id=3)
    seen = []
    model.embedding.register_forward_hook(lambda m, inp, out: seen.append(inp[0].clone()))
    model.train()
    model(torch.tensor([[5, 6, 0]]), torch.tensor([2]))
    assert seen[0].tolist() == [[3, 3, 0]]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_classes=0), r"num_classes = 0; expected an integer >= 1"),
        (dict(num_classes=2.0), r"num_classes = 2.0; expected an integer >= 1"),
        (dict(vocab_size=0), r"vocab_size = 0; expected an integer >= 1"),
        (dict(conv_channels=-1), r"conv_channels = -1; expected an integer >= 0"),
        (dict(token_dropout=1.5), r"token_dropout = 1.5; expected a probability in \[0, 1\]"),
        (dict(token_dropout=float("nan")), r"token_dropout = nan; expected a probability"),
        (dict(token_dropout=0.1, unk_id=10), r"unk_id = 10; expected an id in \[0, 10\)"),
    ],
)
def test_classifier_arguments_are_checked(kwargs, message):
    args = {"num_classes": 2, "vocab_size": 10, "embed_size": 4, "hidden_size": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        SequenceClassifier(args.pop("num_classes"), **args)


@pytest.mark.parametrize("noise", [-0.5, float("nan"), float("inf")])
def test_classifier_input_noise_is_checked(noise):
    with pytest.raises(ValueError, match=r"input_noise = .*; expected a finite number >= 0"):
        SequenceClassifier(2, input_size=4, hidden_size=3, input_noise=noise)


def test_glove_vectors():
    need_data("glove")
    from rnnkit.data import glove

    vectors, found = glove.lookup(["the", "movie", "qzxqzxqzx", "n't"])
    assert found.tolist() == [True, True, False, True]
    torch.testing.assert_close(
        vectors[0, :3], torch.tensor([0.418, 0.24968, -0.41242]), rtol=0, atol=1e-6
    )
    assert (vectors[2] == 0).all() and vectors.shape == (4, 50)
    rows = glove.index()
    assert len(rows) == 400_000 and rows["the"] == 0


def test_attention_strips(tmp_path):
    path = attention_strips(
        [("a fine film", "positive 0.9", ["a", "fine", "film"], [0.1, 0.7, 0.2])],
        tmp_path / "strip.png",
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="2 words but 3 weights"):
        attention_strips([("x", "y", ["a", "b"], [0.1, 0.2, 0.7])], tmp_path / "bad.png")


def test_attention_strips_of_a_long_text_wrap_it_and_keep_every_word_legible(tmp_path, monkeypatch):
    """A review longer than the picture is wide goes on over several lines of the strip: no
    word is drawn over another, neither in the long text nor in a short one beside it."""
    from matplotlib.figure import Figure

    drawn = []
    save = Figure.savefig

    def keep(fig, *args, **kwargs):
        drawn.append(fig)
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    review = ("an oddly moving film whose actors carry the slow middle well " * 12).split()
    rows = [
        ("a long review", "positive 0.9", review, [1 / len(review)] * len(review)),
        ("dull film", "negative 0.8", ["dull", "film"], [0.7, 0.3]),
    ]
    attention_strips(rows, tmp_path / "long.png")
    (fig,) = drawn
    assert fig.get_size_inches()[0] <= 30.0
    renderer = fig.canvas.get_renderer()
    for ax, (_, _, words, _) in zip(fig.axes, rows, strict=True):
        texts = [t for t in ax.texts if t.get_text()]
        assert [t.get_text() for t in texts] == words
        boxes = [t.get_window_extent(renderer) for t in texts]
        for k, a in enumerate(boxes):
            for b in boxes[k + 1 :]:
                assert not a.overlaps(b), (texts[k].get_text(), a, b)


def test_input_noise_in_training_only():
    model = SequenceClassifier(3, input_size=4, hidden_size=5, input_noise=0.5)
    x, lengths = torch.randn(2, 6, 4), torch.tensor([6, 3])
    model.train()
    assert not torch.equal(model(x, lengths), model(x, lengths))
    model.eval()
    torch.testing.assert_close(model(x, lengths), model(x, lengths), rtol=0, atol=0)


def test_conv_front_is_causal_and_ignores_padding():
    torch.manual_seed(0)
    front = ConvFront(4, 5, kernel=3)
    x, lengths = torch.randn(2, 6, 4), torch.tensor([6, 4])
    y = front(x, lengths)
    assert y.shape == (2, 6, 5) and (y[1, 4:] == 0).all()
    # Step t reads steps t-2..t only: changing step 3 leaves the outputs before it as they were.
    changed = x.clone()
    changed[:, 3] += 10.0
    again = front(changed, lengths)
    torch.testing.assert_close(again[:, :3], y[:, :3], rtol=0, atol=0)
    assert not torch.allclose(again[0, 3:], y[0, 3:])
    # Padding never enters: garbage beyond a sequence's length changes nothing.
    padded = x.clone()
    padded[1, 4:] = 1e3
    torch.testing.assert_close(front(padded, lengths), y, rtol=0, atol=0)
    # The first step reads zeros before it: the same as the convolution of a zero-padded input.
    by_hand = torch.relu(
        torch.nn.functional.conv1d(
            torch.nn.functional.pad(x[:1].transpose(1, 2), (2, 0)),
            front.conv.weight,
            front.conv.bias,
        )
    ).transpose(1, 2)
    torch.testing.assert_close(y[:1], by_hand, rtol=OUT_TOL, atol=OUT_TOL)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_prediction_with_a_conv_front_does_not_depend_on_padding(bidirectional):
    torch.manual_seed(0)
    model = SequenceClassifier(3, input_size=4, hidden_size=6, bidirectional=bidirectional,
                               pooling="meanmax", conv_channels=8, conv_kernel=3).eval()  # fmt: skip
    x = torch.randn(2, 7, 4)
    x[1, 3:] = 5.0  # padding of the second sequence
    alone = model(x[1:, :3], torch.tensor([3]))
    batched = model(x, torch.tensor([7, 3]))
    torch.testing.assert_close(batched[1:], alone, rtol=OUT_TOL, atol=OUT_TOL)


def _branch_by_hand(branch: ConvBranch, seqs: list[torch.Tensor]) -> torch.Tensor:
    """The branch's summaries of unpadded sequences (T_i, I), from torch.nn's own modules: each
    sequence convolved on its own (zeros beyond both ends), BatchNorm1d over the steps of all of
    them laid end to end, ReLU; the mean of each sequence's steps."""
    ys = [s.T.unsqueeze(0) for s in seqs]  # (1, I, T_i)
    for conv, norm in zip(branch.convs, branch.norms, strict=True):
        outs = [conv(y) for y in ys]
        joined = torch.relu(norm(torch.cat(outs, dim=-1)))
        ys = list(joined.split([o.shape[-1] for o in outs], dim=-1))
    return torch.stack([y.mean(-1)[0] for y in ys])


@pytest.mark.parametrize("training", [False, True])
def test_conv_branch_matches_torch_nn_on_the_valid_steps(training):
    torch.manual_seed(0)
    branch = ConvBranch(4, 3)
    with torch.no_grad():  # running statistics away from their initial 0 and 1
        for norm in branch.norms:
            norm.running_mean.uniform_(-1, 1)
            norm.running_var.uniform_(0.5, 2)
    reference = copy.deepcopy(branch)
    branch.train(training)
    reference.train(training)
    x, lengths = torch.randn(3, 9, 4), torch.tensor([9, 5, 3])
    summary = branch(x, lengths)
    assert summary.shape == (3, 3)
    expected = _branch_by_hand(reference, [x[b, :n] for b, n in enumerate(lengths.tolist())])
    torch.testing.assert_close(summary, expected, rtol=1e-5, atol=1e-5)
    # Training updates the running statistics as torch.nn does over the 17 valid steps (with
    # their unbiased variance); evaluation leaves them.
    for mine, theirs in zip(branch.norms, reference.norms, strict=True):
        torch.testing.assert_close(mine.running_mean, theirs.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mine.running_var, theirs.running_var, rtol=1e-5, atol=1e-6)


def test_conv_branch_ignores_padding_in_training_and_evaluation():
    torch.manual_seed(0)
    branch = ConvBranch(4, 3)
    x, lengths = torch.randn(3, 7, 4), torch.tensor([7, 4, 2])
    garbage = x.clone()
    garbage[1, 4:], garbage[2, 2:] = 1e3, -1e3
    for training in (True, False):
        first, second = copy.deepcopy(branch).train(training), copy.deepcopy(branch).train(training)
        torch.testing.assert_close(second(garbage, lengths), first(x, lengths), rtol=0, atol=0)
        for a, b in zip(first.norms, second.norms, strict=True):  # statistics of valid steps only
            torch.testing.assert_close(a.running_mean, b.running_mean, rtol=0, atol=0)
    # In evaluation a sequence's summary does not depend on its batch.
    branch.eval()
    torch.testing.assert_close(
        branch(x, lengths)[1:2], branch(x[1:2, :4], lengths[1:2]), rtol=OUT_TOL, atol=OUT_TOL
    )
    # Training statistics are those of the valid steps: the same as one batch of the valid
    # steps laid end to end would give, were the convolutions not to read across sequences.
    branch.train()
    before = branch.norms[0].running_mean.clone()
    branch(x, torch.tensor([0, 0, 0]))  # nothing valid: statistics left as they were
    torch.testing.assert_close(branch.norms[0].running_mean, before, rtol=0, atol=0)


def test_a_classifier_with_a_conv_branch():
    torch.manual_seed(0)
    model = SequenceClassifier(3, input_size=4, hidden_size=5, pooling="meanmax", fcn_channels=6)
    assert model.head.in_features == 2 * 2 * 5 + 6
    x, lengths = torch.randn(2, 7, 4), torch.tensor([7, 3])
    logits = model.eval()(x, lengths)
    # The head reads the pooled outputs and the branch's summary side by side.
    out, _ = model.encoder(x, lengths=lengths)
    pooled = torch.cat([pool(out, lengths, "meanmax"), model.branch(x, lengths)], dim=-1)
    torch.testing.assert_close(logits, model.head(pooled), rtol=OUT_TOL, atol=OUT_TOL)
    torch.testing.assert_close(
        model(x[1:, :3], lengths[1:]), logits[1:], rtol=OUT_TOL, atol=OUT_TOL
    )
    # Every parameter of the branch learns.
    model.train()
    model(x, lengths).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.branch.parameters())
    # It reads each sequence whole: no streaming; a negative width is refused.
    with pytest.raises(ValueError, match="convolutional branch"):
        SequenceClassifier(3, input_size=4, bidirectional=False, fcn_channels=2).stream()
    with pytest.raises(ValueError, match="fcn_channels = -1"):
        SequenceClassifier(3, input_size=4, fcn_channels=-1)
    # The training step moved the running statistics; a pickled copy carries them.
    moved = model.eval()(x, lengths)
    assert not torch.allclose(moved, logits)
    restored = pickle.loads(pickle.dumps(model))
    torch.testing.assert_close(restored(x, lengths), moved, rtol=0, atol=0)


def test_conv_branch_gradcheck_float64():
    torch.manual_seed(0)
    model = SequenceClassifier(2, input_size=3, hidden_size=2, fcn_channels=2, pooling="mean")
    model = model.double().train()
    x = torch.randn(3, 5, 3, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([5, 2, 4])
    assert torch.autograd.gradcheck(lambda x: model(x, lengths), (x,))


def _ensemble(size: int, **kw) -> ClassifierEnsemble:
    torch.manual_seed(0)
    return ClassifierEnsemble(
        lambda: SequenceClassifier(3, input_size=4, hidden_size=5, dropout=0.0, **kw), size
    )


def test_ensemble_predicts_the_mean_probability_of_its_members():
    model = _ensemble(3, pooling="attention").eval()
    x, lengths = torch.randn(4, 6, 4), torch.tensor([6, 1, 3, 5])
    # Each member starts from its own initialisation.
    assert not torch.equal(model.members[0].head.weight, model.members[1].head.weight)
    members = model(x, lengths, members=True)
    assert members.shape == (3, 4, 3)
    for k, member in enumerate(model.members):
        torch.testing.assert_close(members[k], member(x, lengths), rtol=0, atol=0)
    mean = torch.softmax(members, dim=-1).mean(0)
    logits, weights = model(x, lengths, return_attention=True)
    torch.testing.assert_close(torch.softmax(logits, -1), mean, rtol=OUT_TOL, atol=OUT_TOL)
    torch.testing.assert_close(logits.logsumexp(-1), torch.zeros(4), rtol=0, atol=OUT_TOL)
    each = torch.stack([m(x, lengths, return_attention=True)[1] for m in model.members])
    torch.testing.assert_close(weights, each.mean(0), rtol=OUT_TOL, atol=OUT_TOL)
    # An ensemble of one is that model.
    one = _ensemble(1).eval()
    torch.testing.assert_close(one(x, lengths), one.members[0](x, lengths), rtol=0, atol=0)
    with pytest.raises(ValueError, match="size = 0"):
        ClassifierEnsemble(lambda: SequenceClassifier(2, input_size=1), 0)
    for size in (2.5, True, "3"):  # not a count of members
        with pytest.raises(ValueError, match=rf"size = {size!r}; expected at least 1 member"):
            ClassifierEnsemble(lambda: SequenceClassifier(2, input_size=1), size)


@pytest.mark.parametrize("pooling", ["attention", "max"])
def test_ensemble_members_come_with_their_attention_weights(pooling):
    model = _ensemble(2, pooling=pooling).eval()
    x, lengths = torch.randn(4, 6, 4), torch.tensor([6, 1, 3, 5])
    # Two members: a result without the weights would unpack silently into the two members.
    logits, weights = model(x, lengths, return_attention=True, members=True)
    assert logits.shape == (2, 4, 3)
    for k, member in enumerate(model.members):
        want_logits, want_weights = member(x, lengths, return_attention=True)
        torch.testing.assert_close(logits[k], want_logits, rtol=0, atol=0)
        if pooling == "max":
            assert weights is None
        else:
            torch.testing.assert_close(weights[k], want_weights, rtol=0, atol=0)


def test_a_float64_ensemble_averages_in_float64():
    model = _ensemble(3, bidirectional=False).double().eval()
    x, lengths = torch.randn(4, 6, 4, dtype=torch.float64), torch.tensor([6, 1, 3, 5])
    mean = torch.softmax(model(x, lengths, members=True), dim=-1).mean(0)  # float64
    logits = model(x, lengths)
    assert logits.dtype == torch.float64
    torch.testing.assert_close(torch.softmax(logits, -1), mean, rtol=1e-12, atol=1e-12)
    streamed = model.stream().push(x)  # every sequence read to its end: full lengths
    assert streamed.dtype == torch.float64
    full = torch.softmax(model(x, [6] * 4, members=True), dim=-1).mean(0)
    torch.testing.assert_close(torch.softmax(streamed, -1), full, rtol=1e-12, atol=1e-12)


def test_ensemble_members_learn_as_they_would_alone():
    """The recipes' loss (the mean of the members' losses) gives each member 1/size of the
    gradient its own loss gives it: no member's gradient depends on another's."""
    from rnnkit.tasks.common import ClassifierHooks

    model = _ensemble(2)
    hooks = ClassifierHooks()
    hooks.config = type("C", (), {"ensemble": 2})()
    x, lengths, y = torch.randn(3, 5, 4), torch.tensor([5, 2, 4]), torch.tensor([0, 2, 1])
    loss, n = hooks.loss(model, {"x": x, "lengths": lengths, "y": y})
    assert n == 3
    loss.backward()
    for member in model.members:
        alone = torch.nn.functional.cross_entropy(member(x, lengths), y)
        grads = torch.autograd.grad(alone, list(member.parameters()))
        for p, g in zip(member.parameters(), grads, strict=True):
            torch.testing.assert_close(p.grad, g / 2, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("lengths", "message"),
    [
        ([7, 2], r"^lengths\[0\] = 7 > T = 5"),
        ([-1, 2], r"^lengths\[0\] = -1 < 0"),
        ([5, 2, 1], r"^lengths has 3 entries; expected one per sequence, B = 2"),
    ],
)
@pytest.mark.parametrize("given", ["list", "tensor"])
def test_pooling_and_front_ends_check_lengths_given_as_a_tensor_as_a_list(lengths, message, given):
    """A lengths tensor is checked as a list is, before pooling or a front end reads it (it was
    taken as given: a mean over 7 of 5 steps, a max over none)."""
    out = torch.randn(2, 5, 3)
    value = lengths if given == "list" else torch.tensor(lengths)
    for how in ("mean", "max"):
        with pytest.raises(ValueError, match=message):
            pool(out, value, how)
    with pytest.raises(ValueError, match=message):
        SelfAttentionPool(3, 4)(out, value)
    model = SequenceClassifier(2, input_size=3, hidden_size=4, conv_channels=3)
    with pytest.raises(ValueError, match=message):
        model(out, value)
    with pytest.raises(TypeError, match="lengths has dtype torch.float32"):
        pool(out, torch.tensor([2.5, 2.0]), "mean")
