"""Small file operations several stages share: a folder's entries made durable, a file's sha256,
a full disk told apart where a library hides it, leftover temp files removed."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
from collections.abc import Iterable
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


def remove_leftovers(paths: Iterable[Path], before: float | None = None) -> list[int]:
    """Delete the regular files among ``paths`` last written before ``before`` (epoch seconds;
    None: whatever their age) and return their sizes. Temp files a crash or a cut-off transfer
    left behind; one that goes meanwhile (its writer took it) is skipped, and a link is never
    followed."""
    removed = []
    for path in paths:
        try:
            info = path.lstat()
            if stat.S_ISREG(info.st_mode) and (before is None or info.st_mtime < before):
                path.unlink()
                removed.append(info.st_size)
        except FileNotFoundError:
            continue
    return removed
