"""Fit P_S for every rank of a sweep from one teacher subspace, and report the cosines."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .student_map import FitConfig, FitResult, fit_student_map
from .subspace import Subspace, sweep_ranks


@dataclass
class RankFit:
    """One (layer pair, rank) entry of the cosine report."""

    student_layer: int
    teacher_layer: int
    rank: int
    explained: float
    cosine_before: float
    cosine_after: float
    best_epoch: int
    fit: FitResult

    def row(self) -> dict[str, float | int]:
        """JSON-ready summary (no tensors)."""
        return {
            "student_layer": self.student_layer,
            "teacher_layer": self.teacher_layer,
            "rank": self.rank,
            "explained_variance": round(self.explained, 6),
            "cosine_before": round(self.cosine_before, 6),
            "cosine_after": round(self.cosine_after, 6),
            "best_epoch": self.best_epoch,
        }


def fit_sweep(
    student: torch.Tensor,
    teacher: torch.Tensor,
    subspace: Subspace,
    ranks: Iterable[int],
    config: FitConfig | None = None,
    *,
    layer_pair: tuple[int, int] = (0, 0),
) -> list[RankFit]:
    """Fit P_S on paired rows (student [tokens, d_S], teacher [tokens, d_T]) for each rank.

    The targets of rank r are the first r columns of P_T (h_T - mu_T) at the largest rank,
    so one projection of the teacher rows serves the whole sweep.
    """
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"fit_sweep: {student.shape[0]} student rows but {teacher.shape[0]} teacher rows"
        )
    if teacher.dim() != 2 or teacher.shape[1] != subspace.dim:
        raise ValueError(
            f"fit_sweep: teacher rows {list(teacher.shape)} do not match d_T={subspace.dim}"
        )
    sweep = sweep_ranks(ranks, subspace.dim)
    projected = subspace.project(teacher, sweep[-1])
    out = []
    for rank in sweep:
        fit = fit_student_map(student, projected[:, :rank].to(student.device), config)
        out.append(
            RankFit(
                layer_pair[0],
                layer_pair[1],
                rank,
                subspace.explained(rank),
                fit.cosine_before,
                fit.cosine_after,
                fit.best_epoch,
                fit,
            )
        )
    return out


def format_report(fits: Iterable[RankFit]) -> str:
    """A plain-text table: layer pair, rank, explained variance, cosine before/after."""
    lines = [f"{'student':>7} {'teacher':>7} {'rank':>5} {'var%':>6} {'cos0':>7} {'cos':>7}"]
    for fit in fits:
        lines.append(
            f"{fit.student_layer:>7} {fit.teacher_layer:>7} {fit.rank:>5} "
            f"{100 * fit.explained:>6.1f} {fit.cosine_before:>7.3f} {fit.cosine_after:>7.3f}"
        )
    return "\n".join(lines)
