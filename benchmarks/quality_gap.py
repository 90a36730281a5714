"""What closes the digits gap of the quality section: probes with training options patcli does not have yet.

The engine issue's targets (98.0% at 98%, 97.0% at 99%) are missed by its own options. This section adds two
standard remedies to the training loss of the recommended recipe, here only (probes, not patcli options):
distillation (α and T chosen by cross-validation) from the tuned dense MLP of the same seed, from an ensemble of five
of them, or from a dense conv net (teachers stronger than the dense MLP), and ±1-pixel shifts of the 8×8 images.
Selection stays honest: the probes are compared by the quality section's 8-fold cross-validation (seeds 0–2) and
reported on test (seeds 3–5), trained on the train split and refit on train + validation, with the recipe alone
measured beside them.
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
# A conv net sees the 8×8 images as images: a teacher far stronger than the MLP (99.4% in 8-fold cross-validation,
# lr 1e-2 and 3e-3 tied), the kind of teacher distillation needs to lift a student above dense.
CNN_TEACHER = ["model=cnn", "pruning=none", "trainer.lr=0.01", "trainer.lr_schedule=cosine", "trainer.epochs=40",
               "trainer.weight_decay=0.01", "trainer.batch_size=32"]
SPARSITIES = (0.98, 0.99)
TARGETS = {0.98: 98.0, 0.99: 97.0}  # test accuracy %, the engine issue's
ENSEMBLE = 5  # members of the ensemble teacher: seeds s, s + 100, ... for the student's seed s
# teacher → [(overrides, seed offset)] of the dense runs whose mean tempered probabilities are the soft targets
TEACHERS = {
    "tuned dense MLP": [(TUNED_DENSE, 0)],
    f"{ENSEMBLE} tuned dense MLPs": [(TUNED_DENSE, 100 * m) for m in range(ENSEMBLE)],
    "dense CNN": [(CNN_TEACHER, 0)],
}
# name → (distillation weight α and temperature T, or None; teacher; shifted images): α and T are chosen by
# cross-validation
PROBES = {
    "recipe alone": (None, None, False),
    **{f"+ distillation from {teacher} (α {a}, T {t})": ((a, t), teacher, False)
       for teacher in TEACHERS for a in (0.5, 0.9) for t in (2, 4)},
    "+ ±1-pixel shifts": (None, None, True),
}

_probe: dict = {"distill": None, "teachers": [], "shift": False}  # set per job, read by the loss (in the worker)


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
        teachers = _probe["teachers"]
        if model.training and teachers:
            alpha, temperature = _probe["distill"]
            with torch.no_grad():  # an ensemble's soft targets: the mean of its members' tempered probabilities
                soft = torch.stack([F.softmax(t(inputs) / temperature, -1) for t in teachers]).mean(0)
            distill = F.kl_div(F.log_softmax(outputs / temperature, -1), soft, reduction="batchmean") * temperature ** 2
            loss = (1 - alpha) * loss + alpha * distill
        return loss, outputs
    return loss_and_outputs


def install_probe() -> None:
    """Pool initializer: wrap the trainer's loss in this worker."""
    from patcli import training

    training.loss_and_outputs = probe_loss(training.loss_and_outputs)


_teacher_runs: dict[tuple, str] = {}  # per worker: every α, T and sparsity of a fold or seed reuses its teachers


def teacher_run(overrides: list[str], root: str) -> dict:
    key = tuple(overrides)
    if key not in _teacher_runs:
        record = run_config((overrides, root))
        if record.get("status") != "ok":
            return record
        _teacher_runs[key] = record["run_dir"]
    return {"status": "ok", "run_dir": _teacher_runs[key]}


def probe_job(args) -> dict:
    from patcli.data import load_dataset
    from patcli.dense import load_run_config
    from patcli.models import build_model
    from patcli.runner import load_weights

    probe, overrides, extra, root = args
    distill, teacher, shift = PROBES[probe]
    _probe.update(distill=None, teachers=[], shift=False)
    seed = int(next(o for o in overrides if o.startswith("seed=")).removeprefix("seed="))
    data, models = None, []
    for teacher_overrides, offset in TEACHERS.get(teacher, []):  # trained plainly: the probe is off until all are
        dense = teacher_run([*teacher_overrides, f"seed={seed + offset}", *extra], root)
        if dense.get("status") != "ok":
            return dense
        config = load_run_config(Path(dense["run_dir"]))
        data = load_dataset(config.dataset)
        model = build_model(config.model, data.meta)
        load_weights(model, Path(dense["run_dir"]), "teacher")
        models.append(model.eval())
    _probe.update(distill=distill, teachers=models, shift=shift)
    record = run_config(([*overrides, *extra], root))
    if data is not None:  # how good the teacher itself is, on the splits the student is scored on
        record["teacher"] = {name: teacher_accuracy(models, split)
                             for name, split in (("val", data.val), ("test", data.test))}
    return record


@torch.no_grad()
def teacher_accuracy(teachers: list[torch.nn.Module], split) -> float:
    probabilities = torch.stack([F.softmax(t(split.inputs), -1) for t in teachers]).mean(0)
    return (probabilities.argmax(-1) == split.targets).float().mean().item()


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
    teachers: dict = {}
    for (probe, protocol, s, run), record in zip(jobs, records):
        if record.get("status") != "ok":
            raise RuntimeError(f"probe run {probe} {protocol} {s} failed: {record.get('error')}")
        split = protocol.split()[0]
        pooled.setdefault((probe, protocol, s), []).append(record["metrics"][split]["accuracy"])
        if "teacher" in record:  # every α, T and sparsity of a run (fold or seed) distils from the same teachers
            teachers.setdefault((PROBES[probe][1], protocol), {})[run] = record["teacher"][split]
    protocols = ("val", "test", "test refit")
    columns = [(p, s) for p in protocols for s in SPARSITIES]
    rows = [[probe, *[mean_std(pooled[(probe, p, s)]) for p, s in columns]] for probe in PROBES]
    chosen = max(PROBES, key=lambda probe: statistics.fmean(v for s in SPARSITIES for v in pooled[(probe, "val", s)]))
    reached = {s: statistics.fmean(pooled[(chosen, "test refit", s)]) * 100 for s in SPARSITIES}
    verdict = {s: "met" if reached[s] >= TARGETS[s] else "not met" for s in SPARSITIES}
    return (
        f"The recommended recipe of the quality section ({' '.join(RECOMMENDED)}) with two training options patcli "
        f"does not have yet, added to the training loss by this benchmark only: distillation, with loss "
        f"(1 − α)·CE + α·T²·KL at temperature T, from the tuned dense MLP of the same seed "
        f"({' '.join(TUNED_DENSE[1:])}), from an ensemble of {ENSEMBLE} of them (seeds s, s + 100, …; the mean of "
        f"their tempered probabilities) or from a dense conv net ({' '.join(CNN_TEACHER[:1] + CNN_TEACHER[2:])}), "
        f"teachers trained on the student's training split (refit runs distil from refit teachers); and every "
        f"training image shifted by −1, 0 or +1 pixel in x and y. "
        f"Every probe is run and reported; the verdict below takes the one best by cross-validation. "
        f"Accuracy %, mean ± std: validation over the {FOLDS} cross-validation folds (seeds 0–2), test over seeds "
        f"3–5, trained on train (1,257) and refit on train + validation (1,427).\n\n"
        + table(["probe", *[f"{p} {s:.0%}" for p, s in columns]], rows)
        + "\n\nThe teachers themselves (accuracy %, mean ± std over the same folds and seeds):\n\n"
        + table(["teacher", *protocols], [[teacher, *[mean_std(list(teachers[(teacher, p)].values())) for p in protocols]]
                                          for teacher in TEACHERS])
        + f"\n\nBest by cross-validation (mean of 98% and 99%): {chosen}; refit, on test: {reached[0.98]:.2f}% at 98% "
        f"(target 98.0%: {verdict[0.98]}), {reached[0.99]:.2f}% at 99% (target 97.0%: {verdict[0.99]})."
    )


SECTIONS = {"quality_gap": quality_gap}
