"""The project's one way of writing a file: whole or not at all.

`write_atomically` writes to a hidden temporary name in the target's folder, flushes and fsyncs
it, renames it over the target (`os.replace` is atomic on POSIX) and fsyncs the folder, so a
crash at any moment leaves the old file or the new one, never half a file. Every writer of the
project uses it: the run directory (utils), the decoded-image cache (data) and `TaskMasks.save`.
It lives in the core package because that is the one package every other one may import.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], None], *, shared: bool = False) -> None:
    """Call `write` on a temporary file next to `path`, make it durable, rename it over `path`.

    The temporary file is `.<name>.tmp`; with `shared=True` (a folder where other processes may
    write the same file at the same time, such as a data cache) each writer gets its own random
    temporary name instead. On any error the temporary file is removed and the error re-raised;
    `path` is then untouched.
    """
    path = Path(path)
    suffix = f".{secrets.token_hex(4)}.tmp" if shared else ".tmp"
    tmp = path.with_name(f".{path.name}{suffix}")
    try:
        with open(tmp, "xb" if shared else "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def fsync_directory(folder: Path) -> None:
    """Make a rename in `folder` durable (where the platform has directory handles)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
