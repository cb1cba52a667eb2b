"""Bad inputs give errors that name the argument and what was expected."""

from __future__ import annotations

import pytest
import torch

import oprd_kernels


def good() -> dict[str, torch.Tensor]:
    return {
        "student": torch.randn(6, 4),
        "target": torch.randn(6, 8),
        "weight": torch.randn(8, 4),
        "bias": torch.randn(8),
        "token_weight": torch.ones(6),
    }


@pytest.mark.parametrize(
    "change,message",
    [
        ({"student": torch.randn(6, 4, 1)}, "student must be a 2-D tensor"),
        ({"target": torch.randn(5, 8)}, "student has 6 tokens but target has 5"),
        (
            {"weight": torch.randn(4, 8)},
            r"weight has shape \[4, 8\], expected \[d_t, d_s\] = \[8, 4\]",
        ),
        ({"weight": torch.randn(8, 4, dtype=torch.float64)}, "weight dtype torch.float64 differs"),
        ({"bias": torch.randn(7)}, r"bias has shape \[7\], expected \[d_t\] = \[8\]"),
        ({"token_weight": torch.ones(5)}, r"token_weight has shape \[5\]"),
        ({"weight": None}, "identity.*d_s=4, target d_t=8"),
        ({"student": torch.randn(6, 4, dtype=torch.float64)}, "student dtype torch.float64"),
        ({"target": torch.ones(6, 8, dtype=torch.int64)}, "target dtype torch.int64"),
        ({"bias": torch.randn(8, device="meta")}, "bias is on meta but student is on cpu"),
    ],
)
def test_bad_inputs_are_named(change: dict[str, torch.Tensor | None], message: str) -> None:
    arguments = {**good(), **change}
    with pytest.raises(ValueError, match=message):
        oprd_kernels.projected_mse(**arguments)  # type: ignore[arg-type]


def test_bad_options_are_named() -> None:
    with pytest.raises(ValueError, match="reduction='avg' is not one of"):
        oprd_kernels.projected_mse(**good(), reduction="avg")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="impl='cuda' is not one of"):
        oprd_kernels.projected_mse(**good(), impl="cuda")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="workspace_bytes=0 must be positive"):
        oprd_kernels.projected_mse(**good(), impl="torch", workspace_bytes=0)


def test_triton_without_cuda_or_interpreter_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="impl='triton' cannot run here"):
        oprd_kernels.projected_mse(**good(), impl="triton")


def test_bridge_inputs_are_named() -> None:
    hidden, projection, mean = torch.randn(5, 8), torch.randn(2, 8), torch.randn(8)
    with pytest.raises(ValueError, match=r"projection has shape \[2, 7\], expected \[r, 8\]"):
        oprd_kernels.bridge_project(hidden, torch.randn(2, 7), mean)
    with pytest.raises(ValueError, match=r"mean has shape \[7\], expected \[8\]"):
        oprd_kernels.bridge_project(hidden, projection, torch.randn(7))
    with pytest.raises(ValueError, match="hidden must be"):
        oprd_kernels.bridge_project(hidden[None], projection, mean)
