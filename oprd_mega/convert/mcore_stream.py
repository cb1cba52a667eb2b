"""A Megatron torch_dist checkpoint written from HF weights one layer at a time, with no model.

Each layer (and the model-level tensors) goes through Megatron's own ``dist_checkpointing.save``
into a part folder of the checkpoint; the part's data files are then moved up and its torch DCP
metadata merged into the checkpoint's single ``.metadata``. The result holds the keys, shapes and
dtypes of a save of the built model (:func:`~oprd_mega.convert.mcore_io.save_mcore_checkpoint`),
so every loader reads it alike, while only one layer's tensors (or the embedding) are in memory.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from functools import partial
from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor
from megatron.core.transformer.utils import make_sharded_object_for_checkpoint
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.storage import WriteResult

from oprd_mega.convert.hf_io import CheckpointError, HFCheckpointReader
from oprd_mega.convert.mapping import hf_to_mcore_state
from oprd_mega.convert.mcore_io import checkpoint_in_temp_dir, checkpoint_key, content_metadata
from oprd_mega.models.hf_config import HFModelArgs
from oprd_mega.parallel.distributed import global_rank, on_rank0

# Megatron's linear layers store an (empty) ``_extra_state`` object each, which a model asks for
# on load; the model-level linear (output_layer) drops its own.
_EXTRA_STATE_MODULES = (
    "self_attention.linear_qkv",
    "self_attention.linear_proj",
    "mlp.linear_fc1",
    "mlp.linear_fc2",
)
# Identical in every part: the checkpoint keeps the first part's copy.
_PART_COMMON_FILES = ("common.pt", "metadata.json")

TensorSpecs = dict[str, tuple[tuple[int, ...], torch.dtype]]  # name -> (shape, dtype)


def save_hf_as_mcore_checkpoint(
    args: HFModelArgs,
    reader: HFCheckpointReader,
    directory: str | Path,
    *,
    hf_source: Path | None,
    progress=None,
) -> Path:
    """Write the HF checkpoint behind ``reader`` as a torch_dist checkpoint into a new
    ``directory``, atomically, one layer at a time (collective; rank 0 reads and writes).

    ``progress`` (a tqdm bar) advances once per part: the model-level tensors, then each layer.
    """
    with checkpoint_in_temp_dir(directory, args, hf_source) as tmp:
        rank0 = _Rank0Work(args, reader, tmp)
        for number, layer in enumerate([None, *range(args.num_layers)]):
            part = tmp / f".part-{number:05d}"
            shapes = on_rank0(partial(rank0.read, layer, part), f"to read {_part_name(layer)}")
            tensors = rank0.take_tensors() or _stand_ins(shapes)
            dist_checkpointing.save(
                _sharded_part(tensors, layer), str(part), content_metadata=content_metadata()
            )
            del tensors
            rank0.saved = part
            if progress is not None:
                progress.update(1)
        on_rank0(rank0.finish, "to merge the saved parts")
    return Path(directory)


def _part_name(layer: int | None) -> str:
    return "the model-level tensors" if layer is None else f"layer {layer}"


class _Rank0Work:
    """What only rank 0 does: read and fuse each part's HF tensors, merge the saved parts."""

    def __init__(self, args: HFModelArgs, reader: HFCheckpointReader, directory: Path) -> None:
        self.args, self.reader = args, reader
        self.merger = _PartMerger(directory)
        self.tensors: dict[str, torch.Tensor] = {}
        self.saved: Path | None = None  # the last saved part, merged before the next is read

    def read(self, layer: int | None, part: Path) -> TensorSpecs:
        """Load the part's Megatron tensors (full, TP1); returns their shapes and dtypes."""
        self._merge_saved()
        part.mkdir()
        self.tensors = hf_to_mcore_state(self.args, self.reader.get, layer)
        self.reader.close()
        return {name: (tuple(t.shape), t.dtype) for name, t in self.tensors.items()}

    def take_tensors(self) -> dict[str, torch.Tensor]:
        tensors, self.tensors = self.tensors, {}
        return tensors

    def finish(self) -> None:
        self._merge_saved()
        self.merger.write_metadata()

    def _merge_saved(self) -> None:
        if self.saved is not None:
            self.merger.add(self.saved)
            self.saved = None


def _stand_ins(specs: TensorSpecs) -> dict[str, torch.Tensor]:
    """Meta-device tensors for the ranks that join the collective save without writing."""
    return {
        name: torch.empty(shape, dtype=dtype, device="meta")
        for name, (shape, dtype) in specs.items()
    }


def _sharded_part(
    tensors: dict[str, torch.Tensor], layer: int | None
) -> dict[str, ShardedTensor | ShardedObject]:
    """What the built model's sharded state dict holds for this part, at TP1/PP1."""
    replica = global_rank()  # rank 0 holds the main replica, the one that is written
    sharded: dict[str, ShardedTensor | ShardedObject] = {}
    for name, tensor in tensors.items():
        key = checkpoint_key(name)
        sharded[key] = ShardedTensor.from_rank_offsets(key, tensor, replica_id=replica)
    if layer is not None:
        for module in _EXTRA_STATE_MODULES:
            key = f"decoder.layers.{layer}.{module}._extra_state"
            sharded[key] = make_sharded_object_for_checkpoint(None, key, replica_id=replica)
    return sharded


class _PartMerger:
    """Rank 0: moves each saved part's files into the checkpoint folder and collects its torch
    DCP metadata; :meth:`write_metadata` then writes the checkpoint's one ``.metadata``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.state_dict_metadata: dict = {}
        self.planner_data: dict = {}
        self.results: list[WriteResult] = []
        self.file_count = 0

    def add(self, part: Path) -> None:
        metadata = FileSystemReader(str(part)).read_metadata()
        repeated = self.state_dict_metadata.keys() & metadata.state_dict_metadata.keys()
        if repeated:
            raise CheckpointError(f"{part.name} repeats checkpoint keys {sorted(repeated)[:5]}")
        self.state_dict_metadata.update(metadata.state_dict_metadata)
        self.planner_data.update(metadata.planner_data or {})
        moved: dict[str, str] = {}
        for index, info in metadata.storage_data.items():
            if info.relative_path not in moved:
                moved[info.relative_path] = self._move_data_file(part / info.relative_path)
            storage = dataclasses.replace(info, relative_path=moved[info.relative_path])
            self.results.append(
                WriteResult(index=index, size_in_bytes=info.length, storage_data=storage)
            )
        for name in _PART_COMMON_FILES:
            if not (self.directory / name).exists():
                os.replace(part / name, self.directory / name)
        unknown = {p.name for p in part.iterdir()} - {".metadata", *_PART_COMMON_FILES}
        if unknown:  # a Megatron release that writes more: fail rather than drop it
            raise CheckpointError(f"{part}: unexpected files from the save: {sorted(unknown)}")
        shutil.rmtree(part)

    def _move_data_file(self, path: Path) -> str:
        # Megatron's own naming (``__<rank>_<n>.distcp``), numbered across all parts.
        name = f"__0_{self.file_count}{path.suffix}"
        self.file_count += 1
        os.replace(path, self.directory / name)
        return name

    def write_metadata(self) -> None:
        metadata = Metadata(self.state_dict_metadata, planner_data=self.planner_data or None)
        FileSystemWriter(str(self.directory)).finish(metadata, [self.results])
