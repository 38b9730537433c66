"""`rmt train`: the RMT step loop (SPEC section 2, step 4), and the baselines as presets of the same loop.

One step, top to bottom:
  sequences of this step -> B_t and p_t -> RL set C and NTP mask -> prompts for C -> G rollouts per position
  -> parse, reward (match + length) -> group advantages -> policy loss on response tokens + lambda * NTP loss
  -> optimizer step -> metrics.
T is the number of optimizer steps. A step consumes ``train.sequences_per_step`` corpus sequences (over all
processes); every RL position of those sequences gets ``rollout.group_size`` responses.

All randomness of a step (which positions, which samples) is drawn from generators seeded by
(train.seed, step, process), and the data order by (train.seed, epoch): a run resumed from a checkpoint
draws exactly what the uninterrupted run would have drawn.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rmt import collect, losses, schedules
from rmt.checkpoint import list_checkpoints, load_checkpoint, load_trainer_state, save_checkpoint
from rmt.config import RMTConfig
from rmt.errors import CheckpointError, DataError
from rmt.run_dir import MetricsLog, make_accelerator, open_run_dir_on_main
from rmt.update import MicroBatch, policy_update

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """The corpus sequences one process trains on in one step."""

    input_ids: list[list[int]]
    tiers: list[list[int]]
    computed: list[list[int]] = field(default_factory=list)


def total_steps(cfg: RMTConfig, n_sequences: int) -> int:
    """T: train.total_steps, or enough steps for train.epochs passes over the training split."""
    if cfg.train.total_steps is not None:
        return cfg.train.total_steps
    return max(1, math.ceil(cfg.train.epochs * n_sequences / cfg.train.sequences_per_step))


def batch_indices(step: int, per_step: int, n: int, seed: int) -> np.ndarray:
    """Row indices of step ``step``: a seeded permutation per epoch, read as one endless stream."""
    start = step * per_step
    out = []
    while len(out) < per_step:
        epoch, offset = divmod(start + len(out), n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        out.extend(perm[offset : offset + per_step - len(out)].tolist())
    return np.asarray(out)


def step_generator(seed: int, step: int, rank: int, stream: int) -> torch.Generator:
    """A generator for one purpose (stream) of one step on one process: exact under resume."""
    g = torch.Generator()
    g.manual_seed(int(np.random.SeedSequence([seed, step, rank, stream]).generate_state(1)[0]))
    return g


def make_scheduler(cfg: RMTConfig, optimizer, total: int):
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}[cfg.train.lr_schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.train.warmup_steps, num_training_steps=total)


class _StopFlag:
    """Ctrl-C (SIGINT) or SIGTERM ask the loop to checkpoint and stop after the current step."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass
        return self

    def _handler(self, signum, frame):
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True
        log.warning("interrupt received: saving a checkpoint after this step (Ctrl-C again to abort)")

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def train(cfg: RMTConfig, model=None, tokenizer=None) -> Path:
    """Train according to ``cfg``; resumes from the newest checkpoint of ``output.dir``. Returns the run folder."""
    from tqdm.auto import tqdm

    from rmt.embedded import resolve_model_path, resolve_tokenizer_path
    from rmt.modeling import check_tokenizer_matches_model, load_model, load_tokenizer
    from rmt.scoring import load_scored

    run_dir = Path(cfg.output.dir)
    accelerator = make_accelerator(cfg, run_dir)
    rank, world = accelerator.process_index, accelerator.num_processes
    if cfg.train.sequences_per_step % (world * cfg.train.grad_accum):
        raise DataError(
            f"train.sequences_per_step={cfg.train.sequences_per_step} must be divisible by processes ({world}) x "
            f"train.grad_accum ({cfg.train.grad_accum})"
        )
    open_run_dir_on_main(cfg, run_dir, accelerator)

    data = load_scored(cfg.data.prepared_dir, "train")
    if len(data) == 0:
        raise DataError(f"the training split in {cfg.data.prepared_dir} is empty")
    T = total_steps(cfg, len(data))

    if tokenizer is None:
        tokenizer = load_tokenizer(resolve_tokenizer_path(cfg), cfg.model.trust_remote_code)
    if model is None:
        model = load_model(resolve_model_path(cfg), cfg, accelerator.device)
    check_tokenizer_matches_model(tokenizer, model)
    collect.check_markers(cfg, tokenizer)
    ref_model = None
    if cfg.train.rl and cfg.grpo.kl_beta > 0:
        ref_model = load_model(resolve_model_path(cfg), cfg, accelerator.device).eval().requires_grad_(False)

    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.train.lr, betas=cfg.train.adam_betas, weight_decay=cfg.train.weight_decay
    )
    scheduler = make_scheduler(cfg, optimizer, T)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    start_step = 0
    checkpoints = list_checkpoints(run_dir)
    if checkpoints:
        state = load_checkpoint(checkpoints[-1], accelerator.unwrap_model(model), optimizer, scheduler)
        start_step = state["step"]
        log.info("resuming from %s (step %d of %d)", checkpoints[-1], start_step, T)
    if start_step >= T:
        log.info("run %s already finished (%d of %d steps); nothing to do", run_dir, start_step, T)
        return run_dir

    metrics_log = MetricsLog(run_dir, accelerator, enabled=accelerator.is_main_process)
    metrics_log.truncate_after(start_step)
    if cfg.train.tracker != "none":
        accelerator.init_trackers(run_dir.name, config=_flat(cfg.model_dump(mode="json")))
    engine = collect.make_engine(cfg, model, tokenizer) if cfg.train.rl else None

    nonfinite_in_a_row = 0
    bar = tqdm(total=T, initial=start_step, desc=f"train {cfg.preset}", disable=not accelerator.is_main_process)
    step = start_step
    with _StopFlag() as stop:
        while step < T and not stop.requested:
            t0 = time.perf_counter()
            rows = batch_indices(step, cfg.train.sequences_per_step, len(data), cfg.train.seed)
            global_tiers = data.select(rows.tolist())["tier"] if cfg.train.rl else None
            picked = data.select(rows[rank::world].tolist())
            batch = Batch(picked["input_ids"], picked["tier"], picked["computed"])
            metrics, samples = train_step(
                cfg, step, T, batch, global_tiers, model, ref_model, tokenizer, engine, optimizer, scheduler, accelerator
            )
            if engine is not None:
                engine.sync_weights(model)  # once per step, after the update: the next rollouts see the new weights
            metrics = reduce_metrics(metrics, accelerator)
            metrics["time_step_s"] = time.perf_counter() - t0
            if not metrics.pop("finite"):
                nonfinite_in_a_row += 1
                log.warning("step %d: non-finite loss or gradient, step skipped (%d in a row)", step, nonfinite_in_a_row)
                if nonfinite_in_a_row >= cfg.train.max_nonfinite:
                    raise FloatingPointError(
                        f"{nonfinite_in_a_row} consecutive non-finite steps (train.max_nonfinite); "
                        "lower train.lr or check the data"
                    )
            else:
                nonfinite_in_a_row = 0
            step += 1
            if step % cfg.train.log_every == 0 or step == T:
                metrics_log.log(step, metrics)
            if step % cfg.train.sample_every == 0:
                metrics_log.samples(step, samples)
            bar.update(1)
            bar.set_postfix({k: f"{metrics[k]:.3g}" for k in ("loss", "reward", "budget", "ntp_loss") if k in metrics})
            if step % cfg.train.save_every == 0 or step == T or stop.requested:
                _save(cfg, run_dir, step, model, tokenizer, optimizer, scheduler, accelerator)
    bar.close()
    if step >= T:
        save_final(model, tokenizer, accelerator, run_dir / "final")
        log.info("finished: model saved to %s", run_dir / "final")
    accelerator.end_training()
    return run_dir


# Per-process metrics that add up to the step's value (loss terms are contributions under global normalisers).
SUM_KEYS = ("loss", "ntp_loss", "rl_loss", "policy_loss", "kl", "ntp_tokens", "rl_tokens", "rl_positions",
            "tier_easy", "tier_medium", "tier_hard", "prompts_truncated")
# Per-process means, averaged over the processes that have them.
MEAN_KEYS = ("reward", "reward_match", "reward_length", "rollout_accuracy", "think_len_mean", "think_len_p90",
             "response_len_mean", "malformed_frac", "truncated_frac", "mixed_groups_frac", "clip_fraction",
             "rollout_accuracy_computed", "rollout_accuracy_random")


def reduce_metrics(metrics: dict, accelerator) -> dict:
    """Combine the metrics of all processes (a no-op with one): sums for contributions, means for averages."""
    if accelerator.num_processes == 1:
        return metrics
    keys = SUM_KEYS + MEAN_KEYS
    values = torch.tensor([[float(metrics.get(k, 0.0)), float(k in metrics)] for k in keys], device=accelerator.device)
    values = accelerator.reduce(values, reduction="sum").cpu()
    out = dict(metrics)
    for i, k in enumerate(keys):
        total, present = values[i].tolist()
        if present:
            out[k] = total if k in SUM_KEYS else total / present
    if out.get("rl_positions"):
        for tier in ("easy", "medium", "hard"):
            out[f"frac_{tier}"] = out.get(f"tier_{tier}", 0) / out["rl_positions"]
    return out


def _save(cfg, run_dir, step, model, tokenizer, optimizer, scheduler, accelerator) -> None:
    """Checkpoint from the main process; the full weights are gathered on every process first (FSDP shards them)."""
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        save_checkpoint(
            run_dir, step, accelerator.unwrap_model(model), tokenizer, optimizer, scheduler,
            {"preset": cfg.preset}, cfg.train.keep_last, state_dict=state_dict,
        )
    accelerator.wait_for_everyone()


def save_final(model, tokenizer, accelerator, folder: Path) -> None:
    """The finished model in Hugging Face format (safetensors), written by the main process."""
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(str(folder), safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(str(folder))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, int | float | str | bool) else str(v)
    return out


def train_step(cfg, step, T, batch, global_tiers, model, ref_model, tokenizer, engine, optimizer, scheduler, accelerator):
    """One optimizer step (mu of them on the same rollouts when grpo.num_iterations > 1).

    Returns (metrics, sample completions); metrics["finite"] is False when the step was skipped.
    """
    rank, world = accelerator.process_index, accelerator.num_processes
    budget = schedules.budget_at(step, T, cfg.budget)
    probs = schedules.tier_probs_at(step, T, cfg.curriculum)
    metrics = {"budget": budget, "lr": scheduler.get_last_lr()[0], "p_easy": probs[0], "p_medium": probs[1], "p_hard": probs[2]}

    rl = None
    if cfg.train.rl:
        t0 = time.perf_counter()
        selection = collect.select_positions(
            cfg, global_tiers, probs, step_generator(cfg.train.seed, step, 0, 0), rank, world
        )
        # An engine with per-prompt seeds draws a position's samples from its global index (collect.position_seeds),
        # so every process gets the same generator and the draws do not depend on the number of processes.
        rl = collect.collect(
            cfg, batch, budget, selection, engine, tokenizer,
            sample_generator=step_generator(cfg.train.seed, step, 0 if engine.seeds_per_prompt else rank, 1),
            max_context=collect.context_length(model),
        )
        metrics.update(rl.metrics)
        metrics["time_rollout_s"] = time.perf_counter() - t0
    use_ntp = cfg.ntp.weight > 0
    ntp_mask = rl.ntp_mask if rl is not None else collect.full_ntp_mask(batch.input_ids)

    # Global counts: each loss term is normalised by its own count over all processes and micro-batches.
    counts = torch.tensor(
        [float(ntp_mask.sum()) if use_ntp else 0.0, float(rl.num_response_tokens if rl else 0), float(rl.num_responses if rl else 0)],
        device=accelerator.device,
    )
    counts = accelerator.reduce(counts, reduction="sum")
    norm = losses.Normalizers(
        ntp_tokens=counts[0].item() or None, rl_tokens=counts[1].item() or None, rl_sequences=counts[2].item() or None,
        rl_horizon=rl.metrics.get("response_cap") if rl else None,
    )
    if counts.sum().item() == 0:
        metrics.update(finite=True, skipped_empty=1, loss=0.0)
        return metrics, []

    micro = []
    for seqs in np.array_split(np.arange(len(batch.input_ids)), cfg.train.grad_accum):
        seqs = seqs.tolist()
        responses = rl.flat(set(seqs)) if rl is not None else []
        width = max(len(batch.input_ids[i]) for i in seqs)
        micro.append(MicroBatch(
            sequences=[batch.input_ids[i] for i in seqs] if use_ntp else None,
            ntp_mask=torch.as_tensor(ntp_mask[seqs][:, :width], device=accelerator.device),
            pairs=[(p, r) for _, p, r, _, _ in responses],
            advantages=torch.tensor([a for _, _, _, a, _ in responses], dtype=torch.float32, device=accelerator.device)[:, None],
            rollout_logprobs=[lp for *_, lp in responses],
        ))
    metrics.update(policy_update(
        cfg, micro, norm, model, ref_model, optimizer, scheduler, accelerator,
        pad_id=tokenizer.pad_token_id or 0, ntp_weight=cfg.ntp.weight,
    ))
    n_tokens = sum(len(s) for s in batch.input_ids) + (rl.num_response_tokens if rl else 0)
    metrics["train_tokens_per_s"] = n_tokens * cfg.grpo.num_iterations / max(metrics["time_train_s"], 1e-9)
    if torch.cuda.is_available():
        metrics["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return metrics, (rl.samples if rl else [])


def load_run_state(run_dir: Path) -> dict:
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        raise CheckpointError(f"no checkpoint in {run_dir}")
    return load_trainer_state(ckpts[-1])
