"""Does thinking help this model? Greedy probes of a base model in direct and in reasoning mode.

Two measurements (SPEC section 8), both greedy and batched:

- ``reasoning_advantage``: on corpus documents with ``computed_spans``, at the first token of every computed value,
  compare the prediction made directly (argmax after the prefix, `<think>` excluded) with the one made after thinking
  (prefix + ``<think>``, generate until ``</think>``, then the next token). Also whole values: the value's tokens
  and the token that ends it, predicted greedily.
- ``position_probe``: the same question at random positions of the text (any token but the first), as RMT's
  rollouts ask it: is the response well formed (``</think>`` then a token), and is the token right, directly and
  after thinking? Split by what the next token is: part of a computed value, the end of one (the newline after an
  answer), or anything else (operands, operators, ``=``).
- ``ntp_accuracy``: teacher-forced loss and argmax accuracy over documents, on computed and on other tokens.
- ``thinking_forms``: at computed positions, responses sampled as RMT's rollouts are, put in forms (worked steps,
  running results only, empty): how often each way of reasoning is drawn and how often it is right.
- ``posttrain_accuracy``: on post-training records (prompt and verifiable answer apart), the answer read after
  ``</think>`` (reasoning mode) or right after the prompt (direct mode), scored by the generator's verifier.
"""

from __future__ import annotations

import argparse
import json
import logging
import random

import torch

from rmt.config import RMTConfig
from rmt.embedded.corpus import RECHECK_SEP
from rmt.fileio import atomic_write_text

log = logging.getLogger(__name__)

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@torch.no_grad()
def generate_ids(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    stop_ids: list[int],
    pad_id: int,
    batch_size: int = 64,
    suppress: list[int] | None = None,
    temperature: float = 0.0,
) -> list[list[int]]:
    """Continuations of token-id prompts (left-padded batches, KV cache), each cut after its first stop token.

    ``temperature`` 0 = greedy; otherwise plain sampling (no top-k / top-p), seeded by the caller's torch RNG.
    ``suppress``: token ids never generated (direct mode forbids ``<think>``)."""
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths batch together
    out: list[list[int]] = [[] for _ in prompts]
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[r, width - len(prompts[i]) :] = 1
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None,
            top_k=None,
            top_p=None,
            eos_token_id=stop_ids or None,
            pad_token_id=pad_id,
            suppress_tokens=suppress or None,
        )[:, width:].tolist()
        for r, i in enumerate(idx):
            seq = gen[r]
            cut = next((k + 1 for k, t in enumerate(seq) if t in stop_ids), len(seq))
            out[i] = seq[:cut]
    return out


def _special_ids(tokenizer) -> tuple[int, int, int]:
    open_id, close_id = tokenizer.convert_tokens_to_ids([THINK_OPEN, THINK_CLOSE])
    if open_id is None or close_id is None or open_id == tokenizer.unk_token_id:
        raise ValueError(f"tokenizer has no single {THINK_OPEN} / {THINK_CLOSE} tokens")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return open_id, close_id, pad


def think_then_answer(
    model, tokenizer, prompts: list[list[int]], answer_tokens: int, think_tokens: int = 64, batch_size: int = 64, temperature: float = 0.0
):
    """For each prompt (already ending in ``<think>``): (thinking tokens, answer tokens or None when ``</think>`` never came)."""
    _, close_id, pad = _special_ids(tokenizer)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    thoughts = generate_ids(model, prompts, think_tokens, [close_id] + eos, pad, batch_size, temperature=temperature)
    closed = [i for i, t in enumerate(thoughts) if t and t[-1] == close_id]
    answers: list[list[int] | None] = [None] * len(prompts)
    # The answer is always read greedily: sampling is for the reasoning, as in RMT's rollouts.
    follow = generate_ids(model, [prompts[i] + thoughts[i] for i in closed], answer_tokens, eos, pad, batch_size)
    for i, a in zip(closed, follow):
        answers[i] = a
    return [t[:-1] if t and t[-1] == close_id else t for t in thoughts], answers


def reasoning_advantage(
    model, tokenizer, docs: list[dict], max_values: int = 500, think_tokens: int = 64, batch_size: int = 64, seed: int = 0
) -> dict:
    """Next-token accuracy at the start of computed values, directly vs after thinking (greedy).

    ``docs``: ``{"text", "computed_spans"}`` records. Up to ``max_values`` spans are drawn with ``seed``.
    Direct = the best token other than ``<think>`` (a base model that saw scratchpads may want to think first).
    A whole value is right when its tokens come out and the next token does not extend it (``13`` vs ``130``).
    Returns n, direct/reasoning first-token and whole-value accuracy, malformed share, mean thinking length.
    """
    open_id, _, pad = _special_ids(tokenizer)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    sites = [(d, s, e) for d, doc in enumerate(docs) for s, e in doc["computed_spans"]]
    if len(sites) > max_values:
        sites = sorted(random.Random(seed).sample(sites, max_values))
    prompts, targets = [], []
    encoded: dict[int, tuple[list[int], list]] = {}
    for d, s, e in sites:
        if d not in encoded:
            enc = tokenizer(docs[d]["text"], add_special_tokens=False, return_offsets_mapping=True)
            encoded[d] = (enc["input_ids"], enc["offset_mapping"])
        ids, offsets = encoded[d]
        first = next((k for k, (a, _) in enumerate(offsets) if a >= s), None)
        if first is None or offsets[first][0] != s:
            continue  # the value does not start on a token boundary: no next-token question to ask
        end = next((k for k, (a, _) in enumerate(offsets) if a >= e), len(ids))
        prompts.append(bos + ids[:first])
        targets.append(ids[first:end])
    if not prompts:
        return {"n": 0}
    width = max(len(t) for t in targets) + 1
    direct = generate_ids(model, prompts, width, [], pad, batch_size, suppress=[open_id])
    thoughts, answers = think_then_answer(model, tokenizer, [p + [open_id] for p in prompts], width, think_tokens, batch_size)

    def whole(gen: list[int] | None, target: list[int]) -> bool:
        if gen is None or gen[: len(target)] != target:
            return False
        nxt = tokenizer.decode(gen[len(target) : len(target) + 1])
        return not (nxt[:1].isalnum())

    n = len(prompts)
    return {
        "n": n,
        "direct_first_token": sum(g[:1] == t[:1] for g, t in zip(direct, targets)) / n,
        "reasoning_first_token": sum(a is not None and a[:1] == t[:1] for a, t in zip(answers, targets)) / n,
        "direct_value": sum(whole(g, t) for g, t in zip(direct, targets)) / n,
        "reasoning_value": sum(whole(a, t) for a, t in zip(answers, targets)) / n,
        "malformed": sum(a is None for a in answers) / n,
        "mean_think_tokens": sum(len(t) for t in thoughts) / n,
    }


def next_tokens_read(answers: list[list[int] | None], written: list[list[int]], decode, eos: int | None) -> list[int | None]:
    """The token each answer predicts, read as RMT reads it: past a restatement of the part of the current value
    already written (``rmt.prompts.restatement_length``); None when the response never closed ``</think>``, or gave
    nothing or EOS after it."""
    from rmt.prompts import restatement_length

    out = []
    for a, w in zip(answers, written):
        token = None if a is None else a[restatement_length(a, w, decode) :][:1]
        out.append(token[0] if token and token[0] != eos else None)
    return out


POSITION_KINDS = ("computed", "answer_end", "other")


def position_kind(start: int, spans: list[list[int]]) -> str:
    """What the token starting at character ``start`` is: inside a computed value, the one right after it, or other."""
    if any(s <= start < e for s, e in spans):
        return "computed"
    if any(start == e for _, e in spans):
        return "answer_end"
    return "other"


def position_probe(
    model, tokenizer, docs: list[dict], n: int = 500, think_tokens: int = 64, batch_size: int = 64, seed: int = 0
) -> dict:
    """Think-then-predict at ``n`` random positions of ``docs`` (``{"text", "computed_spans"}``), greedy.

    A position is a text token other than a document's first (the prefix holds at least one token), drawn uniformly
    over all documents with ``seed``. Reasoning mode = RMT's raw prompt (``[bos] prefix <think>``), generate until
    ``</think>`` (at most ``think_tokens``), then the answer read as RMT reads it: the first token after
    ``</think>``, past a restatement of the part of the current value already written
    (``rmt.prompts.restatement_length``); well formed when ``</think>`` came and that token is not EOS. Direct = the
    best token other than ``<think>``. Returns, for all positions and per kind (``computed``, split into
    ``computed_first`` and ``computed_later`` characters of a value, ``answer_end``, ``other``): n, well_formed,
    malformed, direct and reasoning accuracy (a malformed response counts as wrong), mean and empty-think share.
    """
    from rmt.prompts import current_value_ids

    open_id, _, pad = _special_ids(tokenizer)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = tokenizer.eos_token_id
    decode = lambda ids: tokenizer.decode(ids, clean_up_tokenization_spaces=False)  # noqa: E731
    encoded = []
    for doc in docs:
        enc = tokenizer(doc["text"], add_special_tokens=False, return_offsets_mapping=True)
        encoded.append((enc["input_ids"], enc["offset_mapping"]))
    sites = [(d, k) for d, (ids, _) in enumerate(encoded) for k in range(1, len(ids))]
    if len(sites) > n:
        sites = sorted(random.Random(seed).sample(sites, n))
    if not sites:
        return {"n": 0}
    prompts = [bos + encoded[d][0][:k] for d, k in sites]
    targets = [encoded[d][0][k] for d, k in sites]
    kinds = []
    for d, k in sites:
        start, spans = encoded[d][1][k][0], docs[d].get("computed_spans", [])
        kind = position_kind(start, spans)
        kinds.append(kind if kind != "computed" else "computed_first" if any(s == start for s, _ in spans) else "computed_later")
    written = [current_value_ids(p[-16:], decode) for p in prompts]
    direct = generate_ids(model, prompts, 1, [], pad, batch_size, suppress=[open_id])
    width = 1 + max(len(w) for w in written)
    thoughts, answers = think_then_answer(model, tokenizer, [p + [open_id] for p in prompts], width, think_tokens, batch_size)
    read = next_tokens_read(answers, written, decode, eos)
    formed = [r is not None for r in read]

    def summary(sel: list[int]) -> dict:
        m = len(sel)
        if not m:
            return {"n": 0}
        return {
            "n": m,
            "well_formed": sum(formed[i] for i in sel) / m,
            "malformed": 1 - sum(formed[i] for i in sel) / m,
            "direct_accuracy": sum(direct[i][:1] == [targets[i]] for i in sel) / m,
            "reasoning_accuracy": sum(formed[i] and read[i] == targets[i] for i in sel) / m,
            "mean_think_tokens": sum(len(thoughts[i]) for i in sel) / m,
            "empty_think": sum(formed[i] and not thoughts[i] for i in sel) / m,
        }

    out = {"all": summary(list(range(len(sites))))}
    for kind in POSITION_KINDS:
        prefix = kind if kind != "computed" else "computed_"
        out[kind] = summary([i for i, k in enumerate(kinds) if k.startswith(prefix) or k == kind])
    out["computed_first"] = summary([i for i, k in enumerate(kinds) if k == "computed_first"])
    out["computed_later"] = summary([i for i, k in enumerate(kinds) if k == "computed_later"])
    out["not_computed"] = summary([i for i, k in enumerate(kinds) if not k.startswith("computed")])
    return out


def steps_form(thought: str) -> str:
    """Which way a chain_sum scratchpad reasons: ``worked`` (``2+6=8;8+3=11``), ``compact`` (running results only,
    ``8;11``), ``rechecked`` (steps written again after ``|``, ``embedded.recheck``) or ``empty`` (nothing)."""
    if not thought.strip():
        return "empty"
    if RECHECK_SEP in thought:
        return "rechecked"
    return "worked" if "=" in thought else "compact"


def thinking_forms(
    model,
    tokenizer,
    docs: list[dict],
    n: int = 200,
    samples: int = 8,
    temperature: float = 1.0,
    think_tokens: int = 64,
    batch_size: int = 64,
    seed: int = 0,
    classify=steps_form,
) -> dict:
    """How the model reasons at computed positions, sampled as RMT's rollouts are, and how well each way does.

    ``n`` random token positions inside the ``computed_spans`` of ``docs`` (drawn with ``seed``), each prompted as RMT
    prompts it (``[bos] prefix <think>``) ``samples`` times at ``temperature``; the answer is read as in
    ``position_probe``. Each response's thinking is put in a form by ``classify`` (decoded text -> name). Returns the
    share of responses in each form, the accuracy and mean thinking length of each form and overall, and the share
    of positions where some response in a form is right (what a group of ``samples`` rollouts can reinforce).
    """
    from rmt.prompts import current_value_ids

    open_id, _, _ = _special_ids(tokenizer)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = tokenizer.eos_token_id
    decode = lambda ids: tokenizer.decode(ids, clean_up_tokenization_spaces=False)  # noqa: E731
    sites = []
    for d, doc in enumerate(docs):
        enc = tokenizer(doc["text"], add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        sites += [(ids, k) for k in range(1, len(ids)) if position_kind(offsets[k][0], doc.get("computed_spans", [])) == "computed"]
    if not sites:
        return {"positions": 0}
    rng = random.Random(seed)
    sites = rng.sample(sites, min(n, len(sites)))
    prompts = [bos + ids[:k] for ids, k in sites for _ in range(samples)]
    targets = [ids[k] for ids, k in sites for _ in range(samples)]
    written = [current_value_ids(p[-16:], decode) for p in prompts]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        thoughts, answers = think_then_answer(
            model, tokenizer, [p + [open_id] for p in prompts], 1 + max(len(w) for w in written), think_tokens, batch_size, temperature
        )
    right = [r is not None and r == y for r, y in zip(next_tokens_read(answers, written, decode, eos), targets)]
    forms = [classify(decode(t)) if a is not None else "malformed" for t, a in zip(thoughts, answers)]
    m = len(prompts)
    out = {"positions": len(sites), "samples": samples, "temperature": temperature, "accuracy": sum(right) / m,
           "mean_think_tokens": sum(len(t) for t in thoughts) / m, "forms": {}}
    for form in sorted(set(forms)):
        sel = [i for i, f in enumerate(forms) if f == form]
        out["forms"][form] = {
            "share": len(sel) / m,
            "accuracy": sum(right[i] for i in sel) / len(sel),
            "mean_think_tokens": sum(len(thoughts[i]) for i in sel) / len(sel),
            "positions_with_a_right_one": sum(
                any(right[i] and forms[i] == form for i in range(j * samples, (j + 1) * samples)) for j in range(len(sites))
            ) / len(sites),
        }
    return out


@torch.no_grad()
def ntp_accuracy(model, tokenizer, docs: list[dict], batch_size: int = 32) -> dict:
    """Teacher-forced next-token loss and argmax accuracy over ``[bos] text [eos]`` of each document.

    Accuracy is also split by target: tokens inside ``computed_spans`` (what reasoning can win) and the rest
    (mostly random operands, which no reasoning predicts; SPEC section 8).
    """
    model.eval()
    device = next(model.parameters()).device
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    _, _, pad = _special_ids(tokenizer)
    loss_sum = 0.0
    hits = {"computed": [0, 0], "other": [0, 0]}
    for b in range(0, len(docs), batch_size):
        batch = docs[b : b + batch_size]
        enc = tokenizer([d["text"] for d in batch], add_special_tokens=False, return_offsets_mapping=True)
        seqs, flags = [], []
        for d, ids, offsets in zip(batch, enc["input_ids"], enc["offset_mapping"]):
            comp = [any(a < e and s < bb for s, e in d.get("computed_spans", [])) for a, bb in offsets]
            seqs.append(bos + ids + eos)
            flags.append([False] * len(bos) + comp + [False] * len(eos))
        width = max(len(x) for x in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        comp = torch.zeros((len(seqs), width), dtype=torch.bool)
        for r, (x, f) in enumerate(zip(seqs, flags)):
            ids[r, : len(x)], mask[r, : len(x)], comp[r, : len(x)] = torch.tensor(x), 1, torch.tensor(f)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, :-1].float().cpu()
        target, valid, comp = ids[:, 1:], mask[:, 1:].bool(), comp[:, 1:]
        loss_sum += torch.nn.functional.cross_entropy(logits[valid], target[valid], reduction="sum").item()
        right = logits.argmax(-1) == target
        for name, sel in (("computed", valid & comp), ("other", valid & ~comp)):
            hits[name][0] += right[sel].sum().item()
            hits[name][1] += sel.sum().item()
    total = hits["computed"][1] + hits["other"][1]
    return {
        "tokens": total,
        "loss": loss_sum / max(1, total),
        "accuracy": (hits["computed"][0] + hits["other"][0]) / max(1, total),
        "computed_accuracy": hits["computed"][0] / max(1, hits["computed"][1]),
        "other_accuracy": hits["other"][0] / max(1, hits["other"][1]),
    }


def posttrain_accuracy(
    model,
    tokenizer,
    records: list[dict],
    mode: str = "reasoning",
    think_tokens: int = 64,
    answer_tokens: int = 12,
    batch_size: int = 64,
    temperature: float = 0.0,
    seed: int = 0,
) -> dict:
    """Share of post-training records answered correctly (generator's verifier), thinking or direct.

    Greedy by default; with ``temperature`` > 0 the thinking is sampled (seeded), as GRPO's rollouts would be.
    """
    from rmt.embedded.corpus import question_text, score_posttrain

    if mode not in ("reasoning", "direct"):
        raise ValueError(f"mode must be reasoning or direct, got {mode!r}")
    open_id, _, pad = _special_ids(tokenizer)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    prompts = [bos + tokenizer(question_text(r), add_special_tokens=False)["input_ids"] for r in records]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if mode == "reasoning":
            thoughts, answers = think_then_answer(
                model, tokenizer, [p + [open_id] for p in prompts], answer_tokens, think_tokens, batch_size, temperature
            )
        else:  # direct: the answer right after the prompt, <think> forbidden
            thoughts = [[] for _ in prompts]
            answers = generate_ids(model, prompts, answer_tokens, eos, pad, batch_size, suppress=[open_id], temperature=temperature)
    scores = []
    for r, a in zip(records, answers):
        text = None if a is None else tokenizer.decode(a, skip_special_tokens=True).split("\n")[0].strip()
        scores.append(score_posttrain(r, text) if text else 0.0)
    n = max(1, len(records))
    return {
        "n": len(records),
        "accuracy": sum(s == 1.0 for s in scores) / n,  # reasoning-gym gives partial credit to wrong numbers
        "mean_score": sum(scores) / n,
        "malformed": sum(a is None for a in answers) / n,
        "mean_think_tokens": sum(len(t) for t in thoughts) / n,
    }


def probe_base_model(cfg: RMTConfig, arts) -> dict:
    """Reasoning probe of the embedded base model; writes probe.json.

    Post-training accuracy (greedy, sampled, direct), mid-training values (the start of each computed value), and
    ``midtrain_positions``: think-then-predict at random positions of the mid-training text, as RMT prompts it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rmt.embedded.corpus import read_jsonl

    n = cfg.pretrain.probe_problems
    model = AutoModelForCausalLM.from_pretrained(str(arts.base_model_dir), dtype=torch.float32, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(arts.base_model_dir))
    posttrain = read_jsonl(arts.posttrain_path)[:n]
    midtrain = read_jsonl(arts.midtrain_path)
    result = {
        "posttrain_reasoning": posttrain_accuracy(model, tokenizer, posttrain, mode="reasoning"),
        "posttrain_reasoning_sampled": posttrain_accuracy(model, tokenizer, posttrain, mode="reasoning", temperature=1.0),
        "posttrain_direct": posttrain_accuracy(model, tokenizer, posttrain, mode="direct"),
        "midtrain_values": reasoning_advantage(model, tokenizer, midtrain, max_values=n),
        "midtrain_positions": position_probe(model, tokenizer, midtrain, n=n),
        "eval_ntp": ntp_accuracy(model, tokenizer, read_jsonl(arts.eval_path)),
    }
    atomic_write_text(arts.base_model_dir / "probe.json", json.dumps(result, indent=2) + "\n")
    log.info("reasoning probe of the base model: %s", result)
    return result


class _UsageParser(argparse.ArgumentParser):
    def error(self, message: str):  # a one-line message with the usage, as SystemExit's text (no exit code 2 dance)
        raise SystemExit(f"{self.format_usage().strip()}\nerror: {message}")


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> None:
    """``python -m rmt.embedded.probe MODEL_DIR CORPUS.jsonl [N] [--forms] [--think-tokens K]``: the position probe
    of any model on a corpus, as JSON; with ``--forms``, ``thinking_forms`` at N computed positions instead (8 samples
    each at T=1). ``--think-tokens``: the thinking cap (default 64)."""
    import json

    from pathlib import Path

    from rmt.embedded.corpus import read_jsonl
    from rmt.errors import RMTError
    from rmt.modeling import load_model, load_tokenizer

    parser = _UsageParser(prog="python -m rmt.embedded.probe", description="Does thinking help this model on this corpus?")
    parser.add_argument("model_dir")
    parser.add_argument("corpus", help="JSON Lines of {text, computed_spans} records")
    parser.add_argument("n", nargs="?", type=_positive, help="positions (default 500; 200 with --forms)")
    parser.add_argument("--forms", action="store_true", help="sample the ways it reasons at computed positions instead")
    parser.add_argument("--think-tokens", type=_positive, default=64, help="thinking cap (default 64)")
    args = parser.parse_args(argv)
    try:
        if not Path(args.corpus).is_file():
            raise RMTError(f"no such corpus file: {args.corpus}")
        try:
            records = read_jsonl(args.corpus)
        except (ValueError, UnicodeDecodeError) as e:
            raise RMTError(f"{args.corpus} is not a JSON Lines file of {{\"text\", \"computed_spans\"}} records: {e}") from None
        # Safetensors only, through the same loader as every stage (a pickled checkpoint is refused).
        model = load_model(args.model_dir, RMTConfig.model_validate({"model": {"dtype": "float32"}}), torch.device("cpu"))
        tokenizer = load_tokenizer(args.model_dir)
    except (RMTError, OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    if args.forms:
        result = thinking_forms(model, tokenizer, records, n=args.n or 200, think_tokens=args.think_tokens)
    else:
        result = position_probe(model, tokenizer, records, n=args.n or 500, think_tokens=args.think_tokens)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
