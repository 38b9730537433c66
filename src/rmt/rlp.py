"""RLP's information-gain reward (arXiv 2510.01265) and the EMA model it compares with (reward.kind=information_gain).

At an RL position of a corpus sequence x the model thinks (its response up to ``</think>``), and the reward of the
thought c is how much it raised the probability of the true next token x_t:

    r(c) = log p_theta(x_t | x_<t, c) - log p_ema(x_t | x_<t)

p_ema is an exponential moving average of the model's weights (``ema <- tau * ema + (1 - tau) * theta`` after every
optimizer step; RLP: tau = 0.999), predicting from the prefix without thinking. Both log-probabilities are at
temperature 1. The first comes from one pass of the policy, without gradient, over (prompt, thought + x_t) through
``rmt.forward`` (each prompt once, its G thoughts as segments); the second from one teacher-forced pass of the EMA
model over the batch's sequences, which reads every RL position of a sequence at once. The rewards then go through
the same group advantages, clipped surrogate and NTP term as every other preset. Only the thought tokens are trained;
``reward.train_answer`` adds the tokens the predictor was given (a closing marker the thought lacked, the restated
part of the value, x_t) by cross-entropy: the surrogate with advantage 1, whose gradient at ratio 1 is that of log p_theta(x_t | x_<t, c).

A thought that never closed (it hit the generation cap, or wrote EOS) is read as closed where it stopped: the
predictor sees its tokens (an EOS dropped), then a closing marker that was not sampled, then x_t. Where the answer
rule skips a restatement (prompt.skip_restatement: after thinking, a model writes the current value from its start),
the predictor also reads the part of the value already written before x_t, as the evaluation would.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from rmt.forward import forward_logprobs, unwrap
from rmt.rollout import Group, Response

Tensor = torch.Tensor


# --- the formulas ---------------------------------------------------------------------------------------------


def information_gain(logp_with_thought: Tensor, logp_without: Tensor) -> Tensor:
    """r = log p_theta(x_t | x_<t, c) - log p_ema(x_t | x_<t), elementwise (broadcasts: (C, G) and (C, 1))."""
    return logp_with_thought.float() - logp_without.float()


def ema_lerp(ema: Tensor, value: Tensor, tau: float) -> Tensor:
    """One EMA step: tau * ema + (1 - tau) * value (tau = 0 copies ``value``; tau near 1 moves slowly)."""
    if not 0.0 <= tau < 1.0:
        raise ValueError(f"the EMA decay tau must be in [0, 1), got {tau}")
    return ema * tau + value * (1.0 - tau)


def split_thought(token_ids: Sequence[int], close_id: int, eos_ids: Sequence[int] = ()) -> tuple[int, list[int]]:
    """How a response is read as a thought: (sampled tokens kept, tokens appended before x_t).

    Up to and including the first ``close_id``: (that many, []). A response that never closed keeps its tokens
    before the first EOS and gets a closing marker appended: (n, [close_id]).
    """
    ids = [int(t) for t in token_ids]
    if close_id in ids:
        return ids.index(close_id) + 1, []
    eos = set(int(e) for e in eos_ids)
    kept = next((k for k, t in enumerate(ids) if t in eos), len(ids))
    return kept, [int(close_id)]


# --- the EMA model ---------------------------------------------------------------------------------------------


class EMAModel:
    """A float32 copy of the model whose weights follow the model's by ``ema_lerp`` after every optimizer step.

    Buffers (e.g. rotary frequencies) are the model's own, computed from its config; only parameters move and are
    saved (``tensors``, safetensors-ready: tied weights once, under their first name).
    """

    def __init__(self, model):
        self.model = copy.deepcopy(unwrap(model)).float().eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model, tau: float) -> None:
        current = dict(unwrap(model).named_parameters())
        for name, p in self.model.named_parameters():
            p.copy_(ema_lerp(p, current[name].detach().float(), tau))

    def tensors(self) -> dict[str, Tensor]:
        return {name: p.detach().cpu().contiguous() for name, p in self.model.named_parameters()}

    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, Tensor]) -> None:
        params = dict(self.model.named_parameters())
        if set(tensors) != set(params):
            missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
            raise ValueError(f"EMA weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
        for name, p in params.items():
            p.copy_(tensors[name])


# --- the reward of a step's groups -------------------------------------------------------------------------------


@dataclass
class InfoGain:
    """The information-gain rewards of a list of groups, and what the loss trains on."""

    rewards: Tensor  # (C, G)
    logp_think: Tensor  # (C, G): log p_theta(x_t | x_<t, thought)
    logp_base: Tensor  # (C,): log p_ema(x_t | x_<t)
    groups: list[Group]  # the responses cut to their thoughts (+ the predictor's tokens with train_answer)
    teacher_forced: list[list[int]]  # per group, per response: trailing tokens trained by cross-entropy (0 without train_answer)


def information_gain_rewards(model, ema: EMAModel, sequences, positions: list[tuple[int, int]], groups: list[Group],
                             written: list[list[int]] | None = None, *, close_id: int, eos_ids: Sequence[int] = (),
                             pad_id: int = 0, train_answer: bool = False,
                             autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> InfoGain:
    """The reward of every response of ``groups`` (one group per (row, pos) of ``positions``; x_t = sequences[row][pos]).

    ``written``: per position, the part of the current value the prefix already holds (``collect.written_part``:
    empty unless prompt.skip_restatement applies). The predictor then reads it after ``</think>``, before x_t: the
    answer convention that the evaluation and the match reward credit (a model restates the value after thinking).
    """
    written = written or [[] for _ in positions]
    pairs, splits = [], []
    for (b, pos), group, w in zip(positions, groups, written):
        x_t = int(sequences[b][pos])
        for r in group.responses:
            kept, closing = split_thought(r.token_ids, close_id, eos_ids)
            given = closing + [int(t) for t in w]  # what the predictor reads between the thought and x_t
            splits.append((kept, given))
            pairs.append((group.prompt_ids, list(r.token_ids[:kept]) + given + [x_t]))
    C, G = len(groups), len(groups[0].responses) if groups else 0
    if not pairs:
        empty = torch.zeros((0, 0))
        return InfoGain(empty, empty, torch.zeros(0), [], [])

    rows = sorted({b for b, _ in positions})
    row_of = {b: i for i, b in enumerate(rows)}
    prefixes = [list(sequences[b][: 1 + max(pos for bb, pos in positions if bb == b)]) for b in rows]
    with torch.no_grad(), autocast():
        think_out = forward_logprobs(unwrap(model), None, pairs, 1.0, pad_id)
        base_out = forward_logprobs(ema.model, prefixes, None, 1.0, pad_id)
    think = think_out.response.float().cpu()  # right-aligned: column -1 is x_t, before it the given tokens
    logp_think = think[:, -1].reshape(C, G)
    logp_base = torch.stack([base_out.ntp_logprobs[row_of[b], pos].float().cpu() for b, pos in positions])
    rewards = information_gain(logp_think, logp_base[:, None])

    cut_groups, forced_counts, k = [], [], 0
    for (b, pos), group in zip(positions, groups):
        responses, counts = [], []
        for r in group.responses:
            kept, given = splits[k]
            ids, lps = list(r.token_ids[:kept]), list(r.logprobs[:kept])
            if train_answer:  # the predictor's tokens, with their (temperature-1) log-probs from the pass above
                tail = given + [int(sequences[b][pos])]
                ids += tail
                lps += think[k, think.shape[1] - len(tail):].tolist()
            responses.append(Response(ids, lps, r.finish_reason))
            counts.append(len(given) + 1 if train_answer else 0)
            k += 1
        cut_groups.append(Group(group.prompt_ids, responses))
        forced_counts.append(counts)
    return InfoGain(rewards, logp_think, logp_base, cut_groups, forced_counts)
