"""What would close the per-step overhead gap: the mask inside a hand-written optimizer kernel.

The overhead section finds that the separate pass keeping pruned weights at zero (one multiply over weights and
masks after ``optimizer.step()``) costs about the whole 3% budget by itself. This section measures the same
training loops with SGD and AdamW written as one C++ loop each (compiled here with ``torch.utils.cpp_extension``),
once without masks and once multiplying by the mask as it writes each weight, so that the mask costs one more read
instead of a pass of its own. It is a measurement, not a patcli feature: patcli builds torch's own optimizers.
"""

from __future__ import annotations

import statistics

import torch

from patcli.engine import ALLOCATIONS, Pruner

from .common import interleaved, percent, ratio_stats, table
from .engine_speed import DEFAULT_FREQUENCY, agp_through, make_optimizer, mlp, timed_training

KERNELS = r"""
#include <torch/extension.h>
#include <cmath>

// One loop per tensor; `mask` (1.0 keep / 0.0 pruned, or empty) multiplies each new weight as it is written.
void sgd_step(std::vector<at::Tensor> params, std::vector<at::Tensor> grads, std::vector<at::Tensor> buffers,
              std::vector<at::Tensor> masks, double lr, double momentum, double weight_decay, bool first) {
  for (size_t t = 0; t < params.size(); ++t) {
    float* p = params[t].data_ptr<float>();
    const float* g = grads[t].data_ptr<float>();
    float* b = buffers[t].data_ptr<float>();
    const float* m = masks[t].numel() ? masks[t].data_ptr<float>() : nullptr;
    const int64_t n = params[t].numel();
    const float lr_ = lr, mom = momentum, wd = weight_decay;
    if (m) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        const float d = g[i] + wd * p[i], v = first ? d : mom * b[i] + d;
        b[i] = v;
        p[i] = (p[i] - lr_ * v) * m[i];
      }
    } else {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        const float d = g[i] + wd * p[i], v = first ? d : mom * b[i] + d;
        b[i] = v;
        p[i] = p[i] - lr_ * v;
      }
    }
  }
}

void adamw_step(std::vector<at::Tensor> params, std::vector<at::Tensor> grads, std::vector<at::Tensor> exp_avgs,
                std::vector<at::Tensor> exp_avg_sqs, std::vector<at::Tensor> masks, double lr, double beta1,
                double beta2, double eps, double weight_decay, int64_t step) {
  const float step_size = lr / (1 - std::pow(beta1, step)), root = std::sqrt(1 - std::pow(beta2, step));
  const float decay = 1 - lr * weight_decay, b1 = beta1, b2 = beta2, eps_ = eps;
  for (size_t t = 0; t < params.size(); ++t) {
    float* p = params[t].data_ptr<float>();
    const float* g = grads[t].data_ptr<float>();
    float* a = exp_avgs[t].data_ptr<float>();
    float* s = exp_avg_sqs[t].data_ptr<float>();
    const float* m = masks[t].numel() ? masks[t].data_ptr<float>() : nullptr;
    const int64_t n = params[t].numel();
    if (m) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        const float avg = b1 * a[i] + (1 - b1) * g[i], sq = b2 * s[i] + (1 - b2) * g[i] * g[i];
        a[i] = avg;
        s[i] = sq;
        p[i] = (p[i] * decay - step_size * avg / (std::sqrt(sq) / root + eps_)) * m[i];
      }
    } else {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        const float avg = b1 * a[i] + (1 - b1) * g[i], sq = b2 * s[i] + (1 - b2) * g[i] * g[i];
        a[i] = avg;
        s[i] = sq;
        p[i] = p[i] * decay - step_size * avg / (std::sqrt(sq) / root + eps_);
      }
    }
  }
}
"""


def compile_kernels():
    """The two kernels as a Python module (needs a C++ compiler and ninja; cached after the first build)."""
    from torch.utils.cpp_extension import load_inline

    return load_inline("patcli_bench_masked_step", cpp_sources=[KERNELS], functions=["sgd_step", "adamw_step"],
                       extra_cflags=["-O3", "-march=native", "-fno-math-errno"])


class HandWritten(torch.optim.Optimizer):
    """SGD (momentum, weight decay) or AdamW as one kernel call over all parameters.

    ``masks``: parameter → float mask the kernel multiplies into the new weights (the pruner's own buffers, which
    its mask updates overwrite in place); other parameters are updated unmasked.
    """

    def __init__(self, params, kernels, kind: str, **hyper) -> None:
        super().__init__(params, hyper)
        self.kernels, self.kind, self.count = kernels, kind, 0
        self.params = [p for group in self.param_groups for p in group["params"]]
        self.buffers = [[torch.zeros_like(p) for p in self.params] for _ in range(1 if kind == "sgd" else 2)]
        self.masks: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def step(self, closure=None):
        self.count += 1
        hyper = self.param_groups[0]
        none = torch.empty(0)
        masks = [self.masks.get(id(p), none) for p in self.params]
        grads = [p.grad for p in self.params]
        if self.kind == "sgd":
            self.kernels.sgd_step(self.params, grads, self.buffers[0], masks, hyper["lr"], hyper["momentum"],
                                  hyper["weight_decay"], self.count == 1)
        else:
            beta1, beta2 = hyper["betas"]
            self.kernels.adamw_step(self.params, grads, *self.buffers, masks, hyper["lr"], beta1, beta2, hyper["eps"],
                                    hyper["weight_decay"], self.count)


def hand_written_like(kernels, reference: torch.optim.Optimizer, params) -> HandWritten:
    """The hand-written optimizer with the hyperparameters ``patcli train`` gives the torch one."""
    group = reference.param_groups[0]
    if isinstance(reference, torch.optim.SGD):
        return HandWritten(params, kernels, "sgd", lr=group["lr"], momentum=group["momentum"], weight_decay=group["weight_decay"])
    return HandWritten(params, kernels, "adamw", lr=group["lr"], betas=group["betas"], eps=group["eps"],
                       weight_decay=group["weight_decay"])


def matches_torch(kernels, optimizer: str, steps: int = 5) -> bool:
    """The kernel moves weights as torch's fused optimizer does, and with a mask as torch's plus patcli's pass."""
    torch.manual_seed(0)
    model = mlp([64, 256, 10])
    reference = make_optimizer(optimizer, model)
    twin = mlp([64, 256, 10])
    twin.load_state_dict(model.state_dict())
    mine = hand_written_like(kernels, reference, twin.parameters())
    weight, twin_weight = model[0].weight, twin[0].weight
    keep = (torch.rand_like(weight) > 0.9).float()
    mine.masks[id(twin_weight)] = keep
    with torch.no_grad():
        weight.mul_(keep)
        twin_weight.mul_(keep)
    for _ in range(steps):
        grads = [torch.randn_like(p) * 1e-2 for p in model.parameters()]
        for p, q, g in zip(model.parameters(), twin.parameters(), grads):
            p.grad, q.grad = g.clone(), g.clone()
        reference.step()
        with torch.no_grad():
            weight.mul_(keep)
        mine.step()
    return all(torch.allclose(p, q, rtol=1e-5, atol=1e-7) for p, q in zip(model.parameters(), twin.parameters()))


def loop_variant(kernels, kind: str, dims: list[int], batch: int, optimizer: str, steps_per_block: int, total_steps: int):
    """A closure training ``steps_per_block`` steps, returning seconds per step.

    ``torch``: dense, torch's fused optimizer (as patcli builds it). ``dense``: dense, hand-written kernel.
    ``pat_pass``: PAT as patcli does it (AGP to 90%, global magnitude, an update every DEFAULT_FREQUENCY steps, the
    pass after each step) on the hand-written kernel. ``pat_fused``: the same PAT, its masks multiplied inside the
    kernel instead of by the pass (mask updates still zero the newly pruned weights at once).
    """
    torch.manual_seed(0)
    model = mlp(dims)
    reference = make_optimizer(optimizer, model)
    opt = reference if kind == "torch" else hand_written_like(kernels, reference, model.parameters())
    if kind.startswith("pat"):
        pruner = Pruner(model, sparsity=0.9, **agp_through(total_steps), allocation=ALLOCATIONS.get("global")(),
                        frequency=DEFAULT_FREQUENCY).attach(opt)
        if kind == "pat_fused":
            opt.masks = {id(w): m for w, m in zip(pruner.masks.weights, pruner.masks.multipliers)}
            pruner.masking.after_step = lambda zero=True: None  # the kernel keeps pruned weights at zero
    return timed_training(model, opt, dims, batch, steps_per_block)


def handwritten_step(blocks: int = 30, warmup_blocks: int = 3) -> str:
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    kernels = compile_kernels()
    steps_per_block = 2 * DEFAULT_FREQUENCY
    rows = []
    for label, dims, batch in [("MLP 64-256-256-10", [64, 256, 256, 10], 64), ("MLP 784-1024-1024-10", [784, 1024, 1024, 10], 128)]:
        for optimizer in ("sgd", "adamw"):
            total = (blocks + warmup_blocks) * steps_per_block
            variants = {kind: loop_variant(kernels, kind, dims, batch, optimizer, steps_per_block, total)
                        for kind in ("torch", "dense", "pat_pass", "pat_fused")}
            interleaved(variants, warmup_blocks)
            times = interleaved(variants, blocks, seed=1)

            def against(kind: str, base: str) -> str:
                median, low, high = ratio_stats(times[kind], times[base])
                return f"{percent(median)} [{percent(low)}, {percent(high)}]"

            rows.append([label, optimizer, f"{statistics.median(times['dense']) * 1e3:.2f} ms", against("torch", "dense"),
                         against("pat_pass", "dense"), f"**{against('pat_fused', 'dense')}**",
                         "yes" if matches_torch(kernels, optimizer) else "NO"])
    return (
        "Training loops as in the overhead section (same models, batches, AGP to 90% with global magnitude and an update "
        f"every {DEFAULT_FREQUENCY} steps; {blocks} interleaved blocks of {steps_per_block} steps, 1 torch thread; "
        "median of per-block ratios, bootstrap 95% interval), with SGD (momentum 0.9) and AdamW written by hand as one "
        "C++ loop over all parameters (`benchmarks/handwritten_step.py`, compiled with `-O3 -march=native`). Every "
        "column is against dense training with that hand-written optimizer. \"torch's fused optimizer\": the dense "
        "loop with torch's fused kernel instead (as `patcli train` builds it), which also runs torch.optim's Python "
        "bookkeeping per step. \"PAT, separate pass\": PAT as patcli does it, the multiply after each step. \"PAT, mask in "
        "the kernel\": the same PAT with the pruner's float masks multiplied into each new weight inside the kernel "
        "and the pass switched off (mask updates still zero newly pruned weights at once). \"matches torch\": over 5 "
        "steps the kernel gives torch's fused result, and with a mask torch's result followed by the pass "
        "(rtol 1e-5).\n\n"
        + table(["model", "optimizer", "dense step (hand-written)", "torch's fused optimizer", "PAT, separate pass",
                 "PAT, mask in the kernel", "matches torch"], rows)
    )


SECTIONS = {"handwritten_step": handwritten_step}
