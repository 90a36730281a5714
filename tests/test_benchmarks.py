"""The benchmark sections still run against today's engine and runner, at sizes that take seconds.

A section is only rerun when its figures are wanted, so an API change can break it unnoticed for several rounds
(quality_gap did once, when ``load_weights`` gained an argument). These run each cheap section, and one job of the
quality_gap probes, small.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from benchmarks import engine_speed, quality_gap, structured
from benchmarks.common import run_config
from benchmarks.quality import CAP
from patcli import training
from patcli.engine import Pruner
from patcli.runner import MODEL_FILE


@pytest.fixture(autouse=True)
def keep_torch_threads():
    threads = torch.get_num_threads()  # the speed sections pin one thread, as they measure
    yield
    torch.set_num_threads(threads)


def rows(text: str) -> list[list[str]]:
    """The rows of the markdown tables in a section's text (header rows included), as lists of cells."""
    lines = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_mask_update_section_counts_exactly():
    header, row = rows(engine_speed.mask_update(sizes=(200_000,), repeats=1))
    assert header[-1] == "exact count" and row[-1] == "yes"


@pytest.mark.parametrize("frequency, per_block", [(engine_speed.DEFAULT_FREQUENCY, 2), (2 * engine_speed.DEFAULT_FREQUENCY, 1)])
def test_every_timed_overhead_block_holds_the_same_number_of_mask_updates(frequency, per_block):
    steps_per_block, blocks = 2 * engine_speed.DEFAULT_FREQUENCY, 30 + 3  # as the overhead section times them
    total = blocks * steps_per_block
    pruner = Pruner(torch.nn.Linear(8, 8), sparsity=0.9, **engine_speed.agp_through(total), frequency=frequency)
    updates = pruner.schedule.update_steps()
    assert [sum(start <= t < start + steps_per_block for t in updates) for start in range(0, total, steps_per_block)] \
        == [per_block] * blocks
    assert 0.899 < pruner.schedule.target(updates[-2]) < 0.9  # the last update timed ramps nearly to the target


def test_adamw_zeros_section_covers_each_implementation():
    text = engine_speed.adamw_zeros(size=4096, repeats=2)
    names = [row[0] for row in rows(text)]
    assert {"single-tensor", "foreach", "fused"} <= set(names)


def test_structured_sections_run_and_export_meets_its_ratio():
    speed = rows(structured.structured_speed(blocks=2))
    assert len(speed) == 1 + 4  # header + threads {1, 2} x batch {1, 64}
    export = {row[0]: row[-1] for row in rows(structured.export_size())[1:]}
    assert float(export["90%"].strip("*×")) <= 0.14


def test_quality_gap_probe_distils_from_plainly_trained_teachers(tmp_path, monkeypatch):
    def short(overrides: list[str]) -> list[str]:
        return [o for o in overrides if not o.startswith("trainer.epochs=")] + ["trainer.epochs=2"]

    members = [(short(quality_gap.TUNED_DENSE), 0), (short(quality_gap.TUNED_DENSE), 100)]
    monkeypatch.setattr(quality_gap, "TEACHERS", {"two MLPs": members})
    monkeypatch.setattr(quality_gap, "PROBES", {"probe": ((0.5, 2), "two MLPs", False)})
    monkeypatch.setattr(quality_gap, "_teacher_runs", {})
    monkeypatch.setattr(quality_gap, "_probe", {"distill": None, "teachers": [], "shift": False})
    monkeypatch.setattr(training, "loss_and_outputs", quality_gap.probe_loss(training.loss_and_outputs))
    second = [*members[1][0], "seed=100", "dataset.val_fold=1"]
    plain = run_config((second, str(tmp_path / "plain")))  # before the probe: no teachers yet
    student = [*short(quality_gap.RECOMMENDED), "pruning.sparsity=0.9", CAP, "seed=0"]
    record = quality_gap.probe_job(("probe", student, ["dataset.val_fold=1"], str(tmp_path)))
    assert record["status"] == "ok", record.get("error")
    assert set(record["teacher"]) == {"val", "test"}
    assert all(0.0 < accuracy <= 1.0 for accuracy in record["teacher"].values())
    assert record["achieved_sparsity"] == pytest.approx(0.9, abs=1e-3)
    # the second member was trained as plain dense training trains it, not distilled from the first
    cached = load_file(str(Path(quality_gap._teacher_runs[tuple(second)]) / MODEL_FILE))
    for name, tensor in load_file(str(Path(plain["run_dir"]) / MODEL_FILE)).items():
        assert torch.equal(tensor, cached[name]), name
