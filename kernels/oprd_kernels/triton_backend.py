"""Fused Triton kernels for the projected (normalized) MSE, the chunk backend built on them
(``impl="triton-fused"``), and the bridge projection kernel.

* ``_projection_statistics_kernel``: one tile of ``P = x W^T + b`` (fp32 accumulation) fused
  with its per-token statistics (``||p||^2``, ``p.t``, ``||t||^2``, ``||p - t||^2``, partial
  sums per column block, reduced afterwards in a fixed order so results are deterministic).
  With ``WRITE_P`` it also stores the tile into the chunk's workspace; without it the
  projection never reaches memory (the no-grad forward and the recompute mode's forward).
  Token blocks whose weights are all zero skip the GEMM.
* ``_projection_to_gradient_kernel``: ``G = alpha * P + beta * t`` in place, per token.
* ``_bridge_projection_kernel``: ``(h - mu) @ P^T`` with the centring done in fp32 before the
  dot, in one pass over ``h``.

The two GEMMs of the gradient (``G W`` and ``G^T x``) go to cuBLAS through the engine.
Under ``TRITON_INTERPRET=1`` (CPU tests) the kernels run in fp32 (the interpreter's bf16
``tl.dot`` is wrong) with one fixed small block configuration.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from .engine import StatisticsChunks
from .statistics import NUM_STATS


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class _Blocks:
    rows: int
    cols: int
    inner: int
    num_warps: int
    num_stages: int


def _blocks() -> _Blocks:
    if interpreting():
        return _Blocks(rows=16, cols=32, inner=32, num_warps=1, num_stages=1)
    return _Blocks(rows=128, cols=128, inner=64, num_warps=8, num_stages=3)


# On GPUs the fused projection kernel is autotuned over these; the column block stays fixed
# because the partial-statistics buffer is laid out by it.
_GPU_TUNING = (  # (BLOCK_N, BLOCK_K, num_warps, num_stages)
    (128, 64, 8, 3),
    (128, 64, 4, 4),
    (64, 64, 4, 4),
    (128, 128, 8, 3),
    (256, 64, 8, 3),
)


@functools.cache
def _autotuned_projection_statistics() -> Any:
    configs = [
        triton.Config({"BLOCK_N": rows, "BLOCK_K": inner}, num_warps=warps, num_stages=stages)
        for rows, inner, warps, stages in _GPU_TUNING
    ]
    # No ``n_rows``: a new token count (nearly every microbatch in training) must not re-tune.
    # The tile choice depends on the widths and dtypes (Triton adds the tensors' dtypes).
    key = ["d_s", "d_t", "HAS_WEIGHT", "WRITE_P"]
    return triton.autotune(configs=configs, key=key)(_projection_statistics_kernel)


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 products (PyTorch's default), not TF32."""
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit(do_not_specialize=["n_rows"])
def _projection_statistics_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    t_ptr,
    active_ptr,
    p_ptr,
    partial_ptr,
    n_rows,
    d_s,
    d_t,
    n_col_blocks,
    stride_xn,
    stride_xk,
    stride_wt,
    stride_wk,
    stride_tn,
    stride_tc,
    stride_pn,
    stride_pc,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_ACTIVE: tl.constexpr,
    WRITE_P: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_t = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < n_rows
    col_ok = cols < d_t
    tile_ok = row_ok[:, None] & col_ok[None, :]

    acc = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
    run = True
    if HAS_ACTIVE:
        active = tl.load(active_ptr + rows, mask=row_ok, other=0).to(tl.int32)
        run = tl.max(active, axis=0) > 0
    if run:
        if HAS_WEIGHT:
            for k0 in range(0, d_s, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < d_s
                x_tile = tl.load(
                    x_ptr + rows[:, None] * stride_xn + ks[None, :] * stride_xk,
                    mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0,
                )
                # [BLOCK_K, BLOCK_T] view of W^T
                w_tile = tl.load(
                    w_ptr + ks[:, None] * stride_wk + cols[None, :] * stride_wt,
                    mask=k_ok[:, None] & col_ok[None, :],
                    other=0.0,
                )
                if UPCAST:
                    x_tile = x_tile.to(tl.float32)
                    w_tile = w_tile.to(tl.float32)
                acc = tl.dot(x_tile, w_tile, acc, input_precision=DOT_PRECISION)
        else:
            acc += tl.load(
                x_ptr + rows[:, None] * stride_xn + cols[None, :] * stride_xk,
                mask=tile_ok,
                other=0.0,
            ).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        acc = tl.where(tile_ok, acc, 0.0)

    target = tl.load(
        t_ptr + rows[:, None] * stride_tn + cols[None, :] * stride_tc, mask=tile_ok, other=0.0
    ).to(tl.float32)
    difference = acc - target
    out = partial_ptr + rows * n_col_blocks + pid_t
    plane = n_rows * n_col_blocks
    tl.store(out, tl.sum(acc * acc, axis=1), mask=row_ok)
    tl.store(out + plane, tl.sum(acc * target, axis=1), mask=row_ok)
    tl.store(out + 2 * plane, tl.sum(target * target, axis=1), mask=row_ok)
    tl.store(out + 3 * plane, tl.sum(difference * difference, axis=1), mask=row_ok)
    if WRITE_P:
        tl.store(
            p_ptr + rows[:, None] * stride_pn + cols[None, :] * stride_pc,
            acc.to(p_ptr.dtype.element_ty),
            mask=tile_ok,
        )


@triton.jit
def _projection_to_gradient_kernel(
    p_ptr,
    t_ptr,
    alpha_ptr,
    beta_ptr,
    n_rows,
    d_t,
    stride_pn,
    stride_pc,
    stride_tn,
    stride_tc,
    BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < n_rows
    tile_ok = row_ok[:, None] & (cols < d_t)[None, :]
    alpha = tl.load(alpha_ptr + rows, mask=row_ok, other=0.0)
    beta = tl.load(beta_ptr + rows, mask=row_ok, other=0.0)
    p_ptrs = p_ptr + rows[:, None] * stride_pn + cols[None, :] * stride_pc
    projection = tl.load(p_ptrs, mask=tile_ok, other=0.0).to(tl.float32)
    target = tl.load(
        t_ptr + rows[:, None] * stride_tn + cols[None, :] * stride_tc, mask=tile_ok, other=0.0
    ).to(tl.float32)
    gradient = alpha[:, None] * projection + beta[:, None] * target
    tl.store(p_ptrs, gradient.to(p_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _bridge_projection_kernel(
    h_ptr,
    mu_ptr,
    proj_ptr,
    out_ptr,
    n_rows,
    d_in,
    rank,
    stride_hn,
    stride_hk,
    stride_pr,
    stride_pk,
    stride_on,
    stride_or,
    UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ranks = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    rank_ok = ranks < rank
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, d_in, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < d_in
        h_tile = tl.load(
            h_ptr + rows[:, None] * stride_hn + ks[None, :] * stride_hk,
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        mu = tl.load(mu_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
        # Centre in fp32 first: hidden states carry large mean components, and subtracting
        # mu after the projection would cancel catastrophically in low precision.
        centred = tl.where(k_ok[None, :], h_tile.to(tl.float32) - mu[None, :], 0.0)
        p_tile = tl.load(
            proj_ptr + ks[:, None] * stride_pk + ranks[None, :] * stride_pr,
            mask=k_ok[:, None] & rank_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            acc = tl.dot(centred, p_tile.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(centred.to(p_tile.dtype), p_tile, acc)
    tl.store(
        out_ptr + rows[:, None] * stride_on + ranks[None, :] * stride_or,
        acc.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & rank_ok[None, :],
    )


class FusedTritonChunkBackend(StatisticsChunks):
    """Fused projection + statistics kernel, in-place gradient kernel, cuBLAS for dX and dW."""

    name = "triton-fused"
    # No host sync: masked token blocks exit early inside the kernel instead.
    compacts_masked_rows = False

    def workspace_bytes_per_row(self, d_s: int, d_t: int, element_size: int) -> int:
        # The projection/gradient chunk in the compute dtype and the partial statistics per
        # column block; the student gradient is written straight into its output rows.
        return element_size * d_t + 4 * NUM_STATS * triton.cdiv(d_t, _blocks().cols)

    def project_with_statistics(
        self,
        student: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        target: torch.Tensor,
        active: torch.Tensor | None,
        keep_projection: bool,
        normalize: bool,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        del normalize  # all four statistics cost nothing extra inside the fused kernel
        blocks = _blocks()
        n_rows, d_s = student.shape
        d_t = target.shape[1]
        n_col_blocks = triton.cdiv(d_t, blocks.cols)
        partial = torch.empty(
            (NUM_STATS, n_rows, n_col_blocks), dtype=torch.float32, device=student.device
        )
        projection = (
            torch.empty((n_rows, d_t), dtype=student.dtype, device=student.device)
            if keep_projection
            else None
        )
        # Dummy pointers for absent operands; the constexpr flags keep them unread.
        weight_arg = student if weight is None else weight
        if interpreting():
            kernel: Any = _projection_statistics_kernel
            grid: Any = (triton.cdiv(n_rows, blocks.rows), n_col_blocks)
            launch: dict[str, int] = {
                "BLOCK_N": blocks.rows,
                "BLOCK_K": blocks.inner,
                "num_warps": blocks.num_warps,
                "num_stages": blocks.num_stages,
            }
        else:
            kernel = _autotuned_projection_statistics()
            grid = lambda meta: (triton.cdiv(n_rows, meta["BLOCK_N"]), n_col_blocks)
            launch = {}
        kernel[grid](
            student,
            weight_arg,
            student if bias is None else bias,
            target,
            student if active is None else active.to(torch.int8),
            partial if projection is None else projection,
            partial,
            n_rows,
            d_s,
            d_t,
            n_col_blocks,
            student.stride(0),
            student.stride(1),
            weight_arg.stride(0),
            weight_arg.stride(1),
            target.stride(0),
            target.stride(1),
            0 if projection is None else projection.stride(0),
            0 if projection is None else projection.stride(1),
            HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None,
            HAS_ACTIVE=active is not None,
            WRITE_P=projection is not None,
            UPCAST=interpreting(),
            DOT_PRECISION=_dot_precision(student.dtype),
            BLOCK_T=blocks.cols,
            **launch,
        )
        return projection, partial.sum(dim=2)

    def projection_to_gradient(
        self,
        projection: torch.Tensor,
        target: torch.Tensor,
        alpha: torch.Tensor,
        beta: torch.Tensor,
    ) -> torch.Tensor:
        blocks = _blocks()
        n_rows, d_t = projection.shape
        grid = (triton.cdiv(n_rows, blocks.rows), triton.cdiv(d_t, blocks.cols))
        _projection_to_gradient_kernel[grid](
            projection,
            target,
            alpha.contiguous(),
            beta.contiguous(),
            n_rows,
            d_t,
            projection.stride(0),
            projection.stride(1),
            target.stride(0),
            target.stride(1),
            BLOCK_N=blocks.rows,
            BLOCK_T=blocks.cols,
            num_warps=min(blocks.num_warps, 4),
        )
        return projection


def bridge_projection_triton(
    hidden: torch.Tensor, projection: torch.Tensor, mean: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """``(hidden - mean) @ projection^T`` ``[tokens, rank]`` with the fused Triton kernel."""
    n_rows, d_in = hidden.shape
    rank = projection.shape[0]
    out = torch.empty((n_rows, rank), dtype=out_dtype, device=hidden.device)
    if interpreting():
        block_n, block_r, block_k, warps = 16, 16, 32, 1
    else:
        block_n, block_r, block_k, warps = 64, max(16, min(64, triton.next_power_of_2(rank))), 64, 4
    grid = (triton.cdiv(n_rows, block_n), triton.cdiv(rank, block_r))
    _bridge_projection_kernel[grid](
        hidden,
        mean,
        projection,
        out,
        n_rows,
        d_in,
        rank,
        hidden.stride(0),
        hidden.stride(1),
        projection.stride(0),
        projection.stride(1),
        out.stride(0),
        out.stride(1),
        UPCAST=interpreting() or hidden.dtype == torch.float32,
        BLOCK_N=block_n,
        BLOCK_R=block_r,
        BLOCK_K=block_k,
        num_warps=warps,
    )
    return out
