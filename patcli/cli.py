"""The ``patcli`` command: thin Typer functions that pass Hydra overrides to the library and print.

Every subcommand takes ordinary Hydra overrides (``group=option``, ``key=value``, ``+key=value``,
``hydra.run.dir=DIR``) as its extra arguments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .console import console, print_error
from .hydra_app import UsageError, config_groups, launch

OVERRIDES = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": ["--help", "-h"]}

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode="rich",
    help="Pruning-aware training (PAT) of PyTorch models, with post-training baselines to compare against.",
)


def groups_epilog() -> str:
    """The config groups and their options, for --help (paragraphs: Typer joins single newlines)."""
    lines = ["[bold]Config groups[/] (choose with GROUP=OPTION; set keys with GROUP.KEY=VALUE):"]
    lines += [f"  [cyan]{group}[/]: {' | '.join(options)}" for group, options in config_groups().items()]
    lines.append("Top-level keys: seed, dense. Hydra keys work too, e.g. hydra.run.dir=DIR.")
    return "\n\n".join(lines)


def _run(args: list[str], **kwargs) -> object:
    """Call the library; a user mistake ends as one line on stderr and exit code 2."""
    from .config import ConfigError

    try:
        return launch(list(args), **kwargs)
    except (UsageError, ConfigError) as error:
        print_error(str(error))
        raise typer.Exit(code=2) from None


def _not_a_baseline(config) -> None:
    from .config import ConfigError

    if config.baseline.name != "none":
        raise ConfigError("baseline", f"{config.baseline.name!r} is a post-training baseline: run it with `patcli prune-post`")


@app.command(context_settings=OVERRIDES, epilog=groups_epilog())
def train(
    ctx: typer.Context,
    cfg: Annotated[bool, typer.Option("--cfg", help="Print the composed config and exit.")] = False,
) -> None:
    """Train with pruning-aware training (PAT); [bold]pruning=none[/] trains the dense reference.

    Example: patcli train scorer=movement schedule=cubic pruning.sparsity=0.95
    """
    result = _run(ctx.args, show_config=cfg, check=_not_a_baseline)
    if cfg:
        console.print(result, highlight=False, markup=False)
        return
    console.print(f"run dir: {result.hydra_cfg.hydra.runtime.output_dir}", highlight=False, soft_wrap=True)


@app.command(context_settings=OVERRIDES)
def sweep(ctx: typer.Context) -> None:
    """Hydra multirun over comma-separated values (not implemented yet)."""
    print_error("`patcli sweep` is not implemented yet")
    raise typer.Exit(code=2)


@app.command("prune-post", context_settings=OVERRIDES)
def prune_post(ctx: typer.Context) -> None:
    """Post-training baselines from a dense run (not implemented yet)."""
    print_error("`patcli prune-post` is not implemented yet")
    raise typer.Exit(code=2)


@app.command()
def compare(paths: Annotated[Optional[list[Path]], typer.Argument(help="Run or sweep directories.")] = None) -> None:
    """PAT and baselines side by side, from run records (not implemented yet)."""
    print_error("`patcli compare` is not implemented yet")
    raise typer.Exit(code=2)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
