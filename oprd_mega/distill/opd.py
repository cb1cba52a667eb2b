"""Output-space baselines (OPD) in token chunks with vocabulary-parallel logits.

Both models' logits are formed chunk by chunk (``chunk_tokens`` rows of ``[tokens, vocab/tp]``
at a time), so no ``[tokens, vocab]`` tensor ever exists. Under tensor parallelism each rank
holds a contiguous vocabulary shard of both output layers (Megatron's ``ColumnParallelLinear``
with ``gather_output=False``); maxima, sums and top-k candidates are combined over ``group``.

* ``top1`` (sampled token, policy-gradient form of the reverse KL): per token
  ``loss_t = sg(log p(y_t) - log q(y_t)) * log p(y_t)``, p the student, q the teacher.
* ``topk``: ``KL(p~ || q~)`` with both distributions renormalised on the student's top-k tokens
  (the selection itself is not differentiated).

Gradients are computed during forward (nothing of size [tokens, vocab] is saved) and scaled by
the upstream gradient in backward. The hidden-state gradient returned is this rank's partial
sum over its vocabulary shard, exactly what a column-parallel linear returns: the caller's
tensor-parallel mapping (Megatron's ``copy_to_tensor_model_parallel_region`` or the sequence-
parallel gather) reduces it across ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

OPD_KINDS = ("top1", "topk")
OVERLAP_K = 16  # the paper logs the top-16 overlap of student and teacher


@dataclass(frozen=True)
class OPDOptions:
    """Which baseline, its k, the token chunk and the tensor-parallel group of the vocabulary.

    ``vocab_size``: the real vocabulary when the output layers hold padding rows beyond it
    (Megatron's padded vocabulary); their logits are set to -inf before any max, softmax or
    top-k, so they are never selected and never enter a normaliser. ``None``: no padding.
    """

    kind: str = "topk"
    k: int = 16
    chunk_tokens: int = 1024
    group: dist.ProcessGroup | None = None
    vocab_size: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in OPD_KINDS:
            raise ValueError(f"opd.kind: {self.kind!r} is not one of {OPD_KINDS}")
        if self.k < 1:
            raise ValueError(f"opd.k: {self.k} must be >= 1")
        if self.chunk_tokens < 1:
            raise ValueError(f"opd.chunk_tokens: {self.chunk_tokens} must be >= 1")
        if self.vocab_size is not None and self.vocab_size < self.k:
            raise ValueError(f"opd.vocab_size: {self.vocab_size} must be >= k={self.k}")


def _group_size(group: dist.ProcessGroup | None) -> int:
    return dist.get_world_size(group) if group is not None else 1


def _group_rank(group: dist.ProcessGroup | None) -> int:
    return dist.get_rank(group) if group is not None else 0


def _all_reduce(tensor: torch.Tensor, group: dist.ProcessGroup | None, op: str = "sum") -> None:
    if group is not None and _group_size(group) > 1:
        dist.all_reduce(
            tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=group
        )


@dataclass
class _ShardLogits:
    """One chunk's logits on this rank's vocabulary shard, with global normalisers."""

    logits: torch.Tensor  # [chunk, vocab_shard] float32
    log_normalizer: torch.Tensor  # [chunk] global logsumexp
    offset: int  # first global vocabulary id of the shard


def _shard_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    group: dist.ProcessGroup | None,
    vocab_size: int | None = None,
) -> _ShardLogits:
    logits = (hidden @ weight.t()).to(torch.float32)
    offset = _group_rank(group) * weight.shape[0]
    padding = 0 if vocab_size is None else offset + weight.shape[0] - vocab_size
    if padding > 0:  # this shard holds padding rows: out of every max, sum and top-k
        logits[:, max(weight.shape[0] - padding, 0) :] = float("-inf")
    maximum = logits.max(dim=-1).values
    _all_reduce(maximum, group, "max")
    sum_exp = (logits - maximum.unsqueeze(1)).exp().sum(dim=-1)
    _all_reduce(sum_exp, group)
    return _ShardLogits(
        logits=logits,
        log_normalizer=maximum + sum_exp.log(),
        offset=offset,
    )


def _gather_ids(
    shard: _ShardLogits, ids: torch.Tensor, group: dist.ProcessGroup | None
) -> torch.Tensor:
    """Global logits at ``ids`` ``[chunk, m]``: each rank fills the ids it owns, then a sum."""
    local = ids - shard.offset
    owned = (local >= 0) & (local < shard.logits.shape[1])
    values = shard.logits.gather(1, local.clamp(0, shard.logits.shape[1] - 1))
    values = torch.where(owned, values, torch.zeros_like(values))
    _all_reduce(values, group)
    return values


def _global_topk(
    shard: _ShardLogits, k: int, group: dist.ProcessGroup | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Values and global ids ``[chunk, k]`` of the k largest logits over the whole vocabulary."""
    local_k = min(k, shard.logits.shape[1])
    values, ids = shard.logits.topk(local_k, dim=-1)
    ids = ids + shard.offset
    size = _group_size(group)
    if size > 1:
        all_values = [torch.empty_like(values) for _ in range(size)]
        all_ids = [torch.empty_like(ids) for _ in range(size)]
        dist.all_gather(all_values, values, group=group)
        dist.all_gather(all_ids, ids, group=group)
        values, ids = torch.cat(all_values, dim=1), torch.cat(all_ids, dim=1)
    top_values, positions = values.topk(min(k, values.shape[1]), dim=-1)
    return top_values, ids.gather(1, positions)


def _scatter_owned(
    gradient: torch.Tensor, shard: _ShardLogits, ids: torch.Tensor, values: torch.Tensor
) -> None:
    """``gradient[:, ids - offset] += values`` for the ids this rank owns."""
    local = ids - shard.offset
    owned = (local >= 0) & (local < gradient.shape[1])
    gradient.scatter_add_(
        1,
        local.clamp(0, gradient.shape[1] - 1),
        torch.where(owned, values, torch.zeros_like(values)),
    )


def _entropy(shard: _ShardLogits, group: dist.ProcessGroup | None) -> torch.Tensor:
    probabilities = (shard.logits - shard.log_normalizer.unsqueeze(1)).exp()
    # padding rows: probability 0 times logit -inf counts 0
    weighted = torch.where(probabilities > 0, probabilities * shard.logits, 0.0)
    expected_logit = weighted.sum(dim=-1)
    _all_reduce(expected_logit, group)
    return shard.log_normalizer - expected_logit


@dataclass
class OPDResult:
    """Weighted sums over tokens: the loss and the metrics the paper logs."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


class _ChunkedOPD(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        teacher_hidden: torch.Tensor,
        teacher_weight: torch.Tensor,
        tokens: torch.Tensor,
        token_weight: torch.Tensor,
        options: OPDOptions,
        metrics: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        needs = ctx.needs_input_grad  # type: ignore[attr-defined]
        group = options.group
        hidden_grad = torch.zeros_like(student_hidden) if needs[0] else None
        weight_grad = torch.zeros_like(student_weight, dtype=torch.float32) if needs[1] else None
        loss = torch.zeros((), dtype=torch.float32, device=student_hidden.device)
        for name in ("reward", "student_entropy", "teacher_entropy", "top16_overlap"):
            metrics[name] = torch.zeros_like(loss)
        for start in range(0, student_hidden.shape[0], options.chunk_tokens):
            rows = slice(start, start + options.chunk_tokens)
            weight = token_weight[rows]
            vocab = options.vocab_size
            student = _shard_logits(student_hidden[rows], student_weight, group, vocab)
            with torch.no_grad():
                teacher = _shard_logits(teacher_hidden[rows], teacher_weight, group, vocab)
            ids = tokens[rows].unsqueeze(1)
            student_logprob = _gather_ids(student, ids, group)[:, 0] - student.log_normalizer
            teacher_logprob = _gather_ids(teacher, ids, group)[:, 0] - teacher.log_normalizer
            reward = student_logprob - teacher_logprob
            if options.kind == "top1":
                per_token = reward * student_logprob
                # d/dz of c * log p(y) with c = sg(reward): c * (onehot(y) - softmax(z))
                coefficient = weight * reward
                logit_grad = (student.logits - student.log_normalizer.unsqueeze(1)).exp()
                logit_grad.mul_(-coefficient.unsqueeze(1))
                _scatter_owned(logit_grad, student, ids, coefficient.unsqueeze(1))
            else:
                top_values, top_ids = _global_topk(student, options.k, group)
                teacher_values = _gather_ids(teacher, top_ids, group)
                student_log = top_values.log_softmax(dim=-1)
                teacher_log = teacher_values.log_softmax(dim=-1)
                student_prob = student_log.exp()
                per_token = (student_prob * (student_log - teacher_log)).sum(dim=-1)
                # d KL(p~ || q~) / dz_S = p~ * (log p~ - log q~ - KL)
                top_grad = student_prob * (student_log - teacher_log - per_token.unsqueeze(1))
                logit_grad = torch.zeros_like(student.logits)
                _scatter_owned(logit_grad, student, top_ids, top_grad * weight.unsqueeze(1))
            loss += (weight * per_token).sum()
            metrics["reward"] += (weight * reward).sum()
            metrics["student_entropy"] += (weight * _entropy(student, group)).sum()
            metrics["teacher_entropy"] += (weight * _entropy(teacher, group)).sum()
            _, student_top = _global_topk(student, OVERLAP_K, group)
            _, teacher_top = _global_topk(teacher, OVERLAP_K, group)
            shared = (student_top.unsqueeze(2) == teacher_top.unsqueeze(1)).any(dim=2)
            metrics["top16_overlap"] += (weight * shared.float().mean(dim=1)).sum()
            if hidden_grad is not None:
                hidden_grad[rows] = (logit_grad.to(student_weight.dtype) @ student_weight).to(
                    hidden_grad.dtype
                )
            if weight_grad is not None:
                weight_grad.addmm_(logit_grad.t(), student_hidden[rows].to(torch.float32))
        ctx.save_for_backward(hidden_grad, weight_grad)
        ctx.weight_dtype = student_weight.dtype  # type: ignore[attr-defined]
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_output: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        hidden_grad, weight_grad = ctx.saved_tensors  # type: ignore[attr-defined]
        scale = grad_output.to(torch.float32)
        return (
            None if hidden_grad is None else hidden_grad * scale.to(hidden_grad.dtype),
            None if weight_grad is None else (weight_grad * scale).to(ctx.weight_dtype),  # type: ignore[attr-defined]
            None,
            None,
            None,
            None,
            None,
            None,
        )


def opd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    tokens: torch.Tensor,
    token_weight: torch.Tensor,
    options: OPDOptions,
) -> OPDResult:
    """Weighted token sum of the OPD loss and metrics (divide by the global token count).

    ``student_hidden`` [tokens, h_S] and ``teacher_hidden`` [tokens, h_T] are the final-norm
    outputs at the positions that predict ``tokens`` [tokens] (global vocabulary ids);
    ``student_weight`` [vocab/tp, h_S] and ``teacher_weight`` [vocab/tp, h_T] are this rank's
    output-layer shards; ``token_weight`` [tokens] masks and weights tokens.
    """
    count = student_hidden.shape[0]
    if (
        teacher_hidden.shape[0] != count
        or tokens.shape != (count,)
        or token_weight.shape != (count,)
    ):
        raise ValueError(
            f"opd: {count} student rows, {teacher_hidden.shape[0]} teacher rows, tokens "
            f"{list(tokens.shape)} and token_weight {list(token_weight.shape)} must agree"
        )
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(
            f"opd: student vocabulary shard {student_weight.shape[0]} differs from the teacher's "
            f"{teacher_weight.shape[0]}: OPD needs the same vocabulary and tensor-parallel split"
        )
    if (
        student_weight.shape[1] != student_hidden.shape[1]
        or teacher_weight.shape[1] != teacher_hidden.shape[1]
    ):
        raise ValueError("opd: an output-layer weight does not match its hidden size")
    if not torch.is_grad_enabled():  # no gradient work at all
        student_hidden, student_weight = student_hidden.detach(), student_weight.detach()
    metrics: dict[str, torch.Tensor] = {}
    loss = _ChunkedOPD.apply(
        student_hidden,
        student_weight,
        teacher_hidden.detach(),
        teacher_weight.detach(),
        tokens,
        token_weight.to(torch.float32),
        options,
        metrics,
    )
    return OPDResult(loss=loss, metrics=metrics)
