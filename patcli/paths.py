"""Whether a path can be written, checked before a run or a report starts: a mistake in a path is one line naming
the option, not a traceback once work is done."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def unwritable_reason(path: Path, want_dir: bool) -> str | None:
    """Why ``path`` (a directory to create or reuse, or a file to write) cannot be written; None if it can."""
    path = Path(path).absolute()
    if path.exists():
        if want_dir and not path.is_dir():
            return f"{path} is a file; allowed: a directory path"
        if not want_dir and path.is_dir():
            return f"{path} is a directory; allowed: a file path"
    ancestor = next(p for p in (path if want_dir else path.parent, *path.parents) if p.exists())
    if not ancestor.is_dir():
        return f"{ancestor} is a file, so {path} cannot be created; allowed: a path under a writable directory"
    try:  # permission bits do not tell (root, read-only mounts, /proc): try it
        os.rmdir(tempfile.mkdtemp(dir=ancestor, prefix=".patcli-probe-"))
    except OSError as error:
        return f"{path} cannot be created in {ancestor} ({error.strerror}); allowed: a path under a writable directory"
    return None
