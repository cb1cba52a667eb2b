"""On CUDA the fused kernel (impl="triton-fused") runs with one tile configuration in the tests.

Its autotuner tries five per new (widths, dtypes, flags) key, and the suite's many small shapes
would each pay that (minutes in all); the tuned speed is the benchmark's business
(tools/gpu_check.sh), not the tests'. The default path (impl="triton") autotunes nothing.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _fused_kernel_with_one_tuning_config() -> Iterator[None]:
    if not torch.cuda.is_available():
        yield
        return
    from oprd_kernels import triton_backend

    patch = pytest.MonkeyPatch()
    patch.setattr(triton_backend, "_GPU_TUNING", triton_backend._GPU_TUNING[:1])
    triton_backend._autotuned_projection_statistics.cache_clear()
    yield
    patch.undo()
    triton_backend._autotuned_projection_statistics.cache_clear()
