"""Synthetic paired hidden states with a planted shared low-rank structure."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Planted:
    """Student/teacher rows driven by shared latents z [tokens, k]; the truth to recover."""

    student: torch.Tensor  # [tokens, d_S]
    teacher: torch.Tensor  # [tokens, d_T]
    latents: torch.Tensor  # [tokens, k]
    basis: torch.Tensor  # [k, d_T], orthonormal rows: the teacher's true principal directions
    mean: torch.Tensor  # [d_T]
    noise: float


def planted(
    tokens: int = 2048,
    d_student: int = 24,
    d_teacher: int = 32,
    k: int = 4,
    noise: float = 0.3,
    seed: int = 0,
) -> Planted:
    """h_T = mu_T + z A + noise, h_S = mu_S + z B + noise; latent stds 8, 6, 4, ... (distinct)."""
    g = torch.Generator().manual_seed(seed)
    stds = torch.tensor([8.0 - 2.0 * i for i in range(k)], dtype=torch.float64)
    latents = torch.randn(tokens, k, generator=g, dtype=torch.float64) * stds
    basis = torch.linalg.qr(torch.randn(d_teacher, k, generator=g, dtype=torch.float64))[0].t()
    mean = 5.0 * torch.randn(d_teacher, generator=g, dtype=torch.float64)
    mixing = torch.randn(k, d_student, generator=g, dtype=torch.float64)
    student_mean = 3.0 * torch.randn(d_student, generator=g, dtype=torch.float64)
    teacher = mean + latents @ basis + noise * torch.randn(tokens, d_teacher, generator=g)
    student = student_mean + latents @ mixing + noise * torch.randn(tokens, d_student, generator=g)
    return Planted(student, teacher, latents, basis, mean, noise)
