"""What a person sees: a rich progress bar while training and a summary table when a run ends."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .records import RunRecord

# Piped output (logs, CI, files) gets room for wide comparison tables; a terminal keeps its own width.
console = Console(width=None if sys.stdout.isatty() else 160)
errors = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


class RichProgress:
    """The training loop's progress: step, loss and current sparsity."""

    def __init__(self, description: str) -> None:
        self.description = description
        self._progress: Progress | None = None
        self._task = None

    def start(self, total_steps: int, label: str | None = None) -> None:
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("sparsity {task.fields[sparsity]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task(label or self.description, total=total_steps, loss="-", sparsity="-")

    def update(self, step: int, loss: float, sparsity: float | None) -> None:
        if self._progress is not None:
            self._progress.update(
                self._task,
                completed=step,
                loss=f"{loss:.4f}",
                sparsity="-" if sparsity is None else f"{sparsity:.1%}",
            )

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def summary_table(record: RunRecord) -> Table:
    """One run at a glance: method, sparsity, metrics per split, size and time."""
    what = record.method if record.recipe == record.method else f"{record.method} · {record.recipe}"
    table = Table(title=f"{what} · {record.model} on {record.dataset}", show_header=True)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("target sparsity", _percent(record.target_sparsity))
    table.add_row("achieved sparsity", _percent(record.achieved_sparsity))
    for split in ("val", "test"):
        for name, value in record.metrics.get(split, {}).items():
            shown = _percent(value) if name == "accuracy" else f"{value:.4f}"
            table.add_row(f"{split} {name}", shown)
    table.add_row("params nonzero / total", f"{record.params_nonzero:,} / {record.params_total:,}")
    table.add_row("model file", f"{record.bytes_on_disk:,} bytes")
    table.add_row("train steps (total incl. earlier runs)", f"{record.train_steps:,} ({record.total_train_steps:,})")
    table.add_row("train time", f"{record.train_seconds:.1f} s")
    if record.step_overhead is not None:
        table.add_row("pruner time / rest of the loop", f"{record.step_overhead:.1%}")
    if record.engine_state_bytes:
        table.add_row("engine state", f"{record.engine_state_bytes:,} bytes")
    return table


def print_error(message: str) -> None:
    """A user mistake: one line on stderr."""
    errors.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)

