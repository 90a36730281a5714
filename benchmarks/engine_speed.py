"""Engine speed: per-step overhead of PAT, cost of one global mask update, and why masked gradients slow AdamW."""

from __future__ import annotations

import statistics
import time

import torch
from omegaconf import OmegaConf
from torch import nn
from torch.nn.utils import prune as torch_prune

from patcli.engine import ALLOCATIONS, SCHEDULES, Pruner
from patcli import training
from patcli.config import TrainerConfig
from patcli.engine.threshold import kth_smallest
from patcli.hydra_app import conf_dir

from .common import interleaved, percent, ratio_stats, table

DEFAULT_FREQUENCY = int(OmegaConf.load(conf_dir() / "pruning" / "unstructured.yaml").frequency)


def mlp(dims: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(dims, dims[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def make_optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer exactly as ``patcli train`` builds it (fused kernels where torch has them)."""
    lr, weight_decay = (0.01, 1e-4) if name == "sgd" else (1e-3, 0.01)
    return training.make_optimizer(model, TrainerConfig(optimizer=name, lr=lr, weight_decay=weight_decay, momentum=0.9))


def agp_through(total_steps: int) -> dict:
    """A pruner's AGP schedule (to 90% when built with sparsity 0.9) whose ramp ends right after the last measured
    step, so that every timed block holds the same number of mask updates (a ramp ending earlier leaves the last
    blocks without any, which flatters PAT)."""
    return {"schedule": SCHEDULES.get("agp")(begin=0, end=total_steps), "total_steps": total_steps + 1}


def training_variant(kind: str, dims: list[int], batch: int, optimizer: str, steps_per_block: int, total_steps: int,
                     frequency: int = DEFAULT_FREQUENCY):
    """A closure that trains ``steps_per_block`` steps and returns seconds per step, and the pruner (PAT only).

    ``pass_only``: the model pruned once to a fixed 90% global magnitude mask before training, and after each step
    only the call that keeps it there (``MaskSet.zero_pruned_``, as PAT's inplace masking makes), without PAT's
    mask updates: the floor of keeping pruned weights at zero.
    """
    torch.manual_seed(0)
    model = mlp(dims)
    opt = make_optimizer(optimizer, model)
    pruner = None
    if kind == "pat":
        pruner = Pruner(model, sparsity=0.9, **agp_through(total_steps), allocation=ALLOCATIONS.get("global")(),
                        frequency=frequency).attach(opt)
    elif kind == "pass_only":
        fixed = Pruner(model, sparsity=0.9, schedule=SCHEDULES.get("oneshot")(), total_steps=1,
                       allocation=ALLOCATIONS.get("global")())
        fixed.update_masks(0)
        opt.register_step_post_hook(lambda *_: fixed.masks.zero_pruned_())
    elif kind == "torch_prune":
        linears = [(m, "weight") for m in model if isinstance(m, nn.Linear)]
        torch_prune.global_unstructured(linears, pruning_method=torch_prune.L1Unstructured, amount=0.9)
    return timed_training(model, opt, dims, batch, steps_per_block), pruner


def timed_training(model: nn.Module, opt: torch.optim.Optimizer, dims: list[int], batch: int, steps_per_block: int):
    """A closure that trains ``steps_per_block`` steps on 8 fixed random batches and returns seconds per step."""
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(batch, dims[0], generator=generator), torch.randint(0, dims[-1], (batch,), generator=generator))
               for _ in range(8)]
    step = 0

    def block() -> float:
        nonlocal step
        started = time.perf_counter()
        for _ in range(steps_per_block):
            inputs, targets = batches[step % len(batches)]
            loss = nn.functional.cross_entropy(model(inputs), targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        return (time.perf_counter() - started) / steps_per_block

    return block


def overhead(blocks: int = 30, warmup_blocks: int = 3) -> str:
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # as patcli's trainer does on CPU
    rows = []
    cases = [("MLP 64-256-256-10", [64, 256, 256, 10], 64), ("MLP 784-1024-1024-10", [784, 1024, 1024, 10], 128)]
    steps_per_block = 2 * DEFAULT_FREQUENCY  # every block holds the same number of mask updates for both frequencies
    for label, dims, batch in cases:
        for optimizer in ("sgd", "adamw"):
            total = (blocks + warmup_blocks) * steps_per_block
            made = {kind: training_variant(kind, dims, batch, optimizer, steps_per_block, total)
                    for kind in ("dense", "pat", "pass_only", "torch_prune")}
            made["pat_2x"] = training_variant("pat", dims, batch, optimizer, steps_per_block, total, 2 * DEFAULT_FREQUENCY)
            variants = {kind: block for kind, (block, _) in made.items()}
            interleaved(variants, warmup_blocks)
            pruner = made["pat"][1]
            hook_seconds, hook_steps = pruner.seconds, pruner.step
            times = interleaved(variants, blocks, seed=1)
            dense_step = statistics.median(times["dense"])
            own = (pruner.seconds - hook_seconds) / (pruner.step - hook_steps) / dense_step
            cells = []
            for kind in ("pat", "pass_only", "pat_2x", "torch_prune"):
                median, low, high = ratio_stats(times[kind], times["dense"])
                text = f"{percent(median)} [{percent(low)}, {percent(high)}]"
                cells.append(f"**{text}**" if kind == "pat" else text)
            cells.insert(1, percent(1.0 + own))
            rows.append([label, f"{batch}", optimizer, f"{dense_step * 1e3:.2f} ms", *cells])
    return (
        f"Per-step time of PAT (inplace masking, global magnitude, AGP to 90% over the measured steps, one mask update "
        f"every {DEFAULT_FREQUENCY} steps = the default `pruning.frequency`) and of `torch.nn.utils.prune` (fixed 90% "
        f"global L1 mask, re-applied by its forward pre-hooks) relative to dense training of the same model, with the "
        f"optimizers as `patcli train` builds them (fused kernels) and denormals flushed, as its trainer does on CPU. "
        f"{blocks} interleaved blocks of {2 * DEFAULT_FREQUENCY} steps each, 1 torch thread; median of per-block ratios "
        f"with a bootstrap 95% interval of the median. \"Engine's own time\" is the time spent inside the pruner's "
        f"hooks (mask updates included) per step, over the dense step: the rest of the overhead is the sparse model "
        f"itself training at a different speed. \"Mask pass alone\" is the model pruned once to a fixed 90% global "
        f"magnitude mask before training, and after each step only the multiply that keeps it there (the same call "
        f"as PAT's, without its mask updates): the floor under in-place masking, which the mask updates add to. "
        f"Target: PAT median <= +3%.\n\n"
        + table(["model", "batch", "optimizer", "dense step", f"PAT overhead (update every {DEFAULT_FREQUENCY})",
                 "engine's own time", "mask pass alone", f"PAT, update every {2 * DEFAULT_FREQUENCY}", "torch.nn.utils.prune overhead"], rows)
    )


def big_model(n_params: int, width: int = 2048) -> nn.Sequential:
    """Linear layers of ``width`` inputs adding up to about ``n_params`` prunable weights."""
    rows = n_params // width
    parts = [min(rows - i, 4096) for i in range(0, rows, 4096)]
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(width, r, bias=False) for r in parts])


def mask_update(sizes: tuple[int, ...] = (1_000_000, 10_000_000, 50_000_000), repeats: int = 15) -> str:
    torch.set_num_threads(1)
    rows = []
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for n in sizes:
        model = big_model(n).to(device)
        pruner = Pruner(model, sparsity=0.9, schedule=SCHEDULES.get("oneshot")(), total_steps=10,
                        allocation=ALLOCATIONS.get("global")())
        total = pruner.masks.accounted_numel()
        k = round(0.9 * total)
        scores = torch.cat([w.detach().abs().reshape(-1) for w in pruner.masks.weights])

        def sync() -> None:
            if device.type == "cuda":
                torch.cuda.synchronize()

        def once(fn, before=lambda: None) -> float:
            before()
            sync()
            started = time.perf_counter()
            fn()
            sync()
            return time.perf_counter() - started

        def snapshot() -> list[list[torch.Tensor]]:
            return [[t.detach().clone() for t in tensors] for tensors in (pruner.masks.weights, pruner.layout.group_keep)]

        def restorer(state: list[list[torch.Tensor]]):
            def restore() -> None:  # every timed update starts from the same weights and masks
                weights, group_keep = state
                with torch.no_grad():
                    torch._foreach_copy_(pruner.masks.weights, weights)
                for i, keep in enumerate(group_keep):
                    pruner.layout.group_keep[i].copy_(keep)
                    pruner.masks.set(i, keep)
            return restore

        dense = snapshot()
        pruner.update_masks(0, target=0.8)  # a later update of a gradual schedule: 80% already pruned (-inf scores)
        at_80 = snapshot()
        cpu_scores = scores.cpu()
        variants = {
            "update": lambda: once(lambda: pruner.update_masks(0, target=0.9), restorer(dense)),
            "later": lambda: once(lambda: pruner.update_masks(0, target=0.9), restorer(at_80)),
            "threshold": lambda: once(lambda: kth_smallest(scores, k)),
            "kthvalue": lambda: once(lambda: torch.kthvalue(cpu_scores, k)),
            "topk": lambda: once(lambda: torch.topk(scores, total - k + 1, sorted=False)),
        }
        interleaved(variants, 1)  # warm-up
        times = interleaved(variants, repeats, seed=n)
        restorer(dense)()
        pruner.update_masks(0, target=0.9)
        exact = sum(int((~keep).sum()) for keep in pruner.masks.keep) == k
        restorer(at_80)()
        pruner.update_masks(0, target=0.9)
        exact = exact and sum(int((~keep).sum()) for keep in pruner.masks.keep) == k
        ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}

        def ratio(name: str) -> str:
            return f"{statistics.median(a / b for a, b in zip(times[name], times['kthvalue'])):.2f}×"

        rows.append([f"{total / 1e6:.1f}M", device.type, f"{ms['update']:.1f} ms", f"{ms['threshold']:.1f} ms",
                     f"{ms['kthvalue']:.1f} ms", f"{ms['topk']:.1f} ms", f"**{ratio('update')}**", ratio("threshold"),
                     ratio("later"), "yes" if exact else "NO"])
    return (
        "One complete global mask update (magnitude scores of every prunable weight → exact global threshold at 90% → "
        "per-layer keep masks applied to the weights) against `torch.kthvalue` alone on the same scores in the same "
        f"run, timed in turn in a fresh random order {repeats} times (median of the per-round ratios). Target: <= 0.35× kthvalue with the pruned count exact. "
        "The update also scores, selects per layer and writes the masks; \"its threshold search\" is the exact k-th "
        "value alone (`patcli.engine.threshold.kth_smallest`); \"80% → 90%\" is the same update when 80% of the weights "
        "are already pruned, as in the later updates of a gradual schedule. "
        "On a GPU the kthvalue column runs on the CPU copy (kthvalue on GPU is far slower than topk).\n\n"
        + table(["prunable params", "device", "mask update", "its threshold search", "kthvalue", "topk",
                 "update / kthvalue", "threshold / kthvalue", "80% → 90% update / kthvalue", "exact count"], rows)
    )


def adamw_zeros(size: int = 1 << 20, repeats: int = 60) -> str:
    """Why masking gradients before an AdamW step slowed it ~2× here: sqrt of exact zeros is slow on this CPU."""
    torch.set_num_threads(1)

    def median_ms(fn) -> float:
        for _ in range(5):
            fn()
        samples = []
        for _ in range(repeats):
            started = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - started)
        return statistics.median(samples) * 1e3

    mask = (torch.rand(size, generator=torch.Generator().manual_seed(0)) > 0.9).float()
    inputs = {"random in (0, 1)": torch.rand(size), "1e-30 (tiny, normal)": torch.full((size,), 1e-30),
              "90% exact zeros": torch.rand(size) * mask, "all exact zeros": torch.zeros(size)}
    rows = [[name, f"{median_ms(lambda x=x: torch.sqrt(x)):.3f} ms", f"{median_ms(lambda x=x: torch.rsqrt(x)):.3f} ms",
             f"{median_ms(lambda x=x: x * 0.5):.3f} ms"] for name, x in inputs.items()]

    def adamw_step_ms(masked: bool, implementation: str) -> float:
        """Median time of ``optimizer.step()`` alone; every step gets a fresh gradient (masked or not) first."""
        torch.manual_seed(0)
        param = nn.Parameter(torch.randn(1024, 1024) * 0.05)
        opt = torch.optim.AdamW([param], lr=1e-3, **{implementation: True} if implementation != "single-tensor" else {"foreach": False})
        keep = (torch.rand(1024, 1024) > 0.9).float()
        samples = []
        for i in range(repeats + 5):
            grad = torch.randn(1024, 1024) * 1e-3
            param.grad = grad.mul_(keep) if masked else grad
            started = time.perf_counter()
            opt.step()
            if i >= 5:
                samples.append(time.perf_counter() - started)
        return statistics.median(samples) * 1e3

    steps = []
    for implementation in ("single-tensor", "foreach", "fused"):
        real, masked = adamw_step_ms(False, implementation), adamw_step_ms(True, implementation)
        steps.append([implementation, f"{real:.2f} ms", f"{masked:.2f} ms", f"**{masked / real:.2f}×**"])
    return (
        f"Each figure is the median of {repeats} timings of one variant after 5 warm-up calls; the variants run one "
        "after another, not interleaved, and no interval is given: the ratios below are large enough for that.\n\n"
        "`torch.sqrt` over 1M float32 values, by content (1 thread):\n\n"
        + table(["values", "sqrt", "rsqrt", "multiply"], rows)
        + "\n\nAdamW `step()` on a 1024×1024 weight, a fresh gradient each step (median of the step alone):\n\n"
        + table(["implementation", "real gradients", "gradients masked at 90%", "masked / real"], steps)
        + "\n\nMasked gradients keep Adam's second moment at exactly 0 for pruned weights, and AdamW takes "
        "`exp_avg_sq.sqrt()` every step: on this CPU's vectorised (AVX-512) path a "
        "square root of an exact zero is several times slower than of any other value, while rsqrt is not. "
        "(Flushing denormals cannot help: the values are exact zeros, not denormals.) patcli therefore never masks "
        "gradients: pruned weights receive their real gradients, so the moments stay non-zero, and the weights are "
        "zeroed in place right after `optimizer.step()` instead. Exact zeros still arise without masking, from "
        "units a sparse model leaves dead (their weights get exactly zero gradients), so `patcli train` builds "
        "fused optimizers: the fused kernel is the fastest here and does not slow down on zeros."
    )


def masked_step(size: int = 1 << 20, rounds: int = 200) -> str:
    """Would fusing the mask into the optimizer's kernel close the overhead gap? One step on ``size`` weights:
    torch's fused kernel, then the same plus patcli's separate mask pass, then one kernel doing both that
    ``torch.compile`` generates (C++ through inductor: the fusion available without writing a kernel by hand)."""
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    keep = (torch.rand(size, generator=generator) > 0.9).float()
    grad = torch.randn(size, generator=generator) * 1e-3
    evict = torch.empty(64 << 18)  # 64 MiB written before each step: in training the weights are out of cache too
    hyper = {"sgd": dict(lr=0.01, momentum=0.9, weight_decay=1e-4), "adamw": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)}

    def sgd_masked(p, g, buf, mask, lr: float, momentum: float, weight_decay: float):
        buf.mul_(momentum).add_(g + weight_decay * p)
        p.sub_(lr * buf).mul_(mask)

    def adamw_masked(p, g, m, v, mask, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                     correction1: torch.Tensor, correction2: torch.Tensor):  # 0-d tensors: no recompile per step
        p.mul_(1 - lr * weight_decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        p.sub_(lr / correction1 * m / ((v / correction2).sqrt() + eps)).mul_(mask)

    start = (torch.randn(size, generator=torch.Generator().manual_seed(1)) * 0.05).mul_(keep)

    def torch_step(name: str, masked: bool):
        param = nn.Parameter(start.clone())
        opt = (torch.optim.SGD if name == "sgd" else torch.optim.AdamW)([param], fused=True, **hyper[name])

        def step() -> None:
            param.grad = grad
            opt.step()
            if masked:
                with torch.no_grad():
                    torch._foreach_mul_([param], [keep])
        return step, param

    def compiled_step(name: str):
        param = start.clone()
        state = [torch.zeros(size) for _ in range(1 if name == "sgd" else 2)]
        kernel = torch.compile(sgd_masked if name == "sgd" else adamw_masked, fullgraph=True, dynamic=False)
        h, count = hyper[name], 0

        def step() -> None:
            nonlocal count
            count += 1
            if name == "sgd":
                kernel(param, grad, *state, keep, h["lr"], h["momentum"], h["weight_decay"])
            else:
                b1, b2 = h["betas"]
                kernel(param, grad, *state, keep, h["lr"], b1, b2, h["eps"], h["weight_decay"],
                       torch.tensor(1 - b1 ** count), torch.tensor(1 - b2 ** count))
        return step, param

    def timed(fn):
        def once() -> float:
            evict.fill_(1.0)
            started = time.perf_counter()
            fn()
            return time.perf_counter() - started
        return once

    rows = []
    for name in ("sgd", "adamw"):
        plain, _ = torch_step(name, masked=False)
        separate, reference = torch_step(name, masked=True)
        variants = {"fused": plain, "fused + pass": separate}
        try:
            fused_masked, result = compiled_step(name)
            for _ in range(3):  # compiles, and checks the one kernel computes what the two passes do
                fused_masked()
                separate()
            # the steps' displacements, not the weights: weight decay moves a weight by ~1e-5 of itself in 3 steps
            same = torch.allclose(result - start, reference.detach() - start, rtol=1e-4, atol=2e-8)  # atol: float32 rounding of p
            variants["compiled"] = fused_masked
        except Exception as error:  # no C++ compiler, or inductor unavailable: report, do not fail the section
            rows.append([name, "-", "-", f"torch.compile unavailable: {error.__class__.__name__}", "-"])
            continue
        plain()  # its optimizer state is created here, not in a timed step
        times = interleaved({k: timed(v) for k, v in variants.items()}, rounds, seed=1)
        ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}

        def against_fused(kind: str) -> str:
            median, low, high = ratio_stats(times[kind], times["fused"])
            return f"{ms[kind]:.3f} ms ({percent(median)} [{percent(low)}, {percent(high)}])"

        rows.append([name, f"{ms['fused']:.3f} ms", against_fused("fused + pass"), against_fused("compiled"), "yes" if same else "NO"])
    return (
        f"One optimizer step on {size:,} float32 weights (90% pruned), 1 thread, the weights pushed out of cache before "
        f"each step as in training (a 64 MiB write); median of {rounds} interleaved rounds, and in brackets the median of the per-round ratios to the fused step alone with a bootstrap 95% interval. \"fused\" is torch's fused "
        "kernel as `patcli train` builds it; \"+ pass\" adds patcli's in-place mask multiply after it; \"compiled\" is "
        "one function doing the update and the mask together, compiled by `torch.compile` (C++ via inductor; its "
        "hyperparameters are fixed in the compiled code: a changing learning rate would have to be passed as a "
        "tensor). \"same result\": the compiled function moves the weights "
        "as the two passes do over 3 steps (from the same pruned start).\n\n"
        + table(["optimizer", "fused step", "fused step + mask pass", "compiled update with the mask", "same result"], rows)
    )


SECTIONS = {"overhead": overhead, "mask_update": mask_update, "adamw_zeros": adamw_zeros, "masked_step": masked_step}
