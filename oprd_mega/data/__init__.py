"""Prompt datasets and the microbatch scheduler."""

from oprd_mega.data.prompts import Prompt, PromptDataError, load_prompts
from oprd_mega.data.scheduler import CostModel, ModelDims, Schedule, schedule_microbatches

__all__ = [
    "CostModel",
    "ModelDims",
    "Prompt",
    "PromptDataError",
    "Schedule",
    "load_prompts",
    "schedule_microbatches",
]
