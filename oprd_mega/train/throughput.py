"""Model FLOPs utilisation: the scheduler's FLOP model over a card's peak.

The FLOPs of a step are those of :class:`oprd_mega.data.scheduler.CostModel` (matmuls only,
causal attention counted as half the square, backward = 2 x forward), so MFU and the data-parallel
balance agree on what a token costs. Counting causal attention as half is the stricter
convention: Megatron-LM's reported MFU counts the full square, which reads higher at long
sequences.
"""

from __future__ import annotations

from collections.abc import Iterable

from oprd_mega.data.scheduler import CostModel, ModelDims

# Dense (no sparsity) tensor-core peaks in TFLOP/s from NVIDIA's data sheets, by dtype. Matched
# against torch.cuda.get_device_name() in this order (the first name contained wins).
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"bfloat16": 989.4, "float16": 989.4},
    "H100 PCIe": {"bfloat16": 756.5, "float16": 756.5},
    "H100 NVL": {"bfloat16": 835.5, "float16": 835.5},
    "H100": {"bfloat16": 989.4, "float16": 989.4},  # SXM ("NVIDIA H100 80GB HBM3")
    "H800": {"bfloat16": 989.4, "float16": 989.4},
    "A100": {"bfloat16": 312.0, "float16": 312.0},
}


def peak_tflops(device_name: str, dtype: str) -> float | None:
    """The card's dense peak for ``dtype`` (``bfloat16``, ``float16``), or ``None`` if unknown."""
    for card, peaks in PEAK_TFLOPS.items():
        if card in device_name:
            return peaks.get(dtype)
    return None


def training_flops(student: ModelDims, lengths: Iterable[int]) -> float:
    """Forward + backward FLOPs of the student over sequences of these lengths."""
    cost = CostModel(student)
    return float(sum(cost.cost(length) for length in lengths))


def model_flops_utilization(flops: float, seconds: float, peak: float) -> float:
    """Achieved FLOP/s over the peak (``peak`` in TFLOP/s), as a fraction."""
    if seconds <= 0 or peak <= 0:
        raise ValueError(f"seconds ({seconds}) and peak ({peak}) must be positive")
    return flops / seconds / (peak * 1e12)
