"""The RL side of one training step: RL set C -> prompts -> G rollouts each -> parsed, rewarded, advantages.

The engines that generate live in ``rmt.rollout``; the log-probabilities for the loss in ``rmt.forward``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from rmt import losses, prompts, rewards, sampling, schedules
from rmt.config import RMTConfig
from rmt.errors import ModelError
from rmt.rollout import Group, Response, RolloutEngine, StopRule, cut_to_rule, make_engine as _make_engine
from rmt.tiers import NTP_ONLY, RL_TIERS, TIER_NAMES

PREFIX_CONTINUATION = 16  # true next tokens given to the prefix-matching reward
WRITTEN_LOOKBACK = 16  # tokens before a position searched for the part of the current value already written


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
    teacher_forced: list[list[int]] | None = None  # per group, per response: trailing tokens trained by cross-entropy
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
        some sequences. The advantage is a float, or a list with one value per token when the response ends in
        teacher-forced tokens (``teacher_forced``): those get 1, the cross-entropy gradient at ratio 1."""
        out = []
        forced = self.teacher_forced or [[0] * len(g.responses) for g in self.groups]
        for (b, _pos), group, adv, tails in zip(self.selection.positions, self.groups, self.advantages, forced):
            if seq_subset is not None and b not in seq_subset:
                continue
            for r, a, k in zip(group.responses, adv.tolist(), tails):
                a = [a] * (len(r.token_ids) - k) + [1.0] * k if k else a
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
    written: list[list[int]] = field(default_factory=list)  # per position: the written part of the current value


def written_part(cfg: RMTConfig, prefix: list[int], decode) -> list[int]:
    """The part of the current value already written (``prompts.current_value_ids``) when the answer rule skips its
    restatement; empty otherwise."""
    if not (reads_first_token(cfg) and cfg.prompt.skip_restatement):
        return []
    return prompts.current_value_ids(prefix[-WRITTEN_LOOKBACK:], decode)


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
    # Prompts are fitted to the context with room for the longest possible restatement, not this batch's longest,
    # so that a position's prompt does not depend on the positions it is batched with.
    room = WRITTEN_LOOKBACK if reads_first_token(cfg) and cfg.prompt.skip_restatement else 0
    prompt_ids, n_cut = build_prompts(cfg, tokenizer, sequences, positions, prompt_budget, cap + room, max_context)
    stop = stop_rule(cfg, tokenizer, extra)
    groups: list[Group] = []
    step = max(1, len(prompt_ids)) if engine.continuous_batching else batch_size
    for i in range(0, len(prompt_ids), step):
        groups += engine.generate_groups(
            prompt_ids[i : i + step], group_size, cap + extra, stop=stop, temperature=temperature, top_p=cfg.rollout.top_p,
            **({"seeds": seeds[i : i + step]} if seeds is not None else {"generator": generator}),
        )
    generated = [(len(g.prompt_ids), len(r.token_ids)) for g in groups for r in g.responses]
    # The batch was generated under its longest written part; each position keeps what its own cap and stop rule
    # allow (cap + its written part), so its responses do not depend on its batch or on the number of processes.
    own_stop = {n: stop_rule(cfg, tokenizer, n) for n in {len(w) for w in written}}  # one rule per written length
    groups = [Group(g.prompt_ids, [cut_to_rule(r, own_stop[len(w)], cap + len(w)) for r in g.responses])
              for g, w in zip(groups, written)]
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
    return Rollouts(cut_groups, parsed_all, truths, cap, extra, n_cut, generated, written)


def position_seeds(generator: torch.Generator, selection: sampling.RLSelection) -> list[int]:
    """One sampling seed per position of C, keyed by its index in the global draw: with a generator seeded
    identically on every process, a position gets the same seed whichever process rolls it out."""
    base = int(torch.randint(0, 2**62, (1,), generator=generator))
    index = selection.draw_index if selection.draw_index is not None else range(len(selection.positions))
    return [int(np.random.SeedSequence([base, i]).generate_state(2, np.uint32).view(np.uint64)[0] >> 2) for i in index]


@dataclass
class Scored:
    """Rolled-out groups at some positions, with their rewards: one round of ``collect``."""

    positions: list[tuple[int, int]]
    tiers: list[int]
    groups: list[Group]  # the responses the loss trains on
    parsed: list[list[prompts.ParsedResponse]]
    parts: list[list[rewards.Reward]]
    rewards: torch.Tensor  # (C, G)
    teacher_forced: list[list[int]]  # trailing response tokens trained by cross-entropy (reward.train_answer)
    logp: dict = field(default_factory=dict)  # information gain: logp_think (C, G), logp_base (C,)

    def take(self, index: list[int]) -> "Scored":
        pick = lambda xs: [xs[i] for i in index]  # noqa: E731
        return Scored(pick(self.positions), pick(self.tiers), pick(self.groups), pick(self.parsed), pick(self.parts),
                      self.rewards[index] if index else self.rewards[:0], pick(self.teacher_forced),
                      {k: v[index] for k, v in self.logp.items()})

    @staticmethod
    def join(pieces: list["Scored"]) -> "Scored":
        first = pieces[0]
        cat = lambda name: [x for p in pieces for x in getattr(p, name)]  # noqa: E731
        return Scored(cat("positions"), cat("tiers"), cat("groups"), cat("parsed"), cat("parts"),
                      torch.cat([p.rewards for p in pieces]), cat("teacher_forced"),
                      {k: torch.cat([p.logp[k] for p in pieces]) for k in first.logp})


# (sequences, positions, groups, written parts) -> rmt.rlp.InfoGain: the information-gain reward's two passes, bound
# to the models.
Scorer = Callable[[list[list[int]], list[tuple[int, int]], list[Group], list[list[int]]], object]


def score_groups(cfg: RMTConfig, sequences, positions, tiers, out: Rollouts, prompt_budget: int | None,
                 scorer: Scorer | None = None) -> Scored:
    """Rewards of rolled-out groups: the match reward of each parsed response (reward.kind=match), or the
    information gain of each thought (reward.kind=information_gain; ``scorer`` runs the two passes, rmt.rlp)."""
    G = cfg.rollout.group_size
    parts = [
        [rewards.response_reward(p.prediction, p.think_tokens, truth, prompt_budget, cfg.reward, p.prediction_id) for p in row]
        for row, truth in zip(out.parsed, out.truths)
    ]
    if cfg.reward.kind == "match":
        reward_t = torch.tensor([[r.total for r in row] for row in parts], dtype=torch.float32).reshape(len(out.groups), G)
        return Scored(list(positions), list(tiers), out.groups, out.parsed, parts, reward_t, [[0] * G for _ in out.groups])
    if scorer is None:
        raise ValueError("reward.kind=information_gain needs the scorer of rmt.rlp (the model and its EMA copy)")
    gain = scorer(sequences, list(positions), out.groups, out.written)
    # The sampled answer after </think> is not rewarded; its match is kept for the accuracy metrics.
    parts = [[rewards.Reward(float(r), p.match, 0.0) for r, p in zip(row_r, row_p)] for row_r, row_p in zip(gain.rewards.tolist(), parts)]
    return Scored(list(positions), list(tiers), gain.groups, out.parsed, parts, gain.rewards, gain.teacher_forced,
                  {"logp_think": gain.logp_think, "logp_base": gain.logp_base})


def extra_draw_size(missing: int, kept: int, drawn: int, left: int) -> int:
    """Positions to roll out next when filling the RL set with informative groups: enough for ``missing`` groups at
    the share kept so far (kept / drawn, at least 1/4, so a round whose groups were all uniform still tries), and
    at most ``left`` (what remains of the cap on extra generation)."""
    rate = max(kept / drawn, 0.25) if drawn else 1.0
    return max(0, min(left, math.ceil(missing / rate)))


def informative(reward_rows: torch.Tensor) -> list[int]:
    """Indices of the groups whose G rewards are not all equal (the others have zero advantage)."""
    return [i for i, row in enumerate(reward_rows) if bool((row != row[0]).any())]


def collect(cfg: RMTConfig, batch, budget: int, selection: sampling.RLSelection, engine: RolloutEngine, tokenizer, *,
            sample_generator, max_context: int = 1 << 30, scorer: Scorer | None = None, probs=None,
            extra_generator: torch.Generator | None = None) -> RLData:
    """Roll out G responses per position of C, reward them, and compute group advantages.

    rollout.filter_groups: drop the groups whose rewards are all equal and fill C back with informative groups from
    extra positions of this process's sequences (drawn from ``extra_generator`` by the curriculum's ``probs``), up
    to rollout.filter_max_extra x |C| extra positions; dropped positions go back to the NTP term.
    """
    prompt_budget = budget if cfg.budget.enabled else None
    cap = schedules.response_cap(prompt_budget, cfg.budget.answer_allowance, cfg.rollout.max_response_tokens)
    t0 = time.perf_counter()
    generated, n_cut = [], 0

    def round_of(sel: sampling.RLSelection, generator) -> Scored:
        nonlocal n_cut
        # Per-position seeds make a position's samples independent of the process that rolls it out (the trainer
        # then passes the same generator to every process).
        seeds = position_seeds(generator, sel) if engine.seeds_per_prompt else None
        out = roll_out(
            cfg, engine, tokenizer, batch.input_ids, sel.positions, prompt_budget, cap,
            group_size=cfg.rollout.group_size, temperature=cfg.rollout.temperature, generator=generator, seeds=seeds,
            batch_size=cfg.rollout.positions_per_batch, max_context=max_context,
        )
        generated.extend(out.generated)
        n_cut += out.prompts_cut
        return score_groups(cfg, batch.input_ids, sel.positions, sel.tiers, out, prompt_budget, scorer)

    scored = round_of(selection, sample_generator)
    ntp_mask, filter_metrics = selection.ntp_mask, {}
    if cfg.rollout.filter_groups:
        scored, ntp_mask, filter_metrics = _fill_informative(cfg, batch, scored, selection, probs, extra_generator, round_of)
    rollout_s = time.perf_counter() - t0

    advantages = losses.group_advantages(scored.rewards, cfg.grpo.adv_eps)
    kept_selection = sampling.RLSelection(scored.positions, scored.tiers, ntp_mask)
    data = RLData(kept_selection, scored.groups, scored.rewards, advantages, generated, teacher_forced=scored.teacher_forced)
    parsed_all = [p for row in scored.parsed for p in row]
    reward_parts = [r for row in scored.parts for r in row]
    decode = lambda ids: tokenizer.decode(ids, clean_up_tokenization_spaces=False)  # noqa: E731
    data.metrics = _metrics(cfg, batch, data, parsed_all, reward_parts, budget, cap, n_cut, rollout_s)
    data.metrics.update(filter_metrics)
    data.metrics["generated_tokens"] = sum(n for _, n in generated)
    data.metrics["informative_groups"] = len(informative(scored.rewards))
    for name, values in scored.logp.items():
        if values.numel():
            data.metrics[f"{name}_mean"] = float(values.mean())
    data.samples = _samples(batch, data, parsed_all, reward_parts, tokenizer, decode)
    return data


def _fill_informative(cfg: RMTConfig, batch, scored: Scored, selection, probs, generator, round_of):
    """Dynamic sampling (rollout.filter_groups): keep the informative groups of C and add informative groups from
    extra positions until C is full again or the cap on extra positions is spent. Extra positions are drawn from
    this process's sequences, never twice the same, by the curriculum's tier probabilities."""
    if probs is None or generator is None:
        raise ValueError("rollout.filter_groups needs the tier probabilities and a generator for the extra positions")
    target = len(scored.groups)
    left = math.ceil(cfg.rollout.filter_max_extra * target)
    pieces = [scored.take(informative(scored.rewards))]
    drawn_tiers, kept, rounds = list(selection.tiers), len(pieces[0].groups), 0
    candidates = [list(row) for row in batch.tiers]  # tiers with every drawn position taken out of the candidates
    for b, pos in selection.positions:
        candidates[b][pos] = NTP_ONLY
    while kept < target and left > 0:
        n = extra_draw_size(target - kept, kept, len(drawn_tiers), left)
        extra = sampling.sample_rl_set(
            candidates, probs, generator, positions_per_sequence=math.ceil(n / len(candidates)), max_positions=n
        )
        if not extra.positions:
            break  # no candidate left in this process's sequences
        for b, pos in extra.positions:
            candidates[b][pos] = NTP_ONLY
        round_scored = round_of(extra, generator)
        pieces.append(round_scored.take(informative(round_scored.rewards)))
        drawn_tiers += extra.tiers
        left, rounds, kept = left - len(extra.positions), rounds + 1, kept + len(pieces[-1].groups)
    out = Scored.join(pieces).take(list(range(min(kept, target))))
    ntp_mask = selection.ntp_mask.copy() if isinstance(selection.ntp_mask, np.ndarray) else selection.ntp_mask.clone()
    for b, pos in selection.positions:
        ntp_mask[b, pos] = True  # dropped positions go back to the NTP term; the kept ones are taken out below
    for b, pos in out.positions:
        ntp_mask[b, pos] = False
    metrics = {"filter_drawn": len(drawn_tiers), "filter_dropped": len(drawn_tiers) - kept, "filter_kept": len(out.groups),
               "filter_rounds": rounds}
    metrics.update({f"drawn_{TIER_NAMES[t]}": drawn_tiers.count(t) for t in RL_TIERS})
    return out, ntp_mask, metrics


def measure_think_lengths(cfg: RMTConfig, engine: RolloutEngine, tokenizer, data, *, max_context: int = 1 << 30) -> list[int]:
    """Thinking lengths of the model at ``budget.auto_positions`` RL positions of the scored training split
    (``data``: input_ids and tier columns), one sampled response each at rollout.temperature with no budget: what
    budget.b0=auto and budget.b_min=auto are measured on. Positions: one per sequence of a seeded sample of sequences, uniform over the
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
