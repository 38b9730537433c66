import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from rmt.config import GRPOConfig
from rmt.losses import (
    AGGREGATIONS,
    Normalizers,
    aggregate,
    clipped_policy_loss,
    group_advantages,
    kl_k3,
    ntp_loss_from_logits,
    ntp_loss_from_logprobs,
    target_logprobs,
    unified_loss,
)

# --- advantages -----------------------------------------------------------------------------------------------


def test_group_advantages_hand_values():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.2, 0.2, 0.2, 0.2], [0.0, 0.0, 0.0, 1.0]])
    adv = group_advantages(rewards, eps=0.0)
    assert adv[0].tolist() == pytest.approx([1, -1, -1, 1])  # mean 0.5, population std 0.5
    assert adv[1].tolist() == [0.0, 0.0, 0.0, 0.0]  # all equal: exactly zero
    std = math.sqrt(3 / 16)
    assert adv[2].tolist() == pytest.approx([-0.25 / std] * 3 + [0.75 / std])
    unbiased = group_advantages(rewards[:1], eps=0.0, unbiased=True)
    assert unbiased[0].tolist() == pytest.approx([x * math.sqrt(3 / 4) for x in (1, -1, -1, 1)])
    assert group_advantages(torch.tensor([[1.0, 0.0]]), eps=1e-6)[0].tolist() == pytest.approx([1, -1], rel=1e-5)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.floats(-10, 10), min_size=8, max_size=8), min_size=1, max_size=4))
def test_group_advantages_sum_to_zero_and_are_finite(groups):
    adv = group_advantages(torch.tensor(groups, dtype=torch.float64), eps=1e-6)
    assert torch.isfinite(adv).all()
    assert adv.sum(dim=1).abs().max().item() < 1e-4
    for row, a in zip(groups, adv):
        if len(set(row)) == 1:
            assert (a == 0).all()


# --- policy loss and KL ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "adv, ratio, eps_high, expected, clipped",
    [
        (1.0, 1.5, None, -1.2, True),  # positive advantage: ratio capped at 1 + eps
        (1.0, 1.5, 0.28, -1.28, True),  # clip-higher
        (-1.0, 1.5, None, 1.5, False),  # negative advantage: no cap upward
        (1.0, 0.5, None, -0.5, False),
        (-1.0, 0.5, None, 0.8, True),  # negative advantage: ratio floored at 1 - eps
        (2.0, 1.0, None, -2.0, False),
    ],
)
def test_clipped_policy_loss_hand_values(adv, ratio, eps_high, expected, clipped):
    logp = torch.tensor([[math.log(ratio)]])
    loss, was_clipped = clipped_policy_loss(logp, torch.zeros(1, 1), torch.tensor([adv]), 0.2, eps_high)
    assert loss.item() == pytest.approx(expected)
    assert bool(was_clipped.item()) == clipped


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(-5, 0), min_size=1, max_size=6), st.floats(-3, 3), st.floats(0.01, 0.5))
def test_clipped_equals_unclipped_at_ratio_one(logps, adv, eps):
    logp = torch.tensor([logps], dtype=torch.float64, requires_grad=True)
    loss, clipped = clipped_policy_loss(logp, logp.detach(), torch.tensor([adv], dtype=torch.float64), eps)
    assert torch.allclose(loss, torch.full_like(loss, -adv))
    assert not clipped.any()
    loss.sum().backward()
    assert torch.allclose(logp.grad, torch.full_like(logp, -adv))  # d(-A * ratio)/d logp = -A at ratio 1


def test_kl_k3():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    assert kl_k3(logp, logp).tolist() == [0.0, 0.0, 0.0]
    d = math.log(2)
    assert kl_k3(torch.tensor([0.0]), torch.tensor([d])).item() == pytest.approx(2 - d - 1)
    assert (kl_k3(torch.randn(100), torch.randn(100)) >= 0).all()


# --- aggregation ----------------------------------------------------------------------------------------------

LOSS = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 0.0, 0.0, 0.0]])
MASK = torch.tensor([[True, True, True, False], [True, False, False, False]])


def test_aggregation_hand_values():
    assert aggregate(LOSS, MASK, "token-mean").item() == pytest.approx(10 / 4)
    assert aggregate(LOSS, MASK, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    assert aggregate(LOSS, MASK, "seq-mean-token-sum-norm").item() == pytest.approx((6 / 4 + 4 / 4) / 2)
    assert aggregate(LOSS, MASK, "seq-mean-token-sum-norm", horizon=2).item() == pytest.approx((3 + 2) / 2)
    # global counts replace the local ones
    assert aggregate(LOSS, MASK, "token-mean", num_tokens=8).item() == pytest.approx(10 / 8)
    assert aggregate(LOSS, MASK, "seq-mean-token-mean", num_sequences=4).item() == pytest.approx(6 / 4)
    assert set(AGGREGATIONS) == {"token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"}


@pytest.mark.parametrize("mode", sorted(AGGREGATIONS))
def test_aggregation_ignores_masked_garbage_and_empty(mode):
    garbage = LOSS.clone()
    garbage[0, 3] = float("nan")
    garbage[1, 2] = float("inf")
    assert aggregate(garbage, MASK, mode).item() == aggregate(LOSS, MASK, mode).item()
    empty = aggregate(LOSS, torch.zeros_like(MASK), mode)
    assert empty.item() == 0.0


# --- NTP ------------------------------------------------------------------------------------------------------


def test_ntp_loss_forms_agree_with_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    ids = torch.randint(0, 11, (2, 6))
    mask = torch.rand(2, 6) > 0.3
    mask[:, 0] = True  # column 0 has no prefix: ignored even when set
    lp = target_logprobs(logits, ids)
    assert lp[:, 0].tolist() == [0.0, 0.0]
    terms = [F.cross_entropy(logits[b, pos - 1], ids[b, pos]) for b in range(2) for pos in range(1, 6) if mask[b, pos]]
    reference = torch.stack(terms).mean()
    m = mask.clone()
    m[:, 0] = False
    assert ntp_loss_from_logprobs(lp, m).item() == pytest.approx(reference.item(), rel=1e-6)
    assert ntp_loss_from_logits(logits, ids, mask).item() == pytest.approx(reference.item(), rel=1e-6)
    assert ntp_loss_from_logits(logits, ids, mask, num_tokens=100).item() == pytest.approx(
        reference.item() * len(terms) / 100, rel=1e-6
    )


# --- the unified objective against a hand-written reference ----------------------------------------------------


def _reference_loss(logp, old, ref, adv, mask, ntp_lp, ntp_mask, mode, eps, eps_high, beta, lam):
    """Token by token with Python loops: the formulas of SPEC section 2, step 4."""
    R, T = logp.shape
    seq_terms, all_terms = [], []
    for i in range(R):
        row = []
        for t in range(T):
            if not mask[i, t]:
                continue
            ratio = torch.exp(logp[i, t] - old[i, t])
            pg = -torch.minimum(ratio * adv[i], torch.clamp(ratio, 1 - eps, 1 + eps_high) * adv[i])
            d = ref[i, t] - logp[i, t]
            row.append(pg + beta * (torch.exp(d) - d - 1))
        all_terms += row
        if row:
            seq_terms.append((torch.stack(row).sum(), len(row)))
    if mode == "token-mean":
        rl = torch.stack(all_terms).sum() / len(all_terms)
    elif mode == "seq-mean-token-mean":
        rl = sum(s / n for s, n in seq_terms) / len(seq_terms)
    else:
        rl = sum(s / T for s, _ in seq_terms) / len(seq_terms)
    ntp_terms = [-ntp_lp[b, p] for b in range(ntp_lp.shape[0]) for p in range(ntp_lp.shape[1]) if ntp_mask[b, p]]
    return rl + lam * torch.stack(ntp_terms).sum() / len(ntp_terms)


def _random_batch(seed):
    g = torch.Generator().manual_seed(seed)
    R, T, B, L = 5, 7, 3, 9
    logp = (-torch.rand(R, T, generator=g, dtype=torch.float64) * 3).requires_grad_()
    old = logp.detach() + 0.4 * torch.randn(R, T, generator=g, dtype=torch.float64)  # ratios inside and outside the clip
    ref = logp.detach() + 0.3 * torch.randn(R, T, generator=g, dtype=torch.float64)
    adv = torch.randn(R, generator=g, dtype=torch.float64)
    mask = torch.rand(R, T, generator=g) > 0.3
    mask[:, 0] = True
    ntp_lp = (-torch.rand(B, L, generator=g, dtype=torch.float64) * 4).requires_grad_()
    ntp_mask = torch.rand(B, L, generator=g) > 0.2
    ntp_mask[:, 0] = False
    return logp, old, ref, adv, mask, ntp_lp, ntp_mask


@pytest.mark.parametrize("mode", sorted(AGGREGATIONS))
@pytest.mark.parametrize("eps_high", [None, 0.28])
def test_unified_loss_and_gradients_match_reference(mode, eps_high):
    logp, old, ref, adv, mask, ntp_lp, ntp_mask = _random_batch(1)
    grpo = GRPOConfig(loss_agg=mode, clip_eps=0.2, clip_eps_high=eps_high, kl_beta=0.05)
    terms = unified_loss(
        grpo=grpo, ntp_weight=0.1, logprobs=logp, advantages=adv, response_mask=mask, old_logprobs=old,
        ref_logprobs=ref, ntp_logprobs=ntp_lp, ntp_mask=ntp_mask,
    )
    got = torch.autograd.grad(terms.loss, [logp, ntp_lp])
    expected_loss = _reference_loss(logp, old, ref, adv, mask, ntp_lp, ntp_mask, mode, 0.2, eps_high or 0.2, 0.05, 0.1)
    expected = torch.autograd.grad(expected_loss, [logp, ntp_lp])
    assert terms.loss.item() == pytest.approx(expected_loss.item(), rel=1e-10)
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, atol=1e-12)
    assert 0 < terms.clip_fraction < 1
    assert terms.rl == pytest.approx(terms.policy + 0.05 * terms.kl)
    assert terms.loss.item() == pytest.approx(terms.rl + 0.1 * terms.ntp)
    assert terms.rl_tokens == int(mask.sum()) and terms.ntp_tokens == int(ntp_mask.sum())
    assert set(terms.metrics()) >= {"loss", "rl", "policy", "kl", "ntp", "clip_fraction"}


def test_each_term_has_its_own_normaliser():
    logp, old, _, adv, mask, ntp_lp, ntp_mask = _random_batch(2)
    grpo = GRPOConfig()
    ntp_alone = unified_loss(grpo=grpo, ntp_weight=1.0, ntp_logprobs=ntp_lp, ntp_mask=ntp_mask)
    rl_alone = unified_loss(grpo=grpo, ntp_weight=1.0, logprobs=logp, advantages=adv, response_mask=mask, old_logprobs=old)
    both = unified_loss(
        grpo=grpo, ntp_weight=1.0, logprobs=logp, advantages=adv, response_mask=mask, old_logprobs=old,
        ntp_logprobs=ntp_lp, ntp_mask=ntp_mask,
    )
    assert both.loss.item() == pytest.approx(rl_alone.loss.item() + ntp_alone.loss.item())
    # twice the responses (the same ones again): the RL term keeps its scale, the NTP term is untouched
    doubled = unified_loss(
        grpo=grpo, ntp_weight=1.0, logprobs=torch.cat([logp, logp]), advantages=torch.cat([adv, adv]),
        response_mask=torch.cat([mask, mask]), old_logprobs=torch.cat([old, old]), ntp_logprobs=ntp_lp, ntp_mask=ntp_mask,
    )
    assert doubled.rl == pytest.approx(both.rl) and doubled.ntp == pytest.approx(both.ntp)


@pytest.mark.parametrize("mode", sorted(AGGREGATIONS))
def test_global_counts_make_shards_add_up(mode):
    """Two processes with half the batch each and the global counts: their losses sum to the whole batch's loss."""
    logp, old, ref, adv, mask, ntp_lp, ntp_mask = _random_batch(3)
    grpo = GRPOConfig(loss_agg=mode, kl_beta=0.1)
    T = logp.shape[1]
    norm = Normalizers(
        rl_tokens=float(mask.sum()), rl_sequences=float(mask.any(-1).sum()), ntp_tokens=float(ntp_mask.sum()), rl_horizon=T
    )

    def run(rs, bs, norm=Normalizers(), world_size=1):
        return unified_loss(
            grpo=grpo, ntp_weight=0.1, logprobs=logp[rs], advantages=adv[rs], response_mask=mask[rs], old_logprobs=old[rs],
            ref_logprobs=ref[rs], ntp_logprobs=ntp_lp[bs], ntp_mask=ntp_mask[bs], norm=norm, world_size=world_size,
        ).loss

    whole = run(slice(None), slice(None))
    shards = run(slice(0, 2), slice(0, 1), norm) + run(slice(2, None), slice(1, None), norm)
    assert shards.item() == pytest.approx(whole.item(), rel=1e-10)
    # under DDP (gradients averaged over processes) the world-size factor restores the sum
    scaled = run(slice(0, 2), slice(0, 1), norm, world_size=2) + run(slice(2, None), slice(1, None), norm, world_size=2)
    assert (scaled / 2).item() == pytest.approx(whole.item(), rel=1e-10)


def test_unified_loss_edge_cases():
    logp, old, _, adv, mask, ntp_lp, ntp_mask = _random_batch(4)
    with pytest.raises(ValueError):
        unified_loss(grpo=GRPOConfig(kl_beta=0.1), ntp_weight=0.1, logprobs=logp, advantages=adv, response_mask=mask)
    with pytest.raises(ValueError):
        unified_loss(grpo=GRPOConfig(), ntp_weight=0.1, logprobs=logp)
    # no RL token at all: a zero RL term that still back-propagates, never NaN
    terms = unified_loss(
        grpo=GRPOConfig(), ntp_weight=0.1, logprobs=logp, advantages=adv, response_mask=torch.zeros_like(mask),
        ntp_logprobs=ntp_lp, ntp_mask=ntp_mask,
    )
    assert terms.rl == 0.0 and math.isfinite(terms.loss.item())
    terms.loss.backward()
    assert torch.isfinite(logp.grad).all()
    # on-policy (no old log-probs): the gradient of the policy term is -A * d logp / N
    logp.grad = None
    on_policy = unified_loss(grpo=GRPOConfig(), ntp_weight=0.0, logprobs=logp, advantages=adv, response_mask=mask)
    on_policy.loss.backward()
    expected = torch.where(mask, -adv[:, None].expand_as(logp) / mask.sum(), torch.zeros_like(logp))
    assert torch.allclose(logp.grad, expected)


# --- engine/trainer mismatch: truncated importance sampling and the log-prob gap ----------------------------------


def test_truncated_importance_weights_hand_computed():
    from rmt.losses import truncated_importance_weights

    old = torch.tensor([[-1.0, -2.0, -0.5]])
    rollout = torch.tensor([[-1.0, -2.5, -0.1]])
    # ratios: exp(0) = 1, exp(0.5) = 1.6487, exp(-0.4) = 0.6703; a cap of 1.5 cuts the second
    w = truncated_importance_weights(old, rollout, cap=1.5)
    torch.testing.assert_close(w, torch.tensor([[1.0, 1.5, math.exp(-0.4)]]))
    w2 = truncated_importance_weights(old, rollout, cap=2.0)
    torch.testing.assert_close(w2, torch.tensor([[1.0, math.exp(0.5), math.exp(-0.4)]]))
    with pytest.raises(ValueError, match=">= 1"):
        truncated_importance_weights(old, rollout, cap=0.5)
    # no gradient flows through the weight, and a huge log-ratio at a masked position stays finite
    lp = torch.zeros(1, 2, requires_grad=True)
    assert not truncated_importance_weights(lp, torch.tensor([[-1e9, 0.0]]), 2.0).requires_grad
    assert torch.isfinite(truncated_importance_weights(torch.tensor([[1e9]]), torch.tensor([[0.0]]), 2.0)).all()


@given(st.lists(st.floats(-5, 0), min_size=1, max_size=8), st.lists(st.floats(-5, 0), min_size=1, max_size=8), st.floats(1, 10))
@settings(max_examples=50, deadline=None)
def test_truncated_importance_weights_lie_in_zero_cap(a, b, cap):
    from rmt.losses import truncated_importance_weights

    n = min(len(a), len(b))
    w = truncated_importance_weights(torch.tensor(a[:n]), torch.tensor(b[:n]), cap)
    assert ((w > 0) & (w <= cap + 1e-6)).all()


def test_logprob_gap_hand_computed():
    from rmt.losses import logprob_gap

    trainer_lp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5]])
    rollout_lp = torch.tensor([[-1.1, -1.5, 9.0], [-0.5, -0.2, -0.5]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    total, worst, n = logprob_gap(trainer_lp, rollout_lp, mask)  # |d| = 0.1, 0.5, (masked 9), 0, 0.3, 0
    assert n == 5 and total == pytest.approx(0.9) and worst == pytest.approx(0.5)
    assert logprob_gap(trainer_lp, rollout_lp, torch.zeros_like(mask)) == (0.0, 0.0, 0)


def test_unified_loss_with_tis_weights_the_policy_term_hand_computed():
    """One token, advantage 1, on-policy (ratio 1): the policy loss is -w * 1 with w = min(exp(old - rollout), cap)."""
    lp = torch.tensor([[-1.0]], requires_grad=True)
    common = dict(ntp_weight=0.0, logprobs=lp, advantages=torch.tensor([1.0]), response_mask=torch.tensor([[True]]))
    plain = unified_loss(grpo=GRPOConfig(), rollout_logprobs=torch.tensor([[-1.7]]), **common)
    assert plain.policy == pytest.approx(-1.0)  # tis_cap off: the rollout log-probs change nothing
    tis = unified_loss(grpo=GRPOConfig(tis_cap=3.0), rollout_logprobs=torch.tensor([[-1.7]]), **common)
    assert tis.policy == pytest.approx(-math.exp(0.7))  # exp(-1.0 + 1.7) = 2.01 < 3
    capped = unified_loss(grpo=GRPOConfig(tis_cap=1.5), rollout_logprobs=torch.tensor([[-1.7]]), **common)
    assert capped.policy == pytest.approx(-1.5)
    capped.loss.backward()
    assert lp.grad.item() == pytest.approx(-1.5)  # d/dlp of -w * exp(lp - old) at lp = old
