"""Core attention for the local (non Transformer Engine) spec through PyTorch's fused SDPA.

Megatron's local ``DotProductAttention`` materialises the ``[batch, heads, seq, seq]`` score
matrix (and keeps its softmax for backward): at 2,048 tokens that is hundreds of MiB per layer,
and it has no packed-sequence (THD) support. :class:`SDPAttention` keeps its parameters,
checkpoint keys and arithmetic (scale, causal mask, mask semantics, dropout under Megatron's RNG
tracker) but calls ``torch.nn.functional.scaled_dot_product_attention``, whose flash / memory
efficient kernels (CPU and CUDA) never hold the score matrix. Packed sequences (``thd``) are
attended one sequence at a time (causal, no mask tensor), so a packed row costs the sum of its
sequences' squared lengths, not the square of the row.
"""

from __future__ import annotations

import contextlib
import itertools

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class SDPAttention(DotProductAttention):
    """Drop-in for Megatron's local ``DotProductAttention`` (same constructor and state).

    Unlike Megatron's softmax, a query whose every key is masked out gets NaN (SDPA's answer)
    rather than a uniform average; no caller passes such a mask.
    """

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
        """``[sq, b, np, hn]`` inputs -> ``[sq, b, np * hn]``; packed: ``[t, np, hn]`` ->
        ``[t, np * hn]``."""
        if attention_bias is not None:
            raise ValueError("SDPAttention: attention_bias is not supported")
        if packed_seq_params is not None:
            return self._packed(query, key, value, attention_mask, packed_seq_params)
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        sq, sk = query.shape[0], key.shape[0]
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
        if bounds[0] != 0 or bounds[-1] != query.shape[0]:
            raise ValueError(
                f"SDPAttention: cu_seqlens cover tokens {bounds[0]}..{bounds[-1]}, the packed "
                f"row holds {query.shape[0]}"
            )
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
