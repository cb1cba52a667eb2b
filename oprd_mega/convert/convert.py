"""Checkpoint conversion: Hugging Face safetensors <-> Megatron torch_dist.

Both directions validate everything they can before writing, write into a temporary folder
and rename it at the end: a failure leaves nothing at the target.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from oprd_mega.convert.dcp_files import tensors_metadata
from oprd_mega.convert.hf_io import HFCheckpointReader, write_hf_directory
from oprd_mega.convert.mcore_io import HF_SUBDIR, export_hf_from_checkpoint, read_mcore_args
from oprd_mega.convert.mcore_stream import save_hf_as_mcore_checkpoint
from oprd_mega.models.hf_config import DEFAULT_VOCAB_DIVISOR, load_hf_config
from oprd_mega.parallel import ParallelLayout, init_distributed


def _require_new_target(target: Path) -> None:
    if target.exists():
        raise FileExistsError(f"target {target} already exists; choose a new directory")


def hf_to_mcore(
    hf_dir: str | Path,
    mcore_dir: str | Path,
    *,
    make_vocab_size_divisible_by: int = DEFAULT_VOCAB_DIVISOR,
    progress: bool = True,
    allow_nonfinite: bool = False,
) -> Path:
    """Convert a Hugging Face checkpoint into a Megatron torch_dist checkpoint.

    A tensor holding NaN or infinity stops the conversion (naming file and tensor, nothing
    written) unless ``allow_nonfinite``. The vocabulary is padded with zero rows to a multiple of
    ``make_vocab_size_divisible_by`` (recorded in the checkpoint). The result loads at any TP/PP
    layout the heads allow (the loader re-pads the vocabulary for a TP that needs it). No model
    is built: the HF tensors are read, fused and saved one layer at a time, so memory stays
    around one layer (or the embedding, if larger).
    Under torchrun every rank takes part and rank 0 reads and writes.
    """
    hf_dir, mcore_dir = Path(hf_dir), Path(mcore_dir)
    _require_new_target(mcore_dir)
    args = replace(
        load_hf_config(hf_dir), make_vocab_size_divisible_by=make_vocab_size_divisible_by
    )
    reader = HFCheckpointReader(hf_dir, require_finite=not allow_nonfinite)
    reader.validate(args)
    init_distributed(ParallelLayout())
    with tqdm(
        total=args.num_layers + 1,
        desc="hf-to-mcore",
        unit="layer",
        disable=not progress or dist.get_rank() != 0,
    ) as bar:
        return save_hf_as_mcore_checkpoint(args, reader, mcore_dir, hf_source=hf_dir, progress=bar)


def mcore_to_hf(
    mcore_dir: str | Path,
    hf_dir: str | Path,
    *,
    max_shard_bytes: int = 2 * 1024**3,
    progress: bool = True,
) -> Path:
    """Convert a Megatron checkpoint (from :func:`hf_to_mcore` or training) to safetensors.

    Reads one layer at a time straight from the checkpoint (no model is built); under torchrun
    every rank reads and rank 0 writes.
    """
    mcore_dir, hf_dir = Path(mcore_dir), Path(hf_dir)
    _require_new_target(hf_dir)
    args = read_mcore_args(mcore_dir)
    checkpoint_dtype(mcore_dir)  # fails early on a checkpoint without model tensors
    init_distributed(ParallelLayout())
    if dist.get_rank() != 0:  # checkpoint loads are collective: read along, write nothing
        for _ in export_hf_from_checkpoint(args, mcore_dir):
            pass
    else:
        with tqdm(
            total=args.num_layers + 1, desc="mcore-to-hf", unit="layer", disable=not progress
        ) as bar:
            write_hf_directory(
                export_hf_from_checkpoint(args, mcore_dir, progress=bar),
                hf_dir,
                mcore_dir / HF_SUBDIR,
                max_shard_bytes=max_shard_bytes,
            )
    dist.barrier()
    return hf_dir


def checkpoint_dtype(mcore_dir: Path) -> torch.dtype:
    """The dtype of the stored embedding tensor (all tensors share it)."""
    metadata = tensors_metadata(mcore_dir)
    key = "embedding.word_embeddings.weight"
    if key not in metadata:
        raise FileNotFoundError(f"{mcore_dir}: tensor {key} missing from the checkpoint")
    return metadata[key].dtype
