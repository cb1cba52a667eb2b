"""Tensor layout changes between Hugging Face and Megatron, and tensor-parallel sharding.

Pure functions on tensors; the per-family modules say which one applies to which weight.
Megatron's fused QKV is grouped per KV head: ``[groups, (q_per_group + 2) * head_dim, ...]``
with the group's queries, then its key, then its value. SwiGLU's ``linear_fc1`` is
``[gate; up]`` globally and ``[gate_r; up_r]`` on tensor-parallel rank r.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# How a Megatron tensor is split across tensor-parallel ranks.
TP_REPLICATED = "replicated"
TP_COLUMN = "column"  # dim 0 (ColumnParallelLinear, VocabParallelEmbedding, fused QKV)
TP_ROW = "row"  # dim 1 (RowParallelLinear)
TP_SWIGLU = "swiglu"  # dim 0 of gate and up separately
TP_KINDS = (TP_REPLICATED, TP_COLUMN, TP_ROW, TP_SWIGLU)


def qkv_to_mcore(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_kv_heads: int
) -> torch.Tensor:
    """Fuse HF ``q [heads*d, ...]``, ``k, v [kv_heads*d, ...]`` into Megatron's grouped QKV."""
    head_dim = k.shape[0] // num_kv_heads
    rest = q.shape[1:]
    q_per_group = num_heads // num_kv_heads
    q = q.reshape(num_kv_heads, q_per_group * head_dim, *rest)
    k = k.reshape(num_kv_heads, head_dim, *rest)
    v = v.reshape(num_kv_heads, head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def qkv_from_mcore(
    qkv: torch.Tensor, num_heads: int, num_kv_heads: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split Megatron's grouped QKV back into HF ``q, k, v`` (inverse of :func:`qkv_to_mcore`)."""
    q_per_group = num_heads // num_kv_heads
    rest = qkv.shape[1:]
    head_dim = qkv.shape[0] // (num_kv_heads * (q_per_group + 2))
    grouped = qkv.reshape(num_kv_heads, (q_per_group + 2) * head_dim, *rest)
    q, k, v = torch.split(grouped, [q_per_group * head_dim, head_dim, head_dim], dim=1)
    return (
        q.reshape(-1, *rest).contiguous(),
        k.reshape(-1, *rest).contiguous(),
        v.reshape(-1, *rest).contiguous(),
    )


def swiglu_to_mcore(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Megatron's ``linear_fc1`` ``[gate; up]`` from HF ``gate_proj`` and ``up_proj``."""
    return torch.cat([gate, up], dim=0)


def swiglu_from_mcore(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """HF ``gate_proj, up_proj`` from Megatron's ``linear_fc1``."""
    gate, up = torch.chunk(fc1, 2, dim=0)
    return gate.contiguous(), up.contiguous()


def shard(kind: str, tensor: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This tensor-parallel rank's shard of a full Megatron tensor."""
    if kind == TP_REPLICATED or tp_size == 1:
        return tensor
    if kind == TP_COLUMN:
        return torch.chunk(tensor, tp_size, dim=0)[tp_rank].contiguous()
    if kind == TP_ROW:
        return torch.chunk(tensor, tp_size, dim=1)[tp_rank].contiguous()
    if kind == TP_SWIGLU:
        gate, up = torch.chunk(tensor, 2, dim=0)
        return torch.cat(
            [torch.chunk(gate, tp_size, dim=0)[tp_rank], torch.chunk(up, tp_size, dim=0)[tp_rank]]
        )
    raise ValueError(f"unknown tensor-parallel kind {kind!r}; known: {TP_KINDS}")


def unshard(kind: str, shards: Sequence[torch.Tensor]) -> torch.Tensor:
    """The full Megatron tensor from all tensor-parallel shards in rank order."""
    if kind == TP_REPLICATED or len(shards) == 1:
        return shards[0]
    if kind == TP_COLUMN:
        return torch.cat(list(shards), dim=0)
    if kind == TP_ROW:
        return torch.cat(list(shards), dim=1)
    if kind == TP_SWIGLU:
        halves = [torch.chunk(s, 2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    raise ValueError(f"unknown tensor-parallel kind {kind!r}; known: {TP_KINDS}")
