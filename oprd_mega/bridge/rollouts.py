"""Stage 1's data: student rollouts from a rollout server (launched or attached), their file
``samples.jsonl``, and the paired token sequences both models read.

Prompts are sampled by :func:`oprd_mega.rollout.sampling.sample_groups` (prompt ``i`` seeded
from ``--seed``, step 0, ``i``), as the trainer and ``oprd-mega evaluate`` do.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from oprd_mega.data.prompts import Prompt
from oprd_mega.distill.positions import PositionSpec
from oprd_mega.rollout.sampling import SamplingConfig

from .plan import PairedSequence, same_tokenizer_sequence


class SamplesFileError(ValueError):
    """A samples file is missing or has a malformed row; the message names the file and line."""


@dataclass(frozen=True)
class Rollout:
    """One sampled response: the prompt's row in the prompt file, the sample's index among that
    prompt's, and the student's token ids."""

    prompt_index: int
    sample: int
    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    finish_reason: str

    def to_json(self) -> str:
        """One JSON line (ids as lists)."""
        row = asdict(self)
        row["prompt_ids"], row["response_ids"] = list(self.prompt_ids), list(self.response_ids)
        return json.dumps(row)


@dataclass(frozen=True)
class ServerOptions:
    """Where the rollouts come from: attach to ``urls``, or launch ``backend`` on ``port``."""

    model_path: str
    urls: tuple[str, ...] = ()
    backend: str = "auto"
    port: int = 30600
    log_dir: str | None = None
    health_timeout_s: float = 900.0


def write_samples(path: Path, rollouts: Sequence[Rollout]) -> Path:
    """Write one JSON object a line (prompt_index, sample, prompt_ids, response_ids, ...)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(r.to_json() + "\n" for r in rollouts), encoding="utf-8")
    return path


def _ids(row: dict[str, Any], key: str, where: str) -> tuple[int, ...]:
    value = row.get(key)
    if not isinstance(value, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value
    ):
        raise SamplesFileError(f"{where}: {key!r} must be a list of token ids")
    return tuple(value)


def read_samples(path: str | Path) -> list[Rollout]:
    """Rollouts from a file written by :func:`write_samples`."""
    path = Path(path)
    if not path.is_file():
        raise SamplesFileError(f"--samples: file not found: {path}")
    rollouts = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"--samples {path}:{line_no}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SamplesFileError(f"{where}: invalid JSON ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise SamplesFileError(f"{where}: a row must be a JSON object")
        prompt_ids = _ids(row, "prompt_ids", where)
        if not prompt_ids:
            raise SamplesFileError(f"{where}: 'prompt_ids' is empty")
        rollouts.append(
            Rollout(
                int(row.get("prompt_index", len(rollouts))),
                int(row.get("sample", 0)),
                prompt_ids,
                _ids(row, "response_ids", where),
                str(row.get("finish_reason", "length")),
            )
        )
    if not rollouts:
        raise SamplesFileError(f"--samples {path}: no rows")
    return rollouts


def sample_rollouts(
    prompts: Sequence[Prompt], server: ServerOptions, sampling: SamplingConfig, progress: bool
) -> list[Rollout]:
    """Start (or attach to) the servers, sample ``sampling.n`` responses per prompt on one event
    loop (seeded from ``sampling.sampling_seed``), stop the launched servers, and return the
    rollouts in prompt order."""
    from tqdm import tqdm

    from oprd_mega.rollout.client import RolloutClient
    from oprd_mega.rollout.sampling import sample_groups
    from oprd_mega.rollout.servers import LaunchConfig, ServerGroup

    bar = tqdm(total=len(prompts), desc="rollouts", unit="prompt", disable=not progress)

    async def every(urls: list[str]) -> list[list[Any]]:
        async with RolloutClient(urls) as client:
            prompt_ids = [p.prompt_ids for p in prompts]
            return await sample_groups(client, prompt_ids, sampling, on_prompt_done=bar.update)

    if server.urls:
        servers = ServerGroup.attach(server.urls, health_timeout_s=server.health_timeout_s)
    else:
        launch = LaunchConfig(
            model_path=server.model_path,
            backend=server.backend,  # type: ignore[arg-type]
            base_port=server.port,
            log_dir=server.log_dir,
            health_timeout_s=server.health_timeout_s,
        )
        servers = ServerGroup.launch(launch)
    try:
        with servers:
            groups = asyncio.run(every(servers.urls))
    finally:
        bar.close()
    return [
        Rollout(prompt.index, s.index, tuple(s.prompt_ids), tuple(s.response_ids), s.finish_reason)
        for prompt, group in zip(prompts, groups, strict=True)
        for s in group
    ]


def same_vocabulary(student_tokenizer: Any, teacher_tokenizer: Any) -> bool:
    """Whether both tokenizers map the same strings to the same ids (then one tokenization)."""
    return bool(student_tokenizer.get_vocab() == teacher_tokenizer.get_vocab())


def paired_sequences(rollouts: Sequence[Rollout], spec: PositionSpec) -> list[PairedSequence]:
    """Same tokenizer: the teacher reads the student's tokens at the same positions."""
    return [same_tokenizer_sequence(r.prompt_ids, r.response_ids, spec) for r in rollouts]
