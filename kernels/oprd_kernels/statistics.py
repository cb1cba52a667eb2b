"""Per-token loss and gradient terms of the projected (normalized) MSE from four row statistics.

For a projected student row p and a target row t the fused paths only keep, per token,
``pp = ||p||^2``, ``pt = p.t``, ``tt = ||t||^2`` and ``dd = ||p - t||^2`` (float32). Everything
else follows from these scalars, so no [tokens, d_t] tensor has to outlive a chunk:

* loss ``l = ||f(p) - f(t)||^2 / d_t`` with ``f`` the identity or L2 normalisation
  (``torch.nn.functional.normalize`` semantics: ``v / max(||v||, eps)``);
* gradient ``dl/dp = alpha * p + beta * t`` with per-token ``alpha`` and ``beta``.
"""

from __future__ import annotations

import torch

NORMALIZE_EPS = 1e-12
"""The ``eps`` of ``torch.nn.functional.normalize``; the loss uses the same clamp."""

STAT_PP, STAT_PT, STAT_TT, STAT_DD = range(4)
NUM_STATS = 4


def per_token_loss(stats: torch.Tensor, *, normalize: bool, d_t: int) -> torch.Tensor:
    """Loss per token ``[tokens]`` (float32) from ``stats`` ``[4, tokens]``."""
    if not normalize:
        return stats[STAT_DD] / d_t
    pp, pt, tt = stats[STAT_PP], stats[STAT_PT], stats[STAT_TT]
    r = pp.sqrt().clamp_min(NORMALIZE_EPS)
    q = tt.sqrt().clamp_min(NORMALIZE_EPS)
    # ||u - v||^2 = ||u||^2 - 2 u.v + ||v||^2 with u = p / r, v = t / q. The expansion loses
    # ~1e-7 / (1 - cos) relative precision when student and teacher nearly coincide, which is
    # far below what training can see; the gradient below does not cancel at all.
    loss = pp / (r * r) - 2.0 * pt / (r * q) + tt / (q * q)
    return loss.clamp_min(0.0) / d_t


def gradient_coefficients(
    stats: torch.Tensor, *, normalize: bool, d_t: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(alpha, beta)``, each ``[tokens]`` float32, such that ``dl/dp = alpha * p + beta * t``."""
    scale = 2.0 / d_t
    if not normalize:
        ones = torch.ones_like(stats[STAT_PP])
        return ones * scale, ones * -scale
    pp, pt, tt = stats[STAT_PP], stats[STAT_PT], stats[STAT_TT]
    norm_p = pp.sqrt()
    r = norm_p.clamp_min(NORMALIZE_EPS)
    q = tt.sqrt().clamp_min(NORMALIZE_EPS)
    cosine = pt / (r * q)
    # Above eps, d(p/||p||)/dp = (I - u u^T) / ||p|| gives alpha = (u.v) / r^2; at or below it
    # the clamp makes f(p) = p / eps, a plain scaling.
    alpha = torch.where(norm_p > NORMALIZE_EPS, cosine, torch.ones_like(cosine)) / (r * r)
    beta = -1.0 / (r * q)
    return alpha * scale, beta * scale
