"""Label map → RT Structure Set, written with pydicom (highdicom has no RT-STRUCT writer).

Contours are the marching-squares iso-line at 0.5 of each structure's 0/1 mask on each axial
slice (:func:`~ie_gateway.write.contours.mask_rings`), so a contour runs half-way between voxel
centres inside and outside and rasterising it back (voxel centre inside ⇔ voxel in the
structure) gives the mask again. Polygons are simplified losslessly by dropping collinear
vertices.

Holes: every boundary on a slice, outer or inner, is its own CLOSED_PLANAR contour, and the
structure is the even-odd (XOR) combination of the contours of a slice. This is how the common
TPSs (Eclipse, RayStation, Monaco, Pinnacle) read several contours of one ROI on one plane, and
it needs no keyhole cut that would show as a line in the TPS. Structures whose ``fill_holes``
is set have no holes (see :class:`~ie_gateway.write.common.StructureInfo`), so they get outer
contours only.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import numpy as np
import pydicom
import structlog
from pydicom.charset import default_encoding
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.uid import UID, ExplicitVRLittleEndian, RTStructureSetStorage

import ie_gateway
from ie_gateway.imaging import Masks, SliceGeometry, StructureInfo, bounding_box, for_each_structure
from ie_gateway.store.records import OutputUIDs
from ie_gateway.vocab import ApprovalStatus
from ie_gateway.write.common import (
    MANUFACTURER,
    NEEDS_REVIEW,
    PATIENT_STUDY_KEYWORDS,
    ModelInfo,
    algorithm_identification,
    check_inputs,
    contour_data_bytes,
    contributing_equipment,
)
from ie_gateway.write.contours import mask_rings

log = structlog.get_logger(__name__)

#: Contours enclosing less than this (in pixels²) are slivers; a single voxel gives a diamond
#: of 0.5 px², so no voxel of the mask is dropped, only degenerate lines.
MIN_AREA_PX2 = 0.25
#: Detached Study Management SOP Class: what RTReferencedStudySequence conventionally names.
STUDY_REFERENCE_SOP_CLASS = "1.2.840.10008.3.1.2.3.1"
DEFAULT_SERIES_NUMBER = 901
CONTOUR_DATA = 0x30060050


def _contour_item(number: int, points_xyz: np.ndarray, ct_header: pydicom.Dataset) -> Dataset:
    image = Dataset()
    image.ReferencedSOPClassUID = ct_header.SOPClassUID
    image.ReferencedSOPInstanceUID = ct_header.SOPInstanceUID
    item = Dataset()
    item.ContourImageSequence = DicomSequence([image])
    item.ContourGeometricType = "CLOSED_PLANAR"
    item.NumberOfContourPoints = len(points_xyz)
    item.ContourNumber = number
    # stored encoded, as a file read back holds it: pydicom writes a raw element's bytes as
    # they are, and never makes a DS object per coordinate (that took 5 of 6 s per RT-STRUCT)
    data = contour_data_bytes(points_xyz)
    item[CONTOUR_DATA] = RawDataElement(Tag(CONTOUR_DATA), "DS", len(data), data, 0, False, True, True, False)
    # the encoding the raw value is in; without it pydicom decodes the element to write it
    item.set_original_encoding(False, True, default_encoding)
    return item


def structure_contours(
    mask: np.ndarray, geometry: SliceGeometry, ct_headers: Sequence[pydicom.Dataset]
) -> list[Dataset]:
    """ContourSequence items of one structure's (z, y, x) mask, each referencing its CT slice."""
    box = bounding_box(mask)
    if box is None:
        return []
    zs, ys, xs = box
    offset = np.array([ys.start, xs.start], dtype=np.float64)
    items: list[Dataset] = []
    for k, rings in mask_rings(mask[box], MIN_AREA_PX2).items():
        for polygon in rings:
            points = geometry.to_patient(zs.start + k, polygon + offset)
            items.append(_contour_item(len(items) + 1, points, ct_headers[zs.start + k]))
    return items


def _copy_patient_study(ds: Dataset, ct: pydicom.Dataset) -> None:
    if "SpecificCharacterSet" in ct:
        ds.SpecificCharacterSet = ct.SpecificCharacterSet
    for keyword in PATIENT_STUDY_KEYWORDS:
        setattr(ds, keyword, ct.get(keyword, ""))


def _referenced_frame_of_reference(ct_headers: Sequence[pydicom.Dataset]) -> Dataset:
    images = []
    for header in ct_headers:
        image = Dataset()
        image.ReferencedSOPClassUID = header.SOPClassUID
        image.ReferencedSOPInstanceUID = header.SOPInstanceUID
        images.append(image)
    series = Dataset()
    series.SeriesInstanceUID = ct_headers[0].SeriesInstanceUID
    series.ContourImageSequence = DicomSequence(images)
    study = Dataset()
    study.ReferencedSOPClassUID = STUDY_REFERENCE_SOP_CLASS
    study.ReferencedSOPInstanceUID = ct_headers[0].StudyInstanceUID
    study.RTReferencedSeriesSequence = DicomSequence([series])
    frame = Dataset()
    frame.FrameOfReferenceUID = ct_headers[0].FrameOfReferenceUID
    frame.RTReferencedStudySequence = DicomSequence([study])
    return frame


def _roi_items(
    structure: StructureInfo, frame_uid: str, model: ModelInfo, contours: list[Dataset]
) -> tuple[Dataset, Dataset, Dataset]:
    roi = Dataset()
    roi.ROINumber = structure.label
    roi.ReferencedFrameOfReferenceUID = frame_uid
    roi.ROIName = structure.name
    roi.ROIGenerationAlgorithm = "AUTOMATIC"
    roi.ROIGenerationDescription = generation_description(model)
    roi.ROIDerivationAlgorithmIdentificationSequence = algorithm_identification(model)
    roi_contour = Dataset()
    roi_contour.ReferencedROINumber = structure.label
    roi_contour.ROIDisplayColor = list(structure.color)
    if contours:
        roi_contour.ContourSequence = DicomSequence(contours)
    observation = Dataset()
    observation.ObservationNumber = structure.label
    observation.ReferencedROINumber = structure.label
    observation.ROIObservationLabel = structure.name[:16]
    observation.RTROIInterpretedType = structure.interpreted_type
    observation.ROIInterpreter = ""
    return roi, roi_contour, observation


def generation_description(model: ModelInfo) -> str:
    """ROIGenerationDescription of every ROI: the model that drew it, as ``name@version``."""
    return f"AI model {model.spec}"[:64]


def software_versions(model: ModelInfo) -> list[str]:
    """SoftwareVersions values naming the model version and the gateway that made an output."""
    return [model.spec[:64], f"ie_gateway {ie_gateway.__version__}"]


def series_description(model: ModelInfo) -> str:
    """SeriesDescription of an output: says it is AI-made, by which model and version, and
    whether it failed its plausibility checks."""
    text = f"AI contours {model.name} v{model.version}"
    return (f"{NEEDS_REVIEW}: {text}" if model.needs_review else text)[:64]


def _header(ct: pydicom.Dataset, model: ModelInfo, uids: OutputUIDs, series_number: int) -> Dataset:
    now = dt.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RTStructureSetStorage
    meta.MediaStorageSOPInstanceUID = UID(uids.sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    _copy_patient_study(ds, ct)
    ds.SOPClassUID = RTStructureSetStorage
    ds.SOPInstanceUID = uids.sop_uid
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = uids.series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.SeriesDescription = series_description(model)
    ds.OperatorsName = ""
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = MANUFACTURER
    ds.SoftwareVersions = software_versions(model)
    ds.ContributingEquipmentSequence = DicomSequence([contributing_equipment(model)])
    ds.FrameOfReferenceUID = ct.FrameOfReferenceUID
    ds.PositionReferenceIndicator = ct.get("PositionReferenceIndicator", "")
    ds.InstanceNumber = 1
    ds.StructureSetLabel = NEEDS_REVIEW if model.needs_review else "AI contours"
    ds.StructureSetName = f"{model.name} v{model.version}"[:64]
    ds.StructureSetDate, ds.StructureSetTime = date, time
    ds.ApprovalStatus = ApprovalStatus.UNAPPROVED.value
    return ds


def build_rtstruct(
    ct_headers: Sequence[pydicom.Dataset],
    labels: np.ndarray,
    structures: Sequence[StructureInfo],
    model: ModelInfo,
    uids: OutputUIDs,
    *,
    series_number: int = DEFAULT_SERIES_NUMBER,
    masks: Masks | None = None,
    geometry: SliceGeometry | None = None,
) -> Dataset:
    """RT Structure Set of ``labels`` on the CT ``ct_headers`` (slice k ⇔ ``labels[k]``).

    ``masks``: the structures' masks where the caller made them already (structure_mask).
    ``geometry``: the checked volume's (``Volume.geometry``); built from ``ct_headers`` without it.

    Every structure gets an ROI (one with no voxels has no contours), marked UNAPPROVED and
    AUTOMATIC. The dataset carries its file meta; save it with ``ds.save_as(path,
    enforce_file_format=True)``. Raises :class:`WriteError` on inputs it cannot encode.
    """
    check_inputs(ct_headers, labels, structures)
    geometry = geometry if geometry is not None else SliceGeometry.from_headers(ct_headers)
    frame_uid = str(ct_headers[0].FrameOfReferenceUID)
    ds = _header(ct_headers[0], model, uids, series_number)
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([_referenced_frame_of_reference(ct_headers)])
    rois, roi_contours, observations = [], [], []
    traced = for_each_structure(
        lambda _, mask: structure_contours(mask, geometry, ct_headers), labels, structures, masks
    )
    for structure, contours in zip(structures, traced, strict=True):
        log.info("rtstruct.structure", label=structure.label, contours=len(contours))
        roi, roi_contour, observation = _roi_items(structure, frame_uid, model, contours)
        rois.append(roi)
        roi_contours.append(roi_contour)
        observations.append(observation)
    ds.StructureSetROISequence = DicomSequence(rois)
    ds.ROIContourSequence = DicomSequence(roi_contours)
    ds.RTROIObservationsSequence = DicomSequence(observations)
    return ds
