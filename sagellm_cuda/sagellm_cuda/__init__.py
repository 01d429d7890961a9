"""sageLLM backend for NVIDIA GPUs: ``pip install sagellm-cuda`` and the engine runs on the GPU.

The plugin module is `sagellm_cuda.plugin` (entry point ``cuda`` in group ``sagellm.plugins``);
`sagellm_cuda.attention` holds the Triton paged-attention kernels. Importing this package is cheap:
torch and Triton are imported only when the backend probes or builds its attention op.
"""

from __future__ import annotations

__version__ = "0.1.0"
