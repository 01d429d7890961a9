"""sageLLM backend for Cambricon MLUs: ``pip install sagellm-cambricon`` next to ``torch_mlu``.

The plugin module is `sagellm_cambricon.plugin` (entry point ``cambricon`` in group
``sagellm.plugins``). Importing this package is cheap: torch and torch_mlu are imported only when
the backend probes.
"""

from __future__ import annotations

__version__ = "0.1.0"
