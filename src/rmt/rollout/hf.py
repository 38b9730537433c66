"""Hugging Face rollout engine: prefill each prompt once, decode its G responses against that one prefix cache.

The idea of nanochat's ``Engine.generate`` (SPEC section 5) on top of Hugging Face's cache objects:

1. Prefill: the B prompts, left-padded into one batch, go through one forward pass with an explicit attention mask
   and ``position_ids = cumsum(mask) - 1``, so padding shifts no position and each row's last column is its last
   prompt token. The prefix is computed once per prompt, not G times.
2. Decode, grouped (the default): one forward pass per step in which the G new tokens of a group are G query
   positions of their prompt's cache row; step s appends them as G keys, and a 4D mask lets response i see the
   prompt and its own earlier tokens only, at position prompt_len + s. Each step reads a prompt's keys and values
   once for its whole group. Response i of prompt b is row b*G + i of the logits and of the results.
3. A row that has stopped keeps running with the batch (its later tokens are discarded); the loop ends when every
   response has stopped or the cap is reached.

Models whose attention does not honour a custom 4D mask (flash-attention; the training forward's ``fast_paths``
check decides) decode one cache row per response instead: ``cache.batch_repeat_interleave(G)`` copies each prefix
cache to its G rows, as ``generate_independent`` decodes.

The cache is preallocated: each layer's keys and values live in buffers sized for the prompt and every token to
come, and each step writes in place (``PreallocatedLayer``). Hugging Face's ``DynamicCache`` concatenates instead,
which allocates and re-copies every layer's whole cache for every new token: at prefix 1,024 that was most of the
decode time (docs/benchmarks.md, section 2). Models whose cache has other kinds of layers (sliding windows, linear
attention) and models without a Hugging Face config keep their own cache and one row per response.

``generate_independent`` is the plain reference: it prefills G copies of every prompt and decodes the same rows in
the same order with the same random draws, so with the same generator it gives the same tokens (tests, benchmark).

Sampling draws from one noise tensor per step over the B*G rows in that order (``sample_tokens``), so every layout
draws the same tokens with the same generator: the one-row layouts give the same logits to the bit, the grouped
decode to float rounding (a draw could only tip on an exact near-tie; in bf16 rounding is coarser).
Log-probabilities follow rollout/base.py's convention and are computed in float32. Any causal LM whose forward takes ``input_ids, attention_mask, position_ids, past_key_values,
use_cache, logits_to_keep`` and returns a cache with ``batch_repeat_interleave`` works (every stock model in
transformers 5). Runs on the model's device and dtype.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from rmt.forward import SHARED_ATTENTION, attention_mask_4d
from rmt.rollout.base import Group, Response, RolloutEngine, StopRule, sample_tokens

_REASONS = ("length", "eos", "stop")  # codes 0, 1, 2 of the per-row finish reason tensor


def model_device(model) -> torch.device:
    device = getattr(model, "device", None)
    return torch.device(device) if device is not None else next(model.parameters()).device


@contextmanager
def _eval_mode(model):
    """Dropout off while generating; the caller's train/eval mode comes back afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _device_generator(generator: torch.Generator | None, device: torch.device) -> torch.Generator | None:
    """The caller's generator, or (when it lives on another device) one on ``device`` seeded from it."""
    same = generator is not None and generator.device.type == device.type and (
        device.type == "cpu" or generator.device.index == (device.index or 0)
    )
    if generator is None or same:
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def _left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


class PreallocatedLayer(DynamicLayer):
    """A full-attention cache layer whose keys and values are views of buffers of ``capacity`` positions.

    ``update`` writes the new positions in place and returns views of the filled part, so attention sees exactly
    what ``DynamicLayer`` would return, without its per-token ``torch.cat`` (a fresh allocation and a copy of the
    whole layer cache). ``batch_repeat_interleave`` copies the rows once into buffers of the new batch size. Any
    operation that replaces the tensors (row selection, reordering) or outgrows the buffers makes the next update
    move the cache into new buffers, so the layer stays correct for every use a ``DynamicLayer`` allows.
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self._keys_buf: torch.Tensor | None = None
        self._values_buf: torch.Tensor | None = None

    def _allocate(self, rows: int, capacity: int, keys: torch.Tensor, values: torch.Tensor, repeats: int = 1) -> None:
        """New buffers of ``rows`` x heads x ``capacity`` x head_dim, holding ``keys``/``values`` repeated per row."""
        n = keys.shape[-2]
        self._keys_buf = keys.new_empty((rows, keys.shape[1], capacity, keys.shape[3]))
        self._values_buf = values.new_empty((rows, values.shape[1], capacity, values.shape[3]))
        for buf, src in ((self._keys_buf, keys), (self._values_buf, values)):
            buf.view(src.shape[0], repeats, *buf.shape[1:])[:, :, :, :n].copy_(src[:, None])
        self.keys, self.values = self._keys_buf[:, :, :n], self._values_buf[:, :, :n]

    def _holds_views(self) -> bool:
        return (
            self._keys_buf is not None
            and self.keys.data_ptr() == self._keys_buf.data_ptr()
            and self.values.data_ptr() == self._values_buf.data_ptr()
            and self.keys.shape[0] == self._keys_buf.shape[0]
        )

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, q = self.get_seq_length(), key_states.shape[-2]
        if n == 0 or not self._holds_views() or n + q > self._keys_buf.shape[2]:
            keys = self.keys if n else key_states[:, :, :0]
            values = self.values if n else value_states[:, :, :0]
            capacity = max(self.capacity, n + q)
            if n and self._holds_views():  # outgrown: double, so that growing token by token stays linear
                capacity = max(capacity, 2 * self._keys_buf.shape[2])
            self._allocate(key_states.shape[0], capacity, keys, values)
        self._keys_buf[:, :, n : n + q].copy_(key_states)
        self._values_buf[:, :, n : n + q].copy_(value_states)
        self.keys, self.values = self._keys_buf[:, :, : n + q], self._values_buf[:, :, : n + q]
        return self.keys, self.values

    def batch_repeat_interleave(self, repeats: int) -> None:
        n = self.get_seq_length()
        if n > 0:
            rows = self.keys.shape[0] * repeats
            self._allocate(rows, max(self.capacity, n), self.keys, self.values, repeats)


def _full_attention_cache(model):
    """The model's own ``DynamicCache`` when all its layers are plain full-attention layers, else None."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "get_text_config"):
        return None
    try:
        cache = DynamicCache(config=config)
    except Exception:  # a config the cache cannot read: the model's own cache it is
        return None
    if not cache.layers or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None
    return cache


def preallocated_cache(model, capacity: int):
    """A ``DynamicCache`` for ``model`` whose layers are ``PreallocatedLayer``s of ``capacity`` positions, or None
    where the model has no Hugging Face config or its cache has layers of other kinds (sliding windows, linear
    attention, ...): those keep the model's own cache."""
    cache = _full_attention_cache(model)
    if cache is not None:
        cache.layers = [PreallocatedLayer(capacity) for _ in cache.layers]
    return cache


class HFEngine(RolloutEngine):
    """Rollouts with a Hugging Face causal LM and a manual KV-cache decode loop.

    ``pad_id`` only fills left padding (always masked out). ``shared_prefix=False`` prefills G copies of each prompt
    instead of sharing one prefill, and ``preallocate=False`` lets the model build its own (concatenating) cache:
    the references the default path is checked and benchmarked against.
    """

    def __init__(self, model, pad_id: int = 0, shared_prefix: bool = True, preallocate: bool = True):
        self.model = model
        self.pad_id = pad_id
        self.shared_prefix = shared_prefix
        self.preallocate = preallocate

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
    ) -> list[Group]:
        if group_size < 1 or max_new_tokens < 1:
            raise ValueError(f"group_size and max_new_tokens must be >= 1, got {group_size} and {max_new_tokens}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if not prompts:
            return []
        model, G = self.model, group_size
        device = model_device(model)
        with torch.inference_mode(), _eval_mode(model):
            generator = _device_generator(generator, device) if temperature > 0 else None
            grouped = self.shared_prefix and G > 1 and self.preallocate and grouped_decode_works(model)
            rows = prompts if self.shared_prefix else [p for p in prompts for _ in range(G)]
            ids, prompt_mask = _left_pad(rows, self.pad_id, device)
            positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
            capacity = ids.shape[1] + (G if grouped else 1) * max_new_tokens
            cache = preallocated_cache(model, capacity) if self.preallocate else None
            out = model(input_ids=ids, attention_mask=prompt_mask, position_ids=positions, past_key_values=cache,
                        use_cache=True, logits_to_keep=1)
            logits, cache = out.logits[:, -1].float(), out.past_key_values
            if self.shared_prefix and G > 1:
                logits = logits.repeat_interleave(G, 0)
            if grouped:
                step = _grouped_step(model, cache, prompt_mask, G, max_new_tokens)
            else:
                if self.shared_prefix and G > 1:
                    cache.batch_repeat_interleave(G)
                    prompt_mask = prompt_mask.repeat_interleave(G, 0)
                step = _row_step(model, cache, prompt_mask, max_new_tokens)
            tokens, logprobs, lengths, reasons = _decode(step, logits, max_new_tokens, stop, temperature, top_p, generator)
        tokens, logprobs, lengths, reasons = tokens.tolist(), logprobs.tolist(), lengths.tolist(), reasons.tolist()
        groups = []
        for b, prompt in enumerate(prompts):
            responses = []
            for r in range(b * G, (b + 1) * G):
                n = lengths[r]
                responses.append(Response(tokens[r][:n], logprobs[r][:n], _REASONS[reasons[r]]))
            groups.append(Group(list(prompt), responses))
        return groups


def _row_step(model, cache, prompt_mask: torch.Tensor, max_new_tokens: int):
    """One decode step with one cache row per response: each row's new token attends to its prompt (minus the
    padding) and its own earlier tokens. Returns ``step(tokens, t) -> next logits`` (rows x vocab, float32)."""
    n, width = prompt_mask.shape
    mask = torch.cat([prompt_mask, prompt_mask.new_ones((n, max_new_tokens))], dim=1)
    prompt_lens = prompt_mask.sum(-1)
    state = {"cache": cache}

    def step(token: torch.Tensor, t: int) -> torch.Tensor:
        out = model(
            input_ids=token[:, None],
            attention_mask=mask[:, : width + t + 1],
            position_ids=(prompt_lens + t)[:, None],
            past_key_values=state["cache"],
            use_cache=True,
        )
        state["cache"] = out.past_key_values
        return out.logits[:, -1].float()

    return step


def _grouped_step(model, cache, prompt_mask: torch.Tensor, G: int, max_new_tokens: int):
    """One decode step with one cache row per prompt: the G new tokens of a group go in as G query positions of
    their prompt's row. Step s appends G keys to the row (key W + s*G + i is response i's token s); a 4D mask lets
    response i see the prompt (minus its padding) and its own tokens only, at position prompt_len + s. Each step
    then reads the prompt's keys and values once per group instead of once per response. Rows b*G + i of the
    returned logits are response i of prompt b, the order of the row layout."""
    B, width = prompt_mask.shape
    own = torch.eye(G, dtype=torch.bool, device=prompt_mask.device).repeat(1, max_new_tokens)  # (G, G * cap)
    allowed = torch.cat([prompt_mask.bool()[:, None, :].expand(B, G, width), own.expand(B, G, -1)], dim=-1)
    mask = attention_mask_4d(allowed[:, None].contiguous(), model)  # (B, 1, G, width + G * cap)
    positions = prompt_mask.sum(-1, keepdim=True)  # (B, 1): position of each prompt's first response token

    def step(token: torch.Tensor, t: int) -> torch.Tensor:
        out = model(
            input_ids=token.view(B, G),
            attention_mask=mask[..., : width + G * (t + 1)],
            position_ids=(positions + t).expand(B, G),
            past_key_values=cache,
            use_cache=True,
        )
        return out.logits.reshape(B * G, -1).float()

    return step


_GROUPED_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def grouped_decode_works(model) -> bool:
    """May this model decode a group's G responses as G query positions of one cache row (``_grouped_step``)?

    It needs the preallocated cache (full-attention layers) and an attention kernel that honours a custom 4D mask
    with explicit position ids; the latter is the training forward's own check (``rmt.forward.fast_paths``),
    decided once per model and attention kernel. Both hold for every stock full-attention model with ``eager`` or
    ``sdpa``; not for flash-attention or sliding windows, which decode one row per response.
    """
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    cached = _GROUPED_CHECKED.get(model)
    if cached is not None and cached[0] == impl:
        return cached[1]
    from rmt.forward import fast_paths

    ok = impl in SHARED_ATTENTION and _full_attention_cache(model) is not None and fast_paths(model).shared
    _GROUPED_CHECKED[model] = (impl, ok)
    return ok


def _decode(step, logits, max_new_tokens, stop: StopRule, temperature, top_p, generator):
    """The decode loop over all rows: sample, apply the stop rules, ``step`` the model for the next logits.
    Returns tokens and logprobs (rows x cap), lengths and finish-reason codes."""
    n = logits.shape[0]
    device = logits.device
    tokens = torch.zeros((n, max_new_tokens), dtype=torch.long, device=device)
    logprobs = torch.zeros((n, max_new_tokens), dtype=torch.float32, device=device)
    lengths = torch.full((n,), max_new_tokens, dtype=torch.long, device=device)
    reasons = torch.zeros(n, dtype=torch.long, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    since_close = torch.full((n,), -1, dtype=torch.long, device=device)  # tokens after the first </think>; -1 = none yet
    eos_ids = torch.tensor(stop.eos_ids, dtype=torch.long, device=device)
    for t in range(max_new_tokens):
        token, logprob = sample_tokens(logits, temperature, top_p, generator)
        tokens[:, t], logprobs[:, t] = token, logprob

        is_eos = torch.isin(token, eos_ids)
        is_stop = torch.zeros_like(done)
        if stop.after_close is not None:
            since_close = torch.where(since_close >= 0, since_close + 1, torch.where(token == stop.close_id, 0, -1))
            is_stop = since_close == stop.after_close
        ends_now = ~done & (is_eos | is_stop)
        lengths = torch.where(ends_now, t + 1, lengths)
        reasons = torch.where(ends_now, torch.where(is_eos, 1, 2), reasons)
        done |= ends_now
        if t + 1 == max_new_tokens or bool(done.all()):
            break
        logits = step(token, t)
    return tokens, logprobs, lengths, reasons


def generate_independent(
    model,
    prompts: list[list[int]],
    group_size: int,
    max_new_tokens: int,
    *,
    stop: StopRule,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    pad_id: int = 0,
) -> list[Group]:
    """The reference without prefix sharing: G copies of each prompt are prefilled, then decoded like the engine."""
    engine = HFEngine(model, pad_id=pad_id, shared_prefix=False)
    return engine.generate_groups(
        prompts, group_size, max_new_tokens, stop=stop, temperature=temperature, top_p=top_p, generator=generator
    )
