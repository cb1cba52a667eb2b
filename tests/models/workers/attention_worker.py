"""SDPAttention vs Megatron's own DotProductAttention in float64; prints one JSON line.

Run as a plain process (a world of one): ``python attention_worker.py``.
"""

from __future__ import annotations

import json

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from oprd_mega.models.attention import SDPAttention, thd_params
from oprd_mega.parallel import init_distributed

HEADS, GROUPS, HEAD_DIM = 6, 2, 16


def config(**extra) -> TransformerConfig:
    return TransformerConfig(
        num_layers=1,
        hidden_size=96,
        num_attention_heads=HEADS,
        num_query_groups=GROUPS,
        kv_channels=HEAD_DIM,
        attention_dropout=0.0,
        params_dtype=torch.float64,
        **extra,
    )


def modules(**extra) -> tuple[DotProductAttention, SDPAttention]:
    args = (config(**extra), 1, AttnMaskType.causal, "self")
    return DotProductAttention(*args), SDPAttention(*args)


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def qkv(seq: int, batch: int, generator: torch.Generator) -> list[torch.Tensor]:
    shapes = [(seq, batch, HEADS, HEAD_DIM), *[(seq, batch, GROUPS, HEAD_DIM)] * 2]
    return [
        torch.randn(s, generator=generator, dtype=torch.float64).to(DEVICE).requires_grad_()
        for s in shapes
    ]


def run(module: torch.nn.Module, tensors: list[torch.Tensor], weight: torch.Tensor, **kw):
    inputs = [t.detach().clone().requires_grad_() for t in tensors]
    out = module(*inputs, **kw)
    (out * weight).sum().backward()
    return out.detach(), [t.grad for t in inputs]


def max_diff(a, b) -> float:
    pairs = [(a[0], b[0]), *zip(a[1], b[1], strict=True)]
    return max(float((x - y).abs().max()) for x, y in pairs)


def main() -> None:
    init_distributed()
    generator = torch.Generator().manual_seed(0)
    reference, ours = modules()
    out = {}

    tensors = qkv(37, 2, generator)
    weight = torch.randn(37, 2, HEADS * HEAD_DIM, generator=generator, dtype=torch.float64)
    weight = weight.to(DEVICE)
    out["causal"] = max_diff(
        run(reference, tensors, weight, attention_mask=None),
        run(ours, tensors, weight, attention_mask=None),
    )

    mask = torch.rand(2, 1, 37, 37, generator=generator) < 0.4  # True: barred
    mask = (mask & ~torch.eye(37, dtype=torch.bool)).to(DEVICE)  # every query keeps one key
    out["explicit_mask"] = max_diff(
        run(reference, tensors, weight, attention_mask=mask),
        run(ours, tensors, weight, attention_mask=mask),
    )

    lengths = [5, 11, 1, 8]
    total = sum(lengths)
    packed = [t[:, 0].detach() for t in qkv(total, 1, generator)]  # [t, n, h]
    weight = torch.randn(total, 1, HEADS * HEAD_DIM, generator=generator, dtype=torch.float64)
    weight = weight.to(DEVICE)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    cu = cu.to(DEVICE)
    params = thd_params(cu)
    mine = run(ours, packed, weight[:, 0], attention_mask=None, packed_seq_params=params)
    pieces, grads = [], [[], [], []]
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        one = [t[start:end].unsqueeze(1) for t in packed]
        result, one_grads = run(reference, one, weight[start:end], attention_mask=None)
        pieces.append(result[:, 0])
        for store, grad in zip(grads, one_grads, strict=True):
            store.append(grad[:, 0])
    separate = (torch.cat(pieces), [torch.cat(g) for g in grads])
    out["packed_vs_separate"] = max_diff(mine, separate)
    out["packed_shape"] = list(mine[0].shape)
    out["device"] = str(DEVICE)

    for name, extra in {
        "layer_scaling": {"apply_query_key_layer_scaling": True, "fp16": True},
        "window": {"window_size": (4, 0)},
    }.items():
        try:
            modules(**extra)
            out[f"refused_{name}"] = ""
        except ValueError as exc:
            out[f"refused_{name}"] = str(exc)
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
