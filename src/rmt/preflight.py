"""Pre-flight check: can the model reason in the configured template? Run before the first RL step of `rmt train`
and before reasoning mode of `rmt eval`.

RMT's reward needs a response that closes its thinking block (``prompt.think_close``) and then gives an answer the
answer rule can read (``prompt.raw_answer``, or the last ``\\boxed{}`` for chat prompts). A model that never saw the
format (a base model pre-trained on plain prose) answers nothing: every response is malformed, every reward 0, and
then RPT's loss and gradient are 0 and RMT reduces to lambda x NTP -- a run that computes for hours and changes
nothing, with tables that read "-100%". So before that work, the model is prompted exactly as the stage will prompt
it, at ``preflight.positions`` positions of the user's corpus, one response each:

- ``closed``: the share of responses that contain the closing marker;
- ``wellformed``: the share that also have a parsable answer (``ParsedResponse.ok``): what the reward can score.

Below ``preflight.min_wellformed`` the stage stops with a message that says what was measured and how to go on;
``preflight.on_fail=warn`` goes on anyway (logged, and recorded with the run). The measurement is kept: in the run
folder (``preflight.json``) and in the first metrics row of `rmt train`, and per row in `rmt eval`'s JSON.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from rmt.config import RMTConfig
from rmt.errors import ModelError

log = logging.getLogger(__name__)

PREFLIGHT_FILE = "preflight.json"
N_EXAMPLES = 2  # responses quoted in the record and the message


# --- pure functions -------------------------------------------------------------------------------------------


def format_rates(closed: Sequence[bool], wellformed: Sequence[bool], statuses: Sequence[str]) -> dict:
    """Counts and shares of responses that closed the thinking block and that are well formed (parsable answer)."""
    n = len(closed)
    return {
        "measured": n,
        "closed": int(sum(closed)),
        "wellformed": int(sum(wellformed)),
        "closed_frac": sum(closed) / n if n else None,
        "wellformed_frac": sum(wellformed) / n if n else None,
        "statuses": dict(sorted(Counter(statuses).items())),
    }


def passes(record: dict, min_wellformed: float) -> bool:
    """Whether a measurement clears the threshold (nothing measured counts as passing: there was nothing to ask)."""
    rate = record.get("wellformed_frac")
    return rate is None or rate >= min_wellformed


def describe(record: dict) -> str:
    """``closed </think> in 3 of 32 responses (9.4%), parsable answer in 1 (3.1%)``."""
    n = record["measured"]
    close = record.get("think_close", "</think>")
    return (f"closed {close} in {record['closed']} of {n} responses ({100 * record['closed_frac']:.1f}%), "
            f"parsable answer in {record['wellformed']} ({100 * record['wellformed_frac']:.1f}%)")


def failure_message(where: str, record: dict, cfg: RMTConfig, also: str = "") -> str:
    """What was measured, why it stops the stage, and the ways on."""
    p = cfg.prompt
    template = f"chat template of the tokenizer, answer in \\boxed{{}}" if p.style == "chat" else (
        f"raw template {p.raw_template!r}, answer rule {p.raw_answer}")
    statuses = ", ".join(f"{k} {v}" for k, v in record.get("statuses", {}).items() if k != "ok")
    example = record.get("examples", [{}])[0].get("response") if record.get("examples") else None
    lines = [
        f"pre-flight check failed for {where}: prompted as the stage prompts it (prompt.style={p.style}, {template}; "
        f"budget {record.get('budget')}, cap {record.get('cap')} tokens, temperature {record.get('temperature')}) at "
        f"{record['measured']} positions of the corpus, the model {describe(record)}; preflight.min_wellformed="
        f"{cfg.preflight.min_wellformed:g}." + (f" Malformed: {statuses}." if statuses else "")
        + (f" A response: {example[:120]!r}." if example else ""),
        "Why this stops here: a response without a closed thinking block and a readable answer gets reward 0, so RL "
        "has no signal (RPT's loss and gradient are 0 and RMT reduces to lambda x NTP) and reasoning-mode evaluation "
        "scores 0 for every model. RMT needs a model that can reason in this template: a reasoning (instruct) model "
        "with prompt.style=chat, or a base model whose pre-training showed the format "
        f"({p.think_open}...{p.think_close} followed by the answer), like the embedded default's.",
    ]
    st = record.get("statuses", {})
    if st.get("truncated", 0) > record["measured"] / 2 and record["closed"] > 0:
        lines.append(f"Most responses were cut by the generation cap of {record.get('cap')} tokens (truncated) and some did close "
                     "the block: if this model reasons at length, give it room (a larger budget.b0 or rollout.max_response_tokens "
                     "in training, eval.max_response_tokens in evaluation) rather than another model.")
    lines += [
        "How to go on: use such a model (docs/own-corpus.md, 'When the pre-flight check fails'; a base model of your "
        "own: `rmt pretrain` with pretrain.think_blocks=0.03 teaches it to close the block); or set prompt.* to a "
        "template this model already follows; " + (f"{also}; " if also else "") + "or, to run anyway, set "
        "preflight.on_fail=warn (preflight.positions=0 skips the check).",
    ]
    return "\n".join(lines)


# --- the model side -------------------------------------------------------------------------------------------


def measure(cfg: RMTConfig, engine, tokenizer, sequences, positions: Sequence[tuple[int, int]], budget: int | None,
            cap: int, temperature: float, seed: int, max_context: int = 1 << 30) -> dict:
    """One response at each (row, pos) of ``positions``, prompted and read exactly as training and evaluation do
    (``rmt.collect.roll_out``); the shares of closed and well-formed responses, with a few examples."""
    from rmt.collect import roll_out

    out = roll_out(
        cfg, engine, tokenizer, sequences, list(positions), budget, cap, group_size=1, temperature=temperature,
        generator=torch.Generator().manual_seed(seed), batch_size=cfg.rollout.positions_per_batch, max_context=max_context,
    )
    close_ids = tokenizer.encode(cfg.prompt.think_close, add_special_tokens=False)
    closed, wellformed, statuses, examples = [], [], [], []
    decode = lambda ids: tokenizer.decode(ids, clean_up_tokenization_spaces=False)  # noqa: E731
    for (b, pos), group, parsed in zip(positions, out.groups, out.parsed):
        response, p = group.responses[0], parsed[0]
        closed.append(len(close_ids) == 1 and close_ids[0] in response.token_ids)
        wellformed.append(p.ok)
        statuses.append(p.status)
        if len(examples) < N_EXAMPLES:
            examples.append({"prefix_tail": decode(list(sequences[b][max(0, pos - 24) : pos])),
                             "response": decode(response.token_ids), "status": p.status})
    record = format_rates(closed, wellformed, statuses)
    record.update(budget=budget, cap=cap, temperature=temperature, prompt_style=cfg.prompt.style,
                  think_close=cfg.prompt.think_close, examples=examples)
    return record


def train_positions(cfg: RMTConfig, data) -> tuple[list, list[tuple[int, int]]]:
    """``preflight.positions`` RL positions of the scored training split: one per sequence of a seeded sample of
    sequences, uniform over the tiers (as budget.b0=auto measures). Returns (sequences, positions)."""
    from rmt import sampling

    n = min(cfg.preflight.positions, len(data))
    rng = np.random.default_rng([cfg.train.seed, 17])
    rows = sorted(rng.choice(len(data), size=n, replace=False).tolist())
    picked = data.select(rows)
    selection = sampling.sample_rl_set(picked["tier"], (1 / 3, 1 / 3, 1 / 3), torch.Generator().manual_seed(cfg.train.seed))
    return picked["input_ids"], list(selection.positions)


def check_train(cfg: RMTConfig, run_dir: Path, data, engine, tokenizer, model, budget: int | None, accelerator) -> dict | None:
    """Before the first RL step: measure on the main process, write ``preflight.json``, and on every process stop
    (ModelError) when the check fails and preflight.on_fail is stop. Returns the record (None when skipped)."""
    from rmt import schedules
    from rmt.collect import context_length
    from rmt.fileio import atomic_write_text

    if not cfg.train.rl or cfg.preflight.positions == 0:
        return None
    path = run_dir / PREFLIGHT_FILE
    if accelerator.is_main_process:
        prompt_budget = budget if cfg.budget.enabled else None
        cap = schedules.response_cap(prompt_budget, cfg.budget.answer_allowance, cfg.rollout.max_response_tokens)
        sequences, positions = train_positions(cfg, data)
        record = measure(cfg, engine, tokenizer, sequences, positions, prompt_budget, cap, cfg.rollout.temperature,
                         cfg.train.seed + 17, context_length(model))
        record.update(min_wellformed=cfg.preflight.min_wellformed, passed=passes(record, cfg.preflight.min_wellformed))
        atomic_write_text(path, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    accelerator.wait_for_everyone()
    record = json.loads(path.read_text(encoding="utf-8"))
    return decide(cfg, f"training ({cfg.preset})", record)


def decide(cfg: RMTConfig, where: str, record: dict, also: str = "") -> dict:
    """Log the measurement; raise ModelError when it fails the threshold and preflight.on_fail is stop."""
    if record.get("measured", 0) == 0:
        return record
    if passes(record, cfg.preflight.min_wellformed):
        log.info("pre-flight check for %s: %s (min %.0f%%)", where, describe(record), 100 * cfg.preflight.min_wellformed)
        return record
    message = failure_message(where, record, cfg, also)
    if cfg.preflight.on_fail == "stop":
        raise ModelError(message)
    log.warning("%s\n(preflight.on_fail=warn: going on)", message)
    return record


def metrics_of(record: dict | None) -> dict:
    """The keys a metrics row carries for a measurement."""
    if not record or not record.get("measured"):
        return {}
    return {"preflight_closed_frac": record["closed_frac"], "preflight_wellformed_frac": record["wellformed_frac"]}


def eval_positions(items, n: int, seed: int) -> list[int]:
    """Indices of ``n`` items of the evaluation set (a seeded sample, spread over the tiers as the set is)."""
    if n >= len(items):
        return list(range(len(items)))
    return sorted(np.random.default_rng([seed, 17]).choice(len(items), size=n, replace=False).tolist())


def read_record(run_dir: Path) -> dict | None:
    """The measurement a run made before its first step (None when it has none: no RL, skipped, or older run)."""
    path = Path(run_dir) / PREFLIGHT_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except ValueError:
        return None
