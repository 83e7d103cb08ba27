"""Existence checks for model-store files that tell "missing" from "may not be read".

`Path.is_file` raises a bare `PermissionError` when a directory on the way cannot be searched
(Python 3.11-3.13) or answers False, i.e. "missing" (3.14), and safetensors reports a file it
may not open as "No such file or directory". These raise `ModelStoreError(path, "permission
denied ...")` instead, so a store with the wrong owner or mode says so.
"""

import os
import stat
from pathlib import Path

from app.model.errors import ModelStoreError

# Every message starts with "permission denied"; each says what could not be done.
UNREADABLE_FILE = "permission denied: the file exists, but this process may not read it"
UNSEARCHABLE_DIR = "permission denied: the directory exists, but this process may not look into it"
UNSEARCHABLE_PARENT = "permission denied: this process may not look into a directory above it"


def is_file(path: Path) -> bool:
    """True for a regular file this process can open for reading; False when there is none."""
    mode = _mode(path)
    if mode is None or not stat.S_ISREG(mode):
        return False
    try:
        with path.open("rb"):
            pass
    except PermissionError:
        raise ModelStoreError(path, UNREADABLE_FILE) from None
    except OSError:
        return True  # there is a file; its reader names whatever else is wrong with it
    return True


def is_dir(path: Path) -> bool:
    """True for a directory this process can look into; False when there is none."""
    mode = _mode(path)
    if mode is None or not stat.S_ISDIR(mode):
        return False
    try:
        # Needs search (x) permission on `path`, like any file in it. Not `path / "."`:
        # pathlib drops the ".".
        os.stat(os.path.join(path, "."))
    except PermissionError:
        raise ModelStoreError(path, UNSEARCHABLE_DIR) from None
    except OSError:
        return True
    return True


def _mode(path: Path) -> int | None:
    try:
        return path.stat().st_mode
    except PermissionError:
        raise ModelStoreError(path, UNSEARCHABLE_PARENT) from None
    except (OSError, ValueError):
        return None
