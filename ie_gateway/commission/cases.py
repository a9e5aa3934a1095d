"""The cases of a commissioning run: one folder each, holding a CT series and the clinician's
approved RT Structure Set drawn on it.

Files are recognised by their SOP Class UID, never by name; anything else in a folder (other
modalities, notes, files that are not DICOM) is left alone. A folder that does not hold exactly
one approved structure set and one CT series is a case with a problem the report names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, RTStructureSetStorage

from ie_gateway.errors import CommissionError
from ie_gateway.qa.approvals import APPROVED


@dataclass(frozen=True)
class Case:
    """One case: its name (the folder's), the CT series' files and the approved set's file."""

    name: str
    ct_files: list[Path]
    approved: Path


def case_folders(cases_dir: Path) -> list[Path]:
    """The case folders under ``cases_dir``, in name order; CommissionError when there are none."""
    if not cases_dir.is_dir():
        raise CommissionError(f"{cases_dir} is not a folder of cases")
    folders = sorted(p for p in cases_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise CommissionError(f"{cases_dir} holds no case folders (one folder per case: CT files + approved RT-STRUCT)")
    return folders


def read_case(folder: Path) -> Case:
    """The CT series and approved structure set in ``folder``; CommissionError saying what is
    missing or ambiguous."""
    cts: dict[str, list[Path]] = {}
    approved: list[tuple[Path, Dataset]] = []
    drafts = 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        ds = _header(path)
        if ds is None:
            continue
        sop_class = ds.get("SOPClassUID")
        if sop_class == CTImageStorage:
            cts.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(path)
        elif sop_class == RTStructureSetStorage:
            if str(ds.get("ApprovalStatus", "")).strip().upper() == APPROVED:
                approved.append((path, ds))
            else:
                drafts += 1
    if len(approved) != 1:
        found = f"{len(approved)} approved RT Structure Sets" + (f" ({drafts} not approved)" if drafts else "")
        raise CommissionError(f"needs exactly one approved RT Structure Set, found {found}")
    path, ds = approved[0]
    if not cts:
        raise CommissionError("holds no CT image files")
    if len(cts) > 1:
        referenced = _referenced_series(ds) & set(cts)
        if len(referenced) != 1:
            raise CommissionError(f"holds {len(cts)} CT series and the structure set does not single one out")
        cts = {uid: cts[uid] for uid in referenced}
    [ct_files] = cts.values()
    return Case(folder.name, ct_files, path)


def _header(path: Path) -> Dataset | None:
    """The file's header, or None when it is not DICOM (the folder may hold anything)."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (pydicom.errors.InvalidDicomError, OSError, ValueError, EOFError):
        return None


def _referenced_series(ds: Dataset) -> set[str]:
    return {
        str(s.SeriesInstanceUID)
        for frame in ds.get("ReferencedFrameOfReferenceSequence", [])
        for study in frame.get("RTReferencedStudySequence", [])
        for s in study.get("RTReferencedSeriesSequence", [])
        if s.get("SeriesInstanceUID")
    }
