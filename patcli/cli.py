"""The ``patcli`` command: thin Typer functions that pass Hydra overrides to the library and print.

Every subcommand takes ordinary Hydra overrides (``group=option``, ``key=value``, ``+key=value``,
``hydra.run.dir=DIR``) as its extra arguments.
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console

from .console import console, errors, print_error
from .records import METRICS_FILE, MODEL_FILE, RESULT_FILE, WriteError, write_atomic
from .hydra_app import UsageError, config_groups, launch

if TYPE_CHECKING:
    from .sweeps import BestTrial

RUN_FILES = (RESULT_FILE, METRICS_FILE, MODEL_FILE)
OVERRIDES = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": ["--help", "-h"]}

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_show_locals=False,
    no_args_is_help=True,
    rich_markup_mode="rich",
    help="Pruning-aware training (PAT) of PyTorch models, with post-training baselines to compare against.",
)


def groups_epilog() -> str:
    """The config groups and their options, for --help (paragraphs: Typer joins single newlines)."""
    lines = ["[bold]Config groups[/] (choose with GROUP=OPTION; set keys with GROUP.KEY=VALUE):"]
    groups = config_groups()
    presets = groups.pop("experiment", [])
    lines += [f"  [cyan]{group}[/]: {' | '.join(options)}" for group, options in groups.items()]
    lines.append("Top-level keys: seed, dense, output_root. Hydra keys work too, e.g. hydra.run.dir=DIR.")
    lines.append(f"Sweep presets: patcli sweep +experiment={' | '.join(presets)}")
    return "\n\n".join(lines)


class Terminated(KeyboardInterrupt):
    """SIGTERM (timeout, SLURM, a job scheduler), taken through the same path as Ctrl-C so the run is recorded."""


@contextmanager
def terminate_as_interrupt():
    """Only the main thread may set a signal handler: elsewhere (the CLI called from a thread) SIGTERM stays as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        if previous is not None:  # None: a handler set outside Python, which cannot be put back
            signal.signal(signal.SIGTERM, previous)


def _run(args: list[str], **kwargs) -> object:
    """Call the library; a user mistake ends as one line on stderr and exit code 2, a diverged run with exit code 1."""
    from .config import ConfigError
    from .jobs import unrecorded_note

    try:
        with terminate_as_interrupt():
            return launch(list(args), **kwargs)
    except (UsageError, ConfigError) as error:
        print_error(str(error))
        raise typer.Exit(code=2) from None
    except (FloatingPointError, WriteError) as error:  # training diverged, or a full disk: the record says failed
        print_error(f"{error}{unrecorded_note(error)}")
        raise typer.Exit(code=1) from None
    except KeyboardInterrupt as stop:
        why = getattr(stop, "unrecorded", None)
        print_error(f"interrupted (its record could not be written: {why})" if why else
                    "interrupted (a run already started is recorded in its result.json with status 'interrupted')")
        raise typer.Exit(code=143 if isinstance(stop, Terminated) else 130) from None


def _not_a_baseline(config) -> None:
    from .config import ConfigError

    if config.baseline.name != "none":
        raise ConfigError("baseline", f"{config.baseline.name!r} is a post-training baseline: run it with `patcli prune-post`")


@app.command(context_settings=OVERRIDES, epilog=groups_epilog())
def train(
    ctx: typer.Context,
    cfg: Annotated[bool, typer.Option("--cfg", help="Check the composed config, print it and exit.")] = False,
) -> None:
    """Train with pruning-aware training (PAT); [bold]pruning=none[/] trains the dense reference.

    Example: patcli train scorer=movement schedule=cubic pruning.sparsity=0.95
    """
    result = _run(ctx.args, show_config=cfg, check=_not_a_baseline)
    if cfg:
        print_config(result)
        return
    console.print(f"run dir: {result.hydra_cfg.hydra.runtime.output_dir}", highlight=False, soft_wrap=True)


@app.command(context_settings=OVERRIDES, epilog=groups_epilog())
def sweep(
    ctx: typer.Context,
    cfg: Annotated[bool, typer.Option("--cfg", help="Check every job's config; print the first job's, with what each job sets, and exit.")] = False,
) -> None:
    """A Hydra multirun: comma-separated values run every combination, then the comparison table prints.

    Example: patcli sweep pruning.sparsity=0.5,0.8,0.9,0.95 scorer=magnitude,movement
    Presets: patcli sweep +experiment=pat_vs_post (dense, PAT and every baseline at five sparsities);
    patcli sweep +experiment=tune_schedule (Optuna search of the schedule on the validation metric).
    Parallel jobs: hydra/launcher=joblib; SLURM: hydra/launcher=submitit_slurm (extras "sweep", "slurm" of the checkout: pip install -e ".\\[sweep]").
    Jobs go to output_root/multirun/<date>/<time>-<id>/<n>/ (hydra.sweep.dir=DIR to choose).
    """
    from .records import find_record_files
    from .sweeps import best_trial

    result = _run(ctx.args, multirun=True, show_config=cfg)
    if cfg:
        print_config(result)
        return
    if not result.directory.exists():
        print_error("the sweep launched no jobs")
        raise typer.Exit(code=2)
    # a study chooses on validation, so its table shows validation; the best trial's test metric is reported once
    if not result.stopped or any(find_record_files(result.record_paths)):  # a launcher may stop before any job is recorded
        show_comparison(result.record_paths, None, "val" if result.study else "test", "table", None, None)
    if result.stopped:  # the jobs never started have no record: the table holds what ran (a study saved no best trial)
        console.print(f"sweep dir: {result.directory}", highlight=False, soft_wrap=True)
        print_error(f"the sweep stopped: {result.stopped}; the jobs it held are recorded as failed, those not started "
                    "are missing")
        raise typer.Exit(code=1)
    if result.study:
        show_best_trial(best_trial(result.directory), result.record_paths)
    console.print(f"sweep dir: {result.directory}", highlight=False, soft_wrap=True)
    failed = result.failed_jobs()
    if failed and not result.study:  # a study's failed trials are part of its search; its best trial is the result
        print_error(f"{failed} of {len(result.job_dirs)} jobs failed (listed apart in the table above)")
        raise typer.Exit(code=1)


def show_best_trial(best: BestTrial | None, record_paths: list[Path] = ()) -> None:
    """The Optuna study's best trial (chosen on validation), and that run's test metric, reported once; a best trial
    of an earlier session takes the metric's name from this session's trials."""
    from .records import RESULT_FILE, read_record

    if best is None:
        print_error("no trial finished ok, so the study has no best trial")
        raise typer.Exit(code=1)
    params = " ".join(f"{key}={value}" for key, value in best.params.items())
    record = read_record(best.run_dir / RESULT_FILE) if best.run_dir else None
    metric = record.primary_metric if record else metric_named(record_paths)
    line = f"best trial: val {metric} {best.value:.4f} with {params}"
    if record:
        line += f"; its test {metric} {record.primary_value('test'):.4f} → {best.run_dir}"
    elif best.run_dir is None:  # a study resumed from storage: its best may be a trial an earlier session ran
        line += "; a trial of an earlier session of this study (its run is in that session's sweep folder)"
    if best.from_records:
        line += " (found in the trials' records: the sweeper stopped before saving the study's best trial)"
    console.print(line, highlight=False, soft_wrap=True)


def print_config(text: str) -> None:
    """``--cfg``'s YAML with every line whole: wrapped at a pipe's width, a long value or job line broke the YAML."""
    console.print(text, highlight=False, markup=False, soft_wrap=True)


def metric_named(record_paths: list[Path]) -> str:
    """The primary metric the first readable record names ("metric" where none can be read); a folder (a study's
    sweep folder) is searched for records."""
    from .records import find_record_files, read_record

    for path in find_record_files(list(record_paths)):
        try:
            return read_record(path).primary_metric
        except ValueError:  # a damaged record (RecordError, ConfigError): the next one may name it
            continue
    return "metric"


def _a_baseline(config) -> None:
    from .baselines import BASELINES
    from .config import ConfigError

    if config.baseline.name == "none":
        raise ConfigError("baseline", f"missing; allowed: {', '.join(BASELINES.names())}")


@app.command("prune-post", context_settings=OVERRIDES, epilog=groups_epilog())
def prune_post(
    ctx: typer.Context,
    cfg: Annotated[bool, typer.Option("--cfg", help="Check the composed config, print it and exit.")] = False,
) -> None:
    """Post-training baseline: prune a trained dense run (and maybe fine-tune it), recorded like a PAT run.

    Example: patcli prune-post baseline=iterative dense=outputs/runs/.../ pruning.sparsity=0.9
    Without dense=, a matching dense run (same model, data, trainer, seed) under output_root is reused, or trained.
    """
    result = _run(ctx.args, show_config=cfg, check=_a_baseline)
    if cfg:
        print_config(result)
        return
    console.print(f"run dir: {result.hydra_cfg.hydra.runtime.output_dir}", highlight=False, soft_wrap=True)


FORMATS = ("table", "csv", "markdown", "json")  # checked here, for one error line (Typer's choice box spans many)


@app.command()
def compare(
    paths: Annotated[Optional[list[Path]], typer.Argument(help="Run or sweep directories, or result.json files.")] = None,
    metric: Annotated[Optional[str], typer.Option(help="Metric to show (default: each run's primary metric).")] = None,
    split: Annotated[str, typer.Option(help="Split to show: test (default) or val.")] = "test",
    format: Annotated[str, typer.Option("--format", help="Output format: table, csv, markdown or json.")] = "table",
    output: Annotated[Optional[Path], typer.Option(help="Write to this file instead of the terminal.")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Also draw metric vs sparsity curves into this image (.png, .pdf or .svg).")] = None,
) -> None:
    """PAT and post-training baselines side by side, from run records (models are never loaded).

    Rows are methods, columns target sparsities, cells the metric (mean ± std over seeds and folds) and its difference to dense.
    Runs that did not finish ok are listed apart (csv: rows with their status and error); with no finished run the
    command lists them, draws no plot and exits with code 1.
    """
    nothing = show_comparison(paths or [Path("outputs")], metric, split, format, output, plot)
    if nothing:
        print_error(nothing)
        raise typer.Exit(code=1)


PLOT_FORMATS = (".png", ".pdf", ".svg")


def show_comparison(paths: list[Path], metric: str | None, split: str, format: str, output: Path | None,
                    plot: Path | None) -> str | None:
    """Print or write the comparison (and plot); returns why nothing was compared (no finished run), else None.

    The caller says it: ``sweep`` has its own line for failed jobs.
    """
    import io

    from . import report
    from .paths import unwritable_reason

    if split not in ("test", "val"):
        print_error(f"--split: {split!r} is not allowed; allowed: test, val")
        raise typer.Exit(code=2)
    if format not in FORMATS:
        print_error(f"--format: {format!r} is not allowed; allowed: {', '.join(FORMATS)}")
        raise typer.Exit(code=2)
    missing = [str(p) for p in paths if not os.path.exists(p)]  # never raises, unlike pathlib
    if missing:
        print_error(f"PATHS: {', '.join(missing)} does not exist")
        raise typer.Exit(code=2)
    for option, path in (("--output", output), ("--plot", plot)):
        if path and path.name in RUN_FILES:  # writing there would replace a run's own record, metrics or weights
            print_error(f"{option}: {path.name} is the name of a run's own file; allowed: another file name")
            raise typer.Exit(code=2)
        run = path and next((folder for folder in Path(os.path.abspath(path)).parents
                             if os.path.isfile(folder / RESULT_FILE)), None)
        if run:  # its config snapshot, log or export would be replaced, and a later export or baseline fail
            print_error(f"{option}: {path} is inside the run folder {run}; allowed: a file outside run folders")
            raise typer.Exit(code=2)
        why = path and unwritable_reason(path, want_dir=False)
        if why:
            print_error(f"{option}: {why}")
            raise typer.Exit(code=2)
    if plot and output and os.path.realpath(plot) == os.path.realpath(output):  # the image would replace the table
        print_error(f"--plot: {plot} is also --output; allowed: two different files")
        raise typer.Exit(code=2)
    if plot and plot.suffix.lower() not in PLOT_FORMATS:
        print_error(f"--plot: {plot.name!r} has no image extension; allowed: a file ending in {', '.join(PLOT_FORMATS)}")
        raise typer.Exit(code=2)
    records, skipped = report.load_records(paths)
    for line in skipped:
        errors.print(f"[yellow]warning:[/] skipping {line}", highlight=False, soft_wrap=True)
    known = sorted({name for r in records if r.status == "ok" for name in r.metrics.get(split, {})})
    if metric and known and metric not in known:
        print_error(f"--metric: {metric!r} is in no {split} record; allowed: {', '.join(known)}")
        raise typer.Exit(code=2)
    comparison = report.compare(records, metric, split)
    for line in comparison.repeats + comparison.without_metric:
        errors.print(f"[yellow]warning:[/] {line}", highlight=False, soft_wrap=True)
    if not records:
        print_error(f"no run records (result.json) under {', '.join(map(str, paths))}")
        raise typer.Exit(code=2)
    if format == "table":
        # a file gets the table as text, and the terminal only "wrote FILE"
        target = Console(file=io.StringIO(), record=True, width=200) if output else console
        for table in report.rich_tables(comparison):
            target.print(table)
        text = target.export_text() if output else None
    else:
        text = {"csv": report.to_csv, "json": report.to_json, "markdown": report.to_markdown}[format](comparison)
        if not output:
            console.print(text, end="", highlight=False, markup=False, soft_wrap=True)
    if output:
        try:
            write_atomic(output, text)
        except WriteError as error:
            print_error(str(error))
            raise typer.Exit(code=1) from None
        console.print(f"wrote {output}", highlight=False, soft_wrap=True)
    if not comparison.has_values:
        why = f"nothing to compare: no run under {', '.join(map(str, paths))} finished ok with a {split} metric"
        if comparison.not_ok:
            why += f" ({len(comparison.not_ok)} did not finish ok, listed {f'in {output}' if output else 'above'})"
        return why + (f"; nothing to plot, so {plot} was not written" if plot else "")
    if plot:
        try:
            plot.parent.mkdir(parents=True, exist_ok=True)  # as --output does
            report.plot(comparison, plot)
        except ImportError:
            print_error("--plot needs matplotlib: pip install -c constraints.txt -e '.[plot]' in the patcli checkout")
            raise typer.Exit(code=2) from None
        except OSError as error:  # a full disk
            print_error(f"--plot: cannot write {plot}: {error.strerror or error}")
            raise typer.Exit(code=1) from None
        console.print(f"wrote {plot}", highlight=False, soft_wrap=True)
    return None


@app.command("export")
def export(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory.")],
    latency: Annotated[bool, typer.Option(help="Measure CPU latency before/after (structured runs).")] = True,
) -> None:
    """Export a run: a physically smaller model (neurons/filters/heads) or a compressed file (unstructured).

    Writes RUN_DIR/export/ and adds params, bytes and latency to RUN_DIR/result.json; load it with patcli.load_pruned.
    """
    from .config import ConfigError
    from .export import export_run

    try:
        with terminate_as_interrupt():  # SIGTERM too goes through the cleanup of the export's temporary folder
            record = export_run(run_dir, measure_latency=latency)
    except ConfigError as error:
        print_error(str(error))
        raise typer.Exit(code=2) from None
    except WriteError as error:  # a full disk: the older export and the record stay as they were
        print_error(str(error))
        raise typer.Exit(code=1) from None
    except KeyboardInterrupt as stop:
        print_error("interrupted (the older export and the record stay as they were)")
        raise typer.Exit(code=143 if isinstance(stop, Terminated) else 130) from None
    console.print(f"params {record.params_total:,} → {record.params_after:,}; bytes {record.bytes_before:,} → "
                  f"{record.bytes_after:,} ({record.bytes_after / record.bytes_before:.3f}×)", highlight=False)
    for batch in (1, 64) if latency else ():  # --no-latency: the figures an earlier export measured are not shown as new
        if f"batch{batch}_before" in record.latency_ms:
            before, after = record.latency_ms[f"batch{batch}_before"], record.latency_ms[f"batch{batch}_after"]
            console.print(f"CPU latency batch {batch}: {before:.3f} ms → {after:.3f} ms ({before / after:.2f}×)", highlight=False)
    console.print(f"export dir: {run_dir / 'export'}", highlight=False, soft_wrap=True)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
