"""The embedded server's generation engine: a transformers model, batched decoding on CPU.

Requests queue up; a worker thread takes whatever is waiting (up to ``max_batch_size``
sequences), decodes them together with a shared KV cache, and answers each. Weight updates hold
the same lock as decoding, so they happen between batches, never inside one, unless generation
is paused (SGLang's /pause_generation): ``abort`` ends every sequence, ``retract`` puts running
sequences back in the queue with their tokens so far (re-prefilled after /continue_generation),
``in_place`` holds them, KV cache and all, between two decoding steps.
"""

from __future__ import annotations

import inspect
import os
import queue
import shutil
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from oprd_mega.lifetime import make_owned_temp_dir, remove_stale_temp_dirs
from oprd_mega.rollout.sampling import SamplingConfig, select_tokens


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
    # Set by GenerationEngine.abort; the decoding loop ends the sequence at its next step.
    abort_message: str | None = None
    running: bool = False
    # Progress so far, kept on the job so that a retracted sequence resumes where it stopped.
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    output_tops: list[list[list[Any]]] = field(default_factory=list)
    input_logprobs: list[list[Any]] | None = None


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
    """Holds the model and tokenizer; generates batches; applies weight updates."""

    def __init__(
        self,
        model_path: str | Path,
        dtype: str = "float32",
        max_batch_size: int = 32,
        seed: int | None = None,
        weight_version: str = "default",
        batch_wait_s: float = 0.005,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

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
        self.max_context = int(getattr(self.model.config, "max_position_embeddings", 1 << 20))
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self.weight_version = weight_version
        self.lock = threading.Lock()
        # Pause state (set without ``lock``, which a decoding batch holds; the decoding loop
        # polls it, and its waits on ``_cond`` release ``lock`` for weight updates).
        self._cond = threading.Condition(self.lock)
        self.paused: str | None = None
        # The jobs not yet answered; ``_idle`` is notified whenever one stops running.
        self._jobs_lock = threading.Lock()
        self._idle = threading.Condition(self._jobs_lock)
        self._jobs: list[SequenceJob] = []
        self._held = False  # the decoding loop waits in an in_place pause
        self._retracted: deque[SequenceJob] = deque()
        self.stats = {"batches": 0, "sequences": 0, "max_batch": 0, "tokens": 0}
        # Without a seed, draw one: two servers must not sample the same streams.
        self._rng = torch.Generator()
        self._rng.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8)) >> 1)
        self._queue: queue.Queue[SequenceJob] = queue.Queue()
        self._stop = threading.Event()
        self._groups: dict[str, Any] = {}
        self.released: set[str] = set()  # memory tags given up by /release_memory_occupation
        self._spilled_weights: Path | None = None
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
        futures = []
        with self._jobs_lock:
            self._jobs.extend(jobs)
        for job in jobs:
            self._queue.put(job)
            futures.append(job.future)
        return futures

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
        with self._jobs_lock:
            for job in self._jobs:
                if not (abort_all or id(job) in chosen or (rid and job.rid.startswith(rid))):
                    continue
                job.abort_message = job.abort_message or message
                if not job.running:
                    answered.append(job)
            for job in answered:
                self._jobs.remove(job)
            count = len(answered) + sum(1 for j in self._jobs if j.abort_message)
        for job in answered:
            self._answer(job, self._response(job, abort_finish(job.abort_message or message)))
        return count

    def pause(self, mode: str = "abort") -> None:
        """Stop decoding until :meth:`resume`; ``mode`` is one of SGLang's :data:`PAUSE_MODES`.

        Returns once no sequence is decoding any more: with ``abort`` and ``retract`` none
        runs, with ``in_place`` the running ones wait between two steps. A weight update that
        follows never meets a decoding step.
        """
        if mode not in PAUSE_MODES:
            raise ValueError(f"mode must be one of {', '.join(PAUSE_MODES)}, got {mode!r}")
        self.paused = mode
        if mode == "abort":
            self.abort(abort_all=True)
        with self._idle:
            while (
                any(j.running for j in self._jobs)
                and not (mode == "in_place" and self._held)
                and self.paused == mode
                and not self._stop.is_set()
            ):
                self._idle.wait(timeout=0.05)

    def resume(self) -> None:
        """Continue decoding after :meth:`pause` (retracted sequences go first)."""
        self.paused = None

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

    def _answer(self, job: SequenceJob, result: dict[str, Any] | BaseException) -> None:
        with self._idle:
            if job in self._jobs:
                self._jobs.remove(job)
            job.running = False
            self._idle.notify_all()
        if job.future.done():
            return
        if isinstance(result, BaseException):
            job.future.set_exception(result)
        else:
            job.future.set_result(result)

    def _set_held(self, held: bool) -> None:
        with self._idle:
            self._held = held
            self._idle.notify_all()

    def _claim(self, batch: list[SequenceJob]) -> list[SequenceJob]:
        """The jobs of ``batch`` still to decode (not answered by an abort), marked running."""
        with self._jobs_lock:
            claimed = [j for j in batch if j in self._jobs]  # an abort removed the others
            for job in claimed:
                job.running = True
        return claimed

    def close(self) -> None:
        """Stop the worker; every sequence not answered yet ends as aborted."""
        self.abort(abort_all=True, message="server shutting down")
        self._stop.set()
        self._worker.join(timeout=10)
        while self._retracted:
            self._answer(self._retracted.popleft(), RuntimeError("server shutting down"))
        if self._spilled_weights is not None:
            shutil.rmtree(self._spilled_weights.parent, ignore_errors=True)
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            self._answer(job, RuntimeError("server shutting down"))

    def _next_batch(self) -> list[SequenceJob]:
        """Retracted sequences first, then whatever waits (up to ``max_batch_size``)."""
        batch: list[SequenceJob] = []
        while self._retracted and len(batch) < self.max_batch_size:
            batch.append(self._retracted.popleft())
        if batch:
            return batch
        try:
            batch.append(self._queue.get(timeout=0.05))
        except queue.Empty:
            return batch
        deadline = time.perf_counter() + self.batch_wait_s
        while len(batch) < self.max_batch_size:
            remaining = deadline - time.perf_counter()
            try:
                batch.append(
                    self._queue.get(timeout=remaining)
                    if remaining > 0
                    else self._queue.get_nowait()
                )
            except queue.Empty:
                break
        return batch

    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                if self.paused is not None:
                    self._cond.wait(timeout=0.05)
                    continue
            batch = self._claim(self._next_batch())
            if not batch:
                continue
            try:
                with self.lock:
                    results = self._generate(batch)
            except Exception as exc:  # a failed batch fails its requests, not the server
                for job in batch:
                    self._answer(job, exc)
                continue
            for job, result in results:
                self._answer(job, result)

    # ----- decoding -----

    def _decode(self, ids: list[int], skip_special: bool = True) -> str:
        if self.tokenizer is None or not ids:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special)

    def _token_text(self, token: int, wanted: bool) -> str | None:
        if not wanted or self.tokenizer is None:
            return None
        return self.tokenizer.decode([token])

    @torch.inference_mode()
    def _generate(self, batch: list[SequenceJob]) -> list[tuple[SequenceJob, dict[str, Any]]]:
        """Decode ``batch`` (called with ``lock`` held); return the finished jobs' answers.

        A job resumes from its own ``output_ids`` (after a retract the prompt and those tokens
        are prefilled again). Jobs retracted by a pause go back to ``_retracted`` unanswered.
        """
        self.raise_if_released()  # queued before a release
        size = len(batch)
        self.stats["batches"] += 1
        self.stats["sequences"] += size
        self.stats["max_batch"] = max(self.stats["max_batch"], size)
        contexts = [j.input_ids + j.output_ids for j in batch]
        lengths = [len(c) for c in contexts]
        width = max(lengths)
        pad = 0
        input_ids = torch.full((size, width), pad, dtype=torch.long)
        mask = torch.zeros((size, width), dtype=torch.long)
        for r, context in enumerate(contexts):
            input_ids[r, width - lengths[r] :] = torch.tensor(context)
            mask[r, width - lengths[r] :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        # A resumed job draws from its generator past the tokens it already has.
        generators = [torch.Generator().manual_seed(j.seed + len(j.output_ids)) for j in batch]
        limits = [
            min(
                j.config.max_new_tokens if j.config.max_new_tokens is not None else 1 << 30,
                self.max_context - len(j.input_ids),
            )
            for j in batch
        ]
        finish: list[dict[str, Any] | None] = [
            {"type": "length", "length": len(j.output_ids)} if len(j.output_ids) >= limit else None
            for j, limit in zip(batch, limits, strict=True)
        ]
        out = self.model(
            input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True
        )
        all_logits = out.logits.float()
        self._input_logprobs(batch, all_logits, lengths, width)
        logits = all_logits[:, -1, :]
        past = _output_cache(out)
        rows = list(range(size))  # the original index of each row still being decoded
        retracted: list[SequenceJob] = []
        while True:
            if self.paused == "in_place":
                self._set_held(True)
                while self.paused == "in_place" and not self._stop.is_set():
                    self._cond.wait(timeout=0.05)  # hold the KV cache; weight updates may run
                self._set_held(False)
            for r in rows:
                message = batch[r].abort_message
                if finish[r] is None and message is not None:
                    finish[r] = abort_finish(message)
            if self.paused == "retract":
                retracted = [batch[r] for r in rows if finish[r] is None]
                break
            keep = [k for k, r in enumerate(rows) if finish[r] is None]
            if not keep:
                break
            if len(keep) < len(rows):  # drop finished rows from the batch and the KV cache
                index = torch.tensor(keep)
                logits, mask, positions = logits[index], mask[index], positions[index]
                past.reorder_cache(index)
                rows = [rows[k] for k in keep]
            jobs = [batch[r] for r in rows]
            logits = logits.clone()
            for k, job in enumerate(jobs):
                if len(job.output_ids) < job.config.min_new_tokens:
                    blocked = set(job.config.stop_token_ids)
                    if not job.config.ignore_eos:
                        blocked |= self.eos_ids
                    if blocked:
                        logits[k, list(blocked)] = float("-inf")
            tokens, chosen = select_tokens(
                logits, [j.config for j in jobs], [generators[r] for r in rows]
            )
            if any(j.top_logprobs_num > 0 for j in jobs):
                temps = [1.0 if j.config.greedy else j.config.temperature for j in jobs]
                full = torch.log_softmax(logits / torch.tensor(temps)[:, None], dim=-1)
            for k, (r, job) in enumerate(zip(rows, jobs, strict=True)):
                token = int(tokens[k])
                job.output_ids.append(token)
                job.output_logprobs.append(float(chosen[k]))
                if job.top_logprobs_num > 0:
                    values, ids = full[k].topk(job.top_logprobs_num)
                    job.output_tops.append(
                        [
                            [
                                float(v),
                                int(i),
                                self._token_text(int(i), job.return_text_in_logprobs),
                            ]
                            for v, i in zip(values, ids, strict=True)
                        ]
                    )
                finish[r] = self._finish(job, job.output_ids, token, limits[r])
            if all(finish[r] is not None for r in rows):
                break
            mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=torch.long)], dim=1)
            positions = positions[:, -1:] + 1
            out = self.model(
                input_ids=tokens[:, None],
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **{self._cache_arg: past},
            )
            past = _output_cache(out)
            logits = out.logits[:, -1, :].float()
        if retracted:
            self._retracted.extend(retracted)
            with self._idle:
                for job in retracted:
                    job.running = False
                self._idle.notify_all()
        now = time.perf_counter()
        results = []
        for r, job in enumerate(batch):
            reason = finish[r]
            if reason is None:
                continue
            self.stats["tokens"] += len(job.output_ids)
            results.append((job, self._response(job, reason, now)))
        return results

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
        output = job.output_ids
        text = self._decode(output, job.config.skip_special_tokens)
        matched = finish.get("matched")
        if isinstance(matched, str) and not job.config.no_stop_trim:
            text = text[: text.find(matched)] if matched in text else text
        meta: dict[str, Any] = {
            "id": job.rid,
            "finish_reason": finish,
            "prompt_tokens": len(job.input_ids),
            "completion_tokens": len(output),
            "cached_tokens": 0,
            "weight_version": self.weight_version,
            "e2e_latency": (now if now is not None else time.perf_counter()) - job.submitted,
        }
        if job.return_logprob:
            meta["output_token_logprobs"] = [
                [lp, tok, self._token_text(tok, job.return_text_in_logprobs)]
                for lp, tok in zip(job.output_logprobs, output, strict=True)
            ]
            meta["input_token_logprobs"] = job.input_logprobs or []
            if job.top_logprobs_num > 0:
                meta["output_top_logprobs"] = job.output_tops
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
        with self.lock:
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
        with self.lock:
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
        with self.lock:
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

    def release_memory(self, tags: list[str]) -> None:
        """Give up the memory of ``tags`` once the running batch ends. The weights go to a
        temporary safetensors file and their tensors are freed; the KV cache, allocated per
        batch here, is simply not allocated again until resumed."""
        with self.lock:
            if "weights" in tags and "weights" not in self.released:
                # Owned by this process: the next server removes it if this one was killed.
                folder = make_owned_temp_dir(Path(tempfile.gettempdir()), RELEASED_WEIGHTS)
                path = folder / "weights.safetensors"
                params = dict(self.model.named_parameters())  # tied weights once
                save_file({n: p.detach().contiguous() for n, p in params.items()}, str(path))
                for param in params.values():
                    param.data = torch.empty(0, dtype=param.dtype)
                self._spilled_weights = path
            self.released |= set(tags)

    def resume_memory(self, tags: list[str]) -> None:
        """Take back the memory of ``tags``; the weights come back exactly as released."""
        with self.lock:
            if "weights" in tags and self._spilled_weights is not None:
                stored = load_file(str(self._spilled_weights))
                for name, param in self.model.named_parameters():
                    param.data = stored[name]
                shutil.rmtree(self._spilled_weights.parent, ignore_errors=True)
                self._spilled_weights = None
            self.released -= set(tags)
