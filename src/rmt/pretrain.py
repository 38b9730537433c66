"""`rmt pretrain`: train a small Llama from scratch with plain next-token prediction on a corpus.

The embedded default's base model comes from here (SPEC section 8 recipe: hidden 256, 4 layers, tied embeddings,
128-token packed rows, AdamW (0.9, 0.95), wd 0.1, lr 1e-3 with warm-up then cosine, bf16 autocast and eager
attention on CPU), and the same function trains on any corpus given in ``pretrain.corpus``.

The loop reads top to bottom: documents -> ``[bos] doc [eos]`` stream -> fixed rows -> a seeded permutation per
epoch -> AdamW steps. Every ``save_every`` steps an atomic checkpoint (model, optimizer, scheduler, RNG states,
step) is written; a restart resumes from it exactly: the data order is a pure function of (seed, step), so the
step is the data position. The finished model is saved with ``save_pretrained`` (safetensors) next to its
tokenizer, and ``pretrain_done.json`` is written last: a folder without it is unfinished.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from rmt.checkpoint import safe_torch_load
from rmt.config import PretrainConfig, RMTConfig
from rmt.errors import CheckpointError, DataError
from rmt.fileio import atomic_write_text, read_json_object, remove_orphans, source_digest, temp_prefix

log = logging.getLogger(__name__)

DONE_FILE = "pretrain_done.json"
RUN_FILE = "pretrain_run.json"
CKPT_DIR = "checkpoints"
TOKENIZE_BATCH = 1024
# pretrain fields that do not change the trained weights: left out of a run's identity and of the cache key
BOOKKEEPING_FIELDS = frozenset(
    {"corpus", "tokenizer", "output_dir", "eval_every", "eval_rows", "save_every", "keep_checkpoints", "probe_problems",
     "use_shipped"}
)


def weight_settings(pcfg: PretrainConfig) -> dict:
    """The pretrain fields that change the trained weights: a run's identity and the embedded cache key. Options
    that are off are left out, so that models built before they existed keep their identity."""
    exclude = set(BOOKKEEPING_FIELDS) | ({"think_blocks"} if pcfg.think_blocks == 0 else set())
    return pcfg.model_dump(mode="json", exclude=exclude)


# ---------------------------------------------------------------------------------------------------------------
# Pure pieces: schedule, data order, precision.


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak lr at ``step``: linear warm-up to 1, then cosine down to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def batch_rows(step: int, batch_size: int, n_rows: int, seed: int) -> torch.Tensor:
    """Row indices of ``step``: consecutive slices of one seeded permutation per epoch (a pure function of step)."""
    start = step * batch_size
    out, pos = [], start
    while pos < start + batch_size:
        epoch, offset = divmod(pos, n_rows)
        perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        take = min(n_rows - offset, start + batch_size - pos)
        out.append(perm[offset : offset + take])
        pos += take
    return torch.cat(out)


def use_bf16(precision: str, device: torch.device) -> bool:
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    # Without native bf16 (AVX512-BF16 / AMX) autocast emulates it and is slower than fp32.
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(check and check())


# ---------------------------------------------------------------------------------------------------------------
# Data


def read_corpus_texts(path: str | Path, text_field: str = "text", encoding_errors: str = "strict") -> list[str]:
    """Non-empty document texts of a corpus; DataError when it is missing or holds no text."""
    from rmt.data.readers import read_documents

    texts = [d["text"] for d in read_documents(path, "auto", text_field, encoding_errors) if d["text"].strip()]
    if not texts:
        raise DataError(f"corpus {path} holds no text: nothing to pretrain on")
    return texts


def split_documents(n_docs: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, held-out) document indices, by a hash of (seed, index): stable whatever the corpus size."""
    train, held = [], []
    for i in range(n_docs):
        h = hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest()
        (held if int.from_bytes(h, "big") / 2**64 < eval_fraction else train).append(i)
    return train, held


def insert_think_blocks(ids: list[int], rate: float, block: Sequence[int], rng) -> list[int]:
    """``ids`` with ``block`` (the ids of an empty ``<think></think>``) inserted after each token with probability
    ``rate`` (``rng``: a numpy Generator). Pure given the generator; rate 0 returns ``ids`` unchanged."""
    import numpy as np

    if rate <= 0 or not ids:
        return list(ids)
    after = np.flatnonzero(rng.random(len(ids)) < rate) + 1
    if after.size == 0:
        return list(ids)
    out = np.insert(np.asarray(ids, dtype=np.int64), np.repeat(after, len(block)), np.tile(np.asarray(block), after.size))
    return out.tolist()


def pack_rows(tokenizer, texts: list[str], seq_len: int, think_rate: float = 0.0, seed: int = 0) -> torch.Tensor:
    """``[bos] doc [eos]`` for every document, concatenated and cut into rows of ``seq_len`` (the tail is dropped).

    ``think_rate`` (pretrain.think_blocks): an empty ``<think></think>`` after that share of the tokens, seeded."""
    import numpy as np

    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    block = tokenizer.encode("<think></think>", add_special_tokens=False) if think_rate > 0 else []
    if think_rate > 0 and len(block) != 2:
        raise DataError(f"pretrain.think_blocks needs <think> and </think> as single tokens of the tokenizer (they encode to {block})")
    rng = np.random.default_rng([seed, 23])
    pieces = []
    for i in range(0, len(texts), TOKENIZE_BATCH):
        enc = tokenizer(texts[i : i + TOKENIZE_BATCH], add_special_tokens=False)["input_ids"]
        enc = [insert_think_blocks(ids, think_rate, block, rng) for ids in enc] if think_rate > 0 else enc
        pieces.extend(torch.tensor(bos + ids + eos, dtype=torch.long) for ids in enc)
    stream = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
    n_rows = stream.numel() // seq_len
    return stream[: n_rows * seq_len].view(n_rows, seq_len)


# ---------------------------------------------------------------------------------------------------------------
# Model


def build_model(pcfg: PretrainConfig, tokenizer):
    """A freshly initialised LlamaForCausalLM sized by ``pcfg`` (seeded by ``pcfg.seed``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=pcfg.hidden_size,
        intermediate_size=pcfg.intermediate_size,
        num_hidden_layers=pcfg.num_layers,
        num_attention_heads=pcfg.num_heads,
        num_key_value_heads=pcfg.num_heads,
        max_position_embeddings=max(512, 4 * pcfg.seq_len),
        tie_word_embeddings=pcfg.tie_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation=pcfg.attn_implementation,
    )
    torch.manual_seed(pcfg.seed)
    return LlamaForCausalLM(config)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def evaluate_rows(model, rows: torch.Tensor, bf16: bool, batch_size: int = 16) -> dict:
    """Mean next-token loss and argmax accuracy over ``rows`` (every position predicts the next token)."""
    if rows.numel() == 0:
        return {}
    model.eval()
    device = next(model.parameters()).device
    loss_sum, correct, count = 0.0, 0, 0
    for i in range(0, len(rows), batch_size):
        x = rows[i : i + batch_size].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=x).logits.float()
        pred, target = logits[:, :-1], x[:, 1:]
        loss_sum += torch.nn.functional.cross_entropy(pred.reshape(-1, pred.size(-1)), target.reshape(-1), reduction="sum").item()
        correct += (pred.argmax(-1) == target).sum().item()
        count += target.numel()
    model.train()
    return {"eval_loss": loss_sum / count, "eval_accuracy": correct / count, "eval_tokens": count}


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(out: Path, step: int, model, optimizer, scheduler, tokens: int) -> Path:
    """Write ``checkpoints/step-NNNNNN`` into a temporary folder and rename it; then drop older checkpoints."""
    from safetensors.torch import save_model

    ckpt_root = out / CKPT_DIR
    ckpt_root.mkdir(parents=True, exist_ok=True)
    target = ckpt_root / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(target.name), dir=ckpt_root))
    try:
        save_model(model, str(tmp / "model.safetensors"))
        state = {
            "step": step,
            "tokens": tokens,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        }
        torch.save(state, tmp / "trainer_state.pt")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in ckpt_root.glob("step-*"):
        if old != target:
            shutil.rmtree(old, ignore_errors=True)
    return target


def latest_checkpoint(out: Path) -> Path | None:
    done = sorted((out / CKPT_DIR).glob("step-*")) if (out / CKPT_DIR).is_dir() else []
    return done[-1] if done else None


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    from safetensors.torch import load_model

    try:
        load_model(model, str(path / "model.safetensors"))
    except Exception as e:  # noqa: BLE001 - name the folder
        raise CheckpointError(f"cannot resume from {path}: {e} (delete it to start over)") from None
    try:
        state = safe_torch_load(path / "trainer_state.pt")
    except (FileNotFoundError, ValueError) as e:
        raise CheckpointError(f"cannot resume from {path}: {e} (delete the checkpoint to start over)") from None
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    return state


def is_complete(output_dir: str | Path) -> bool:
    return (Path(output_dir) / DONE_FILE).is_file()


# ---------------------------------------------------------------------------------------------------------------
# The stage


def _run_identity(pcfg: PretrainConfig, corpus: Path, tokenizer_dir: Path | None, text_field: str) -> dict:
    return {
        "corpus": str(corpus.resolve()),
        "corpus_digest": source_digest(corpus) if corpus.exists() else None,  # the same path with other text is another run
        "tokenizer": str(tokenizer_dir.resolve()) if tokenizer_dir else None,
        "text_field": text_field,
        "pretrain": weight_settings(pcfg),
    }


def _read_record(path: Path, remedy: str) -> dict:
    """One of the run's own JSON records (written atomically, so damaged only by hand): CheckpointError naming it."""
    record = read_json_object(path)
    if record is not None:
        return record
    raise CheckpointError(f"{path} is damaged (not the JSON record pretraining wrote); {remedy}")


def _load_or_train_tokenizer(out: Path, tokenizer_dir: Path | None, texts: list[str], vocab_size: int):
    from transformers import AutoTokenizer

    if (out / "tokenizer.json").is_file():  # a resumed run keeps the tokenizer it started with
        return AutoTokenizer.from_pretrained(str(out))
    if tokenizer_dir is not None:
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    else:
        from rmt.data.tokenizer import train_tokenizer

        log.info("training a byte-level BPE tokenizer (vocab %d) on %d documents", vocab_size, len(texts))
        tok = train_tokenizer(texts, vocab_size)
    tok.save_pretrained(str(out))
    return tok


def train_base_model(
    cfg: RMTConfig,
    corpus: str | Path,
    output_dir: str | Path,
    *,
    tokenizer_dir: str | Path | None = None,
    text_field: str | None = None,
    stop_at: int | None = None,
    progress: bool = True,
) -> dict:
    """Pretrain ``cfg.pretrain``'s model on ``corpus`` into ``output_dir``; resumes an unfinished run there.

    ``stop_at`` ends the run after that step with a checkpoint, as an interruption would (tests, time-boxed runs).
    Returns the summary also written to ``pretrain_done.json`` (or ``{"stopped_at": step}``).
    """
    from tqdm.auto import tqdm

    from rmt.modeling import pick_device

    pcfg = cfg.pretrain
    corpus, out = Path(corpus), Path(output_dir)
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir else (Path(pcfg.tokenizer) if pcfg.tokenizer else None)
    text_field = text_field or cfg.data.text_field
    identity = _run_identity(pcfg, corpus, tokenizer_dir, text_field)
    if (out / RUN_FILE).is_file():
        previous = _read_record(out / RUN_FILE, "restore it, or delete the folder to train again")
        if "corpus_digest" not in previous:  # a folder written before the corpus' contents were recorded
            identity = {k: v for k, v in identity.items() if k != "corpus_digest"}
        if previous != identity:
            settings = [{k: v for k, v in d.items() if k != "corpus_digest"} for d in (previous, identity)]
            what = "other settings" if settings[0] != settings[1] else f"other contents of {corpus}"
            raise CheckpointError(
                f"{out} holds a pretraining made with {what}; choose another pretrain.output_dir or delete it"
            )
        if is_complete(out):
            log.info("%s is already trained; nothing to do", out)
            return _read_record(out / DONE_FILE, "delete it to finish the run again from its last checkpoint")
    elif out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out} exists and is not a pretraining folder; choose another pretrain.output_dir")

    texts = read_corpus_texts(corpus, text_field, cfg.data.encoding_errors)
    out.mkdir(parents=True, exist_ok=True)
    remove_orphans(out / CKPT_DIR)  # checkpoints a kill cut short
    atomic_write_text(out / RUN_FILE, json.dumps(identity, indent=2, sort_keys=True) + "\n")
    train_idx, held_idx = split_documents(len(texts), pcfg.eval_fraction, pcfg.seed)
    tokenizer = _load_or_train_tokenizer(out, tokenizer_dir, [texts[i] for i in train_idx], pcfg.vocab_size)
    rows = pack_rows(tokenizer, [texts[i] for i in train_idx], pcfg.seq_len, pcfg.think_blocks, pcfg.seed)
    held_rows = pack_rows(tokenizer, [texts[i] for i in held_idx], pcfg.seq_len)[: pcfg.eval_rows]
    if len(held_rows) == 0 and pcfg.eval_fraction > 0 and len(rows) >= 2:
        # One long document (a single text file): hold out the tail of the stream instead.
        n_held = min(pcfg.eval_rows, max(1, int(len(rows) * pcfg.eval_fraction)))
        rows, held_rows = rows[:-n_held], rows[-n_held:]
    if len(rows) == 0:
        raise DataError(
            f"corpus {corpus} is too small: fewer than pretrain.seq_len={pcfg.seq_len} training tokens after the held-out split"
        )

    device = pick_device()
    bf16 = use_bf16(pcfg.precision, device)
    model = build_model(pcfg, tokenizer).to(device)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": pcfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=pcfg.lr,
        betas=tuple(pcfg.adam_betas),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, pcfg.warmup_steps, pcfg.steps, pcfg.min_lr_ratio)
    )
    step, tokens = 0, 0
    ckpt = latest_checkpoint(out)
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, optimizer, scheduler)
        step, tokens = state["step"], state["tokens"]
        log.info("resuming %s from step %d", out, step)
    metrics_path = out / "metrics.jsonl"
    _truncate_metrics(metrics_path, step)

    log.info(
        "pretraining %.2fM parameters on %d rows x %d tokens (%d held out), %d steps, %s",
        n_params(model) / 1e6, len(rows), pcfg.seq_len, len(held_rows), pcfg.steps, "bf16 autocast" if bf16 else "fp32",
    )
    start_time, start_tokens, loss_ema = time.perf_counter(), tokens, None
    bar = tqdm(total=pcfg.steps, initial=step, desc="pretrain", unit="step", disable=not progress, dynamic_ncols=True)
    with open(metrics_path, "a") as metrics:
        while step < pcfg.steps:
            x = rows[batch_rows(step, pcfg.batch_size, len(rows), pcfg.seed)].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = model(input_ids=x, labels=x).loss
            if not torch.isfinite(loss):
                raise CheckpointError(f"non-finite loss at step {step}; lower pretrain.lr or use pretrain.precision=fp32")
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), pcfg.grad_clip or float("inf"))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += x.numel()

            loss_v = loss.item()
            loss_ema = loss_v if loss_ema is None else 0.9 * loss_ema + 0.1 * loss_v
            tok_s = (tokens - start_tokens) / max(1e-9, time.perf_counter() - start_time)
            record = {
                "step": step,
                "loss": loss_v,
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm),
                "tokens": tokens,
                "tokens_per_s": tok_s,
            }
            if step % pcfg.eval_every == 0 or step == pcfg.steps:
                record.update(evaluate_rows(model, held_rows, bf16))
            metrics.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{loss_ema:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)
            bar.update(1)
            if step % pcfg.save_every == 0 or step == stop_at:
                metrics.flush()
                save_checkpoint(out, step, model, optimizer, scheduler, tokens)
            if step == stop_at and step < pcfg.steps:
                bar.close()
                return {"stopped_at": step}
    bar.close()

    final = evaluate_rows(model, held_rows, bf16)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(out))  # safetensors
    summary = {
        "parameters": n_params(model),
        "steps": pcfg.steps,
        "tokens": tokens,
        "train_rows": len(rows),
        "seconds_last_session": round(time.perf_counter() - start_time, 1),
        "tokens_per_s_last_session": round((tokens - start_tokens) / max(1e-9, time.perf_counter() - start_time)),
        "precision": "bf16" if bf16 else "fp32",
        "device": device.type,
        "torch_threads": torch.get_num_threads(),
        **final,
    }
    atomic_write_text(out / DONE_FILE, json.dumps(summary, indent=2) + "\n")
    if not pcfg.keep_checkpoints:
        shutil.rmtree(out / CKPT_DIR, ignore_errors=True)
    log.info("saved the base model to %s: %s", out, summary)
    return summary


def _truncate_metrics(path: Path, step: int) -> None:
    """A resumed run rewrites the steps after its checkpoint: drop their old lines."""
    if not path.is_file():
        return
    from rmt.run_dir import read_jsonl_rows  # a torn last line (a kill while appending) is dropped

    keep = [row for row in read_jsonl_rows(path, what="run log") if row.get("step", 0) <= step]
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in keep))
