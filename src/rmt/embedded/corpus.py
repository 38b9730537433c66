"""The embedded default's corpus: reasoning-gym problems in four disjoint splits (the cache is ``rmt.embedded.cache``).

There is no model hub here (SPEC section 6), so the default pipeline makes its own material:

- ``base.jsonl``: base pre-training documents. Each document holds ``embedded.problems_per_doc`` problems, one per
  line, all with a ``<think>`` scratchpad (``5-1+4=<think>5-1=4;4+4=8</think>8``) or all plain (``5-1+4=8``);
  ``embedded.think_fraction`` of the documents think. In a thinking document, ``embedded.empty_think`` of the lines
  also hold an empty block at another position (``5-<think></think>1+4=<think>5-1=4;4+4=8</think>8``): RMT prompts
  ``<think>`` at any position, and where nothing can be worked out the model should close at once and predict.
  Problems may repeat: it is a stream.
- ``midtrain.jsonl`` and ``eval.jsonl``: plain documents (no think tags) with ``computed_spans``, the character
  spans ``[start, end)`` of the values each document computes (the answers), as opposed to its random operands.
- ``posttrain.jsonl``: one problem per record, the prompt and the verifiable answer kept apart, scored with the
  generator's own ``score_answer``.

Every problem belongs to exactly one split, chosen by a hash of the seed and the problem itself, so the splits are
disjoint by construction; the held-out splits hold each problem at most once. The files depend only on the
``embedded`` config section and the reasoning-gym version: same seed, same bytes, on any machine.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rmt.config import EmbeddedConfig
from rmt.errors import DataError

log = logging.getLogger(__name__)

RECHECK_SEP = "|"  # between the passes of a rechecked scratchpad
CORPUS_FORMAT = 3  # bump when the written files change for the same config (2: empty think blocks; 3: inside-value scratchpads, compact steps)
SPLITS = ("base", "midtrain", "eval", "posttrain")
# Share of the problem space each split may draw from (hash buckets). The held-out splits need distinct problems, so
# their buckets are larger than their share of the data.
SPLIT_SHARES = {"posttrain": 0.03, "eval": 0.04, "midtrain": 0.13, "base": 0.80}
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
STALL_DRAWS = 100_000  # give up when no split has grown for this many draws: the problem space is too small


def reasoning_gym_version() -> str:
    return importlib.metadata.version("reasoning-gym")


@dataclass(frozen=True)
class Problem:
    """One chain-sum problem in compact form: ``terms[0] ops[0] terms[1] ...`` = ``answer``."""

    terms: tuple[int, ...]
    ops: tuple[str, ...]
    entry: dict  # the generator's own record (question, answer, metadata): what score_answer needs

    @property
    def expression(self) -> str:
        out = str(self.terms[0])
        for op, t in zip(self.ops, self.terms[1:]):
            out += f"{op}{t}"
        return out

    @property
    def answer(self) -> str:
        return self.entry["answer"]

    def steps(self, compact: bool = False) -> list[str]:
        """The worked solution, left to right: ``["5-1=4", "4+4=8"]``; compact: the running results only, ``["4", "8"]``."""
        acc, out = self.terms[0], []
        for op, t in zip(self.ops, self.terms[1:]):
            new = acc + t if op == "+" else acc - t
            out.append(str(new) if compact else f"{acc}{op}{t}={new}")
            acc = new
        return out


def parse_problem(entry: dict) -> Problem:
    """A chain_sum record (``"6 + 0 - 1 + 8"``) as a Problem; its worked result is checked against the answer."""
    parts = entry["metadata"]["expression"].split()
    terms, ops = tuple(int(p) for p in parts[0::2]), tuple(parts[1::2])
    if not ops or any(op not in "+-" for op in ops) or len(terms) != len(ops) + 1:
        raise DataError(f"unexpected chain_sum expression {entry['metadata']['expression']!r}")
    problem = Problem(terms, ops, entry)
    if problem.steps()[-1].rsplit("=", 1)[1] != problem.answer:
        raise DataError(f"chain_sum answer {problem.answer!r} disagrees with {problem.expression}")
    return problem


def render_plain(p: Problem) -> tuple[str, tuple[int, int]]:
    """``5-1+4=8`` and the span of the computed answer in it."""
    line = f"{p.expression}={p.answer}"
    return line, (len(line) - len(p.answer), len(line))


def render_think(
    p: Problem, empty_at: int | None = None, inside_at: int | None = None, compact: bool = False, passes: int = 1
) -> str:
    """``5-1+4=<think>5-1=4;4+4=8</think>8``: the scratchpad in the same form as RMT's rollouts.

    ``inside_at``: the scratchpad comes after character ``inside_at`` of the plain line, strictly inside the answer
    (part of the value already written), and the whole value is restated after it:
    ``1-5-9=-1<think>1-5=-4;-4-9=-13</think>-13``. ``compact``: the steps as running results only (``-4;-13``).
    ``passes``: the steps written that many times, apart by ``|`` (a rechecked scratchpad, ``embedded.recheck``).
    ``empty_at``: also an empty ``<think></think>`` before character ``empty_at`` of the plain line (``len(line)`` =
    at its end, before the newline); never at or inside the answer, where the scratchpad is.
    """
    line, (a, b) = render_plain(p)
    pad = f"{THINK_OPEN}{RECHECK_SEP.join([';'.join(p.steps(compact))] * passes)}{THINK_CLOSE}"
    if inside_at is None:
        pieces = [line[:a], pad, line[a:]]
    else:
        if not a < inside_at < b:
            raise ValueError(f"position {inside_at} is not inside the answer of {line!r}")
        pieces = [line[:inside_at], pad, p.answer]
    if empty_at is not None:
        if not 0 <= empty_at <= len(line) or a <= empty_at < b:
            raise ValueError(f"empty think position {empty_at} is outside {line!r} or at or inside its answer")
        empty = THINK_OPEN + THINK_CLOSE
        if empty_at < a:
            pieces[0] = line[:empty_at] + empty + pieces[0][empty_at:]
        else:
            pieces[2] += empty
    return "".join(pieces)


def empty_think_position(rng: random.Random, p: Problem, newline: bool) -> int:
    """A uniform position of the plain line outside its answer; its end only when a newline follows (the last line
    of a document is followed by EOS, never an RL target)."""
    line, (a, b) = render_plain(p)
    slots = [i for i in range(len(line) + (1 if newline else 0)) if not a <= i < b]
    return rng.choice(slots)


def inside_position(rng: random.Random, p: Problem) -> int | None:
    """A uniform position strictly inside the answer (after its first character), None for a one-character answer."""
    _, (a, b) = render_plain(p)
    return rng.randrange(a + 1, b) if b - a > 1 else None


def _bucket(seed: int, task: str, key: str) -> str:
    """The split a problem belongs to: a hash of the seed and the problem, so no problem is in two splits."""
    h = hashlib.blake2b(f"{seed}|{task}|{key}".encode(), digest_size=8).digest()
    u = int.from_bytes(h, "big") / 2**64
    edge = 0.0
    for split in ("posttrain", "eval", "midtrain", "base"):
        edge += SPLIT_SHARES[split]
        if u < edge:
            return split
    return "base"


def _generator(ecfg: EmbeddedConfig, terms: int | None = None):
    """The reasoning-gym stream of the corpus (``terms``: the long problems' stream, a fixed number of terms)."""
    import reasoning_gym

    return reasoning_gym.create_dataset(
        ecfg.task,
        min_terms=terms or ecfg.min_terms,
        max_terms=terms or ecfg.max_terms,
        min_digits=ecfg.min_digits,
        max_digits=ecfg.max_digits,
        # the generator seeds item i with seed + i: keep the streams of nearby seeds (and the long stream) apart
        seed=ecfg.seed * 1_000_003 + (7_919 * terms if terms else 0),
        size=2**62,
    )


HELD_OUT = ("midtrain", "eval", "posttrain")


def long_counts(ecfg: EmbeddedConfig) -> dict[str, int]:
    """How many problems of each split are long (``embedded.long_terms`` terms): ``long_fraction`` of each held-out
    split, ``long_base_fraction`` of the base split."""
    if not ecfg.long_terms:
        return {s: 0 for s in SPLITS}
    sizes = {"base": ecfg.base_problems, "midtrain": ecfg.midtrain_problems, "eval": ecfg.eval_problems, "posttrain": ecfg.posttrain_problems}
    return {s: round((ecfg.long_base_fraction if s == "base" else ecfg.long_fraction) * n) for s, n in sizes.items()}


def draw_long(ecfg: EmbeddedConfig) -> dict[str, list[Problem]]:
    """The long problems of every split, from their own stream: the held-out splits' first (distinct, each problem
    in one split only), then the base split's (a stream, repeats allowed, never a held-out problem)."""
    counts = long_counts(ecfg)
    out: dict[str, list[Problem]] = {s: [] for s in SPLITS}
    if not sum(counts.values()):
        return out
    ds, held, idx = _generator(ecfg, ecfg.long_terms), set(), 0
    for split in (*HELD_OUT, "base"):
        last = idx
        while len(out[split]) < counts[split]:
            if idx - last > STALL_DRAWS:
                raise DataError(f"too few distinct {ecfg.long_terms}-term problems for embedded.long_fraction={ecfg.long_fraction}")
            p = parse_problem(ds[idx])
            idx += 1
            if p.expression in held:
                continue
            if split != "base":
                held.add(p.expression)
            out[split].append(p)
            last = idx
    return out


def mix_in(regular: list[Problem], extra: list[Problem], rng: random.Random) -> list[Problem]:
    """The regular problems with the extra ones inserted at seeded random places (the regular order is kept)."""
    out = list(regular)
    for p in extra:
        out.insert(rng.randint(0, len(out)), p)
    return out


def draw_problems(ecfg: EmbeddedConfig) -> dict[str, list[Problem]]:
    """The regular problems of every split, in generation order (each split leaves room for its long problems).
    Deterministic in the config and the reasoning-gym version."""
    long = long_counts(ecfg)
    wanted = {
        "base": ecfg.base_problems - long["base"],
        "midtrain": ecfg.midtrain_problems - long["midtrain"],
        "eval": ecfg.eval_problems - long["eval"],
        "posttrain": ecfg.posttrain_problems - long["posttrain"],
    }
    out: dict[str, list[Problem]] = {s: [] for s in SPLITS}
    seen: dict[str, set[str]] = {s: set() for s in SPLITS}
    ds = _generator(ecfg)
    idx = last_growth = 0
    while any(len(out[s]) < wanted[s] for s in SPLITS):
        if idx - last_growth > STALL_DRAWS:
            short = {s: f"{len(out[s])}/{wanted[s]}" for s in SPLITS if len(out[s]) < wanted[s]}
            raise DataError(
                f"the {ecfg.task} problem space ({ecfg.min_terms}-{ecfg.max_terms} terms, {ecfg.min_digits}-"
                f"{ecfg.max_digits} digits) is too small for the requested splits (found {short} distinct problems "
                f"after {idx} draws): lower embedded.*_problems or widen embedded.max_terms / max_digits"
            )
        p = parse_problem(ds[idx])
        idx += 1
        split = _bucket(ecfg.seed, ecfg.task, p.expression)
        if len(out[split]) >= wanted[split]:
            continue
        if split != "base":  # held-out splits: each problem once
            if p.expression in seen[split]:
                continue
            seen[split].add(p.expression)
        out[split].append(p)
        last_growth = idx
    return out


def _chunks(items: list, n: int) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def plain_document(problems: list[Problem]) -> dict:
    """``{"text": "5-1+4=8\\n...", "computed_spans": [[6, 7], ...]}``: one problem per line, answers marked."""
    text, spans = "", []
    for i, p in enumerate(problems):
        if i:
            text += "\n"
        line, (a, b) = render_plain(p)
        spans.append([len(text) + a, len(text) + b])
        text += line
    return {"text": text, "computed_spans": spans}


def _seeded_rng(name: str, seed: int) -> random.Random:
    """A generator of its own per purpose and seed, so one purpose's draws never shift another's."""
    return random.Random(int.from_bytes(hashlib.sha256(f"{name}|{seed}".encode()).digest()[:8], "big"))


def base_documents(problems: list[Problem], ecfg: EmbeddedConfig) -> list[dict]:
    """Base pre-training documents: each one all-think or all-plain, so a plain context predicts answers directly.

    In a thinking document each line has its scratchpad; with probability ``embedded.inside_think`` (lines whose
    answer has two or more characters) it comes after part of the answer and the whole value is restated; with
    probability ``embedded.compact_steps`` its steps are running results only; with probability
    ``embedded.recheck`` its steps are written 1 + ``embedded.recheck_passes`` times; with probability
    ``embedded.empty_think`` the line also holds an empty block outside its answer. Each choice has its own seeded
    stream, so setting the four to 0 writes the format-1 corpus byte for byte (and recheck at 0 leaves every other
    draw where it was).
    """
    rng = _seeded_rng("think", ecfg.seed)
    empty_rng, inside_rng, compact_rng, recheck_rng = (
        _seeded_rng(name, ecfg.seed) for name in ("empty-think", "inside-think", "compact-steps", "recheck")
    )
    docs = []
    for group in _chunks(problems, ecfg.problems_per_doc):
        think = rng.random() < ecfg.think_fraction
        if think:
            lines = []
            for i, p in enumerate(group):
                empty = empty_rng.random() < ecfg.empty_think
                empty_at = empty_think_position(empty_rng, p, newline=i < len(group) - 1) if empty else None
                inside = inside_rng.random() < ecfg.inside_think
                inside_at = inside_position(inside_rng, p) if inside else None
                compact = compact_rng.random() < ecfg.compact_steps
                passes = 1 + ecfg.recheck_passes if recheck_rng.random() < ecfg.recheck else 1
                lines.append(render_think(p, empty_at, inside_at, compact, passes))
        else:
            lines = [render_plain(p)[0] for p in group]
        docs.append({"text": "\n".join(lines), "think": think})
    return docs


def posttrain_record(p: Problem) -> dict:
    """Prompt and verifiable answer kept apart; ``entry`` is what the generator's score_answer reads; ``terms`` tells
    the long problems (embedded.long_terms) from the regular ones."""
    return {"prompt": f"{p.expression}=", "answer": p.answer, "task": p.entry["metadata"]["source_dataset"],
            "terms": len(p.terms), "entry": p.entry}


def build_corpus(ecfg: EmbeddedConfig) -> dict[str, list[dict]]:
    """The four splits as lists of JSON-ready records."""
    problems = draw_problems(ecfg)
    long = draw_long(ecfg)
    for split in SPLITS:
        if long[split]:
            problems[split] = mix_in(problems[split], long[split], _seeded_rng(f"long-{split}", ecfg.seed))
    return {
        "base": base_documents(problems["base"], ecfg),
        "midtrain": [plain_document(g) for g in _chunks(problems["midtrain"], ecfg.problems_per_doc)],
        "eval": [plain_document(g) for g in _chunks(problems["eval"], ecfg.problems_per_doc)],
        "posttrain": [posttrain_record(p) for p in problems["posttrain"]],
    }


def _jsonl_bytes(records: list[dict]) -> bytes:
    # Fixed separators and key order: the bytes are the identity of the corpus (checked in the tests).
    return b"".join(json.dumps(r, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode() + b"\n" for r in records)


def write_corpus(ecfg: EmbeddedConfig, out_dir: str | Path) -> dict:
    """Write ``<split>.jsonl`` for every split and ``manifest.json`` (sha256 of each file) into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = build_corpus(ecfg)
    files = {}
    for split in SPLITS:
        data = _jsonl_bytes(corpus[split])
        (out_dir / f"{split}.jsonl").write_bytes(data)
        files[split] = {"file": f"{split}.jsonl", "records": len(corpus[split]), "sha256": hashlib.sha256(data).hexdigest()}
    manifest = {
        "format": CORPUS_FORMAT,
        "reasoning_gym": reasoning_gym_version(),
        "embedded": ecfg.model_dump(mode="json", exclude={"cache_dir"}),
        "files": files,
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


# A post-training question is asked as a line of a document, after a newline, not as a document's first line right
# after BOS: the base model is pre-trained on rows cut from a packed stream, so BOS almost never sits at position 0 of
# its context, and there it misreads the operands (measured on the default base model, 200 questions, greedy:
# reasoning accuracy 0.125 without the newline, 0.97 with it; docs/embedded.md).
QUESTION_PREFIX = "\n"


def question_text(record: dict) -> str:
    """The text a post-training record is asked with (its ``prompt`` after ``QUESTION_PREFIX``)."""
    return QUESTION_PREFIX + record["prompt"]


def score_posttrain(record: dict, answer: str | None) -> float:
    """The generator's own verifier: 1.0 for a correct answer to a post-training record, else 0.0 (or partial)."""
    import reasoning_gym

    return float(reasoning_gym.get_score_answer_fn(record["task"])(answer, record["entry"]))


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"embedded split not found: {path}")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
