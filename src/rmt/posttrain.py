"""`rmt posttrain`: GRPO with a verifiable reward on question/answer pairs (SPEC section 4, post-training transfer).

Post-training is a different data source and reward, not a second trainer: rollouts come from the same engine
(rmt.rollout), the loss is the same ``losses.unified_loss`` (RL term only), checkpoints and run folders are those of
rmt.checkpoint and rmt.run_dir, and the step loop has the shape of ``rmt train``. One step, top to bottom:

  questions of this step -> prompts -> G rollouts each -> answer parsed -> verifier score (+ format reward)
  -> group advantages -> clipped policy loss on the response tokens -> optimizer step -> metrics.

Prompts. Raw (base models): ``posttrain.raw_template`` with ``{question}``; the default ``{question}<think>`` is how
the embedded base model saw worked problems (``5-1+4=<think>5-1=4;4+4=8</think>8``), so the answer is the rest of
the line after ``</think>`` (up to the newline or EOS). Chat (instruct models): the tokenizer's chat template, the
answer in the last ``\\boxed{}`` after ``</think>``.

A response that ends its answer line is cut right after the newline, as a stop rule would; the engine cannot stop
there yet (it knows EOS and a fixed count after ``</think>``), so generation runs on to EOS or the cap and the tokens
after the cut are dropped before the loss.

The step's randomness (which questions, which samples) is drawn from generators seeded by (train.seed, step,
process), so a run resumed from a checkpoint draws what the uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rmt import collect, losses
from rmt.checkpoint import list_checkpoints, load_checkpoint, model_folder_problem
from rmt.config import PromptConfig, RMTConfig
from rmt.errors import DataError, ModelError, TrainingError
from rmt.fileio import atomic_write_text, read_json_object
from rmt.prompts import ParsedResponse, parse_response
from rmt.rollout import Group, Response, StopRule
from rmt.stats import wilson_interval
from rmt.run_dir import MetricsLog, check_run_dir_path, make_accelerator, open_run_dir_on_main
from rmt.trainer import _flat, _save, _StopFlag, batch_indices, make_scheduler, save_final, step_generator
from rmt.update import MicroBatch, policy_update
from rmt.verifiers import VerifierError, call_verifier, load_verifier, posttrain_reward, reasoning_gym_entry

log = logging.getLogger(__name__)

EVAL_FILE = "eval.json"


# --- data -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Question:
    """One post-training item: what the model is asked, the reference answer, and the whole input record."""

    question: str
    answer: str
    record: dict
    where: str  # "file:line" (or "file: row n"), for messages


def _question(record, qfield: str, afield: str, where: str) -> Question:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for name, key in (("question", qfield), ("answer", afield)):
        if key not in record or record[key] is None:
            raise DataError(
                f"{where}: no {name} field {key!r} (fields: {sorted(record)}); set posttrain.{name}_field"
            )
    question, answer = record[qfield], record[afield]
    if not isinstance(question, str) or not question:
        raise DataError(f"{where}: field {qfield!r} must be a non-empty string, got {question!r}")
    if isinstance(answer, bool) or not isinstance(answer, str | int | float):
        raise DataError(f"{where}: field {afield!r} must be a string or a number, got {type(answer).__name__}")
    if not str(answer).strip():
        raise DataError(f"{where}: field {afield!r} is empty: no response could ever be rewarded for it")
    return Question(question, str(answer), record, where)


def read_questions(path: str | Path, fmt: str = "auto", question_field: str = "question", answer_field: str = "answer") -> list[Question]:
    """Question/answer pairs of a JSONL or Parquet file. DataError for a missing or empty file, a line that is not
    JSON, or a record without the question or answer field (naming the file and line)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"question file not found: {path}")
    if fmt == "auto":
        fmt = "parquet" if path.suffix.lower() == ".parquet" else "jsonl"
    out = []
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # noqa: BLE001 - the library's error, named
            raise DataError(f"{path}: cannot read as parquet: {e}") from None
        out = [_question(r, question_field, answer_field, f"{path}: row {i}") for i, r in enumerate(rows)]
    else:
        with open(path, encoding="utf-8", errors="strict") as fh:
            try:
                lines = list(fh)
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: not UTF-8 ({e})") from None
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            out.append(_question(record, question_field, answer_field, f"{path}:{lineno}"))
    if not out:
        raise DataError(f"{path} holds no questions (empty file)")
    return out


def load_question_sets(cfg: RMTConfig) -> tuple[list[Question], list[Question]]:
    """(training questions, evaluation questions). Without posttrain.eval_data the last posttrain.eval_size
    questions are held out of training."""
    pcfg = cfg.posttrain
    if pcfg.data is None:
        from rmt.embedded import ensure_embedded

        path = ensure_embedded(cfg, model=False).posttrain_path
        from rmt.embedded.corpus import question_text

        questions = read_questions(path, "jsonl", "prompt", "answer")  # the embedded split's own field names
        questions = [dataclasses.replace(q, question=question_text(q.record)) for q in questions]
    else:
        questions = read_questions(pcfg.data, pcfg.format, pcfg.question_field, pcfg.answer_field)
    if pcfg.eval_data is not None:
        return questions, read_questions(pcfg.eval_data, pcfg.format, pcfg.question_field, pcfg.answer_field)
    if pcfg.eval_size == 0:
        return questions, []
    if pcfg.eval_size >= len(questions):
        raise DataError(
            f"posttrain.eval_size={pcfg.eval_size} leaves no training questions out of {len(questions)}: lower it "
            "or give posttrain.eval_data"
        )
    return questions[: -pcfg.eval_size], questions[-pcfg.eval_size :]


def verifier_name(cfg: RMTConfig) -> str:
    """posttrain.verifier, with auto resolved: reasoning_gym for the embedded default, math_verify for a file."""
    name = cfg.posttrain.verifier
    if name == "auto":
        return "reasoning_gym" if cfg.posttrain.data is None else "math_verify"
    return name


def check_verifier_data(name: str, questions: list[Question]) -> None:
    """The reasoning_gym verifier reads the generator's entry: check the first record before any work starts."""
    if name == "reasoning_gym" and questions:
        try:
            reasoning_gym_entry(questions[0].record)
        except VerifierError as e:
            raise DataError(f"{questions[0].where}: {e}") from None


# --- prompts and responses --------------------------------------------------------------------------------------


def prompt_ids(question: str, tokenizer, cfg: RMTConfig) -> list[int]:
    """Token ids of the prompt for one question (posttrain.prompt_style picks raw or chat)."""
    pcfg = cfg.posttrain
    if pcfg.prompt_style == "chat":
        user = pcfg.chat_user.format(question=question)
        messages = ([{"role": "system", "content": pcfg.chat_system}] if pcfg.chat_system else []) + [
            {"role": "user", "content": user}
        ]
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    bos = [tokenizer.bos_token_id] if pcfg.add_bos and tokenizer.bos_token_id is not None else []
    return bos + tokenizer.encode(pcfg.raw_template.format(question=question), add_special_tokens=False)


def answer_prompt_config(cfg: RMTConfig) -> PromptConfig:
    """The PromptConfig that ``prompts.parse_response`` reads post-training responses with."""
    return cfg.prompt.model_copy(update={"style": cfg.posttrain.prompt_style, "raw_answer": cfg.posttrain.raw_answer})


def ends_answer_line(cfg: RMTConfig) -> bool:
    return cfg.posttrain.prompt_style == "raw" and cfg.posttrain.raw_answer == "line"


def answer_line_end(token_ids: list[int], decode, close: str) -> int | None:
    """Number of tokens up to and including the one that ends the answer line after ``close`` (newlines right after
    ``close`` do not count, as in the parser); None when the line never ends."""
    text, close_end = "", -1
    for k, tid in enumerate(token_ids):
        text += decode([tid])
        if close_end < 0:
            at = text.find(close)
            if at < 0:
                continue
            close_end = at + len(close)
        rest = text[close_end:].lstrip("\r\n")
        if "\n" in rest:
            return k + 1
    return None


def cut_responses(groups: list[Group], decode, close: str) -> list[Group]:
    """End each response at its answer line, as a stop rule would (finish reason ``stop``)."""
    out = []
    for g in groups:
        responses = []
        for r in g.responses:
            n = answer_line_end(r.token_ids, decode, close)
            responses.append(r if n is None or n == len(r.token_ids) else Response(r.token_ids[:n], r.logprobs[:n], "stop"))
        out.append(Group(g.prompt_ids, responses))
    return out


@dataclass(frozen=True)
class Scored:
    parsed: ParsedResponse
    verified: float  # the verifier's score (built-ins give 0 without a parsable answer)
    reward: float


def score_response(resp: Response, question: Question, tokenizer, answer_cfg: PromptConfig, verifier, name: str,
                   format_weight: float) -> Scored:
    parsed = parse_response(resp.token_ids, tokenizer, answer_cfg, truncated=resp.truncated)
    verified = call_verifier(verifier, name, parsed.prediction, question.answer, question.record)
    return Scored(parsed, verified, posttrain_reward(verified, parsed.ok, format_weight))


def generate(cfg: RMTConfig, engine, tokenizer, prompts: list[list[int]], group_size: int, *, temperature: float,
             generator=None, batch: int | None = None) -> list[Group]:
    """Groups of responses for the prompts, batch by batch, each ended at its answer line when the rule is ``line``."""
    stop = StopRule.from_tokenizer(tokenizer, close_marker=None)
    batch = batch or cfg.rollout.positions_per_batch
    groups: list[Group] = []
    for i in range(0, len(prompts), batch):
        groups += engine.generate_groups(
            prompts[i : i + batch], group_size, cfg.posttrain.max_response_tokens, stop=stop,
            temperature=temperature, top_p=cfg.rollout.top_p, generator=generator,
        )
    if ends_answer_line(cfg):
        decode = lambda ids: tokenizer.decode(ids, clean_up_tokenization_spaces=False)  # noqa: E731
        groups = cut_responses(groups, decode, cfg.prompt.think_close)
    return groups


def usable_questions(cfg: RMTConfig, tokenizer, questions: list[Question], max_context: int, what: str):
    """(questions, prompt ids) of the questions whose prompt plus the response cap fits the model's context."""
    kept, ids = [], []
    for q in questions:
        p = prompt_ids(q.question, tokenizer, cfg)
        if len(p) + cfg.posttrain.max_response_tokens <= max_context:
            kept.append(q)
            ids.append(p)
    if len(kept) < len(questions):
        log.warning("%d of %d %s questions are too long for the context (%d tokens with the response cap): skipped",
                    len(questions) - len(kept), len(questions), what, max_context)
    if questions and not kept:
        raise DataError(f"no {what} question fits the model's context of {max_context} tokens with posttrain.max_response_tokens")
    return kept, ids


# --- evaluation -------------------------------------------------------------------------------------------------


def answer_questions(model, tokenizer, questions: list[Question], cfg: RMTConfig, verifier=None) -> list[dict]:
    """Greedy answers to ``questions``, scored: one dict per question (prediction, score, correct, status, tokens)."""
    name = verifier_name(cfg)
    verifier = verifier or load_verifier(name)
    if not questions:
        return []
    engine = collect.make_engine(cfg, model, tokenizer)
    prompts = [prompt_ids(q.question, tokenizer, cfg) for q in questions]
    groups = generate(cfg, engine, tokenizer, prompts, 1, temperature=0.0, batch=cfg.posttrain.eval_batch_size)
    answer_cfg = answer_prompt_config(cfg)
    out = []
    for q, g in zip(questions, groups):
        resp = g.responses[0]
        s = score_response(resp, q, tokenizer, answer_cfg, verifier, name, 0.0)
        out.append({
            "answer": q.answer, "prediction": s.parsed.prediction, "score": s.verified, "correct": s.verified >= 1.0,
            "status": s.parsed.status, "response_tokens": len(resp.token_ids), "think_tokens": s.parsed.think_tokens,
        })
    return out


def summarize(results: list[dict]) -> dict:
    """Accuracy (score 1.0; reasoning-gym gives partial credit) with its Wilson 95% interval, mean score, mean
    response and thinking length in tokens, malformed share (no closed </think> or no parsable answer)."""
    n = len(results)
    correct = sum(r["correct"] for r in results)
    lo, hi = wilson_interval(correct, n) if n else (0.0, 1.0)
    mean = lambda key: sum(r[key] for r in results) / n if n else 0.0  # noqa: E731
    return {
        "n": n,
        "accuracy": correct / n if n else 0.0,
        "accuracy_ci95": [lo, hi],
        "mean_score": mean("score"),
        "mean_response_tokens": mean("response_tokens"),
        "mean_think_tokens": mean("think_tokens"),
        "malformed": sum(r["status"] != "ok" for r in results) / n if n else 0.0,
    }


def summarize_eval(answers: list[dict], tasks: list) -> dict:
    """``summarize`` of all the answers, with each question's correctness in order ("correct": 1 or 0, for paired
    comparisons between runs on the same questions) and, when questions name a task (a string), a summary per task
    ("by_task")."""
    out = {**summarize(answers), "correct": [int(a["correct"]) for a in answers]}
    named = sorted({t for t in tasks if isinstance(t, str)})
    if named:
        out["by_task"] = {t: summarize([a for a, u in zip(answers, tasks) if u == t]) for t in named}
    return out


def evaluate_questions(model, tokenizer, records, cfg: RMTConfig) -> dict:
    """Greedy accuracy on a question set: ``records`` are ``Question``s or dicts with posttrain.question_field and
    posttrain.answer_field. Returns ``summarize``'s dict."""
    questions = [
        r if isinstance(r, Question) else _question(r, cfg.posttrain.question_field, cfg.posttrain.answer_field, f"record {i}")
        for i, r in enumerate(records)
    ]
    return summarize(answer_questions(model, tokenizer, questions, cfg))


def evaluate(cfg: RMTConfig) -> dict:
    """`rmt posttrain --eval-only`: the accuracy of model.path (None = the embedded base model) on the eval questions."""
    from rmt.embedded import resolve_model_path, resolve_tokenizer_path
    from rmt.modeling import check_tokenizer_matches_model, load_model, load_tokenizer

    name = verifier_name(cfg)
    verifier = load_verifier(name)
    _, eval_qs = load_question_sets(cfg)
    if not eval_qs:
        raise DataError("no evaluation questions: set posttrain.eval_data or posttrain.eval_size > 0")
    check_verifier_data(name, eval_qs)
    tokenizer = load_tokenizer(resolve_tokenizer_path(cfg), cfg.model.trust_remote_code)
    model = load_model(resolve_model_path(cfg), cfg)
    check_tokenizer_matches_model(tokenizer, model)
    _check_chat(cfg, tokenizer)
    eval_qs, _ = usable_questions(cfg, tokenizer, eval_qs, collect.context_length(model), "evaluation")
    summary = summarize(answer_questions(model, tokenizer, eval_qs, cfg, verifier))
    return {"model": resolve_model_path(cfg), "verifier": name, **summary}


def _check_chat(cfg: RMTConfig, tokenizer) -> None:
    if cfg.posttrain.prompt_style == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ModelError("posttrain.prompt_style=chat needs a tokenizer with a chat template; use raw for base models")


# --- one step ---------------------------------------------------------------------------------------------------


@dataclass
class Rollouts:
    """The responses of one step's questions, their rewards and group advantages."""

    groups: list[Group]
    rewards: torch.Tensor  # (questions, G)
    advantages: torch.Tensor  # (questions, G)
    metrics: dict
    samples: list[dict]

    def pairs(self) -> list[tuple[list[int], list[int]]]:
        return [(g.prompt_ids, r.token_ids) for g in self.groups for r in g.responses]

    def logprobs(self) -> list[list[float]]:
        """The engine's log-prob of every response token, in the order of ``pairs``."""
        return [r.logprobs for g in self.groups for r in g.responses]


def collect_groups(cfg: RMTConfig, questions: list[Question], prompts: list[list[int]], engine, tokenizer, verifier, name: str,
            generator) -> Rollouts:
    """G sampled responses per question, verified and rewarded, with GRPO group advantages."""
    t0 = time.perf_counter()
    G = cfg.rollout.group_size
    groups = generate(cfg, engine, tokenizer, prompts, G, temperature=cfg.rollout.temperature, generator=generator)
    rollout_s = time.perf_counter() - t0
    answer_cfg = answer_prompt_config(cfg)
    scored = [
        [score_response(r, q, tokenizer, answer_cfg, verifier, name, cfg.posttrain.format_weight) for r in g.responses]
        for q, g in zip(questions, groups)
    ]
    rewards = torch.tensor([[s.reward for s in row] for row in scored], dtype=torch.float32).reshape(len(groups), G)
    advantages = losses.group_advantages(rewards, cfg.grpo.adv_eps)

    flat = [s for row in scored for s in row]
    responses = [r for g in groups for r in g.responses]
    n_tokens = sum(len(r.token_ids) for r in responses)
    metrics = {
        "reward": float(rewards.mean()),
        "reward_verified": float(np.mean([s.verified for s in flat])),
        "rollout_accuracy": float(np.mean([s.verified >= 1.0 for s in flat])),
        "format_ok": float(np.mean([s.parsed.ok for s in flat])),
        "malformed_frac": float(np.mean([not s.parsed.ok for s in flat])),
        "truncated_frac": float(np.mean([r.truncated for r in responses])),
        "response_len_mean": n_tokens / len(responses),
        "think_len_mean": float(np.mean([s.parsed.think_tokens for s in flat])),
        "mixed_groups_frac": float((rewards.std(dim=1) > 0).float().mean()),
        "rollout_tokens_per_s": n_tokens / max(rollout_s, 1e-9),
        "time_rollout_s": rollout_s,
    }
    decode = lambda ids: tokenizer.decode(ids, clean_up_tokenization_spaces=False)  # noqa: E731
    samples = [
        {"question": q.question, "answer": q.answer, "response": decode(g.responses[0].token_ids),
         "status": row[0].parsed.status, "prediction": row[0].parsed.prediction, "reward": row[0].reward}
        for q, g, row in list(zip(questions, groups, scored))[:2]
    ]
    return Rollouts(groups, rewards, advantages, metrics, samples)


def grpo_update(cfg: RMTConfig, pairs, advantages: torch.Tensor, model, ref_model, optimizer, accelerator,
                *, pad_id: int, horizon: int, rollout_logprobs: list[list[float]] | None = None) -> dict:
    """grpo.num_iterations optimizer steps of L_RL (``losses.unified_loss`` with no NTP term) on the responses.

    ``pairs``: (prompt ids, response ids) of every response; ``advantages``: one per response; ``rollout_logprobs``:
    the engine's log-probs of each response's tokens (the log-prob gap metric, grpo.tis_cap). The responses are
    split into train.grad_accum micro-batches; the loss is normalised by the global counts over all processes.
    Returns metrics; ``finite`` is False when the step was skipped (non-finite loss or gradient).
    """
    device = accelerator.device
    counts = torch.tensor([float(sum(len(r) for _, r in pairs)), float(len(pairs))], device=device)
    counts = accelerator.reduce(counts, reduction="sum")
    norm = losses.Normalizers(rl_tokens=counts[0].item() or None, rl_sequences=counts[1].item() or None, rl_horizon=horizon)
    adv = advantages.to(device=device, dtype=torch.float32).reshape(-1, 1)
    micro = [
        MicroBatch(pairs=[pairs[i] for i in idx], advantages=adv[idx],
                   rollout_logprobs=None if rollout_logprobs is None else [rollout_logprobs[i] for i in idx])
        for idx in (m.tolist() for m in np.array_split(np.arange(len(pairs)), cfg.train.grad_accum)) if idx
    ]
    return policy_update(cfg, micro, norm, model, ref_model, optimizer, accelerator, pad_id=pad_id, ntp_weight=0.0)


# --- the run ----------------------------------------------------------------------------------------------------


def posttrain(cfg: RMTConfig, model=None, tokenizer=None, *, stop_at: int | None = None) -> Path:
    """Post-train according to ``cfg``; resumes from the newest checkpoint of posttrain.output_dir.

    Evaluates the eval questions before the first step and after the last (``eval.json``, and ``eval_*`` metrics
    at steps 0 and T). ``stop_at``: end after that step with a checkpoint, as an interruption would (tests,
    time-boxed jobs). Returns the run folder; raises ``Interrupted`` (after the checkpoint) when SIGINT or SIGTERM
    stopped an unfinished run.
    """
    check_run_dir_path(Path(cfg.posttrain.output_dir), "posttrain.output_dir")
    with contextlib.ExitStack() as held:  # the run folder's lock, released however the run ends
        return _posttrain(cfg, model, tokenizer, stop_at, held)


def _posttrain(cfg: RMTConfig, model, tokenizer, stop_at: int | None, held: contextlib.ExitStack) -> Path:
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    from rmt.embedded import resolve_model_path, resolve_tokenizer_path
    from rmt.modeling import check_tokenizer_matches_model, load_model, load_tokenizer

    pcfg = cfg.posttrain
    name = verifier_name(cfg)
    verifier = load_verifier(name)  # a user's verifier is checked before anything heavy starts
    run_dir = Path(pcfg.output_dir)
    accelerator = make_accelerator(cfg, run_dir)
    rank, world = accelerator.process_index, accelerator.num_processes
    if pcfg.questions_per_step % world:
        raise DataError(f"posttrain.questions_per_step={pcfg.questions_per_step} must be divisible by the processes ({world})")
    train_qs, eval_qs = load_question_sets(cfg)
    check_verifier_data(name, train_qs)
    held.enter_context(open_run_dir_on_main(cfg, run_dir, accelerator, stage="posttrain"))

    if tokenizer is None:
        tokenizer = load_tokenizer(resolve_tokenizer_path(cfg), cfg.model.trust_remote_code)
    if model is None:
        model = load_model(resolve_model_path(cfg), cfg, accelerator.device)
    check_tokenizer_matches_model(tokenizer, model)
    _check_chat(cfg, tokenizer)
    max_context = collect.context_length(model)
    train_qs, train_prompts = usable_questions(cfg, tokenizer, train_qs, max_context, "training")
    eval_qs, _ = usable_questions(cfg, tokenizer, eval_qs, max_context, "evaluation")
    ref_model = None
    if cfg.grpo.kl_beta > 0:
        ref_model = load_model(resolve_model_path(cfg), cfg, accelerator.device).eval().requires_grad_(False)

    T = pcfg.steps
    optimizer = torch.optim.AdamW(model.parameters(), lr=pcfg.lr, betas=cfg.train.adam_betas, weight_decay=cfg.train.weight_decay)
    scheduler = make_scheduler(cfg, optimizer, T)  # stepped once per step below (see make_scheduler)
    model, optimizer = accelerator.prepare(model, optimizer)

    start_step = 0
    checkpoints = list_checkpoints(run_dir)
    if checkpoints:
        start_step = load_checkpoint(checkpoints[-1], accelerator.unwrap_model(model), optimizer, scheduler)["step"]
        log.info("resuming from %s (step %d of %d)", checkpoints[-1], start_step, T)
    if start_step >= T:
        problem = model_folder_problem(run_dir / "final")
        if problem is None:
            log.info("run %s already finished (%d of %d steps); nothing to do", run_dir, start_step, T)
            return run_dir
        log.warning("%s: %s; finishing the run again from %s", run_dir / "final", problem, checkpoints[-1])

    metrics_log = MetricsLog(run_dir, accelerator, enabled=accelerator.is_main_process)
    metrics_log.truncate_after(start_step if start_step else -1)  # a fresh start logs its step-0 eval anew
    if cfg.train.tracker != "none":
        accelerator.init_trackers(run_dir.name, config=_flat(cfg.model_dump(mode="json")))
    engine = collect.make_engine(cfg, model, tokenizer)
    pad_id = tokenizer.pad_token_id or 0

    def run_eval(at: int) -> None:
        """Greedy accuracy on the eval questions at step ``at``: eval.json ("before" = step 0, "after" = step T,
        and "curve" by step, each with the per-question results and a summary per task) and eval_* metrics logged at
        that step."""
        if not eval_qs:
            return
        mine = answer_questions(accelerator.unwrap_model(model), tokenizer, eval_qs[rank::world], cfg, verifier)
        mine = list(zip(range(rank, len(eval_qs), world), mine))
        answers = [a for _, a in sorted(gather_object(mine) if world > 1 else mine, key=lambda pair: pair[0])]
        summary = summarize_eval(answers, [q.record.get(pcfg.task_field) for q in eval_qs])
        if accelerator.is_main_process:
            path = run_dir / EVAL_FILE
            results = _read_eval_file(path) if at > 0 else {}
            results.setdefault("curve", {})[str(at)] = summary
            if at == 0:
                results["before"] = summary
            if at == T:
                results["after"] = summary
            atomic_write_text(path, json.dumps(results, indent=2) + "\n")
            scalars = {f"eval_{k}": v for k, v in summary.items() if isinstance(v, int | float)}
            scalars |= {f"eval_accuracy_{task}": v["accuracy"] for task, v in summary.get("by_task", {}).items()}
            metrics_log.log(at, scalars)
        log.info("eval at step %d: accuracy %.3f (95%% CI %.3f-%.3f, n=%d)", at, summary["accuracy"], *summary["accuracy_ci95"], summary["n"])

    if start_step == 0:
        run_eval(0)

    nonfinite_in_a_row = 0
    bar = tqdm(total=T, initial=start_step, desc="posttrain", disable=not accelerator.is_main_process)
    step = start_step
    with _StopFlag() as stop:
        while step < T and not stop.requested:
            t0 = time.perf_counter()
            rows = batch_indices(step, pcfg.questions_per_step, len(train_qs), cfg.train.seed)[rank::world].tolist()
            rollouts = collect_groups(
                cfg, [train_qs[i] for i in rows], [train_prompts[i] for i in rows], engine, tokenizer, verifier, name,
                generator=step_generator(cfg.train.seed, step, rank, 1),
            )
            metrics = {"lr": scheduler.get_last_lr()[0], **rollouts.metrics}
            metrics.update(grpo_update(
                cfg, rollouts.pairs(), rollouts.advantages.flatten(), model, ref_model, optimizer,
                accelerator, pad_id=pad_id, horizon=pcfg.max_response_tokens, rollout_logprobs=rollouts.logprobs(),
            ))
            engine.sync_weights(model)  # once per step, after the update: the next rollouts see the new weights
            metrics["time_step_s"] = time.perf_counter() - t0
            if not metrics.pop("finite"):
                nonfinite_in_a_row += 1
                log.warning("step %d: non-finite loss or gradient, step skipped (%d in a row)", step, nonfinite_in_a_row)
                if nonfinite_in_a_row >= cfg.train.max_nonfinite:
                    raise TrainingError(
                        f"{nonfinite_in_a_row} consecutive non-finite steps at step {step} (train.max_nonfinite); "
                        "lower posttrain.lr; the last checkpoint is kept"
                    )
            else:
                nonfinite_in_a_row = 0
            scheduler.step()  # once per training step, skipped or not
            step += 1
            if step % cfg.train.log_every == 0 or step == T:
                metrics_log.log(step, metrics)
            if step % cfg.train.sample_every == 0:
                metrics_log.samples(step, rollouts.samples)
            bar.update(1)
            bar.set_postfix({k: f"{metrics[k]:.3g}" for k in ("reward", "rollout_accuracy", "loss") if k in metrics})
            if stop_at is not None and step >= stop_at:
                stop.requested = True
            if pcfg.eval_every and step % pcfg.eval_every == 0 and step < T:
                run_eval(step)
            if step % cfg.train.save_every == 0 or step == T or stop.requested:
                _save(cfg, run_dir, step, model, tokenizer, optimizer, scheduler, accelerator)
    bar.close()
    if step >= T:  # also when a run stopped between its last checkpoint and its final model
        run_eval(T)
        save_final(model, tokenizer, accelerator, run_dir / "final")
        log.info("finished: model saved to %s", run_dir / "final")
    accelerator.end_training()
    stop.check(run_dir, step, T)
    return run_dir


def _read_eval_file(path: Path) -> dict:
    """The results so far in the run's eval.json; a damaged file (it is written atomically, so only by hand) is
    started afresh with a warning rather than stopping the run."""
    if not path.is_file():
        return {}
    results = read_json_object(path)
    if results is None:
        log.warning("%s is damaged; writing it afresh", path)
    return results or {}
