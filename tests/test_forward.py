"""rmt.forward: the shared-prefix training forward and the chunked output head reproduce plain forwards."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rmt import forward, losses

THINK = 96  # stands for the template's "<think>" token


def tiny_llama(attn="eager", seed=0, vocab=97):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, attn_implementation=attn,
    )
    model = LlamaForCausalLM(config)
    for p in model.parameters():  # larger weights than the init, so that a wrong mask shows in the log-probs
        p.data.normal_(0, 0.3)
    return model


def batch(seed=1):
    """Two corpus sequences and responses for RL positions of them, in every shape the trainer can produce."""
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, 90, (40,), generator=g).tolist(), torch.randint(0, 90, (33,), generator=g).tolist()]
    pairs = []
    for b, pos in [(0, 5), (0, 20), (1, 12), (1, 32), (0, 39)]:  # raw template: prefix + <think>, G = 3
        for k in range(3):
            pairs.append((seqs[b][:pos] + [THINK], torch.randint(0, 97, (1 + (5 * k + pos) % 7,), generator=g).tolist()))
    pairs.append((seqs[0][3:25] + [THINK], [5, 6, 7]))  # prefix cut from the left (overflowing context)
    pairs.append(([1, 2, 3] + seqs[1][:20] + [THINK], [8, 9]))  # template text before {prefix}
    pairs.append((seqs[1][:10] + [THINK], []))  # empty response
    pairs.append((seqs[1][:8] + [seqs[1][8]], [4]))  # the template token equals the next corpus token: no tail
    return seqs, pairs


def logprobs_and_grads(model, fn, seqs, pairs, temperature=0.7, **kw):
    model.zero_grad(set_to_none=True)
    out = fn(model, seqs, pairs, temperature, 0, **kw)
    loss = 0.0
    if out.ntp_logprobs is not None:
        loss = loss + (out.ntp_logprobs * torch.linspace(-1, 1, out.ntp_logprobs.numel()).view_as(out.ntp_logprobs)).sum()
    loss = loss + (out.response * torch.linspace(-1, 2, out.response.numel()).view_as(out.response)).sum()
    loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same(out, ref, grads=None, ref_grads=None, atol=1e-5):
    if ref.ntp_logprobs is not None:
        torch.testing.assert_close(out.ntp_logprobs, ref.ntp_logprobs, atol=atol, rtol=0)
    torch.testing.assert_close(out.response, ref.response, atol=atol, rtol=0)
    assert torch.equal(out.response_mask, ref.response_mask)
    for name in ref_grads or {}:
        scale = ref_grads[name].abs().max().clamp(min=1e-8)
        assert (grads[name] - ref_grads[name]).abs().max() / scale < 1e-4, name


# --- chunked output head ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 3, None])
def test_chunked_token_logprobs_match_full_log_softmax(chunk_size):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(11, 8, generator=g, requires_grad=True)
    weight = torch.randn(50, 8, generator=g, requires_grad=True)
    bias = torch.randn(50, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (11,), generator=g)
    upstream = torch.randn(11, generator=g)

    full = torch.log_softmax((hidden @ weight.T + bias) / 0.7, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    expected = torch.autograd.grad((full * upstream).sum(), (hidden, weight, bias))
    got = losses.chunked_token_logprobs(hidden, weight, targets, bias=bias, temperature=0.7, chunk_size=chunk_size)
    grads = torch.autograd.grad((got * upstream).sum(), (hidden, weight, bias))
    torch.testing.assert_close(got, full)
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b)
    assert got.dtype == torch.float32


def test_chunked_token_logprobs_under_bf16_autocast_compute_logits_in_bf16():
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(9, 16, generator=g, requires_grad=True)
    weight = torch.randn(40, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 40, (9,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = torch.log_softmax(torch.nn.functional.linear(hidden, weight).float(), dim=-1).gather(-1, targets[:, None])
        got = losses.chunked_token_logprobs(hidden, weight, targets, chunk_size=4)
    torch.testing.assert_close(got, full.squeeze(-1))  # same bf16 logits, read in float32
    expected = torch.autograd.grad(full.sum(), (hidden, weight))
    for a, b in zip(torch.autograd.grad(got.sum(), (hidden, weight)), expected):
        torch.testing.assert_close(a, b, atol=0.05, rtol=0.05)  # ours accumulates in float32


def test_chunked_token_logprobs_agree_with_target_logprobs():
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(2, 6, 8, generator=g), torch.randn(30, 8, generator=g)
    ids = torch.randint(0, 30, (2, 6), generator=g)
    expected = losses.target_logprobs(hidden @ weight.T, ids)
    got = losses.chunked_token_logprobs(hidden[:, :-1].reshape(-1, 8), weight, ids[:, 1:].reshape(-1), chunk_size=4)
    torch.testing.assert_close(got.view(2, 5), expected[:, 1:])


def test_chunked_head_keeps_only_a_chunk_of_logits_for_backward():
    """Saved for backward: the chunk inputs only, never the (N, V) logits."""
    hidden = torch.randn(64, 8, requires_grad=True)
    weight = torch.randn(1000, 8, requires_grad=True)
    targets = torch.randint(0, 1000, (64,))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        losses.chunked_token_logprobs(hidden, weight, targets, chunk_size=16).sum()
    assert max(saved) < 64 * 1000


# --- shared-prefix pass vs plain forwards ----------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_shared_forward_matches_plain_logprobs_and_gradients(attn):
    model = tiny_llama(attn)
    seqs, pairs = batch()
    ref, ref_grads = logprobs_and_grads(model, forward.plain_forward_logprobs, seqs, pairs, chunked=False)
    for fn, kw in [(forward.plain_forward_logprobs, {"chunked": True}), (forward.shared_forward_logprobs, {})]:
        out, grads = logprobs_and_grads(model, fn, seqs, pairs, **kw)
        assert_same(out, ref, grads, ref_grads)
    assert ref.ntp_logprobs[:, 0].eq(0).all() and ref.ntp_logprobs[1, 33:].eq(0).all()
    assert ref.response[~ref.response_mask].eq(0).all()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_shared_forward_without_sequences_shares_prompts(attn):
    """Old/reference log-probs and presets without NTP pass no sequences: prompts are their own trunks."""
    model = tiny_llama(attn)
    _, pairs = batch()
    ref, ref_grads = logprobs_and_grads(model, forward.plain_forward_logprobs, None, pairs, chunked=False)
    out, grads = logprobs_and_grads(model, forward.shared_forward_logprobs, None, pairs)
    assert out.ntp_logprobs is None
    assert_same(out, ref, grads, ref_grads)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_shared_forward_under_bf16_autocast(attn):
    model = tiny_llama(attn)
    seqs, pairs = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = forward.plain_forward_logprobs(model, seqs, pairs, 1.0, chunked=False)
        out = forward.shared_forward_logprobs(model, seqs, pairs, 1.0)
    assert_same(out, ref, atol=5e-2)  # bf16 rounding: kernels see different shapes


def test_plan_puts_raw_template_prompts_on_their_sequence():
    seqs, pairs = batch()
    trunks = forward.plan_trunks(seqs, pairs)
    on_sequence = {s.response: (t.sequence, s.attach) for t in trunks if t.sequence is not None for s in t.segments}
    for i, (prompt, response) in enumerate(pairs[:15]):
        b, m = on_sequence[i]
        assert seqs[b][:m] == prompt[:m] and m == len(prompt) - 1  # the prefix is shared, <think> is the tail
    assert on_sequence[18] == (1, 9)  # no tail: the whole prompt is a prefix of the sequence
    assert 17 not in on_sequence  # empty response: nothing to compute
    own = [t for t in trunks if t.sequence is None]
    assert sorted(s.response for t in own for s in t.segments) == [15, 16]  # truncated, text before the prefix


def test_plan_without_sequences_nests_prompts():
    _, pairs = batch()
    trunks = forward.plan_trunks(None, pairs[:15])
    # the longest prompt of each sequence is a trunk; the group's other responses and shorter prompts join it
    assert sorted(len(t.ids) for t in trunks) == [33, 40]
    assert sum(len(t.segments) for t in trunks) == 15


def test_rows_split_when_appending_costs_more_than_a_new_row():
    trunk = forward.Trunk(list(range(10)), None)
    trunk.segments = [forward.Segment(i, 10, [1] * 200) for i in range(4)]
    rows = forward.plan_rows([trunk], k=100)
    assert [len(r.segments) for r in rows] == [1, 1, 1, 1] and rows[1].trunk_len == 10
    trunk.segments = [forward.Segment(i, 500, [1] * 30) for i in range(4)]
    trunk.ids = list(range(500))
    assert [len(r.segments) for r in forward.plan_rows([trunk], k=100)] == [4]


# --- dispatch ------------------------------------------------------------------------------------------------


def test_forward_logprobs_uses_the_shared_path(monkeypatch):
    model = tiny_llama("sdpa")
    seqs, pairs = batch()
    calls = []
    real = forward.shared_forward_logprobs
    monkeypatch.setattr(forward, "shared_forward_logprobs", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = forward.forward_logprobs(model, seqs, pairs, 0.7, 0)
    assert calls and forward.fast_paths(model) == forward.FastPaths(chunked=True, shared=True)
    assert_same(out, forward.plain_forward_logprobs(model, seqs, pairs, 0.7, chunked=False))


def test_a_model_that_fails_the_check_gets_the_plain_path(monkeypatch):
    """A head that is not the decoder's output (e.g. soft-capped logits) or an attention kernel that ignores the
    4D mask turns the fast paths off; the results stay those of plain forwards."""
    model = tiny_llama("eager")
    seqs, pairs = batch()
    ref = forward.plain_forward_logprobs(model, seqs, pairs, 0.7, chunked=False)
    real_head = model.get_output_embeddings()

    class SoftCapped(torch.nn.Module):  # logits = 3 * tanh(head / 3): the plain linear head does not reproduce it
        def __init__(self, head):
            super().__init__()
            self.head = head
            self.weight, self.bias = head.weight, head.bias

        def forward(self, x):
            return 3 * torch.tanh(self.head(x) / 3)

    model.lm_head = SoftCapped(real_head)
    capped = forward.plain_forward_logprobs(model, seqs, pairs, 0.7, chunked=False)
    assert forward.fast_paths(model) == forward.FastPaths(chunked=False, shared=True)
    assert_same(forward.forward_logprobs(model, seqs, pairs, 0.7), capped)
    model.lm_head = real_head

    forward._CHECKED.pop(model)
    monkeypatch.setattr(forward, "SHARED_ATTENTION", ())
    assert forward.fast_paths(model) == forward.FastPaths(chunked=True, shared=False)
    assert_same(forward.forward_logprobs(model, seqs, pairs, 0.7), ref)


def long_response_batch(seed=2):
    """A trunk split over several rows: prompts whose shared prefix is the whole sequence (the position's prefix plus
    a template token that equals the sequence's last token), each with responses long enough that appending them to
    one row costs more than a new row (``plan_rows``), and a shorter prompt on the same sequence."""
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, 90, (40,), generator=g).tolist(), torch.randint(0, 90, (30,), generator=g).tolist()]
    pairs = [(list(seqs[0]), torch.randint(0, 97, (60 + k,), generator=g).tolist()) for k in range(3)]
    pairs += [(seqs[0][:25] + [THINK], torch.randint(0, 97, (55,), generator=g).tolist()) for _ in range(2)]
    pairs += [(list(seqs[1]), torch.randint(0, 97, (70,), generator=g).tolist()) for _ in range(2)]
    return seqs, pairs


def ntp_grads(model, fn, seqs, pairs, **kw):
    """Gradients of a weighted sum of the NTP log-probs alone."""
    model.zero_grad(set_to_none=True)
    out = fn(model, seqs, pairs, 0.7, 0, **kw)
    (out.ntp_logprobs * torch.linspace(-1, 1, out.ntp_logprobs.numel()).view_as(out.ntp_logprobs)).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_shared_forward_counts_ntp_once_when_a_trunk_spans_several_rows(attn):
    model = tiny_llama(attn)
    seqs, pairs = long_response_batch()
    rows = forward.plan_rows(forward.plan_trunks(seqs, pairs), forward.dense_tokens_per_pair(model.config))
    full_rows = [r for r in rows if r.trunk.sequence == 0 and r.trunk_len == len(seqs[0])]
    assert len(full_rows) >= 3, "the case under test: repeated rows that hold the whole sequence"
    ref, ref_grads = logprobs_and_grads(model, forward.plain_forward_logprobs, seqs, pairs, chunked=False)
    out, grads = logprobs_and_grads(model, forward.shared_forward_logprobs, seqs, pairs)
    assert_same(out, ref, grads, ref_grads)
    ref_ntp, ntp = ntp_grads(model, forward.plain_forward_logprobs, seqs, pairs, chunked=False), ntp_grads(
        model, forward.shared_forward_logprobs, seqs, pairs)
    for name in ref_ntp:
        ratio = ntp[name].norm() / ref_ntp[name].norm().clamp(min=1e-12)
        assert ratio == pytest.approx(1.0, abs=1e-4), (name, float(ratio))


def test_rollout_logprobs_are_laid_out_like_the_forward_response(tiny_model_dir):
    """update.right_aligned puts an engine's per-token log-probs where forward_logprobs puts the trainer's."""
    from transformers import AutoModelForCausalLM

    from rmt.rollout import HFEngine, StopRule
    from rmt.update import right_aligned

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    assert right_aligned([[1.0], [2.0, 3.0], []]).tolist() == [[0.0, 1.0], [2.0, 3.0], [0.0, 0.0]]
    groups = HFEngine(model).generate_groups([[5, 6, 7], [8, 9]], 3, 6, stop=StopRule(eos_ids=(2,)),
                                            temperature=0.9, generator=torch.Generator().manual_seed(0))
    pairs = [(g.prompt_ids, r.token_ids) for g in groups for r in g.responses]
    with torch.no_grad():
        out = forward.forward_logprobs(model, None, pairs, 0.9)
    engine = right_aligned([r.logprobs for g in groups for r in g.responses])
    assert engine.shape == out.response.shape
    assert (out.response - engine).abs()[out.response_mask].max() < 1e-4
