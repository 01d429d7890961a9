"""sageLLM backend for Hygon DCUs: ``pip install sagellm-hygon`` next to a ROCm/DTK build of torch.

The plugin module is `sagellm_hygon.plugin` (entry point ``hygon`` in group ``sagellm.plugins``).
Importing this package is cheap: torch is imported only when the backend probes.
"""

from __future__ import annotations

__version__ = "0.1.0"
