"""Rollouts: G sampled responses per RL position behind a small engine interface (SPEC section 5).

``base`` holds the interface and the result types; ``hf`` the Hugging Face engine with a shared-prefix KV cache.
A vLLM engine would be one more ``RolloutEngine`` subclass registered in ``ENGINES``.
"""

from __future__ import annotations

from rmt.rollout.base import FinishReason, Group, Response, RolloutEngine, StopRule, sample_tokens
from rmt.rollout.hf import HFEngine, generate_independent

ENGINES: dict[str, type[RolloutEngine]] = {"hf": HFEngine}


def make_engine(rollout_cfg, model, pad_id: int = 0) -> RolloutEngine:
    """The engine named by ``rollout.engine`` for ``model`` (an unwrapped model, not a DDP wrapper)."""
    return ENGINES[rollout_cfg.engine](model, pad_id=pad_id, shared_prefix=rollout_cfg.shared_prefix)


__all__ = [
    "ENGINES",
    "FinishReason",
    "Group",
    "HFEngine",
    "Response",
    "RolloutEngine",
    "StopRule",
    "generate_independent",
    "make_engine",
    "sample_tokens",
]
