"""Atomic checkpoints and exact resume for training runs.

A checkpoint is a folder ``checkpoints/step-NNNNNNN`` holding the model in Hugging Face format (safetensors),
the tokenizer, ``optimizer.pt`` and ``scheduler.pt`` (tensors and numbers only, loaded with
``weights_only=True``: nothing is unpickled), and ``trainer_state.json`` (step, data position, RNG states,
config fingerprint). It is written into a temporary folder and renamed into place, so a crash or ``kill -9``
during the write leaves the earlier checkpoints as they were and no half-written one that a resume could pick.

The finished model (``final/``) is written the same way, with a manifest of its files written last
(``rmt_complete.json``): ``model_folder_problem`` tells a complete one from a partial or damaged one, which a resume
then writes again from the last checkpoint.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from rmt.errors import CheckpointError
from rmt.fileio import disk_full_error, naming_errors, swap_into_place, temp_prefix

STEP_DIR = re.compile(r"^step-(\d{7})$")
STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "rmt_complete.json"


def rng_state() -> dict:
    """The RNG states of Python, NumPy and torch, in JSON-safe form."""
    np_state = np.random.get_state()
    state = {
        "python": _to_json(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_from_json(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _to_json(x):
    return [_to_json(v) for v in x] if isinstance(x, tuple | list) else x


def _from_json(x):
    return tuple(_from_json(v) for v in x) if isinstance(x, list) else x


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders of interrupted writes are ignored)."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def save_checkpoint(run_dir: Path, step: int, model, tokenizer, optimizer, scheduler, state: dict, keep_last: int,
                    state_dict: dict | None = None, tensors: dict[str, dict] | None = None) -> Path:
    """Write checkpoint ``step`` atomically, then delete all but the newest ``keep_last``.

    ``state_dict``: the full weights when they had to be gathered first (sharded models); None = the model's own.
    ``tensors``: more state to keep, name -> {key: tensor}, written as ``<name>.safetensors`` (``load_tensors``).
    """
    from safetensors.torch import save_file

    ckpt_dir = Path(run_dir) / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"step-{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(final.name), dir=ckpt_dir))
    try:
        with naming_errors(final):
            model.save_pretrained(str(tmp / "model"), safe_serialization=True, state_dict=state_dict)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp / "model"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            for name, values in (tensors or {}).items():
                save_file(values, str(tmp / f"{name}.safetensors"))
            (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step, "rng": rng_state()}))
        swap_into_place(tmp, final)  # re-saving the same step (e.g. after an interrupt) replaces it whole
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise disk_full_error(final, e) or e
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_model_folder(folder: Path, model, tokenizer, state_dict: dict | None = None) -> Path:
    """The model (safetensors) and tokenizer in Hugging Face format at ``folder``, written atomically: into a
    temporary folder, closed by a manifest of its files (``MANIFEST_FILE``), then renamed into place."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(folder.name), dir=folder.parent))
    try:
        with naming_errors(folder):
            model.save_pretrained(str(tmp), safe_serialization=True, state_dict=state_dict)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
            (tmp / MANIFEST_FILE).write_text(json.dumps({"files": files}, indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; a model folder is ordinary files
        swap_into_place(tmp, folder)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise disk_full_error(folder, e) or e
    return folder


def model_folder_problem(folder: Path) -> str | None:
    """None when ``folder`` is a complete model written by ``save_model_folder``; else what is wrong with it."""
    folder = Path(folder)
    if not folder.is_dir():
        return "it does not exist"
    try:
        files = json.loads((folder / MANIFEST_FILE).read_text())["files"]
        if not isinstance(files, dict) or not files:
            raise ValueError("no files listed")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its manifest {MANIFEST_FILE}, written last, is missing or unreadable ({e}): the write did not finish"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes instead of {size}"
    return unreadable_shard(sorted(folder.glob("*.safetensors")))


def unreadable_shard(paths: list[Path]) -> str | None:
    """What is wrong with the first safetensors file of ``paths`` whose header does not read (a truncated copy)."""
    from safetensors import safe_open

    for path in paths:
        try:
            with safe_open(str(path), framework="pt") as f:
                list(f.keys())
        except Exception as e:  # noqa: BLE001 - the library's error, named
            return f"{path.name} is unreadable ({e})"
    return None


def weights_problem(folder: str | Path) -> str | None:
    """What keeps a local model folder's weights from loading, found without loading them: no weights, a
    safetensors file whose header does not read (a truncated copy), or what ``model_folder_problem`` finds in a
    folder the tools wrote. None when they read, or for a name that is no local folder (a hub model, checked when it
    loads; a file is refused by ``modeling.check_local_path``)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    if (folder / MANIFEST_FILE).is_file():
        return model_folder_problem(folder)
    shards = sorted(folder.glob("*.safetensors"))
    if not shards and not any(folder.glob("*.bin")):
        return "it holds no weights (no *.safetensors file)"
    return unreadable_shard(shards)


def load_trainer_state(ckpt: Path) -> dict:
    path = Path(ckpt) / STATE_FILE
    try:
        state = json.loads(path.read_text())
        if not isinstance(state, dict) or not isinstance(state.get("step"), int) or not isinstance(state.get("rng"), dict):
            raise ValueError("no step or RNG state")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {ckpt} is corrupt or partial: cannot read {STATE_FILE} ({e})") from None
    return state


def load_checkpoint(ckpt: Path, model, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and RNG states from ``ckpt``; returns the trainer state."""
    from safetensors.torch import load_file

    ckpt = Path(ckpt)
    state = load_trainer_state(ckpt)
    try:
        weights = {}
        for f in sorted((ckpt / "model").glob("*.safetensors")):
            weights.update(load_file(str(f)))
        if not weights:
            raise FileNotFoundError("no *.safetensors file")
        missing, unexpected = model.load_state_dict(weights, strict=False)
        # Tied output embeddings are saved once; anything else missing means a broken checkpoint.
        missing = [k for k in missing if not k.endswith("lm_head.weight")]
        if missing or unexpected:
            raise ValueError(f"missing {missing[:3]} unexpected {unexpected[:3]}")
        for name, target in (("optimizer.pt", optimizer), ("scheduler.pt", scheduler)):
            target.load_state_dict(safe_torch_load(ckpt / name))
        set_rng_state(state["rng"])
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"checkpoint {ckpt} is corrupt or partial: {e}") from None
    return state


def safe_torch_load(path: Path):
    """``torch.load(weights_only=True)``: plain tensors and containers only, never arbitrary pickled objects. A file
    that does not load that way is named as damaged, without torch's advice to load it unsafely."""
    try:
        return torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path.name} is missing") from None
    except Exception as e:  # noqa: BLE001 - the message below replaces torch's
        raise ValueError(f"{path.name} does not load as plain tensors ({type(e).__name__}): damaged, or not written by rmt") from None


def load_tensors(ckpt: Path, name: str) -> dict:
    """The tensors a checkpoint saved under ``name`` (``save_checkpoint(tensors=...)``)."""
    from safetensors.torch import load_file

    path = Path(ckpt) / f"{name}.safetensors"
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - missing or damaged, named
        raise CheckpointError(f"checkpoint {ckpt} is corrupt or partial: cannot read {path.name} ({e})") from None
