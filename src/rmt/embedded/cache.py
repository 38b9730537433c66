"""The embedded default's cache: corpus, tokenizer and base model, built on first use and keyed by the config.

There is no model hub here (SPEC section 6), so the default pipeline makes its own material and caches it under
``embedded.cache_dir`` ($RMT_CACHE, else ~/.cache/rmt): the corpus (``rmt.embedded.corpus``), a tokenizer trained
on its base split (``rmt.data.tokenizer``), and a small Llama pre-trained on it (``rmt.pretrain``), probed for its
reasoning (``rmt.embedded.probe``). ``resolve_model_path`` is where "model.path unset" becomes that base model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rmt.config import EmbeddedConfig, RMTConfig
from rmt.embedded.corpus import CORPUS_FORMAT, read_jsonl, reasoning_gym_version, write_corpus
from rmt.fileio import exclusive

log = logging.getLogger(__name__)
SHIPPED_DIR = Path(__file__).parent / "base_models"  # base models trained by `rmt pretrain`, shipped so a first run skips it


@dataclass(frozen=True)
class EmbeddedArtifacts:
    """Paths of the embedded default's material (``base_model_dir`` exists only after ``ensure_embedded(model=True)``)."""

    root: Path
    base_path: Path
    midtrain_path: Path
    eval_path: Path
    posttrain_path: Path
    tokenizer_dir: Path
    base_model_dir: Path


def _key(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def cache_root(ecfg: EmbeddedConfig) -> Path:
    if ecfg.cache_dir:
        return Path(ecfg.cache_dir).expanduser()
    return Path(os.environ.get("RMT_CACHE") or Path.home() / ".cache" / "rmt").expanduser()


def corpus_key(ecfg: EmbeddedConfig) -> str:
    fields = ecfg.model_dump(mode="json", exclude={"cache_dir"})
    if not ecfg.recheck:  # added after format 3 shipped: unset, it leaves the key (and the shipped model's) as it was
        fields.pop("recheck"), fields.pop("recheck_passes")
    return _key({"format": CORPUS_FORMAT, "reasoning_gym": reasoning_gym_version(), "embedded": fields})


def tokenizer_key(cfg: RMTConfig) -> str:
    from rmt.data.tokenizer import TOKENIZER_FORMAT

    return _key({"corpus": corpus_key(cfg.embedded), "format": TOKENIZER_FORMAT, "vocab_size": cfg.pretrain.vocab_size})


def model_key(cfg: RMTConfig) -> str:
    from rmt.pretrain import weight_settings

    return _key({"tokenizer": tokenizer_key(cfg), "pretrain": weight_settings(cfg.pretrain)})


def embedded_paths(cfg: RMTConfig) -> EmbeddedArtifacts:
    """Where the artifacts of this config live (nothing is built)."""
    root = cache_root(cfg.embedded) / "embedded" / corpus_key(cfg.embedded)
    corpus = root / "corpus"
    return EmbeddedArtifacts(
        root=root,
        base_path=corpus / "base.jsonl",
        midtrain_path=corpus / "midtrain.jsonl",
        eval_path=corpus / "eval.jsonl",
        posttrain_path=corpus / "posttrain.jsonl",
        tokenizer_dir=root / f"tokenizer-{tokenizer_key(cfg)}",
        base_model_dir=root / f"base-{model_key(cfg)}",
    )


def _locked(root: Path):
    """One builder at a time (e.g. every process of a distributed launch calls ensure_embedded)."""
    return exclusive(root / ".lock", f"building the embedded material in {root}")


def _build_dir(target: Path, build) -> None:
    """Build into a temporary sibling folder, then rename: a crash never leaves a half-written folder behind."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is ordinary files
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def shipped_model_dir(cfg: RMTConfig) -> Path:
    """Where the package would hold a pre-built copy of this config's base model (it may not)."""
    return SHIPPED_DIR / f"base-{model_key(cfg)}"


SHIPPED_FILES = ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "metrics.jsonl", "probe.json")


def _copy_shipped(cfg: RMTConfig, arts: EmbeddedArtifacts) -> bool:
    """Copy the shipped base model into the cache if it was trained from this very config, corpus and tokenizer.

    The cache key already covers the config, the corpus generator's version and reasoning-gym's; the tokenizer is
    compared too, since it is trained here from the corpus and is what the weights index into.
    """
    from rmt.pretrain import DONE_FILE, RUN_FILE, _run_identity

    src = shipped_model_dir(cfg)
    if not (src / DONE_FILE).is_file():
        return False
    if json.loads((src / "tokenizer.json").read_text()) != json.loads((arts.tokenizer_dir / "tokenizer.json").read_text()):
        log.warning("the shipped base model %s was trained with another tokenizer than this machine built; training it here", src.name)
        return False

    def build(d: Path) -> None:
        for f in (*SHIPPED_FILES, DONE_FILE):
            if (src / f).is_file():
                shutil.copyfile(src / f, d / f)
        identity = _run_identity(cfg.pretrain, arts.base_path, arts.tokenizer_dir, "text")
        (d / RUN_FILE).write_text(json.dumps(identity, indent=2, sort_keys=True) + "\n")

    log.info("using the base model shipped with rmt (%s; pretrain.use_shipped=false trains it here instead)", src.name)
    _build_dir(arts.base_model_dir, build)
    return True


def ensure_embedded(cfg: RMTConfig, model: bool = True, progress: bool = True) -> EmbeddedArtifacts:
    """Build what is missing of the embedded default (corpus, tokenizer, base model) and reuse what exists.

    Keyed by a hash of the ``embedded`` and ``pretrain`` settings and the reasoning-gym version, under
    ``embedded.cache_dir`` ($RMT_CACHE, else ~/.cache/rmt). A second call returns at once; an interrupted
    pretraining resumes from its last checkpoint. ``model=False`` stops after the corpus and the tokenizer.
    """
    arts = embedded_paths(cfg)
    with _locked(arts.root):
        corpus_dir = arts.base_path.parent
        if not (corpus_dir / "manifest.json").is_file():
            log.info("generating the embedded corpus in %s", corpus_dir)
            if corpus_dir.exists():
                shutil.rmtree(corpus_dir)
            _build_dir(corpus_dir, lambda d: write_corpus(cfg.embedded, d))
        if not (arts.tokenizer_dir / "tokenizer.json").is_file():
            from rmt.data.tokenizer import train_tokenizer

            log.info("training the embedded tokenizer in %s", arts.tokenizer_dir)
            texts = [d["text"] for d in read_jsonl(arts.base_path)]
            tok = train_tokenizer(texts, cfg.pretrain.vocab_size)
            if arts.tokenizer_dir.exists():
                shutil.rmtree(arts.tokenizer_dir)
            _build_dir(arts.tokenizer_dir, lambda d: tok.save_pretrained(str(d)))
        if model:
            from rmt.embedded.probe import probe_base_model
            from rmt.pretrain import is_complete, train_base_model

            if not arts.base_model_dir.exists() and cfg.pretrain.use_shipped:
                _copy_shipped(cfg, arts)
            if not is_complete(arts.base_model_dir):
                log.info("pretraining the embedded base model in %s", arts.base_model_dir)
                train_base_model(
                    cfg,
                    arts.base_path,
                    arts.base_model_dir,
                    tokenizer_dir=arts.tokenizer_dir,
                    text_field="text",
                    progress=progress,
                )
            if cfg.pretrain.probe_problems and not (arts.base_model_dir / "probe.json").is_file():
                probe_base_model(cfg, arts)
    return arts


def base_model_summary(cfg: RMTConfig) -> dict:
    """`rmt pretrain` without pretrain.corpus: build (or find) the embedded base model; its summary and probe."""
    from rmt.pretrain import DONE_FILE

    arts = ensure_embedded(cfg)
    summary = json.loads((arts.base_model_dir / DONE_FILE).read_text())
    probe_file = arts.base_model_dir / "probe.json"
    return {
        "output_dir": str(arts.base_model_dir),
        "corpus_dir": str(arts.base_path.parent),
        **summary,
        **({"probe": json.loads(probe_file.read_text())} if probe_file.is_file() else {}),
    }


def resolve_model_path(cfg: RMTConfig) -> str:
    """The policy model's path; None in the config means the embedded default's base model (built if missing)."""
    if cfg.model.path is not None:
        return cfg.model.path
    return str(ensure_embedded(cfg).base_model_dir)


def resolve_tokenizer_path(cfg: RMTConfig) -> str:
    return cfg.model.tokenizer or resolve_model_path(cfg)
