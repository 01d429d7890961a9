#!/usr/bin/env bash
# Test job: set up (idempotent), then run the test suite (GPU tests skip without a GPU).
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
