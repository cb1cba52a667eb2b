"""Scheduler properties, checked against brute force on small instances."""

from __future__ import annotations

import itertools
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oprd_mega.data.microbatches import model_dims
from oprd_mega.data.scheduler import (
    CostModel,
    ModelDims,
    balanced_partition,
    first_fit_pack,
    schedule_microbatches,
)
from oprd_mega.models import parse_hf_config

lengths_st = st.lists(st.integers(min_value=1, max_value=300), min_size=1, max_size=40)


def _optimal_bin_count(lengths: list[int], budget: int) -> int:
    """Fewest bins by brute force over assignments (tiny inputs only)."""
    n = len(lengths)
    for k in range(1, n + 1):
        for assignment in itertools.product(range(k), repeat=n):
            loads = [0] * k
            for i, b in enumerate(assignment):
                loads[b] += lengths[i]
            if max(loads) <= budget:
                return k
    return n


def _optimal_equal_partition_max(costs: list[float], parts: int) -> float:
    """The smallest possible maximum set cost over equal-size partitions (brute force)."""
    size = len(costs) // parts
    best = float("inf")
    for assignment in itertools.product(range(parts), repeat=len(costs)):
        counts = [assignment.count(p) for p in range(parts)]
        if any(c != size for c in counts):
            continue
        sums = [0.0] * parts
        for i, p in enumerate(assignment):
            sums[p] += costs[i]
        best = min(best, max(sums))
    return best


@settings(max_examples=200, deadline=None)
@given(lengths=lengths_st, budget=st.integers(min_value=1, max_value=600))
def test_first_fit_uses_every_sample_once_and_respects_budget(lengths, budget):
    bins = first_fit_pack(lengths, budget)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths)))
    for b in bins:
        assert len(b) == 1 or sum(lengths[i] for i in b) <= budget


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(min_value=1, max_value=10), min_size=1, max_size=7),
    budget=st.integers(min_value=10, max_value=20),
)
def test_first_fit_bin_count_near_optimal(lengths, budget):
    # First-fit decreasing uses at most 11/9 OPT + 6/9 bins (Dosa 2007).
    optimal = _optimal_bin_count(lengths, budget)
    assert len(first_fit_pack(lengths, budget)) <= 11 / 9 * optimal + 6 / 9


@settings(max_examples=60, deadline=None)
@given(
    costs=st.lists(st.integers(min_value=1, max_value=1000), min_size=2, max_size=8),
    parts=st.integers(min_value=2, max_value=3),
)
def test_balanced_partition_close_to_brute_force(costs, parts):
    costs = costs[: len(costs) - len(costs) % parts] or costs[:parts]
    if len(costs) < parts:
        return
    sets = balanced_partition([float(c) for c in costs], parts)
    assert sorted(i for s in sets for i in s) == list(range(len(costs)))
    assert {len(s) for s in sets} == {len(costs) // parts}
    ours = max(sum(costs[i] for i in s) for s in sets)
    optimal = _optimal_equal_partition_max([float(c) for c in costs], parts)
    assert ours <= optimal + max(costs) - min(costs) + 1e-9
    # Never worse than dealing sorted items round-robin, the naive equal-count split.
    order = sorted(range(len(costs)), key=lambda i: -costs[i])
    naive = max(sum(costs[i] for i in order[p::parts]) for p in range(parts))
    assert ours <= naive + 1e-9


@settings(max_examples=150, deadline=None)
@given(
    lengths=st.lists(st.integers(min_value=1, max_value=400), min_size=8, max_size=60),
    dp=st.integers(min_value=1, max_value=4),
    multiple=st.integers(min_value=1, max_value=2),
    budget=st.integers(min_value=64, max_value=1024),
)
def test_schedule_properties(lengths, dp, multiple, budget):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = schedule_microbatches(lengths, dp, budget, microbatch_multiple=multiple)
    merged = any("merging down" in str(w.message) for w in caught)
    assert len(plan.ranks) == dp
    counts = {len(r) for r in plan.ranks}
    assert len(counts) == 1
    assert plan.microbatches_per_rank % multiple == 0
    assert plan.microbatches_per_rank >= 1
    used = sorted(i for rank in plan.ranks for mb in rank for i in mb)
    assert used == list(range(len(lengths)))
    for rank in plan.ranks:
        for mb in rank:
            assert mb, "empty microbatch"
            assert merged or len(mb) == 1 or sum(lengths[i] for i in mb) <= budget
    assert sum(plan.rank_tokens) == sum(lengths)
    expected_costs = [
        sum(lengths[i] ** 2 + lengths[i] for mb in rank for i in mb) for rank in plan.ranks
    ]
    assert plan.rank_costs == pytest.approx(expected_costs)
    mean = sum(expected_costs) / dp
    assert plan.imbalance == pytest.approx(max(expected_costs) / mean - 1)


def test_oversized_sample_gets_own_microbatch_and_warning():
    with pytest.warns(UserWarning, match="exceed max_tokens_per_microbatch=100"):
        plan = schedule_microbatches([500, 10, 20, 30], 2, 100)
    assert plan.oversized == [0]
    assert [0] in [mb for rank in plan.ranks for mb in rank]


def test_too_few_samples_is_a_clear_error():
    with pytest.raises(ValueError, match="need at least 4"):
        schedule_microbatches([10, 10, 10], 2, 100, microbatch_multiple=2)


def test_balancing_on_skewed_lengths():
    lengths = [1000, 900, 600, 500, 400, 300, 200, 100]
    plan = schedule_microbatches(lengths, 2, 1000)
    assert plan.imbalance < 0.05


def test_merges_when_too_few_samples_to_split():
    # 5 single-sample microbatches, dp=4: splitting to 8 is impossible, so merge down to 4.
    with pytest.warns(UserWarning, match="merging down to 4"):
        plan = schedule_microbatches([100, 100, 100, 100, 100], 4, 100)
    assert plan.microbatches_per_rank == 1
    assert sorted(i for r in plan.ranks for mb in r for i in mb) == [0, 1, 2, 3, 4]


def test_cost_model_counts_attention_quadratic_and_teacher():
    student = ModelDims(num_layers=2, hidden_size=64, ffn_hidden_size=128, vocab_size=1000)
    teacher = ModelDims(num_layers=3, hidden_size=128, ffn_hidden_size=256)
    cost = CostModel(student, teachers=(("teacher", teacher),))
    h, f, v = 64, 128, 1000

    def forward(dims_layers, hh, ff, vv, length):
        per_token = 2 * (4 * hh * hh + 3 * hh * ff)
        return dims_layers * (per_token * length + 2 * hh * length**2) + 2 * hh * vv * length

    for length in (1, 17, 256):
        expected = 3 * forward(2, h, f, v, length) + forward(3, 128, 256, 0, length)
        assert cost.cost(length) == pytest.approx(expected)
    # Quadratic: doubling a long sequence more than doubles its cost.
    assert cost.cost(4096) > 2.2 * cost.cost(2048)
    with pytest.raises(ValueError, match=r"ModelDims\.hidden_size"):
        ModelDims(num_layers=1, hidden_size=0, ffn_hidden_size=1)


def test_cost_model_changes_balance():
    student = ModelDims(num_layers=2, hidden_size=64, ffn_hidden_size=128)
    lengths = [800, 100, 100, 100, 100, 100, 100, 100, 100, 100]
    plan = schedule_microbatches(lengths, 2, 800, CostModel(student))
    costs = [CostModel(student).cost(n) for n in lengths]
    sums = [sum(costs[i] for mb in rank for i in mb) for rank in plan.ranks]
    assert plan.rank_costs == pytest.approx(sums)


def test_balanced_partition_near_optimal_on_random_instances():
    # Seeded instances, checked against brute force: sorted round-robin is up to ~40% worse.
    import random

    rng = random.Random(0)
    excess = []
    for _ in range(150):
        parts = rng.choice([2, 3])
        n = parts * rng.choice([2, 3]) if parts == 3 else rng.choice([4, 6, 8])
        costs = [float(rng.randint(1, 1000)) for _ in range(n)]
        sets = balanced_partition(costs, parts)
        ours = max(sum(costs[i] for i in s) for s in sets)
        excess.append(ours / _optimal_equal_partition_max(costs, parts) - 1)
    assert max(excess) <= 0.05
    assert sum(excess) / len(excess) <= 0.005


def test_model_dims_of_a_hf_config():
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=96, intermediate_size=160, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=2, head_dim=16, vocab_size=1000,
    )  # fmt: skip
    args = parse_hf_config(config.to_dict())
    dims = model_dims(args)
    assert (dims.num_layers, dims.hidden_size, dims.ffn_hidden_size) == (3, 96, 160)
    assert (dims.kv_size, dims.vocab_size) == (32, 1000)
    teacher = model_dims(args, num_layers=2, lm_head=False)
    assert (teacher.num_layers, teacher.vocab_size) == (2, 0)
    # Linear FLOPs per token per layer match 2 x the layer's matmul parameter count.
    from transformers import LlamaForCausalLM

    layer = LlamaForCausalLM(config).model.layers[0]
    matmul_params = sum(p.numel() for n, p in layer.named_parameters() if "norm" not in n)
    one_token = model_dims(args, num_layers=1, lm_head=False).forward_flops(1)
    assert one_token == pytest.approx(2 * matmul_params + 2 * 96)
    with pytest.raises(ValueError, match="outside 1..3"):
        model_dims(args, num_layers=4)


ROUTES = [("a",), ("b",), ("a", "b"), ()]


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(min_value=1, max_value=300), min_size=8, max_size=40),
    route_ids=st.lists(st.integers(min_value=0, max_value=3), min_size=40, max_size=40),
    dp=st.integers(min_value=1, max_value=4),
    budget=st.integers(min_value=64, max_value=1024),
)
def test_routed_microbatches_hold_one_route_and_every_sample_once(lengths, route_ids, dp, budget):
    routes = [ROUTES[k] for k in route_ids[: len(lengths)]]
    if len(set(routes)) > len(lengths) // dp:  # more routes than microbatches can hold
        routes = [routes[0]] * len(lengths)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = schedule_microbatches(lengths, dp, budget, routes=routes)
    used = sorted(i for rank in plan.ranks for mb in rank for i in mb)
    assert used == list(range(len(lengths)))
    assert len({len(rank) for rank in plan.ranks}) == 1
    for rank in plan.ranks:
        for mb in rank:
            assert len({routes[i] for i in mb}) == 1, (mb, [routes[i] for i in mb])


def test_routed_merge_joins_bins_of_one_route_and_says_when_it_cannot():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = schedule_microbatches([100] * 5, 4, 100, routes=[("a",)] * 3 + [("b",)] * 2)
    assert plan.microbatches_per_rank == 1
    for rank in plan.ranks:
        assert len({("a",) if i < 3 else ("b",) for i in rank[0]}) == 1
    with warnings.catch_warnings(), pytest.raises(ValueError, match="holds one route"):
        warnings.simplefilter("ignore")
        schedule_microbatches([100] * 3, 2, 100, routes=[("a",), ("b",), ("c",)])


def test_cost_model_counts_only_the_routed_teachers():
    student = ModelDims(num_layers=2, hidden_size=64, ffn_hidden_size=128)
    small = ModelDims(num_layers=3, hidden_size=64, ffn_hidden_size=128)
    big = ModelDims(num_layers=6, hidden_size=256, ffn_hidden_size=512)
    cost = CostModel(student, teachers=(("small", small), ("big", big)))
    alone = 3 * student.forward_flops(100)
    assert cost.cost(100, ("small",)) == pytest.approx(alone + small.forward_flops(100))
    assert cost.cost(100, ("big",)) == pytest.approx(alone + big.forward_flops(100))
    assert cost.cost(100, ()) == pytest.approx(alone)
    both = alone + small.forward_flops(100) + big.forward_flops(100)
    assert cost.cost(100) == pytest.approx(both)
    # the big teacher's samples weigh more: balanced by cost, not by count
    plan = schedule_microbatches([100] * 8, 2, 100, cost, routes=[("big",)] * 2 + [("small",)] * 6)
    big_ranks = [sum(i < 2 for mb in rank for i in mb) for rank in plan.ranks]
    assert sorted(big_ranks) == [1, 1]
