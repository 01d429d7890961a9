"""sageLLM backend for Huawei Ascend NPUs: ``pip install sagellm-ascend`` next to ``torch_npu``.

The plugin module is `sagellm_ascend.plugin` (entry point ``ascend`` in group ``sagellm.plugins``).
Importing this package is cheap: torch and torch_npu are imported only when the backend probes.
"""

from __future__ import annotations

__version__ = "0.1.0"
