#!/usr/bin/env bash
# Fill .whl/core with the Python 3.12 wheels the device machines lack (they have no internet; the
# device scripts install these through bench/device_install.sh), at the versions this checkout's
# .venv runs, and .whl/tokenizer with the default model's tokenizer (bench/structured_bench.py and
# the bigbody part use it on random-weight shapes). Run here, from the repository root, after
# scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
names=(cattrs gguf fastapi starlette pydantic pydantic_core annotated-types typing-inspection uvicorn pyzmq
       llguidance compressed-tensors loguru opentelemetry-api openai jiter distro sniffio jsonschema jsonschema-specifications
       referencing rpds-py anyio h11 isal)
pins=()
for name in "${names[@]}"; do
  version=$(.venv/bin/python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name" \
            2>/dev/null) || continue  # not needed by this .venv's versions
  pins+=("$name==$version")
done
mkdir -p .whl/core
platforms=()
for n in 17 24 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
for pin in "${pins[@]}"; do
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" --platform manylinux2014_x86_64 --platform any -d .whl/core "$pin"
done
mkdir -p .whl/tokenizer
model=$(.venv/bin/python -c "from sagellm_core.models.loader import default_model_dir; print(default_model_dir())")
cp "$model"/tokenizer.json "$model"/tokenizer_config.json .whl/tokenizer/
cp "$model"/chat_template.jinja .whl/tokenizer/ 2>/dev/null || true
ls .whl/core .whl/tokenizer
