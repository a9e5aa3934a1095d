"""What the receiver reads of an instance file before it takes it (ie_gateway.intake)."""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from ie_gateway.config import Limits
from ie_gateway.intake import DEFER_BYTES, read_received

PRIVATE_BLOB = 0x00091010


def _instance(path: Path, blob: int) -> None:
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.add_new(0x00090010, "LO", "VENDOR")
    ds.add_new(PRIVATE_BLOB, "OB", b"\x01" * blob)
    ds.Rows = ds.Columns = 2
    ds.BitsAllocated = 16
    ds.PixelData = b"\0" * 8
    ds.save_as(path, enforce_file_format=True)


def test_a_header_value_longer_than_the_defer_limit_is_left_out_and_the_rest_is_read(tmp_path: Path) -> None:
    path = tmp_path / "big.dcm"
    _instance(path, DEFER_BYTES + 2)
    received = read_received(path, ExplicitVRLittleEndian, Limits())
    assert PRIVATE_BLOB not in received.header
    assert received.header.Modality == "CT" and received.header.Rows == 2
    assert "PixelData" not in received.header
    assert received.size == path.stat().st_size


def test_a_header_value_within_the_defer_limit_is_read(tmp_path: Path) -> None:
    path = tmp_path / "small.dcm"
    _instance(path, 1024)
    received = read_received(path, ExplicitVRLittleEndian, Limits())
    assert received.header[PRIVATE_BLOB].value == b"\x01" * 1024
