"""Benchmark 5: peak memory of one NTP training step with a 151,936-token vocabulary, full logits vs chunked head.

A tiny Llama (Qwen's vocabulary size, 151,936) takes one AdamW step on the NTP loss over B rows of L tokens. Each
variant runs in a fresh subprocess, which reports its peak resident memory (``resource.getrusage`` ru_maxrss) and
the step's wall time:

- ``setup``: the same model and optimizer, one step on a 16-token row: parameters, gradients, AdamW state and the
  runtime, i.e. what every variant pays before any logits;
- ``full-logits``: ``model(ids).logits`` -> ``losses.target_logprobs`` (log-softmax over B x L x V) -> masked NTP
  loss, the path ``forward_logprobs`` had before (and what most trainers do);
- ``hf-loss``: ``model(ids, labels=ids).loss``, Hugging Face's own cross-entropy over full logits;
- ``chunked``: ``rmt.forward.forward_logprobs`` (the trainer's path): hidden states, then the output layer and
  log-softmax ``losses.CHUNK_LOGITS`` logits at a time, recomputed in the backward.

Variants run in rotating order, ``--reps`` times each; medians are reported. Peak memory does not depend on the
load of a shared machine; time does, so the step is timed on the wall clock and as this process's CPU time (one
torch thread by default, so that CPU time is the work done).

    python benchmarks/bench_ntp_memory.py --seq-len 2048 --batch 1 --reps 2 --out bench_ntp_memory.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("setup", "full-logits", "hf-loss", "chunked")
VOCAB = 151_936


def child(variant: str, seq_len: int, batch: int, threads: int, chunk_logits: int | None) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rmt import forward, losses

    torch.set_num_threads(threads)
    if chunk_logits:
        losses.CHUNK_LOGITS = chunk_logits
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=max(seq_len, 32), tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    length = 16 if variant == "setup" else seq_len
    ids = torch.randint(0, VOCAB, (batch, length))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, 0] = False
    paths = forward.fast_paths(model) if variant == "chunked" else None  # the one-off check, outside the timed step
    t0, c0 = time.perf_counter(), time.process_time()
    if variant in ("setup", "full-logits"):
        loss = losses.ntp_loss_from_logprobs(losses.target_logprobs(model(input_ids=ids, use_cache=False).logits, ids), mask)
    elif variant == "hf-loss":
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    else:
        out = forward.forward_logprobs(model, ids.tolist(), None, 1.0)
        loss = losses.ntp_loss_from_logprobs(out.ntp_logprobs, mask)
    loss.backward()
    optimizer.step()
    step_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    params = sum(p.numel() for p in model.parameters())
    return {"variant": variant, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "step_s": step_s, "cpu_s": cpu_s, "loss": float(loss), "params": params, "fast_paths": str(paths)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--chunk-logits", type=int, default=None, help="override losses.CHUNK_LOGITS (chunked variant)")
    ap.add_argument("--child", choices=VARIANTS)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.seq_len, a.batch, a.threads, a.chunk_logits)))
        return
    runs: dict[str, list[dict]] = {v: [] for v in a.variants}
    for rep in range(a.reps):
        order = a.variants[rep % len(a.variants) :] + a.variants[: rep % len(a.variants)]
        for v in order:
            cmd = [sys.executable, __file__, "--child", v, "--seq-len", str(a.seq_len), "--batch", str(a.batch),
                   "--threads", str(a.threads)] + (["--chunk-logits", str(a.chunk_logits)] if a.chunk_logits else [])
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            runs[v].append(json.loads(out))
            r = runs[v][-1]
            print(f"rep {rep} {v}: {r['peak_rss_mib']:.0f} MiB, {r['step_s']:.2f} s wall, {r['cpu_s']:.2f} s CPU", flush=True)
    result = {"seq_len": a.seq_len, "batch": a.batch, "vocab": VOCAB, "threads": a.threads, "chunk_logits": a.chunk_logits,
              "params": runs[a.variants[0]][0]["params"], "variants": {}}
    setup = statistics.median(r["peak_rss_mib"] for r in runs["setup"]) if "setup" in runs else 0.0
    for v, rs in runs.items():
        peak = statistics.median(r["peak_rss_mib"] for r in rs)
        result["variants"][v] = {"peak_rss_mib": peak, "above_setup_mib": peak - setup,
                                 "step_s": statistics.median(r["step_s"] for r in rs),
                                 "cpu_s": statistics.median(r["cpu_s"] for r in rs), "loss": rs[0]["loss"]}
    print(json.dumps(result, indent=2))
    if a.out:
        a.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
