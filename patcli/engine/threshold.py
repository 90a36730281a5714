"""Exact global selection of the lowest scores, fast on CPU and GPU.

``torch.kthvalue`` copies and partially sorts everything (~150 ms per 10M values on a 2-core CPU, and ~200×
slower than ``topk`` on an H100). On CPU we read a fixed random sample to bracket the k-th value, count what lies
below the bracket and run ``kthvalue`` only inside it; on GPU, ``topk`` on the smaller side. Both are exact.
Ties at the k-th value are split by layer order so the pruned count is exact.
"""

from __future__ import annotations

import math

import torch

SMALL = 100_000  # below this, topk is faster than sampling (measured with and without pruned -inf scores)


def _count(mask: torch.Tensor) -> torch.Tensor:
    """Number of True entries (count_nonzero is several times faster than summing a bool tensor on CPU)."""
    return torch.count_nonzero(mask)


def _topk_kth(values: torch.Tensor, k: int) -> torch.Tensor:
    n = values.numel()
    if k <= n - k + 1:
        return torch.topk(values, k, largest=False, sorted=False).values.max()
    return torch.topk(values, n - k + 1, largest=True, sorted=False).values.min()


def kth_smallest(values: torch.Tensor | list[torch.Tensor], k: int) -> torch.Tensor:
    """The k-th smallest (1-indexed) value over one or several 1-D tensors (no NaNs; -inf allowed), as a 0-d tensor.

    Several tensors are never concatenated on CPU: the sample, the counts and the bracket are taken per tensor.
    """
    parts = [values] if torch.is_tensor(values) else list(values)
    n = sum(p.numel() for p in parts)
    if not 1 <= k <= n:
        raise ValueError(f"k={k} outside 1..{n}")
    if parts[0].is_cuda or n <= SMALL:
        return _topk_kth(torch.cat(parts) if len(parts) > 1 else parts[0], k)
    generator = torch.Generator().manual_seed(n + k)  # fixed: the same input always takes the same path

    def draw(count: int) -> torch.Tensor:
        return torch.cat([p[torch.randint(p.numel(), (max(1, round(count * p.numel() / n)),), generator=generator)]
                          for p in parts])

    size = min(max(8192, int(16 * math.sqrt(n))), 1 << 17)  # bigger inputs: bigger sample, narrower bracket
    sample, pruned = draw(size), 0
    if bool(torch.isneginf(sample).any()):  # already-pruned scores (-inf): count them exactly, bracket the rest
        pruned = int(sum(_count(torch.isneginf(p)) for p in parts))
        if k <= pruned:
            return parts[0].new_tensor(float("-inf"))
        sample = draw(min(n, int(size * n / (n - pruned)) + 1))
        sample = sample[sample > float("-inf")]
        if sample.numel() < 1024:  # almost everything is pruned: the few live values are cheap to take exactly
            return torch.kthvalue(torch.cat([p[p > float("-inf")] for p in parts]), k - pruned).values
    k_live, n_live = k - pruned, n - pruned
    size, q = sample.numel(), k_live / n_live
    margin = 5.0 * math.sqrt(q * (1.0 - q) / max(size, 1)) + 2.0 / max(size, 1)  # ≈5 std of the sample quantile
    lo_rank, hi_rank = math.floor((q - margin) * size), math.ceil((q + margin) * size)
    lo = torch.kthvalue(sample, lo_rank).values if lo_rank >= 1 else sample.new_tensor(float("-inf"))
    hi = torch.kthvalue(sample, hi_rank).values if hi_rank <= size else sample.new_tensor(float("inf"))
    if bool(lo == hi):  # heavy ties: the tied value itself is the answer
        below = int(sum(_count(p < lo) for p in parts))
        if below < k <= below + int(sum(_count(p == lo) for p in parts)):
            return lo
    # One comparison pass on the side of the bracket with fewer values, then work only on what passed.
    if (1.0 - q) * n_live < pruned + q * n_live:
        upper = torch.cat([p[p >= lo] for p in parts])
        below, window = n - upper.numel(), upper[upper <= hi]
    else:
        lower = torch.cat([p[p <= hi] for p in parts])
        window = lower[lower >= lo]
        below = lower.numel() - window.numel()
    if below < k <= below + window.numel():
        return torch.kthvalue(window, k - below).values
    return torch.kthvalue(torch.cat(parts), k).values  # the bracket missed (odds well under one in a million)


def keep_all_but_lowest(scores: torch.Tensor, n_prune: int, cut: torch.Tensor | None = None) -> torch.Tensor:
    """Keep flags (1-D) that drop exactly the ``n_prune`` lowest scores; ties at the cut go by index order.

    ``cut``, when known (a global threshold already found it), saves the selection: it is checked, not trusted.
    """
    if n_prune <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    if n_prune >= scores.numel():
        return torch.zeros_like(scores, dtype=torch.bool)
    for attempt in (cut, None):
        threshold = kth_smallest(scores, n_prune) if attempt is None else attempt
        keep = scores > threshold
        at_or_below = scores.numel() - int(_count(keep))
        if at_or_below == n_prune:  # the usual case: no tie straddles the cut
            return keep
        tie = scores == threshold
        if at_or_below - int(_count(tie)) <= n_prune <= at_or_below:
            break
    keep[tie.nonzero().squeeze(1)[n_prune - at_or_below :]] = True  # ties kept from the back, pruned in index order
    return keep


def lowest_counts(
    scores: list[torch.Tensor], sizes: list[int], budget_elements: int
) -> tuple[list[int], torch.Tensor | None]:
    """Per layer, how many of its lowest-scored groups fall in the globally lowest ``budget_elements`` elements.

    ``scores`` are 1-D group scores (-inf = already pruned); ``sizes`` the elements per group of each layer.
    Returns the counts and, for equal-sized groups, the threshold value (the k-th smallest score).
    """
    if budget_elements <= 0 or not scores:
        return [0] * len(scores), None
    if len(set(sizes)) == 1:
        return _equal_size_counts(scores, round(budget_elements / sizes[0]))
    return _sorted_counts(scores, sizes, budget_elements), None


def _equal_size_counts(scores: list[torch.Tensor], k: int) -> tuple[list[int], torch.Tensor | None]:
    k = min(k, sum(s.numel() for s in scores))
    if k <= 0:
        return [0] * len(scores), None
    v = kth_smallest(scores, k)
    below = torch.stack([_count(s < v) for s in scores]).tolist()
    ties = torch.stack([_count(s == v) for s in scores]).tolist()
    return _fill_in_order(below, ties, k), v


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
