"""What the fused paths keep for backward, and that frozen or no-grad calls do no gradient work."""

from __future__ import annotations

import pytest
import torch

import oprd_kernels
from oprd_kernels import engine
from tests.kernels.devices import DEVICE

TOKENS, D_S, D_T = 48, 24, 40


def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(TOKENS, D_S, generator=generator).to(DEVICE).requires_grad_()
    target = torch.randn(TOKENS, D_T, generator=generator).to(DEVICE)
    weight = torch.randn(D_T, D_S, generator=generator).to(DEVICE).requires_grad_()
    bias = torch.randn(D_T, generator=generator).to(DEVICE).requires_grad_()
    return student, target, weight, bias


def saved_for_backward(fn) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    saved: list[torch.Tensor] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return saved


def new_tokens_by_d_t(saved: list[torch.Tensor], target: torch.Tensor) -> list[torch.Size]:
    """Saved tensors with at least TOKENS * D_T elements that are not the target itself."""
    return [
        tensor.shape
        for tensor in saved
        if tensor.numel() >= TOKENS * D_T
        and tensor.untyped_storage().data_ptr() != target.untyped_storage().data_ptr()
    ]


def test_reference_does_save_tokens_by_d_t() -> None:
    """Sanity check that the detector below can fire: the naive path keeps [tokens, d_t]."""
    student, target, weight, bias = inputs()
    saved = saved_for_backward(
        lambda: oprd_kernels.projected_mse(student, target, weight, bias, impl="reference")
    )
    assert new_tokens_by_d_t(saved, target)


@pytest.mark.parametrize("impl", ["torch", "triton", "triton-fused"])
@pytest.mark.parametrize("recompute", [False, True], ids=["grad-in-forward", "recompute"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_paths_save_nothing_tokens_by_d_t(impl: str, recompute: bool, reduction: str) -> None:
    student, target, weight, bias = inputs()
    saved = saved_for_backward(
        lambda: oprd_kernels.projected_mse(
            student, target, weight, bias, impl=impl, recompute=recompute, reduction=reduction
        )
    )
    assert new_tokens_by_d_t(saved, target) == []
    if recompute or reduction == "none":
        # The low-memory mode keeps only the inputs and per-token scalars.
        allowed = {t.untyped_storage().data_ptr() for t in (student, target, weight, bias)}
        extra = [t.shape for t in saved if t.untyped_storage().data_ptr() not in allowed]
        assert all(len(shape) == 1 and shape[0] == TOKENS for shape in extra), extra


class _Counting:
    """Counts the chunks a backend was asked for, and those that returned a gradient."""

    def __init__(self, backend: engine.ChunkBackend) -> None:
        self.backend = backend
        self.chunks = 0
        self.gradients = 0

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self.backend, name)

    def loss_and_gradient(self, *args):  # type: ignore[no-untyped-def]
        loss, gradient = self.backend.loss_and_gradient(*args)
        self.chunks += 1
        self.gradients += int(gradient is not None)
        return loss, gradient


@pytest.fixture
def counting(monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    counters: dict[str, object] = {"weight_gemms": 0}
    original_plan = engine.EnginePlan

    def plan(**kwargs):  # type: ignore[no-untyped-def]
        counter = _Counting(kwargs.pop("backend"))
        counters["backend"] = counter
        return original_plan(backend=counter, **kwargs)  # type: ignore[arg-type]

    original_accumulate = engine._accumulate_float32

    def accumulate(*args):  # type: ignore[no-untyped-def]
        counters["weight_gemms"] = int(counters["weight_gemms"]) + 1  # type: ignore[call-overload]
        return original_accumulate(*args)

    monkeypatch.setattr("oprd_kernels.api.EnginePlan", plan)
    monkeypatch.setattr(engine, "_accumulate_float32", accumulate)
    return counters


@pytest.mark.parametrize("impl", ["torch", "triton", "triton-fused"])
def test_no_grad_does_no_gradient_work(impl: str, counting: dict[str, object]) -> None:
    student, target, weight, bias = inputs()
    with torch.no_grad():
        loss = oprd_kernels.projected_mse(student, target, weight, bias, impl=impl)
    assert loss.grad_fn is None
    backend = counting["backend"]
    assert isinstance(backend, _Counting)
    assert backend.chunks > 0 and backend.gradients == 0
    assert counting["weight_gemms"] == 0


def test_all_frozen_does_no_gradient_work(counting: dict[str, object]) -> None:
    student, target, weight, bias = (t.detach() for t in inputs())
    loss = oprd_kernels.projected_mse(student, target, weight, bias, impl="torch")
    assert loss.grad_fn is None
    backend = counting["backend"]
    assert isinstance(backend, _Counting)
    assert backend.chunks > 0 and backend.gradients == 0


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_frozen_weight_skips_weight_gradient(impl: str, counting: dict[str, object]) -> None:
    student, target, weight, bias = inputs()
    weight.requires_grad_(False)
    bias.requires_grad_(False)
    loss = oprd_kernels.projected_mse(student, target, weight, bias, impl=impl)
    loss.backward()
    assert counting["weight_gemms"] == 0
    assert student.grad is not None and weight.grad is None and bias.grad is None


def test_masked_tokens_cost_no_flops_in_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    from oprd_kernels.torch_backend import TorchChunkBackend

    student, target, weight, bias = inputs()
    token_weight = torch.zeros(TOKENS, device=DEVICE)
    token_weight[:5] = 1.0
    rows_seen: list[int] = []
    original = TorchChunkBackend.project_with_statistics

    def spy(self, student_rows, *args, **options):  # type: ignore[no-untyped-def]
        rows_seen.append(student_rows.shape[0])
        return original(self, student_rows, *args, **options)

    monkeypatch.setattr(TorchChunkBackend, "project_with_statistics", spy)
    loss = oprd_kernels.projected_mse(
        student, target, weight, bias, token_weight, impl="torch", recompute=True
    )
    loss.backward()
    assert loss.item() > 0
    assert rows_seen == [5, 5]  # forward, then the recomputing backward: active rows only
