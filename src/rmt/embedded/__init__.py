"""The embedded default (SPEC section 6): what runs with no arguments, built from the package registries alone.

- ``corpus``: math documents from reasoning-gym in four disjoint splits (base pre-training, mid-training,
  evaluation, post-training);
- ``cache``: the corpus, a tokenizer and a small base model (``rmt.pretrain``), built on first use and cached;
- ``probe``: does the base model's reasoning help, and where.
"""

from rmt.embedded.cache import (
    EmbeddedArtifacts,
    base_model_summary,
    embedded_paths,
    ensure_embedded,
    resolve_model_path,
    resolve_tokenizer_path,
)

__all__ = [
    "EmbeddedArtifacts",
    "base_model_summary",
    "embedded_paths",
    "ensure_embedded",
    "resolve_model_path",
    "resolve_tokenizer_path",
]
