"""SGLang's /weights_checker on CPU: checksums of the served weights, snapshot and compare.

The checksum of one tensor is the first 8 bytes of the SHA-256 of its raw bytes, as 16 hex
digits (SGLang's CPU ``tensor_hash``); the server's is the SHA-256 over the sorted names and
their checksums (``overall_checksum``), and the engine's the SHA-256 of the servers' (one here).
A trainer computes the same over its own HF-named tensors to prove a sync was exact. Names are
the Hugging Face ones (SGLang's own models fuse some, so the two servers' names differ).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import torch

# SGLang's WeightChecker actions; each is a CPU operation here.
ACTIONS = ("checksum", "snapshot", "compare", "reset_tensors")
SELECTORS = ("target", "draft", "all")
# Buffers SGLang never checks: derived from the config, not loaded (weight_checker.py).
_NON_PERSISTENT_BUFFER_PATTERNS = (
    "cos_sin_cache",
    "cos_cache",
    "sin_cache",
    "inv_freq",
    "freqs_cis",
    "expert_mask_gpu",
)


def tensor_checksum(tensor: torch.Tensor) -> str:
    """16 hex digits: the first 8 bytes of SHA-256 over the tensor's bytes (row-major)."""
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(memoryview(data)).digest()[:8].hex()


def overall_checksum(checksums: dict[str, str]) -> str:
    """SHA-256 (hex) over the sorted names, each followed by its checksum."""
    digest = hashlib.sha256()
    for name in sorted(checksums):
        digest.update(name.encode())
        digest.update(checksums[name].encode())
    return digest.hexdigest()


def checked_tensors(
    model: torch.nn.Module, skip_tensor_list: list[str] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """The parameters (tied ones once) and buffers a check covers, by HF name."""
    skip = (*_NON_PERSISTENT_BUFFER_PATTERNS, *(skip_tensor_list or ()))
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        if not any(pattern in name for pattern in skip):
            yield name, tensor


def checksum_payload(model: torch.nn.Module, skip_tensor_list: list[str] | None) -> dict:
    """The body SGLang's /weights_checker answers for ``action: checksum`` on one TP rank."""
    checksums = {n: tensor_checksum(t) for n, t in checked_tensors(model, skip_tensor_list)}
    per_gpu = overall_checksum(checksums)
    placement = dict.fromkeys(("tp_rank", "dp_rank", "pp_rank", "rank"), 0)
    placement |= dict.fromkeys(("tp_size", "dp_size", "pp_size", "size"), 1)
    return {
        "success": True,
        "message": "Success.",
        "ranks": [
            {
                "checksums": checksums,
                "per_gpu_checksum": per_gpu,
                "parallelism_info": [{"role": "target", **placement}],
            }
        ],
        "per_engine_checksum": hashlib.sha256(per_gpu.encode()).hexdigest(),
    }


def _random_like(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.is_floating_point():
        return torch.rand(tensor.shape).to(tensor.dtype)
    if tensor.dtype == torch.bool:
        return torch.rand(tensor.shape) > 0.5
    info = torch.iinfo(tensor.dtype)
    return torch.randint(int(info.min), int(info.max), tensor.shape, dtype=tensor.dtype)


class WeightChecker:
    """Runs the /weights_checker actions on a model; keeps the snapshot between calls."""

    def __init__(self) -> None:
        self._snapshot: dict[str, torch.Tensor] | None = None

    def handle(
        self, model: torch.nn.Module, action: str, skip_tensor_list: list[str] | None
    ) -> dict[str, Any]:
        """The answer body; raises ValueError (HTTP 400) for what cannot be done."""
        if action == "checksum":
            return checksum_payload(model, skip_tensor_list)
        if action == "snapshot":
            self._snapshot = {n: t.detach().clone() for n, t in checked_tensors(model)}
        elif action == "reset_tensors":
            with torch.no_grad():
                for _, tensor in checked_tensors(model, skip_tensor_list):
                    tensor.copy_(_random_like(tensor))
        elif action == "compare":
            if self._snapshot is None:
                raise ValueError("weights_checker: action compare needs action snapshot first")
            expected, self._snapshot = self._snapshot, None
            differing = []
            for name, tensor in checked_tensors(model, skip_tensor_list):
                want = expected.get(name)
                if want is not None and not torch.equal(want, tensor):
                    error = (tensor.detach().double() - want.double()).abs()
                    differing.append(
                        f"name={name} max_abs_err={float(error.max())} "
                        f"mean_abs_err={float(error.mean())}"
                    )
            if differing:
                raise ValueError(
                    f"weights_checker: {len(differing)} tensor(s) differ from the snapshot: "
                    + "; ".join(differing[:5])
                )
        else:
            raise ValueError(
                f"weights_checker: action must be one of {', '.join(ACTIONS)}, got {action!r}"
            )
        return {"success": True, "message": "Success."}
