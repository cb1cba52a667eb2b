"""The naive projected (normalized) MSE: plain PyTorch that materialises every intermediate.

It is the baseline the fused paths are benchmarked against (eagerly and under
``torch.compile``) and the ``impl="reference"`` of :func:`oprd_kernels.projected_mse`. It
computes in the inputs' dtype, as a user's own PyTorch code would.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .statistics import NORMALIZE_EPS


def reduce_weighted(
    weighted: torch.Tensor, token_weight: torch.Tensor, reduction: str
) -> torch.Tensor:
    """Apply ``reduction`` to ``weighted = w * l``: ``none``, ``sum`` or the weight-``mean``.

    The mean divides by ``sum(w)`` and is 0 when the weights sum to 0, without a host sync.
    """
    if reduction == "none":
        return weighted
    total = weighted.sum()
    if reduction == "sum":
        return total
    denominator = token_weight.sum()
    safe = torch.where(denominator == 0, torch.ones_like(denominator), denominator)
    return torch.where(denominator == 0, torch.zeros_like(total), total / safe)


def projected_mse_reference(
    student: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    token_weight: torch.Tensor | None,
    *,
    normalize: bool,
    reduction: str,
) -> torch.Tensor:
    """``reduce(w_i * ||f(student_i W^T + b) - f(target_i)||^2 / d_t)``, differentiable by autograd.

    Returns float32 like the fused paths; the arithmetic runs in the inputs' dtype.
    """
    projected = student if weight is None else F.linear(student, weight)
    if bias is not None:
        projected = projected + bias
    target = target.detach().to(projected.dtype)
    if normalize:
        projected = F.normalize(projected, dim=-1, eps=NORMALIZE_EPS)
        target = F.normalize(target, dim=-1, eps=NORMALIZE_EPS)
    per_token = (projected - target).pow(2).mean(dim=-1).float()
    if token_weight is None:
        token_weight = torch.ones_like(per_token)
    token_weight = token_weight.to(per_token.dtype)
    return reduce_weighted(token_weight * per_token, token_weight, reduction)
