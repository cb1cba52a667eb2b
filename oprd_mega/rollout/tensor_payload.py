"""SGLang's /update_weights_from_tensor payload, read by a CPU server.

SGLang's clients send ``serialized_named_tensors``: one base64 string per tensor-parallel rank,
each a ``ForkingPickler`` pickle of ``[(name, tensor), ...]`` (``MultiprocessingSerializer``).
The tensor data travels beside the pickle, as torch's multiprocessing reductions share it:

- shared-memory files (``torch.multiprocessing.set_sharing_strategy("file_system")``) and
  plain pickled CPU tensors (data inline): a CPU server on the same host reads them;
- file descriptors (torch's default ``file_descriptor`` strategy) reach only the sender's own
  child processes (the handshake uses the sender's multiprocessing authkey);
- CUDA IPC handles need the sender's GPU.

The last two, and SGLang's other classes (``LocalSerializedTensor``), are refused with a
message saying what to send instead. ``load_format: "flattened_bucket"`` (what slime sends) is
one pickled dict per rank, ``{"flattened_tensor": uint8 [bytes], "metadata": [SGLang's
FlattenedTensorMetadata(name, shape, dtype, start_idx, end_idx, numel), ...]}``; each tensor is
``flattened_tensor[start_idx:end_idx].view(dtype).reshape(shape)``, as SGLang's
``FlattenedTensorBucket.reconstruct_tensors`` rebuilds it. Unpickling goes through an
allow-list: only tensor and storage rebuilders, plain containers and that metadata record,
never arbitrary callables.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import pickle
from typing import Any

import torch

# Globals a payload of CPU tensors needs; anything else is refused by name.
_ALLOWED = {
    ("builtins", name)
    for name in ("list", "tuple", "dict", "int", "float", "str", "bytes", "bool", "bytearray")
} | {
    ("collections", "OrderedDict"),
    ("copyreg", "__newobj__"),
    ("torch", "Size"),
    ("torch", "Tensor"),
    ("torch", "device"),
    ("torch", "UntypedStorage"),
    ("torch.storage", "UntypedStorage"),
    ("torch.storage", "TypedStorage"),
    ("torch.nn.parameter", "Parameter"),
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch.multiprocessing.reductions", "rebuild_tensor"),
    ("torch.multiprocessing.reductions", "rebuild_storage_filename"),
    ("torch.multiprocessing.reductions", "rebuild_storage_empty"),
    ("torch.multiprocessing.reductions", "rebuild_typed_storage"),
}
_FD_SHARING = {
    ("torch.multiprocessing.reductions", "rebuild_storage_fd"),
    ("multiprocessing.resource_sharer", "DupFd"),
}
_CUDA = {
    ("torch.multiprocessing.reductions", "rebuild_cuda_tensor"),
    ("sglang.srt.utils.patch_torch", "_rebuild_cuda_tensor_modified"),
}


# Where SGLang defines the metadata record of a flattened bucket (sglang/srt/weight_sync/).
_BUCKET_METADATA = ("sglang.srt.weight_sync.tensor_bucket", "FlattenedTensorMetadata")
_BUCKET_FIELDS = ("name", "shape", "dtype", "start_idx", "end_idx", "numel")


class BucketMetadata:
    """SGLang's ``FlattenedTensorMetadata`` as unpickled here: its dataclass fields arrive as
    instance state (``name``, ``shape``, ``dtype``, ``start_idx``, ``end_idx``, ``numel``)."""

    def __repr__(self) -> str:
        return f"FlattenedTensorMetadata({vars(self)})"


class TensorPayloadError(ValueError):
    """A payload this server cannot read; the message says why and what to send instead."""


def _load_storage_bytes(data: bytes) -> Any:
    """``torch.storage._load_from_bytes`` without its unrestricted nested ``torch.load``."""
    return torch.load(io.BytesIO(data), weights_only=True)


class _PayloadUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if key == ("torch.storage", "_load_from_bytes"):
            return _load_storage_bytes
        if key in _CUDA:
            raise TensorPayloadError(
                "the tensors are CUDA IPC handles, which a CPU server cannot open: send CPU "
                "tensors (tensor.cpu()) shared with the 'file_system' strategy"
            )
        if key in _FD_SHARING:
            raise TensorPayloadError(
                "the tensors are shared by file descriptor (torch's default 'file_descriptor' "
                "strategy), which only the sender's own child processes can open: call "
                "torch.multiprocessing.set_sharing_strategy('file_system') before serializing"
            )
        if key == _BUCKET_METADATA:
            return BucketMetadata
        if module.startswith("sglang."):
            raise TensorPayloadError(
                f"{module}.{name} is not supported by the embedded server: send a plain list "
                "of (name, tensor) pairs (load_format null or 'direct')"
            )
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == "torch" and name.endswith("Storage") and hasattr(torch, name):
            return getattr(torch, name)
        if key in _ALLOWED:
            return super().find_class(module, name)
        raise TensorPayloadError(f"the payload refers to {module}.{name}, which is not allowed")


def _unpickle_entry(serialized: Any, rank: int, field: str) -> Any:
    """The object pickled in entry ``rank`` of an SGLang payload."""
    if not isinstance(serialized, list) or not serialized:
        raise TensorPayloadError(f"{field} must be a non-empty list (one entry per TP rank)")
    if rank >= len(serialized):
        raise TensorPayloadError(f"{field} has {len(serialized)} entries, none for TP rank {rank}")
    entry = serialized[rank]
    if isinstance(entry, str):
        try:
            entry = base64.b64decode(entry, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise TensorPayloadError(f"{field}[{rank}] is not valid base64 ({exc})") from exc
    if not isinstance(entry, bytes | bytearray):
        raise TensorPayloadError(f"{field}[{rank}] must be a base64 string")
    try:
        value = _PayloadUnpickler(io.BytesIO(bytes(entry))).load()
    except TensorPayloadError:
        raise
    except Exception as exc:  # a truncated or foreign pickle, a vanished shared-memory file
        raise TensorPayloadError(
            f"{field}[{rank}] cannot be read: {type(exc).__name__}: {exc}"
        ) from exc
    return value


def decode_named_tensors(
    serialized: Any, rank: int = 0, field: str = "serialized_named_tensors"
) -> list[tuple[str, torch.Tensor]]:
    """The ``[(name, tensor), ...]`` of tensor-parallel ``rank`` in an SGLang payload."""
    value = _unpickle_entry(serialized, rank, field)
    if isinstance(value, dict):
        value = list(value.items())
    if not isinstance(value, list | tuple) or not all(
        isinstance(item, tuple | list)
        and len(item) == 2
        and isinstance(item[0], str)
        and isinstance(item[1], torch.Tensor)
        for item in value
    ):
        raise TensorPayloadError(f"{field}[{rank}] must hold a list of (name, tensor) pairs")
    return [(name, tensor) for name, tensor in value]


def decode_flattened_bucket(
    serialized: Any, rank: int = 0, field: str = "serialized_named_tensors"
) -> list[tuple[str, torch.Tensor]]:
    """The tensors of tensor-parallel ``rank`` in a ``flattened_bucket`` payload, each a view
    of the bucket's bytes; every record is checked against the bucket first."""
    value = _unpickle_entry(serialized, rank, field)
    where = f"{field}[{rank}]"
    if not isinstance(value, dict) or set(value) != {"flattened_tensor", "metadata"}:
        raise TensorPayloadError(
            f"{where}: a flattened_bucket payload is a dict of flattened_tensor and metadata"
        )
    flat, metadata = value["flattened_tensor"], value["metadata"]
    if not isinstance(flat, torch.Tensor) or flat.dim() != 1 or flat.dtype != torch.uint8:
        raise TensorPayloadError(f"{where}: flattened_tensor must be a 1-D uint8 tensor")
    if not isinstance(metadata, list | tuple) or not metadata:
        raise TensorPayloadError(f"{where}: metadata must be a non-empty list")
    tensors = []
    for k, meta in enumerate(metadata):
        missing = [f for f in _BUCKET_FIELDS if not hasattr(meta, f)]
        if not isinstance(meta, BucketMetadata) or missing:
            raise TensorPayloadError(
                f"{where}: metadata[{k}] must be a FlattenedTensorMetadata with "
                f"{', '.join(_BUCKET_FIELDS)}"
            )
        name, dtype, start, end = meta.name, meta.dtype, meta.start_idx, meta.end_idx
        shape = tuple(meta.shape) if isinstance(meta.shape, list | tuple) else None
        if (
            not isinstance(name, str)
            or not isinstance(dtype, torch.dtype)
            or shape is None
            or not all(type(d) is int and d >= 0 for d in shape)
            or not all(type(v) is int for v in (start, end, meta.numel))
        ):
            raise TensorPayloadError(f"{where}: metadata[{k}] has a field of the wrong type")
        size = math.prod(shape) * dtype.itemsize
        if not 0 <= start <= end <= flat.numel() or end - start != size or meta.numel != size:
            raise TensorPayloadError(
                f"{where}: tensor {name}: bytes [{start}, {end}) of a {flat.numel()}-byte bucket "
                f"do not hold shape {list(shape)} of {dtype} ({size} bytes)"
            )
        if start % dtype.itemsize:
            raise TensorPayloadError(
                f"{where}: tensor {name}: byte offset {start} is not aligned to {dtype}"
            )
        tensors.append((name, flat[start:end].view(dtype).reshape(shape)))
    return tensors
