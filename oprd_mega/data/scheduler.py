"""Microbatch scheduling across data-parallel ranks: pure functions over sample lengths.

A step's samples are packed into microbatches under a token budget (first-fit decreasing), the
microbatch count is made a multiple of ``dp_size * microbatch_multiple`` (so every rank runs the
same number, as Megatron's pipeline schedule needs), and the microbatches are dealt to ranks
balanced by estimated cost (balanced Karmarkar-Karp differencing, then pairwise swaps). The cost
counts the student's forward + backward and the teacher's forward, attention's quadratic term
included, because packed sequences attend only within themselves.
"""

from __future__ import annotations

import heapq
import itertools
import warnings
from collections.abc import Hashable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelDims:
    """The sizes of one transformer that decide its FLOPs per token.

    ``num_layers`` counts the layers actually run (for the teacher: up to the deepest tapped
    layer); ``kv_size`` is ``num_query_groups * head_dim`` (``hidden_size`` without GQA);
    ``q_size`` is ``num_attention_heads * head_dim`` (``hidden_size`` unless the heads are wider
    or narrower than the model, as in Qwen3-4B); ``vocab_size`` is 0 when no LM head runs (the
    teacher).
    """

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    vocab_size: int = 0
    kv_size: int | None = None
    gated_mlp: bool = True
    q_size: int | None = None

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "ffn_hidden_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelDims.{name} must be positive, got {getattr(self, name)}")
        if self.vocab_size < 0:
            raise ValueError(f"ModelDims.vocab_size must be >= 0, got {self.vocab_size}")
        for name in ("kv_size", "q_size"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"ModelDims.{name} must be positive, got {value}")

    def forward_flops(self, length: int) -> float:
        """Forward FLOPs of one sequence of ``length`` tokens (matmuls only, causal attention)."""
        h = self.hidden_size
        kv = h if self.kv_size is None else self.kv_size
        q = h if self.q_size is None else self.q_size
        mlp_mats = 3 if self.gated_mlp else 2
        # Q and output projections, K and V projections, the MLP; 2 FLOPs per multiply-add.
        per_token_layer = 2 * (2 * h * q + 2 * h * kv + mlp_mats * h * self.ffn_hidden_size)
        # QK^T and AV over a causal mask: about length^2 / 2 pairs, 2 FLOPs each, both matmuls.
        attention_layer = 2.0 * q * length * length
        linear = self.num_layers * per_token_layer * length + 2.0 * h * self.vocab_size * length
        return float(linear + self.num_layers * attention_layer)


@dataclass(frozen=True)
class CostModel:
    """Cost of one sample: student forward + backward (3x forward) plus the forward of every
    teacher that runs on it: each of the named ``teachers`` when the sample's route names it
    (or when it has no route)."""

    student: ModelDims
    teachers: tuple[tuple[str, ModelDims], ...] = ()
    student_backward_factor: float = 3.0

    def cost(self, length: int, route: Sequence[str] | None = None) -> float:
        """Estimated FLOPs to train on one sequence of ``length`` tokens routed to ``route``
        (None: every teacher)."""
        total = self.student_backward_factor * self.student.forward_flops(length)
        for name, dims in self.teachers:
            if route is None or name in route:
                total += dims.forward_flops(length)
        return total


@dataclass(frozen=True)
class Schedule:
    """Each rank's microbatches as lists of sample indices, with cost statistics.

    ``ranks[r][m]`` lists the samples of microbatch ``m`` on data-parallel rank ``r``;
    ``imbalance`` is ``max(rank_costs) / mean(rank_costs) - 1`` (0 is perfect balance).
    """

    ranks: list[list[list[int]]]
    rank_costs: list[float]
    rank_tokens: list[int]
    imbalance: float
    oversized: list[int]

    @property
    def microbatches_per_rank(self) -> int:
        """The number of microbatches every rank runs."""
        return len(self.ranks[0]) if self.ranks else 0


def first_fit_pack(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Pack sample indices into bins of at most ``max_tokens`` tokens, longest first (FFD).

    A sample longer than ``max_tokens`` gets a bin of its own. Bins keep the order in which they
    were opened; inside a bin, samples are in decreasing length.
    """
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    loads: list[int] = []
    for i in order:
        length = lengths[i]
        for b, load in enumerate(loads):
            if load + length <= max_tokens:
                bins[b].append(i)
                loads[b] += length
                break
        else:
            bins.append([i])
            loads.append(length)
    return bins


def _split_to_count(bins: list[list[int]], lengths: Sequence[int], count: int) -> list[list[int]]:
    """Split the fullest multi-sample bins in two until there are ``count`` bins."""
    bins = [list(b) for b in bins]
    while len(bins) < count:
        splittable = [b for b in range(len(bins)) if len(bins[b]) > 1]
        if not splittable:
            raise ValueError(f"cannot make {count} microbatches from {len(lengths)} samples")
        b = max(splittable, key=lambda k: sum(lengths[i] for i in bins[k]))
        members = sorted(bins[b], key=lambda i: -lengths[i])
        left: list[int] = []
        right: list[int] = []
        left_load = right_load = 0
        for i in members:  # greedy halving keeps both halves under the original load
            if left_load <= right_load:
                left.append(i)
                left_load += lengths[i]
            else:
                right.append(i)
                right_load += lengths[i]
        bins[b] = left
        bins.append(right)
    return bins


def _merge_to_count(
    bins: list[list[int]],
    lengths: Sequence[int],
    count: int,
    routes: Sequence[Hashable] | None = None,
) -> list[list[int]]:
    """Merge the two lightest bins (of one route, with ``routes``) until there are ``count``."""
    bins = [list(b) for b in bins]
    while len(bins) > count:
        bins.sort(key=lambda b: sum(lengths[i] for i in b))
        if routes is None:
            bins = [bins[0] + bins[1], *bins[2:]]
            continue
        first: dict[Hashable, int] = {}
        pair = None
        for b, members in enumerate(bins):  # the lightest pair of bins that share a route
            route = routes[members[0]]
            if route not in first:
                first[route] = b
                continue
            load = sum(lengths[i] for i in bins[first[route]] + members)
            if pair is None or load < pair[0]:
                pair = (load, first[route], b)
        if pair is None:
            raise ValueError(
                f"cannot make {count} microbatches: {len(bins)} routes each fill one and a "
                "microbatch holds one route's samples"
            )
        _, a, b = pair
        merged = bins[a] + bins[b]
        bins = [merged] + [members for k, members in enumerate(bins) if k not in (a, b)]
    return bins


def balanced_partition(costs: Sequence[float], parts: int) -> list[list[int]]:
    """Split item indices into ``parts`` sets of equal size with balanced cost sums.

    Balanced largest-differencing (Karmarkar-Karp) over groups of ``parts`` items, followed by
    pairwise swaps between the heaviest and lightest sets while they lower the maximum.
    ``len(costs)`` must be a multiple of ``parts``.
    """
    if parts <= 0:
        raise ValueError(f"parts must be positive, got {parts}")
    if len(costs) % parts:
        raise ValueError(f"{len(costs)} items cannot be split into {parts} equal sets")
    if not costs:
        return [[] for _ in range(parts)]
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    tie = itertools.count()
    heap: list[tuple[float, int, list[tuple[float, list[int]]]]] = []
    for start in range(0, len(order), parts):
        sets = [(costs[i], [i]) for i in order[start : start + parts]]
        spread = max(s for s, _ in sets) - min(s for s, _ in sets)
        heapq.heappush(heap, (-spread, next(tie), sets))
    while len(heap) > 1:
        _, _, a = heapq.heappop(heap)
        _, _, b = heapq.heappop(heap)
        a = sorted(a, key=lambda s: s[0])
        b = sorted(b, key=lambda s: -s[0])
        merged = [(sa + sb, ia + ib) for (sa, ia), (sb, ib) in zip(a, b, strict=True)]
        spread = max(s for s, _ in merged) - min(s for s, _ in merged)
        heapq.heappush(heap, (-spread, next(tie), merged))
    result = [list(items) for _, items in heap[0][2]]
    _improve_by_swaps(result, costs)
    return result


def _improve_by_swaps(sets: list[list[int]], costs: Sequence[float], rounds: int = 64) -> None:
    """Swap one item between the heaviest and the lightest set while that lowers the maximum."""
    for _ in range(rounds):
        sums = [sum(costs[i] for i in s) for s in sets]
        hi = max(range(len(sets)), key=lambda k: sums[k])
        lo = min(range(len(sets)), key=lambda k: sums[k])
        gap = sums[hi] - sums[lo]
        if gap <= 0:
            return
        best: tuple[float, int, int] | None = None
        for x, y in itertools.product(range(len(sets[hi])), range(len(sets[lo]))):
            delta = costs[sets[hi][x]] - costs[sets[lo][y]]
            if 0 < delta < gap:
                new_max = max(sums[hi] - delta, sums[lo] + delta)
                if best is None or new_max < best[0]:
                    best = (new_max, x, y)
        if best is None:
            return
        _, x, y = best
        sets[hi][x], sets[lo][y] = sets[lo][y], sets[hi][x]


def schedule_microbatches(
    lengths: Sequence[int],
    dp_size: int,
    max_tokens_per_microbatch: int,
    cost_model: CostModel | None = None,
    microbatch_multiple: int = 1,
    routes: Sequence[tuple[str, ...] | None] | None = None,
) -> Schedule:
    """Plan every data-parallel rank's microbatches for one step.

    ``lengths`` are total (prompt + response) token counts per sample. Every sample is used
    exactly once; every rank gets the same number of microbatches, a multiple of
    ``microbatch_multiple`` (e.g. the virtual pipeline size). Without a cost model, the cost of a
    sample is its length squared plus its length (attention plus linear work). ``routes``: each
    sample's teachers; a microbatch then holds samples of one route only, so each teacher runs
    on exactly the samples routed to it, and the cost counts the route's teachers.
    """
    if dp_size <= 0:
        raise ValueError(f"dp_size must be positive, got {dp_size}")
    if microbatch_multiple <= 0:
        raise ValueError(f"microbatch_multiple must be positive, got {microbatch_multiple}")
    if any(length <= 0 for length in lengths):
        bad = next(i for i, length in enumerate(lengths) if length <= 0)
        raise ValueError(f"sample {bad} has length {lengths[bad]}; lengths must be positive")
    group = dp_size * microbatch_multiple
    if len(lengths) < group:
        raise ValueError(
            f"{len(lengths)} samples cannot fill dp_size={dp_size} x "
            f"microbatch_multiple={microbatch_multiple} microbatches; need at least {group}"
        )
    oversized = [i for i, length in enumerate(lengths) if length > max_tokens_per_microbatch]
    if oversized:
        warnings.warn(
            f"{len(oversized)} sample(s) exceed max_tokens_per_microbatch="
            f"{max_tokens_per_microbatch} (longest {max(lengths[i] for i in oversized)} tokens); "
            "each gets a microbatch of its own",
            stacklevel=2,
        )
    if routes is None:
        bins = first_fit_pack(lengths, max_tokens_per_microbatch)
    else:
        if len(routes) != len(lengths):
            raise ValueError(f"{len(routes)} routes for {len(lengths)} samples")
        bins = []
        for route in dict.fromkeys(routes):  # each route's samples packed on their own
            members = [i for i, r in enumerate(routes) if r == route]
            packed = first_fit_pack([lengths[i] for i in members], max_tokens_per_microbatch)
            bins += [[members[j] for j in b] for b in packed]
    target = -(-len(bins) // group) * group
    if target <= len(lengths):
        bins = _split_to_count(bins, lengths, target)
    else:  # too few samples to split further: merge the lightest microbatches instead
        target -= group
        warnings.warn(
            f"{len(lengths)} samples in {len(bins)} microbatches cannot be split into "
            f"{target + group}; "
            f"merging down to {target}, some microbatches exceed max_tokens_per_microbatch="
            f"{max_tokens_per_microbatch}",
            stacklevel=2,
        )
        bins = _merge_to_count(bins, lengths, target, routes)

    def sample_cost(i: int) -> float:
        if cost_model is None:
            return float(lengths[i]) ** 2 + float(lengths[i])
        return cost_model.cost(lengths[i], None if routes is None else routes[i])

    bin_costs = [sum(sample_cost(i) for i in b) for b in bins]
    parts = balanced_partition(bin_costs, dp_size)
    ranks = [[sorted(bins[b]) for b in sorted(part)] for part in parts]
    rank_costs = [sum(bin_costs[b] for b in part) for part in parts]
    rank_tokens = [sum(lengths[i] for b in part for i in bins[b]) for part in parts]
    mean = sum(rank_costs) / len(rank_costs)
    imbalance = max(rank_costs) / mean - 1.0 if mean > 0 else 0.0
    return Schedule(ranks, rank_costs, rank_tokens, imbalance, oversized)
