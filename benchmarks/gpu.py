"""GPU checks (run on a CUDA machine): 2:4 sparse kernels per shape, the CUDA training/export path, one global mask
update at scale, and PAT's per-step overhead. ``python -m benchmarks --only gpu``."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from patcli.engine import ALLOCATIONS, Pruner

from .common import interleaved, percent, ratio_stats, run_config, table
from .engine_speed import agp_through, mask_update


def semi_structured_table() -> str:
    from patcli.engine.semi_structured import time_layer

    rows = []
    for out_features, in_features in ((4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192)):
        weight = torch.randn(out_features, in_features)
        weight.reshape(-1, 4)[:, :2] = 0  # 2:4
        for dtype in (torch.float16, torch.bfloat16):
            for tokens in (64, 2048, 8192):
                t = time_layer(weight, tokens, dtype)
                rows.append([f"{out_features}×{in_features}", str(dtype).split(".")[-1], str(tokens), f"{t['dense_ms']:.3f}",
                             f"{t['sparse_ms']:.3f}", f"**{t['speedup']:.2f}×**" if t["speedup"] > 1 else f"{t['speedup']:.2f}×"])
    return table(["weight (out×in)", "dtype", "tokens", "dense ms", "2:4 ms", "speedup"], rows)


def cuda_path() -> str:
    """patcli's own training and export on CUDA: a 2:4 PAT run, exported with the per-layer kernel choice."""
    with tempfile.TemporaryDirectory() as folder:
        record = run_config((["trainer.device=cuda", "model.hidden=[512,512]", "pruning=nm", "trainer.epochs=20"], folder))
        if record.get("status") != "ok":
            return f"CUDA training run failed: {record.get('error')}"
        from patcli.export import export_run

        exported = export_run(Path(record["run_dir"]), measure_latency=False)
        plan = exported.extra.get("semi_structured")
    lines = [f"`patcli` 2:4 PAT run with `trainer.device=cuda` (MLP 64-512-512-10 on digits, 20 epochs): test accuracy "
             f"{record['metrics']['test']['accuracy'] * 100:.1f}%, sparsity {record['achieved_sparsity']:.1%}; export's "
             "per-layer 2:4 decision at batch 64:"]
    for name, decision in (plan or {}).items() if isinstance(plan, dict) else []:
        lines.append(f"- layer {name}: dense {decision['dense_ms']:.4f} ms, 2:4 {decision['sparse_ms']:.4f} ms → "
                     f"{'sparse kernel' if decision['convert'] else 'kept dense'} ({decision['speedup']:.2f}×)")
    return "\n".join(lines)


def gpu_overhead(blocks: int = 20, steps_per_block: int = 50) -> str:
    torch.backends.cuda.matmul.allow_tf32 = True
    cases = [("MLP 784-1024-1024-10, fp32", [784, 1024, 1024, 10], 128, None),
             ("MLP 4096-8192-8192-8192-4096, bf16 autocast", [4096, 8192, 8192, 8192, 4096], 4096, torch.bfloat16)]
    rows = []
    for label, dims, batch, dtype in cases:
        def variant(kind: str):
            torch.manual_seed(0)
            layers: list[nn.Module] = []
            for a, b in zip(dims, dims[1:]):
                layers += [nn.Linear(a, b), nn.ReLU()]
            model = nn.Sequential(*layers[:-1]).cuda()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
            x = torch.randn(batch, dims[0], device="cuda")
            y = torch.randint(0, dims[-1], (batch,), device="cuda")
            if kind == "pat":
                Pruner(model, sparsity=0.9, **agp_through((blocks + 2) * steps_per_block), allocation=ALLOCATIONS.get("global")(),
                       frequency=50).attach(opt)
            elif kind == "torch_prune":
                from torch.nn.utils import prune

                prune.global_unstructured([(m, "weight") for m in model if isinstance(m, nn.Linear)],
                                          pruning_method=prune.L1Unstructured, amount=0.9)

            def block() -> float:
                torch.cuda.synchronize()
                started = time.perf_counter()
                for _ in range(steps_per_block):
                    with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
                        loss = nn.functional.cross_entropy(model(x), y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                torch.cuda.synchronize()
                return (time.perf_counter() - started) / steps_per_block

            return block

        variants = {k: variant(k) for k in ("dense", "pat", "torch_prune")}
        interleaved(variants, 2)
        times = interleaved(variants, blocks, seed=1)
        pat, tp = ratio_stats(times["pat"], times["dense"]), ratio_stats(times["torch_prune"], times["dense"])
        rows.append([label, str(batch), f"{statistics.median(times['dense']) * 1e3:.3f} ms",
                     f"**{percent(pat[0])}** [{percent(pat[1])}, {percent(pat[2])}]", f"{percent(tp[0])} [{percent(tp[1])}, {percent(tp[2])}]"])
    return table(["model", "batch", "dense step", "PAT overhead", "torch.nn.utils.prune overhead"], rows)


def gpu() -> str:
    if not torch.cuda.is_available():
        raise RuntimeError("the gpu section needs a CUDA device")
    return (
        f"Device: {torch.cuda.get_device_name()}, torch {torch.__version__}.\n\n"
        "**2:4 semi-structured kernels** (`torch.sparse.to_sparse_semi_structured`, `F.linear`), CUDA-event timing, "
        "mean of 50 after warm-up, dense then 2:4 timed back to back (not interleaved, no interval: read small "
        "differences with care); outputs checked against dense. patcli's export converts a layer only where its "
        "measured speedup is > 1.\n\n" + semi_structured_table()
        + "\n\n**CUDA path**\n\n" + cuda_path()
        + "\n\n**One global mask update on the GPU** (uses topk; kthvalue column measured on the CPU copy)\n\n"
        + mask_update(sizes=(1_000_000, 10_000_000, 50_000_000)).split("\n\n", 1)[1]
        + "\n\n**Per-step overhead of PAT on the GPU** (fused AdamW, mask update every 50 steps during AGP to 90%, "
        "20 interleaved blocks of 50 steps, synchronised per block)\n\n" + gpu_overhead()
    )


SECTIONS = {"gpu": gpu}
