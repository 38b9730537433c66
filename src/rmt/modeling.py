"""Loading models and tokenizers, and the checks that they belong together.

Any Hugging Face causal LM works, from a local folder or a hub name; ``trust_remote_code`` stays off unless the
config asks. Weights load through safetensors (``use_safetensors=True``): a pickled checkpoint is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging

import torch

from rmt.config import RMTConfig
from rmt.errors import ModelError

log = logging.getLogger(__name__)


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - name the path the user gave
        raise ModelError(f"cannot load a tokenizer from {path!r}: {e}") from None
    if tok.pad_token_id is None:
        # Padding is only ever masked out; reuse EOS as the pad token, as most causal LMs do.
        tok.pad_token = tok.eos_token
    return tok


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_model(path: str, cfg: RMTConfig, device: torch.device | None = None):
    """A causal LM from ``path`` on ``device`` with the configured dtype and attention kernel."""
    from transformers import AutoModelForCausalLM

    device = device or pick_device()
    kwargs = dict(
        dtype=pick_dtype(cfg.model.dtype, device),
        trust_remote_code=cfg.model.trust_remote_code,
        use_safetensors=True,
    )
    if cfg.model.attn_implementation:
        kwargs["attn_implementation"] = cfg.model.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"cannot load a causal LM from {path!r}: {e}") from None
    return model.to(device)


def model_vocab_size(model) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


def check_tokenizer_matches_model(tokenizer, model, where: str = "model") -> None:
    """A tokenizer whose ids the model cannot embed, or whose special tokens disagree, is an error."""
    vocab = model_vocab_size(model)
    if len(tokenizer) > vocab:
        raise ModelError(
            f"tokenizer has {len(tokenizer)} tokens but the {where} has only {vocab} output rows: "
            "they do not belong together (set model.tokenizer to the model's own tokenizer)"
        )
    for name in ("bos", "eos"):
        tok_id = getattr(tokenizer, f"{name}_token_id")
        model_id = getattr(model.config, f"{name}_token_id", None)
        if tok_id is None or model_id is None:
            continue
        model_ids = model_id if isinstance(model_id, list) else [model_id]
        if name == "eos":
            gen = getattr(model, "generation_config", None)
            gen_eos = getattr(gen, "eos_token_id", None) if gen is not None else None
            if gen_eos is not None:
                model_ids = model_ids + (gen_eos if isinstance(gen_eos, list) else [gen_eos])
        if tok_id not in model_ids:
            raise ModelError(
                f"tokenizer's {name} token id {tok_id} is not the {where}'s ({model_ids}): "
                "the tokenizer does not match the model"
            )


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the vocabulary and special tokens: the identity of a tokenized corpus."""
    payload = json.dumps(
        {"vocab": sorted(tokenizer.get_vocab().items()), "special": tokenizer.all_special_tokens}, ensure_ascii=False
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
