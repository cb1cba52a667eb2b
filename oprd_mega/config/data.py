"""The prompt dataset and the step's batch sizes and token budgets.

Field names match the parameters of ``oprd_mega.data.prompts.load_prompts`` and
``oprd_mega.data.scheduler.schedule_microbatches`` (a test keeps them in step).
"""

from __future__ import annotations

from pathlib import PurePath
from typing import Any, Literal

from pydantic import Field, model_validator

from oprd_mega.config.base import Section, invalid

SUFFIXES = {"jsonl": (".jsonl", ".json"), "parquet": (".parquet",)}
_RENDERING_KEYS = frozenset({"prompt_key", "chat_template", "system_prompt"})
_LENGTH_KEYS = frozenset({"max_prompt_length", "on_too_long"})


class PromptsSection(Section):
    """Prompts read by ``load_prompts``: one row per prompt, a column holding it."""

    path: str
    """JSONL (.jsonl/.json, one object a line) or Parquet (.parquet) file."""
    format: Literal["auto", "jsonl", "parquet"] = "auto"
    """File format; 'auto' follows the suffix, an explicit one must agree with it."""
    prompt_key: str = "prompt"
    """Column holding the prompt (a string, or chat messages with chat_template)."""
    chat_template: bool = True
    """Render through the student tokenizer's chat template; false: raw text."""
    system_prompt: str | None = None
    """System message prepended to chat prompts that have none."""
    max_prompt_length: int | None = Field(None, ge=1)
    """Longest prompt in tokens; null: no limit."""
    on_too_long: Literal["error", "skip"] = "error"
    """What a prompt over max_prompt_length does: stop with an error naming it, or be skipped."""
    shuffle: bool = True
    """Shuffle prompts each epoch (seeded by the run's seed)."""
    teacher_field: str | None = None
    """With several teachers: the column whose value routes a prompt (through routing.routes,
    or naming a teacher itself); null: every prompt gets routing.default."""

    @model_validator(mode="after")
    def _suffix_known(self) -> PromptsSection:
        suffix = PurePath(self.path).suffix.lower()
        allowed = SUFFIXES.get(self.format, SUFFIXES["jsonl"] + SUFFIXES["parquet"])
        if suffix not in allowed:
            raise invalid(
                "path",
                self.path,
                f"format {self.format!r} reads files ending in {' or '.join(allowed)}",
            )
        return self

    def rendering_options(self) -> dict[str, Any]:
        """The ``load_prompts`` keywords that turn a row into prompt tokens (shared by the
        held-out prompts)."""
        return self.model_dump(include=_RENDERING_KEYS)

    def load_options(self) -> dict[str, Any]:
        """Every ``load_prompts`` keyword this section sets (all but the path)."""
        return self.model_dump(include=_RENDERING_KEYS | _LENGTH_KEYS)


class BatchSection(Section):
    """Samples per step and the microbatch token budget of the scheduler."""

    prompts_per_step: int = Field(8, ge=1)
    """Prompts per optimizer step, all ranks together (paper: 8); each gives rollout.sampling.n
    responses."""
    max_tokens_per_microbatch: int = Field(16384, ge=1)
    """Token budget (prompt + response) of one packed microbatch; a longer sample gets one of
    its own."""
    pack_sequences: bool = True
    """Pack each microbatch's samples back to back into one row (THD: attention stays within
    each sample, rotary positions restart) instead of right-padding every sample to the step's
    longest; the same loss and gradients, without the padding's compute."""
    microbatch_multiple: int = Field(1, ge=1)
    """Every rank's microbatch count is a multiple of this (e.g. the virtual pipeline size)."""
