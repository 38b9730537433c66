"""Entropy scoring (``rmt.scoring.score_batch``) against a bare forward pass of the same model and batch.

Two measurements (issue "Scale and speed"):

1. Throughput. A bare forward, ``model(input_ids, attention_mask).logits`` (full logits, no entropy), is the limit
   for this step: scoring runs the same decoder once, then the output head and the entropy over chunks of
   ``scoring.chunk_positions`` positions, in two ways: ``eager`` (log-softmax, then sum p log p, in preallocated
   buffers) and ``compiled`` (``fused_entropy`` under torch.compile, which ``rmt score`` uses from
   ``scoring.COMPILE_MIN_LOGITS`` logits on); ``--previous`` adds the loop as it was before its buffers. All run
   on the same random batch, interleaved (A B C, C B A, ...): medians give tokens/s, and each ratio bare / scoring
   is the median of the per-round ratios (target >= 0.9), which a shared, noisy machine disturbs less than the
   ratio of two medians. The first compiled call (the compilation) is not timed.
2. Peak memory with Qwen's 151,936-token vocabulary at 2,048 context on a tiny Llama (hidden 64, 2 layers). Each
   (batch, chunk) runs in a fresh subprocess: the peak resident set (VmHWM) is reset after the model is built
   (``/proc/self/clear_refs``; where that is refused, it counts from process start), so the number reported is
   what one ``score_batch`` call adds on top of the model (eager and compiled). (``ru_maxrss`` is not used: in a
   child it starts from the parent's peak at fork time.) It is set against the size of the full fp32 logits, batch x
   2048 x 151936 x 4 bytes, which a bare forward must hold. The subprocesses run side by side, one per free core.

Random weights and tokens, no downloads. One torch thread by default (``--threads``): on a machine shared with other
jobs, two OpenMP threads wait for each other at every operator, which slows small operators far more than large
matrix products and so skews the ratios. Run from the repository root:

    python benchmarks/bench_scoring.py            # about 8 minutes on 2 busy CPU cores (--wide, --previous: +5)
    python benchmarks/bench_scoring.py --quick    # under 2 minutes
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

import numpy as np

from rmt import scoring
from rmt.config import ScoringConfig
from rmt.scoring import entropy_from_logits, score_batch

QWEN_VOCAB = 151_936
MEMORY_CONTEXT = 2_048
MIB = 2**20


@dataclass(frozen=True)
class Shape:
    """A random-init Llama and the batch it scores."""

    name: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    intermediate: int
    batch: int
    length: int


# The embedded default's model (SPEC section 8) with its own vocabulary, then the same decoder under the
# vocabularies of Llama-2 and Qwen: the output head and the entropy grow with the vocabulary, the decoder does not.
THROUGHPUT_SHAPES = [
    Shape("embedded default, vocab 512", 512, 256, 4, 4, 688, 8, 256),
    Shape("same decoder, vocab 32,000", 32_000, 256, 4, 4, 688, 8, 256),
    Shape("same decoder, vocab 151,936", QWEN_VOCAB, 256, 4, 4, 688, 4, 256),
]
# Optional (--wide): Qwen2.5-0.5B's width and vocabulary on 2 layers, where the head outweighs the entropy more.
WIDE_SHAPE = Shape("hidden 896, 2 layers, vocab 151,936", QWEN_VOCAB, 896, 2, 14, 4864, 2, 256)
QUICK_SHAPES = [THROUGHPUT_SHAPES[0], Shape("same decoder, vocab 32,000", 32_000, 256, 4, 4, 688, 2, 128)]
MEMORY_RUNS = [(1, 256), (4, 256), (1, 1024), (4, 1024)]  # (batch, chunk_positions) at 2,048 context
QUICK_MEMORY_RUNS = [(1, 256), (2, 256)]
MEMORY_SHAPE = Shape("tiny Llama, Qwen vocab", QWEN_VOCAB, 64, 2, 2, 172, 0, MEMORY_CONTEXT)


def build_model(shape: Shape, max_positions: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def random_batch(shape: Shape, batch: int, length: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, shape.vocab, (batch, length), generator=g).tolist()


# --- 1. throughput --------------------------------------------------------------------------------------------


def time_side_by_side(fns: dict, reps: int, min_seconds: float) -> dict[str, list[float]]:
    """Seconds of each function per round; rounds interleaved, the order reversed every other round.

    At least ``reps`` rounds, more for fast functions so that the rounds take about ``min_seconds`` in all.
    """
    start = time.perf_counter()
    for fn in fns.values():  # warm-up
        fn()
    rounds = max(reps, math.ceil(min_seconds / (time.perf_counter() - start)))
    times = {name: [] for name in fns}
    names = list(fns)
    for rep in range(rounds):
        for name in names if rep % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def previous_loop(model, sequences: list[list[int]], chunk: int) -> torch.Tensor:
    """The scoring loop before its buffers (commit 091874e), for the 'before' column: a fresh head output and
    fresh log-probs per chunk, then ``entropy_from_logits``."""
    with torch.inference_mode():
        ids = torch.tensor(sequences)
        hidden = model.get_decoder()(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).last_hidden_state
        flat = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        head = model.get_output_embeddings()
        return torch.cat([entropy_from_logits(head(flat[i : i + chunk])) for i in range(0, flat.shape[0], chunk)])


def throughput(shape: Shape, reps: int, min_seconds: float, chunk: int, previous: bool) -> dict:
    model = build_model(shape, max_positions=max(2048, shape.length))
    sequences = random_batch(shape, shape.batch, shape.length)
    ids = torch.tensor(sequences)
    mask = torch.ones_like(ids)
    scfg = ScoringConfig(chunk_positions=chunk)

    @torch.inference_mode()
    def bare():
        return model(input_ids=ids, attention_mask=mask).logits

    fns = {
        "bare": bare,
        "eager": lambda: score_batch(model, sequences, 0, scfg),
        "compiled": lambda: score_batch(model, sequences, 0, scfg, compiled=True),
    }
    if previous:
        fns["previous"] = lambda: previous_loop(model, sequences, chunk)
    start = time.perf_counter()
    fns["compiled"]()  # compiles (the first shape of the run; later shapes reuse the kernel or recompile once)
    compile_s = time.perf_counter() - start
    if scoring._compiled_entropy.failed:
        raise RuntimeError("torch.compile failed here: the compiled column cannot be measured")
    eager, comp = (np.concatenate(fns[k]()) for k in ("eager", "compiled"))
    max_diff = float(np.nanmax(np.abs(eager - comp)))
    times = time_side_by_side(fns, reps, min_seconds)
    med = {name: statistics.median(t) for name, t in times.items()}
    tokens = shape.batch * shape.length
    row = {
        "shape": shape.name,
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "batch": shape.batch,
        "length": shape.length,
        "chunk_positions": chunk,
        "rounds": len(times["bare"]),
        "first_compiled_call_s": compile_s,
        "max_abs_diff_compiled_vs_eager": max_diff,
        "logits_per_call": shape.batch * (shape.length - 1) * shape.vocab,
    }
    for name in fns:
        row[f"{name}_tok_s"] = tokens / med[name]
        if name != "bare":
            row[f"{name}_ratio"] = statistics.median(b / s for b, s in zip(times["bare"], times[name]))
    return row


# --- 2. peak memory (one fresh subprocess per configuration) --------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(mode: str, batch: int, chunk: int) -> dict:
    """Runs in the subprocess: build the model, reset the peak, score (or forward) once, report the peak added.

    mode: bare (forward with full logits), score (eager entropy) or compiled (compiled entropy; compiled here on
    a small batch before the peak is reset, so the compiler's own memory does not count)."""
    model = build_model(MEMORY_SHAPE, max_positions=MEMORY_CONTEXT)
    if mode == "compiled":
        score_batch(model, random_batch(MEMORY_SHAPE, 1, 64), 0, ScoringConfig(chunk_positions=chunk), compiled=True)
        score_batch(model, random_batch(MEMORY_SHAPE, 1, 48), 0, ScoringConfig(chunk_positions=chunk), compiled=True)
    sequences = random_batch(MEMORY_SHAPE, batch, MEMORY_CONTEXT)
    ids = torch.tensor(sequences)
    mask = torch.ones_like(ids)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
        reset = True
    except OSError:
        reset = False
    rss_before = _status_kib("VmRSS")
    start = time.perf_counter()
    if mode in ("score", "compiled"):
        score_batch(model, sequences, 0, ScoringConfig(chunk_positions=chunk), compiled=mode == "compiled")
    else:
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=mask).logits.sum()
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    return {"mode": mode, "batch": batch, "chunk": chunk, "added_mib": (peak - rss_before) / 1024, "peak_reset": reset,
            "seconds": seconds}


def memory(mode: str, batch: int, chunk: int) -> dict:
    cmd = [sys.executable, __file__, "--memory-child", mode, str(batch), str(chunk), "--threads", str(torch.get_num_threads())]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"memory run {mode} batch={batch} chunk={chunk} failed:\n{proc.stderr[-2000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row["full_logits_mib"] = batch * MEMORY_CONTEXT * QWEN_VOCAB * 4 / MIB
    row["chunk_logits_mib"] = min(chunk, batch * MEMORY_CONTEXT) * QWEN_VOCAB * 4 / MIB if mode != "bare" else None
    return row


# --- report ---------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes and rounds (about 30 s on a quiet machine)")
    parser.add_argument("--wide", action="store_true", help="also time a hidden-896 model with vocab 151,936 (+1-2 min)")
    parser.add_argument("--reps", type=int, default=None, help="least timed rounds per shape (default 5, quick 3)")
    parser.add_argument("--min-seconds", type=float, default=None, help="more rounds for fast shapes (default 10, quick 2)")
    parser.add_argument("--chunk", type=int, default=ScoringConfig().chunk_positions, help="chunk_positions for throughput")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads (default 1: on a shared machine 2+ OpenMP threads wait on each other at every operator, "
        "which distorts the ratios)",
    )
    parser.add_argument("--previous", action="store_true",
                        help="also time the scoring loop as it was before its buffers (a 'before' column, +40%% time)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--memory-child", nargs=3, metavar=("MODE", "BATCH", "CHUNK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        mode, batch, chunk = args.memory_child
        print(json.dumps(memory_child(mode, int(batch), int(chunk))))
        return

    reps = args.reps or (3 if args.quick else 5)
    min_seconds = args.min_seconds if args.min_seconds is not None else (2.0 if args.quick else 10.0)
    t0 = time.perf_counter()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}; fp32, sdpa attention; >= {reps} interleaved rounds, medians")
    print("\n## Throughput: score_batch vs bare forward (target >= 0.90x)\n")
    print("Ratios = bare time / scoring time, median of per-round ratios. eager = score_batch's eager passes in its "
          "buffers; compiled = the torch.compiled fused entropy (scoring.compile=auto uses it from "
          f"{scoring.COMPILE_MIN_LOGITS:.0e} logits to score, i.e. from the token count in the last column)"
          + ("; previous = the loop before the buffers (091874e)" if args.previous else "") + ".\n")
    prev_head = (" previous |", "---|") if args.previous else ("", "")
    print("| model | params | batch x length | rounds | bare tok/s |" + prev_head[0]
          + " eager | compiled | compiled vs eager, max abs diff (nats) | auto compiles from (tokens) |")
    print("|---|---|---|---|---|" + prev_head[1] + "---|---|---|---|")
    rows = []
    shapes = (QUICK_SHAPES if args.quick else THROUGHPUT_SHAPES) + ([WIDE_SHAPE] if args.wide else [])
    for shape in shapes:
        r = throughput(shape, reps, min_seconds, args.chunk, args.previous)
        rows.append(r)
        prev = f" {r['previous_ratio']:.2f}x |" if args.previous else ""
        print(f"| {r['shape']} | {r['params_M']}M | {r['batch']} x {r['length']} | {r['rounds']} | {r['bare_tok_s']:,.0f} |"
              f"{prev} {r['eager_ratio']:.2f}x | {r['compiled_ratio']:.2f}x | {r['max_abs_diff_compiled_vs_eager']:.1e} "
              f"| {scoring.COMPILE_MIN_LOGITS / shape.vocab:,.0f} |", flush=True)

    print(f"\n## Peak memory added by one call, vocab {QWEN_VOCAB:,}, context {MEMORY_CONTEXT:,} "
          f"(hidden {MEMORY_SHAPE.hidden}, {MEMORY_SHAPE.layers} layers)\n")
    print("| what | batch | chunk_positions | peak added MiB | one chunk of fp32 logits MiB | full fp32 logits MiB | peak / full logits |")
    print("|---|---|---|---|---|---|---|")
    pairs = QUICK_MEMORY_RUNS if args.quick else MEMORY_RUNS
    runs = [("score", b, c) for b, c in pairs] + [("compiled", b, c) for b, c in pairs[: 1 if args.quick else None]]
    if not args.quick:
        runs.append(("bare", 1, 0))
    # Children run side by side, one per free core: each process has its own peak, so they do not disturb it.
    with ThreadPoolExecutor(max_workers=max(1, (os.cpu_count() or 1) // torch.get_num_threads())) as pool:
        mem = list(pool.map(lambda run: memory(*run), runs))
    names = {"score": "score_batch, eager", "compiled": "score_batch, compiled", "bare": "bare forward"}
    for (mode, batch, chunk), m in zip(runs, mem):
        chunk_mib = f"{m['chunk_logits_mib']:,.0f}" if mode != "bare" else "-"
        print(f"| {names[mode]} | {batch} | {chunk or '-'} | {m['added_mib']:,.0f} | {chunk_mib} | {m['full_logits_mib']:,.0f} "
              f"| {m['added_mib'] / m['full_logits_mib']:.2f} |", flush=True)
    if not all(m["peak_reset"] for m in mem):
        print("\n(peak RSS could not be reset here: peaks count from process start, model build included)")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s, load average now {os.getloadavg()[0]:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"throughput": rows, "memory": mem, "reps": reps}, f, indent=2)


if __name__ == "__main__":
    main()
