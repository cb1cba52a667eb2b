"""The embedded server's generation engine: a transformers model, continuous batching on CPU.

Requests wait in a queue; a worker thread decodes the running sequences together, one token
per step, with a shared left-padded KV cache. At every step, sequences that arrived meanwhile
join the running batch (their prefill runs then, and their KV cache is merged into the
batch's), and finished sequences leave it at once, so a short request never waits for a long
one and a health check is answered within a step. Weight updates wait until no sequence runs
(new ones are held meanwhile, as SGLang's update lock does), unless generation is paused (SGLang's
/pause_generation): ``abort`` ends every sequence, ``retract`` puts running sequences back in
the queue with their tokens so far (re-prefilled after /continue_generation), ``in_place``
holds them, KV cache and all, between two decoding steps. While paused nothing new starts.
"""

from __future__ import annotations

import inspect
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from oprd_mega.lifetime import make_owned_temp_dir, remove_stale_temp_dirs
from oprd_mega.rollout.sampling import SamplingConfig, select_tokens
from oprd_mega.rollout.weight_checker import WeightChecker


@dataclass(eq=False)
class SequenceJob:
    """One sequence to generate (a request with ``n`` samples makes ``n`` jobs)."""

    input_ids: list[int]
    config: SamplingConfig
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    return_text_in_logprobs: bool = False
    seed: int = 0
    rid: str = field(default_factory=lambda: uuid.uuid4().hex)
    future: Future = field(default_factory=Future)
    submitted: float = field(default_factory=time.perf_counter)
    # Called from the worker with the job and its token count after every token that does
    # not finish it (streaming: the answer brings the last one); must not block.
    on_token: Callable[[SequenceJob, int], None] | None = None
    stream_interval: int = 1  # call on_token every this many tokens (sampling_params)
    # Set by GenerationEngine.abort; the decoding loop ends the sequence at its next step.
    abort_message: str | None = None
    running: bool = False
    first_token_at: float | None = None  # perf_counter() when the first output token came
    # Progress so far, kept on the job so that a retracted sequence resumes where it stopped.
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    output_tops: list[list[list[Any]]] = field(default_factory=list)
    input_logprobs: list[list[Any]] | None = None
    # Set when the sequence joins a batch: its sampling stream and its token limit.
    generator: torch.Generator | None = None
    limit: int = 0


@dataclass
class _Batch:
    """The sequences decoding together; row ``r`` of every tensor belongs to ``jobs[r]``.

    ``mask`` is ``[rows, width]`` (1 at tokens, 0 at left padding), matching the KV cache's
    ``width`` positions; ``positions`` ``[rows]`` is each row's last position id; ``logits``
    ``[rows, vocab]`` are the next-token logits (float32).
    """

    jobs: list[SequenceJob]
    cache: Any
    mask: torch.Tensor
    positions: torch.Tensor
    logits: torch.Tensor


def _left_pad(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """``tensor`` with zeros prepended along ``dim`` up to ``width``."""
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def merge_batches(a: _Batch, b: _Batch) -> _Batch:
    """One batch of ``a``'s rows then ``b``'s: both left-padded to the wider KV cache.

    Padding is masked out, and rotary positions are already applied to the cached keys, so
    every row attends exactly as before. ``a``'s cache is updated in place and kept.
    """
    width = max(a.mask.shape[1], b.mask.shape[1])
    for layer_a, layer_b in zip(a.cache.layers, b.cache.layers, strict=True):
        layer_a.keys = torch.cat(
            [_left_pad(layer_a.keys, width, -2), _left_pad(layer_b.keys, width, -2)], dim=0
        )
        layer_a.values = torch.cat(
            [_left_pad(layer_a.values, width, -2), _left_pad(layer_b.values, width, -2)], dim=0
        )
    return _Batch(
        jobs=a.jobs + b.jobs,
        cache=a.cache,
        mask=torch.cat([_left_pad(a.mask, width, 1), _left_pad(b.mask, width, 1)], dim=0),
        positions=torch.cat([a.positions, b.positions]),
        logits=torch.cat([a.logits, b.logits]),
    )


def select_rows(batch: _Batch, keep: list[int], trim: bool) -> _Batch:
    """The rows ``keep`` of ``batch`` (its cache reordered in place); with ``trim``, the left
    columns that are padding in every remaining row are cut from the mask and the cache."""
    index = torch.tensor(keep, dtype=torch.long)
    batch.cache.reorder_cache(index)
    mask = batch.mask[index]
    start = int(mask.any(dim=0).int().argmax()) if trim else 0
    if start:
        mask = mask[:, start:]
        for layer in batch.cache.layers:
            layer.keys = layer.keys[:, :, start:]
            layer.values = layer.values[:, :, start:]
    return _Batch(
        jobs=[batch.jobs[k] for k in keep],
        cache=batch.cache,
        mask=mask,
        positions=batch.positions[index],
        logits=batch.logits[index],
    )


PAUSE_MODES = ("abort", "retract", "in_place")
# Name of the owned temporary folders (oprd_mega.lifetime) holding released weights.
RELEASED_WEIGHTS = "oprd-released-weights"


def abort_finish(message: str) -> dict[str, Any]:
    """SGLang's ``FINISH_ABORT.to_json()``."""
    return {"type": "abort", "message": message, "status_code": None, "err_type": None}


def load_state_dict_from_dir(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor in the ``*.safetensors`` files of a directory (or one file)."""
    from safetensors.torch import load_file

    path = Path(path)
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(load_file(str(file)))
        except Exception as exc:  # safetensors' own error type: truncated, bad header, ...
            raise WeightCheckError(
                f"{file}: not a readable safetensors file ({type(exc).__name__}: {exc}); the "
                "weights being served are unchanged"
            ) from None
    return state


def _output_cache(output: Any) -> Any:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


class WeightCheckError(ValueError):
    """A weight update that would break the model; the message names the tensor."""


class MemoryReleasedError(RuntimeError):
    """Generation or a weight update asked for while memory is released."""


# Memory tags of SGLang's /release_memory_occupation (sglang/srt/constants.py).
MEMORY_TAGS = ("kv_cache", "weights", "cuda_graph")


class GenerationEngine:
    """Holds the model and tokenizer; decodes with continuous batching; applies weight updates.

    ``continuous=False`` admits new sequences only when the running batch is empty (one batch
    at a time, as before continuous batching; kept for benchmarks). Models whose KV cache is
    not transformers' plain ``DynamicLayer`` (sliding windows, quantised caches) always run
    one batch at a time, since their caches cannot be merged.
    """

    def __init__(
        self,
        model_path: str | Path,
        dtype: str = "float32",
        max_batch_size: int = 32,
        seed: int | None = None,
        weight_version: str = "default",
        batch_wait_s: float = 0.005,
        continuous: bool = True,
        memory_saver: bool = False,
        decode_step_delay_s: float = 0.0,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.cache_utils import DynamicLayer

        self.model_path = str(model_path)
        # Copies released by servers that were killed since (SIGKILL runs no cleanup).
        remove_stale_temp_dirs(Path(tempfile.gettempdir()), RELEASED_WEIGHTS)
        torch_dtype = getattr(torch, dtype, None)
        if not isinstance(torch_dtype, torch.dtype):
            raise ValueError(f"dtype {dtype!r} is not a torch dtype")
        self.model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch_dtype)
        self.model.eval()
        try:
            self.tokenizer: Any = AutoTokenizer.from_pretrained(self.model_path)
        except (OSError, ValueError):
            self.tokenizer = None  # token ids in, token ids out; text fields stay empty
        self.eos_ids = self._eos_ids()
        # transformers >= 5.2x names the KV cache argument `cache`; earlier `past_key_values`.
        forward_args = inspect.signature(self.model.forward).parameters
        self._cache_arg = "cache" if "cache" in forward_args else "past_key_values"
        self._keep_arg = "logits_to_keep" if "logits_to_keep" in forward_args else None
        self._mergeable_layer = DynamicLayer
        self.max_context = int(getattr(self.model.config, "max_position_embeddings", 1 << 20))
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self.continuous = continuous
        self.decode_step_delay_s = decode_step_delay_s
        # SGLang's --enable-memory-saver: without it /release_memory_occupation frees nothing.
        self.memory_saver = memory_saver
        self.weight_version = weight_version
        # Held by the worker while any sequence runs, and by weight updates and memory release.
        self.lock = threading.Lock()
        # The in_place hold waits on ``_cond``, which releases ``lock`` for weight updates.
        self._cond = threading.Condition(self.lock)
        self.paused: str | None = None
        # ``_jobs_lock`` guards the job lists, the pause mode and the writer count; ``_changed``
        # is notified on every change of them (a job queued or answered, pause, continue).
        self._jobs_lock = threading.Lock()
        self._changed = threading.Condition(self._jobs_lock)
        self._jobs: list[SequenceJob] = []  # every job not answered yet
        self._waiting: deque[SequenceJob] = deque()  # not running, in admission order
        self._writers = 0  # weight updates waiting for the running sequences to end
        self._held = False  # the decoding loop waits in an in_place pause
        self.stats = {
            "batches": 0,  # prefill forwards (each admits one or more sequences)
            "steps": 0,  # decoding forwards
            "sequences": 0,
            "max_batch": 0,  # the most sequences decoded in one step
            "tokens": 0,
        }
        # Without a seed, draw one: two servers must not sample the same streams.
        self.seed = seed if seed is not None else int.from_bytes(os.urandom(8)) >> 1
        self._rng = torch.Generator()
        self._rng.manual_seed(self.seed)
        self._stop = threading.Event()
        self._groups: dict[str, Any] = {}
        self.released: set[str] = set()  # memory tags given up by /release_memory_occupation
        self._spilled_weights: Path | None = None
        self._weight_checker = WeightChecker()
        self._worker = threading.Thread(target=self._loop, name="oprd-engine", daemon=True)
        self._worker.start()

    def _eos_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        for source in (getattr(self.model, "generation_config", None), self.model.config):
            eos = getattr(source, "eos_token_id", None)
            if isinstance(eos, int):
                ids.add(eos)
            elif isinstance(eos, list | tuple):
                ids.update(int(e) for e in eos)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return frozenset(ids)

    # ----- requests -----

    def next_seed(self) -> int:
        """A fresh seed for a sequence that did not ask for ``sampling_seed``."""
        return int(torch.randint(0, 2**62, (1,), generator=self._rng))

    def validate(self, job: SequenceJob) -> None:
        """Reject a sequence before it joins a batch, so one bad request fails alone."""
        if not job.input_ids:
            raise ValueError("input_ids must not be empty")
        vocab = int(self.model.get_input_embeddings().num_embeddings)
        bad = [t for t in job.input_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"input_ids contains token id {bad[0]} outside [0, {vocab})")
        if len(job.input_ids) >= self.max_context:
            raise ValueError(
                f"prompt of {len(job.input_ids)} tokens does not fit the context length "
                f"{self.max_context}"
            )
        if job.config.stop and self.tokenizer is None:
            raise ValueError("sampling_params.stop needs a tokenizer in the model directory")

    def submit(self, jobs: Iterable[SequenceJob]) -> list[Future]:
        """Validate and queue sequences; each future resolves to that sequence's answer."""
        jobs = list(jobs)
        self.raise_if_released()
        for job in jobs:
            self.validate(job)
        with self._changed:
            self._jobs.extend(jobs)
            self._waiting.extend(jobs)
            self._changed.notify_all()
        return [job.future for job in jobs]

    # ----- abort and pause (SGLang's /abort_request, /pause_generation, /continue_generation) --

    def abort(
        self,
        rid: str = "",
        abort_all: bool = False,
        jobs: Iterable[SequenceJob] = (),
        message: str = "Aborted",
    ) -> int:
        """End matching sequences with ``finish_reason.type == "abort"``; they keep their tokens.

        A sequence matches when ``abort_all``, when it is in ``jobs``, or when its rid starts
        with a non-empty ``rid`` (as SGLang's scheduler matches, so ``R`` also ends ``R_0``...).
        Waiting sequences are answered now; running ones at their next decoding step.
        Returns how many sequences were aborted.
        """
        chosen = {id(j) for j in jobs}
        answered = []
        with self._changed:
            for job in self._jobs:
                if not (abort_all or id(job) in chosen or (rid and job.rid.startswith(rid))):
                    continue
                job.abort_message = job.abort_message or message
                if not job.running:
                    answered.append(job)
            for job in answered:
                self._waiting.remove(job)
            count = len(answered) + sum(1 for j in self._jobs if j.abort_message and j.running)
        for job in answered:
            self._answer(job, self._response(job, abort_finish(job.abort_message or message)))
        return count

    def pause(self, mode: str = "abort") -> None:
        """Stop decoding until :meth:`resume`; ``mode`` is one of SGLang's :data:`PAUSE_MODES`.

        From the moment this is called no sequence starts, whenever it arrives, until
        :meth:`resume`. Returns once no sequence is decoding any more: with ``abort`` and
        ``retract`` none runs, with ``in_place`` the running ones wait between two steps. A
        weight update that follows never meets a decoding step.
        """
        if mode not in PAUSE_MODES:
            raise ValueError(f"mode must be one of {', '.join(PAUSE_MODES)}, got {mode!r}")
        with self._changed:
            self.paused = mode
            self._changed.notify_all()
        if mode == "abort":
            self.abort(abort_all=True)
        with self._changed:
            while (
                any(j.running for j in self._jobs)
                and not (mode == "in_place" and self._held)
                and self.paused == mode
                and not self._stop.is_set()
            ):
                self._changed.wait(timeout=0.05)

    def resume(self) -> None:
        """Continue decoding after :meth:`pause` (retracted sequences go first)."""
        with self._changed:
            self.paused = None
            self._changed.notify_all()

    def load(self) -> dict[str, int]:
        """Running and waiting sequences and the tokens the running ones hold (prompt and
        output so far), as SGLang's /v1/loads counts them."""
        with self._jobs_lock:
            running = [j for j in self._jobs if j.running]
            return {
                "num_running_reqs": len(running),
                "num_waiting_reqs": len(self._jobs) - len(running),
                "num_used_tokens": sum(len(j.input_ids) + len(j.output_ids) for j in running),
            }

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the engine with no sequence decoding: wait until the running ones end (or are
        held by an in_place pause), admitting no new one meanwhile, as SGLang's update lock
        makes a weight update wait for the requests in flight and hold the ones after it."""
        with self._changed:
            self._writers += 1
        try:
            with self.lock:
                yield
        finally:
            with self._changed:
                self._writers -= 1
                self._changed.notify_all()

    def _answer(self, job: SequenceJob, result: dict[str, Any] | BaseException) -> None:
        with self._changed:
            if job in self._jobs:
                self._jobs.remove(job)
            job.running = False
            self._changed.notify_all()
        if job.future.done():
            return
        if isinstance(result, BaseException):
            job.future.set_exception(result)
        else:
            job.future.set_result(result)

    def _set_held(self, held: bool) -> None:
        with self._changed:
            self._held = held
            self._changed.notify_all()

    def close(self) -> None:
        """Stop the worker; every sequence not answered yet ends as aborted."""
        self.abort(abort_all=True, message="server shutting down")
        self._stop.set()
        self._worker.join(timeout=10)
        with self._changed:
            left = list(self._jobs)
        for job in left:
            self._answer(job, RuntimeError("server shutting down"))
        if self._spilled_weights is not None:
            shutil.rmtree(self._spilled_weights.parent, ignore_errors=True)

    # ----- the worker: admission and the decoding loop -----

    def _admissible(self) -> bool:
        """Whether a waiting sequence may start now (call with ``_jobs_lock`` held)."""
        return (
            bool(self._waiting)
            and self.paused is None
            and self._writers == 0
            and not self._stop.is_set()
        )

    def _admit(self, slots: int, gather: bool) -> list[SequenceJob]:
        """Take up to ``slots`` waiting sequences and mark them running; with ``gather``, wait
        up to ``batch_wait_s`` for more to arrive, so that a burst is prefilled together."""
        with self._changed:
            if gather and self._admissible():
                deadline = time.perf_counter() + self.batch_wait_s
                while len(self._waiting) < slots and self._admissible():
                    remaining = deadline - time.perf_counter()
                    if remaining <= 0:
                        break
                    self._changed.wait(timeout=remaining)
            jobs: list[SequenceJob] = []
            while len(jobs) < slots and self._admissible():
                job = self._waiting.popleft()
                job.running = True
                jobs.append(job)
            return jobs

    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._changed:
                if not self._admissible():
                    self._changed.wait(timeout=0.05)
                    continue
            with self.lock:
                self._run()

    def _mergeable(self, cache: Any) -> bool:
        layers = getattr(cache, "layers", None)
        return layers is not None and all(type(x) is self._mergeable_layer for x in layers)

    def _run(self) -> None:
        """Decode until no sequence runs (called with ``lock`` held): each step ends aborted
        sequences, honours a pause, admits waiting sequences, then picks every row's token."""
        batch: _Batch | None = None
        while not self._stop.is_set():
            try:
                if batch is not None and self.paused == "in_place":
                    self._set_held(True)
                    while self.paused == "in_place" and not self._stop.is_set():
                        self._cond.wait(timeout=0.05)  # hold the KV cache; updates may run
                    self._set_held(False)
                if batch is not None:
                    aborted = {
                        r: abort_finish(job.abort_message)
                        for r, job in enumerate(batch.jobs)
                        if job.abort_message is not None
                    }
                    batch = self._retire(batch, aborted)
                if batch is not None and self.paused == "retract":
                    self._retract(batch.jobs)
                    batch = None
                if batch is None or (self.continuous and self._mergeable(batch.cache)):
                    rows = 0 if batch is None else len(batch.jobs)
                    joining = self._admit(self.max_batch_size - rows, gather=batch is None)
                    if joining:
                        batch = self._join(batch, joining)
                if batch is None:
                    return
                batch = self._step(batch)
            except Exception as exc:  # a failed step fails its sequences, not the server
                failed = [] if batch is None else list(batch.jobs)
                failed += [j for j in self._running_jobs() if j not in failed]
                for job in failed:
                    self._answer(job, exc)
                batch = None
        if batch is not None:  # closing: the running sequences end as aborted, tokens kept
            reason = abort_finish("server shutting down")
            self._retire(batch, dict.fromkeys(range(len(batch.jobs)), reason))

    def _running_jobs(self) -> list[SequenceJob]:
        with self._jobs_lock:
            return [j for j in self._jobs if j.running]

    def _retract(self, jobs: list[SequenceJob]) -> None:
        """Put running sequences back at the head of the queue, their tokens kept."""
        with self._changed:
            for job in reversed(jobs):
                job.running = False
                self._waiting.appendleft(job)
            self._changed.notify_all()

    def _join(self, batch: _Batch | None, jobs: list[SequenceJob]) -> _Batch | None:
        """Prefill ``jobs`` and add them to ``batch``; jobs with nothing left to generate
        (``max_new_tokens`` 0) are answered at once."""
        joined = self._prefill(jobs)
        done = {
            r: {"type": "length", "length": len(job.output_ids)}
            for r, job in enumerate(joined.jobs)
            if len(job.output_ids) >= job.limit
        }
        joined = self._retire(joined, done)
        if joined is None:
            return batch
        return joined if batch is None else merge_batches(batch, joined)

    def _retire(self, batch: _Batch, finished: dict[int, dict[str, Any]]) -> _Batch | None:
        """Answer the rows in ``finished`` (row -> finish reason) and drop them from the batch;
        None when no row is left."""
        if not finished:
            return batch
        now = time.perf_counter()
        for r, reason in finished.items():
            job = batch.jobs[r]
            self.stats["tokens"] += len(job.output_ids)
            self._answer(job, self._response(job, reason, now))
        keep = [r for r in range(len(batch.jobs)) if r not in finished]
        if not keep:
            return None
        return select_rows(batch, keep, trim=self._mergeable(batch.cache))

    # ----- decoding -----

    @torch.inference_mode()
    def _prefill(self, jobs: list[SequenceJob]) -> _Batch:
        """One forward over the jobs' contexts (prompt plus any tokens kept from a retract),
        left-padded to the longest; sets each job's generator and token limit."""
        self.raise_if_released()  # queued before a release
        self.stats["batches"] += 1
        self.stats["sequences"] += len(jobs)
        contexts = [j.input_ids + j.output_ids for j in jobs]
        lengths = [len(c) for c in contexts]
        width = max(lengths)
        input_ids = torch.zeros((len(jobs), width), dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for r, context in enumerate(contexts):
            input_ids[r, width - lengths[r] :] = torch.tensor(context)
            mask[r, width - lengths[r] :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        for job in jobs:
            # A resumed job draws from its generator past the tokens it already has.
            job.generator = torch.Generator().manual_seed(job.seed + len(job.output_ids))
            max_new = job.config.max_new_tokens
            job.limit = min(
                max_new if max_new is not None else 1 << 30, self.max_context - len(job.input_ids)
            )
        wants_input = any(
            j.return_logprob and j.logprob_start_len >= 0 and not j.input_logprobs for j in jobs
        )
        keep = {self._keep_arg: 1} if self._keep_arg and not wants_input else {}
        out = self.model(
            input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, **keep
        )
        all_logits = out.logits.float()
        if wants_input:
            self._input_logprobs(jobs, all_logits, lengths, width)
        return _Batch(
            jobs=list(jobs),
            cache=_output_cache(out),
            mask=mask,
            positions=positions[:, -1],
            logits=all_logits[:, -1, :],
        )

    @torch.inference_mode()
    def _step(self, batch: _Batch) -> _Batch | None:
        """Pick every row's next token, answer the rows that finish, and run one decoding
        forward for the others; None when no row is left."""
        jobs = batch.jobs
        logits = batch.logits.clone()
        for k, job in enumerate(jobs):
            if len(job.output_ids) < job.config.min_new_tokens:
                blocked = set(job.config.stop_token_ids)
                if not job.config.ignore_eos:
                    blocked |= self.eos_ids
                if blocked:
                    logits[k, list(blocked)] = float("-inf")
        generators = [j.generator for j in jobs]
        tokens, chosen = select_tokens(logits, [j.config for j in jobs], generators)  # type: ignore[arg-type]
        if any(j.top_logprobs_num > 0 for j in jobs):
            temps = [1.0 if j.config.greedy else j.config.temperature for j in jobs]
            full = torch.log_softmax(logits / torch.tensor(temps)[:, None], dim=-1)
        now = time.perf_counter()
        finished: dict[int, dict[str, Any]] = {}
        for k, job in enumerate(jobs):
            token = int(tokens[k])
            job.output_ids.append(token)
            job.output_logprobs.append(float(chosen[k]))
            if job.first_token_at is None:
                job.first_token_at = now
            if job.top_logprobs_num > 0:
                values, ids = full[k].topk(job.top_logprobs_num)
                job.output_tops.append(
                    [
                        [float(v), int(i), self._token_text(int(i), job.return_text_in_logprobs)]
                        for v, i in zip(values, ids, strict=True)
                    ]
                )
            reason = self._finish(job, job.output_ids, token, job.limit)
            if reason is not None:
                finished[k] = reason
            elif job.on_token is not None and len(job.output_ids) % job.stream_interval == 0:
                job.on_token(job, len(job.output_ids))
        self.stats["max_batch"] = max(self.stats["max_batch"], len(jobs))
        rest = self._retire(batch, finished)
        if rest is None:
            return None
        mask = torch.cat([rest.mask, torch.ones((len(rest.jobs), 1), dtype=torch.long)], dim=1)
        positions = rest.positions + 1
        next_tokens = torch.tensor([j.output_ids[-1] for j in rest.jobs], dtype=torch.long)
        out = self.model(
            input_ids=next_tokens[:, None],
            attention_mask=mask,
            position_ids=positions[:, None],
            use_cache=True,
            **{self._cache_arg: rest.cache},
        )
        self.stats["steps"] += 1
        if self.decode_step_delay_s > 0:
            time.sleep(self.decode_step_delay_s)
        return _Batch(
            jobs=rest.jobs,
            cache=_output_cache(out),
            mask=mask,
            positions=positions,
            logits=out.logits[:, -1, :].float(),
        )

    def _decode(self, ids: list[int], skip_special: bool = True) -> str:
        if self.tokenizer is None or not ids:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special)

    def _token_text(self, token: int, wanted: bool) -> str | None:
        if not wanted or self.tokenizer is None:
            return None
        return self.tokenizer.decode([token])

    def _input_logprobs(
        self, batch: list[SequenceJob], logits: torch.Tensor, lengths: list[int], width: int
    ) -> None:
        """Fill ``input_logprobs`` of the jobs that ask for them, at their first prefill."""
        for r, job in enumerate(batch):
            if not job.return_logprob or job.logprob_start_len < 0 or job.input_logprobs:
                continue
            offset = width - lengths[r]
            prompt_len = len(job.input_ids)
            row = torch.log_softmax(logits[r, offset:], dim=-1)
            entries: list[list[Any]] = []
            for pos in range(min(job.logprob_start_len, prompt_len), prompt_len):
                token = job.input_ids[pos]
                value = None if pos == 0 else float(row[pos - 1, token])
                entries.append([value, token, self._token_text(token, job.return_text_in_logprobs)])
            job.input_logprobs = entries

    def _finish(
        self, job: SequenceJob, output: list[int], token: int, limit: int
    ) -> dict[str, Any] | None:
        config = job.config
        if len(output) >= config.min_new_tokens:
            if token in config.stop_token_ids or (not config.ignore_eos and token in self.eos_ids):
                return {"type": "stop", "matched": token}
            if config.stop:
                text = self._decode(output, config.skip_special_tokens)
                for stop in config.stop:
                    if stop in text:
                        return {"type": "stop", "matched": stop}
        if len(output) >= limit:
            return {"type": "length", "length": len(output)}
        return None

    def _response(
        self, job: SequenceJob, finish: dict[str, Any], now: float | None = None
    ) -> dict[str, Any]:
        """SGLang's answer for one sequence, from the progress kept on ``job``."""
        answer = self.partial_response(job, len(job.output_ids), finish)
        now = now if now is not None else time.perf_counter()
        answer["meta_info"]["e2e_latency"] = now - job.submitted
        return answer

    def partial_response(
        self, job: SequenceJob, count: int, finish: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """The answer for the first ``count`` output tokens of ``job`` (a streaming chunk
        while ``finish`` is None: cumulative text, ids and log-probs, as SGLang streams)."""
        output = job.output_ids[:count]
        text = self._decode(output, job.config.skip_special_tokens)
        matched = (finish or {}).get("matched")
        if isinstance(matched, str) and not job.config.no_stop_trim:
            text = text[: text.find(matched)] if matched in text else text
        meta: dict[str, Any] = {
            "id": job.rid,
            "finish_reason": finish,
            "prompt_tokens": len(job.input_ids),
            "completion_tokens": len(output),
            "cached_tokens": 0,
            "weight_version": self.weight_version,
        }
        if job.return_logprob:
            meta["output_token_logprobs"] = [
                [lp, tok, self._token_text(tok, job.return_text_in_logprobs)]
                for lp, tok in zip(job.output_logprobs[:count], output, strict=True)
            ]
            meta["input_token_logprobs"] = job.input_logprobs or []
            if job.top_logprobs_num > 0:
                meta["output_top_logprobs"] = job.output_tops[:count]
        return {"text": text, "output_ids": output, "meta_info": meta}

    # ----- weights -----

    def load_weights(
        self, tensors: dict[str, torch.Tensor], source: str, complete: bool = False
    ) -> None:
        """Copy HF-named tensors into the model once all pass :meth:`check_weights`: a bad
        update copies nothing, so the old weights keep serving."""
        self.check_weights(tensors, source, complete)
        params = self._weight_tensors()
        with torch.no_grad():
            for name, tensor in tensors.items():
                params[name].copy_(tensor.to(params[name].dtype))

    def update_from_disk(self, model_path: str, weight_version: str | None) -> None:
        """Reload every safetensors tensor from ``model_path``, then set the version."""
        tensors = load_state_dict_from_dir(model_path)
        with self.exclusive():
            self.load_weights(tensors, source=model_path, complete=True)
            if weight_version is not None:
                self.weight_version = weight_version

    def init_group(
        self,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        group_name: str,
        backend: str,
    ) -> None:
        """Join the trainer's weight-update group as rank ``rank_offset`` (tensor parallel 1)."""
        from oprd_mega.rollout.process_group import init_custom_process_group

        if group_name in self._groups:
            raise ValueError(f"weight update group {group_name!r} already exists")
        self._groups[group_name] = init_custom_process_group(
            master_address, master_port, rank_offset, world_size, group_name, backend
        )

    def destroy_group(self, group_name: str) -> None:
        """Leave a weight-update group."""
        from oprd_mega.rollout.process_group import destroy_custom_process_group

        group = self._groups.pop(group_name, None)
        if group is None:
            raise ValueError(f"no weight update group {group_name!r}")
        destroy_custom_process_group(group)

    def update_from_distributed(
        self,
        names: list[str],
        dtypes: list[str],
        shapes: list[list[int]],
        group_name: str,
        weight_version: str | None,
    ) -> None:
        """Receive one bucket of tensors broadcast from rank 0 in ``names`` order, then load it."""
        import torch.distributed as dist

        group = self._groups.get(group_name)
        if group is None:
            raise ValueError(f"no weight update group {group_name!r}; call init first")
        if not len(names) == len(dtypes) == len(shapes):
            raise ValueError("names, dtypes and shapes must have the same length")
        with self.exclusive():
            received: dict[str, torch.Tensor] = {}
            for name, dtype, shape in zip(names, dtypes, shapes, strict=True):
                torch_dtype = getattr(torch, str(dtype).removeprefix("torch."), None)
                if not isinstance(torch_dtype, torch.dtype):
                    raise ValueError(f"tensor {name}: unknown dtype {dtype!r}")
                tensor = torch.empty(tuple(shape), dtype=torch_dtype)
                dist.broadcast(tensor, src=0, group=group)
                received[name] = tensor
            self.load_weights(received, source=f"group {group_name}")
            if weight_version is not None:
                self.weight_version = weight_version

    # ----- weight checks -----

    def weights_checker(self, action: str, skip_tensor_list: list[str] | None) -> dict[str, Any]:
        """SGLang's /weights_checker (see :mod:`oprd_mega.rollout.weight_checker`), once no
        sequence decodes, as every weight access here."""
        with self.exclusive():
            if "weights" in self.released:
                raise ValueError(
                    "weights_checker: the weights are released; call /resume_memory_occupation "
                    "first"
                )
            return self._weight_checker.handle(self.model, action, skip_tensor_list)

    def _weight_tensors(self) -> dict[str, torch.Tensor]:
        """Every loadable tensor by HF name, tied weights under each of their names."""
        tensors: dict[str, torch.Tensor] = dict(self.model.named_parameters(remove_duplicate=False))
        tensors.update(dict(self.model.named_buffers()))
        return tensors

    def _parameter_names(self) -> list[list[str]]:
        """The model's parameters, each as the list of names it goes by (tied: several)."""
        groups: dict[int, list[str]] = {}
        for name, param in self.model.named_parameters(remove_duplicate=False):
            groups.setdefault(id(param), []).append(name)
        return list(groups.values())

    def check_weights(
        self, tensors: dict[str, torch.Tensor], source: str, complete: bool = False
    ) -> None:
        """Reject an update before any of it is used: unknown names, other shapes, a dtype of
        another kind (integer for float), non-finite values, and, with ``complete``, any
        parameter of the model left out. Raises :class:`WeightCheckError` naming the tensor."""
        if "weights" in self.released:
            raise WeightCheckError(
                f"{source}: the weights are released; call /resume_memory_occupation first"
            )
        params = self._weight_tensors()
        unknown = sorted(set(tensors) - set(params))
        if unknown:
            raise WeightCheckError(
                f"{source}: tensor(s) not in the model: {', '.join(unknown[:5])}"
            )
        for name, tensor in tensors.items():
            target = params[name]
            if tuple(tensor.shape) != tuple(target.shape):
                raise WeightCheckError(
                    f"{source}: tensor {name} has shape {tuple(tensor.shape)}, the model's is "
                    f"{tuple(target.shape)}"
                )
            if tensor.is_floating_point() != target.is_floating_point():
                raise WeightCheckError(
                    f"{source}: tensor {name} has dtype {tensor.dtype}, the model's is "
                    f"{target.dtype}"
                )
            if tensor.is_floating_point():
                bad = int((~torch.isfinite(tensor)).sum())
                if bad:
                    raise WeightCheckError(
                        f"{source}: tensor {name} has {bad} non-finite value(s) (NaN or inf)"
                    )
        if complete:
            missing = [
                names[0] for names in self._parameter_names() if not set(names) & set(tensors)
            ]
            if missing:
                raise WeightCheckError(
                    f"{source}: {len(missing)} of the model's tensors are missing, e.g. "
                    f"{', '.join(missing[:5])}"
                )

    def update_from_tensor(
        self, named_tensors: list[tuple[str, torch.Tensor]], weight_version: str | None
    ) -> None:
        """Load tensors sent by /update_weights_from_tensor (any subset), then set the version."""
        tensors: dict[str, torch.Tensor] = {}
        for name, tensor in named_tensors:
            if name in tensors:
                raise WeightCheckError(f"update_weights_from_tensor: tensor {name} sent twice")
            tensors[name] = tensor
        with self.exclusive():
            self.load_weights(tensors, source="update_weights_from_tensor")
            if weight_version is not None:
                self.weight_version = weight_version

    # ----- memory release (colocated training) -----

    def raise_if_released(self) -> None:
        """Refuse generation while weights or KV cache are released."""
        if self.released & {"weights", "kv_cache"}:
            raise MemoryReleasedError(
                f"memory is released ({', '.join(sorted(self.released))}): generation needs "
                "/resume_memory_occupation first"
            )

    def release_memory(self, tags: list[str]) -> bool:
        """Give up the memory of ``tags`` once the running sequences end. The weights go to a
        temporary safetensors file and their tensors are freed; the KV cache, allocated per
        batch here, is simply not allocated again until resumed. Without ``memory_saver``
        nothing is freed, as SGLang's no-op memory saver does; returns whether it was."""
        if not self.memory_saver:
            return False
        with self.exclusive():
            if "weights" in tags and "weights" not in self.released:
                # Owned by this process: the next server removes it if this one was killed.
                folder = make_owned_temp_dir(
                    Path(tempfile.gettempdir()), RELEASED_WEIGHTS, private=True
                )
                path = folder / "weights.safetensors"
                params = dict(self.model.named_parameters())  # tied weights once
                save_file({n: p.detach().contiguous() for n, p in params.items()}, str(path))
                for param in params.values():
                    param.data = torch.empty(0, dtype=param.dtype)
                self._spilled_weights = path
            self.released |= set(tags)
        return True

    def resume_memory(self, tags: list[str]) -> None:
        """Take back the memory of ``tags``; the weights come back exactly as released."""
        if not self.memory_saver:
            return
        with self.exclusive():
            if "weights" in tags and self._spilled_weights is not None:
                stored = load_file(str(self._spilled_weights))
                for name, param in self.model.named_parameters():
                    param.data = stored[name]
                shutil.rmtree(self._spilled_weights.parent, ignore_errors=True)
                self._spilled_weights = None
            self.released -= set(tags)
