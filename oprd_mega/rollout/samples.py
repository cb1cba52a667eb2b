"""One rollout sample and its parsing from SGLang's native /generate response."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

FINISH_TYPES = ("stop", "length", "abort")


class MalformedResponseError(RuntimeError):
    """A server answered /generate with JSON that does not match SGLang's response shape."""


@dataclass(frozen=True)
class Sample:
    """One sampled response to one prompt.

    ``group_id`` identifies the prompt (the ``n`` samples of one prompt share it) and
    ``index`` is the sample's position in its group. ``response_logprobs[i]`` is the log-prob
    the server assigned to ``response_ids[i]`` when it sampled it.
    """

    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    response_logprobs: tuple[float, ...]
    finish_reason: str
    weight_version: str | None
    group_id: int
    index: int = 0
    server: str | None = None

    def __post_init__(self) -> None:
        if len(self.response_ids) != len(self.response_logprobs):
            raise ValueError(
                f"sample (group {self.group_id}, index {self.index}): "
                f"{len(self.response_ids)} response ids but "
                f"{len(self.response_logprobs)} log-probs"
            )
        if self.finish_reason not in FINISH_TYPES:
            raise ValueError(
                f"sample (group {self.group_id}): finish_reason {self.finish_reason!r} is not "
                f"one of {FINISH_TYPES}"
            )

    @property
    def prompt_length(self) -> int:
        """Number of prompt tokens."""
        return len(self.prompt_ids)

    @property
    def response_length(self) -> int:
        """Number of response tokens."""
        return len(self.response_ids)

    @property
    def total_length(self) -> int:
        """Prompt plus response tokens: what the trainer packs."""
        return len(self.prompt_ids) + len(self.response_ids)

    @property
    def token_ids(self) -> tuple[int, ...]:
        """Prompt followed by response."""
        return self.prompt_ids + self.response_ids


def _field(obj: Any, key: str, where: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise MalformedResponseError(f"{where}: missing field {key!r}")
    return obj[key]


def parse_generate_output(
    output: Any,
    prompt_ids: Sequence[int],
    group_id: int,
    index: int,
    server: str,
) -> Sample:
    """Turn one element of a /generate answer into a :class:`Sample`, checking its shape.

    Raises :class:`MalformedResponseError` naming the server and the field that is wrong.
    """
    where = f"/generate answer from {server} (sample {index} of group {group_id})"
    output_ids = _field(output, "output_ids", where)
    meta = _field(output, "meta_info", where)
    if not isinstance(output_ids, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in output_ids
    ):
        raise MalformedResponseError(f"{where}: output_ids must be a list of integers")
    entries = _field(meta, "output_token_logprobs", f"{where} meta_info")
    if not isinstance(entries, list) or len(entries) != len(output_ids):
        got = len(entries) if isinstance(entries, list) else type(entries).__name__
        raise MalformedResponseError(
            f"{where}: meta_info.output_token_logprobs has {got} entries for "
            f"{len(output_ids)} output_ids"
        )
    logprobs: list[float] = []
    for pos, (entry, token) in enumerate(zip(entries, output_ids, strict=True)):
        if not isinstance(entry, list) or len(entry) != 3:
            raise MalformedResponseError(
                f"{where}: meta_info.output_token_logprobs[{pos}] must be "
                "[logprob, token_id, text_or_null]"
            )
        logprob, token_id = entry[0], entry[1]
        if token_id != token:
            raise MalformedResponseError(
                f"{where}: meta_info.output_token_logprobs[{pos}] is for token {token_id} "
                f"but output_ids[{pos}] is {token}"
            )
        if not isinstance(logprob, int | float) or isinstance(logprob, bool):
            raise MalformedResponseError(
                f"{where}: meta_info.output_token_logprobs[{pos}] log-prob is {logprob!r}"
            )
        if math.isnan(logprob) or logprob > 1e-4:
            raise MalformedResponseError(
                f"{where}: meta_info.output_token_logprobs[{pos}] log-prob {logprob} is not <= 0"
            )
        logprobs.append(float(logprob))
    finish = _field(meta, "finish_reason", f"{where} meta_info")
    finish_type = finish.get("type") if isinstance(finish, dict) else None
    if finish_type not in FINISH_TYPES:
        raise MalformedResponseError(
            f"{where}: meta_info.finish_reason {finish!r} has no type in {FINISH_TYPES}"
        )
    version = meta.get("weight_version")
    if version is not None and not isinstance(version, str):
        raise MalformedResponseError(f"{where}: meta_info.weight_version must be a string")
    return Sample(
        prompt_ids=tuple(int(t) for t in prompt_ids),
        response_ids=tuple(output_ids),
        response_logprobs=tuple(logprobs),
        finish_reason=finish_type,
        weight_version=version,
        group_id=group_id,
        index=index,
        server=server,
    )


class StaleRolloutError(RuntimeError):
    """Samples were generated with weights other than the ones the trainer expects."""


def require_weight_version(samples: Sequence[Sample], version: str) -> None:
    """Raise :class:`StaleRolloutError` if any sample's weight version is not ``version``.

    The message counts the stale samples per server and version, so the lagging server is named.
    """
    stale: dict[tuple[str | None, str | None], int] = {}
    for sample in samples:
        if sample.weight_version != version:
            key = (sample.server, sample.weight_version)
            stale[key] = stale.get(key, 0) + 1
    if stale:
        details = ", ".join(
            f"{count} from {server or 'unknown server'} at {found!r}"
            for (server, found), count in sorted(stale.items(), key=str)
        )
        raise StaleRolloutError(
            f"{sum(stale.values())} of {len(samples)} samples were not generated with weight "
            f"version {version!r}: {details}"
        )
