"""Training compute, counted (not timed): forward, backward and generation FLOPs of a step.

The standard dense-transformer count (Kaplan et al., 2020, "Scaling Laws for Neural Language Models"): a forward
pass costs, per token, 2 multiply-adds per weight of the matrices it goes through, plus attention:

    forward(token at context c) = 2 * N + 2 * n_layers * c * d_model

N counts every weight a token's forward multiplies by: the non-embedding parameters plus the output layer (V x d);
the input embedding is a lookup and costs nothing. The attention term is Kaplan's 2 * n_layers * c * d_model (scores
against c keys and the weighted sum of c values). A backward pass costs twice a forward, so a trained token costs
3 forwards.

What a method spends (``step_flops``): the training forward and backward over its trunks (the corpus sequences when
the NTP term is on; otherwise each distinct RL prompt once) and over every RL response (each response token attends
to its prompt and to the response tokens before it), extra forwards for old or reference log-probabilities, and
generation: one prefill per distinct prompt (the G responses of a group share it) and one decode forward per
generated token. This is what this implementation performs, not a lower bound.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    """What the count needs of a model: weights per token, layers, width."""

    params: int  # N: non-embedding parameters + the output layer
    n_layers: int
    d_model: int

    @classmethod
    def of(cls, model) -> "ModelShape":
        """From a Hugging Face causal LM (a DDP wrapper is unwrapped)."""
        model = getattr(model, "module", model)
        config = model.config
        total = sum(p.numel() for p in model.parameters())
        embed = model.get_input_embeddings().weight
        head = model.get_output_embeddings().weight
        tied = embed.data_ptr() == head.data_ptr()
        params = total - embed.numel() + (head.numel() if tied else 0)
        return cls(int(params), int(config.num_hidden_layers), int(config.hidden_size))


def forward_flops(shape: ModelShape, tokens: int, context_sum: int) -> float:
    """FLOPs of a forward over ``tokens`` tokens whose attention contexts add up to ``context_sum`` (a token at
    position i of a causal sequence attends to i + 1 tokens)."""
    return 2.0 * shape.params * tokens + 2.0 * shape.n_layers * shape.d_model * context_sum


def causal_context_sum(length: int, start: int = 0) -> int:
    """Sum of attention contexts of the tokens at positions start .. start + length - 1: (start + 1) + ... +
    (start + length)."""
    return length * (2 * start + length + 1) // 2


def sequence_forward_flops(shape: ModelShape, length: int, start: int = 0) -> float:
    """Forward over ``length`` tokens that follow ``start`` earlier tokens (a cached or shared prefix)."""
    return forward_flops(shape, length, causal_context_sum(length, start))


def train_flops(shape: ModelShape, forward: float) -> float:
    """Forward and backward: the backward costs twice the forward."""
    return 3.0 * forward


def step_flops(shape: ModelShape, trunks: list[int], responses: list[tuple[int, int]], prompts: list[int],
               generated: list[tuple[int, int]], extra_forwards: int = 0, iterations: int = 1) -> dict[str, float]:
    """FLOPs of one training step.

    ``trunks``: lengths of what the training forward reads besides the responses: the corpus sequences when the NTP
    term is on, else the distinct RL prompts.
    ``responses``: (prompt length, response length) of every RL response trained on.
    ``prompts``: lengths of the distinct prompts prefilled for generation.
    ``generated``: (prompt length, generated tokens) of every response generated.
    ``extra_forwards``: forwards over the responses without gradient (old log-probs when iterations > 1, the
    reference model for KL). ``iterations``: policy updates on the same rollouts (grpo.num_iterations).
    Returns the parts and their sum, ``total``.
    """
    ntp = sum(sequence_forward_flops(shape, n) for n in trunks)
    rl = sum(sequence_forward_flops(shape, r, p) for p, r in responses)
    out = {
        "train": iterations * train_flops(shape, ntp + rl),
        "extra_forward": extra_forwards * rl,
        "generation": sum(sequence_forward_flops(shape, n) for n in prompts)
        + sum(sequence_forward_flops(shape, r, p) for p, r in generated),
    }
    out["total"] = sum(out.values())
    return out
