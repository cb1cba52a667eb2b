"""bridge_project against float64: ``(h - mu) @ P^T``, including large shared means."""

from __future__ import annotations

import pytest
import torch

import oprd_kernels
from tests.kernels.devices import DEVICE


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,d_in,rank", [(37, 72, 8), (1, 40, 3), (50, 96, 20)])
def test_bridge_matches_float64(
    impl: str, dtype: torch.dtype, tokens: int, d_in: int, rank: int
) -> None:
    generator = torch.Generator().manual_seed(tokens + rank)
    # Hidden states with a large common offset, as real residual streams have.
    mean = torch.randn(d_in, generator=generator, dtype=torch.float64) * 20
    hidden = (mean + torch.randn(tokens, d_in, generator=generator, dtype=torch.float64)).to(dtype)
    projection = torch.linalg.qr(torch.randn(d_in, rank, generator=generator, dtype=torch.float64))[
        0
    ].T
    projection = projection.to(dtype)
    expected = (hidden.double() - mean) @ projection.double().T
    out = oprd_kernels.bridge_project(
        hidden.to(DEVICE), projection.to(DEVICE), mean.to(DEVICE, torch.float32), impl=impl
    ).cpu()
    assert out.shape == (tokens, rank) and out.dtype == dtype
    # The error allowed is the rounding of the inputs and the output, not of an uncentred product.
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert (
        out.double() - expected
    ).abs().max().item() <= tolerance * expected.abs().max().item() + tolerance


def test_bridge_out_dtype() -> None:
    hidden = torch.randn(4, 16, dtype=torch.bfloat16)
    out = oprd_kernels.bridge_project(
        hidden, torch.randn(2, 16), torch.zeros(16), out_dtype=torch.float32, impl="torch"
    )
    assert out.dtype == torch.float32
