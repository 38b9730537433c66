"""Rollout engine: shared-prefix KV cache vs independent prefill, left padding, stop rules, log-probs, the cap."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rmt.config import RolloutConfig
from rmt.rollout import HFEngine, Response, StopRule, cut_to_rule, generate_independent, make_engine, sample_tokens

EOS, CLOSE, FREE = 1, 2, -1  # token ids of the scripted model; FREE = sample from ScriptedLM.free_logits


class _RowState:
    """The scripted model's 'KV cache': which script each row plays and where its prompt ended."""

    def __init__(self, keys: torch.Tensor, start: torch.Tensor):
        self.keys, self.start = keys, start

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.keys, self.start = self.keys.repeat_interleave(repeats), self.start.repeat_interleave(repeats)


class ScriptedLM(torch.nn.Module):
    """A causal-LM stand-in that plays a fixed token script per prompt (chosen by the prompt's last token).

    Step k of a response is ``scripts[key][k]`` (the last entry repeats); FREE steps use ``free_logits``. It reads
    the step from ``position_ids`` and checks that the attention mask covers exactly positions 0..pos, so wrong
    positions or masks show up as wrong tokens or a failed assertion.
    """

    def __init__(self, scripts: dict[int, list[int]], vocab_size: int = 16, free_logits: list[float] | None = None):
        super().__init__()
        self.scripts, self.vocab_size = scripts, vocab_size
        self.free_logits = torch.tensor(free_logits or [0.0] * vocab_size)
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.calls = 0

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def forward(self, input_ids, attention_mask, position_ids, past_key_values=None, use_cache=True, logits_to_keep=0):
        self.calls += 1
        last_pos = position_ids[:, -1]
        assert attention_mask.sum(-1).tolist() == (last_pos + 1).tolist()
        if past_key_values is None:
            past_key_values = _RowState(input_ids[:, -1].clone(), last_pos + 1)
        state = past_key_values
        logits = torch.full((input_ids.shape[0], 1, self.vocab_size), -1e4)
        for row, (key, step) in enumerate(zip(state.keys.tolist(), (last_pos + 1 - state.start).tolist())):
            script = self.scripts[key]
            token = script[min(step, len(script) - 1)]
            if token == FREE:
                logits[row, 0] = self.free_logits
            else:
                logits[row, 0, token] = 0.0
        return SimpleNamespace(logits=logits, past_key_values=state)


@pytest.fixture(scope="module")
def tok_model(tiny_model_dir):
    """The tiny Llama with larger random weights, so greedy outputs vary instead of repeating one token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return tok, model.eval()


def _prompts(tok):
    return [tok.encode(t) for t in ("The cat sat", "A quick brown fox jumps over the lazy", "12+7=19", "Mid")]


def _tokens(groups):
    return [[r.token_ids for r in g.responses] for g in groups]


def test_shared_prefix_matches_independent_greedy(tok_model):
    tok, model = tok_model
    stop = StopRule.from_tokenizer(tok)
    prompts = _prompts(tok)
    shared = HFEngine(model, pad_id=tok.pad_token_id).generate_groups(prompts, 3, 16, stop=stop, temperature=0.0)
    indep = generate_independent(model, prompts, 3, 16, stop=stop, temperature=0.0, pad_id=tok.pad_token_id)
    assert _tokens(shared) == _tokens(indep)
    for gs, gi in zip(shared, indep):
        assert gs.prompt_ids == gi.prompt_ids
        for rs, ri in zip(gs.responses, gi.responses):
            assert rs.finish_reason == ri.finish_reason
            assert rs.logprobs == pytest.approx(ri.logprobs, abs=1e-5)


def test_shared_prefix_matches_independent_sampling(tok_model):
    tok, model = tok_model
    stop = StopRule.from_tokenizer(tok)
    prompts = _prompts(tok)
    kw = dict(stop=stop, temperature=0.9, top_p=0.95)
    shared = HFEngine(model, pad_id=tok.pad_token_id).generate_groups(
        prompts, 4, 12, generator=torch.Generator().manual_seed(7), **kw
    )
    indep = generate_independent(model, prompts, 4, 12, generator=torch.Generator().manual_seed(7), pad_id=tok.pad_token_id, **kw)
    assert _tokens(shared) == _tokens(indep)  # same rows, same order, same random draws
    assert all(len({tuple(t) for t in g}) > 1 for g in _tokens(shared))  # it did sample: a group is not all alike
    again = HFEngine(model, pad_id=tok.pad_token_id).generate_groups(
        prompts, 4, 12, generator=torch.Generator().manual_seed(7), **kw
    )
    assert _tokens(again) == _tokens(shared)  # seeded: reproducible


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_left_padding_matches_each_prompt_alone(tok_model, attn):
    tok, model = tok_model
    model.set_attn_implementation(attn)
    try:
        stop = StopRule.from_tokenizer(tok)
        engine = HFEngine(model, pad_id=tok.pad_token_id)
        prompts = _prompts(tok)
        assert len({len(p) for p in prompts}) == len(prompts)
        batched = engine.greedy(prompts, 12, stop=stop)
        for prompt, resp in zip(prompts, batched):
            alone = engine.greedy([prompt], 12, stop=stop)[0]
            assert resp.token_ids == alone.token_ids
            assert resp.logprobs == pytest.approx(alone.logprobs, abs=1e-5)
    finally:
        model.set_attn_implementation("sdpa")


def test_greedy_matches_hf_generate(tok_model):
    tok, model = tok_model
    prompt = _prompts(tok)[1]
    ours = HFEngine(model).greedy([prompt], 12, stop=StopRule(eos_ids=(tok.eos_token_id,)))[0]
    ref = model.generate(
        torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )[0, len(prompt) :].tolist()
    assert ours.token_ids == ref


@pytest.mark.parametrize("temperature,top_p", [(0.7, 0.9), (1.0, 1.0), (0.0, 1.0)])
def test_logprobs_match_a_plain_forward(tok_model, temperature, top_p):
    tok, model = tok_model
    groups = HFEngine(model, pad_id=tok.pad_token_id).generate_groups(
        _prompts(tok), 2, 10, stop=StopRule.from_tokenizer(tok), temperature=temperature, top_p=top_p,
        generator=torch.Generator().manual_seed(3),
    )
    scale = temperature if temperature > 0 else 1.0  # greedy reports temperature-1 log-probs
    with torch.no_grad():
        for g in groups:
            for r in g.responses:
                ids = torch.tensor([g.prompt_ids + r.token_ids])
                logits = model(input_ids=ids).logits[0, len(g.prompt_ids) - 1 : -1].float()
                expected = torch.log_softmax(logits / scale, -1).gather(-1, torch.tensor(r.token_ids)[:, None]).squeeze(-1)
                assert r.logprobs == pytest.approx(expected.tolist(), abs=1e-5)


def test_stop_rules_per_row():
    scripts = {
        10: [5, CLOSE, 7, 8, 9],  # </think> then one answer token: stops after 7
        11: [5, 6, 7, 8, 9, 3],  # never stops: runs to the cap
        12: [5, 6, EOS, 8],  # EOS
        13: [CLOSE, EOS],  # EOS right after </think>: EOS wins, the answer slot is the EOS
    }
    model = ScriptedLM(scripts)
    engine = HFEngine(model)
    prompts = [[4, 10], [11], [3, 3, 3, 12], [13]]
    groups = engine.generate_groups(prompts, 2, 8, stop=StopRule((EOS,), CLOSE, 1), temperature=0.0)
    got = [(g.responses[0].token_ids, g.responses[0].finish_reason) for g in groups]
    assert got == [
        ([5, CLOSE, 7], "stop"),
        ([5, 6, 7, 8, 9, 3, 3, 3], "length"),
        ([5, 6, EOS], "eos"),
        ([CLOSE, EOS], "eos"),
    ]
    assert [g.responses[0].truncated for g in groups] == [False, True, False, False]
    assert all(g.responses[0] == g.responses[1] for g in groups)

    # after_close=0 stops on </think> itself; None ignores it.
    assert engine.greedy([[10]], 8, stop=StopRule((EOS,), CLOSE, 0))[0].token_ids == [5, CLOSE]
    assert engine.greedy([[10]], 8, stop=StopRule((EOS,), CLOSE, None))[0].token_ids == [5, CLOSE, 7, 8, 9, 9, 9, 9]

    # The loop ends as soon as every row has stopped: 1 prefill + 2 decode steps for a 3-token response.
    model.calls = 0
    engine.greedy([[10], [12]], 50, stop=StopRule((EOS,), CLOSE, 1))
    assert model.calls == 3


def _expected(script: list[int], cap: int, after_close: int | None) -> tuple[list[int], str]:
    """Pure-Python reference of the stop rule."""
    out, since = [], None
    for k in range(cap):
        t = script[min(k, len(script) - 1)]
        out.append(t)
        since = since + 1 if since is not None else (0 if t == CLOSE else None)
        if t == EOS:
            return out, "eos"
        if after_close is not None and since == after_close:
            return out, "stop"
    return out, "length"


@settings(max_examples=40, deadline=None)
@given(
    scripts=st.lists(st.lists(st.integers(0, 6), min_size=1, max_size=12), min_size=1, max_size=4),
    cap=st.integers(1, 10),
    after_close=st.one_of(st.none(), st.integers(0, 3)),
    group_size=st.integers(1, 3),
)
def test_stop_rule_and_cap_property(scripts, cap, after_close, group_size):
    model = ScriptedLM({100 + i: s for i, s in enumerate(scripts)}, vocab_size=8)
    prompts = [[0] * (i % 3) + [100 + i] for i in range(len(scripts))]  # different lengths: left padding
    groups = HFEngine(model).generate_groups(
        prompts, group_size, cap, stop=StopRule((EOS,), CLOSE, after_close), temperature=0.0
    )
    for script, g in zip(scripts, groups):
        assert len(g.responses) == group_size
        for r in g.responses:
            assert 1 <= len(r.token_ids) <= cap and len(r.logprobs) == len(r.token_ids)
            assert (r.token_ids, r.finish_reason) == _expected(script, cap, after_close)
            assert r.truncated == (r.finish_reason == "length")
            assert not r.truncated or len(r.token_ids) == cap


def test_cut_to_rule_by_hand():
    r = Response([5, 6, CLOSE, 7, 8, 9], [-0.1, -0.2, -0.3, -0.4, -0.5, -0.6], "length")
    # One token after </think>: ends on 7, stopped by the rule.
    assert cut_to_rule(r, StopRule((EOS,), CLOSE, 1), 10) == Response([5, 6, CLOSE, 7], [-0.1, -0.2, -0.3, -0.4], "stop")
    # A smaller cap comes first: cut by length.
    assert cut_to_rule(r, StopRule((EOS,), CLOSE, 1), 2) == Response([5, 6], [-0.1, -0.2], "length")
    # Nothing tighter than what generated it: the response itself.
    assert cut_to_rule(r, StopRule((EOS,), CLOSE, None), 6) is r
    # EOS before the rule's end wins.
    e = Response([CLOSE, EOS, 4], [-1.0, -2.0, -3.0], "length")
    assert cut_to_rule(e, StopRule((EOS,), CLOSE, 2), 10) == Response([CLOSE, EOS], [-1.0, -2.0], "eos")


@settings(max_examples=300, deadline=None)
@given(
    script=st.lists(st.integers(0, 6), min_size=1, max_size=12),
    cap=st.integers(1, 10),
    more_cap=st.integers(0, 5),
    after_close=st.one_of(st.none(), st.integers(0, 3)),
    more_after=st.one_of(st.none(), st.integers(0, 3)),
)
def test_cut_to_rule_gives_what_the_tighter_rule_generates(script, cap, more_cap, after_close, more_after):
    """Generating under a looser rule (a larger cap, more tokens after </think>, or no close rule) and cutting gives
    exactly the response the tighter rule generates, log-probs included."""
    loose_after = None if after_close is None or more_after is None else after_close + more_after
    tokens, reason = _expected(script, cap + more_cap, loose_after)
    loose = Response(tokens, [-float(i) for i in range(len(tokens))], reason)
    cut = cut_to_rule(loose, StopRule((EOS,), CLOSE, after_close), cap)
    assert (cut.token_ids, cut.finish_reason) == _expected(script, cap, after_close)
    assert cut.logprobs == loose.logprobs[: len(cut.token_ids)]


def test_cap_on_the_real_model(tok_model):
    tok, model = tok_model
    engine = HFEngine(model, pad_id=tok.pad_token_id)
    for cap in (1, 2, 7):
        groups = engine.generate_groups(_prompts(tok), 3, cap, stop=StopRule(), generator=torch.Generator().manual_seed(cap))
        for g in groups:
            assert all(len(r.token_ids) == cap and r.truncated for r in g.responses)


def test_sampling_distribution_temperature_and_top_p():
    probs = [0.5, 0.3, 0.15, 0.05]
    model = ScriptedLM({9: [FREE]}, vocab_size=4, free_logits=[math.log(p) for p in probs])
    engine = HFEngine(model)
    n = 4000

    def freqs(**kw):
        g = engine.generate_groups([[9]], n, 1, stop=StopRule(), generator=torch.Generator().manual_seed(0), **kw)[0]
        counts = torch.bincount(torch.tensor([r.token_ids[0] for r in g.responses]), minlength=4).float() / n
        return counts.tolist(), g.responses

    got, responses = freqs(temperature=1.0)
    assert got == pytest.approx(probs, abs=0.03)
    assert responses[0].logprobs[0] == pytest.approx(math.log(probs[responses[0].token_ids[0]]), abs=1e-5)

    hot = torch.tensor(probs) ** 0.5
    assert freqs(temperature=2.0)[0] == pytest.approx((hot / hot.sum()).tolist(), abs=0.03)

    # top_p = 0.7 keeps {0.5, 0.3}; log-probs stay those of the untruncated distribution.
    got, responses = freqs(temperature=1.0, top_p=0.7)
    assert got == pytest.approx([0.625, 0.375, 0.0, 0.0], abs=0.03)
    r = responses[0]
    assert r.logprobs[0] == pytest.approx(math.log(probs[r.token_ids[0]]), abs=1e-5)


def test_sample_tokens_tiny_top_p_is_greedy():
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
    tokens, _ = sample_tokens(logits, 1.0, top_p=1e-6, generator=torch.Generator().manual_seed(1))
    assert torch.equal(tokens, logits.argmax(-1))


def test_bf16_model_runs_with_float32_logprobs(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    groups = HFEngine(model, pad_id=tok.pad_token_id).generate_groups(
        _prompts(tok), 2, 6, stop=StopRule.from_tokenizer(tok), temperature=0.8, generator=torch.Generator().manual_seed(0)
    )
    for g in groups:
        for r in g.responses:
            assert 1 <= len(r.token_ids) <= 6
            assert all(math.isfinite(x) and x <= 0 for x in r.logprobs)


def test_engine_details(tok_model):
    tok, model = tok_model
    engine = make_engine(RolloutConfig(), model, pad_id=tok.pad_token_id)
    assert isinstance(engine, HFEngine) and engine.shared_prefix
    assert engine.generate_groups([], 4, 8, stop=StopRule()) == []
    model.train()
    engine.greedy([[5, 6]], 2, stop=StopRule())
    assert model.training  # the caller's mode comes back
    model.eval()
    with pytest.raises(ValueError):
        engine.generate_groups([[]], 2, 4, stop=StopRule())
    with pytest.raises(ValueError):
        engine.generate_groups([[5]], 2, 0, stop=StopRule())
    rule = StopRule.from_tokenizer(tok, after_close=1)
    assert rule.close_id == tok.convert_tokens_to_ids("</think>") and rule.eos_ids == (tok.eos_token_id,)
    with pytest.raises(ValueError, match="single token"):
        StopRule.from_tokenizer(tok, close_marker="</answer>")
    with pytest.raises(ValueError):
        StopRule(after_close=1)


# --- the preallocated KV cache ------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("temperature,top_p,after_close", [(1.0, 1.0, None), (0.8, 0.9, 1), (0.0, 1.0, None)])
def test_preallocated_cache_draws_the_same_tokens_and_logprobs(tok_model, attn, shared, temperature, top_p, after_close):
    """Same seed, same tokens and finish reasons as the engine with the model's own DynamicCache (one row per
    response), the same log-probs (to the bit with one row per response; to float rounding for the grouped decode),
    with left padding, both attention kernels, the shared and the independent prefill, sampling and greedy, stop
    rules."""
    tok, model = tok_model
    model.set_attn_implementation(attn)
    try:
        prompts = _prompts(tok)

        def run(stop, preallocate=True):
            engine = HFEngine(model, pad_id=tok.pad_token_id, shared_prefix=shared, preallocate=preallocate)
            return engine.generate_groups(
                prompts, 3, 14, stop=stop, temperature=temperature, top_p=top_p,
                generator=torch.Generator().manual_seed(11),
            )

        # The model's two most frequent tokens stand in for EOS and the close marker, so that rows stop at
        # different steps and keep decoding with the batch after they stopped.
        counts = torch.bincount(torch.tensor([t for g in _tokens(run(StopRule())) for r in g for t in r]))
        eos, close = counts.argsort(descending=True)[:2].tolist()
        stop = StopRule(eos_ids=(eos,), close_id=close, after_close=after_close)
        ours, ref = run(stop), run(stop, preallocate=False)  # ref: the model's own DynamicCache, as before
        reasons = [r.finish_reason for g in ours for r in g.responses]
        assert "eos" in reasons and (after_close is None or "stop" in reasons) and "length" in reasons
        assert _tokens(ours) == _tokens(ref)
        for go, gr in zip(ours, ref):
            for ro, rr in zip(go.responses, gr.responses):
                assert ro.finish_reason == rr.finish_reason
                if shared:  # the grouped decode: other attention shapes, the same values to float rounding
                    assert ro.logprobs == pytest.approx(rr.logprobs, abs=1e-5)
                else:  # one row per response, in place instead of concatenated: the same bits
                    assert ro.logprobs == rr.logprobs
        if temperature > 0:
            assert all(len({tuple(t) for t in g}) > 1 for g in _tokens(ours))  # it sampled
    finally:
        model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("shared", [True, False])
def test_preallocated_cache_is_used_and_written_in_place(tok_model, monkeypatch, shared):
    """Shared prefix: one cache row per prompt holding the prompt and the G responses' tokens (grouped decode);
    independent: one row per response."""
    import rmt.rollout.hf as hf

    tok, model = tok_model
    made = []
    real = hf.preallocated_cache
    monkeypatch.setattr(hf, "preallocated_cache", lambda m, capacity: made.append(real(m, capacity)) or made[-1])
    prompts = _prompts(tok)
    HFEngine(model, pad_id=tok.pad_token_id, shared_prefix=shared).generate_groups(
        prompts, 3, 5, stop=StopRule(), temperature=1.0
    )
    (cache,) = made
    width = max(len(p) for p in prompts)
    # 4 prompts x G=3 responses; 4 decoded tokens each (the 5th is sampled but never fed back)
    rows, capacity, filled = (4, width + 3 * 5, width + 3 * 4) if shared else (12, width + 5, width + 4)
    assert len(cache.layers) == model.config.num_hidden_layers
    for layer in cache.layers:
        assert isinstance(layer, hf.PreallocatedLayer) and layer.capacity == capacity
        assert layer.keys.shape[0] == rows and layer.get_seq_length() == filled
        assert layer.keys.data_ptr() == layer._keys_buf.data_ptr() and layer._keys_buf.shape[2] == capacity


def test_preallocated_layer_returns_what_a_dynamic_layer_returns():
    """Updates, the G-fold repeat, outgrowing the capacity, crop and row selection: the same keys and values as
    Hugging Face's DynamicLayer after every operation."""
    from transformers.cache_utils import DynamicLayer

    from rmt.rollout.hf import PreallocatedLayer

    g = torch.Generator().manual_seed(0)

    def kv(rows, n):
        return torch.randn(rows, 2, n, 3, generator=g), torch.randn(rows, 2, n, 3, generator=g)

    ours, ref = PreallocatedLayer(capacity=7), DynamicLayer()

    def same(out_ours, out_ref):
        assert all(torch.equal(a, b) for a, b in zip(out_ours, out_ref))
        assert ours.get_seq_length() == ref.get_seq_length()

    k, v = kv(2, 4)
    same(ours.update(k, v), ref.update(k, v))  # prefill
    ours.batch_repeat_interleave(3)
    ref.batch_repeat_interleave(3)
    same((ours.keys, ours.values), (ref.keys, ref.values))
    for _ in range(3):  # decode to the capacity (4 + 3 = 7): written in place
        k, v = kv(6, 1)
        same(ours.update(k, v), ref.update(k, v))
        assert ours.keys.data_ptr() == ours._keys_buf.data_ptr() and ours._keys_buf.shape == (6, 2, 7, 3)
    k, v = kv(6, 2)  # outgrows the capacity: moved to buffers of twice the size
    same(ours.update(k, v), ref.update(k, v))
    assert ours._keys_buf.shape[2] == 14
    ours.crop(-3)
    ref.crop(-3)
    k, v = kv(6, 1)
    same(ours.update(k, v), ref.update(k, v))
    idx = torch.tensor([5, 0, 2])
    ours.batch_select_indices(idx)
    ref.batch_select_indices(idx)
    k, v = kv(3, 1)
    same(ours.update(k, v), ref.update(k, v))


def test_preallocated_cache_only_for_full_attention_models(tok_model):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rmt.rollout.hf import PreallocatedLayer, preallocated_cache

    _, model = tok_model
    assert all(isinstance(layer, PreallocatedLayer) for layer in preallocated_cache(model, 10).layers)
    assert preallocated_cache(ScriptedLM({0: [EOS]}), 10) is None  # no Hugging Face config
    sliding = Qwen2ForCausalLM(Qwen2Config(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=32, use_sliding_window=True, sliding_window=4, max_window_layers=0,
    ))
    assert preallocated_cache(sliding, 10) is None  # sliding-window layers keep the model's own cache


def test_shared_prefix_without_grouped_decode_repeats_the_cache(tok_model, monkeypatch):
    """Where a model cannot decode a group as query positions of one row (no custom 4D masks), the shared path
    copies each prompt's cache to its G rows and gives the reference's log-prob bits."""
    import rmt.rollout.hf as hf

    tok, model = tok_model
    monkeypatch.setattr(hf, "grouped_decode_works", lambda m: False)
    kw = dict(stop=StopRule.from_tokenizer(tok), temperature=0.9, generator=None)
    ours = HFEngine(model, pad_id=tok.pad_token_id).generate_groups(
        _prompts(tok), 3, 9, **{**kw, "generator": torch.Generator().manual_seed(5)})
    ref = HFEngine(model, pad_id=tok.pad_token_id, preallocate=False).generate_groups(
        _prompts(tok), 3, 9, **{**kw, "generator": torch.Generator().manual_seed(5)})
    assert [[(r.token_ids, r.logprobs) for r in g.responses] for g in ours] == \
        [[(r.token_ids, r.logprobs) for r in g.responses] for g in ref]
