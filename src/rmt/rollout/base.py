"""The rollout engine interface: G sampled responses per prompt, with the log-probabilities GRPO needs.

An engine takes token-id prompts and returns, for each, a ``Group`` of ``group_size`` responses. Each response holds
its token ids (up to and including the token that stopped it), the log-probability of every sampled token, and why
it ended. Engines differ in how they generate (Hugging Face with a shared-prefix KV cache, ``rmt.rollout.hf``; vLLM,
``rmt.rollout.vllm``), never in what they return, so the trainer and the evaluation do not know which one they use.

Weights: an engine samples from the model it was made for. ``sync_weights(model)`` is called once per optimizer
step, after the update and before the next rollouts; it is a no-op for an engine that runs the live model (HF) and a
weight push for one that holds its own copy (vLLM).

Log-probability convention (every engine follows it): the log-probability of the sampled token under the
temperature-scaled distribution ``log_softmax(logits / temperature)``, taken *before* top-p truncation. That is the
distribution the trainer recomputes with a plain forward pass (it cannot know the per-step nucleus), so old and new
log-probs of the policy ratio are the same function of the logits. With top_p = 1 (the default) it is exactly the
sampling distribution. Greedy decoding (temperature 0) reports log-probabilities at temperature 1.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Literal

import torch

FinishReason = Literal["eos", "stop", "length"]


@dataclass(frozen=True)
class StopRule:
    """When a response ends (the stopping token is kept in the response).

    - ``eos_ids``: stop on any of these tokens.
    - ``close_id`` and ``after_close``: stop ``after_close`` tokens after the first ``close_id`` (``</think>``).
      ``after_close=1`` is the raw template's first-token answer; ``0`` stops on ``</think>`` itself;
      ``None`` lets the response run on to EOS or the cap.
    """

    eos_ids: tuple[int, ...] = ()
    close_id: int | None = None
    after_close: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "eos_ids", tuple(int(i) for i in self.eos_ids))
        if self.after_close is not None:
            if self.after_close < 0:
                raise ValueError(f"StopRule.after_close must be >= 0 or None, got {self.after_close}")
            if self.close_id is None:
                raise ValueError("StopRule.after_close needs close_id (the token id of the closing marker)")

    @classmethod
    def from_tokenizer(cls, tokenizer, close_marker: str | None = "</think>", after_close: int | None = None) -> StopRule:
        """EOS from the tokenizer; ``close_marker`` must be a single token of its vocabulary."""
        eos = () if tokenizer.eos_token_id is None else (tokenizer.eos_token_id,)
        close_id = None
        if close_marker is not None:
            ids = tokenizer.encode(close_marker, add_special_tokens=False)
            if len(ids) != 1:
                raise ValueError(f"{close_marker!r} is not a single token of this tokenizer (it encodes to {ids})")
            close_id = ids[0]
        return cls(eos_ids=eos, close_id=close_id, after_close=after_close)


@dataclass
class Response:
    token_ids: list[int]
    logprobs: list[float]  # one per token of token_ids, see the module docstring for the convention
    finish_reason: FinishReason  # eos: an EOS id; stop: the close-marker rule; length: hit max_new_tokens

    @property
    def truncated(self) -> bool:
        """Cut by the token cap rather than ended by a stop rule."""
        return self.finish_reason == "length"


def cut_to_rule(response: Response, stop: StopRule, max_new_tokens: int) -> Response:
    """The response that generation under ``stop`` and ``max_new_tokens`` would have returned, from one generated
    under a looser rule or a larger cap: the same tokens (an engine's draws at a step do not depend on where the
    response will end), cut where the tighter rule ends it. Callers that generate a batch under its loosest rule use
    it to give each prompt the response its own rule allows, independent of the prompts it was batched with."""
    ids, eos = response.token_ids, set(stop.eos_ids)
    closed_at = None
    for i, token in enumerate(ids):
        if i >= max_new_tokens:
            return Response(ids[:i], response.logprobs[:i], "length")
        if token in eos:
            reason: FinishReason = "eos"
        elif stop.after_close is not None and (closed_at is not None or token == stop.close_id):
            closed_at = i if closed_at is None else closed_at
            if i - closed_at < stop.after_close:
                continue
            reason = "stop"
        else:
            continue
        if i + 1 == len(ids) and reason == response.finish_reason:
            return response
        return Response(ids[: i + 1], response.logprobs[: i + 1], reason)  # a stop token on the last step wins over length
    return response


@dataclass
class Group:
    """The G responses sampled for one prompt."""

    prompt_ids: list[int]
    responses: list[Response] = field(default_factory=list)


def sample_tokens(
    logits: torch.Tensor, temperature: float, top_p: float = 1.0, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next token of every row of ``logits`` (rows x vocab) and its log-probability (float32).

    temperature <= 0 is greedy. Sampling uses the exponential race (argmax of p / E, E ~ Exp(1), which picks token i
    with probability p_i): one noise tensor per step, so the random stream consumed depends only on the batch shape,
    and two engines that decode the same rows in the same order with the same generator draw the same tokens.
    """
    logits = logits.float()
    if temperature <= 0:
        tokens = logits.argmax(dim=-1)
        logprobs = torch.log_softmax(logits, dim=-1)
    else:
        logprobs = torch.log_softmax(logits / temperature, dim=-1)
        probs = logprobs.exp()
        if top_p < 1.0:
            # Keep the smallest set of most likely tokens whose mass reaches top_p (the most likely always stays).
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
        noise = torch.empty_like(probs).exponential_(generator=generator)
        tokens = (probs / noise).argmax(dim=-1)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


class RolloutEngine(ABC):
    """Generates groups of responses. Implementations: ``HFEngine`` (rmt.rollout.hf), ``VLLMEngine`` (rmt.rollout.vllm).

    ``seeds_per_prompt``: ``generate_groups`` takes ``seeds=`` (one per prompt) and a prompt's responses depend on its
    seed alone, not on the other prompts of the call, so callers can make draws independent of how prompts are
    split over calls or processes. ``continuous_batching``: the engine schedules any number of prompts itself
    (callers need not cut a step's prompts into batches).
    """

    seeds_per_prompt: bool = False
    continuous_batching: bool = False

    def sync_weights(self, model) -> None:
        """Make the next rollouts use ``model``'s current weights (after an optimizer step). Engines that run the
        live model have nothing to do."""

    @abstractmethod
    def generate_groups(
        self,
        prompts: list[list[int]],
        group_size: int,
        max_new_tokens: int,
        *,
        stop: StopRule,
        temperature: float = 1.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> list[Group]:
        """``group_size`` responses of at most ``max_new_tokens`` tokens for each prompt, in prompt order.

        temperature 0 = greedy (every response of a group is the same). ``generator`` seeds the sampling
        (None = torch's global generator). Engines with ``seeds_per_prompt`` also take ``seeds=``: one int per
        prompt, used instead of ``generator``.
        """

    def greedy(self, prompts: list[list[int]], max_new_tokens: int, *, stop: StopRule) -> list[Response]:
        """One greedy response per prompt (evaluation)."""
        groups = self.generate_groups(prompts, 1, max_new_tokens, stop=stop, temperature=0.0)
        return [g.responses[0] for g in groups]
