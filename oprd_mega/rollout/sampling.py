"""SGLang sampling parameters (validated), seeded sampling of prompts through a client, and
batched next-token selection."""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from oprd_mega.rollout.client import RolloutClient
    from oprd_mega.rollout.samples import Sample

# Every key SGLang 0.5.23's SamplingParams accepts; anything else is an HTTP 400 there too.
SGLANG_SAMPLING_KEYS = frozenset(
    {
        "max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p",
        "top_k", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty",
        "min_new_tokens", "n", "json_schema", "regex", "ebnf", "structural_tag", "ignore_eos",
        "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim",
        "stream_interval", "logit_bias", "sampling_seed", "custom_params", "beam_width",
        "watermark", "choice",
    }
)  # fmt: skip

# Keys SGLang accepts that the embedded server only takes at their neutral value.
_NEUTRAL = {
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "repetition_penalty": 1.0,
    "json_schema": None,
    "regex": None,
    "ebnf": None,
    "structural_tag": None,
    "stop_regex": None,
    "logit_bias": {},
    "beam_width": None,
    "watermark": None,
    "choice": [],
}
_TOP_K_ALL = 1 << 30
_SAMPLING_EPS = 1e-6  # SGLang's: a temperature below it is greedy


class SamplingParamsError(ValueError):
    """A ``sampling_params`` field is unknown, unsupported or out of range (HTTP 400)."""


@dataclass(frozen=True)
class SamplingConfig:
    """One request's validated sampling parameters."""

    max_new_tokens: int | None = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    min_new_tokens: int = 0
    n: int = 1
    stop: tuple[str, ...] = ()
    stop_token_ids: frozenset[int] = field(default_factory=frozenset)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    sampling_seed: int | None = None

    @property
    def greedy(self) -> bool:
        """Temperature 0 (or top_k 1) means argmax, as in SGLang."""
        return self.temperature == 0.0 or self.top_k == 1


def _number(params: dict[str, Any], key: str, default: float) -> float:
    value = params.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SamplingParamsError(f"sampling_params.{key} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise SamplingParamsError(f"sampling_params.{key} must be finite, got {value!r}")
    return float(value)


def _integer(params: dict[str, Any], key: str, default: int | None) -> int | None:
    value = params.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise SamplingParamsError(f"sampling_params.{key} must be an integer, got {value!r}")
    return value


def parse_sampling_params(params: Any) -> SamplingConfig:
    """Validate a request's ``sampling_params`` object the way SGLang does."""
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise SamplingParamsError("sampling_params must be a JSON object")
    unknown = sorted(set(params) - SGLANG_SAMPLING_KEYS)
    if unknown:
        raise SamplingParamsError(f"unknown field(s) in sampling_params: {', '.join(unknown)}")
    for key, neutral in _NEUTRAL.items():
        if key in params and params[key] is not None and params[key] != neutral:
            raise SamplingParamsError(
                f"sampling_params.{key}={params[key]!r} is not supported by the embedded server"
            )
    # Read only by a custom logit processor (which the embedded server refuses): SGLang
    # ignores the keys it has no use for, e.g. slime's {"return_top_p_token_ids": true}.
    custom = params.get("custom_params")
    if custom is not None and not isinstance(custom, dict):
        raise SamplingParamsError(
            f"sampling_params.custom_params must be a JSON object, got {custom!r}"
        )
    max_new = _integer(params, "max_new_tokens", 128)
    if "max_new_tokens" in params and params["max_new_tokens"] is None:
        max_new = None
    temperature = _number(params, "temperature", 1.0)
    top_p = _number(params, "top_p", 1.0)
    top_k = _integer(params, "top_k", -1)
    min_p = _number(params, "min_p", 0.0)
    min_new = _integer(params, "min_new_tokens", 0)
    n = _integer(params, "n", 1)
    assert top_k is not None and min_new is not None and n is not None
    # As SGLang's SamplingParams: top_k must be -1 (all) or at least 1, except that a temperature
    # below its epsilon is greedy, top_k set to 1 before the check.
    if top_k == 0 and 0 <= temperature < _SAMPLING_EPS:
        top_k = 1
    if top_k >= _TOP_K_ALL:
        top_k = -1
    if max_new is not None and max_new < 0:
        raise SamplingParamsError(f"sampling_params.max_new_tokens must be >= 0, got {max_new}")
    if temperature < 0:
        raise SamplingParamsError(f"sampling_params.temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise SamplingParamsError(f"sampling_params.top_p must be in (0, 1], got {top_p}")
    if top_k < -1 or top_k == 0:
        raise SamplingParamsError(
            f"sampling_params.top_k must be -1 (disable) or at least 1, got {top_k}"
        )
    if not 0 <= min_p <= 1:
        raise SamplingParamsError(f"sampling_params.min_p must be in [0, 1], got {min_p}")
    if min_new < 0:
        raise SamplingParamsError(f"sampling_params.min_new_tokens must be >= 0, got {min_new}")
    if n < 1:
        raise SamplingParamsError(f"sampling_params.n must be >= 1, got {n}")
    stop = params.get("stop") or ()
    if isinstance(stop, str):
        stop = (stop,)
    if not all(isinstance(s, str) and s for s in stop):
        raise SamplingParamsError("sampling_params.stop must be a string or a list of strings")
    stop_ids = params.get("stop_token_ids") or ()
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in stop_ids):
        raise SamplingParamsError("sampling_params.stop_token_ids must be a list of integers")
    seed = _integer(params, "sampling_seed", None)
    return SamplingConfig(
        max_new_tokens=max_new,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        min_new_tokens=min_new,
        n=n,
        stop=tuple(stop),
        stop_token_ids=frozenset(stop_ids),
        ignore_eos=bool(params.get("ignore_eos") or False),
        skip_special_tokens=bool(params.get("skip_special_tokens", True)),
        no_stop_trim=bool(params.get("no_stop_trim") or False),
        sampling_seed=seed,
    )


def request_params(config: SamplingConfig, sampling_seed: int | None = None) -> dict[str, Any]:
    """``config`` as a /generate ``sampling_params`` object (the inverse of
    :func:`parse_sampling_params`); ``sampling_seed`` replaces the config's own when given."""
    params: dict[str, Any] = {
        "max_new_tokens": config.max_new_tokens,
        "temperature": config.temperature,
        "top_p": config.top_p,
        "top_k": config.top_k,
        "min_p": config.min_p,
        "min_new_tokens": config.min_new_tokens,
        "n": config.n,
        "ignore_eos": config.ignore_eos,
        "skip_special_tokens": config.skip_special_tokens,
        "no_stop_trim": config.no_stop_trim,
    }
    if config.stop:
        params["stop"] = list(config.stop)
    if config.stop_token_ids:
        params["stop_token_ids"] = sorted(config.stop_token_ids)
    seed = config.sampling_seed if sampling_seed is None else sampling_seed
    if seed is not None:
        params["sampling_seed"] = seed
    return params


_SEED_MODULUS = 2**62


def prompt_seed(base: int, step: int, group: int) -> int:
    """The sampling seed of prompt ``group`` at ``step`` (the server adds the sample index)."""
    return (base * 1_000_003 + step * 65_537 + group * 1_009) % _SEED_MODULUS


def continuation_seed(base: int, version: int, group: int, sample: int, generated: int) -> int:
    """The sampling seed of one request continuing (or restarting) sample ``sample`` of group
    ``group`` under weights ``version`` from its first ``generated`` tokens: a hash of all five,
    so no two such requests of a run share a random stream (a linear mix like
    :func:`prompt_seed` would repeat across combinations)."""
    key = f"{base}/{version}/{group}/{sample}/{generated}".encode()
    digest = hashlib.blake2b(key, digest_size=8, person=b"oprd-cont").digest()
    return int.from_bytes(digest, "little") % _SEED_MODULUS


async def sample_groups(
    client: RolloutClient,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingConfig,
    step: int = 0,
    first_group: int = 0,
    on_prompt_done: Callable[[], object] | None = None,
) -> list[list[Sample]]:
    """``sampling.n`` responses to every prompt, sampled concurrently, in prompt order.

    Prompt ``i`` is group ``first_group + i``. ``sampling.sampling_seed`` is the base seed:
    the group is sampled with :func:`prompt_seed` (base, ``step``, group), so a re-run (or a
    resumed run) samples the same responses; None leaves the requests unseeded.
    ``on_prompt_done`` is called as each prompt's group arrives (a progress bar).
    """
    base = sampling.sampling_seed

    async def one(index: int, prompt_ids: Sequence[int]) -> list[Sample]:
        group = first_group + index
        seed = None if base is None else prompt_seed(base, step, group)
        samples = await client.generate(prompt_ids, request_params(sampling, seed), group)
        if on_prompt_done is not None:
            on_prompt_done()
        return samples

    return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))


def select_tokens(
    logits: torch.Tensor,
    configs: list[SamplingConfig],
    generators: list[torch.Generator],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose one token per row of ``logits`` ``[batch, vocab]``; return ``(tokens, logprobs)``.

    The returned log-prob of each chosen token is taken from ``log_softmax(logits / T)`` (the
    raw ``log_softmax(logits)`` for greedy rows), before top-k/top-p/min-p truncation, which is
    what SGLang reports by default. Sampling itself draws from the truncated, renormalized
    distribution with each row's own generator.
    """
    logits = logits.float()
    batch, vocab = logits.shape
    temps = torch.tensor([1.0 if c.greedy else c.temperature for c in configs])
    logprobs = torch.log_softmax(logits / temps[:, None], dim=-1)
    tokens = torch.empty(batch, dtype=torch.long)
    sampled_rows = [r for r, c in enumerate(configs) if not c.greedy]
    for r, c in enumerate(configs):
        if c.greedy:
            tokens[r] = int(torch.argmax(logits[r]))
    if sampled_rows:
        rows = torch.tensor(sampled_rows)
        probs = logprobs[rows].exp()
        sorted_probs, sorted_idx = probs.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab)[None, :]
        top_k = torch.tensor([configs[r].top_k if configs[r].top_k > 0 else vocab for r in rows])
        top_p = torch.tensor([configs[r].top_p for r in sampled_rows])
        min_p = torch.tensor([configs[r].min_p for r in sampled_rows])
        cumulative = sorted_probs.cumsum(dim=-1)
        drop = ranks >= top_k[:, None]
        drop |= (cumulative - sorted_probs) > top_p[:, None]
        drop |= sorted_probs < (min_p * sorted_probs[:, 0])[:, None]
        drop[:, 0] = False  # the most likely token always survives
        kept = sorted_probs.masked_fill(drop, 0.0)
        for j, r in enumerate(sampled_rows):
            choice = torch.multinomial(kept[j], 1, generator=generators[r])
            tokens[r] = sorted_idx[j, choice[0]]
    chosen = logprobs.gather(1, tokens[:, None]).squeeze(1)
    return tokens, chosen
