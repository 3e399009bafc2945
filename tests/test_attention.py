"""Attention: masking is exact, the weights are a distribution, each score matches its equation."""

from __future__ import annotations

import math

import pytest
import torch

from rnnkit.models import (
    ATTENTIONS,
    BahdanauAttention,
    LuongConcatAttention,
    LuongDotAttention,
    LuongGeneralAttention,
    build_attention,
    length_mask,
    masked_softmax,
)

#: fp64 comparisons of the same math computed two ways.
TOL = {"rtol": 1e-12, "atol": 1e-12}

B, S, Q, M, A = 4, 6, 8, 8, 5
LENGTHS = torch.tensor([6, 3, 1, 0])


def make(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_attention(name, Q, M, A).double()


def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    query = torch.randn(B, Q, generator=g, dtype=torch.float64)
    memory = torch.randn(B, S, M, generator=g, dtype=torch.float64)
    return query, memory, length_mask(LENGTHS, S)


def test_length_mask() -> None:
    expected = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(length_mask(torch.tensor([3, 1, 0]), 4), expected)


@pytest.mark.parametrize("name", sorted(ATTENTIONS))
def test_masked_positions_get_exactly_zero_weight(name: str) -> None:
    attn = make(name)
    query, memory, mask = inputs()
    memory = memory.masked_fill(~mask.unsqueeze(-1), 1e6)  # padding that would dominate if seen
    context, weights = attn(query, memory, mask)
    assert weights.shape == (B, S) and context.shape == (B, M)
    assert torch.all(weights[~mask] == 0.0)
    valid = LENGTHS > 0
    torch.testing.assert_close(
        weights[valid].sum(-1), torch.ones(int(valid.sum()), dtype=weights.dtype)
    )
    # A length-0 source: no weight anywhere and a zero context, not NaN.
    assert torch.all(weights[3] == 0.0) and torch.all(context[3] == 0.0)
    assert torch.isfinite(context).all()


@pytest.mark.parametrize("name", sorted(ATTENTIONS))
def test_padding_does_not_change_the_result(name: str) -> None:
    """Each row equals attention over its own unpadded memory."""
    attn = make(name)
    query, memory, mask = inputs()
    context, weights = attn(query, memory, mask)
    for b, n in enumerate(LENGTHS.tolist()):
        if n == 0:
            continue
        c1, w1 = attn(query[b : b + 1], memory[b : b + 1, :n])
        torch.testing.assert_close(context[b : b + 1], c1, **TOL)
        torch.testing.assert_close(weights[b : b + 1, :n], w1, **TOL)


@pytest.mark.parametrize("name", sorted(ATTENTIONS))
def test_gradients_are_finite_and_padding_gets_none(name: str) -> None:
    attn = make(name)
    query, memory, mask = inputs()
    memory.requires_grad_(True)
    context, weights = attn(query, memory, mask)
    (context.square().sum() + weights.square().sum()).backward()
    assert torch.isfinite(memory.grad).all()
    assert torch.all(memory.grad[~mask] == 0.0)


@pytest.mark.parametrize("garbage", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("name", sorted(ATTENTIONS))
def test_nan_or_inf_in_padding_changes_nothing(name: str, garbage: float) -> None:
    """Padding holding NaN or inf changes no output and no gradient (0 * inf would be NaN)."""
    attn = make(name)
    query, memory, mask = inputs()

    def run(memory: torch.Tensor) -> tuple[torch.Tensor, ...]:
        attn.zero_grad()
        q, m = query.clone().requires_grad_(True), memory.clone().requires_grad_(True)
        context, weights = attn(q, m, mask)
        (context.square().sum() + weights.square().sum()).backward()
        params = [p.grad.clone() for p in attn.parameters()]
        return context, weights, q.grad, m.grad, *params

    expected = run(memory)
    noisy = memory.masked_fill(~mask.unsqueeze(-1), garbage)
    torch.testing.assert_close(run(noisy), expected, **TOL)
    # Keys precomputed from the noisy memory give the same outputs too.
    context, weights = attn(query, noisy, mask, keys=attn.keys(noisy))
    torch.testing.assert_close((context, weights), expected[:2], **TOL)


@pytest.mark.parametrize("name", sorted(ATTENTIONS))
def test_precomputed_keys_give_the_same_result(name: str) -> None:
    attn = make(name)
    query, memory, mask = inputs()
    expected = attn(query, memory, mask)
    got = attn(query, memory, mask, keys=attn.keys(memory))
    torch.testing.assert_close(got, expected, **TOL)


def test_scores_match_their_equations() -> None:
    query, memory, _ = inputs()

    query = query.unsqueeze(1)  # (B, T = 1, Q): score reads every step's query at once
    dot = make("dot")
    torch.testing.assert_close(
        dot.score(query, dot.keys(memory)), torch.einsum("btq,bsq->bts", query, memory), **TOL
    )

    general = make("general")
    w_a = general.key_proj.weight  # (Q, M)
    expected = torch.einsum("btq,qm,bsm->bts", query, w_a, memory)
    torch.testing.assert_close(general.score(query, general.keys(memory)), expected, **TOL)

    for cls in (BahdanauAttention, LuongConcatAttention):
        torch.manual_seed(0)
        add = cls(Q, M, A).double()
        # v^T tanh(W_a [q; h_s] + b), with W_a = [W_q, W_k]
        w_a = torch.cat([add.query_proj.weight, add.key_proj.weight], 1)  # (A, Q + M)
        pairs = torch.cat([query.expand(-1, S, -1), memory], -1)  # (B, S, Q + M)
        expected = torch.tanh(pairs @ w_a.T + add.key_proj.bias) @ add.v.weight.squeeze(0)
        torch.testing.assert_close(add.score(query, add.keys(memory)), expected.unsqueeze(1), **TOL)


@pytest.mark.parametrize("name", sorted(ATTENTIONS))
def test_all_steps_at_once_equal_each_step_alone(name: str) -> None:
    """Queries (B, T, Q) give, step by step, what one (B, Q) query per step gives."""
    _, memory, mask = inputs()
    attention = make(name)
    queries = torch.randn(memory.shape[0], 4, Q, dtype=torch.float64)
    context, weights = attention(queries, memory, mask)
    assert context.shape == (memory.shape[0], 4, M) and weights.shape == (memory.shape[0], 4, S)
    for t in range(4):
        c_t, a_t = attention(queries[:, t], memory, mask, attention.keys(memory))
        torch.testing.assert_close(context[:, t], c_t, **TOL)
        torch.testing.assert_close(weights[:, t], a_t, **TOL)
    assert torch.all(weights.masked_select(~mask.unsqueeze(1)) == 0.0)


def test_hand_computed_dot_attention() -> None:
    query = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    memory = torch.tensor([[[2.0, 5.0], [0.0, 1.0], [9.0, 9.0]]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False]])
    context, weights = LuongDotAttention(2, 2)(query, memory, mask)
    # scores 2 and 0 -> softmax (e^2, 1) / (e^2 + 1); the third position is padding.
    e2 = torch.tensor(2.0, dtype=torch.float64).exp()
    w = torch.stack([e2 / (e2 + 1), 1 / (e2 + 1), torch.zeros((), dtype=torch.float64)])
    torch.testing.assert_close(weights[0], w, **TOL)
    torch.testing.assert_close(context[0], w[0] * memory[0, 0] + w[1] * memory[0, 1], **TOL)


def test_query_sources() -> None:
    assert BahdanauAttention.query_source == "previous"
    for cls in (LuongDotAttention, LuongGeneralAttention, LuongConcatAttention):
        assert cls.query_source == "current"


def test_masked_softmax_without_mask_is_softmax() -> None:
    x = torch.randn(3, 5, dtype=torch.float64)
    torch.testing.assert_close(masked_softmax(x, None), torch.softmax(x, -1), **TOL)


def test_errors_name_the_bad_value() -> None:
    with pytest.raises(ValueError, match="attention = 'luong'"):
        build_attention("luong", 4, 4, 4)
    with pytest.raises(ValueError, match="query_size == memory_size; got 4 and 6"):
        LuongDotAttention(4, 6)
    attn = make("general")
    query, memory, mask = inputs()
    with pytest.raises(ValueError, match=r"mask has shape \(4, 5\)"):
        attn(query, memory, mask[:, :5])
    with pytest.raises(ValueError, match=r"query has shape \(3, 8\)"):
        attn(query[:3], memory, mask)
    for name in ATTENTIONS:  # a feature size that does not fit is named before any product
        attn = make(name)
        with pytest.raises(ValueError, match=r"query has shape \(4, 7\); .* Q = query_size = 8"):
            attn(query[:, :7], memory, mask)
        with pytest.raises(ValueError, match=r"memory has shape \(4, 6, 7\); .* memory_size = 8"):
            attn(query, memory[..., :7], mask)
        with pytest.raises(TypeError, match=r"mask has dtype torch.int64; expected torch.bool"):
            attn(query, memory, mask.long())


def test_keys_and_sizes_that_do_not_fit_are_named() -> None:
    attn = make("bahdanau")
    query, memory, mask = inputs()
    keys = attn.keys(memory)
    with pytest.raises(ValueError, match=r"^keys has shape \(4, 5, \d+\); expected \(B, S, K\)"):
        attn(query, memory, mask, keys=keys[:, :5])
    for name in ATTENTIONS:
        with pytest.raises(ValueError, match=r"^attention_size = 0; expected a positive integer"):
            build_attention(name, 8, 8, 0)
