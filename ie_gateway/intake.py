"""What the receiver reads of an instance before it takes it: the header, and the limits it keeps.

pynetdicom writes each C-STORE's data set to a file as it arrives; this module reads that file's
top-level header without the pixel data or any value over ``DEFER_BYTES``, so nothing a peer sends
is held in memory whole. A Deflated data set is inflated into a file beside it in blocks, counting,
and refused as soon as it passes the instance limit: a small deflate stream cannot expand into
gigabytes here, nor later, when a stage reads the stored instance with pydicom (which inflates
whole files in memory).
"""

from __future__ import annotations

import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset, read_file_meta_info
from pydicom.tag import BaseTag
from pydicom.uid import DeflatedExplicitVRLittleEndian

from ie_gateway.config import Limits
from ie_gateway.errors import InstanceOverLimit

#: header values longer than this are not read (none that routing matches on is this long)
DEFER_BYTES = 64 * 1024
INFLATE_BLOCK = 1 << 20
PIXEL_DATA = 0x7FE00010
MB = 2**20
GB = 2**30


@dataclass(frozen=True)
class Received:
    """A received instance's header and its size as the node will hold it (inflated, if deflated)."""

    header: Dataset
    size: int


def read_received(path: Path, transfer_syntax: str, limits: Limits) -> Received:
    """The header of the instance file ``path`` (preamble, file meta, data set as sent in
    ``transfer_syntax``).

    Raises InstanceOverLimit when a deflated data set inflates past ``limits.max_instance_mb``, and
    pydicom's decoding errors when the file is not DICOM.
    """
    if transfer_syntax != DeflatedExplicitVRLittleEndian:
        header = dcmread(path, stop_before_pixels=True, defer_size=DEFER_BYTES)
        return Received(_without_deferred(header), path.stat().st_size)
    meta = read_file_meta_info(path)
    start = 128 + 4 + 12 + int(meta.FileMetaInformationGroupLength)
    with _inflated(path, start, limits.max_instance_mb * MB) as (inflated, size):
        dataset = read_dataset(inflated, False, True, stop_when=_at_pixel_data, defer_size=DEFER_BYTES)
    dataset.file_meta = meta
    return Received(_without_deferred(dataset), size)


def read_part(data: bytes, limits: Limits) -> Received:
    """The header of an instance received whole in memory (a STOW-RS part), read as
    :func:`read_received` reads a C-STORE's file, from a temp file: a Deflated one is inflated
    in bounded blocks, never whole in memory."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "part.dcm"
        path.write_bytes(data)
        return read_received(path, str(read_file_meta_info(path).TransferSyntaxUID), limits)


@contextmanager
def _inflated(path: Path, start: int, cap: int) -> Iterator[tuple[BinaryIO, int]]:
    """The deflated data set of ``path`` from byte ``start``, inflated into an unnamed temp file."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    size = 0
    with path.open("rb") as src, tempfile.TemporaryFile(dir=path.parent) as out:
        src.seek(start)
        while block := src.read(INFLATE_BLOCK):
            pending = block
            while pending:
                # max_length bounds each step's output: a bomb never inflates in memory at once
                chunk = inflater.decompress(pending, INFLATE_BLOCK)
                pending = inflater.unconsumed_tail
                size += len(chunk)
                if size > cap:
                    raise InstanceOverLimit("max_instance_mb", size // MB, cap // MB)
                out.write(chunk)
        out.write(inflater.flush())
        out.seek(0)
        yield out, size + start


def _at_pixel_data(tag: BaseTag, vr: str | None, length: int) -> bool:
    return int(tag) == PIXEL_DATA


def _without_deferred(header: Dataset) -> Dataset:
    """Drop the values left unread, so no later look at the header reads them after all."""
    # values() as stored: elements() and get_item() read a deferred value from the file to
    # return it, so looking through them would load the very values this leaves out
    deferred = [
        elem.tag
        for elem in header.values()
        if isinstance(elem, RawDataElement) and elem.value is None and elem.length > DEFER_BYTES
    ]
    for tag in deferred:
        del header[tag]
    return header


def sent_text(header: Dataset, keyword: str) -> str | None:
    """A top-level value as the peer encoded it, before pydicom tidies it: pydicom strips
    whitespace from UIDs, so a UID sent as ``1.2.3\\n`` would otherwise look valid."""
    if keyword not in header:
        return None
    value = header.get_item(keyword).value
    if isinstance(value, bytes):
        return value.decode("ascii", errors="replace")
    return None if value is None else str(value)


def check_limits(header: Dataset, size: int, series: tuple[int, int], limits: Limits) -> None:
    """Raise InstanceOverLimit when this instance, or its series with it, passes a limit.

    ``series``: (instances, bytes) of the series already stored. Raises ValueError when a size in
    the header is not a positive whole number.
    """
    rows, columns, frames = (_count(header, kw) for kw in ("Rows", "Columns", "NumberOfFrames"))
    count, stored = series
    checks = (
        ("max_rows", rows, limits.max_rows),
        ("max_columns", columns, limits.max_columns),
        ("max_slices", max(frames, count + 1), limits.max_slices),
    )
    for name, value, allowed in checks:
        if value > allowed:
            raise InstanceOverLimit(name, value, allowed)
    if size > limits.max_instance_mb * MB:
        raise InstanceOverLimit("max_instance_mb", size // MB, limits.max_instance_mb)
    if stored + size > limits.max_series_gb * GB:
        raise InstanceOverLimit("max_series_gb", (stored + size) // GB, limits.max_series_gb)


def _count(header: Dataset, keyword: str) -> int:
    """A size the header declares (0 when absent); ValueError when it is no positive number."""
    value = header.get(keyword)
    if value is None or value == "":
        return 0
    number = int(value)
    if number < 1 or number != float(value):
        raise ValueError(f"{keyword} {value!r} is not a positive whole number")
    return number
