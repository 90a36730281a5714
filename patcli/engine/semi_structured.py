"""2:4 semi-structured sparse kernels on CUDA (``torch.sparse.to_sparse_semi_structured``), used only where faster.

2:4 sparsity can run on sparse tensor cores, but whether it beats the dense kernel depends on the shape and the
batch (BENCHMARKS.md, gpu: 1.13–1.32× for large fp16 weights at 8192 tokens on an H100, 0.02–0.08× at 64). So every layer is
timed both ways on the machine at hand and converted only when the sparse kernel wins.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def is_2_to_4(weight: torch.Tensor) -> bool:
    rows, cols = weight.shape
    return cols % 4 == 0 and bool(((weight != 0).reshape(rows, cols // 4, 4).sum(-1) <= 2).all())


def _time_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / repeats


def time_layer(weight: torch.Tensor, tokens: int, dtype: torch.dtype, repeats: int = 50) -> dict[str, float]:
    """Dense vs 2:4 sparse ``F.linear`` for this weight at ``tokens`` input rows; checks they agree."""
    from torch.sparse import to_sparse_semi_structured

    dense = weight.detach().to("cuda", dtype)
    sparse = to_sparse_semi_structured(dense)
    x = torch.randn(tokens, dense.shape[1], device="cuda", dtype=dtype)
    torch.testing.assert_close(F.linear(x, sparse), F.linear(x, dense), rtol=2e-2, atol=2e-2)
    dense_ms = _time_ms(lambda: F.linear(x, dense), repeats)
    sparse_ms = _time_ms(lambda: F.linear(x, sparse), repeats)
    return {"dense_ms": dense_ms, "sparse_ms": sparse_ms, "speedup": dense_ms / sparse_ms}


def plan(model: nn.Module, tokens: int, dtype: torch.dtype = torch.float16) -> dict[str, dict[str, float]]:
    """For every 2:4 Linear layer (shapes the kernels take), the measured speedup and whether to convert it."""
    decisions = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.weight.shape[0] % 64 == 0 and module.weight.shape[1] % 64 == 0 \
                and is_2_to_4(module.weight):
            timing = time_layer(module.weight, tokens, dtype)
            decisions[name] = {**timing, "convert": timing["speedup"] > 1.0}
    return decisions


def apply(model: nn.Module, decisions: dict[str, dict], dtype: torch.dtype = torch.float16) -> nn.Module:
    """Swap the weights of the layers a plan converts for semi-structured sparse tensors (inference only)."""
    from torch.sparse import to_sparse_semi_structured

    model.to("cuda", dtype)
    for name, decision in decisions.items():
        if decision["convert"]:
            module = model.get_submodule(name)
            module.weight = nn.Parameter(to_sparse_semi_structured(module.weight.detach()), requires_grad=False)
    return model
