"""Exact global selection of the lowest scores, fast on CPU and GPU.

``torch.kthvalue`` copies and partially sorts everything (~150 ms per 10M values on a 2-core CPU, and ~200×
slower than ``topk`` on an H100). On CPU we read a fixed random sample to bracket the k-th value, count what lies
below the bracket and run ``kthvalue`` only inside it; on GPU, ``topk`` on the smaller side. Both are exact.
Ties at the k-th value are split by layer order so the pruned count is exact.
"""

from __future__ import annotations

import math

import torch

SMALL = 1 << 17  # below this, topk is already fast
SAMPLE = 1 << 16


def _topk_kth(values: torch.Tensor, k: int) -> torch.Tensor:
    n = values.numel()
    if k <= n - k + 1:
        return torch.topk(values, k, largest=False, sorted=False).values.max()
    return torch.topk(values, n - k + 1, largest=True, sorted=False).values.min()


def kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest (1-indexed) of a 1-D tensor of finite values, as a 0-d tensor."""
    n = values.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k={k} outside 1..{n}")
    if values.is_cuda or n <= SMALL:
        return _topk_kth(values, k)
    generator = torch.Generator().manual_seed(n + k)  # fixed: the same input always takes the same path
    sample = values[torch.randint(n, (SAMPLE,), generator=generator)].sort().values
    q = k / n
    margin = 5.0 * math.sqrt(q * (1.0 - q) / SAMPLE) + 2.0 / SAMPLE  # ≈5 standard deviations of the sample quantile
    lo_index, hi_index = math.floor((q - margin) * SAMPLE), math.ceil((q + margin) * SAMPLE)
    lo = sample[lo_index] if lo_index >= 0 else values.new_tensor(float("-inf"))
    hi = sample[hi_index] if hi_index < SAMPLE else values.new_tensor(float("inf"))
    below = int((values < lo).sum())
    window = values[(values >= lo) & (values <= hi)]
    if below < k <= below + window.numel():
        return torch.kthvalue(window, k - below).values
    return torch.kthvalue(values, k).values  # the bracket missed (odds well under one in a million)


def lowest_counts(scores: list[torch.Tensor], sizes: list[int], budget_elements: int) -> list[int]:
    """Per layer, how many of its lowest-scored groups fall in the globally lowest ``budget_elements`` elements.

    ``scores`` are 1-D group scores (-inf = already pruned); ``sizes`` the elements per group of each layer.
    """
    if budget_elements <= 0 or not scores:
        return [0] * len(scores)
    if len(set(sizes)) == 1:
        return _equal_size_counts(scores, round(budget_elements / sizes[0]))
    return _sorted_counts(scores, sizes, budget_elements)


def _equal_size_counts(scores: list[torch.Tensor], k: int) -> list[int]:
    k = min(k, sum(s.numel() for s in scores))
    neg = torch.stack([torch.isneginf(s).sum() for s in scores]).tolist()
    if k <= sum(neg):  # fewer than already pruned: take them in layer order
        return _fill_in_order([0] * len(scores), neg, k)
    flat = torch.cat(scores)
    v = kth_smallest(flat[flat > float("-inf")], k - sum(neg))
    below = torch.stack([(s < v).sum() for s in scores]).tolist()
    ties = torch.stack([(s == v).sum() for s in scores]).tolist()
    return _fill_in_order(below, ties, k)


def _fill_in_order(counts: list[int], extra: list[int], k: int) -> list[int]:
    remaining = k - sum(counts)
    result = list(counts)
    for i, available in enumerate(extra):
        take = min(available, remaining)
        result[i] += take
        remaining -= take
    return result


def _sorted_counts(scores: list[torch.Tensor], sizes: list[int], budget_elements: int) -> list[int]:
    device = scores[0].device
    flat = torch.cat(scores)
    layer = torch.cat([torch.full((s.numel(),), i, device=device) for i, s in enumerate(scores)])
    group_size = torch.cat([torch.full((s.numel(),), sizes[i], device=device) for i, s in enumerate(scores)])
    order = torch.argsort(flat, stable=True)
    cumulative = group_size[order].cumsum(0)
    n = int(torch.searchsorted(cumulative, torch.tensor(budget_elements, device=device), right=True))
    if n < flat.numel() and abs(int(cumulative[n]) - budget_elements) < abs(budget_elements - (int(cumulative[n - 1]) if n else 0)):
        n += 1  # the next group lands nearer the budget
    return torch.bincount(layer[order[:n]], minlength=len(scores)).tolist()
