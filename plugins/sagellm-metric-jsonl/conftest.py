"""Lets ``pytest`` run this plugin's tests from a source checkout, installed or not: pytest puts the
directory of this conftest on ``sys.path``, which holds ``sagellm_metric_jsonl.py``."""
