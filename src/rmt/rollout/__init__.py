"""Rollouts: G sampled responses per RL position behind a small engine interface (SPEC section 5).

``base`` holds the interface and the result types; ``hf`` the Hugging Face engine with a shared-prefix KV cache;
``vllm`` the vLLM engine colocated with the trainer (imported only when asked for: vLLM is an optional install).
"""

from __future__ import annotations

from rmt.rollout.base import FinishReason, Group, Response, RolloutEngine, StopRule, cut_to_rule, sample_tokens
from rmt.rollout.hf import HFEngine, generate_independent

ENGINES = ("hf", "vllm")


def make_engine(rollout_cfg, model, pad_id: int = 0) -> RolloutEngine:
    """The engine named by ``rollout.engine`` for ``model`` (an unwrapped model, not a DDP wrapper)."""
    if rollout_cfg.engine == "vllm":
        from rmt.rollout.vllm import VLLMEngine

        return VLLMEngine(model, pad_id=pad_id, options=rollout_cfg.vllm)
    if rollout_cfg.engine != "hf":
        raise ValueError(f"unknown rollout engine {rollout_cfg.engine!r}; engines: {', '.join(ENGINES)}")
    return HFEngine(model, pad_id=pad_id, shared_prefix=rollout_cfg.shared_prefix)


__all__ = [
    "ENGINES",
    "FinishReason",
    "Group",
    "HFEngine",
    "Response",
    "RolloutEngine",
    "StopRule",
    "cut_to_rule",
    "generate_independent",
    "make_engine",
    "sample_tokens",
]
