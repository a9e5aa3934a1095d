"""Label map → DICOM Segmentation, BINARY or LABELMAP, written by highdicom.

Segment n is ``structures[n-1]``, with the same per-structure masks as the RT-STRUCT (holes
filled per slice where the structure asks for it, so an EXTERNAL encloses the organs and
segments may overlap). highdicom reads only header attributes of the source images, so headers
read with ``stop_before_pixels=True`` are enough: the CT's pixel data are not loaded again.

A BINARY SEG (Segmentation Storage) stores one bit per voxel per segment, so overlapping
segments are kept as they are. A LABELMAP SEG (Label Map Segmentation Storage, Supplement 243)
stores one segment number per voxel, RLE Lossless compressed: a fraction of the size, but a
voxel belongs to one segment only, so where masks overlap the later structure wins (the
External keeps the body around the organs, the organs keep themselves). Every SEG names the
model in its algorithm identification and its contributing equipment.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence

import highdicom as hd
import numpy as np
import pydicom
import structlog
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from ie_gateway.errors import WriteError
from ie_gateway.imaging import Masks, StructureInfo, structure_masks
from ie_gateway.store.records import OutputUIDs
from ie_gateway.vocab import InterpretedType, SegEncoding
from ie_gateway.write.common import (
    MANUFACTURER,
    ModelInfo,
    algorithm_identification,
    check_inputs,
    contributing_equipment,
    with_patient_study,
)
from ie_gateway.write.rtstruct import series_description, software_versions

log = structlog.get_logger(__name__)

DEFAULT_SERIES_NUMBER = 902
#: How each encoding is written: RLE keeps a label map a few percent of its raw size and is
#: decoded by every DICOM toolkit; a binary SEG stays uncompressed, as before.
_TRANSFER_SYNTAX = {SegEncoding.BINARY: ExplicitVRLittleEndian, SegEncoding.LABELMAP: RLELossless}

#: SNOMED CT codes of TG-263 base names (laterality suffix removed) that we know for certain;
#: anything else is described as a generic organ.
_PROPERTY_TYPES: dict[str, Code] = {
    "Lung": codes.SCT.Lung,
    "Heart": codes.SCT.Heart,
    "SpinalCord": codes.SCT.SpinalCord,
    "Esophagus": codes.SCT.Esophagus,
    "Liver": codes.SCT.Liver,
    "Bladder": codes.SCT.Bladder,
    "Rectum": codes.SCT.Rectum,
    "Prostate": codes.SCT.Prostate,
    "Trachea": codes.SCT.Trachea,
}
_LATERALITY: dict[str, Code] = {"_L": codes.SCT.Left, "_R": codes.SCT.Right}


def segment_color(rgb: tuple[int, int, int]) -> hd.color.CIELabColor:
    """The SEG display colour (CIELab, as DICOM stores it) of an RGB structure colour."""
    return hd.color.CIELabColor.from_rgb(*rgb)


def property_type(structure: StructureInfo) -> tuple[Code, Code | None]:
    """Segmented property type of a structure and its laterality modifier, if any."""
    if structure.interpreted_type == InterpretedType.EXTERNAL:
        return codes.SCT.EntireBody, None
    base, suffix = structure.name[:-2], structure.name[-2:]
    if suffix in _LATERALITY and base in _PROPERTY_TYPES:
        return _PROPERTY_TYPES[base], _LATERALITY[suffix]
    return _PROPERTY_TYPES.get(structure.name, codes.SCT.Organ), None


def segment_description(
    number: int, structure: StructureInfo, algorithm: hd.AlgorithmIdentificationSequence
) -> hd.seg.SegmentDescription:
    """Description of one segment: label, colour, anatomy codes and the model that made it."""
    property_code, laterality = property_type(structure)
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=structure.name,
        segmented_property_category=codes.SCT.AnatomicalStructure,
        segmented_property_type=property_code,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        display_color=segment_color(structure.color),
    )
    if laterality is not None:
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            hd.sr.CodedConcept.from_code(laterality)
        ]
    return description


def build_seg(
    ct_headers: Sequence[pydicom.Dataset],
    labels: np.ndarray,
    structures: Sequence[StructureInfo],
    model: ModelInfo,
    uids: OutputUIDs,
    *,
    series_number: int = DEFAULT_SERIES_NUMBER,
    masks: Masks | None = None,
    encoding: SegEncoding | str = SegEncoding.BINARY,
) -> hd.seg.Segmentation:
    """Segmentation of ``labels`` over the CT ``ct_headers`` (slice k ⇔ ``labels[k]``).

    ``encoding``: BINARY (overlapping masks kept) or LABELMAP (one segment per voxel, the later
    structure where masks overlap; see the module's docstring). Empty frames are omitted. Save
    with ``seg.save_as(path)``. Raises :class:`WriteError` when the inputs cannot be encoded
    (e.g. a CT header lacks what highdicom needs).
    """
    encoding = SegEncoding(encoding)
    check_inputs(ct_headers, labels, structures)
    algorithm = algorithm_identification(model)
    descriptions = [segment_description(n, s, algorithm) for n, s in enumerate(structures, start=1)]
    pixels = (
        segment_numbers(labels, structures, masks)
        if encoding is SegEncoding.LABELMAP
        # segment-major in memory, so each segment highdicom encodes is one contiguous block
        else np.moveaxis(np.stack([m for _, m in structure_masks(labels, structures, masks)]), 0, -1)
    )
    try:
        seg = hd.seg.Segmentation(
            source_images=[with_patient_study(ct_headers[0]), *ct_headers[1:]],
            pixel_array=pixels,
            segmentation_type=hd.seg.SegmentationTypeValues(encoding.upper()),
            segment_descriptions=descriptions,
            series_instance_uid=uids.series_uid,
            series_number=series_number,
            sop_instance_uid=uids.sop_uid,
            instance_number=1,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=MANUFACTURER,
            software_versions=software_versions(model)[0],
            device_serial_number=socket.gethostname()[:64],
            series_description=series_description(model),
            content_label="AI_CONTOURS",
            content_description=f"AI model {model.spec}"[:64],
            omit_empty_frames=True,
            transfer_syntax_uid=_TRANSFER_SYNTAX[encoding],
            contributing_equipment=[contributing_equipment(model)],
        )
    except (AttributeError, ValueError) as exc:
        raise WriteError(f"cannot build SEG from this CT: {exc}") from exc
    # both values (model, gateway): highdicom's signature takes one string or a 1-tuple
    seg["SoftwareVersions"].value = software_versions(model)
    log.info("seg.built", encoding=encoding, segments=len(structures), frames=int(seg.NumberOfFrames))
    return seg


def segment_numbers(labels: np.ndarray, structures: Sequence[StructureInfo], masks: Masks | None) -> np.ndarray:
    """The (z, y, x) label map of a LABELMAP SEG: segment n where ``structures[n-1]``'s mask is,
    painted in order so the later structure wins where masks overlap."""
    if len(structures) > 255:
        raise WriteError(f"{len(structures)} structures do not fit an 8-bit label map")
    numbers = np.zeros(labels.shape, dtype=np.uint8)
    for number, (_, mask) in enumerate(structure_masks(labels, structures, masks), start=1):
        numbers[mask] = number
    return numbers


def seg_mask(seg: hd.seg.Segmentation, ct_headers: Sequence[pydicom.Dataset], segment_number: int) -> np.ndarray:
    """Mask (z, y, x) of one segment of a SEG read back, on the CT grid of ``ct_headers``.

    Slices whose frame was omitted as empty come back empty.
    """
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[h.SOPInstanceUID for h in ct_headers],
        segment_numbers=[segment_number],
        assert_missing_frames_are_empty=True,
        dtype=bool,
    )
    return pixels[..., 0]
