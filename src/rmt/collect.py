"""The RL side of one training step: RL set C -> prompts -> G rollouts each -> parsed, rewarded, advantages.

The engines that generate live in ``rmt.rollout``; the log-probabilities for the loss in ``rmt.forward``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from rmt import losses, prompts, rewards, sampling, schedules
from rmt.config import RMTConfig
from rmt.errors import ModelError
from rmt.rollout import Group, Response, RolloutEngine, StopRule, make_engine as _make_engine
from rmt.tiers import TIER_NAMES

PREFIX_CONTINUATION = 16  # true next tokens given to the prefix-matching reward


def check_markers(cfg: RMTConfig, tokenizer) -> None:
    """The thinking markers must be single tokens: the stop rule and the length count depend on it."""
    if not cfg.train.rl:
        return
    for marker in (cfg.prompt.think_open, cfg.prompt.think_close):
        ids = tokenizer.encode(marker, add_special_tokens=False)
        if len(ids) != 1:
            raise ModelError(
                f"the tokenizer has no single token for {marker!r} (it encodes to {len(ids)} tokens); "
                "add it (tokenizer.add_tokens and model.resize_token_embeddings) or set prompt.think_open/think_close"
            )
    if cfg.prompt.style == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ModelError("prompt.style=chat needs a tokenizer with a chat template; use prompt.style=raw for base models")


def reads_first_token(cfg: RMTConfig) -> bool:
    return cfg.prompt.style == "raw" and cfg.prompt.raw_answer == "first_token"


def stop_rule(cfg: RMTConfig, tokenizer, restatement: int = 0) -> StopRule:
    """Raw first-token answers stop one token after </think> (plus ``restatement`` tokens, room to restate the part
    of the current value already written); other rules run to EOS (or the cap)."""
    after = 1 + restatement if reads_first_token(cfg) else None
    return StopRule.from_tokenizer(tokenizer, cfg.prompt.think_close, after_close=after)


def make_engine(cfg: RMTConfig, model, tokenizer) -> RolloutEngine:
    unwrapped = model.module if hasattr(model, "module") else model
    return _make_engine(cfg.rollout, unwrapped, pad_id=tokenizer.pad_token_id or 0)


def context_length(model) -> int:
    config = (model.module if hasattr(model, "module") else model).config
    return int(getattr(config, "max_position_embeddings", 0) or 1 << 30)


def full_ntp_mask(sequences: list[list[int]]) -> np.ndarray:
    """NTP on every target position (pos >= 1) of every sequence: the mask of the `ntp` preset."""
    width = max(len(s) for s in sequences)
    mask = np.zeros((len(sequences), width), dtype=bool)
    for i, s in enumerate(sequences):
        mask[i, 1 : len(s)] = True
    return mask


@dataclass
class RLData:
    """Everything the loss needs from the rollouts of one step, plus metrics and a few samples."""

    selection: sampling.RLSelection
    groups: list[Group]  # one per position of C, same order
    rewards: torch.Tensor  # (|C|, G)
    advantages: torch.Tensor  # (|C|, G)
    generated: list[tuple[int, int]] = field(default_factory=list)  # (prompt length, tokens generated) per response
    metrics: dict = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)

    @property
    def ntp_mask(self) -> np.ndarray:
        return self.selection.ntp_mask

    @property
    def num_responses(self) -> int:
        return sum(1 for g in self.groups for r in g.responses if r.token_ids)

    @property
    def num_response_tokens(self) -> int:
        return sum(len(r.token_ids) for g in self.groups for r in g.responses)

    def flat(self, seq_subset: set[int] | None = None):
        """(sequence index, prompt ids, response ids, advantage, rollout log-probs) of every response, optionally for
        some sequences."""
        out = []
        for (b, _pos), group, adv in zip(self.selection.positions, self.groups, self.advantages):
            if seq_subset is not None and b not in seq_subset:
                continue
            for r, a in zip(group.responses, adv.tolist()):
                out.append((b, group.prompt_ids, r.token_ids, a, r.logprobs))
        return out


def build_prompts(cfg: RMTConfig, tokenizer, sequences, positions, budget, cap: int, max_context: int):
    """Prompt ids for each RL position; a prefix too long for the context is cut from the left (counted)."""
    out, cut = [], 0
    for b, pos in positions:
        prefix = sequences[b][:pos]
        ids = prompts.build_prompt_ids(prefix, tokenizer, cfg.prompt, budget)
        overflow = len(ids) + cap - max_context
        if overflow > 0:
            cut += 1
            ids = prompts.build_prompt_ids(prefix[overflow:], tokenizer, cfg.prompt, budget)
        out.append(ids)
    return out, cut


def select_positions(cfg: RMTConfig, global_tiers, probs, generator, rank: int = 0, world: int = 1) -> sampling.RLSelection:
    """Draw C over the GLOBAL batch (same draw on every process), then keep this process's sequences.

    Process r trains on global rows r, r + world, ...: its local row i is global row r + i * world. Drawing
    globally keeps C, and so the run, independent of the number of processes.
    """
    full = sampling.sample_rl_set(
        global_tiers, probs, generator,
        positions_per_sequence=cfg.curriculum.positions_per_sequence, max_positions=cfg.curriculum.max_positions_per_batch,
    )
    if world == 1:
        return full
    keep = [i for i, (b, _) in enumerate(full.positions) if b % world == rank]
    mask = full.ntp_mask[rank::world]
    width = max(len(t) for t in global_tiers[rank::world])
    return sampling.RLSelection(
        positions=[(full.positions[i][0] // world, full.positions[i][1]) for i in keep],
        tiers=[full.tiers[i] for i in keep],
        ntp_mask=mask[:, :width],
        draw_index=keep,
    )


@dataclass
class Rollouts:
    """The responses at a list of positions, read by the answer rule: training and evaluation share it."""

    groups: list[Group]  # one per position; a first-token response is cut right after the token that was read
    parsed: list[list[prompts.ParsedResponse]]  # per position, per response
    truths: list[rewards.Truth]  # per position: the true next tokens
    cap: int  # the generation cap: 2*B + answer allowance (or the evaluation's cap)
    restatement_room: int  # tokens added to the cap and the stop rule to restate the written part of a value
    prompts_cut: int  # prompts whose prefix was cut from the left to fit the context
    generated: list[tuple[int, int]]  # (prompt length, tokens generated) of every response, before any cut


def written_part(cfg: RMTConfig, prefix: list[int], decode) -> list[int]:
    """The part of the current value already written (``prompts.current_value_ids``) when the answer rule skips its
    restatement; empty otherwise."""
    if not (reads_first_token(cfg) and cfg.prompt.skip_restatement):
        return []
    return prompts.current_value_ids(prefix[-16:], decode)


def roll_out(cfg: RMTConfig, engine: RolloutEngine, tokenizer, sequences, positions, prompt_budget: int | None, cap: int, *,
             group_size: int, temperature: float, generator=None, seeds: list[int] | None = None, batch_size: int,
             max_context: int = 1 << 30) -> Rollouts:
    """Prompt at each (row, pos) of ``positions``, generate ``group_size`` responses (``batch_size`` prompts per
    engine call; all at once for an engine that batches continuously), and read each with the answer rule. ``cap``:
    2*B + answer allowance; the restatement room (the longest written part) is added to it and to the stop rule.
    Sampling is seeded by ``generator``, or per position by ``seeds`` (engines with ``seeds_per_prompt``)."""
    decode = lambda ids: tokenizer.decode(ids, clean_up_tokenization_spaces=False)  # noqa: E731
    written = [written_part(cfg, list(sequences[b][:pos]), decode) for b, pos in positions]
    extra = max((len(w) for w in written), default=0)
    prompt_ids, n_cut = build_prompts(cfg, tokenizer, sequences, positions, prompt_budget, cap + extra, max_context)
    stop = stop_rule(cfg, tokenizer, extra)
    groups: list[Group] = []
    step = max(1, len(prompt_ids)) if engine.continuous_batching else batch_size
    for i in range(0, len(prompt_ids), step):
        groups += engine.generate_groups(
            prompt_ids[i : i + step], group_size, cap + extra, stop=stop, temperature=temperature, top_p=cfg.rollout.top_p,
            **({"seeds": seeds[i : i + step]} if seeds is not None else {"generator": generator}),
        )
    parsed_all, cut_groups, truths = [], [], []
    for (b, pos), group, w in zip(positions, groups, written):
        parsed = [prompts.parse_response(r.token_ids, tokenizer, cfg.prompt, truncated=r.truncated, written_ids=w)
                  for r in group.responses]
        responses = [
            Response(r.token_ids[: p.answer_end], r.logprobs[: p.answer_end], "stop")
            if p.answer_end is not None and p.answer_end < len(r.token_ids) else r
            for r, p in zip(group.responses, parsed)
        ]
        parsed_all.append(parsed)
        cut_groups.append(Group(group.prompt_ids, responses))
        truths.append(rewards.Truth.from_ids(sequences[b][pos : pos + PREFIX_CONTINUATION], decode))
    generated = [(len(g.prompt_ids), len(r.token_ids)) for g in groups for r in g.responses]
    return Rollouts(cut_groups, parsed_all, truths, cap, extra, n_cut, generated)


def position_seeds(generator: torch.Generator, selection: sampling.RLSelection) -> list[int]:
    """One sampling seed per position of C, keyed by its index in the global draw: with a generator seeded
    identically on every process, a position gets the same seed whichever process rolls it out."""
    base = int(torch.randint(0, 2**62, (1,), generator=generator))
    index = selection.draw_index if selection.draw_index is not None else range(len(selection.positions))
    return [int(np.random.SeedSequence([base, i]).generate_state(2, np.uint32).view(np.uint64)[0] >> 2) for i in index]


def collect(cfg: RMTConfig, batch, budget: int, selection: sampling.RLSelection, engine: RolloutEngine, tokenizer, *,
            sample_generator, max_context: int = 1 << 30) -> RLData:
    """Roll out G responses per position of C, parse and reward them, and compute group advantages."""
    prompt_budget = budget if cfg.budget.enabled else None
    cap = schedules.response_cap(prompt_budget, cfg.budget.answer_allowance, cfg.rollout.max_response_tokens)
    t0 = time.perf_counter()
    # Per-position seeds make a position's samples independent of the process that rolls it out (the trainer then
    # passes the same generator to every process).
    seeds = position_seeds(sample_generator, selection) if engine.seeds_per_prompt else None
    out = roll_out(
        cfg, engine, tokenizer, batch.input_ids, selection.positions, prompt_budget, cap,
        group_size=cfg.rollout.group_size, temperature=cfg.rollout.temperature, generator=sample_generator, seeds=seeds,
        batch_size=cfg.rollout.positions_per_batch, max_context=max_context,
    )
    rollout_s = time.perf_counter() - t0

    G = cfg.rollout.group_size
    reward_rows, parsed_all, reward_parts = [], [], []
    for parsed_row, truth in zip(out.parsed, out.truths):
        row = []
        for parsed in parsed_row:
            rw = rewards.response_reward(parsed.prediction, parsed.think_tokens, truth, prompt_budget, cfg.reward, parsed.prediction_id)
            row.append(rw.total)
            parsed_all.append(parsed)
            reward_parts.append(rw)
        reward_rows.append(row)
    reward_t = torch.tensor(reward_rows, dtype=torch.float32).reshape(len(out.groups), G)
    advantages = losses.group_advantages(reward_t, cfg.grpo.adv_eps)

    decode = lambda ids: tokenizer.decode(ids, clean_up_tokenization_spaces=False)  # noqa: E731
    data = RLData(selection, out.groups, reward_t, advantages, out.generated)
    data.metrics = _metrics(cfg, batch, data, parsed_all, reward_parts, budget, out.cap, out.prompts_cut, rollout_s)
    data.samples = _samples(batch, data, parsed_all, reward_parts, tokenizer, decode)
    return data


def measure_think_lengths(cfg: RMTConfig, engine: RolloutEngine, tokenizer, data, *, max_context: int = 1 << 30) -> list[int]:
    """Thinking lengths of the model at ``budget.auto_positions`` RL positions of the scored training split
    (``data``: input_ids and tier columns), one sampled response each at rollout.temperature with no budget: what
    budget.b0=auto is measured on. Positions: one per sequence of a seeded sample of sequences, uniform over the
    tiers; only well-formed responses count."""
    n = min(cfg.budget.auto_positions, len(data))
    rng = np.random.default_rng([cfg.train.seed, 7])
    rows = sorted(rng.choice(len(data), size=n, replace=False).tolist())
    picked = data.select(rows)
    selection = sampling.sample_rl_set(
        picked["tier"], (1 / 3, 1 / 3, 1 / 3), torch.Generator().manual_seed(cfg.train.seed)
    )
    out = roll_out(
        cfg, engine, tokenizer, picked["input_ids"], selection.positions, None, cfg.rollout.max_response_tokens,
        group_size=1, temperature=cfg.rollout.temperature, generator=torch.Generator().manual_seed(cfg.train.seed + 1),
        batch_size=cfg.rollout.positions_per_batch, max_context=max_context,
    )
    return [p.think_tokens for row in out.parsed for p in row if p.ok]


def _metrics(cfg, batch, data: RLData, parsed, parts, budget, cap, n_cut, rollout_s) -> dict:
    n_pos = len(data.groups)
    m = {"rl_positions": n_pos, "response_cap": cap, "prompts_truncated": n_cut}
    counts = data.selection.tier_counts()
    for tier, n in counts.items():
        m[f"tier_{TIER_NAMES[tier]}"] = n
        m[f"frac_{TIER_NAMES[tier]}"] = n / n_pos if n_pos else 0.0
    if not parsed:
        return m
    think = np.array([p.think_tokens for p in parsed], dtype=np.float64)
    match = np.array([r.match for r in parts])
    new_tokens = data.num_response_tokens
    m.update(
        reward=float(np.mean([r.total for r in parts])),
        reward_match=float(match.mean()),
        reward_length=float(np.mean([r.length for r in parts])),
        rollout_accuracy=float((match == 1.0).mean()),
        think_len_mean=float(think.mean()),
        think_len_p90=float(np.percentile(think, 90)),
        response_len_mean=new_tokens / len(parsed),
        malformed_frac=float(np.mean([not p.ok for p in parsed])),
        truncated_frac=float(np.mean([r.truncated for g in data.groups for r in g.responses])),
        mixed_groups_frac=float((data.rewards.std(dim=1) > 0).float().mean()),
        rollout_tokens_per_s=new_tokens / max(rollout_s, 1e-9),
    )
    if batch.computed:
        G = cfg.rollout.group_size
        kinds = np.array([batch.computed[b][pos] for b, pos in data.selection.positions], dtype=bool).repeat(G)
        for name, sel in (("computed", kinds), ("random", ~kinds)):
            if sel.any():
                m[f"rollout_accuracy_{name}"] = float((match[sel] == 1.0).mean())
    return m


def _samples(batch, data: RLData, parsed, parts, tokenizer, decode, n: int = 2) -> list[dict]:
    G = len(data.groups[0].responses) if data.groups else 0
    out = []
    for i, ((b, pos), group) in enumerate(zip(data.selection.positions[:n], data.groups[:n])):
        resp = group.responses[0]
        out.append({
            "prompt_tail": decode(batch.input_ids[b][max(0, pos - 32) : pos]),
            "target": decode([batch.input_ids[b][pos]]),
            "response": decode(resp.token_ids),
            "status": parsed[i * G].status,
            "prediction": parsed[i * G].prediction,
            "reward": parts[i * G].total,
        })
    return out
