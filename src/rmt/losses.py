"""The unified objective L = L_RL + lambda * L_NTP as pure tensor functions (SPEC section 2, step 4).

Shapes: R responses of at most T tokens -> ``logprobs``, ``old_logprobs``, ``ref_logprobs``, ``response_mask`` are
(R, T); ``advantages`` is (R,). NTP works on B corpus sequences of L tokens: position ``pos`` means predicting
``input_ids[:, pos]`` from ``input_ids[:, :pos]`` (the convention of rmt.scoring and rmt.sampling), so NTP tensors
and masks are indexed by target position and position 0 (no prefix) never counts.

Normalisation follows PRIME-RL: each term has its own mask and its own normaliser (token count, or sequence count
for the seq-mean aggregations), then the terms are added with explicit coefficients. Neither term's scale depends
on how many tokens the other had. A multi-process trainer passes the *global* counts (``Normalizers``) so that
every process divides by the same number; see ``unified_loss`` for the world-size factor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rmt.config import GRPOConfig

Tensor = torch.Tensor

# exp() of a log-ratio beyond this overflows float32 on garbage positions (padding); real ratios never get near it.
_MAX_LOG_RATIO = 20.0


# --- advantages -----------------------------------------------------------------------------------------------


def group_advantages(rewards: Tensor, eps: float = 1e-6, unbiased: bool = False) -> Tensor:
    """GRPO advantages over a (groups x G) reward tensor: A_i = (r_i - mean(r_group)) / (std(r_group) + eps).

    std is the population standard deviation (divide by G) by default, so a group's advantages have unit variance;
    ``unbiased=True`` divides by G - 1 instead (TRL's and verl's choice; advantages larger by sqrt(G / (G - 1))).
    A group whose rewards are all equal gets exactly zero advantages (set explicitly, not left to rounding).
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (groups x G), got shape {tuple(rewards.shape)}")
    rewards = rewards.float()
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True, unbiased=unbiased) if rewards.shape[1] > 1 else torch.zeros_like(mean)
    advantages = (rewards - mean) / (std + eps)
    all_equal = (rewards == rewards[:, :1]).all(dim=1, keepdim=True)
    return torch.where(all_equal, torch.zeros_like(advantages), advantages)


# --- per-token losses -----------------------------------------------------------------------------------------


def clipped_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, clip_eps: float = 0.2, clip_eps_high: float | None = None
) -> tuple[Tensor, Tensor]:
    """PPO/GRPO clipped surrogate per token, as a loss to minimise:

        ratio = exp(logp - logp_old);  loss = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps_high) * A)

    eps_high (DAPO's clip-higher) defaults to eps. ``advantages`` is (R,) or (R, T). Returns the per-token loss and
    a bool tensor that is True where the clipped branch was taken (for the clip fraction). With logp_old =
    logp.detach() (one update per rollout) the ratio is 1 and the gradient is -A * grad(logp).
    """
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    if advantages.dim() == logprobs.dim() - 1:
        advantages = advantages.unsqueeze(-1)
    log_ratio = (logprobs - old_logprobs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_eps, 1 + eps_high)
    return torch.maximum(unclipped, clipped), clipped > unclipped


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Schulman's k3 estimator of KL(policy || reference) per token: exp(d) - d - 1 with d = logp_ref - logp.

    Non-negative, zero where the two agree, unbiased for tokens sampled from the policy. d is clamped to +-20.
    """
    d = (ref_logprobs - logprobs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    return torch.exp(d) - d - 1


def truncated_importance_weights(old_logprobs: Tensor, rollout_logprobs: Tensor, cap: float) -> Tensor:
    """Truncated importance sampling (TIS) per token: w = min(exp(logp_old - logp_rollout), cap), no gradient.

    The responses were sampled by the rollout engine (log-probs ``rollout_logprobs``) while the policy gradient is
    taken under the trainer's own old log-probs; when the two disagree (vLLM vs. the training forward, bf16 kernels)
    the samples are slightly off-policy. Weighting each token's policy-gradient term by the capped ratio corrects
    that without letting a rare huge ratio dominate (Yao et al. 2025, "Your efficient RL framework secretly brings
    you off-policy RL training"). The log-ratio is clamped to +-20 (garbage at masked positions cannot overflow).
    """
    if cap < 1.0:
        raise ValueError(f"the TIS cap must be >= 1, got {cap}")
    log_ratio = (old_logprobs - rollout_logprobs).detach().clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    return torch.exp(log_ratio).clamp(max=cap)


def logprob_gap(trainer_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor) -> tuple[float, float, int]:
    """(sum of |delta|, max |delta|, token count) over the masked tokens, delta = trainer - rollout log-prob.

    The stale-weight alarm: with current weights in the engine the gap is rounding (about 1e-6 in float32); an engine
    that sampled from old weights shows gaps of the size of a learning step.
    """
    delta = torch.where(mask.bool(), (trainer_logprobs.detach().float() - rollout_logprobs.float()).abs(), 0.0)
    n = int(mask.sum().item())
    return float(delta.sum().item()), float(delta.max().item()) if n else 0.0, n


# --- aggregation: per-token losses (R, T) + mask -> scalar -----------------------------------------------------


def _masked_sum(values: Tensor, mask: Tensor, dim=None) -> Tensor:
    """Sum over the mask; where() rather than multiply, so NaN or inf at masked-out positions cannot leak."""
    kept = torch.where(mask.bool(), values, torch.zeros((), dtype=values.dtype, device=values.device))
    return kept.sum() if dim is None else kept.sum(dim=dim)


def token_mean(loss: Tensor, mask: Tensor, *, num_tokens: float | None = None, num_sequences: float | None = None,
               horizon: int | None = None) -> Tensor:
    """sum over every kept token / N_tokens: each token weighs the same (default, SPEC section 2)."""
    n = mask.sum().item() if num_tokens is None else num_tokens
    return _masked_sum(loss, mask) / max(n, 1)


def seq_mean_token_mean(loss: Tensor, mask: Tensor, *, num_tokens: float | None = None,
                        num_sequences: float | None = None, horizon: int | None = None) -> Tensor:
    """(1 / N_seq) * sum_i [sum_t loss_it / T_i]: each response weighs the same (original GRPO)."""
    tokens_per_seq = mask.sum(dim=-1)
    per_seq = _masked_sum(loss, mask, dim=-1) / tokens_per_seq.clamp(min=1)
    n = (tokens_per_seq > 0).sum().item() if num_sequences is None else num_sequences
    return per_seq.sum() / max(n, 1)


def seq_mean_token_sum_norm(loss: Tensor, mask: Tensor, *, num_tokens: float | None = None,
                            num_sequences: float | None = None, horizon: int | None = None) -> Tensor:
    """(1 / N_seq) * sum_i [sum_t loss_it / H] with a constant H (default: the padded length T): Dr. GRPO's
    length-unbiased form, where a long response is not down-weighted per token."""
    h = loss.shape[-1] if horizon is None else horizon
    n = (mask.sum(dim=-1) > 0).sum().item() if num_sequences is None else num_sequences
    return _masked_sum(loss, mask) / max(h, 1) / max(n, 1)


AGGREGATIONS: dict[str, Callable[..., Tensor]] = {
    "token-mean": token_mean,
    "seq-mean-token-mean": seq_mean_token_mean,
    "seq-mean-token-sum-norm": seq_mean_token_sum_norm,
}


def aggregate(loss: Tensor, mask: Tensor, mode: str = "token-mean", **counts) -> Tensor:
    """Per-token losses -> scalar by the named mode (grpo.loss_agg). ``counts``: num_tokens, num_sequences, horizon
    (global values from a multi-process trainer; None = counted from ``mask``)."""
    return AGGREGATIONS[mode](loss, mask, **counts)


# --- next-token prediction ------------------------------------------------------------------------------------


def target_logprobs(logits: Tensor, input_ids: Tensor) -> Tensor:
    """(B, L) log p(input_ids[:, pos] | input_ids[:, :pos]) from the (B, L, V) logits of a forward over input_ids.

    Column 0 has no prefix and holds 0. Computed in float32.
    """
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logprobs.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return F.pad(picked, (1, 0))


# At most this many logits (positions x vocabulary) exist at a time in ``chunked_token_logprobs``: 32 MiB of
# float32, about 55 positions of a 151,936-token vocabulary.
CHUNK_LOGITS = 1 << 23


def _chunk_logits(buf: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None, temperature: float) -> Tensor:
    """(hidden @ weight.T + bias) / T written into the float32 buffer ``buf`` (reused for every chunk: a fresh large
    tensor per chunk costs more in page faults than the arithmetic on it)."""
    out = buf[: hidden.shape[0]]
    if weight.dtype == torch.float32:
        torch.mm(hidden, weight.t(), out=out)
        if bias is not None:
            out.add_(bias)
    else:
        out.copy_(F.linear(hidden, weight, bias))
    return out.div_(temperature)


class _ChunkedHeadLogprobs(torch.autograd.Function):
    """log softmax((hidden @ weight.T + bias) / T)[targets], chunk by chunk; the backward recomputes each chunk's
    logits and accumulates the weight's gradient into one buffer (no per-chunk (V, H) gradient tensors).

    Logits are computed in the autocast dtype when autocast is on (as the model's own head would), read in float32;
    gradients are computed and accumulated in float32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size):
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        n = hidden.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)  # log-sum-exp of each row, kept for the backward's softmax
        buf = torch.empty((min(chunk_size, n), weight.shape[0]), dtype=torch.float32, device=hidden.device)
        with torch.autocast(device, enabled=False):
            w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
            for start in range(0, n, chunk_size):
                sl = slice(start, start + chunk_size)
                logits = _chunk_logits(buf, hidden[sl].to(dtype), w, b, temperature)
                picked = logits.gather(-1, targets[sl, None]).squeeze(-1)
                top = logits.amax(dim=-1, keepdim=True)
                lse[sl] = logits.sub_(top).exp_().sum(dim=-1).log_() + top.squeeze(-1)
                out[sl] = picked - lse[sl]
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.dtype, ctx.temperature, ctx.chunk_size = dtype, temperature, chunk_size
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
        n = hidden.shape[0]
        buf = torch.empty((min(ctx.chunk_size, n), weight.shape[0]), dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            w, b = weight.to(ctx.dtype), None if bias is None else bias.to(ctx.dtype)
            w32 = weight.float()
            for start in range(0, n, ctx.chunk_size):
                sl = slice(start, start + ctx.chunk_size)
                g = grad_out[sl, None].float()
                logits = _chunk_logits(buf, hidden[sl].to(ctx.dtype), w, b, ctx.temperature)
                # d log p(target) / d logits = (onehot(target) - softmax) / T, times the incoming gradient
                d_logits = logits.sub_(lse[sl, None]).exp_().mul_(-g).scatter_add_(-1, targets[sl, None], g)
                d_logits.div_(ctx.temperature)
                if need_hidden:
                    grad_hidden[sl] = (d_logits @ w32).to(hidden.dtype)
                if need_weight:
                    grad_weight.addmm_(d_logits.t(), hidden[sl].float())
                if need_bias:
                    grad_bias += d_logits.sum(dim=0)
        return (
            grad_hidden,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            None, None, None,
        )


def chunked_token_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, *, bias: Tensor | None = None,
                           temperature: float = 1.0, chunk_size: int | None = None) -> Tensor:
    """(N,) log softmax((hidden @ weight.T + bias) / temperature)[targets] from (N, H) hidden states, in float32.

    The same values as ``target_logprobs`` over full logits, but only ``chunk_size`` rows of logits (default:
    CHUNK_LOGITS / V) exist at a time, in the forward and in the backward (which recomputes them): a step's peak
    memory no longer holds B x L x V floats.
    """
    if chunk_size is None:
        chunk_size = max(1, CHUNK_LOGITS // weight.shape[0])
    return _ChunkedHeadLogprobs.apply(hidden, weight, bias, targets, temperature, chunk_size)


def ntp_loss_from_logprobs(target_logprobs: Tensor, ntp_mask: Tensor, num_tokens: float | None = None) -> Tensor:
    """L_NTP = -(1 / N) * sum_pos m_pos * log p(token_pos | prefix), N = sum(m) or the given global count.

    ``target_logprobs`` and ``ntp_mask`` are indexed by target position (see ``target_logprobs``); m_pos = 0 for
    the RL positions C, padding and position 0.
    """
    n = ntp_mask.sum().item() if num_tokens is None else num_tokens
    return -_masked_sum(target_logprobs, ntp_mask) / max(n, 1)


def ntp_loss_from_logits(logits: Tensor, input_ids: Tensor, ntp_mask: Tensor, num_tokens: float | None = None) -> Tensor:
    """The same masked cross-entropy from (B, L, V) logits of a forward over ``input_ids`` (B, L): logits[:, pos - 1]
    predict input_ids[:, pos]; ``ntp_mask`` is (B, L), indexed by target position (column 0 is ignored)."""
    per_token = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:], reduction="none")
    mask = ntp_mask[:, 1:]
    n = mask.sum().item() if num_tokens is None else num_tokens
    return _masked_sum(per_token, mask) / max(n, 1)


# --- the unified objective ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Normalizers:
    """Global counts that each term is divided by (over all processes and micro-batches of one optimizer step).

    None = count on the tensors given (single process, one micro-batch).
    """

    rl_tokens: float | None = None  # response tokens (token-mean)
    rl_sequences: float | None = None  # responses with at least one token (seq-mean-* modes)
    ntp_tokens: float | None = None  # NTP target positions
    rl_horizon: int | None = None  # H of seq-mean-token-sum-norm (e.g. the generation cap); None = padded length


@dataclass
class LossTerms:
    """The loss to back-propagate and its parts (detached floats, for logging).

    The parts are this call's contributions: under a global normaliser, summing them over processes and
    micro-batches gives the step's values.
    """

    loss: Tensor
    rl: float  # L_RL = policy + kl_beta * kl
    policy: float
    kl: float
    ntp: float  # L_NTP, before the weight lambda
    clip_fraction: float  # share of response tokens where the clipped branch was taken
    rl_tokens: int
    ntp_tokens: int

    def metrics(self) -> dict[str, float]:
        return {k: float(v) for k, v in vars(self).items() if k != "loss"} | {"loss": float(self.loss.detach())}


def unified_loss(
    *,
    grpo: GRPOConfig,
    ntp_weight: float,
    logprobs: Tensor | None = None,
    advantages: Tensor | None = None,
    response_mask: Tensor | None = None,
    old_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    ntp_logprobs: Tensor | None = None,
    ntp_mask: Tensor | None = None,
    rollout_logprobs: Tensor | None = None,
    norm: Normalizers = Normalizers(),
    world_size: int = 1,
) -> LossTerms:
    """L = L_RL + lambda * L_NTP, with L_RL = agg(policy loss) + beta * agg(k3 KL) over the response tokens and
    L_NTP the masked cross-entropy over the corpus tokens outside C, each normalised by its own count.

    RL inputs (logprobs, advantages, response_mask; old_logprobs None = on-policy, ratio 1; ref_logprobs needed when
    grpo.kl_beta > 0) and NTP inputs (ntp_logprobs from ``target_logprobs``, ntp_mask) may each be left out: that
    term is then 0. With grpo.tis_cap set and ``rollout_logprobs`` (the engine's log-probs, (R, T)) given, the
    per-token policy loss is weighted by ``truncated_importance_weights(old, rollout, cap)``. ``world_size``: the loss is multiplied by it, because DDP averages gradients over processes while
    each process already divided its sum by the global count (so the mean over processes of W * local_sum / N is the
    global sum / N). Leave it 1 with local counts.
    """
    anchor = logprobs if logprobs is not None else ntp_logprobs
    zero = torch.zeros(()) if anchor is None else anchor.new_zeros(())
    policy = kl = zero
    clip_fraction, rl_tokens = 0.0, 0
    if logprobs is not None:
        if advantages is None or response_mask is None:
            raise ValueError("the RL term needs logprobs, advantages and response_mask together")
        counts = dict(num_tokens=norm.rl_tokens, num_sequences=norm.rl_sequences, horizon=norm.rl_horizon)
        old = logprobs.detach() if old_logprobs is None else old_logprobs
        per_token, clipped = clipped_policy_loss(logprobs, old, advantages, grpo.clip_eps, grpo.clip_eps_high)
        if grpo.tis_cap is not None and rollout_logprobs is not None:
            per_token = per_token * truncated_importance_weights(old, rollout_logprobs, grpo.tis_cap)
        policy = aggregate(per_token, response_mask, grpo.loss_agg, **counts)
        if grpo.kl_beta > 0:
            if ref_logprobs is None:
                raise ValueError("grpo.kl_beta > 0 needs ref_logprobs")
            kl = aggregate(kl_k3(logprobs, ref_logprobs), response_mask, grpo.loss_agg, **counts)
        rl_tokens = int(response_mask.sum().item())
        clip_fraction = float(_masked_sum(clipped.float(), response_mask).item()) / max(rl_tokens, 1)
    rl = policy + grpo.kl_beta * kl

    ntp, ntp_tokens = zero, 0
    if ntp_logprobs is not None:
        if ntp_mask is None:
            raise ValueError("the NTP term needs ntp_logprobs and ntp_mask together")
        ntp = ntp_loss_from_logprobs(ntp_logprobs, ntp_mask, norm.ntp_tokens)
        ntp_tokens = int(ntp_mask.sum().item())

    loss = world_size * (rl + ntp_weight * ntp)
    return LossTerms(
        loss=loss,
        rl=float(rl.detach()),
        policy=float(policy.detach()),
        kl=float(kl.detach()),
        ntp=float(ntp.detach()),
        clip_fraction=clip_fraction,
        rl_tokens=rl_tokens,
        ntp_tokens=ntp_tokens,
    )
