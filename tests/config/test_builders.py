"""The builders of the step's own option types."""

from __future__ import annotations

import torch

from oprd_mega.distill.options import ProjectionSpec, StepOptions
from tests.config.helpers import minimal


def test_step_options_and_projection_spec() -> None:
    distill = minimal(
        "distillation.method=combined",
        "distillation.opd=opd-topk",
        "distillation.top_k=8",
        "distillation.mu=2",
        "distillation.normalize=true",
        "distillation.target_dtype=float32",
        "distillation.projection.mode=bridge",
        "distillation.projection.bridge_path=bridge.pt",
    ).distillation
    step = distill.step_options()
    assert isinstance(step, StepOptions)
    assert (step.method, step.opd, step.top_k, step.mu) == ("combined", "opd-topk", 8, 2.0)
    assert step.target_dtype == torch.float32
    assert step.kernel is distill.kernel and step.kernel.normalize
    assert step.opd_kind == "topk" and step.oprd_weight == 2.0
    spec = distill.projection_spec()
    assert spec == ProjectionSpec(mode="bridge", normalize=True, bridge_path="bridge.pt")
    assert minimal().distillation.projection_spec() == ProjectionSpec()
