"""The ``patcli`` command's entry point, kept free of imports: Ctrl-C while the CLI's modules load (about a second)
ends as quietly as it does later, not in a traceback through Hydra's or rich's import."""

import signal
import sys


def main() -> None:
    try:
        from .cli import main as run_cli
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        raise SystemExit(130) from None
    try:
        run_cli()
    except SystemExit:  # the command is done and its runs recorded: a Ctrl-C now (a second one, or one while a joblib
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # sweep's workers are joined at exit) would only break into the
        raise  # interpreter's exit with a traceback
