"""Teacher-side OPRD-Bridge projection: ship r numbers per token instead of d_T."""

from __future__ import annotations

import torch

from .api import resolve_impl

# Rows per chunk of the PyTorch path: bounds its float32 centred copy of the hidden states.
_TORCH_CHUNK_ROWS = 4096


def bridge_project(
    hidden: torch.Tensor,
    projection: torch.Tensor,
    mean: torch.Tensor,
    *,
    out_dtype: torch.dtype | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """``(hidden - mean) @ projection^T`` in one pass over ``hidden``.

    ``hidden`` [tokens, d_T] (teacher states), ``projection`` P_T [r, d_T], ``mean`` mu_T [d_T];
    returns [tokens, r] in ``out_dtype`` (default ``hidden.dtype``). The centring happens in
    float32 before the product, so large shared mean components do not cancel in low precision.
    No gradient flows (the bridge and the teacher are frozen).
    """
    if hidden.dim() != 2:
        raise ValueError(f"bridge_project: hidden must be [tokens, d_T], got {list(hidden.shape)}")
    d_in = hidden.shape[1]
    if projection.dim() != 2 or projection.shape[1] != d_in:
        raise ValueError(
            f"bridge_project: projection has shape {list(projection.shape)}, expected [r, {d_in}]"
        )
    if tuple(mean.shape) != (d_in,):
        raise ValueError(f"bridge_project: mean has shape {list(mean.shape)}, expected [{d_in}]")
    for name, tensor in (("projection", projection), ("mean", mean)):
        if tensor.device != hidden.device:
            raise ValueError(
                f"bridge_project: {name} is on {tensor.device} but hidden is on {hidden.device}"
            )
    out_dtype = hidden.dtype if out_dtype is None else out_dtype
    resolved = resolve_impl(impl, hidden.device)
    with torch.no_grad():
        if resolved == "triton":
            from .triton_backend import bridge_projection_triton

            return bridge_projection_triton(hidden, projection.to(hidden.dtype), mean, out_dtype)
        projection32 = projection.to(torch.float32)
        mean32 = mean.to(torch.float32)
        out = torch.empty(
            (hidden.shape[0], projection.shape[0]), dtype=out_dtype, device=hidden.device
        )
        for start in range(0, hidden.shape[0], _TORCH_CHUNK_ROWS):
            rows = slice(start, start + _TORCH_CHUNK_ROWS)
            out[rows] = (hidden[rows].to(torch.float32) - mean32) @ projection32.t()
        return out
