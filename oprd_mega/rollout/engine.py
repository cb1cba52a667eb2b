"""The embedded server's generation engine: a transformers model, batched decoding on CPU.

Requests queue up; a worker thread takes whatever is waiting (up to ``max_batch_size``
sequences), decodes them together with a shared KV cache, and answers each. Weight updates hold
the same lock as decoding, so they happen between batches, never inside one.
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
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from oprd_mega.rollout.sampling import SamplingConfig, select_tokens


@dataclass
class SequenceJob:
    """One sequence to generate (a request with ``n`` samples makes ``n`` jobs)."""

    input_ids: list[int]
    config: SamplingConfig
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    return_text_in_logprobs: bool = False
    seed: int = 0
    future: Future = field(default_factory=Future)
    submitted: float = field(default_factory=time.perf_counter)


def load_state_dict_from_dir(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor in the ``*.safetensors`` files of a directory (or one file)."""
    from safetensors.torch import load_file

    path = Path(path)
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
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
        for job in jobs:
            self._queue.put(job)
            futures.append(job.future)
        return futures

    def close(self) -> None:
        """Stop the worker; queued sequences fail."""
        self._stop.set()
        self._worker.join(timeout=10)
        if self._spilled_weights is not None:
            shutil.rmtree(self._spilled_weights.parent, ignore_errors=True)
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            job.future.set_exception(RuntimeError("server shutting down"))

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                first = self._queue.get(timeout=0.05)
            except queue.Empty:
                continue
            batch = [first]
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
            try:
                with self.lock:
                    results = self._generate(batch)
            except Exception as exc:  # a failed batch fails its requests, not the server
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            for job, result in zip(batch, results, strict=True):
                job.future.set_result(result)

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
    def _generate(self, batch: list[SequenceJob]) -> list[dict[str, Any]]:
        self.raise_if_released()  # queued before a release
        size = len(batch)
        self.stats["batches"] += 1
        self.stats["sequences"] += size
        self.stats["max_batch"] = max(self.stats["max_batch"], size)
        lengths = [len(j.input_ids) for j in batch]
        width = max(lengths)
        pad = 0
        input_ids = torch.full((size, width), pad, dtype=torch.long)
        mask = torch.zeros((size, width), dtype=torch.long)
        for r, job in enumerate(batch):
            input_ids[r, width - lengths[r] :] = torch.tensor(job.input_ids)
            mask[r, width - lengths[r] :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        generators = [torch.Generator().manual_seed(j.seed) for j in batch]
        limits = [
            min(
                j.config.max_new_tokens if j.config.max_new_tokens is not None else 1 << 30,
                self.max_context - len(j.input_ids),
            )
            for j in batch
        ]
        outputs: list[list[int]] = [[] for _ in batch]
        logprobs: list[list[float]] = [[] for _ in batch]
        tops: list[list[list[Any]]] = [[] for _ in batch]
        finish: list[dict[str, Any] | None] = [
            {"type": "length", "length": 0} if limit == 0 else None for limit in limits
        ]
        out = self.model(
            input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True
        )
        all_logits = out.logits.float()
        input_logprobs = self._input_logprobs(batch, all_logits, lengths, width)
        logits = all_logits[:, -1, :]
        past = _output_cache(out)
        rows = list(range(size))  # the original index of each row still being decoded
        while True:
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
            for k, (r, job) in enumerate(zip(rows, jobs, strict=True)):
                if len(outputs[r]) < job.config.min_new_tokens:
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
                outputs[r].append(token)
                logprobs[r].append(float(chosen[k]))
                if job.top_logprobs_num > 0:
                    values, ids = full[k].topk(job.top_logprobs_num)
                    tops[r].append(
                        [
                            [
                                float(v),
                                int(i),
                                self._token_text(int(i), job.return_text_in_logprobs),
                            ]
                            for v, i in zip(values, ids, strict=True)
                        ]
                    )
                finish[r] = self._finish(job, outputs[r], token, limits[r])
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
        now = time.perf_counter()
        results = []
        for r, job in enumerate(batch):
            self.stats["tokens"] += len(outputs[r])
            results.append(
                self._response(
                    job, outputs[r], logprobs[r], tops[r], finish[r], input_logprobs[r], now
                )
            )
        return results

    def _input_logprobs(
        self, batch: list[SequenceJob], logits: torch.Tensor, lengths: list[int], width: int
    ) -> list[list[list[Any]] | None]:
        result: list[list[list[Any]] | None] = []
        for r, job in enumerate(batch):
            if not job.return_logprob or job.logprob_start_len < 0:
                result.append(None)
                continue
            offset = width - lengths[r]
            row = torch.log_softmax(logits[r, offset:], dim=-1)
            entries: list[list[Any]] = []
            for pos in range(min(job.logprob_start_len, lengths[r]), lengths[r]):
                token = job.input_ids[pos]
                value = None if pos == 0 else float(row[pos - 1, token])
                entries.append([value, token, self._token_text(token, job.return_text_in_logprobs)])
            result.append(entries)
        return result

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
        self,
        job: SequenceJob,
        output: list[int],
        logprobs: list[float],
        tops: list[list[list[Any]]],
        finish: dict[str, Any] | None,
        input_logprobs: list[list[Any]] | None,
        now: float,
    ) -> dict[str, Any]:
        assert finish is not None
        text = self._decode(output, job.config.skip_special_tokens)
        matched = finish.get("matched")
        if isinstance(matched, str) and not job.config.no_stop_trim:
            text = text[: text.find(matched)] if matched in text else text
        meta: dict[str, Any] = {
            "id": uuid.uuid4().hex,
            "finish_reason": finish,
            "prompt_tokens": len(job.input_ids),
            "completion_tokens": len(output),
            "cached_tokens": 0,
            "weight_version": self.weight_version,
            "e2e_latency": now - job.submitted,
        }
        if job.return_logprob:
            meta["output_token_logprobs"] = [
                [lp, tok, self._token_text(tok, job.return_text_in_logprobs)]
                for lp, tok in zip(logprobs, output, strict=True)
            ]
            meta["input_token_logprobs"] = input_logprobs if input_logprobs is not None else []
            if job.top_logprobs_num > 0:
                meta["output_top_logprobs"] = tops
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
                folder = Path(tempfile.mkdtemp(prefix="oprd-released-weights-"))
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
