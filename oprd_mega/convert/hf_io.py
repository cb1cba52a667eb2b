"""Read and write Hugging Face checkpoints (safetensors, single file or sharded with an index).

Reading is lazy (one tensor at a time through ``safe_open``); writing streams tensors into
shards, so memory stays around one layer. Everything is checked before anything is written.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from oprd_mega.convert.mapping import all_hf_names
from oprd_mega.errors import CheckpointError
from oprd_mega.lifetime import make_owned_temp_dir, publishing, raise_if_terminated
from oprd_mega.models.hf_config import HFModelArgs

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Files copied next to the weights when the source has them.
AUX_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)
# Buffers some exporters write that carry no weights.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def count_nonfinite(tensor: torch.Tensor, chunk: int = 1 << 16) -> int:
    """NaN and infinite values in ``tensor``, counted ``chunk`` elements at a time:
    ``torch.isfinite`` builds a full-size ``abs()`` copy, which would double the memory that
    streamed conversion holds for its largest tensor."""
    flat = tensor.reshape(-1)
    return sum(
        int((~torch.isfinite(flat[start : start + chunk])).sum())
        for start in range(0, flat.numel(), chunk)
    )


class HFCheckpointReader:
    """Lazy access to the tensors of a Hugging Face safetensors checkpoint directory.

    ``require_finite``: :meth:`get` refuses a floating-point tensor holding NaN or infinity
    (conversion; the trainer loads such weights and skips the non-finite steps instead).
    """

    def __init__(self, directory: str | Path, *, require_finite: bool = False) -> None:
        self.directory = Path(directory)
        self.require_finite = require_finite
        if not self.directory.is_dir():
            raise FileNotFoundError(f"Hugging Face checkpoint directory not found: {directory}")
        self._handles: dict[Path, object] = {}
        self.files = self._index()

    def _index(self) -> dict[str, Path]:
        index = self.directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"{index}: not a safetensors index ({exc})") from exc
            files = {name: self.directory / file for name, file in weight_map.items()}
            for file in sorted(set(files.values())):
                if not file.is_file():
                    raise FileNotFoundError(f"{index} names a missing shard: {file}")
            return files
        shards = sorted(self.directory.glob("*.safetensors"))
        if not shards:
            raise FileNotFoundError(
                f"no *.safetensors weights (nor {INDEX_FILE}) in {self.directory}"
            )
        files: dict[str, Path] = {}
        for shard in shards:
            for name in self._handle(shard).keys():  # noqa: SIM118 (safe_open has no __iter__)
                files[name] = shard
        self._handles.clear()
        return files

    def _handle(self, file: Path):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(file), framework="pt")
            except Exception as exc:  # safetensors' own error type is not importable
                raise CheckpointError(f"{file}: not a readable safetensors file ({exc})") from exc
        return self._handles[file]

    def close(self) -> None:
        """Unmap the open files (reopened on the next read): the pages read so far stop counting
        towards this process's resident memory."""
        self._handles.clear()

    def names(self) -> list[str]:
        """All tensor names in the checkpoint."""
        return sorted(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of a tensor, read from the file header only."""
        return tuple(self._handle(self._file(name)).get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """Safetensors dtype string of a tensor (e.g. ``F32``, ``BF16``)."""
        return self._handle(self._file(name)).get_slice(name).get_dtype()

    def _file(self, name: str) -> Path:
        if name not in self.files:
            raise CheckpointError(f"tensor {name} is missing from {self.directory}")
        return self.files[name]

    def get(self, name: str) -> torch.Tensor:
        """Load one tensor (a truncated or corrupted file is named)."""
        file = self._file(name)
        try:
            tensor = self._handle(file).get_tensor(name)
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{file}: cannot read tensor {name} ({exc})") from exc
        if self.require_finite and tensor.is_floating_point():
            bad = count_nonfinite(tensor)
            if bad:
                raise CheckpointError(
                    f"{file}: tensor {name} holds {bad} non-finite value(s) (NaN or infinity); "
                    "pass --allow-nonfinite to convert it anyway"
                )
        return tensor

    def validate(self, args: HFModelArgs) -> torch.dtype:
        """Check every expected tensor is present with the config's shape, and nothing else is.

        Returns the checkpoint's (single) dtype.
        """
        expected = all_hf_names(args)
        missing = sorted(set(expected) - set(self.files))
        if missing:
            raise CheckpointError(
                f"{self.directory}: {len(missing)} tensor(s) missing for a {args.family} model "
                f"with {args.num_layers} layers, e.g. {missing[:5]}"
            )
        allowed = set(expected)
        if args.tie_word_embeddings:
            allowed.add("lm_head.weight")  # some exporters write the tied copy
        unexpected = sorted(
            n for n in set(self.files) - allowed if not n.endswith(_IGNORED_SUFFIXES)
        )
        if unexpected:
            raise CheckpointError(
                f"{self.directory}: {len(unexpected)} tensor(s) not used by a {args.family} "
                f"model with this config.json, e.g. {unexpected[:5]}"
            )
        for name, shape in expected.items():
            actual = self.shape(name)
            if actual != shape:
                raise CheckpointError(
                    f"{self.directory}: tensor {name} has shape {actual}, config.json implies "
                    f"{shape}"
                )
        dtypes = {self.dtype(name) for name in expected}
        if len(dtypes) != 1:
            raise CheckpointError(f"{self.directory}: mixed tensor dtypes {sorted(dtypes)}")
        return self.get(next(iter(expected))).dtype


def copy_aux_files(source: Path, target: Path) -> list[str]:
    """Copy config, generation config and tokenizer files that exist in ``source``."""
    copied = []
    for name in AUX_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
            copied.append(name)
    return copied


def write_hf_directory(
    tensors: Iterable[tuple[str, torch.Tensor]],
    target: Path,
    aux_source: Path,
    *,
    max_shard_bytes: int = 2 * 1024**3,
) -> Path:
    """A Hugging Face directory at ``target`` (which must not exist): safetensors shards of
    ``tensors`` and the config and tokenizer files of ``aux_source``, written into a temporary
    sibling and renamed at the end, so a failure leaves nothing at ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_owned_temp_dir(target.parent, target.name)  # a dead owner's leftovers go
    try:
        write_safetensors_shards(tensors, tmp, max_shard_bytes=max_shard_bytes)
        copy_aux_files(aux_source, tmp)
        raise_if_terminated()
        with publishing(f"the Hugging Face directory {target}"):
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


@dataclass(frozen=True)
class WrittenShards:
    """What :func:`write_safetensors_shards` wrote: the shard files, tensors and bytes."""

    files: list[Path]
    tensors: int
    total_bytes: int


def write_safetensors_shards(
    tensors: Iterable[tuple[str, torch.Tensor]],
    directory: Path,
    *,
    max_shard_bytes: int = 2 * 1024**3,
    count_in_names: bool = True,
) -> WrittenShards:
    """Stream ``(name, tensor)`` pairs into numbered shards plus an index in ``directory``.

    A shard closes before the tensor that would take it past ``max_shard_bytes`` (a larger
    tensor gets a shard alone); tensors are detached and copied to CPU. Shards are named
    ``model-00001-of-00003.safetensors`` as Hugging Face does, or ``model-00001.safetensors``
    with ``count_in_names=False`` (no renaming once the count is known: the weight sync).
    """
    directory.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    written: list[Path] = []
    weight_map: dict[str, int] = {}
    total = 0

    def flush() -> None:
        number = len(written) + 1
        # With the count in the names, shards get their final names once the count is known.
        name = f"part-{number:05d}" if count_in_names else f"model-{number:05d}"
        path = directory / f"{name}.safetensors"
        save_file(shards[-1], str(path), metadata={"format": "pt"})
        written.append(path)
        shards[-1] = {}
        sizes[-1] = 0

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and sizes[-1] + nbytes > max_shard_bytes:
            flush()
        shards[-1][name] = tensor.detach().to("cpu").contiguous()
        sizes[-1] += nbytes
        weight_map[name] = len(written)
        total += nbytes
    if shards[-1]:
        flush()
    count = len(written)
    final: list[Path] = []
    for i, path in enumerate(written):
        target = path
        if count_in_names:
            target = directory / f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            path.rename(target)
        final.append(target)
    index = {
        "metadata": {"total_size": total},
        "weight_map": {name: final[i].name for name, i in sorted(weight_map.items())},
    }
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return WrittenShards(final, len(weight_map), total)
