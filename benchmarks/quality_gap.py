"""What closes the digits gap of the quality section: probes with training options patcli does not have yet.

The engine issue's targets (98.0% at 98%, 97.0% at 99%) are missed by its own options. This section adds two
standard remedies to the training loss of the recommended recipe, here only (probes, not patcli options):
distillation from the tuned dense model of the same seed (α and T chosen by cross-validation), and ±1-pixel shifts
of the 8×8 images. Selection stays honest: the probes are compared by the quality section's 8-fold cross-validation
(seeds 0–2) and reported on test (seeds 3–5), trained on the train split and refit on train + validation, with the
recipe alone measured beside them.
"""

from __future__ import annotations

import multiprocessing
import statistics
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from .common import mean_std, run_config, table
from .quality import CAP, FOLDS, REFIT, TEST_SEEDS, cross_validation

# The choices of the quality section's cross-validated searches (BENCHMARKS.md, quality): the probes start from them.
RECOMMENDED = ["trainer.lr=0.01", "trainer.lr_schedule=constant", "pruning.frequency=50", "allocation=global",
               "scorer=hessian", "trainer.epochs=100"]
TUNED_DENSE = ["pruning=none", "trainer.lr=0.01", "trainer.lr_schedule=constant", "trainer.epochs=40",
               "trainer.weight_decay=0.01", "trainer.batch_size=32"]
SPARSITIES = (0.98, 0.99)
# name → (distillation weight α and temperature T, or None; shifted images): α and T are chosen by cross-validation
PROBES = {
    "recipe alone": (None, False),
    **{f"+ distillation (α {a}, T {t})": ((a, t), False) for a in (0.5, 0.9) for t in (2, 4)},
    "+ ±1-pixel shifts": (None, True),
}

_probe: dict = {"distill": None, "teacher": None, "shift": False}  # set per job, read by the loss (in the worker)


def shifted(inputs: torch.Tensor) -> torch.Tensor:
    """Each flattened 8×8 image moved by -1, 0 or +1 pixel in x and in y (zeros shifted in)."""
    n = inputs.shape[0]
    padded = F.pad(inputs.reshape(n, 8, 8), (1, 1, 1, 1))
    rows = torch.randint(0, 3, (n, 1)) + torch.arange(8)
    cols = torch.randint(0, 3, (n, 1)) + torch.arange(8)
    return padded[torch.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]].reshape(n, 64)


def probe_loss(original):
    def loss_and_outputs(model, task, inputs, targets):
        if model.training and _probe["shift"]:
            inputs = shifted(inputs)
        loss, outputs = original(model, task, inputs, targets)
        teacher = _probe["teacher"]
        if model.training and teacher is not None:
            alpha, temperature = _probe["distill"]
            with torch.no_grad():
                soft = F.softmax(teacher(inputs) / temperature, -1)
            distill = F.kl_div(F.log_softmax(outputs / temperature, -1), soft, reduction="batchmean") * temperature ** 2
            loss = (1 - alpha) * loss + alpha * distill
        return loss, outputs
    return loss_and_outputs


def install_probe() -> None:
    """Pool initializer: wrap the trainer's loss in this worker."""
    from patcli import training

    training.loss_and_outputs = probe_loss(training.loss_and_outputs)


def probe_job(args) -> dict:
    probe, overrides, extra, root = args
    distill, shift = PROBES[probe]
    _probe.update(distill=distill, teacher=None, shift=shift)
    if distill:
        from patcli.dense import load_run_config
        from patcli.models import build_model
        from patcli.data import load_dataset
        from patcli.runner import load_weights

        seed = [o for o in overrides if o.startswith("seed=")]
        dense = run_config(([*TUNED_DENSE, *seed, *extra], root))
        if dense.get("status") != "ok":
            return dense
        config = load_run_config(Path(dense["run_dir"]))
        teacher = build_model(config.model, load_dataset(config.dataset).meta)
        load_weights(teacher, Path(dense["run_dir"]))
        _probe["teacher"] = teacher.eval()
    return run_config(([*overrides, *extra], root))


def quality_gap(workers: int = 2) -> str:
    jobs = {}
    for probe in PROBES:
        for s in SPARSITIES:
            recipe = [*RECOMMENDED, f"pruning.sparsity={s}", CAP]
            for fold in range(FOLDS):  # the fold goes to the teacher too: it must not have seen the student's validation
                fold_override, seed = cross_validation(fold)
                jobs[(probe, "val", s, fold)] = (probe, [*recipe, seed], [fold_override])
            for protocol, extra in (("test", []), ("test refit", [REFIT])):
                for seed in TEST_SEEDS:
                    jobs[(probe, protocol, s, seed)] = (probe, [*recipe, f"seed={seed}"], extra)
    with tempfile.TemporaryDirectory() as folder:
        with multiprocessing.get_context("spawn").Pool(workers, initializer=install_probe) as pool:
            records = pool.map(probe_job, [(*job, folder) for job in jobs.values()], chunksize=1)
    pooled: dict = {}
    for (probe, protocol, s, _), record in zip(jobs, records):
        if record.get("status") != "ok":
            raise RuntimeError(f"probe run {probe} {protocol} {s} failed: {record.get('error')}")
        pooled.setdefault((probe, protocol, s), []).append(record["metrics"][protocol.split()[0]]["accuracy"])
    columns = [(p, s) for p in ("val", "test", "test refit") for s in SPARSITIES]
    rows = [[probe, *[mean_std(pooled[(probe, p, s)]) for p, s in columns]] for probe in PROBES]
    chosen = max(PROBES, key=lambda probe: statistics.fmean(v for s in SPARSITIES for v in pooled[(probe, "val", s)]))
    reached = {s: statistics.fmean(pooled[(chosen, "test refit", s)]) * 100 for s in SPARSITIES}
    return (
        f"The recommended recipe of the quality section ({' '.join(RECOMMENDED)}) with two training options patcli "
        f"does not have yet, added to the training loss by this benchmark only: distillation from the tuned dense "
        f"model of the same seed ({' '.join(TUNED_DENSE[1:])}; loss (1 − α)·CE + α·T²·KL at temperature T; refit "
        f"runs distil from a refit teacher), and every training image shifted by −1, 0 or +1 pixel in x and y. "
        f"Every probe is run and reported; the verdict below takes the one best by cross-validation. "
        f"Accuracy %, mean ± std: validation over the {FOLDS} cross-validation folds (seeds 0–2), test over seeds "
        f"3–5, trained on train (1,257) and refit on train + validation (1,427).\n\n"
        + table(["probe", *[f"{p} {s:.0%}" for p, s in columns]], rows)
        + f"\n\nBest by cross-validation (mean of 98% and 99%): {chosen}; refit, on test: {reached[0.98]:.1f}% at 98% "
        f"(target 98.0%), {reached[0.99]:.1f}% at 99% (target 97.0%)."
    )


SECTIONS = {"quality_gap": quality_gap}
