"""Lets ``pytest`` import ``sagellm_bench`` from a source checkout: pytest puts the directory of this
conftest on ``sys.path``. The CLI tests need the distribution installed (its entry point adds ``bench``):
``pip install --no-deps -e plugins/sagellm-bench`` (scripts/setup.sh does it)."""
