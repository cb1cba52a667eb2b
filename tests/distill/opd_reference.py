"""Dense float64 statements of the OPD baselines, differentiated by autograd (test oracle)."""

from __future__ import annotations

import torch


def reference_opd(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    tokens: torch.Tensor,
    token_weight: torch.Tensor,
    kind: str,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, float]]:
    """Loss, d loss / d student_hidden, d loss / d student_weight, metrics; all from full logits."""
    h = student_hidden.detach().double().requires_grad_()
    w = student_weight.detach().double().requires_grad_()
    student_logits = h @ w.T
    teacher_logits = teacher_hidden.double() @ teacher_weight.double().T
    student_log = student_logits.log_softmax(-1)
    teacher_log = teacher_logits.log_softmax(-1)
    index = tokens.view(-1, 1)
    lp = student_log.gather(1, index)[:, 0]
    lq = teacher_log.gather(1, index)[:, 0]
    weights = token_weight.double()
    if kind == "top1":
        per_token = (lp - lq).detach() * lp
    else:
        chosen = student_logits.detach().topk(k, dim=-1).indices
        p = student_logits.gather(1, chosen).log_softmax(-1)
        q = teacher_logits.gather(1, chosen).log_softmax(-1)
        per_token = (p.exp() * (p - q)).sum(-1)
    loss = (weights * per_token).sum()
    hidden_grad, weight_grad = torch.autograd.grad(loss, [h, w])
    overlap = (
        (
            student_logits.topk(16, -1).indices.unsqueeze(2)
            == teacher_logits.topk(16, -1).indices.unsqueeze(1)
        )
        .any(2)
        .double()
        .mean(1)
    )
    metrics = {
        "reward": float((weights * (lp - lq)).sum().detach()),
        "student_entropy": float((weights * -(student_log.exp() * student_log).sum(-1)).sum()),
        "teacher_entropy": float((weights * -(teacher_log.exp() * teacher_log).sum(-1)).sum()),
        "top16_overlap": float((weights * overlap).sum()),
    }
    return loss.detach(), hidden_grad, weight_grad, metrics


def make_inputs(seed: int, tokens: int = 23, vocab: int = 50, h_s: int = 12, h_t: int = 20):
    """Random OPD inputs with correlated teacher and student logits."""
    generator = torch.Generator().manual_seed(seed)
    student_hidden = torch.randn(tokens, h_s, generator=generator)
    student_weight = torch.randn(vocab, h_s, generator=generator) / h_s**0.5
    teacher_hidden = torch.randn(tokens, h_t, generator=generator)
    teacher_weight = torch.randn(vocab, h_t, generator=generator) / h_t**0.5
    ids = torch.randint(0, vocab, (tokens,), generator=generator)
    token_weight = (torch.rand(tokens, generator=generator) > 0.25).float()
    return student_hidden, student_weight, teacher_hidden, teacher_weight, ids, token_weight


def pad_rows(weight: torch.Tensor, padded: int, seed: int) -> torch.Tensor:
    """``weight`` with random rows appended up to ``padded`` (random, not zero, so a padding
    row that leaked into a softmax or a top-k would change the result)."""
    generator = torch.Generator().manual_seed(seed)
    extra = torch.randn(padded - weight.shape[0], weight.shape[1], generator=generator) * 3
    return torch.cat([weight, extra])
