"""Instance files on disk: validated names, atomic durable writes.

A file becomes visible under its final name only after its bytes are fsynced; the rename is then
made durable by fsyncing the folder. A crash leaves at most a temp file, which start-up removes.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

from ie_gateway.errors import StoreError, UnsafeUIDError
from ie_gateway.files import fsync_dir, remove_leftovers

UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")
TMP_DIR = ".tmp"
SUFFIX = ".dcm"


def check_uid(value: object, what: str) -> str:
    """Return ``value`` as a UID safe to use as a file name, or raise UnsafeUIDError."""
    text = str(value or "").rstrip("\x00 ")
    if not text or len(text) > 64 or not UID_RE.fullmatch(text):
        raise UnsafeUIDError(f"{what} is not a valid UID (digits and dots, at most 64 characters)")
    return text


class Spool:
    """The folder tree `<root>/<study uid>/<series uid>/<sop uid>.dcm` and its temp area."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / TMP_DIR
        self.tmp.mkdir(parents=True, exist_ok=True)

    def series_dir(self, study_uid: str, series_uid: str) -> Path:
        return self.root / study_uid / series_uid

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str, copy: str = "") -> Path:
        """Where an instance is kept; ``copy`` names a later copy with other bytes, kept beside
        the first (``_`` never occurs in a UID, so no other instance's name can be the same)."""
        return self.series_dir(study_uid, series_uid) / (sop_uid + (f"_{copy}" if copy else "") + SUFFIX)

    def write(self, final: Path, chunks: Iterable[bytes | memoryview]) -> int:
        """Write ``chunks`` durably to ``final``; return the byte count. Raises OSError."""
        return self.commit(self.stage(chunks), final)

    def stage(self, chunks: Iterable[bytes | memoryview]) -> Path:
        """A temp file holding ``chunks`` (not yet durable). Raises OSError, leaving none."""
        tmp = self._tmp_name()
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                for chunk in chunks:
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp

    def take(self, source: Path) -> Path:
        """Move a file written elsewhere (pynetdicom's temp file of a C-STORE) into the temp area:
        renamed where it is on the spool's file system, else copied in blocks. Raises OSError."""
        tmp = self._tmp_name()
        try:
            try:
                os.rename(source, tmp)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                shutil.copyfile(source, tmp)
            os.chmod(tmp, 0o640)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp

    def commit(self, staged: Path, final: Path) -> int:
        """Make a staged temp file durable under ``final`` (fdatasync, rename, fsync the folder);
        return its size. Raises OSError or StoreError; the temp file is gone either way.

        fdatasync writes the bytes and what reading them needs (the size, the blocks), not the
        times: a crash leaves under a final name a whole file or none. Receivers of several
        associations call this at once, each for its own file and folder: the kernel (ext4's
        journal) serves concurrent fsyncs with shared commits, so that is cheaper than one
        thread syncing the folders of a batch one after another (measured here: four folders
        ~1-1.5 ms together, ~15 ms in turn).
        """
        try:
            fd = os.open(staged, os.O_RDONLY)
            try:
                os.fdatasync(fd)
                size = os.fstat(fd).st_size
            finally:
                os.close(fd)
            created = self._ensure_dir(final.parent)
            os.rename(staged, final)
        except BaseException:
            staged.unlink(missing_ok=True)
            raise
        _fsync_dir(final.parent)
        if created:
            _fsync_dir(final.parent.parent)
            _fsync_dir(final.parent.parent.parent)
        return size

    def _tmp_name(self) -> Path:
        return self.tmp / (uuid.uuid4().hex + ".part")

    def _ensure_dir(self, folder: Path) -> bool:
        if folder.is_dir():
            return False
        folder.mkdir(parents=True, exist_ok=True)
        return True

    def clear_tmp(self, older_than_s: float = 0.0) -> int:
        """Remove temp files a crash left behind; return how many.

        On a spool that other receivers write to at the same time, only files older than
        ``older_than_s`` go (a C-STORE in flight on another node is never that old).
        """
        before = time.time() - older_than_s if older_than_s else None
        return len(remove_leftovers(self.tmp.iterdir(), before))

    def iter_instances(self) -> Iterable[Path]:
        """Every instance file in the spool (used to reconcile with the index at start-up)."""
        for study in _subdirs(self.root):
            if study.name == TMP_DIR:
                continue
            for series in _subdirs(study):
                for entry in os.scandir(series):
                    if entry.name.endswith(SUFFIX) and entry.is_file():
                        yield Path(entry.path)


def _subdirs(folder: Path) -> list[Path]:
    try:
        return [Path(e.path) for e in os.scandir(folder) if e.is_dir()]
    except FileNotFoundError:
        return []


def _fsync_dir(folder: Path) -> None:
    try:
        fsync_dir(folder)
    except OSError as exc:
        raise StoreError(f"cannot open spool folder to sync it: {exc.strerror}") from exc
