"""rmt.update: old and reference log-probs are those of the training forward, under the same autocast."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rmt import losses, update
from rmt.config import load_config

THINK = 96


@pytest.fixture
def bf16_accelerator():
    """A bf16 Accelerator (CPU autocast); Accelerate's process-wide state is reset before and after."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield Accelerator(mixed_precision="bf16", cpu=True)
    AcceleratorState._reset_state(True)


def tiny_llama(attn):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, attn_implementation=attn,
    )
    model = LlamaForCausalLM(config)
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    return model


def micro_batches():
    """Two micro-batches: corpus sequences for NTP, and raw-template prompts of them with G = 3 responses."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(2):
        seqs = [torch.randint(0, 90, (30,), generator=g).tolist() for _ in range(2)]
        pairs = [(seqs[b][:pos] + [THINK], torch.randint(0, 97, (4 + k,), generator=g).tolist())
                 for b, pos in [(0, 9), (1, 20)] for k in range(3)]
        mask = torch.ones(2, 30, dtype=torch.bool)
        mask[:, 0] = False
        out.append(update.MicroBatch(sequences=seqs, ntp_mask=mask, pairs=pairs,
                                     advantages=torch.linspace(-1, 1, len(pairs))[:, None]))
    return out


@pytest.mark.parametrize("prepared", [True, False], ids=["prepared", "unprepared"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_first_iteration_ratio_is_exactly_one_under_bf16(bf16_accelerator, monkeypatch, attn, prepared):
    """mu = 2 under bf16 autocast: at the first iteration the policy is the old policy and the reference, so the
    ratio is exactly 1 (no token clipped) and the KL exactly 0. ``prepared``: the model as the trainer holds it
    (Accelerate wraps its forward in autocast), or a bare model (the autocast comes from policy_update alone)."""
    accelerator = bf16_accelerator
    cfg = load_config(None, ["train.mixed_precision=bf16", "grpo.num_iterations=2", "grpo.kl_beta=0.1", "train.lr=1e-2"])
    model = tiny_llama(attn)
    ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    if prepared:
        model, optimizer = accelerator.prepare(model, optimizer)
    calls = []
    real = losses.unified_loss

    def recording(**kw):
        terms = real(**kw)
        mask = kw["response_mask"]
        calls.append({
            "log_ratio": (kw["logprobs"].detach() - kw["old_logprobs"])[mask].abs().max().item(),
            "ref_gap": (kw["logprobs"].detach() - kw["ref_logprobs"])[mask].abs().max().item(),
            "clip_fraction": terms.clip_fraction, "kl": terms.kl,
        })
        return terms

    monkeypatch.setattr(update.losses, "unified_loss", recording)
    micro = micro_batches()
    norm = losses.Normalizers(ntp_tokens=float(sum(m.ntp_mask.sum() for m in micro)),
                              rl_tokens=float(sum(len(r) for m in micro for _, r in m.pairs)), rl_sequences=12.0)
    metrics = update.policy_update(cfg, micro, norm, model, ref_model, optimizer, accelerator, pad_id=0, ntp_weight=0.1)
    assert metrics["finite"] and len(calls) == 4  # 2 iterations x 2 micro-batches
    for first in calls[:2]:  # the first iteration, before any optimizer step: the policy is the old and the ref
        assert first["log_ratio"] == 0.0 and first["clip_fraction"] == 0.0
        assert first["ref_gap"] == 0.0 and first["kl"] == 0.0
    assert max(c["log_ratio"] for c in calls[2:]) > 1e-3  # after a step the ratio moves: the check can fail


def test_a_model_prepared_for_bf16_keeps_its_fast_paths(bf16_accelerator):
    """Accelerate wraps a prepared model's forward in autocast; the fast-path check must see through it, or the
    policy loses the chunked head while its unprepared reference keeps it."""
    from rmt import forward

    model = bf16_accelerator.prepare(tiny_llama("sdpa"))
    assert forward.fast_paths(model) == forward.FastPaths(chunked=True, shared=True)
    assert "_original_forward" in model.__dict__  # the wrapper is still there after the check
    with torch.no_grad():
        out = model(torch.tensor([[1, 2, 3]]))
    assert out.logits.dtype == torch.float32  # and still converts outputs as Accelerate set it up
