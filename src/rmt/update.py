"""The optimizer side of a GRPO step, shared by mid-training (`rmt train`) and post-training (`rmt posttrain`).

Given the micro-batches of one step (NTP sequences with their mask, and/or (prompt, response) pairs with their
advantages) and the global token counts, run ``grpo.num_iterations`` optimizer steps of
``L = L_RL + lambda * L_NTP``: old and reference log-probabilities first (when needed), then per iteration a forward
and backward per micro-batch (gradients synchronised only on the last), clipping, and the optimizer step. A
non-finite loss or gradient skips the step.

Old and reference log-probabilities come from the same forward as the training one (same inputs, so the same
packed layout, and the same ``accelerator.autocast()``): at the first iteration the ratio is exactly 1 under bf16
too, not 1 up to the rounding of two different computations.

The learning-rate scheduler is not stepped here: the caller steps it once per training step (not once per
iteration, nor once per process as Accelerate's prepared scheduler would), so the learning rate at step t depends
only on t and the schedule.

When the micro-batches carry the rollout engine's log-probs, the first iteration's forward (which the loss needs
anyway) also measures how far the trainer's log-probs of the sampled tokens are from the engine's:
``logprob_gap_mean`` and ``logprob_gap_max`` (|delta| over all response tokens of all processes), the alarm for an
engine sampling from stale weights; and ``grpo.tis_cap`` weights the policy-gradient term by the capped ratio.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from rmt import losses
from rmt.forward import forward_logprobs


@dataclass
class MicroBatch:
    sequences: list[list[int]] | None = None  # corpus sequences for the NTP term (None = no NTP term)
    ntp_mask: torch.Tensor | None = None  # (B, L) bool, by target position
    pairs: list[tuple[list[int], list[int]]] | None = None  # (prompt ids, response ids) for the RL term
    advantages: torch.Tensor | None = None  # (N, 1), one per pair
    rollout_logprobs: list[list[float]] | None = None  # the engine's log-prob of every response token, per pair


def right_aligned(values: list[list[float]], device=None) -> torch.Tensor:
    """(N, R) float32 with row i's values in its last len(values[i]) columns: the layout of
    ``rmt.forward.ForwardOut.response`` (R = the longest row)."""
    width = max((len(v) for v in values), default=0)
    out = torch.zeros((len(values), width), dtype=torch.float32)
    for i, v in enumerate(values):
        if v:
            out[i, width - len(v) :] = torch.tensor(v, dtype=torch.float32)
    return out.to(device) if device is not None else out


def _global_gap(local: list[float], accelerator) -> dict:
    """Mean and max |delta| over every process's response tokens, from local (sum, max, count)."""
    stats = torch.tensor([local], dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes > 1:
        stats = accelerator.gather(stats)
    total, n = stats[:, 0].sum().item(), stats[:, 2].sum().item()
    return {"logprob_gap_mean": total / n, "logprob_gap_max": stats[:, 1].max().item()} if n else {}


def _all_finite(loss: torch.Tensor, accelerator) -> bool:
    """Finite on every process: all of them skip the step together, or none does (no hung all-reduce)."""
    ok = torch.tensor(float(torch.isfinite(loss.detach())), device=accelerator.device)
    if accelerator.num_processes > 1:
        ok = accelerator.reduce(ok, reduction="sum") / accelerator.num_processes
    return bool(ok.item() == 1.0)


def _forward(model, mb: MicroBatch, temperature: float, pad_id: int, *, read_ntp: bool = True):
    """The training forward of a micro-batch (its layout depends on the sequences and pairs, so old and reference
    log-probs use this same call, with ``read_ntp=False``)."""
    return forward_logprobs(model, mb.sequences, mb.pairs or None, temperature, pad_id, read_ntp=read_ntp)


def policy_update(cfg, micro: list[MicroBatch], norm: losses.Normalizers, model, ref_model, optimizer, accelerator,
                  *, pad_id: int, ntp_weight: float) -> dict:
    """Run the update; returns metrics (``finite`` False when the step was skipped)."""
    world, temp = accelerator.num_processes, cfg.rollout.temperature
    old_lp, ref_lp = [None] * len(micro), [None] * len(micro)
    model.train()
    if cfg.grpo.num_iterations > 1 or ref_model is not None:
        with torch.no_grad(), accelerator.autocast():
            for k, mb in enumerate(micro):
                if not mb.pairs:
                    continue
                if cfg.grpo.num_iterations > 1:
                    old_lp[k] = _forward(model, mb, temp, pad_id, read_ntp=False).response
                if ref_model is not None:
                    ref_lp[k] = _forward(ref_model, mb, temp, pad_id, read_ntp=False).response

    t0 = time.perf_counter()
    finite, grad_norm, totals = True, None, {}
    gap = [0.0, 0.0, 0.0]  # sum |delta|, max |delta|, tokens
    has_rollout_lp = any(mb.pairs and mb.rollout_logprobs is not None for mb in micro)
    for iteration in range(cfg.grpo.num_iterations):
        optimizer.zero_grad(set_to_none=True)
        totals = {}
        for k, mb in enumerate(micro):
            sync = accelerator.no_sync(model) if k < len(micro) - 1 else contextlib.nullcontext()
            with sync, accelerator.autocast():
                out = _forward(model, mb, temp, pad_id)
                rollout_lp = None
                if mb.pairs and mb.rollout_logprobs is not None:
                    rollout_lp = right_aligned(mb.rollout_logprobs, out.response.device)
                    if iteration == 0:
                        s_, m_, n_ = losses.logprob_gap(out.response, rollout_lp, out.response_mask)
                        gap = [gap[0] + s_, max(gap[1], m_), gap[2] + n_]
                terms = losses.unified_loss(
                    grpo=cfg.grpo, ntp_weight=ntp_weight,
                    logprobs=out.response, advantages=mb.advantages if mb.pairs else None,
                    response_mask=out.response_mask, old_logprobs=old_lp[k], ref_logprobs=ref_lp[k],
                    ntp_logprobs=out.ntp_logprobs, ntp_mask=mb.ntp_mask if mb.sequences else None,
                    rollout_logprobs=rollout_lp, norm=norm, world_size=world,
                )
                if not _all_finite(terms.loss, accelerator):
                    finite = False
                    break
                loss = terms.loss
                if not loss.requires_grad:
                    # Nothing to learn here (no RL pair, no NTP term): a zero loss through the model keeps every
                    # process in the same gradient all-reduce.
                    loss = 0.0 * sum(p.sum() for p in model.parameters() if p.requires_grad)
                accelerator.backward(loss)
            for key, v in terms.metrics().items():
                totals[key] = totals.get(key, 0.0) + v / (world if key == "loss" else 1)
        if finite and cfg.train.grad_clip > 0:
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            finite = bool(torch.isfinite(torch.as_tensor(grad_norm)))
        if not finite:
            optimizer.zero_grad(set_to_none=True)
            break
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    metrics = {
        "finite": finite,
        "time_train_s": time.perf_counter() - t0,
        "loss": totals.get("loss", float("nan")),
        "rl_loss": totals.get("rl", 0.0),
        "policy_loss": totals.get("policy", 0.0),
        "kl": totals.get("kl", 0.0),
        "clip_fraction": totals.get("clip_fraction", 0.0) / max(len(micro), 1),
        "ntp_tokens": totals.get("ntp_tokens", 0),
        "rl_tokens": totals.get("rl_tokens", 0),
    }
    if totals.get("ntp_tokens"):  # a method without the NTP term (RPT, rmt-no-ntp) has no NTP loss, not a loss of 0
        metrics["ntp_loss"] = totals["ntp"]
    if grad_norm is not None:
        metrics["grad_norm"] = float(grad_norm)
    if has_rollout_lp or world > 1:  # every process joins the gather, also one without responses this step
        metrics.update(_global_gap(gap, accelerator))
    return metrics
