"""Shared fixtures: tiny models and in-process CLI runs that write under a temporary directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from patcli.cli import app

# A config that trains in well under a second: the tests check behaviour, not accuracy.
TINY = ["model.hidden=[32,32]", "trainer.epochs=2", "trainer.lr=0.01"]


@pytest.fixture
def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


@pytest.fixture
def cli(tmp_path, monkeypatch):
    """Run ``patcli`` in-process inside tmp_path; returns (exit code, stdout, stderr)."""
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()

    def invoke(*args: str):
        result = runner.invoke(app, list(args), catch_exceptions=False)
        return result.exit_code, result.stdout, result.stderr

    return invoke


def run_dir_of(stdout: str) -> Path:
    """The directory a command printed as its last line (``run dir: <path>``)."""
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("run dir: "), last
    return Path(last.removeprefix("run dir: "))


def result_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "result.json").read_text())


def classify_steps(model: nn.Module, optimizer, steps: int, batch: int, before_step=lambda: None) -> None:
    """``steps`` optimizer steps of 16-feature, 4-class cross-entropy on fixed-seed random batches;
    ``before_step`` runs between backward and the step (to read the gradients the pruner observes)."""
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(batch, 16, generator=generator)),
                                    torch.randint(0, 4, (batch,), generator=generator)).backward()
        before_step()
        optimizer.step()


def row_dense_value(row) -> float | None:
    """The dense value every cell of a comparison row takes its difference against (one for the whole row here)."""
    values = {cell.dense_value for cell in row.cells.values()}
    assert len(values) == 1, values
    return values.pop()
