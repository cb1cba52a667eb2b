"""The default CUDA path (``impl="triton"``): a cuBLAS GEMM per chunk, then one Triton row kernel.

Per chunk of rows, cuBLAS writes ``P = x W^T`` (float32 accumulation, the compute dtype out)
into the chunk workspace; ``_row_loss_gradient_kernel`` then reads each projected row and its
target once, adds the bias in float32, forms the four row statistics, the per-token loss and
``dl/dp`` in registers, and writes the gradient over ``P`` in place. ``dX = G W`` and
``dW += G^T x`` go to cuBLAS through the engine. Rows wider than the largest block take two
passes (statistics first, gradient second). Masked rows (token weight 0) read nothing and get
zero loss and zero gradient; their GEMM rows are still computed (skipping them would need a host
sync to compact the rows).

The launch configuration follows from ``d_t`` alone: nothing is autotuned, so a new token count
(nearly every microbatch in training) never triggers tuning, and the first call only compiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .statistics import NORMALIZE_EPS
from .triton_backend import interpreting


@dataclass(frozen=True)
class RowBlocks:
    rows: int  # rows per program
    cols: int  # columns per block
    one_pass: bool  # the whole row fits one block: read once
    num_warps: int


# On GPUs a row of up to this many columns is held in registers (8 warps, 32 floats per thread
# per operand); wider rows take two passes. The interpreter uses tiny blocks so that the tests
# exercise both paths and partial blocks at small widths.
MAX_ONE_PASS_COLUMNS = 8192
INTERPRETER_MAX_COLUMNS = 64


def row_blocks(d_t: int) -> RowBlocks:
    """The launch configuration for rows of width ``d_t``."""
    limit = INTERPRETER_MAX_COLUMNS if interpreting() else MAX_ONE_PASS_COLUMNS
    width = triton.next_power_of_2(d_t)
    if interpreting():  # few programs: every program costs the interpreter a lot
        return RowBlocks(rows=16, cols=min(width, limit), one_pass=width <= limit, num_warps=1)
    cols = min(width, limit if width <= limit else 4096)
    rows = max(1, 2048 // cols)  # short rows: several per program, ~2k elements each
    return RowBlocks(
        rows=rows, cols=cols, one_pass=width <= limit, num_warps=8 if rows * cols >= 4096 else 4
    )


@triton.jit
def _loss_and_coefficients(pp, pt, tt, dd, d_t, NORMALIZE: tl.constexpr, EPS: tl.constexpr):
    """Per-token loss and ``(alpha, beta)`` with ``dl/dp = alpha p + beta t`` (statistics.py)."""
    scale = 2.0 / d_t
    if NORMALIZE:
        norm_p = tl.sqrt_rn(pp)
        r = tl.maximum(norm_p, EPS)
        q = tl.maximum(tl.sqrt_rn(tt), EPS)
        rq = r * q
        loss = tl.maximum(pp / (r * r) - 2.0 * pt / rq + tt / (q * q), 0.0) / d_t
        alpha = tl.where(norm_p > EPS, pt / rq, 1.0) / (r * r) * scale
        beta = -scale / rq
    else:
        loss = dd / d_t
        alpha = tl.full(pp.shape, 1.0, tl.float32) * scale
        beta = -alpha
    return loss, alpha, beta


@triton.jit
def _load_rows(
    p_rows, t_rows, b_ptr, cols, active, d_t, stride_pc, stride_tc, HAS_BIAS: tl.constexpr
):
    """``(p + b, t)`` float32 tiles of the active rows (``p_rows``/``t_rows``: pointers to
    their first elements), zeros elsewhere."""
    col_ok = cols < d_t
    tile_ok = active[:, None] & col_ok[None, :]
    p = tl.load(p_rows + cols[None, :] * stride_pc, mask=tile_ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        p += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        p = tl.where(tile_ok, p, 0.0)
    t = tl.load(t_rows + cols[None, :] * stride_tc, mask=tile_ok, other=0.0).to(tl.float32)
    return p, t


@triton.jit
def _row_statistics(p, t, NORMALIZE: tl.constexpr):
    """Only the statistics the loss needs: ``pp, pt, tt`` when normalized, else ``dd``."""
    zero = tl.zeros((p.shape[0],), dtype=tl.float32)
    if NORMALIZE:
        return tl.sum(p * p, axis=1), tl.sum(p * t, axis=1), tl.sum(t * t, axis=1), zero
    return zero, zero, zero, tl.sum((p - t) * (p - t), axis=1)


@triton.jit
def _store_gradient(g_rows, cols, row_ok, d_t, stride_gc, alpha, beta, p, t):
    tile_ok = row_ok[:, None] & (cols < d_t)[None, :]
    g = alpha * p + beta * t
    tl.store(g_rows + cols[None, :] * stride_gc, g.to(g_rows.dtype.element_ty), mask=tile_ok)


# n_rows is not specialised: a new token count must not compile a new variant.
@triton.jit(do_not_specialize=["n_rows"])
def _row_loss_gradient_kernel(
    p_ptr,
    g_ptr,
    t_ptr,
    b_ptr,
    w_ptr,
    c_ptr,
    loss_ptr,
    n_rows,
    d_t,
    stride_pn,
    stride_pc,
    stride_gn,
    stride_gc,
    stride_tn,
    stride_tc,
    HAS_BIAS: tl.constexpr,
    WRITE_GRADIENT: tl.constexpr,
    NORMALIZE: tl.constexpr,
    ONE_PASS: tl.constexpr,
    EPS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    active = row_ok & (tl.load(w_ptr + rows, mask=row_ok, other=0.0) != 0.0)
    rows = rows.to(tl.int64)  # row offsets of wide chunks overflow int32
    p_rows = p_ptr + rows[:, None] * stride_pn
    t_rows = t_ptr + rows[:, None] * stride_tn
    g_rows = g_ptr + rows[:, None] * stride_gn
    cols = tl.arange(0, BLOCK_T)
    if ONE_PASS:  # p and t stay in registers for the gradient
        p, t = _load_rows(p_rows, t_rows, b_ptr, cols, active, d_t, stride_pc, stride_tc, HAS_BIAS)
        pp, pt, tt, dd = _row_statistics(p, t, NORMALIZE)
    else:
        pp = tl.zeros((BLOCK_R,), dtype=tl.float32)
        pt = tl.zeros((BLOCK_R,), dtype=tl.float32)
        tt = tl.zeros((BLOCK_R,), dtype=tl.float32)
        dd = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for c0 in range(0, d_t, BLOCK_T):
            p, t = _load_rows(
                p_rows, t_rows, b_ptr, c0 + cols, active, d_t, stride_pc, stride_tc, HAS_BIAS
            )
            block_pp, block_pt, block_tt, block_dd = _row_statistics(p, t, NORMALIZE)
            pp += block_pp
            pt += block_pt
            tt += block_tt
            dd += block_dd
    loss, alpha, beta = _loss_and_coefficients(pp, pt, tt, dd, d_t, NORMALIZE, EPS)
    tl.store(loss_ptr + rows, tl.where(active, loss, 0.0), mask=row_ok)
    if WRITE_GRADIENT:
        scale = tl.load(c_ptr + rows, mask=active, other=0.0)
        alpha = tl.where(active, alpha * scale, 0.0)[:, None]
        beta = tl.where(active, beta * scale, 0.0)[:, None]
        if ONE_PASS:
            _store_gradient(g_rows, cols, row_ok, d_t, stride_gc, alpha, beta, p, t)
        else:
            for c0 in range(0, d_t, BLOCK_T):
                p, t = _load_rows(
                    p_rows, t_rows, b_ptr, c0 + cols, active, d_t, stride_pc, stride_tc, HAS_BIAS
                )
                _store_gradient(g_rows, c0 + cols, row_ok, d_t, stride_gc, alpha, beta, p, t)


def row_loss_gradient(
    projection: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None,
    token_weight: torch.Tensor,
    scale: torch.Tensor | None,
    gradient: torch.Tensor | None,
    normalize: bool,
) -> torch.Tensor:
    """Per-token loss ``[rows]`` (float32) of ``projection + bias`` against ``target``.

    With ``scale`` [rows] it also writes ``scale_i * dl_i/dp_i`` into ``gradient`` (which may be
    ``projection`` itself: each element is read before it is overwritten by the same program).
    """
    n_rows, d_t = target.shape
    loss = torch.empty(n_rows, dtype=torch.float32, device=target.device)
    if n_rows == 0:
        return loss
    write_gradient = scale is not None and gradient is not None
    blocks = row_blocks(d_t)
    out = gradient if gradient is not None else projection
    _row_loss_gradient_kernel[(triton.cdiv(n_rows, blocks.rows),)](
        projection,
        out,
        target,
        projection if bias is None else bias,
        token_weight,
        token_weight if scale is None else scale,
        loss,
        n_rows,
        d_t,
        projection.stride(0),
        projection.stride(1),
        out.stride(0),
        out.stride(1),
        target.stride(0),
        target.stride(1),
        HAS_BIAS=bias is not None,
        WRITE_GRADIENT=write_gradient,
        NORMALIZE=normalize,
        ONE_PASS=blocks.one_pass,
        EPS=NORMALIZE_EPS,
        BLOCK_R=blocks.rows,
        BLOCK_T=blocks.cols,
        num_warps=blocks.num_warps,
    )
    return loss


class GemmRowBackend:
    """cuBLAS projection into the chunk workspace, then the row kernel (``impl="triton"``)."""

    name = "triton"
    # No host sync: masked rows are skipped inside the row kernel, not compacted away.
    compacts_masked_rows = False

    def workspace_bytes_per_row(self, d_s: int, d_t: int, element_size: int) -> int:
        del d_s  # the student gradient is written straight into its output rows
        # The projection/gradient chunk in the compute dtype (a power-of-two budget then gives
        # GEMM-friendly chunks: 8192 rows of bf16 d_t=4096 in 64 MiB).
        return element_size * d_t

    def loss_and_gradient(
        self,
        student: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        target: torch.Tensor,
        token_weight: torch.Tensor,
        scale: torch.Tensor | None,
        normalize: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        n_rows, d_t = target.shape
        if weight is None:
            projection = student  # the identity: the student rows are the projection
            gradient = None if scale is None else torch.empty_like(student)
        else:
            projection = torch.empty((n_rows, d_t), dtype=student.dtype, device=student.device)
            torch.mm(student, weight.t(), out=projection)
            gradient = None if scale is None else projection
        out = gradient
        if interpreting() and gradient is not None and gradient.dtype != torch.float32:
            # The interpreter's float32 -> bf16/fp16 stores do not round to nearest even (on
            # GPUs they do): write float32 and round with PyTorch, as the GPU's store would.
            out = torch.empty(gradient.shape, dtype=torch.float32, device=gradient.device)
        loss = row_loss_gradient(projection, target, bias, token_weight, scale, out, normalize)
        if out is not gradient:
            gradient.copy_(out)
        return loss, gradient
