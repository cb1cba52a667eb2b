"""An independent float64 statement of the OPRD alignment loss, differentiated by autograd.

Written from METHOD.md's formula, without any of the project's code, so that the kernels are
checked against something they cannot share a mistake with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class OracleResult:
    loss: torch.Tensor
    student_grad: torch.Tensor | None
    weight_grad: torch.Tensor | None
    bias_grad: torch.Tensor | None


def _unit(rows: torch.Tensor) -> torch.Tensor:
    return rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)


def oracle(
    student: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    token_weight: torch.Tensor | None,
    *,
    normalize: bool,
    reduction: str,
    upstream: torch.Tensor,
    dtype: torch.dtype = torch.float64,
) -> OracleResult:
    """Loss and gradients of ``(loss * upstream).sum()``, computed in ``dtype``."""

    def leaf(tensor: torch.Tensor | None) -> torch.Tensor | None:
        if tensor is None:
            return None
        return tensor.detach().to(dtype).requires_grad_(tensor.requires_grad)

    x, w, b = leaf(student), leaf(weight), leaf(bias)
    t = target.detach().to(dtype)
    p = x if w is None else x @ w.T
    if b is not None:
        p = p + b
    if normalize:
        p, t = _unit(p), _unit(t)
    per_token = ((p - t) ** 2).sum(dim=1) / t.shape[1]
    weights = (
        torch.ones(x.shape[0], dtype=dtype, device=x.device)
        if token_weight is None
        else token_weight.to(dtype)
    )
    weighted = weights * per_token
    if reduction == "none":
        loss = weighted
    elif reduction == "sum":
        loss = weighted.sum()
    elif float(weights.sum()) == 0.0:
        loss = weighted.sum() * 0.0
    else:
        loss = weighted.sum() / weights.sum()
    differentiable = [v for v in (x, w, b) if v is not None and v.requires_grad]
    grads: list[torch.Tensor | None] = [None, None, None]
    if differentiable:
        computed = iter(torch.autograd.grad((loss * upstream.to(dtype)).sum(), differentiable))
        grads = [next(computed) if v is not None and v.requires_grad else None for v in (x, w, b)]
    return OracleResult(loss.detach(), *grads)
