"""Whether a path can be written, checked before a run or a report starts: a mistake in a path is one line naming
the option, not a traceback once work is done."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def unwritable_reason(path: Path, want_dir: bool) -> str | None:
    """Why ``path`` (a directory to create or reuse, or a file to write) cannot be written; None if it can."""
    path = Path(path).absolute()
    # os.path's tests never raise; pathlib's do for a name too long or a folder they may not read
    if os.path.exists(path):
        if want_dir and not os.path.isdir(path):
            return f"{path} is a file; allowed: a directory path"
        if not want_dir and os.path.isdir(path):
            return f"{path} is a directory; allowed: a file path"
    ancestor = next(p for p in (path if want_dir else path.parent, *path.parents) if os.path.exists(p))
    if not os.path.isdir(ancestor):
        return f"{ancestor} is a file, so {path} cannot be created; allowed: a path under a writable directory"
    longest = name_max(ancestor)
    too_long = [name for name in path.relative_to(ancestor).parts if len(os.fsencode(name)) > longest]
    if too_long:
        return (f"{path} has a name of {len(os.fsencode(too_long[0]))} bytes, which {ancestor} cannot hold; allowed: "
                f"names of at most {longest} bytes")
    try:  # permission bits do not tell (root, read-only mounts, /proc): try it
        os.rmdir(tempfile.mkdtemp(dir=ancestor, prefix=".patcli-probe-"))
    except OSError as error:
        return f"{path} cannot be created in {ancestor} ({error.strerror}); allowed: a path under a writable directory"
    return None


def name_max(directory: Path) -> int:
    """The longest file name, in bytes, that ``directory``'s file system takes (255 where it does not say)."""
    try:
        return os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255
