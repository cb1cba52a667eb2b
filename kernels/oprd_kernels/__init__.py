"""oprd_kernels: fused projection + (normalized) MSE for On-Policy Representation Distillation.

Lives in ``kernels/oprd_kernels/``; ``kernels/`` has no ``__init__.py``, so the repository root
never shadows the PyPI package ``kernels`` that transformers imports.
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
