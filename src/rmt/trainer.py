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

import contextlib
import json
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rmt import collect, flops, losses, preflight, rlp, schedules
from rmt.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    load_tensors,
    load_trainer_state,
    model_folder_problem,
    save_checkpoint,
    save_model_folder,
)
from rmt.config import RMTConfig
from rmt.errors import CheckpointError, DataError, Interrupted, ModelError, TrainingError
from rmt.run_dir import MetricsLog, check_run_dir_path, make_accelerator, open_run_dir_on_main
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
    """The learning-rate schedule over ``total`` training steps. Kept out of ``accelerator.prepare`` (whose wrapper
    steps it once per process on each call) and stepped once per training step by the step loop, so the learning
    rate at step t depends only on t, never on the number of processes or grpo.num_iterations."""
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}[cfg.train.lr_schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.train.warmup_steps, num_training_steps=total)


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds} s" if seconds < 90 else f"{seconds // 60} min {seconds % 60:02d} s"


def stop_message(step_times: list[float], elapsed: float | None) -> str:
    """What Ctrl-C is told: when the current step will end, from the mean of the last (at most 10) step times, and
    what happens then. ``elapsed``: seconds the current step has run (None between steps)."""
    after = "then a checkpoint is saved and the run stops (Ctrl-C again to stop at once, losing the steps since the last checkpoint)"
    if elapsed is None:
        return f"interrupt received: {after}"
    if not step_times:
        return (f"interrupt received: the first step has run {_duration(elapsed)} and no step has finished yet to tell how "
                f"long one takes; when it ends, {after}")
    mean = sum(step_times[-10:]) / len(step_times[-10:])
    if elapsed < mean:
        return (f"interrupt received: the current step should end in about {_duration(mean - elapsed)} (a step takes "
                f"{_duration(mean)} on average here); {after}")
    return (f"interrupt received: the current step has run {_duration(elapsed)}, longer than the {_duration(mean)} a step "
            f"takes on average here, and should end soon; {after}")


class _StopFlag:
    """Ctrl-C (SIGINT) or SIGTERM ask the loop to checkpoint and stop after the current step.

    ``signum`` is the signal that asked (None when the loop itself set ``requested``); ``check`` raises
    ``Interrupted`` for it once the checkpoint is written, so the command exits with 130 or 143. The loop keeps
    ``step_times`` and ``step_started`` so that the message says how long the current step still takes.
    """

    def __init__(self):
        self.requested = False
        self.signum: int | None = None
        self._old = {}
        self.step_times: list[float] = []
        self.step_started: float | None = None

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
        self.signum = signum
        elapsed = None if self.step_started is None else time.perf_counter() - self.step_started
        log.warning(stop_message(self.step_times, elapsed))

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def check(self, run_dir: Path, step: int, total: int) -> None:
        """After the loop: an unfinished run stopped by a signal raises ``Interrupted``."""
        if self.signum is not None and step < total:
            raise Interrupted(
                f"interrupted at step {step} of {total}; checkpoint saved in {run_dir}: run the same command to resume",
                self.signum,
            )


def check_corpus_tokenizer(cfg: RMTConfig, tokenizer) -> dict | None:
    """The tokenizer must be the one the prepared corpus was tokenized with (as `rmt score` and `rmt eval` check).

    Returns the corpus' meta.json (None for a hand-made scored corpus without one, which cannot be checked)."""
    from rmt.data.prepare import load_meta
    from rmt.modeling import tokenizer_fingerprint

    if not (Path(cfg.data.prepared_dir) / "meta.json").is_file():
        log.warning("%s has no meta.json: cannot check that the corpus was tokenized with this tokenizer", cfg.data.prepared_dir)
        return None
    meta = load_meta(cfg.data.prepared_dir)
    if tokenizer_fingerprint(tokenizer) != meta.get("tokenizer_fingerprint"):
        raise ModelError(
            f"the corpus in {cfg.data.prepared_dir} was tokenized with another tokenizer ({meta.get('tokenizer')}) than "
            "the model's: run `rmt prepare` and `rmt score` again with this model, or use its own data.prepared_dir"
        )
    return meta


def train(cfg: RMTConfig, model=None, tokenizer=None) -> Path:
    """Train according to ``cfg``; resumes from the newest checkpoint of ``output.dir``. Returns the run folder.

    Raises ``Interrupted`` (after the checkpoint) when SIGINT or SIGTERM stopped an unfinished run.
    """
    from rmt.modeling import check_model_paths

    check_run_dir_path(Path(cfg.output.dir))
    if model is None:
        check_model_paths(cfg)
    with contextlib.ExitStack() as held:  # the run folder's lock, released however the run ends
        return _train(cfg, model, tokenizer, held)


def _train(cfg: RMTConfig, model, tokenizer, held: contextlib.ExitStack) -> Path:
    from tqdm.auto import tqdm

    from rmt.embedded import resolve_model_path, resolve_tokenizer_path
    from rmt.modeling import check_context_fits, check_tokenizer_matches_model, load_model, load_tokenizer
    from rmt.scoring import load_scored

    run_dir = Path(cfg.output.dir)
    accelerator = make_accelerator(cfg, run_dir)
    rank, world = accelerator.process_index, accelerator.num_processes
    if cfg.train.sequences_per_step % (world * cfg.train.grad_accum):
        raise DataError(
            f"train.sequences_per_step={cfg.train.sequences_per_step} must be divisible by processes ({world}) x "
            f"train.grad_accum ({cfg.train.grad_accum})"
        )
    held.enter_context(open_run_dir_on_main(cfg, run_dir, accelerator))

    data = load_scored(cfg.data.prepared_dir, "train")
    if len(data) == 0:
        raise DataError(f"the training split in {cfg.data.prepared_dir} is empty")
    T = total_steps(cfg, len(data))

    if tokenizer is None:
        tokenizer = load_tokenizer(resolve_tokenizer_path(cfg), cfg.model.trust_remote_code)
    meta = check_corpus_tokenizer(cfg, tokenizer)
    if model is None:
        model = load_model(resolve_model_path(cfg), cfg, accelerator.device)
    check_tokenizer_matches_model(tokenizer, model)
    check_context_fits((meta or {}).get("data", {}).get("seq_len", cfg.data.seq_len), model)
    collect.check_markers(cfg, tokenizer)
    ref_model = None
    if cfg.train.rl and cfg.grpo.kl_beta > 0:
        ref_model = load_model(resolve_model_path(cfg), cfg, accelerator.device).eval().requires_grad_(False)

    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.train.lr, betas=cfg.train.adam_betas, weight_decay=cfg.train.weight_decay
    )
    scheduler = make_scheduler(cfg, optimizer, T)
    ema = make_ema(cfg, model, accelerator)  # the information-gain reward's no-think baseline (rmt.rlp), or None
    model, optimizer = accelerator.prepare(model, optimizer)

    start_step, flops_total = 0, 0.0
    checkpoints = list_checkpoints(run_dir)
    if checkpoints:
        state = load_checkpoint(checkpoints[-1], accelerator.unwrap_model(model), optimizer, scheduler)
        start_step, flops_total = state["step"], state.get("flops_total", 0.0)
        if ema is not None:
            ema.load_tensors(load_tensors(checkpoints[-1], EMA_FILE))
        log.info("resuming from %s (step %d of %d)", checkpoints[-1], start_step, T)
    if start_step >= T:
        problem = model_folder_problem(run_dir / "final")
        if problem is None:
            log.info("run %s already finished (%d of %d steps); nothing to do", run_dir, start_step, T)
        else:
            log.warning("%s: %s; writing it again from %s", run_dir / "final", problem, checkpoints[-1])
            save_final(model, tokenizer, accelerator, run_dir / "final")
        return run_dir

    metrics_log = MetricsLog(run_dir, accelerator, enabled=accelerator.is_main_process)
    metrics_log.truncate_after(start_step)
    if cfg.train.tracker != "none":
        accelerator.init_trackers(run_dir.name, config=_flat(cfg.model_dump(mode="json")))
    engine = collect.make_engine(cfg, model, tokenizer) if cfg.train.rl else None
    if "auto" in (cfg.budget.b0, cfg.budget.b_min) and not (cfg.train.rl and cfg.budget.enabled):
        # nothing reads the budget without RL or without a budget (ntp, rpt, rlp): numbers stand in, unmeasured
        b_min = 1 if cfg.budget.b_min == "auto" else cfg.budget.b_min
        b0 = b_min if cfg.budget.b0 == "auto" else cfg.budget.b0
        cfg = cfg.model_copy(update={"budget": cfg.budget.model_copy(update={"b0": b0, "b_min": b_min})})
    elif "auto" in (cfg.budget.b0, cfg.budget.b_min):
        cfg = resolve_auto_budget(cfg, run_dir, data, engine, tokenizer, model, accelerator)
    # Before the first RL step: can the model reason in the configured template? (stops the run when it cannot)
    if start_step == 0:
        checked = preflight.check_train(cfg, run_dir, data, engine, tokenizer, model, schedules.budget_at(0, T, cfg.budget), accelerator)
    else:
        checked = preflight.read_record(run_dir)
    preflight_metrics = preflight.metrics_of(checked)  # recorded in the first metrics row written

    nonfinite_in_a_row = 0
    bar = tqdm(total=T, initial=start_step, desc=f"train {cfg.preset}", disable=not accelerator.is_main_process)
    step = start_step
    with _StopFlag() as stop:
        while step < T and not stop.requested:
            t0 = stop.step_started = time.perf_counter()
            rows = batch_indices(step, cfg.train.sequences_per_step, len(data), cfg.train.seed)
            global_tiers = data.select(rows.tolist())["tier"] if cfg.train.rl else None
            picked = data.select(rows[rank::world].tolist())
            batch = Batch(picked["input_ids"], picked["tier"], picked["computed"])
            metrics, samples = train_step(
                cfg, step, T, batch, global_tiers, model, ref_model, tokenizer, engine, optimizer, scheduler, accelerator,
                ema=ema,
            )
            if engine is not None:
                engine.sync_weights(model)  # once per step, after the update: the next rollouts see the new weights
            metrics = reduce_metrics(metrics, accelerator)
            metrics["time_step_s"] = time.perf_counter() - t0
            stop.step_times.append(metrics["time_step_s"])
            flops_total += metrics.get("flops", 0.0)
            metrics["flops_total"] = flops_total
            if not metrics.pop("finite"):
                nonfinite_in_a_row += 1
                log.warning("step %d: non-finite loss or gradient, step skipped (%d in a row)", step, nonfinite_in_a_row)
                if nonfinite_in_a_row >= cfg.train.max_nonfinite:
                    raise TrainingError(
                        f"{nonfinite_in_a_row} consecutive non-finite steps at step {step} (train.max_nonfinite); "
                        "lower train.lr or check the data; the last checkpoint is kept"
                    )
            else:
                nonfinite_in_a_row = 0
            scheduler.step()  # once per training step, skipped or not
            step += 1
            if step % cfg.train.log_every == 0 or step == T:
                metrics_log.log(step, {**metrics, **preflight_metrics})
                preflight_metrics = {}
            if step % cfg.train.sample_every == 0:
                metrics_log.samples(step, samples)
            bar.update(1)
            bar.set_postfix({k: f"{metrics[k]:.3g}" for k in ("loss", "reward", "budget", "ntp_loss") if k in metrics})
            if step % cfg.train.save_every == 0 or step == T or stop.requested:
                _save(cfg, run_dir, step, model, tokenizer, optimizer, scheduler, accelerator, {"flops_total": flops_total},
                      tensors={EMA_FILE: ema.tensors()} if ema is not None else None)
    bar.close()
    if step >= T:
        save_final(model, tokenizer, accelerator, run_dir / "final")
        log.info("finished: model saved to %s", run_dir / "final")
    accelerator.end_training()
    stop.check(run_dir, step, T)
    return run_dir


# Per-process metrics that add up to the step's value (loss terms are contributions under global normalisers).
SUM_KEYS = ("loss", "ntp_loss", "rl_loss", "policy_loss", "kl", "ntp_tokens", "rl_tokens", "rl_positions", "flops",
            "tier_easy", "tier_medium", "tier_hard", "prompts_truncated", "generated_tokens", "informative_groups",
            "filter_drawn", "filter_dropped", "filter_kept", "drawn_easy", "drawn_medium", "drawn_hard")
# Per-process means, averaged over the processes that have them.
MEAN_KEYS = ("reward", "reward_match", "reward_length", "rollout_accuracy", "think_len_mean", "think_len_p90",
             "response_len_mean", "malformed_frac", "truncated_frac", "mixed_groups_frac", "clip_fraction",
             "rollout_accuracy_computed", "rollout_accuracy_random", "logp_think_mean", "logp_base_mean", "filter_rounds")


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


def _save(cfg, run_dir, step, model, tokenizer, optimizer, scheduler, accelerator, extra_state: dict | None = None,
          tensors: dict | None = None) -> None:
    """Checkpoint from the main process; the full weights are gathered on every process first (FSDP shards them).
    ``tensors``: more safetensors files of the checkpoint (name -> tensors), e.g. the EMA model."""
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        save_checkpoint(
            run_dir, step, accelerator.unwrap_model(model), tokenizer, optimizer, scheduler,
            {"preset": cfg.preset, **(extra_state or {})}, cfg.train.keep_last, state_dict=state_dict, tensors=tensors,
        )
    accelerator.wait_for_everyone()


def save_final(model, tokenizer, accelerator, folder: Path) -> None:
    """The finished model in Hugging Face format (safetensors), written atomically by the main process."""
    accelerator.wait_for_everyone()  # every process has decided to write it before the old one is replaced
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        save_model_folder(folder, accelerator.unwrap_model(model), tokenizer, state_dict=state_dict)
    accelerator.wait_for_everyone()


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, int | float | str | bool) else str(v)
    return out


EMA_FILE = "ema"  # checkpoint file ema.safetensors: the EMA model of reward.kind=information_gain


def make_ema(cfg: RMTConfig, model, accelerator) -> rlp.EMAModel | None:
    """The EMA copy of the model that the information-gain reward compares with (starts as the model itself; made
    before ``accelerator.prepare`` wraps the model)."""
    if not (cfg.train.rl and cfg.reward.kind == "information_gain"):
        return None
    if "FSDP" in str(accelerator.distributed_type):
        raise TrainingError("reward.kind=information_gain keeps a full EMA copy of the model: not supported with FSDP (use DDP)")
    return rlp.EMAModel(model)


def make_scorer(cfg: RMTConfig, model, ema, tokenizer, accelerator):
    """The information-gain reward's two passes bound to this step's models (None for match rewards)."""
    if ema is None:
        return None
    import functools

    return functools.partial(
        rlp.information_gain_rewards, model, ema,
        close_id=tokenizer.encode(cfg.prompt.think_close, add_special_tokens=False)[0],
        eos_ids=() if tokenizer.eos_token_id is None else (tokenizer.eos_token_id,),
        pad_id=tokenizer.pad_token_id or 0, train_answer=cfg.reward.train_answer, autocast=accelerator.autocast,
    )


def train_step(cfg, step, T, batch, global_tiers, model, ref_model, tokenizer, engine, optimizer, scheduler, accelerator,
               ema=None):
    """One optimizer step (mu of them on the same rollouts when grpo.num_iterations > 1). ``ema``: the EMA model of
    the information-gain reward, moved towards the model after the update.

    Returns (metrics, sample completions); metrics["finite"] is False when the step was skipped.
    """
    rank, world = accelerator.process_index, accelerator.num_processes
    budget = schedules.budget_at(step, T, cfg.budget)
    probs = schedules.tier_probs_at(step, T, cfg.curriculum)
    # Only what the method has: no budget without a budget (rpt) or without RL (ntp), no tier mix without RL.
    metrics = {"lr": scheduler.get_last_lr()[0]}
    if cfg.train.rl:
        metrics.update(p_easy=probs[0], p_medium=probs[1], p_hard=probs[2])
        if cfg.budget.enabled:
            metrics["budget"] = budget

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
            max_context=collect.context_length(model), scorer=make_scorer(cfg, model, ema, tokenizer, accelerator),
            probs=probs, extra_generator=step_generator(cfg.train.seed, step, rank, 2),
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
            advantages=advantage_tensor([(r, a) for _, _, r, a, _ in responses], accelerator.device),
            rollout_logprobs=[lp for *_, lp in responses],
        ))
    metrics.update(policy_update(
        cfg, micro, norm, model, ref_model, optimizer, accelerator,
        pad_id=tokenizer.pad_token_id or 0, ntp_weight=cfg.ntp.weight,
    ))
    if ema is not None and metrics["finite"]:
        ema.update(model, cfg.reward.ema_tau)
    n_tokens = sum(len(s) for s in batch.input_ids) + (rl.num_response_tokens if rl else 0)
    metrics["train_tokens_per_s"] = n_tokens * cfg.grpo.num_iterations / max(metrics["time_train_s"], 1e-9)
    metrics["flops"] = count_flops(cfg, model, batch, rl, use_ntp, ref_model is not None)
    if torch.cuda.is_available():
        metrics["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return metrics, (rl.samples if rl else [])


def advantage_tensor(responses: list[tuple[list[int], float | list[float]]], device) -> torch.Tensor:
    """From (response ids, advantage) pairs: (N, 1) with one advantage per response, or (N, R) right-aligned (the
    layout of the log-probs) when some response has one per token (``collect.RLData.flat``)."""
    if not any(isinstance(a, list) for _, a in responses):
        return torch.tensor([a for _, a in responses], dtype=torch.float32, device=device)[:, None]
    from rmt.update import right_aligned

    return right_aligned([a if isinstance(a, list) else [a] * len(r) for r, a in responses], device)


AUTO_B0_FILE = "budget_b0.json"


def resolve_auto_budget(cfg: RMTConfig, run_dir: Path, data, engine, tokenizer, model, accelerator) -> RMTConfig:
    """budget.b0=auto and/or budget.b_min=auto: measure the model's thinking lengths before the first step
    (``collect.measure_think_lengths``), take B_min (``schedules.auto_b_min``) and B_0 (``schedules.auto_b0``) from
    them, write both to ``budget_b0.json`` in the run folder, and return the config with them. A resumed run reads the
    file, so it keeps the budget it started with. A measured floor above a fixed B_0 is lowered to B_0."""
    from rmt.fileio import atomic_write_text

    path = run_dir / AUTO_B0_FILE
    budget = cfg.budget
    if accelerator.is_main_process and not path.is_file():
        if engine is None:
            raise CheckpointError("budget.b0=auto and budget.b_min=auto need the RL term (train.rl=true) to measure thinking lengths")
        lengths = collect.measure_think_lengths(cfg, engine, tokenizer, data, max_context=collect.context_length(model))
        b_min = schedules.auto_b_min(lengths, budget.auto_quantile) if budget.b_min == "auto" else budget.b_min
        if budget.b0 != "auto" and b_min > budget.b0:
            log.warning("budget.b_min=auto measured %d, above budget.b0=%d; the floor is B_0", b_min, budget.b0)
            b_min = budget.b0
        b0 = schedules.auto_b0(lengths, budget.auto_quantile, b_min) if budget.b0 == "auto" else budget.b0
        record = {"b0": b0, "b_min": b_min, "quantile": budget.auto_quantile, "measured": len(lengths),
                  "thinking": sum(n > 0 for n in lengths), "mean": float(np.mean(lengths)) if lengths else None}
        atomic_write_text(path, json.dumps(record, indent=2) + "\n")
        log.info("budget measured on the model: B_0 = %d, B_min = %d (%s)", b0, b_min, record)
    accelerator.wait_for_everyone()
    try:
        record = json.loads(path.read_text())
        # a file written before b_min could be measured holds only b0; its run's floor was a number
        resolved = {"b0": int(record["b0"]), "b_min": record.get("b_min", budget.b_min)}
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is not a measured budget ({type(e).__name__}: {e}); delete it to measure again") from None
    if resolved["b_min"] == "auto":
        raise CheckpointError(f"{path} holds no measured b_min; it was written by a run with a fixed budget.b_min")
    return cfg.model_copy(update={"budget": budget.model_copy(update=resolved)})


def count_flops(cfg, model, batch, rl, use_ntp: bool, with_ref: bool) -> float:
    """This process's FLOPs of the step (rmt.flops): training forward and backward, extra forwards, generation."""
    shape = flops.ModelShape.of(model)
    pairs = [(len(p), len(r)) for _, p, r, *_ in rl.flat()] if rl is not None else []
    distinct = {tuple(g.prompt_ids) for g in rl.groups} if rl is not None else set()
    trunks = [len(s) for s in batch.input_ids] if use_ntp else [len(p) for p in distinct]
    extra = int(cfg.grpo.num_iterations > 1) + int(with_ref)
    reward_passes = 0.0
    if rl is not None and cfg.reward.kind == "information_gain":
        # The reward's passes without gradient: the policy over each prompt and its thoughts (one more forward over
        # the responses), the EMA model over each sequence up to its last RL position.
        extra += 1
        ends = {}
        for b, pos in rl.selection.positions:
            ends[b] = max(ends.get(b, 0), pos + 1)
        reward_passes = sum(flops.sequence_forward_flops(shape, n) for n in [len(p) for p in distinct] + list(ends.values()))
    return reward_passes + flops.step_flops(
        shape, trunks, [pr for pr in pairs if pr[1]], [len(p) for p in distinct], rl.generated if rl is not None else [],
        extra_forwards=extra if pairs else 0, iterations=cfg.grpo.num_iterations,
    )["total"]


def load_run_state(run_dir: Path) -> dict:
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        raise CheckpointError(f"no checkpoint in {run_dir}")
    return load_trainer_state(ckpts[-1])
