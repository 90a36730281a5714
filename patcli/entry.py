"""The ``patcli`` command's entry point, kept free of imports: Ctrl-C while the CLI's modules load (about a second)
ends as quietly as it does later, not in a traceback through Hydra's or rich's import."""

import signal
import sys

INTERRUPTED = (130, 143)  # the exit codes of Ctrl-C and SIGTERM


def main() -> None:
    try:
        from .cli import main as run_cli
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        raise SystemExit(130) from None
    try:
        run_cli()
    except SystemExit as stop:
        if stop.code in INTERRUPTED:  # the run is recorded and the process ends: a second Ctrl-C would only break
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # into the interpreter's exit with a traceback
        raise
