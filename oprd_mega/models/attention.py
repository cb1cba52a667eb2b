"""Core attention for the local (non Transformer Engine) spec through PyTorch's fused SDPA.

Megatron's local ``DotProductAttention`` materialises the ``[batch, heads, seq, seq]`` score
matrix (and keeps its softmax for backward): at 2,048 tokens that is hundreds of MiB per layer,
and it has no packed-sequence (THD) support. :class:`SDPAttention` keeps its parameters,
checkpoint keys and arithmetic (scale, causal mask, mask semantics, dropout under Megatron's RNG
tracker) but calls ``torch.nn.functional.scaled_dot_product_attention``, whose flash / memory
efficient kernels (CPU and CUDA) never hold the score matrix. Packed sequences (``thd``) become a
block-diagonal causal mask built from ``cu_seqlens``.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


def packed_causal_mask(
    cu_seqlens_q: torch.Tensor, cu_seqlens_kv: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """``[tq, tk]`` bool mask (True = may attend): causal within each packed sequence only.

    Query and key sequences are aligned at their ends (as in flash attention), so equal
    ``cu_seqlens`` give the plain block-diagonal causal mask.
    """
    q_lengths = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).to(device)
    kv_lengths = (cu_seqlens_kv[1:] - cu_seqlens_kv[:-1]).to(device)
    segments = torch.arange(q_lengths.numel(), device=device)
    q_segment = segments.repeat_interleave(q_lengths)
    kv_segment = segments.repeat_interleave(kv_lengths)
    # position from the end of its own sequence, so that causality lines up the ends
    q_from_end = _from_end(cu_seqlens_q.to(device), q_segment)
    kv_from_end = _from_end(cu_seqlens_kv.to(device), kv_segment)
    same = q_segment[:, None] == kv_segment[None, :]
    return same & (kv_from_end[None, :] >= q_from_end[:, None])


def _from_end(cu_seqlens: torch.Tensor, segment: torch.Tensor) -> torch.Tensor:
    index = torch.arange(segment.numel(), device=segment.device)
    return cu_seqlens[1:][segment] - 1 - index


class SDPAttention(DotProductAttention):
    """Drop-in for Megatron's local ``DotProductAttention`` (same constructor and state)."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, **kwargs) -> None:
        super().__init__(config, layer_number, attn_mask_type, attention_type, **kwargs)
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
        """``[sq, b, np, hn]`` (or ``[t, np, hn]`` packed) inputs -> ``[sq, b, np * hn]``."""
        if attention_bias is not None:
            raise ValueError("SDPAttention: attention_bias is not supported")
        packed = packed_seq_params is not None
        if packed:
            if packed_seq_params.qkv_format != "thd":
                raise ValueError(
                    f"SDPAttention: packed qkv_format {packed_seq_params.qkv_format!r} "
                    "is not supported (only 'thd')"
                )
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        # [s, b, n, h] -> [b, n, s, h]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        allowed, causal = self._mask(
            attention_mask, mask_type, packed_seq_params, q.shape[2], k.shape[2], q.device
        )
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
        context = context.permute(2, 0, 1, 3).reshape(q.shape[2], q.shape[0], -1)
        return context.squeeze(1) if packed else context

    def _mask(
        self,
        attention_mask: torch.Tensor | None,
        mask_type: AttnMaskType,
        packed_seq_params: PackedSeqParams | None,
        sq: int,
        sk: int,
        device: torch.device,
    ) -> tuple[torch.Tensor | None, bool]:
        """SDPA's ``(attn_mask, is_causal)``; Megatron masks are True where attention is barred.

        As in Megatron's softmax, an explicit mask replaces the causal one.
        """
        if packed_seq_params is not None:
            if attention_mask is not None:
                raise ValueError("SDPAttention: packed sequences take no attention_mask")
            cu_q, cu_kv = packed_seq_params.cu_seqlens_q, packed_seq_params.cu_seqlens_kv
            if int(cu_q[-1]) != sq or int(cu_kv[-1]) != sk:
                raise ValueError(
                    f"SDPAttention: cu_seqlens cover {int(cu_q[-1])}/{int(cu_kv[-1])} tokens, "
                    f"the packed row holds {sq}/{sk}"
                )
            return packed_causal_mask(cu_q, cu_kv, device), False
        if attention_mask is not None:
            return ~attention_mask.to(device=device, dtype=torch.bool), False
        causal = mask_type == AttnMaskType.causal and sq > 1
        if causal and sq != sk:
            raise ValueError(f"SDPAttention: causal attention with {sq} queries and {sk} keys")
        return None, causal
