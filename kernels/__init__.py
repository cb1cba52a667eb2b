"""oprd_kernels: fused projection + (normalized) MSE for On-Policy Representation Distillation.

Installed from the repository folder ``kernels/`` under this import name (a top-level module
called ``kernels`` would clash with an unrelated PyPI package that transformers can load).
"""

from .api import projected_mse, resolve_impl, triton_available
from .bridge import bridge_project
from .reference import projected_mse_reference

__all__ = [
    "bridge_project",
    "projected_mse",
    "projected_mse_reference",
    "resolve_impl",
    "triton_available",
]
