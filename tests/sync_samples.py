"""Small DICOM objects with planted identifiers, for the sync tests.

A handful of 32x32 CT slices (fast to anonymise and upload) and an RT-STRUCT on them made by
the node's own writer, so the sync tests see exactly what the node sends.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from ie_gateway.imaging import StructureInfo
from ie_gateway.write.common import ModelInfo, OutputUIDs
from ie_gateway.write.rtstruct import build_rtstruct

PLANTED = {
    "PatientName": "DOE^JANE^PLANTED",
    "PatientID": "PID-7733991",
    "PatientBirthDate": "19470312",
    "InstitutionName": "St Planted Hospital",
    "AccessionNumber": "ACC99887766",
    "ReferringPhysicianName": "HOUSE^GREGORY",
    "StudyDate": "20240517",
}
PRIVATE_VALUE = "PRIVATE-SECRET-4242"
NESTED_NAME = "NESTED^OPERATOR"
SECONDARY_NAME = "UNLISTED^REVIEWER"
STUDY_UID = "1.2.826.0.1.3680043.10.543.771234"
FRAME_UID = "1.2.826.0.1.3680043.10.543.771235"


def _file_meta(sop_class: str, sop_instance: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return meta


def _patient_study(ds: Dataset) -> None:
    for keyword, value in PLANTED.items():
        setattr(ds, keyword, value)
    ds.StudyInstanceUID = STUDY_UID
    ds.StudyTime = "101500"
    ds.StudyID = "S1"


def make_ct(folder: Path, slices: int = 4, burned_in: str = "NO") -> list[Path]:
    """Write ``slices`` CT slices with every PLANTED value, a private tag and a nested name."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid(entropy_srcs=["sync-ct-series"])
    paths = []
    for k in range(slices):
        sop_uid = generate_uid(entropy_srcs=["sync-ct", str(k)])
        ds = Dataset()
        ds.file_meta = _file_meta(CTImageStorage, sop_uid)
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        _patient_study(ds)
        ds.Modality = "CT"
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = FRAME_UID
        ds.SeriesDate = "20240517"
        ds.ContentDate = "20240517"
        ds.AcquisitionDateTime = "20240517101733.000000"
        ds.BurnedInAnnotation = burned_in
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [0.0, 0.0, 2.5 * k]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [1.0, 1.0]
        ds.SliceThickness = 2.5
        ds.Rows = ds.Columns = 32
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.PixelData = np.full((32, 32), 1000 + k, dtype=np.uint16).tobytes()
        operator = Dataset()
        operator.PersonName = NESTED_NAME
        ds.OperatorIdentificationSequence = Sequence([operator])
        ds.SecondaryReviewerName = SECONDARY_NAME  # a name Annex E does not list
        ds.private_block(0x0029, "PLANTED CREATOR", create=True).add_new(0x10, "LO", PRIVATE_VALUE)
        path = folder / f"ct{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def make_rtstruct(ct_paths: list[Path], path: Path) -> Path:
    """Our own RT-STRUCT (``build_rtstruct``) on the CT: one ROI, a square on every slice."""
    cts = [pydicom.dcmread(p, stop_before_pixels=True) for p in ct_paths]
    labels = np.zeros((len(cts), int(cts[0].Rows), int(cts[0].Columns)), dtype=np.uint8)
    labels[:, 8:20, 8:20] = 1
    heart = StructureInfo(label=1, name="Heart", color=(255, 0, 0), interpreted_type="ORGAN", fill_holes=False)
    uids = OutputUIDs(series_uid=generate_uid(entropy_srcs=["sync-rtstruct-series"]),
                      sop_uid=generate_uid(entropy_srcs=["sync-rtstruct"]))
    ds = build_rtstruct(cts, labels, [heart], ModelInfo(name="toy", version="1"), uids)
    ds.save_as(path, enforce_file_format=True)
    return path


def planted_needles() -> list[bytes]:
    """Every planted value as it would be encoded, to search raw output bytes for."""
    values = [*PLANTED.values(), PRIVATE_VALUE, NESTED_NAME, SECONDARY_NAME, STUDY_UID, FRAME_UID]
    return [v.encode() for v in values]
