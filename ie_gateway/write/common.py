"""Inputs shared by the RT-STRUCT and SEG writers, and the masks both of them encode.

Both outputs are built from the same per-structure masks (:func:`structure_masks`) so that the
TPS sees the same shapes whichever object it reads.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.valuerep import format_number_as_ds

import ie_gateway
from ie_gateway.errors import WriteError
from ie_gateway.imaging import StructureInfo
from ie_gateway.store.records import OutputUIDs

#: DICOM values both writers copy unchanged from the CT so the result stays in the patient's study.
PATIENT_STUDY_KEYWORDS: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)

MANUFACTURER = "ie_gateway"


@dataclass(frozen=True)
class ModelInfo:
    """The model package (name, version) that produced the label map.

    ``needs_review``: the result failed its model's plausibility checks and goes out anyway (the
    route's `review: flag`, or an admin's release); outputs then say NEEDS REVIEW where a
    planner sees it first (StructureSetLabel, SeriesDescription).

    ``node``: the AE title of the node that ran the model, named in the outputs' contributing
    equipment (IHE AI Results: every AI output says which algorithm, which version, made where).
    """

    name: str
    version: str
    needs_review: bool = False
    node: str = ""

    @property
    def spec(self) -> str:
        """``name@version``, as the registry, the logs and the outputs name the model."""
        return f"{self.name}@{self.version}"


def algorithm_identification(model: ModelInfo) -> hd.AlgorithmIdentificationSequence:
    """The Algorithm Identification macro of the model: an AI algorithm, its name and version.

    The SEG's segments and the RT-STRUCT's ROIs carry the same item, so a reader finds the model
    the same way in both.
    """
    return hd.AlgorithmIdentificationSequence(
        name=model.name,
        version=model.version,
        family=codes.cid7162.ArtificialIntelligence,
        source=MANUFACTURER,
    )


def contributing_equipment(model: ModelInfo) -> hd.ContributingEquipment:
    """The ContributingEquipmentSequence item naming the model (name@version) and the node
    that ran it, as IHE AI Results asks of every AI output (processing equipment)."""
    station = model.node[:16] or None  # StationName is a SH: at most 16 characters
    return hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=model.spec[:64],
        software_versions=[model.spec[:64], f"ie_gateway {ie_gateway.__version__}"],
        station_name=station,
        contribution_datetime=dt.datetime.now(dt.UTC),
        contribution_description=f"AI auto-contouring by {model.spec}"[:1024],
    )


#: The marker of a result that failed its plausibility checks.
NEEDS_REVIEW = "NEEDS REVIEW"


def new_output_uids() -> OutputUIDs:
    """Fresh UIDs for one output object (the node makes them when it plans a job's outputs)."""
    return OutputUIDs.new()


def check_inputs(
    ct_headers: Sequence[pydicom.Dataset],
    labels: np.ndarray,
    structures: Sequence[StructureInfo],
) -> None:
    """Refuse inputs the writers cannot encode faithfully, with a reason an admin can act on."""
    if not ct_headers:
        raise WriteError("no CT instances given to reference")
    if labels.ndim != 3 or labels.dtype != np.uint8:
        raise WriteError(f"label map must be uint8 (z, y, x); got {labels.dtype} {labels.shape}")
    rows, cols = int(ct_headers[0].Rows), int(ct_headers[0].Columns)
    if labels.shape != (len(ct_headers), rows, cols):
        raise WriteError(f"label map shape {labels.shape} is not the CT grid {(len(ct_headers), rows, cols)}")
    if not structures:
        raise WriteError("no structures to write")
    seen_labels = [s.label for s in structures]
    if len(set(seen_labels)) != len(seen_labels) or min(seen_labels) < 1:
        raise WriteError(f"structure labels must be distinct and >= 1; got {seen_labels}")
    frames = {h.get("FrameOfReferenceUID") for h in ct_headers}
    if None in frames:
        raise WriteError("a CT instance has no FrameOfReferenceUID; contours cannot be placed")
    if len(frames) != 1:
        raise WriteError(f"CT instances span {len(frames)} frames of reference; expected one")


def with_patient_study(ct: pydicom.Dataset) -> pydicom.Dataset:
    """``ct``, or a copy with the patient/study attributes it lacks present and empty.

    They are Type 2 in the CT IOD, yet some scanners leave them out; empty is what absent means.
    """
    missing = [k for k in PATIENT_STUDY_KEYWORDS if k not in ct and k != "StudyInstanceUID"]
    if not missing:
        return ct
    filled = pydicom.Dataset(ct)
    for keyword in missing:
        setattr(filled, keyword, "")
    return filled


def ds_strings(values: np.ndarray) -> list[str]:
    """Decimal String texts of ``values``, each at most 16 characters as DICOM requires.

    Six decimals put a contour's z within 10^-6 mm of its slice's ImagePositionPatient, so a
    TPS matches contour to slice; a value too long for that (beyond ±10^8 mm) falls back to
    pydicom's width-aware formatter.
    """
    texts = [f"{v:.6f}" for v in np.asarray(values, dtype=np.float64).ravel().tolist()]
    return [t if len(t) <= 16 else format_number_as_ds(float(t)) for t in texts]


#: Largest |value| that "%.6f" writes in at most 16 characters ("-99999999.999999").
_DS6_LIMIT = 99999999.9999994


def ds_bytes(values: np.ndarray) -> bytes:
    """The encoded value of a DS element holding ``values``: texts joined by backslashes,
    padded to even length, each text at most 16 characters (see :func:`ds_strings`).

    One C-level format call for the whole array, instead of a DS object per value: this is
    what makes a 200-slice RT-STRUCT cheap to build.
    """
    flat = np.asarray(values, dtype=np.float64).ravel()
    if flat.size and float(np.abs(flat).max()) <= _DS6_LIMIT:
        text = ("%.6f\\" * flat.size)[:-1] % tuple(flat.tolist())
    else:
        text = "\\".join(ds_strings(flat))
    return _even(text.encode("ascii"))


def _even(data: bytes) -> bytes:
    """A DS value padded to even length, as DICOM encodes every value."""
    return data + b" " if len(data) % 2 else data


#: Largest |value| that "%.3f" writes in at most 16 characters ("-99999999999.999").
_DS3_LIMIT = 99999999999.9994


def contour_data_bytes(points_xyz: np.ndarray) -> bytes:
    """The encoded ContourData of one contour's (n, 3) patient points (LPS mm).

    On an axial plane (every point at one z, as our contours of an axial CT are) x and y go to
    the micrometre, a thousandth of a CT pixel, and z as the six-decimal text of the slice's
    position with its trailing zeros dropped, written once: z is still the slice's
    ImagePositionPatient to 10^-6 mm, which is what a TPS matches a contour to its slice by.
    A quarter fewer bytes than six decimals throughout: a 200-slice thorax RT-STRUCT shrinks
    from 4.0 to 3.0 MiB, which the TPS receives, parses and stores in less time.
    Any other plane: :func:`ds_bytes`.
    """
    xyz = np.asarray(points_xyz, dtype=np.float64).reshape(-1, 3)
    z = xyz[:, 2]
    if not z.size or z.min() != z.max() or abs(z[0]) > _DS6_LIMIT or np.abs(xyz[:, :2]).max() > _DS3_LIMIT:
        return ds_bytes(xyz)
    z_text = f"{z[0]:.6f}".rstrip("0").rstrip(".")
    text = (("%.3f\\%.3f\\" + z_text + "\\") * len(xyz))[:-1] % tuple(xyz[:, :2].ravel().tolist())
    return _even(text.encode("ascii"))
