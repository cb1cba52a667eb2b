"""Core attention for the local (non Transformer Engine) spec through PyTorch's fused SDPA.

Megatron's local ``DotProductAttention`` materialises the ``[batch, heads, seq, seq]`` score
matrix (and keeps its softmax for backward): at 2,048 tokens that is hundreds of MiB per layer,
and it has no packed-sequence (THD) support. :class:`SDPAttention` keeps its parameters,
checkpoint keys and arithmetic (scale, causal mask, mask semantics, dropout under Megatron's RNG
tracker) but calls ``torch.nn.functional.scaled_dot_product_attention``, whose flash / memory
efficient kernels (CPU and CUDA) never hold the score matrix. Packed sequences (``thd``) are
attended one sequence at a time (causal, no mask tensor), so a packed row costs the sum of its
sequences' squared lengths, not the square of the row.

Megatron's local attention refuses context parallelism (only Transformer Engine's runs it,
selected with the TE spec). Here, under CP, each rank all-gathers K and V over the
context-parallel group (Megatron's sequence-parallel gather, whose backward reduce-scatters dK
and dV), puts them back in sequence order and attends its own queries, the load-balanced chunks
of :mod:`oprd_mega.parallel.context`, with a causal mask built from their positions; a packed row
does so within each sequence.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from oprd_mega.parallel.context import context_positions, gathered_positions


def thd_params(cu_seqlens: torch.Tensor) -> PackedSeqParams:
    """Megatron's THD description of sequences packed end to end at offsets ``cu_seqlens``
    (``[0, end_1, ..., end_n]``, int32, on the attention's device): self-attention, so the
    query and key/value offsets are the same."""
    longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_kv=cu_seqlens,
        max_seqlen_q=longest,
        max_seqlen_kv=longest,
    )


class SDPAttention(DotProductAttention):
    """Drop-in for Megatron's local ``DotProductAttention`` (same constructor and state).

    Unlike Megatron's softmax, a query whose every key is masked out gets NaN (SDPA's answer)
    rather than a uniform average; no caller passes such a mask.
    """

    def __init__(self, config, layer_number, attn_mask_type, attention_type, **kwargs) -> None:
        # Megatron's local attention asserts context_parallel_size == 1; this one gathers K/V
        without_cp = copy.copy(config)
        without_cp.context_parallel_size = 1
        super().__init__(without_cp, layer_number, attn_mask_type, attention_type, **kwargs)
        self.config = config
        pg_collection = kwargs.get("pg_collection")
        self.cp_group = (
            getattr(pg_collection, "cp", None) or parallel_state.get_context_parallel_group()
            if config.context_parallel_size > 1
            else None
        )
        unsupported = {
            "apply_query_key_layer_scaling": config.apply_query_key_layer_scaling,
            "window_size": config.window_size is not None,
            "softmax_type != 'vanilla'": config.softmax_type != "vanilla",
        }
        named = [name for name, active in unsupported.items() if active]
        if named:
            raise ValueError(f"SDPAttention does not support {', '.join(named)}")

    def forward(  # type: ignore[override]
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        """``[sq, b, np, hn]`` inputs -> ``[sq, b, np * hn]``; packed: ``[t, np, hn]`` ->
        ``[t, np * hn]``."""
        if attention_bias is not None:
            raise ValueError("SDPAttention: attention_bias is not supported")
        if packed_seq_params is not None:
            return self._packed(query, key, value, attention_mask, packed_seq_params)
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        sq, sk = query.shape[0], key.shape[0]
        if self.cp_group is not None:
            if attention_mask is not None or mask_type != AttnMaskType.causal:
                raise ValueError(
                    "SDPAttention: context parallelism supports causal attention without an "
                    "attention_mask only"
                )
            return self._context_parallel(query, key, value, [0, sq * self.cp_group.size()])
        if attention_mask is not None:  # as in Megatron's softmax, it replaces the causal mask
            allowed = ~attention_mask.to(device=query.device, dtype=torch.bool)
            return self._attend(query, key, value, allowed, causal=False)
        causal = mask_type == AttnMaskType.causal and sq > 1
        if causal and sq != sk:
            raise ValueError(f"SDPAttention: causal attention with {sq} queries and {sk} keys")
        return self._attend(query, key, value, None, causal=causal)

    def _packed(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        params: PackedSeqParams,
    ) -> torch.Tensor:
        """Causal attention within each sequence of a packed ``[t, np, hn]`` row."""
        if params.qkv_format != "thd":
            raise ValueError(
                f"SDPAttention: packed qkv_format {params.qkv_format!r} is not supported "
                "(only 'thd')"
            )
        if attention_mask is not None:
            raise ValueError("SDPAttention: packed sequences take no attention_mask")
        bounds = params.cu_seqlens_q.tolist()
        if params.cu_seqlens_kv.tolist() != bounds:
            raise ValueError("SDPAttention: packed queries and keys must share cu_seqlens")
        cp = 1 if self.cp_group is None else self.cp_group.size()
        if bounds[0] != 0 or bounds[-1] != query.shape[0] * cp:
            raise ValueError(
                f"SDPAttention: cu_seqlens cover tokens {bounds[0]}..{bounds[-1]}, the packed "
                f"row holds {query.shape[0]}" + (f" x cp {cp}" if cp > 1 else "")
            )
        if cp > 1:
            context = self._context_parallel(
                query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1), bounds
            )
            return context.squeeze(1)
        pieces = [
            self._attend(
                query[start:stop].unsqueeze(1),
                key[start:stop].unsqueeze(1),
                value[start:stop].unsqueeze(1),
                None,
                causal=stop - start > 1,
            ).squeeze(1)
            for start, stop in itertools.pairwise(bounds)
            if stop > start
        ]
        return torch.cat(pieces)

    def _context_parallel(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        bounds: Sequence[int],
    ) -> torch.Tensor:
        """Causal attention of this CP rank's ``[s / cp, b, n, h]`` queries (its load-balanced
        chunks of each sequence ``[bounds[i], bounds[i + 1])``) over every rank's K/V."""
        assert self.cp_group is not None
        cp, rank = self.cp_group.size(), self.cp_group.rank()
        heads = key.shape[-1]
        # one gather for K and V; its backward reduce-scatters dK/dV back to their owners
        gathered = gather_from_sequence_parallel_region(
            torch.cat([key, value], dim=-1), tensor_parallel_output_grad=True, group=self.cp_group
        )
        order = torch.argsort(gathered_positions(bounds, cp)).to(gathered.device)
        full_key, full_value = gathered.index_select(0, order).split(heads, dim=-1)
        positions = context_positions(bounds, cp, rank).to(query.device)
        pieces, local = [], 0
        for start, stop in itertools.pairwise(bounds):
            count = (stop - start) // cp
            if count == 0:
                continue
            mine = positions[local : local + count]
            keys = torch.arange(start, stop, device=query.device)
            pieces.append(
                self._attend(
                    query[local : local + count],
                    full_key[start:stop],
                    full_value[start:stop],
                    mine[:, None] >= keys[None, :],
                    causal=False,
                )
            )
            local += count
        return torch.cat(pieces)

    def _attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        allowed: torch.Tensor | None,
        causal: bool,
    ) -> torch.Tensor:
        """SDPA on ``[s, b, n, h]`` tensors (``allowed``: True where attention may go)."""
        groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        # [s, b, n, h] -> [b, n, s, h]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        dropout = self.attention_dropout.p if self.training else 0.0
        rng = (
            tensor_parallel.get_cuda_rng_tracker().fork()
            if dropout and not self.config.sequence_parallel
            else contextlib.nullcontext()
        )
        with rng:
            context = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=allowed,
                dropout_p=dropout,
                is_causal=causal,
                scale=self.softmax_scale,
            )
        # [b, n, s, h] -> [s, b, n * h]
        return context.permute(2, 0, 1, 3).reshape(q.shape[2], q.shape[0], -1)
