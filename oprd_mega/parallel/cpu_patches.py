"""The ONE place where Megatron-Core is patched to run on CPU with gloo.

Megatron-Core 0.16 calls ``torch.cuda`` in a few places that have no CPU meaning. Each patch below
is named, applied only when CUDA is absent (``apply_cpu_patches``), idempotent and tested on its
own (tests/parallel/test_cpu_patches.py). GPU runs never import a patched function.

The emulated "CUDA RNG" is the CPU default generator: Megatron's RNG tracker then forks and
restores the CPU generator state. With dropout 0 and ``use_cpu_initialization=True`` (what the
builder sets on CPU) no random op runs inside a fork, so results match a plain CPU run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.overrides import TorchFunctionMode


@dataclass(frozen=True)
class CpuPatch:
    """A named patch: what it fixes and the function that applies it."""

    name: str
    reason: str
    apply: Callable[[], None]


_APPLIED: list[str] = []


def _cpu_get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False):
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False):
    torch.set_rng_state(new_state)


def _cpu_manual_seed(seed: int) -> None:
    # torch.manual_seed would call torch.cuda.manual_seed_all and recurse through this patch.
    torch.default_generator.manual_seed(int(seed))


def _patch_rng_state() -> None:
    from megatron.core.tensor_parallel import random as mcore_random

    torch.cuda.get_rng_state = _cpu_get_rng_state
    torch.cuda.set_rng_state = _cpu_set_rng_state
    torch.cuda.manual_seed = _cpu_manual_seed
    mcore_random._get_cuda_rng_state = _cpu_get_rng_state
    mcore_random._set_cuda_rng_state = _cpu_set_rng_state


def _patch_current_device() -> None:
    torch.cuda.current_device = lambda: "cpu"


def _patch_synchronize() -> None:
    torch.cuda.synchronize = lambda device=None: None


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.split(":")[0] == "cuda"


class CudaToCpuMode(TorchFunctionMode):
    """Maps ``device="cuda"`` arguments and ``Tensor.cuda()`` to CPU; optionally reports CPU
    float tensors as ``torch.cuda.*Tensor`` to ``Tensor.type()`` (Megatron's type checks)."""

    def __init__(self) -> None:
        super().__init__()
        self.device_kwargs = False
        self.tensor_type = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.device_kwargs:
            if func is torch.Tensor.cuda:
                return args[0]
            if _is_cuda_device(kwargs.get("device")):
                kwargs = {**kwargs, "device": "cpu"}
            if kwargs.get("pin_memory"):  # no pinned-memory allocator without an accelerator
                kwargs = {**kwargs, "pin_memory": False}
        if (
            self.tensor_type
            and func is torch.Tensor.type
            and len(args) == 1
            and not kwargs
            and args[0].device.type == "cpu"
        ):
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1)
        return func(*args, **kwargs)


_MODE: CudaToCpuMode | None = None


def _mode() -> CudaToCpuMode:
    global _MODE
    if _MODE is None:
        _MODE = CudaToCpuMode()
        _MODE.__enter__()  # stays on the torch-function mode stack for the process
    return _MODE


def _patch_cuda_device_kwargs() -> None:
    _mode().device_kwargs = True


def _patch_cuda_tensor_type() -> None:
    _mode().tensor_type = True


PATCHES: tuple[CpuPatch, ...] = (
    CpuPatch(
        "rng_state",
        "tensor_parallel/random.py keeps CUDA RNG states; emulate them with the CPU generator",
        _patch_rng_state,
    ),
    CpuPatch(
        "current_device",
        "pipeline p2p allocates on torch.cuda.current_device()",
        _patch_current_device,
    ),
    CpuPatch(
        "synchronize",
        "pipeline p2p calls torch.cuda.synchronize()",
        _patch_synchronize,
    ),
    CpuPatch(
        "cuda_device_kwargs",
        'schedules, clip_grads, causal masks allocate with device="cuda" or call .cuda(); '
        "context-parallel RoPE allocates with pin_memory=True",
        _patch_cuda_device_kwargs,
    ),
    CpuPatch(
        "cuda_tensor_type",
        "clip_grads and the distributed optimizer require type() == 'torch.cuda.FloatTensor'",
        _patch_cuda_tensor_type,
    ),
)


def patch_names() -> list[str]:
    """Names of all CPU patches, in application order."""
    return [patch.name for patch in PATCHES]


def applied_patches() -> list[str]:
    """Names of the patches applied in this process so far."""
    return list(_APPLIED)


def apply_cpu_patches(names: list[str] | None = None, *, force: bool = False) -> list[str]:
    """Apply the named patches (all by default) once; a no-op with CUDA unless ``force``.

    Returns the names applied in this process so far.
    """
    if torch.cuda.is_available() and not force:
        return applied_patches()
    known = {patch.name: patch for patch in PATCHES}
    wanted = patch_names() if names is None else names
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise ValueError(f"unknown CPU patch(es) {unknown}; known: {patch_names()}")
    for name in wanted:
        if name not in _APPLIED:
            known[name].apply()
            _APPLIED.append(name)
    return applied_patches()
