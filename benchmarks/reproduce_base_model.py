"""Train the embedded default's base model here and compare it with the copy shipped in the package.

`rmt` ships the base model of the default config (``src/rmt/embedded/base_models/base-<key>/``) so that a first run
does not spend minutes pre-training it; ``pretrain.use_shipped=false`` makes ``rmt pretrain`` train it instead. This
script is the check that the shipped weights are what ``rmt pretrain`` produces: it builds the corpus and tokenizer
from the seed (the tokenizer must equal the shipped one byte for byte), trains the model from scratch into ``--out``
(resumable), probes it like the cache does, and prints the shipped and reproduced numbers side by side: the
per-step training loss, the held-out loss, the reasoning probe, and the largest weight difference. Training is
deterministic on one machine; across CPUs bf16 kernels can round differently, so compare the probe, not the bits.

    python benchmarks/reproduce_base_model.py                       # about 7 minutes on 2 idle CPU cores
    python benchmarks/reproduce_base_model.py --install             # after changing the default recipe: ship the result
    python benchmarks/reproduce_base_model.py --install --from DIR  # ship an already trained cache entry
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/reproduce-base-model", help="where the reproduction trains (resumable)")
    p.add_argument("--from", dest="source", default=None, help="a finished base model folder to compare/ship instead of training")
    p.add_argument("--install", action="store_true", help="copy the reproduced model into the package as the shipped one")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("overrides", nargs="*", help="config overrides (key=value), as for rmt pretrain")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from safetensors.torch import load_file

    from rmt.config import load_config
    from rmt.embedded.cache import SHIPPED_FILES, ensure_embedded, shipped_model_dir
    from rmt.embedded.probe import probe_base_model
    from rmt.pretrain import DONE_FILE, train_base_model

    cfg = load_config(None, args.overrides)
    arts = ensure_embedded(cfg, model=False)
    if args.source:
        out = Path(args.source)
        if not (out / DONE_FILE).is_file():
            sys.exit(f"{out} is not a finished base model (no {DONE_FILE})")
    else:
        out = Path(args.out)
        train_base_model(cfg, arts.base_path, out, tokenizer_dir=arts.tokenizer_dir, text_field="text")
    if not (out / "probe.json").is_file():
        probe_base_model(cfg, dataclasses.replace(arts, base_model_dir=out))

    shipped = shipped_model_dir(cfg)
    rows = [("tokenizer", "", "")]
    if (shipped / DONE_FILE).is_file():
        same_tok = (shipped / "tokenizer.json").read_text() == (arts.tokenizer_dir / "tokenizer.json").read_text()
        rows = [("tokenizer equal to the shipped one", str(same_tok), "")]
        a, b = load_file(str(shipped / "model.safetensors")), load_file(str(out / "model.safetensors"))
        diff = max((a[k] - b[k]).abs().max().item() for k in a) if a.keys() == b.keys() else float("nan")
        rows.append(("max |weight difference|", f"{diff:.3g}", ""))
        losses = [[json.loads(line).get("loss") for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (shipped, out)]
        if losses[0] and losses[1]:
            n = min(len(losses[0]), len(losses[1]))
            worst = max(abs(x - y) for x, y in zip(losses[0][:n], losses[1][:n]) if x is not None and y is not None)
            rows.append((f"max |training loss difference| over {n} steps", f"{worst:.3g}", ""))
        done = [json.loads((d / DONE_FILE).read_text()) for d in (shipped, out)]
        probes = [json.loads((d / "probe.json").read_text()) for d in (shipped, out)]
        for key in ("eval_loss", "eval_accuracy"):
            rows.append((key, f"{done[0].get(key, float('nan')):.4f}", f"{done[1].get(key, float('nan')):.4f}"))
        for part in ("computed", "computed_later", "other"):
            for mode in ("direct_accuracy", "reasoning_accuracy"):
                vals = [pr["midtrain_positions"][part].get(mode, float("nan")) for pr in probes]
                rows.append((f"probe {part} {mode}", f"{vals[0]:.3f}", f"{vals[1]:.3f}"))
        vals = [pr["posttrain_reasoning"]["accuracy"] for pr in probes]
        rows.append(("probe post-training reasoning accuracy", f"{vals[0]:.3f}", f"{vals[1]:.3f}"))
        print(f"{'':58s} {'shipped':>10s} {'reproduced':>10s}")
        for name, x, y in rows:
            print(f"{name:58s} {x:>10s} {y:>10s}")
    else:
        print(f"no shipped base model for this config ({shipped.name}); --install ships this one")

    if args.install:
        for old in shipped.parent.glob("base-*"):  # one shipped model: the current default's
            shutil.rmtree(old)
        shipped.mkdir(parents=True)
        for f in (*SHIPPED_FILES, DONE_FILE):
            if (out / f).is_file():
                shutil.copyfile(out / f, shipped / f)
        print(f"shipped {out} as {shipped}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
