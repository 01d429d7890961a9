#!/usr/bin/env bash
# Main job: set up (idempotent), then generate with the embedded default model.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
exec .venv/bin/sagellm generate "${@:-What is the capital of France?}"
