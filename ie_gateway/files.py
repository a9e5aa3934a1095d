"""Small file operations several stages share: a folder's entries made durable, a file's sha256,
a full disk told apart where a library hides it."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from pathlib import Path


def fsync_dir(folder: Path) -> None:
    """Make the folder's entries (a rename, a new file) durable; raises OSError."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def raise_if_disk_full(folder: Path, needed_bytes: int, exc: BaseException) -> None:
    """After a write failed in a library that hides the errno (ITK's "could not write"): raise
    OSError(ENOSPC) when ``folder`` has less room than ``needed_bytes``, so the caller can wait
    for space instead of giving up; otherwise return (the caller re-raises ``exc``)."""
    if shutil.disk_usage(folder).free < needed_bytes:
        raise OSError(errno.ENOSPC, f"no space left on device in {folder.name}") from exc


def sha256_file(path: Path) -> str:
    """The file's sha256 as lowercase hex (``sha256sum``'s output), read in blocks."""
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()
