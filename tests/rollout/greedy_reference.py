"""transformers' own greedy generation: the reference a server's greedy answer must equal."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig


def model_greedy(model: torch.nn.Module, prompt: list[int], tokens: int) -> list[int]:
    """``tokens`` greedy tokens after ``prompt`` from ``model.generate``, EOS not stopping."""
    # eos_token_id None would fall back to the model's own; an empty list stops at none.
    config = GenerationConfig(
        do_sample=False, max_new_tokens=tokens, eos_token_id=[], pad_token_id=0
    )
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), generation_config=config)
    return out[0, len(prompt) :].tolist()


def transformers_greedy(model_dir: Path, prompt: list[int], tokens: int) -> list[int]:
    """:func:`model_greedy` of the model saved in ``model_dir``."""
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    return model_greedy(model, prompt, tokens)
