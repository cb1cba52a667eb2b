"""The chunked projected-MSE engine shared by the PyTorch and Triton backends.

Rows (tokens) are processed in chunks whose workspace fits a memory budget. Per chunk a backend
projects the student rows, reduces them to the per-token loss (float32) and, when gradients are
wanted, turns the chunk's projection into ``dl/dp`` in place; the engine finishes with
``dx = G W``, ``dW += G^T x`` and ``db += sum G`` (float32 accumulators). Nothing of size
[tokens, d_t] survives a chunk.

Two gradient modes:

* gradient-in-forward (default): the forward pass already computes the input gradients for an
  upstream gradient of one and saves them; backward only scales them by the (scalar) upstream
  gradient. Three GEMMs in total, nothing recomputed.
* recompute (``recompute=True``, and always for ``reduction="none"``, whose upstream gradient
  is a vector that cannot be applied to a finished ``dW``): forward keeps only the per-token
  weights; backward recomputes the projection chunk by chunk. Four GEMMs in total.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from .reference import reduce_weighted
from .statistics import gradient_coefficients, per_token_loss

DEFAULT_WORKSPACE_BYTES = 64 * 2**20


class ChunkBackend(Protocol):
    """What a backend provides for one chunk of rows."""

    name: str
    compacts_masked_rows: bool

    def workspace_bytes_per_row(self, d_s: int, d_t: int, element_size: int) -> int: ...

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
        """``(loss [rows] float32, gradient [rows, d_t] or None)`` of one chunk.

        ``loss`` is the unweighted per-token loss (any value where ``token_weight`` is 0: the
        reduction weighs it by 0); with ``scale`` [rows] the gradient is
        ``scale_i * dl_i/dp_i`` (0 on masked rows), in the workspace, in the compute dtype.
        """
        ...


class StatisticsChunks(ABC):
    """``loss_and_gradient`` from two primitives: projection + statistics, then gradient.

    Subclasses provide ``project_with_statistics`` (projection in the workspace and the four
    row statistics of :mod:`.statistics`) and ``projection_to_gradient`` (``alpha p + beta t``
    in place); the per-token coefficients come from the statistics in PyTorch.
    """

    compacts_masked_rows: bool

    @abstractmethod
    def project_with_statistics(
        self,
        student: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        target: torch.Tensor,
        active: torch.Tensor | None,
        keep_projection: bool,
        normalize: bool,
    ) -> tuple[torch.Tensor | None, torch.Tensor]: ...

    @abstractmethod
    def projection_to_gradient(
        self,
        projection: torch.Tensor,
        target: torch.Tensor,
        alpha: torch.Tensor,
        beta: torch.Tensor,
    ) -> torch.Tensor: ...

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
        d_t = target.shape[1]
        projection, stats = self.project_with_statistics(
            student,
            weight,
            bias,
            target,
            None if self.compacts_masked_rows else token_weight != 0,
            keep_projection=scale is not None,
            normalize=normalize,
        )
        loss = per_token_loss(stats, normalize=normalize, d_t=d_t)
        if scale is None or projection is None:
            return loss, None
        alpha, beta = gradient_coefficients(stats, normalize=normalize, d_t=d_t)
        return loss, self.projection_to_gradient(projection, target, alpha * scale, beta * scale)


@dataclass(frozen=True)
class EnginePlan:
    """How one call runs: backend, loss options and chunking."""

    backend: ChunkBackend
    normalize: bool
    reduction: str
    chunk_rows: int
    recompute: bool


def chunk_rows_for_budget(
    backend: ChunkBackend, d_s: int, d_t: int, dtype: torch.dtype, workspace_bytes: int | None
) -> int:
    """Rows per chunk so that one chunk's workspace fits ``workspace_bytes``."""
    budget = DEFAULT_WORKSPACE_BYTES if workspace_bytes is None else workspace_bytes
    element_size = torch.empty((), dtype=dtype).element_size()
    return max(1, budget // backend.workspace_bytes_per_row(d_s, d_t, element_size))


@dataclass
class _Gradients:
    student: torch.Tensor | None
    weight: torch.Tensor | None  # float32
    bias: torch.Tensor | None  # float32


def _row_chunks(
    num_rows: int, active_rows: torch.Tensor | None, chunk_rows: int
) -> Iterator[slice | torch.Tensor]:
    """Row selections of at most ``chunk_rows`` rows: slices, or index tensors after compaction."""
    if active_rows is None:
        for start in range(0, num_rows, chunk_rows):
            yield slice(start, min(start + chunk_rows, num_rows))
    else:
        for start in range(0, active_rows.numel(), chunk_rows):
            yield active_rows[start : start + chunk_rows]


def _take(tensor: torch.Tensor, rows: slice | torch.Tensor) -> torch.Tensor:
    return tensor[rows] if isinstance(rows, slice) else tensor.index_select(0, rows)


def _accumulate_float32(accumulator: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``accumulator += a @ b`` with float32 accumulation whatever the dtype of ``a`` and ``b``."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        accumulator.addmm_(a, b)
        return
    if a.is_cuda and a.dtype == b.dtype:
        try:  # cuBLAS low-precision GEMM accumulating straight into the float32 buffer
            torch.addmm(accumulator, a, b, out_dtype=torch.float32, out=accumulator)
            return
        except (RuntimeError, TypeError):
            pass
    accumulator.addmm_(a.to(torch.float32), b.to(torch.float32))


def _write_student_gradient(
    student_grad: torch.Tensor,
    rows: slice | torch.Tensor,
    gradient: torch.Tensor,
    weight: torch.Tensor | None,
) -> None:
    """``student_grad[rows] = gradient @ weight`` (or ``gradient`` for the identity)."""
    same_dtype = weight is not None and gradient.dtype == weight.dtype == student_grad.dtype
    if same_dtype and isinstance(rows, slice):
        # Straight into the gradient's rows: no chunk-sized temporary.
        torch.mm(gradient, weight, out=student_grad[rows])
        return
    chunk = gradient if weight is None else gradient.to(weight.dtype) @ weight
    if isinstance(rows, slice):
        student_grad[rows] = chunk
    else:
        student_grad.index_copy_(0, rows, chunk.to(student_grad.dtype))


def sweep(
    plan: EnginePlan,
    student: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    token_weight: torch.Tensor,
    coefficient: torch.Tensor | None,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor, _Gradients]:
    """One pass over all rows: per-token loss ``[tokens]`` and, with ``coefficient``, gradients.

    ``coefficient`` ``[tokens]`` (float32) scales each token's ``dl/dp`` (token weight, mean
    normaliser and upstream gradient folded in); ``needs`` says which of student, weight and
    bias gradients to compute. Masked rows (weight 0) get zero loss and zero gradient.
    """
    backend = plan.backend
    num_rows = student.shape[0]
    active_rows = None
    if backend.compacts_masked_rows:
        active_rows = (token_weight != 0).nonzero().view(-1)
        if active_rows.numel() == num_rows:
            active_rows = None
    losses = student.new_zeros(num_rows, dtype=torch.float32)
    want_student, want_weight, want_bias = needs if coefficient is not None else (False,) * 3
    # Without compaction every row is written; with it, masked rows must read zero.
    new_student_grad = torch.empty_like if active_rows is None else torch.zeros_like
    grads = _Gradients(
        student=new_student_grad(student) if want_student else None,
        weight=torch.zeros_like(weight, dtype=torch.float32) if want_weight else None,
        bias=torch.zeros_like(bias, dtype=torch.float32) if want_bias else None,
    )
    for rows in _row_chunks(num_rows, active_rows, plan.chunk_rows):
        student_rows = _take(student, rows)
        chunk_loss, gradient = backend.loss_and_gradient(
            student_rows,
            weight,
            bias,
            _take(target, rows),
            _take(token_weight, rows),
            None if coefficient is None else _take(coefficient, rows),
            plan.normalize,
        )
        losses[rows] = chunk_loss
        if gradient is None:
            continue
        if grads.student is not None:
            _write_student_gradient(grads.student, rows, gradient, weight)
        if grads.weight is not None:
            _accumulate_float32(grads.weight, gradient.t(), student_rows)
        if grads.bias is not None:
            grads.bias += gradient.sum(dim=0, dtype=torch.float32)
    return losses, grads


def token_coefficients(token_weight: torch.Tensor, reduction: str) -> torch.Tensor:
    """Per-token factor of ``dl_i`` in the reduced loss: ``w_i``, or ``w_i / sum(w)`` for mean."""
    if reduction != "mean":
        return token_weight
    total = token_weight.sum()
    return token_weight / torch.where(total == 0, torch.ones_like(total), total)


def reduce_losses(losses: torch.Tensor, token_weight: torch.Tensor, reduction: str) -> torch.Tensor:
    """The reduced loss from the per-token losses ``[tokens]`` of :func:`sweep`."""
    return reduce_weighted(token_weight * losses, token_weight, reduction)


class FusedProjectedMSE(torch.autograd.Function):
    """Autograd wrapper: gradient-in-forward or recompute, as described in the module doc."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        student: torch.Tensor,
        target: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        token_weight: torch.Tensor,
        plan: EnginePlan,
    ) -> torch.Tensor:
        needs_input_grad = ctx.needs_input_grad  # type: ignore[attr-defined]
        needs = (needs_input_grad[0], needs_input_grad[2], needs_input_grad[3])
        gradient_in_forward = any(needs) and not plan.recompute and plan.reduction != "none"
        coefficient = token_coefficients(token_weight, plan.reduction)
        losses, grads = sweep(
            plan,
            student,
            target,
            weight,
            bias,
            token_weight,
            coefficient if gradient_in_forward else None,
            needs,
        )
        ctx.plan = plan  # type: ignore[attr-defined]
        ctx.needs = needs  # type: ignore[attr-defined]
        ctx.gradient_in_forward = gradient_in_forward  # type: ignore[attr-defined]
        ctx.dtypes = tuple(  # type: ignore[attr-defined]
            None if tensor is None else tensor.dtype for tensor in (student, weight, bias)
        )
        if gradient_in_forward:
            ctx.save_for_backward(grads.student, grads.weight, grads.bias)
        else:
            # Only the per-token weights beyond the inputs themselves.
            ctx.save_for_backward(student, target, weight, bias, token_weight)
        return reduce_losses(losses, token_weight, plan.reduction)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_output: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        plan: EnginePlan = ctx.plan  # type: ignore[attr-defined]
        needs: tuple[bool, bool, bool] = ctx.needs  # type: ignore[attr-defined]
        grad_output = grad_output.to(torch.float32)
        if ctx.gradient_in_forward:  # type: ignore[attr-defined]
            if getattr(ctx, "consumed", False):
                raise RuntimeError(
                    "projected_mse: backward ran twice through a call that computed its "
                    "gradients during forward; pass recompute=True to backpropagate repeatedly"
                )
            ctx.consumed = True  # type: ignore[attr-defined]
            # Scaled in place: the saved gradients are this call's own and used once.
            saved = ctx.saved_tensors  # type: ignore[attr-defined]
            student_grad, weight_grad, bias_grad = (
                None if tensor is None else tensor.mul_(grad_output) for tensor in saved
            )
            grads = _Gradients(student=student_grad, weight=weight_grad, bias=bias_grad)
        else:
            student, target, weight, bias, token_weight = ctx.saved_tensors  # type: ignore[attr-defined]
            coefficient = token_coefficients(token_weight, plan.reduction) * grad_output
            _, grads = sweep(plan, student, target, weight, bias, token_weight, coefficient, needs)
        student_dtype, weight_dtype, bias_dtype = ctx.dtypes  # type: ignore[attr-defined]
        return (
            None if grads.student is None else grads.student.to(student_dtype),
            None,
            None if grads.weight is None else grads.weight.to(weight_dtype),
            None if grads.bias is None else grads.bias.to(bias_dtype),
            None,
            None,
        )
