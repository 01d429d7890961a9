# Sourced by the device scripts from the repository root: install the wheels carried in .whl/core
# (the device machine has no internet) into /tmp/site, then sageLLM, sagellm-cuda and the bench
# plugin from this checkout.
if [ -d .whl/core ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/core/*.whl
  export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . -e sagellm_cuda -e plugins/sagellm-bench 2>&1 | tail -2
