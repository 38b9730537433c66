"""Log-probabilities for the loss: one shared-prefix pass per corpus sequence, and a chunked output head.

The training forward of RMT reads two things: the NTP targets of the corpus sequences and the tokens of every
rollout response. With the raw template (``{prefix}<think>``) the prompt of an RL position is the sequence's own
prefix plus a few template tokens, so the prompt's forward is already part of the sequence's forward that NTP
needs. One pass per sequence serves the NTP loss and all of that sequence's responses:

    row = [ S | tail_1 + r_1 | tail_2 + r_2 | ... ]

S, the *trunk*, is the corpus sequence. Segment i holds what prompt i adds to the prefix of S it starts with
(``tail_i``: ``<think>`` for the default template) and response i without its last token (which predicts nothing).
A 4D attention mask lets S attend causally to itself, and segment i attend to S[:m_i] (m_i = length of the shared
prefix) and causally to itself; its position ids go on from m_i. Every log-probability then equals that of a
separate forward over prompt_i + response_i (SPEC section 7), and gradients flow into S once. The NTP logits over S
are those of a plain forward of S.

A prompt less than half of which is a prefix of any sequence (template text before ``{prefix}``, a prefix cut from
the left because it overflowed the context, a chat template) gets its own trunk: the prompt itself, shared by the G
responses of its group and by any shorter prompt that shares half of itself with it (so ``sequences=None``, as for
old/reference log-probs or a preset without NTP, still computes each prompt once). Segments are added to a row
while that costs less attention than a new row that repeats the trunk prefix (``_append_is_cheaper``).

Fallbacks. The shared pass needs an attention kernel that takes a custom 4D mask with explicit position ids
(``eager`` and ``sdpa`` in transformers 5; not flash-attention, not sliding-window models). The chunked head needs
an output layer that is a plain linear map of the decoder's last hidden state (no logit soft-capping or scaling).
Both are checked once per model on a small random input against separate plain forwards (``fast_paths``); a model
that fails falls back to the plain path, with full logits where the head check failed. Sharded models (FSDP) use
the plain full-logits path.

Memory. Log-probabilities are read from the last hidden states through ``losses.chunked_token_logprobs``: at most
a chunk of positions x V logits exist at a time, in the forward and (recomputed) in the backward, instead of
B x L x V floats for a 151,936-token vocabulary.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from rmt import losses

log = logging.getLogger(__name__)

SHARED_ATTENTION = ("eager", "sdpa")  # kernels that honour a custom 4D mask with explicit position ids
MIN_SHARED_FRACTION = 0.5  # a prompt joins a trunk when at least this share of it is a prefix of the trunk


@dataclass
class ForwardOut:
    ntp_logprobs: torch.Tensor | None  # (B, L): log p(ids[pos] | ids[:pos]); column 0 and padding are 0
    response: torch.Tensor | None  # (N, R): log p of each response token (temperature-scaled), right-aligned
    response_mask: torch.Tensor | None  # (N, R) bool


def unwrap(model):
    """The Hugging Face model inside a DDP wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model


def model_device(model) -> torch.device:
    return next(unwrap(model).parameters()).device


# --- one forward pass, read at chosen positions ---------------------------------------------------------------

Reader = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def run_model(model, ids, attention_mask, position_ids, *, chunked: bool, keep: int = 0) -> Reader:
    """Forward once; return ``read(rows, cols, targets, temperature)`` -> log p(targets | prefix ending at (row, col)).

    chunked: read through the output layer in chunks from the decoder's last hidden state, captured by a hook on the
    decoder (the forward still goes through ``model``, so a DDP wrapper sees it) while the model computes logits for
    one position only. Otherwise read full logits (``keep`` > 0: only the last ``keep`` columns are computed).
    """
    kwargs = {"input_ids": ids, "attention_mask": attention_mask, "position_ids": position_ids, "use_cache": False}
    if not chunked:
        logits = model(**kwargs, logits_to_keep=keep).logits
        offset = ids.shape[1] - logits.shape[1]

        def read_logits(rows, cols, targets, temperature):
            logp = torch.log_softmax(logits[rows, cols - offset].float() / temperature, dim=-1)
            return logp.gather(-1, targets[:, None]).squeeze(-1)

        return read_logits

    hf = unwrap(model)
    captured = {}

    def grab(module, args, output):
        captured["hidden"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    handle = hf.get_decoder().register_forward_hook(grab)
    try:
        model(**kwargs, logits_to_keep=1)
    finally:
        handle.remove()
    hidden, head = captured["hidden"], hf.get_output_embeddings()

    def read_hidden(rows, cols, targets, temperature):
        return losses.chunked_token_logprobs(hidden[rows, cols], head.weight, targets, bias=head.bias, temperature=temperature)

    return read_hidden


def _tensor(values, device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values, dtype=np.int64), device=device)


def _assemble(lp: torch.Tensor, rows, cols, shape, device) -> torch.Tensor:
    """Scatter log-probs into a zero (float32) tensor of ``shape``; differentiable."""
    out = torch.zeros(shape, dtype=torch.float32, device=device)
    if len(rows) == 0:
        return out
    return out.index_put((_tensor(rows, device), _tensor(cols, device)), lp.float())


@dataclass
class Reads:
    """Log-probabilities to read from a forward: the (row, col) whose hidden state predicts the target, the target
    token, and where the value goes in the output tensor (dst_row, dst_col)."""

    src_row: list[int] = field(default_factory=list)
    src_col: list[int] = field(default_factory=list)
    target: list[int] = field(default_factory=list)
    dst_row: list[int] = field(default_factory=list)
    dst_col: list[int] = field(default_factory=list)

    def add(self, src_row, src_col, target, dst_row, dst_col) -> None:
        self.src_row.extend(src_row)
        self.src_col.extend(src_col)
        self.target.extend(target)
        self.dst_row.extend(dst_row)
        self.dst_col.extend(dst_col)

    def run(self, read: Reader, temperature: float, shape, device) -> torch.Tensor:
        src = (_tensor(self.src_row, device), _tensor(self.src_col, device))
        lp = read(*src, _tensor(self.target, device), temperature) if self.target else torch.zeros(0, device=device)
        return _assemble(lp, self.dst_row, self.dst_col, shape, device)


def _response_layout(responses) -> tuple[int, torch.Tensor]:
    """R = longest response; the (N, R) mask of right-aligned response tokens."""
    R = max(len(r) for _, r in responses)
    mask = torch.zeros((len(responses), R), dtype=torch.bool)
    for i, (_, r) in enumerate(responses):
        if r:
            mask[i, R - len(r) :] = True
    return R, mask


# --- the plain path: one row per sequence and one per response -------------------------------------------------


def _pad(rows: list[list[int]], pad: int, left: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, sl] = torch.tensor(r, dtype=torch.long)
        mask[i, sl] = 1
    return ids.to(device), mask.to(device)


def plain_forward_logprobs(model, sequences, responses, temperature: float, pad_id: int = 0, *,
                           chunked: bool = True, read_ntp: bool = True) -> ForwardOut:
    """The reference: a forward over the right-padded sequences, and one over the left-padded prompt + response
    rows (each prompt computed once per response). ``chunked=False`` reads full logits (the original path).
    ``read_ntp=False``: the response log-probs only (the sequences' forward is skipped)."""
    device = model_device(model)
    ntp = resp = resp_mask = None
    if sequences and read_ntp:
        ids, mask = _pad(sequences, pad_id, left=False, device=device)
        reads = Reads()
        for b, s in enumerate(sequences):
            reads.add([b] * (len(s) - 1), range(len(s) - 1), s[1:], [b] * (len(s) - 1), range(1, len(s)))
        ntp = reads.run(run_model(model, ids, mask, None, chunked=chunked), 1.0, ids.shape, device)
    if responses:
        R, resp_mask = _response_layout(responses)
        resp_mask = resp_mask.to(device)
        resp = torch.zeros(resp_mask.shape, device=device)
        if R > 0:
            ids, mask = _pad([p + r for p, r in responses], pad_id, left=True, device=device)
            W, reads = ids.shape[1], Reads()
            for i, (_, r) in enumerate(responses):  # response token j sits at column W - len(r) + j
                n = len(r)
                reads.add([i] * n, range(W - n - 1, W - 1), r, [i] * n, range(R - n, R))
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            resp = reads.run(run_model(model, ids, mask, positions, chunked=chunked, keep=R + 1), temperature, resp_mask.shape, device)
    return ForwardOut(ntp, resp, resp_mask)


# --- the shared-prefix path ------------------------------------------------------------------------------------


@dataclass
class Segment:
    response: int  # index into ``responses``
    attach: int  # m: the segment sees trunk[:m] (= prompt[:m])
    tokens: list[int]  # prompt[m:] + response[:-1]


@dataclass
class Trunk:
    ids: list[int]
    sequence: int | None  # index into ``sequences`` (its NTP targets are read), None for a prompt used as trunk
    segments: list[Segment] = field(default_factory=list)


@dataclass
class Row:
    """One row of the packed batch: trunk[:trunk_len] followed by segments. ``reads_ntp``: this row reads the
    sequence's NTP targets (its trunk's first row only; a repeated row may hold the whole sequence too, when a
    prompt's shared prefix covers it, and must not add them again)."""

    trunk: Trunk
    trunk_len: int
    segments: list[Segment] = field(default_factory=list)
    reads_ntp: bool = False

    @property
    def length(self) -> int:
        return self.trunk_len + sum(len(s.tokens) for s in self.segments)


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


def plan_trunks(sequences, responses) -> list[Trunk]:
    """Assign every non-empty response to a trunk: the sequence (or earlier prompt) its prompt shares most with.

    A prompt joins a trunk when the shared prefix m is at least ``MIN_SHARED_FRACTION`` of the prompt; otherwise
    the prompt becomes a new trunk (longest prompts first, so shorter prompts can join them).
    """
    trunks = [Trunk(list(s), b) for b, s in enumerate(sequences or [])]
    arrays = [np.asarray(s, dtype=np.int64) for s in sequences or []]
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i, (p, r) in enumerate(responses or []):
        if r:
            by_prompt.setdefault(tuple(p), []).append(i)
    for prompt in sorted(by_prompt, key=len, reverse=True):
        p = np.asarray(prompt, dtype=np.int64)
        shared = [common_prefix(p, a) for a in arrays]
        best = int(np.argmax(shared)) if shared else -1
        m = shared[best] if shared else 0
        if m < 1 or m < MIN_SHARED_FRACTION * len(prompt):
            trunks.append(Trunk(list(prompt), None))
            arrays.append(p)
            best, m = len(trunks) - 1, len(prompt)
        for i in by_prompt[prompt]:
            trunks[best].segments.append(Segment(i, m, list(prompt[m:]) + list(responses[i][1][:-1])))
    return trunks


def _append_is_cheaper(row_len: int, seg_len: int, attach: int, k: float) -> bool:
    """Cost of a row of n tokens ~ k*n + n^2 (dense layers per token, attention per query-key pair). Appending a
    segment of s tokens to a row of n costs k*s + 2*n*s + s^2; a new row holding trunk[:m] + segment costs
    k*(m + s) + (m + s)^2. Append when that is not more."""
    return 2 * row_len * seg_len <= attach * (k + attach) + 2 * attach * seg_len


def dense_tokens_per_pair(config) -> float:
    """Roughly how many query-key pairs of attention cost as much as one token through the dense layers (about
    (4h^2 + 3hi) / 2h), halved because eager attention on a CPU also pays for the softmax and the mask."""
    h = getattr(config, "hidden_size", 1024)
    i = getattr(config, "intermediate_size", 4 * h)
    return (2 * h + 1.5 * i) / 2


def plan_rows(trunks: list[Trunk], k: float) -> list[Row]:
    """Lay trunks and segments out in rows: a sequence's first row always holds all of it and alone reads its NTP
    targets; segments, longest shared prefix first, go to the current row or to a new row that repeats trunk[:m]."""
    rows = []
    for trunk in trunks:
        row = Row(trunk, len(trunk.ids), reads_ntp=trunk.sequence is not None)
        rows.append(row)
        for seg in sorted(trunk.segments, key=lambda s: -s.attach):
            if row.segments and not _append_is_cheaper(row.length, len(seg.tokens), seg.attach, k):
                row = Row(trunk, seg.attach)
                rows.append(row)
            row.segments.append(seg)
    return rows


@dataclass
class Packed:
    ids: torch.Tensor  # (B', L)
    positions: torch.Tensor  # (B', L)
    allowed: torch.Tensor  # (B', 1, L, L) bool: query may attend to key
    ntp: Reads  # NTP targets of the sequences: dst = (sequence, position)
    responses: Reads  # response tokens: dst = (response, right-aligned column)


def pack(rows: list[Row], responses, R: int, pad_id: int) -> Packed:
    """Token ids, position ids, the attention pattern and the reads of a list of rows."""
    B, L = len(rows), max(r.length for r in rows)
    ids = np.full((B, L), pad_id, dtype=np.int64)
    positions = np.zeros((B, L), dtype=np.int64)
    owner = np.full((B, L), -2, dtype=np.int64)  # -1 trunk, s >= 0 segment s of the row, -2 padding
    sees_trunk = np.zeros((B, L), dtype=np.int64)  # how many trunk tokens each query sees
    ntp, resp = Reads(), Reads()
    for b, row in enumerate(rows):
        t = row.trunk_len
        ids[b, :t], positions[b, :t], owner[b, :t], sees_trunk[b, :t] = row.trunk.ids[:t], range(t), -1, range(1, t + 1)
        if row.reads_ntp:  # once per sequence: a gradient read twice would count twice
            ntp.add([b] * (t - 1), range(t - 1), row.trunk.ids[1:t], [row.trunk.sequence] * (t - 1), range(1, t))
        start = t
        for s, seg in enumerate(row.segments):
            end = start + len(seg.tokens)
            ids[b, start:end], positions[b, start:end] = seg.tokens, range(seg.attach, seg.attach + end - start)
            owner[b, start:end], sees_trunk[b, start:end] = s, seg.attach
            prompt, response = responses[seg.response]
            # response[j] is predicted by the token at logical index x = len(prompt) + j - 1 of prompt + response:
            # in the trunk when x < m (the first response token of a prompt without tail), else in the segment.
            x = np.arange(len(response)) + len(prompt) - 1
            n = len(response)
            resp.add([b] * n, np.where(x < seg.attach, x, start + x - seg.attach).tolist(), response,
                     [seg.response] * n, range(R - n, R))
            start = end
    key = np.arange(L)
    trunk_key = (owner == -1)[:, None, :] & (key[None, None, :] < sees_trunk[:, :, None])
    own_segment = (owner[:, :, None] == owner[:, None, :]) & (owner[:, :, None] >= 0) & (key[None, :] <= key[:, None])[None]
    allowed = trunk_key | own_segment | np.eye(L, dtype=bool)[None]  # padding attends to itself only
    return Packed(torch.from_numpy(ids), torch.from_numpy(positions), torch.from_numpy(allowed[:, None]), ntp, resp)


def attention_mask_4d(allowed: torch.Tensor, model) -> torch.Tensor:
    """sdpa takes the boolean mask as it is; eager adds it to the scores (0 where allowed, the dtype's minimum
    elsewhere, as transformers builds its own)."""
    hf = unwrap(model)
    if hf.config._attn_implementation == "sdpa":
        return allowed
    dtype = next(hf.parameters()).dtype
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def shared_forward_logprobs(model, sequences, responses, temperature: float, pad_id: int = 0, *,
                            chunked: bool = True, read_ntp: bool = True) -> ForwardOut:
    """The same outputs as ``plain_forward_logprobs``, from one packed pass per trunk (see the module docstring).
    ``read_ntp=False``: the same pass (the sequences still lay out the rows), without reading the NTP targets."""
    device = model_device(model)
    R, resp_mask = _response_layout(responses) if responses else (0, None)
    trunks = plan_trunks(sequences, responses)
    ntp = resp = None
    if trunks:
        packed = pack(plan_rows(trunks, dense_tokens_per_pair(unwrap(model).config)), responses, R, pad_id)
        read = run_model(
            model, packed.ids.to(device), attention_mask_4d(packed.allowed.to(device), model),
            packed.positions.to(device), chunked=chunked,
        )
        if sequences and read_ntp:
            ntp = packed.ntp.run(read, 1.0, (len(sequences), max(len(s) for s in sequences)), device)
        if responses:
            resp = packed.responses.run(read, temperature, resp_mask.shape, device)
    if responses:
        resp_mask = resp_mask.to(device)
        resp = torch.zeros(resp_mask.shape, device=device) if resp is None else resp  # every response empty
    return ForwardOut(ntp, resp, resp_mask)


# --- choosing the path -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FastPaths:
    chunked: bool  # the output layer may be applied in chunks to the decoder's last hidden state
    shared: bool  # one packed pass with a 4D mask reproduces separate forwards


_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _sharded(model) -> bool:
    return any("FullyShardedDataParallel" in type(m).__name__ or "FSDP" in type(m).__name__ for m in (model, unwrap(model)))


def _local_attention(config) -> bool:
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True):
        return True
    return any(t != "full_attention" for t in getattr(config, "layer_types", None) or [])


def fast_paths(model) -> FastPaths:
    """Which fast paths reproduce plain forwards on this model: checked once per model (and attention kernel) on a
    small random input, in eval mode, without autocast, against full-logit plain forwards."""
    hf = unwrap(model)
    impl = getattr(hf.config, "_attn_implementation", None)
    cached = _CHECKED.get(hf)
    if cached is not None and cached[0] == impl:
        return cached[1]
    result = FastPaths(False, False)
    if not _sharded(model):
        result = _check(hf, impl)
    _CHECKED[hf] = (impl, result)
    if not result.shared:
        log.info("shared-prefix training forward off for this model (attention %s): plain forward used", impl)
    return result


def _agrees(compute: Callable[[], ForwardOut], ref: ForwardOut, tol: float) -> bool:
    """``compute()`` runs and gives the reference's values (an error, e.g. a rejected 4D mask, counts as no)."""
    try:
        out = compute()
    except Exception as e:  # noqa: BLE001 - any failure means: use the plain path
        log.info("fast forward path failed on this model (%s: %s)", type(e).__name__, e)
        return False
    return all(
        (x is None and y is None) or (x is not None and y is not None and torch.allclose(x, y, atol=tol, rtol=0))
        for x, y in ((out.ntp_logprobs, ref.ntp_logprobs), (out.response, ref.response))
    )


@contextlib.contextmanager
def _without_mixed_precision_wrapper(hf):
    """Accelerate's mixed precision wraps a prepared model's ``forward`` in autocast (keeping the plain method as
    ``_original_forward``), which would re-enable autocast inside the check: the check would then compare bf16
    logits of the model's own head with the chunked head outside autocast, and turn the chunked head off for the
    trained model only (so policy and reference log-probs took different paths). Run the plain method for the
    check."""
    original = hf.__dict__.get("_original_forward")
    wrapped = hf.__dict__.get("forward")
    if original is None or wrapped is None:
        yield
        return
    hf.forward = original
    try:
        yield
    finally:
        hf.forward = wrapped


def _check(hf, impl) -> FastPaths:
    """Both fast paths against full-logit plain forwards, on a random input that exercises every case of the plan:
    prompts on a sequence with a tail and without one, a prompt of its own, two sequences."""
    device = model_device(hf)
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, hf.get_output_embeddings().weight.shape[0], (34,), generator=g).tolist()
    sequences = [seq[:24], seq[:16]]
    responses = [(seq[:7] + [seq[20]], seq[9:13]), (seq[:15] + [seq[3]], seq[1:4]), (seq[24:], seq[2:5]),
                 (seq[:10], seq[10:12])]
    tol = 1e-4 if next(hf.parameters()).dtype == torch.float32 else 5e-2
    was_training = hf.training
    hf.eval()
    try:  # on the unwrapped model: a DDP wrapper's forward could start collectives that other processes skip
        with torch.no_grad(), torch.autocast(device.type, enabled=False), _without_mixed_precision_wrapper(hf):
            ref = plain_forward_logprobs(hf, sequences, responses, 1.0, chunked=False)
            chunked = _agrees(lambda: plain_forward_logprobs(hf, sequences, responses, 1.0, chunked=True), ref, tol)
            shared = impl in SHARED_ATTENTION and not _local_attention(hf.config) and _agrees(
                lambda: shared_forward_logprobs(hf, sequences, responses, 1.0, chunked=chunked), ref, tol
            )
    finally:
        hf.train(was_training)
    return FastPaths(chunked, shared)


def forward_logprobs(model, sequences: list[list[int]] | None, responses: list[tuple[list[int], list[int]]] | None,
                     temperature: float, pad_id: int = 0, *, shared: bool = True, read_ntp: bool = True) -> ForwardOut:
    """Log-probabilities for the loss: NTP targets of ``sequences`` and the tokens of each (prompt, response).

    Shared-prefix pass when the model supports it (``fast_paths``) and ``shared``; plain rows otherwise. Both read
    logits through the chunked output head when the model allows it. ``read_ntp=False`` gives the response
    log-probs of the very same computation without the NTP reads (old and reference log-probs).
    """
    paths = fast_paths(model)
    kw = {"chunked": paths.chunked, "read_ntp": read_ntp}
    if shared and paths.shared:
        return shared_forward_logprobs(model, sequences, responses, temperature, pad_id, **kw)
    return plain_forward_logprobs(model, sequences, responses, temperature, pad_id, **kw)
