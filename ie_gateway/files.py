"""Small file operations several stages share: a folder's entries made durable, a file's sha256."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def fsync_dir(folder: Path) -> None:
    """Make the folder's entries (a rename, a new file) durable; raises OSError."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    """The file's sha256 as lowercase hex (``sha256sum``'s output), read in blocks."""
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()
