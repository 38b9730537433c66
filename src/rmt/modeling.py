"""Loading models and tokenizers, and the checks that they belong together.

Any Hugging Face causal LM works, from a local folder or a hub name; ``trust_remote_code`` stays off unless the
config asks. Weights load through safetensors (``use_safetensors=True``): a pickled checkpoint is refused.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from rmt.config import RMTConfig
from rmt.errors import ModelError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


# A Hugging Face hub id: "name" or "owner/name" of letters, digits, '-', '_' and '.'.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


def looks_local(path: str) -> bool:
    """True when ``path`` can only mean a folder on this machine, never a hub id: it exists, starts with ``/``,
    ``./``, ``../`` or ``~``, has more than one separator, is not a valid hub id, or its first part is a folder here."""
    p = str(path)
    if os.path.exists(os.path.expanduser(p)) or p.startswith(("/", "./", "../", "~", ".")) or os.sep != "/" and os.sep in p:
        return True
    return not _HUB_ID.match(p) or ("/" in p and os.path.isdir(p.split("/", 1)[0]))


def check_local_path(path: str, what: str) -> None:
    """A local-looking path that does not exist is an error at once (not a minute of retries against the hub); so is
    a bare name (``base_model``, no ``/``) that is no folder here and that the hub, asked once, does not have."""
    if looks_local(path) and not Path(os.path.expanduser(str(path))).exists():
        raise ModelError(f"{what}: no such folder: {path}{_did_you_mean(str(path))}")
    if Path(os.path.expanduser(str(path))).is_file():
        raise ModelError(f"{what}: {path} is a file, not a model folder")
    if "/" not in str(path) and not Path(str(path)).exists():
        problem = _bare_name_problem(str(path))
        if problem:
            raise ModelError(f"{what}: no such folder: {path}{_did_you_mean(str(path))}, and {problem}")


def check_model_paths(cfg: RMTConfig, *extra: tuple[str, str | None]) -> None:
    """model.path and model.tokenizer (and ``extra`` (what, path) pairs) are checked by ``check_local_path`` before
    any work: a stage that would fail on them after minutes of preparation fails at once."""
    for what, path in (("model.path", cfg.model.path), ("model.tokenizer", cfg.model.tokenizer), *extra):
        if path is not None:
            check_local_path(path, what)


def _did_you_mean(path: str) -> str:
    """`` (did you mean runs/base_model?)`` for a close folder name beside the one asked for; empty when none."""
    import difflib

    p = Path(os.path.expanduser(path))
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        return ""
    try:
        names = [q.name for q in parent.iterdir() if q.is_dir()]
    except OSError:
        return ""
    close = difflib.get_close_matches(p.name, names, n=1, cutoff=0.75)
    return f" (did you mean {path[: len(path) - len(p.name)]}{close[0]}?)" if close else ""


@functools.lru_cache(maxsize=64)
def _bare_name_problem(name: str) -> str | None:
    """Why a bare name that is no folder here cannot be a hub model either (None when it can, or may). A bare name
    is a folder typed wrong more often than one of the hub's few unprefixed models (gpt2): one request, without the
    library's retries, answers it in a second instead of a minute of retries."""
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if any(isinstance(try_to_load_from_cache(name, f), str) for f in ("config.json", "tokenizer_config.json")):
        return None  # in the local hub cache
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set and no hub model of that name is cached"
    try:
        HfApi().model_info(name, timeout=10)
    except GatedRepoError:
        return None  # exists; the library asks for access
    except RepositoryNotFoundError:
        return f"the hub has no model {name!r} that you can access"
    except Exception as e:  # noqa: BLE001 - no connection, DNS, proxy: say so rather than retry for a minute
        return f"the hub (huggingface.co) cannot be reached to look for a model of that name ({type(e).__name__}: {e})"
    return None


# Files one of which a tokenizer folder holds (fast tokenizers, their config, BPE vocabularies, sentencepiece models).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model", "spiece.model")


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    check_local_path(path, "tokenizer")
    folder = Path(os.path.expanduser(str(path)))
    if folder.is_dir() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise ModelError(f"cannot load a tokenizer from {path!r}: the folder holds none of {', '.join(TOKENIZER_FILES)}")
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - name the path the user gave; the library's first line says why
        why = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise ModelError(f"cannot load a tokenizer from {path!r}: {why}") from None
    if tok.pad_token_id is None:
        # Padding is only ever masked out; reuse EOS as the pad token, as most causal LMs do.
        tok.pad_token = tok.eos_token
    return tok


def pick_device() -> torch.device:
    import torch  # here, not at the top: the path checks above answer at once, without loading torch

    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    import torch

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
    check_local_path(path, "model")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"cannot load a causal LM from {path!r}: {e}") from None
    return model.to(device)


def context_length_of(config) -> int | None:
    """The longest sequence a model config allows (max_position_embeddings, n_positions, ...); None when unstated."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_context_fits(seq_len: int, model_or_config, where: str = "model") -> None:
    """Corpus sequences of ``seq_len`` tokens must fit the model's context (a ModelError before any work)."""
    config = getattr(model_or_config, "config", model_or_config)
    config = getattr(getattr(model_or_config, "module", None), "config", config)
    context = context_length_of(config)
    if context is not None and seq_len > context:
        raise ModelError(
            f"data.seq_len={seq_len} is longer than the {where}'s context of {context} tokens: "
            f"prepare the corpus with data.seq_len <= {context}"
        )


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
