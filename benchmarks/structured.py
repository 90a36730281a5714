"""Structured pruning: CPU speed of physically smaller models, export sizes, and the char-LM (gpt on pysrc) tables."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from patcli.engine import ALLOCATIONS, PATTERNS, SCHEDULES, Pruner
from patcli.engine.compressed import compress
from patcli.engine.surgery import live_channels, param_count, shrink

from .common import interleaved, ratio_stats, run_configs, table
from .engine_speed import mlp


def _forward_timer(model: nn.Module, inputs: torch.Tensor, repeats: int):
    model.eval()

    def block() -> float:
        with torch.no_grad():
            started = time.perf_counter()
            for _ in range(repeats):
                model(inputs)
            return (time.perf_counter() - started) / repeats

    return block


def structured_speed(blocks: int = 30) -> str:
    """MLP 784-1024-1024-10 with half of both hidden layers' neurons removed vs the masked dense model."""
    torch.manual_seed(0)
    dense = mlp([784, 1024, 1024, 10])
    pruner = Pruner(dense, sparsity=0.5, schedule=SCHEDULES.get("fixed")(), total_steps=1,
                    pattern=PATTERNS.get("neurons")(), allocation=ALLOCATIONS.get("uniform")())
    keep = [torch.arange(g.channels) % 2 == 0 for g in pruner.layout.groups]  # exactly 50% of each hidden layer
    for i, mask in enumerate(pruner.layout.set_group_keep(keep)):
        pruner.masks.set(i, mask)
    pruner.masking.masks_changed()
    small = shrink(dense, pruner.layout.groups, live_channels(dense, pruner.layout.groups))
    inputs = torch.randn(64, 784)
    with torch.no_grad():
        torch.testing.assert_close(small(inputs), dense(inputs), rtol=1e-5, atol=1e-5)
    flops = lambda m: sum(l.in_features * l.out_features for l in m if isinstance(l, nn.Linear))  # noqa: E731
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for batch in (1, 64):
            x = inputs[:batch]
            repeats = 200 if batch == 1 else 50
            times = interleaved({"dense": _forward_timer(dense, x, repeats), "small": _forward_timer(small, x, repeats)}, blocks)
            median, low, high = ratio_stats(times["dense"], times["small"])
            rows.append([str(threads), str(batch), f"{statistics.median(times['dense']) * 1e3:.3f} ms",
                         f"{statistics.median(times['small']) * 1e3:.3f} ms", f"**{median:.2f}×** [{low:.2f}, {high:.2f}]"])
    torch.set_num_threads(1)
    return (
        "MLP 784-1024-1024-10 (random weights) with 50% of the neurons of both hidden layers removed by `surgery.shrink`, "
        "outputs checked equal to the masked model (assert_close 1e-5). CPU inference, no grad, "
        f"{blocks} interleaved blocks; speedup = masked-dense time / small time (median, bootstrap 95% interval). "
        f"Parameters {param_count(dense):,} → {param_count(small):,} ({param_count(small) / param_count(dense):.2f}×); "
        f"multiply-adds {flops(dense) / flops(small):.2f}× fewer. Target: >= 2.5× at batch 64.\n\n"
        + table(["torch threads", "batch", "masked dense", "physically smaller", "speedup"], rows)
    )


def export_size() -> str:
    """Bytes of the compressed unstructured export at 90% (and 50/95/98%) against the dense fp32 safetensors file."""
    rows = []
    for sparsity in (0.5, 0.9, 0.95, 0.98):
        torch.manual_seed(0)
        model = mlp([784, 1024, 1024, 10])
        pruner = Pruner(model, sparsity=sparsity, schedule=SCHEDULES.get("fixed")(), total_steps=1,
                        allocation=ALLOCATIONS.get("global")())
        pruner.update_masks(0, sparsity)
        with tempfile.TemporaryDirectory() as folder:
            dense_path, small_path = Path(folder) / "dense.safetensors", Path(folder) / "compressed.safetensors"
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(dense_path))
            tensors, metadata = compress(model.state_dict())
            save_file(tensors, str(small_path), metadata=metadata)
            dense_bytes, small_bytes = dense_path.stat().st_size, small_path.stat().st_size
        mark = "**" if sparsity == 0.9 else ""
        rows.append([f"{sparsity:.0%}", f"{dense_bytes:,}", f"{small_bytes:,}", f"{mark}{small_bytes / dense_bytes:.3f}×{mark}"])
    return (
        "`patcli export` of an unstructured run: a packed bitmask (1 bit per weight) plus the non-zero float32 values "
        "per pruned tensor, other tensors dense, in one safetensors file; exact round trip (tested). "
        "MLP 784-1024-1024-10, global magnitude masks. Target at 90%: <= 0.14× the dense fp32 bytes.\n\n"
        + table(["sparsity", "dense fp32 bytes", "compressed bytes", "ratio"], rows)
    )


LM = ["model=gpt", "dataset=pysrc", "trainer.batch_size=32", "trainer.lr=0.003", "trainer.lr_schedule=cosine",
      "trainer.warmup_steps=40", "trainer.max_steps=800", "pruning.frequency=20"]


def _loss(record: dict) -> str:
    return f"{record['metrics']['val']['loss']:.3f}" if record.get("status") == "ok" else f"failed: {record.get('error')}"


def char_lm(workers: int = 2) -> str:
    """gpt on pysrc: dense vs post-training magnitude (± fine-tune) vs PAT, and 50% of heads by PAT vs post-training."""
    sparsities = (0.5, 0.8, 0.9, 0.95)
    jobs = {("dense", 0.0): [*LM, "pruning=none"]}
    for s in sparsities:
        jobs[("post:magnitude (one-shot)", s)] = [*LM, "baseline=magnitude", f"pruning.sparsity={s}"]
        jobs[("post:iterative rounds=1 (one-shot + 200 fine-tune steps)", s)] = [
            *LM, "baseline=iterative", "baseline.rounds=1", f"pruning.sparsity={s}"]
        jobs[("PAT agp+magnitude+global", s)] = [*LM, f"pruning.sparsity={s}"]
    jobs[("PAT heads (magnitude l2, uniform)", 0.5)] = [*LM, "pruning=heads", "allocation=uniform"]
    jobs[("PAT heads (head_importance, uniform)", 0.5)] = [*LM, "pruning=heads", "allocation=uniform", "scorer=head_importance"]
    jobs[("post:structured heads (l2, one-shot)", 0.5)] = [*LM, "pruning=heads", "baseline=structured", "baseline.kind=heads"]
    jobs[("post:structured heads + 200 fine-tune steps", 0.5)] = [
        *LM, "pruning=heads", "baseline=pat_from_dense", "schedule=oneshot", "allocation=uniform"]
    with tempfile.TemporaryDirectory() as folder:
        dense_job = jobs.pop(("dense", 0.0))
        results = {("dense", 0.0): run_configs([dense_job], Path(folder), workers=1)[0]}  # the shared dense run first
        results.update(zip(jobs, run_configs(list(jobs.values()), Path(folder), workers=workers)))
    dense = results[("dense", 0.0)]
    dense_loss = dense["metrics"]["val"]["loss"]
    rows = [["dense", f"{dense['total_train_steps']:,}", _loss(dense), *[""] * len(sparsities)]]
    names = [n for n, s in jobs if s and "heads" not in n]
    for name in dict.fromkeys(names):
        cells = [_loss(results[(name, s)]) for s in sparsities]
        steps = results[(name, sparsities[0])].get("total_train_steps", 0)
        rows.append([name, f"{steps:,}", "", *cells])
    head_rows = []
    for name in [n for n, _ in jobs if "heads" in n]:
        record = results[(name, 0.5)]
        if record.get("status") != "ok":
            head_rows.append([name, "-", _loss(record), "-", "-"])
            continue
        loss = record["metrics"]["val"]["loss"]
        head_rows.append([name, f"{record['total_train_steps']:,}", f"{loss:.3f}", f"{(loss / dense_loss - 1) * 100:+.1f}%",
                          f"{record['achieved_sparsity']:.0%} of attention weights"])
    return (
        "gpt (2 layers × 4 heads, d_model 128, context 64) on `pysrc` (first 2M characters of the standard library), "
        "800 steps of AdamW (lr 3e-3, cosine, 40 warm-up) at batch 32; validation loss (nats/char), one run each (seed 0): "
        "no spread is measured, so differences of a few thousandths are within noise. Steps = all "
        "training steps including the dense run a post-training method starts from.\n\n"
        + table(["method", "total steps", "dense", "50%", "80%", "90%", "95%"], rows)
        + "\n\n50% of the attention heads removed (every block keeps half; `pruning=heads`, target: validation loss within "
        "5% of dense). Structured runs end with a physically smaller export.\n\n"
        + table(["method", "total steps", "val loss", "vs dense", "pruned"], head_rows)
    )


SECTIONS = {"structured_speed": structured_speed, "export_size": export_size, "char_lm": char_lm}
