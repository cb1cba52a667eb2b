"""projected_mse against the float64 oracle: every impl, option and odd shape."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import torch

import oprd_kernels
from tests.kernels.devices import DEVICE
from tests.kernels.float64_oracle import oracle

REDUCTIONS = ("mean", "sum", "none")
WEIGHT_MODES = ("identity", "frozen", "trainable")


@dataclass(frozen=True)
class Shape:
    name: str
    tokens: int
    d_s: int
    d_t: int
    mask: str  # "none", "some" (~20% masked) or "all" (every weight zero)


# No dimension of ODD is a multiple of a block size (16/32 in the interpreter, 64/128 on GPU).
REALISTIC = Shape("realistic", 512, 256, 512, "some")
ODD = Shape("odd", 37, 40, 72, "some")
# Rows of ODD are wider than the interpreter's row block (two passes); those of NARROW fit one.
NARROW = Shape("narrow", 37, 24, 40, "some")
ONE_TOKEN = Shape("one-token", 1, 24, 40, "none")
ALL_MASKED = Shape("all-masked", 19, 24, 40, "all")


def make_case(
    shape: Shape,
    weight_mode: str,
    with_bias: bool,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict[str, torch.Tensor | None]:
    generator = torch.Generator().manual_seed(seed)
    d_s = shape.d_t if weight_mode == "identity" else shape.d_s

    def randn(*size: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*size, generator=generator, dtype=torch.float64) * scale).to(
            DEVICE, dtype
        )

    student = randn(shape.tokens, d_s).requires_grad_()
    # A target correlated with the projected student, as after some training.
    weight = None if weight_mode == "identity" else randn(shape.d_t, d_s, scale=d_s**-0.5)
    base = (
        student.detach().double()
        if weight is None
        else student.detach().double() @ weight.double().T
    )
    target = (
        base
        + torch.randn(shape.tokens, shape.d_t, generator=generator, dtype=torch.float64).to(DEVICE)
    ).to(dtype)
    if weight is not None and weight_mode == "trainable":
        weight.requires_grad_()
    bias = randn(shape.d_t, scale=0.5).requires_grad_() if with_bias else None
    if shape.mask == "none":
        token_weight = None
    elif shape.mask == "all":
        token_weight = torch.zeros(shape.tokens, device=DEVICE)
    else:
        keep = torch.rand(shape.tokens, generator=generator) >= 0.2
        token_weight = (keep.float() * (0.5 + torch.rand(shape.tokens, generator=generator))).to(
            DEVICE
        )
    return {
        "student": student,
        "target": target,
        "weight": weight,
        "bias": bias,
        "token_weight": token_weight,
    }


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.abs().max().item()
    difference = (actual.double() - expected.double()).abs().max().item()
    return difference / scale if scale > 0 else difference


def run_and_compare(
    case: dict[str, torch.Tensor | None],
    *,
    impl: str,
    normalize: bool,
    reduction: str,
    recompute: bool = False,
    workspace_bytes: int | None = None,
    rtol: float = 2e-5,
) -> None:
    student, target = case["student"], case["target"]
    assert student is not None and target is not None
    weight, bias, token_weight = case["weight"], case["bias"], case["token_weight"]
    loss = oprd_kernels.projected_mse(
        student,
        target,
        weight,
        bias,
        token_weight,
        normalize=normalize,
        reduction=reduction,
        impl=impl,
        recompute=recompute,
        workspace_bytes=workspace_bytes,
    )
    assert loss.dtype == torch.float32
    upstream = (torch.randn(loss.shape, generator=torch.Generator().manual_seed(7)) + 1.5).to(
        DEVICE
    )
    expected = oracle(
        student,
        target,
        weight,
        bias,
        token_weight,
        normalize=normalize,
        reduction=reduction,
        upstream=upstream,
    )
    assert loss.shape == expected.loss.shape
    assert relative_error(loss.detach(), expected.loss) <= rtol
    leaves = [v for v in (student, weight, bias) if v is not None and v.requires_grad]
    grads = torch.autograd.grad((loss * upstream).sum(), leaves, allow_unused=True)
    by_leaf = dict(zip(map(id, leaves), grads, strict=True))
    for name, tensor, expected_grad in (
        ("student", student, expected.student_grad),
        ("weight", weight, expected.weight_grad),
        ("bias", bias, expected.bias_grad),
    ):
        if tensor is None or not tensor.requires_grad:
            continue
        actual = by_leaf[id(tensor)]
        assert actual is not None, f"no gradient for {name}"
        assert actual.dtype == tensor.dtype
        assert relative_error(actual, expected_grad) <= rtol * 5, f"{name} gradient"


# The PyTorch paths are fast: the full option matrix, chunked into several pieces.
@pytest.mark.parametrize("shape", [REALISTIC, ODD, ONE_TOKEN, ALL_MASKED], ids=lambda s: s.name)
@pytest.mark.parametrize(
    "impl,recompute", [("reference", False), ("torch", False), ("torch", True)]
)
@pytest.mark.parametrize("weight_mode", WEIGHT_MODES)
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("normalize", [True, False], ids=["normalized", "plain"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_torch_paths_match_float64(
    shape: Shape,
    impl: str,
    recompute: bool,
    weight_mode: str,
    with_bias: bool,
    normalize: bool,
    reduction: str,
) -> None:
    case = make_case(shape, weight_mode, with_bias)
    run_and_compare(
        case,
        impl=impl,
        normalize=normalize,
        reduction=reduction,
        recompute=recompute,
        workspace_bytes=None if shape is ONE_TOKEN else 60_000,
    )


# The row kernel (impl="triton"): every option on a shape whose rows take two passes in the
# interpreter, the gradient options on one whose rows fit one block. The fused kernel runs its
# GEMM in the interpreter (slow): every option once on the odd shape. Edge shapes for both.
TRITON_MATRIX = (
    [
        ("triton", ODD, weight_mode, weight_mode != "frozen", normalize, reduction, recompute)
        for weight_mode, normalize, reduction, recompute in itertools.product(
            WEIGHT_MODES, (True, False), REDUCTIONS, (False, True)
        )
    ]
    + [
        ("triton", NARROW, weight_mode, weight_mode != "frozen", normalize, "mean", recompute)
        for weight_mode, normalize, recompute in itertools.product(
            WEIGHT_MODES, (True, False), (False, True)
        )
    ]
    + [
        ("triton-fused", ODD, weight_mode, weight_mode != "frozen", normalize, reduction, rec)
        for weight_mode, normalize, reduction, rec in itertools.product(
            WEIGHT_MODES, (True, False), REDUCTIONS, (False, True)
        )
        if reduction != "sum" or weight_mode == "trainable"
    ]
    + [
        (impl, ONE_TOKEN, "trainable", True, True, "mean", False)
        for impl in ("triton", "triton-fused")
    ]
    + [
        (impl, ALL_MASKED, "trainable", True, True, "mean", False)
        for impl in ("triton", "triton-fused")
    ]
    + [
        (impl, ALL_MASKED, "frozen", False, False, "none", True)
        for impl in ("triton", "triton-fused")
    ]
)


@pytest.mark.parametrize(
    "impl,shape,weight_mode,with_bias,normalize,reduction,recompute",
    TRITON_MATRIX,
    ids=[
        "-".join(
            (
                i,
                s.name,
                m,
                "bias" if b else "nobias",
                "norm" if n else "plain",
                r,
                "rec" if rc else "fwd",
            )
        )
        for i, s, m, b, n, r, rc in TRITON_MATRIX
    ],
)
def test_triton_matches_float64(
    impl: str,
    shape: Shape,
    weight_mode: str,
    with_bias: bool,
    normalize: bool,
    reduction: str,
    recompute: bool,
) -> None:
    case = make_case(shape, weight_mode, with_bias)
    # A budget of a few rows per chunk, so several chunks and partial tiles are exercised.
    run_and_compare(
        case,
        impl=impl,
        normalize=normalize,
        reduction=reduction,
        recompute=recompute,
        workspace_bytes=8_000,
    )


def test_default_workspace_and_auto_impl_on_cpu() -> None:
    case = make_case(REALISTIC, "trainable", True)
    assert oprd_kernels.resolve_impl("auto", torch.device("cpu")) == "torch"
    run_and_compare(case, impl="auto", normalize=True, reduction="mean")


def test_frozen_student_still_trains_projection() -> None:
    case = make_case(ODD, "trainable", True)
    assert case["student"] is not None
    case["student"].requires_grad_(False)
    run_and_compare(case, impl="torch", normalize=True, reduction="mean")


def test_target_never_receives_gradient() -> None:
    case = make_case(ODD, "trainable", False)
    target = case["target"]
    assert target is not None
    target.requires_grad_()
    for impl in ("reference", "torch"):
        loss = oprd_kernels.projected_mse(
            case["student"], target, case["weight"], token_weight=case["token_weight"], impl=impl
        )
        loss.backward()
        assert target.grad is None


def test_loss_does_not_depend_on_chunking() -> None:
    case = make_case(REALISTIC, "trainable", True)
    losses = [
        oprd_kernels.projected_mse(
            case["student"],
            case["target"],
            case["weight"],
            case["bias"],
            case["token_weight"],
            impl="torch",
            workspace_bytes=budget,
        ).item()
        for budget in (10_000, 200_000, 10**9)
    ]
    assert max(losses) - min(losses) <= 1e-6 * abs(losses[0])


# bf16: no worse than PyTorch's own bf16 evaluation of the same formula, plus a small margin
# (Apple cut-cross-entropy's criterion), everything measured against float64.
def torch_bf16_formula(
    case: dict[str, torch.Tensor | None], normalize: bool
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss and gradients as plain PyTorch computes them in the inputs' dtype."""
    leaves = {
        name: tensor.detach().clone().requires_grad_(tensor.requires_grad)
        for name in ("student", "weight", "bias")
        if (tensor := case[name]) is not None
    }
    target, token_weight = case["target"], case["token_weight"]
    assert target is not None
    p = leaves["student"] @ leaves["weight"].T
    if "bias" in leaves:
        p = p + leaves["bias"]
    t = target
    if normalize:
        p = p / p.norm(dim=1, keepdim=True).clamp_min(1e-12)
        t = t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)
    per_token = ((p - t) ** 2).mean(dim=1)
    if token_weight is None:
        loss = per_token.mean()
    else:
        weights = token_weight.to(per_token.dtype)
        loss = (weights * per_token).sum() / weights.sum()
    trainable = {name: leaf for name, leaf in leaves.items() if leaf.requires_grad}
    grads = torch.autograd.grad(loss, list(trainable.values()))
    return loss.detach(), dict(zip(trainable, grads, strict=True))


def assert_bf16_no_worse_than_pytorch(
    case: dict[str, torch.Tensor | None],
    normalize: bool,
    impl: str,
    recompute: bool = False,
    margin: float = 2e-3,
) -> None:
    student, weight, target = case["student"], case["weight"], case["target"]
    bias, token_weight = case["bias"], case["token_weight"]
    assert student is not None and weight is not None and target is not None
    expected = oracle(
        student,
        target,
        weight,
        bias,
        token_weight,
        normalize=normalize,
        reduction="mean",
        upstream=torch.ones((), device=DEVICE),
    )
    expected_grads = {
        "student": expected.student_grad,
        "weight": expected.weight_grad,
        "bias": expected.bias_grad,
    }
    torch_loss, torch_grads = torch_bf16_formula(case, normalize)
    loss = oprd_kernels.projected_mse(
        student,
        target,
        weight,
        bias,
        token_weight,
        normalize=normalize,
        impl=impl,  # type: ignore[arg-type]
        recompute=recompute,
    )
    leaves = {name: case[name] for name in torch_grads}
    grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values())), strict=True))
    assert relative_error(loss, expected.loss) <= relative_error(torch_loss, expected.loss) + margin
    for name, grad in grads.items():
        assert grad.dtype == torch.bfloat16, name
        reference = expected_grads[name]
        assert reference is not None
        ours, theirs = relative_error(grad, reference), relative_error(torch_grads[name], reference)
        assert ours <= theirs + margin, f"{name} gradient: {ours:.2e} vs PyTorch bf16 {theirs:.2e}"


@pytest.mark.parametrize(
    "impl,shape",
    [("torch", REALISTIC), ("reference", REALISTIC), ("triton", ODD), ("triton-fused", ODD)],
)
@pytest.mark.parametrize("normalize", [True, False], ids=["normalized", "plain"])
def test_bf16_no_worse_than_pytorch(impl: str, shape: Shape, normalize: bool) -> None:
    shape = Shape(shape.name, shape.tokens, shape.d_s, shape.d_t, "none")
    case = make_case(shape, "trainable", False, dtype=torch.bfloat16, seed=3)
    assert_bf16_no_worse_than_pytorch(case, normalize, impl)


# On CUDA the training shape (bf16, d 2048 -> 4096, a token count that is a multiple of no block
# size, ~20% masked rows, bias); in the interpreter the same options at a small odd shape.
BF16_TRAINING = (
    Shape("bf16-training", 4133, 2048, 4096, "some")
    if DEVICE.type == "cuda"
    else Shape("bf16-small", 45, 40, 72, "some")
)


@pytest.mark.parametrize(
    "impl,recompute",
    [("triton", False), ("triton", True), ("triton-fused", False)],
    ids=["triton", "triton-rec", "triton-fused"],
)
@pytest.mark.parametrize("weight_mode", ["frozen", "trainable"])
@pytest.mark.parametrize("normalize", [True, False], ids=["normalized", "plain"])
def test_triton_bf16_training_shape_no_worse_than_pytorch(
    impl: str, recompute: bool, weight_mode: str, normalize: bool
) -> None:
    case = make_case(BF16_TRAINING, weight_mode, True, dtype=torch.bfloat16, seed=5)
    margin = 2e-3
    if impl == "triton-fused" and DEVICE.type != "cuda":
        # The fused kernel stores P and then G through the interpreter's float32 -> bf16
        # conversion, which does not round to nearest even (half of 1000 random values differ
        # from PyTorch's rounding); the bias gradient, a sum of G, collects that bias twice.
        # The row kernel's stores are rounded by PyTorch there (see triton_rows.py).
        margin = 6e-3
    assert_bf16_no_worse_than_pytorch(case, normalize, impl, recompute, margin)


def test_new_token_count_never_retunes() -> None:
    """No autotuning keyed on the token count: a new microbatch size must not stall."""
    from triton.runtime.autotuner import Autotuner

    from oprd_kernels import triton_backend, triton_rows

    assert not isinstance(triton_rows._row_loss_gradient_kernel, Autotuner)
    assert "n_rows" not in triton_backend._autotuned_projection_statistics().keys


@pytest.mark.parametrize("normalize", [True, False], ids=["normalized", "plain"])
def test_triton_wide_rows_take_two_passes(normalize: bool) -> None:
    from oprd_kernels.triton_rows import row_blocks

    shape = Shape("wide", 300, 64, 9000, "some") if DEVICE.type == "cuda" else ODD
    assert not row_blocks(shape.d_t).one_pass
    case = make_case(shape, "trainable", True)
    run_and_compare(case, impl="triton", normalize=normalize, reduction="mean")


GPU_REALISTIC = Shape("gpu-realistic", 4133, 2048, 4096, "some")


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "triton-fused"])
@pytest.mark.parametrize("recompute", [False, True], ids=["fwd", "rec"])
def test_triton_realistic_float32_on_gpu(impl: str, recompute: bool) -> None:
    case = make_case(GPU_REALISTIC, "trainable", True)
    run_and_compare(case, impl=impl, normalize=True, reduction="mean", recompute=recompute)


def test_auto_is_triton_on_cuda_and_never_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = torch.device("cuda")
    assert oprd_kernels.resolve_impl("auto", cuda) == "triton"
    # Without Triton, the naive loss: the chunked PyTorch path is slower than it on a GPU.
    monkeypatch.setattr(oprd_kernels.api, "triton_available", lambda: False)
    assert oprd_kernels.resolve_impl("auto", cuda) == "reference"
    assert oprd_kernels.resolve_impl("auto", torch.device("cpu")) == "torch"


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "triton-fused"])
@pytest.mark.parametrize("recompute", [False, True], ids=["fwd", "rec"])
def test_triton_makes_no_host_sync(impl: str, recompute: bool) -> None:
    case = make_case(ODD, "trainable", True)
    student = case["student"]
    assert student is not None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = oprd_kernels.projected_mse(
            student,
            case["target"],
            case["weight"],
            case["bias"],
            case["token_weight"],
            impl=impl,  # type: ignore[arg-type]
            recompute=recompute,
        )
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert student.grad is not None


def test_second_backward_needs_recompute() -> None:
    case = make_case(ODD, "trainable", True)
    arguments = (case["student"], case["target"], case["weight"], case["bias"])
    loss = oprd_kernels.projected_mse(*arguments, impl="torch")  # type: ignore[arg-type]
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="pass recompute=True"):
        loss.backward()
    student = case["student"]
    assert student is not None
    student.grad = None
    loss = oprd_kernels.projected_mse(*arguments, impl="torch", recompute=True)  # type: ignore[arg-type]
    loss.backward(retain_graph=True)
    first = student.grad.clone()  # type: ignore[union-attr]
    loss.backward()
    torch.testing.assert_close(student.grad, 2 * first)
