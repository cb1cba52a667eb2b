"""Megatron side of conversion: HF weights into a live model, out of it, and torch_dist I/O.

Checkpoints are Megatron distributed checkpoints (``torch_dist``) saved with per-layer keys
(``non_homogeneous_layers``), so a model with fewer layers (the truncated teacher) and any TP/PP
layout can load them. The source ``config.json`` (and tokenizer files) travel in ``hf/``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from oprd_mega.convert.dcp_files import tensors_metadata
from oprd_mega.convert.hf_io import AUX_FILES, CheckpointError, HFCheckpointReader
from oprd_mega.convert.mapping import (
    get_mapping,
    hf_to_mcore_state,
    mcore_names,
    mcore_to_hf_state,
)
from oprd_mega.lifetime import make_owned_temp_dir, publishing, raise_if_terminated
from oprd_mega.models.hf_config import HFModelArgs, load_hf_config
from oprd_mega.models.running import unwrap
from oprd_mega.parallel.distributed import barrier, global_rank
from oprd_mega.parallel.model_groups import groups_of

# How the model's sharded state dict is built, on save and on load alike (Megatron adds keys
# to the dict it is given, so every call gets a fresh copy).
SHARDED_METADATA = {"non_homogeneous_layers": True}


def _sharded_metadata() -> dict:
    return dict(SHARDED_METADATA)


FORMAT_FILE = "oprd_checkpoint.json"
# The tensors with one row per token (padded vocabulary): canonical Megatron names.
VOCAB_ROW_TENSORS = ("embedding.word_embeddings.weight", "output_layer.weight")
FORMAT_VERSION = 1
HF_SUBDIR = "hf"
_TE_TO_LOCAL = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
# Megatron stores the local spec's layer norms under the TE names (sharded_state_dict_keys_map).
_LOCAL_TO_CHECKPOINT = {local: te for te, local in _TE_TO_LOCAL.items()}


def content_metadata() -> dict:
    """The ``content_metadata`` stored in every checkpoint's ``common.pt``."""
    return {"oprd_format": FORMAT_VERSION, **SHARDED_METADATA}


def global_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """This stage's parameters by canonical Megatron name with the *global* layer index."""
    model = unwrap(model)
    layers = model.decoder.layers
    out: dict[str, torch.nn.Parameter] = {}
    for name, param in model.named_parameters():
        if name.startswith("decoder.layers."):
            _, _, local, rest = name.split(".", 3)
            rest = _TE_TO_LOCAL.get(rest, rest)
            name = f"decoder.layers.{layers[int(local)].layer_number - 1}.{rest}"
        out[name] = param
    return out


def _stage_layers(model: torch.nn.Module) -> list[int]:
    return [layer.layer_number - 1 for layer in unwrap(model).decoder.layers]


@torch.no_grad()
def load_hf_weights(
    model: torch.nn.Module, args: HFModelArgs, reader: HFCheckpointReader, *, progress=None
) -> None:
    """Copy HF weights into this rank's shards of a live model (any TP/PP, the layout of the
    model's own groups), via the mapping."""
    params = global_parameters(model)
    tp = groups_of(model).tp
    tp_rank, tp_size = tp.rank(), tp.size()
    filled: set[str] = set()
    for layer in [None, *_stage_layers(model)]:
        if layer is None:  # only the model-level tensors this stage owns
            wanted = {n for n in params if not n.startswith("decoder.layers.")}
            if not wanted:
                continue
        state = hf_to_mcore_state(args, reader.get, layer, tp_rank=tp_rank, tp_size=tp_size)
        if args.tie_word_embeddings and "output_layer.weight" in params:
            state["output_layer.weight"] = state.get(
                "embedding.word_embeddings.weight",
                hf_to_mcore_state(args, reader.get, None, tp_rank=tp_rank, tp_size=tp_size)[
                    "embedding.word_embeddings.weight"
                ],
            )
        for name, tensor in state.items():
            if name not in params:
                continue  # e.g. the embedding on a later pipeline stage
            if params[name].shape != tensor.shape:
                raise CheckpointError(
                    f"{name}: mapped shape {tuple(tensor.shape)} != model shape "
                    f"{tuple(params[name].shape)}"
                )
            params[name].copy_(tensor)
            filled.add(name)
        if progress is not None:
            progress.update(1)
    left = sorted(set(params) - filled)
    if left:
        raise CheckpointError(f"no HF weight mapped to model parameter(s) {left[:5]}")


def checkpoint_key(name: str) -> str:
    """The torch_dist key of a canonical Megatron tensor name (norms are stored TE-style)."""
    if name.startswith("decoder.layers."):
        head, rest = name.split(".", 3)[:3], name.split(".", 3)[3]
        return ".".join([*head, _LOCAL_TO_CHECKPOINT.get(rest, rest)])
    return name


def read_checkpoint_layers(
    args: HFModelArgs, directory: str | Path
) -> Iterator[tuple[int | None, dict[str, torch.Tensor]]]:
    """Yield ``(layer, {canonical name: full tensor})`` from a torch_dist checkpoint, one layer
    at a time (model-level tensors first, as ``layer=None``), without building a model."""
    from megatron.core.dist_checkpointing import ShardedTensor

    metadata = tensors_metadata(directory)
    for layer in [None, *range(args.num_layers)]:
        request = {}
        for name in mcore_names(args, layer):
            key = checkpoint_key(name)
            if key not in metadata:
                raise CheckpointError(f"{directory}: tensor {key} is missing from the checkpoint")
            meta = metadata[key]
            empty = torch.empty(meta.global_shape, dtype=meta.dtype)
            # every rank reads the full tensor; rank 0 holds the main replica
            request[name] = ShardedTensor.from_rank_offsets(key, empty, replica_id=global_rank())
        loaded = dist_checkpointing.load(request, str(directory))
        yield layer, {name: loaded[name] for name in request}


def export_hf_from_checkpoint(
    args: HFModelArgs, directory: str | Path, *, progress=None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, tensor)`` from a torch_dist checkpoint, holding one layer at a time."""
    for layer, tensors in read_checkpoint_layers(args, directory):
        yield from mcore_to_hf_state(args, tensors, layer).items()
        if progress is not None:
            progress.update(1)


@contextmanager
def checkpoint_in_temp_dir(
    directory: str | Path, args: HFModelArgs, hf_source: Path | None
) -> Iterator[Path]:
    """Collective: a fresh temporary sibling of ``directory`` for the torch_dist files.

    After the block rank 0 adds ``hf/`` (``hf_source``'s config and tokenizer files) and
    :data:`FORMAT_FILE` and renames the folder to ``directory``; a failure removes it, leaving
    nothing at ``directory``.
    """
    directory = Path(directory)
    if directory.exists():
        raise FileExistsError(f"target {directory} already exists; choose a new directory")
    tmp_holder = [""]
    if global_rank() == 0:
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp_holder[0] = str(make_owned_temp_dir(directory.parent, directory.name))
    if dist.is_initialized():
        dist.broadcast_object_list(tmp_holder, src=0)
    tmp = Path(tmp_holder[0])
    try:
        yield tmp
        barrier()
        if global_rank() == 0:
            _write_oprd_files(tmp, args, hf_source)
            raise_if_terminated()
            with publishing(f"the checkpoint {directory}"):
                os.replace(tmp, directory)
    except BaseException:
        if global_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier()


def _write_oprd_files(directory: Path, args: HFModelArgs, hf_source: Path | None) -> None:
    hf_dir = directory / HF_SUBDIR
    hf_dir.mkdir()
    if hf_source is not None:
        for name in AUX_FILES:
            if (hf_source / name).is_file():
                shutil.copy2(hf_source / name, hf_dir / name)
    if not (hf_dir / "config.json").is_file():
        (hf_dir / "config.json").write_text(json.dumps(args.to_dict()), encoding="utf-8")
    fmt = {
        "format_version": FORMAT_VERSION,
        "model": args.to_dict(),
        **SHARDED_METADATA,
        "make_vocab_size_divisible_by": args.make_vocab_size_divisible_by,
        "padded_vocab_size": args.padded_vocab_size,
    }
    (directory / FORMAT_FILE).write_text(json.dumps(fmt, indent=2) + "\n", encoding="utf-8")


def save_mcore_checkpoint(
    model: torch.nn.Module, args: HFModelArgs, directory: str | Path, hf_source: Path | None
) -> Path:
    """Save ``model`` as a torch_dist checkpoint into a new ``directory``, atomically.

    Everything is written into a temporary sibling folder, renamed at the end; a failure leaves
    nothing at ``directory``. ``hf_source``'s config and tokenizer files are kept in ``hf/``.
    """
    # the padding as built: a model at a TP that needed a larger multiple stores that one
    args = args.at_tp(unwrap(model).config.tensor_model_parallel_size)
    with checkpoint_in_temp_dir(directory, args, hf_source) as tmp:
        sharded = unwrap(model).sharded_state_dict(metadata=_sharded_metadata())
        dist_checkpointing.save(sharded, str(tmp), content_metadata=content_metadata())
    return Path(directory)


def read_mcore_args(directory: str | Path) -> HFModelArgs:
    """The model arguments stored with a checkpoint written by :func:`save_mcore_checkpoint`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"Megatron checkpoint directory not found: {directory}")
    for required in (FORMAT_FILE, "metadata.json", f"{HF_SUBDIR}/config.json"):
        if not (directory / required).is_file():
            raise FileNotFoundError(
                f"{directory} is not an oprd-mega Megatron checkpoint: {required} is missing"
            )
    args = load_hf_config(directory / HF_SUBDIR / "config.json")
    fmt = json.loads((directory / FORMAT_FILE).read_text(encoding="utf-8"))
    # checkpoints written before vocabulary padding hold exactly vocab_size rows
    divisor = int(fmt.get("make_vocab_size_divisible_by", 1))
    args = replace(args, make_vocab_size_divisible_by=divisor)
    padded = int(fmt.get("padded_vocab_size", args.vocab_size))
    if padded != args.padded_vocab_size:
        raise CheckpointError(
            f"{directory / FORMAT_FILE}: padded_vocab_size={padded} does not match vocab_size="
            f"{args.vocab_size} padded to a multiple of make_vocab_size_divisible_by={divisor} "
            f"({args.padded_vocab_size})"
        )
    return args


def load_mcore_checkpoint(model: torch.nn.Module, directory: str | Path) -> None:
    """Load a checkpoint into ``model`` at this process's TP/PP layout (Megatron reshards).

    The checkpoint may store another padded vocabulary than the model holds (a TP that needs a
    larger multiple, see ``HFModelArgs.at_tp``, or another ``make_vocab_size_divisible_by``):
    Megatron reads the rows both have (its embedding and output layer allow the shape mismatch)
    and every row past the real vocabulary is then set to zero."""
    model = unwrap(model)
    stored_args = read_mcore_args(directory)
    built = getattr(model, "vocab_size", None)
    sharded = model.sharded_state_dict(metadata=_sharded_metadata())
    state = dist_checkpointing.load(sharded, str(directory))
    state.pop("content_metadata", None)
    model.load_state_dict(state, strict=True)
    if built is not None and built != stored_args.padded_vocab_size:
        zero_padding_rows(model, stored_args.vocab_size)


@torch.no_grad()
def zero_padding_rows(model: torch.nn.Module, vocab_size: int) -> None:
    """Set this rank's rows of the embedding and output layer past ``vocab_size`` to zero
    (each TP rank holds an equal, contiguous share of the padded rows)."""
    model = unwrap(model)
    tp_rank = groups_of(model).tp.rank()
    for name, param in global_parameters(model).items():
        if name in VOCAB_ROW_TENSORS:
            first = tp_rank * param.shape[0]
            param[max(vocab_size - first, 0) :].zero_()


def check_family(args: HFModelArgs) -> None:
    """Raise if no mapping exists for ``args.family`` (before any work starts)."""
    get_mapping(args.family)
