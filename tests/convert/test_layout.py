"""QKV / SwiGLU layout and tensor-parallel sharding against explicit per-head references."""

import pytest
import torch

from oprd_mega.convert import layout


def explicit_qkv(q, k, v, heads, kv_heads, head_dim):
    """Megatron's grouped QKV built head by head (independent of the reshape code)."""
    rows = []
    per = heads // kv_heads
    for g in range(kv_heads):
        for h in range(g * per, (g + 1) * per):
            rows.append(q[h * head_dim : (h + 1) * head_dim])
        rows.append(k[g * head_dim : (g + 1) * head_dim])
        rows.append(v[g * head_dim : (g + 1) * head_dim])
    return torch.cat(rows)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "extra"), [(6, 2, 16, (96,)), (4, 4, 8, ()), (8, 1, 4, (5,))]
)
def test_qkv_layout_and_inverse(heads, kv_heads, head_dim, extra) -> None:
    q = torch.randn(heads * head_dim, *extra)
    k, v = torch.randn(kv_heads * head_dim, *extra), torch.randn(kv_heads * head_dim, *extra)
    fused = layout.qkv_to_mcore(q, k, v, heads, kv_heads)
    assert torch.equal(fused, explicit_qkv(q, k, v, heads, kv_heads, head_dim))
    back = layout.qkv_from_mcore(fused, heads, kv_heads)
    assert all(torch.equal(a, b) for a, b in zip(back, (q, k, v), strict=True))


def test_swiglu_shards_hold_gate_and_up_of_the_same_rows() -> None:
    gate, up = torch.randn(8, 3), torch.randn(8, 3)
    fc1 = layout.swiglu_to_mcore(gate, up)
    shards = [layout.shard(layout.TP_SWIGLU, fc1, r, 4) for r in range(4)]
    for r, s in enumerate(shards):
        assert torch.equal(s, torch.cat([gate[2 * r : 2 * r + 2], up[2 * r : 2 * r + 2]]))
    assert torch.equal(layout.unshard(layout.TP_SWIGLU, shards), fc1)
    assert all(
        torch.equal(a, b) for a, b in zip(layout.swiglu_from_mcore(fc1), (gate, up), strict=True)
    )


@pytest.mark.parametrize("kind", [layout.TP_COLUMN, layout.TP_ROW, layout.TP_REPLICATED])
def test_shard_unshard_round_trip(kind: str) -> None:
    t = torch.randn(8, 12)
    shards = [layout.shard(kind, t, r, 2) for r in range(2)]
    if kind == layout.TP_COLUMN:
        assert torch.equal(shards[1], t[4:])
    if kind == layout.TP_ROW:
        assert torch.equal(shards[1], t[:, 6:])
    assert torch.equal(layout.unshard(kind, shards), t)


def test_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown tensor-parallel kind"):
        layout.shard("diagonal", torch.ones(2), 0, 2)
