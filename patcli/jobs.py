"""One job as Hydra runs it: validate, execute, print, and leave a record whatever happens.

In a single run a user mistake propagates (the CLI turns it into one line and exit code 2). In a sweep a
failing job must not stop the others: its record says ``failed`` with the error, and the job returns None.
"""

from __future__ import annotations

import logging
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.types import RunMode

from .config import ConfigError, parse_run_config
from .engine.allocation import AllocationError
from .console import RichProgress, console, summary_table
from .runner import execute, failed_record, plan

log = logging.getLogger(__name__)


def run_job(source: dict[str, Any], run_dir: Path, mode: RunMode | None, searching: bool = False) -> float | None:
    """Run one job; return its validation primary metric (what a sweeper optimises), None if it failed.

    ``searching``: a sweeper that chooses its trials by their validation value (Optuna); a trial's line then shows
    that value alone, and the best trial's test value is printed once, after the search.
    """
    sweeping = mode == RunMode.MULTIRUN
    try:
        config = parse_run_config(source)
        for warning in plan(config).warnings:  # into this job's run.log (its config was checked before the log existed)
            log.warning(warning)
        progress = None if sweeping else RichProgress(config.recipe())
        record = execute(config, run_dir, progress)
    except KeyboardInterrupt as error:
        leave_record(source, run_dir, error, status="interrupted")
        raise
    except Exception as error:
        leave_record(source, run_dir, error)
        log.info("run failed", exc_info=True)  # the traceback goes to run.log; the terminal gets one line
        if not sweeping:
            if isinstance(error, AllocationError):  # a target the caps cannot meet is the user's to fix
                raise ConfigError("pruning.sparsity", str(error)) from error
            raise
        console.print(f"[red]job failed[/] {run_dir}: {error.__class__.__name__}: {error}{unrecorded_note(error)}",
                      highlight=False)
        return None
    if sweeping:  # a sweeper optimises the validation value: show it first
        val, test = (record.primary_value(split) for split in ("val", "test"))
        shown = "" if searching else f", test {_number(test)}"
        console.print(f"[green]done[/] {record.recipe} s={record.target_sparsity:g} seed={record.seed}: "
                      f"val {record.primary_metric} {_number(val)}{shown} → {run_dir}", highlight=False)
    else:
        console.print(summary_table(record))
    return record.primary_value("val")


def leave_record(source: dict[str, Any], run_dir: Path, error: BaseException, status: str = "failed") -> None:
    """The record of a run that did not finish. Ctrl-C and SIGTERM wait until it is written: a second one a few ms
    after the first (a wrapper forwarding the signal the terminal also sent) broke into the write and left none.
    A record that cannot be written (a full disk) is noted on ``error``, for the line the terminal gets."""
    with signals_held(deliver=status != "interrupted"):  # an interrupted run stops anyway
        try:
            failed_record(source, run_dir, error, status=status)
        except OSError as write_error:
            error.unrecorded = str(write_error)


def unrecorded_note(error: BaseException) -> str:
    why = getattr(error, "unrecorded", None)
    return f"; its record could not be written either ({why})" if why else ""


@contextmanager
def signals_held(deliver: bool = True):
    """Hold SIGINT and SIGTERM until the block ends, then deliver the first one that came (``deliver``), or drop it.

    Only the main thread may set handlers: elsewhere (a launcher's thread) the signals stay as they are."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    previous = {number: signal.signal(number, lambda received, frame: arrived.append(received))
                for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            if handler is not None:  # None: set outside Python, which cannot be put back
                signal.signal(number, handler)
        if arrived and deliver:
            signal.raise_signal(arrived[0])


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
