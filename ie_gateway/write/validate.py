"""Read a written RT-STRUCT or SEG back and check it against our own rules before it is sent.

The rules are the ones a TPS or PACS trips over, or that would put contours in the wrong
patient: DS values too long, degenerate contours, CT instances not referenced, names, colours,
UIDs or patient/study not the ones intended, and shapes that do not match the label map.
Every failure raises :class:`~ie_gateway.errors.WriteError` naming the rule and the place.
"""

from __future__ import annotations

from collections.abc import Sequence
from os import PathLike

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset

from ie_gateway.errors import WriteError
from ie_gateway.imaging import (
    CONTOUR_DATA,
    Masks,
    RoiContours,
    SliceGeometry,
    StructureInfo,
    bounding_box,
    crossings,
    elem_keyword,
    encoded_ds,
    for_each_structure,
    parse_ds,
    rasterize_roi,
    structure_masks,
)
from ie_gateway.store.records import LABEL_MAP_SEGMENTATION_STORAGE, OutputUIDs
from ie_gateway.write.common import PATIENT_STUDY_KEYWORDS
from ie_gateway.write.seg import seg_mask, segment_color, segment_numbers

#: Smallest Dice between a structure read back and the mask it was written from.
MIN_DICE = 0.98


def _read(source: str | PathLike[str] | Dataset) -> Dataset:
    if isinstance(source, Dataset):
        return source
    try:
        return pydicom.dcmread(source)
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        raise WriteError(f"output {source} cannot be read back: {exc}") from exc


def _contour_toggles(contours: RoiContours, geometry: SliceGeometry, shape: tuple[int, int, int]) -> np.ndarray:
    """Sorted toggle keys of an ROI's contours on the (z, y, x) grid: one per crossing of a
    contour edge with a pixel-centre row, at ``(slice * rows + row) * (cols + 1) + first
    pixel right of it``, the pixels :func:`rasterize_roi` fills are those after an odd number
    of toggles in their row."""
    slices, points, sizes = contours.on_slices(geometry)
    ends = np.cumsum(sizes)
    after = np.arange(len(points)) + 1
    after[ends - 1] = ends - sizes  # a contour's last point closes on its first
    r, c = points[:, 0], points[:, 1]
    edge, row, start = crossings(r, c, r[after], c[after], shape[1:])
    keys: np.ndarray = (np.repeat(slices, sizes)[edge] * shape[1] + row) * (shape[2] + 1) + start
    keys.sort()
    return keys


def _mask_toggles(mask: np.ndarray) -> np.ndarray:
    """Sorted toggle keys of a (z, y, x) mask, as :func:`_contour_toggles` places them: one
    where each run of voxels in a row starts and one just after it ends."""
    box = bounding_box(mask)
    if box is None:
        return np.zeros(0, dtype=np.int64)
    zs, ys, xs = box
    padded = np.pad(mask[box], ((0, 0), (0, 0), (1, 1)))
    flat = padded.ravel()
    at = np.flatnonzero(flat[1:] != flat[:-1]) + 1  # first voxel of a run, or just after one
    line, col = np.divmod(at, padded.shape[2])
    z, row = np.divmod(line, padded.shape[1])
    keys: np.ndarray = ((zs.start + z) * mask.shape[1] + ys.start + row) * (mask.shape[2] + 1) + xs.start + col - 1
    return keys


def _toggled(keys: np.ndarray) -> int:
    """Pixels after an odd number of sorted toggle keys in their row (every row toggles an even
    number of times): the lengths of the runs between the 1st and 2nd, the 3rd and 4th, ..."""
    return int(keys[1::2].sum() - keys[::2].sum())


def _roi_overlap(contours: RoiContours, geometry: SliceGeometry, expected: np.ndarray) -> tuple[int, int, int]:
    """(voxels of the rasterised ROI, voxels of ``expected``, voxels in both), from toggles
    alone: the XOR of two masks toggles where either does, so |A ^ B| is the toggled count of
    both key lists merged and |A & B| = (|A| + |B| - |A ^ B|) / 2. No voxel volume is filled;
    the work is the mask's one comparison pass and a sort of the crossings."""
    drawn, truth = _contour_toggles(contours, geometry, expected.shape), _mask_toggles(expected)
    a, b = _toggled(drawn), _toggled(truth)
    either = _toggled(np.sort(np.concatenate([drawn, truth]), kind="stable"))  # merges two runs
    return a, b, (a + b - either) // 2


def _roi_dice(contours: RoiContours, geometry: SliceGeometry, expected: np.ndarray) -> float:
    """Dice of an ROI's contours, rasterised as :func:`rasterize_roi` does, with ``expected``."""
    drawn, truth, both = _roi_overlap(contours, geometry, expected)
    total = drawn + truth
    return 1.0 if total == 0 else 2.0 * both / total


def rasterize_rtstruct(ds: Dataset, ct_headers: Sequence[pydicom.Dataset]) -> np.ndarray:
    """Label map (z, y, x) uint8 of an RT-STRUCT on the CT grid; ROI Number is the label.

    Larger ROIs are painted first, so a structure that encloses others (an EXTERNAL) never
    hides them: for our own RT-STRUCTs this gives back the label map they were made from.
    """
    geometry = SliceGeometry.from_headers(ct_headers)
    shape = geometry.shape
    masks = [
        (int(roi.ReferencedROINumber), rasterize_roi(roi, geometry, shape)) for roi in ds.get("ROIContourSequence", [])
    ]
    out = np.zeros(shape, dtype=np.uint8)
    for number, mask in sorted(masks, key=lambda item: -int(item[1].sum())):
        out[mask] = number
    return out


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean masks; 1.0 when both are empty."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def _check_same_patient_study(ds: Dataset, ct: pydicom.Dataset) -> None:
    for keyword in PATIENT_STUDY_KEYWORDS:
        if str(ds.get(keyword, "")) != str(ct.get(keyword, "")):
            raise WriteError(f"{keyword} of the output is not the CT's")


def _check_uids(ds: Dataset, uids: OutputUIDs) -> None:
    if ds.SeriesInstanceUID != uids.series_uid or ds.SOPInstanceUID != uids.sop_uid:
        raise WriteError("output Series/SOP Instance UID is not the one stored for this result")


def ds_values(dataset: Dataset, tag: int) -> tuple[np.ndarray, str]:
    """The numbers of a DS element and its longest text (as written, for the 16-character rule)."""
    elem = dataset.get_item(tag)
    return (np.zeros(0), "") if elem is None else parse_ds(encoded_ds(elem), tag)


def _check_ds_lengths(ds: Dataset, parsed_apart: frozenset[int] = frozenset()) -> None:
    """Every DS text fits 16 characters; those of ``parsed_apart`` tags are checked where they
    are parsed (ContourData, once per ROI, by :func:`_read_contours`)."""
    for tag in ds.keys():  # noqa: SIM118 - iterating a Dataset itself decodes every element
        elem = ds.get_item(tag)
        if elem is None or tag in parsed_apart:
            continue
        if elem.VR == "DS":
            _, longest = ds_values(ds, tag)
            if len(longest) > 16:
                raise WriteError(f"DS value {longest!r} of {elem_keyword(tag)} exceeds 16 characters")
        elif elem.VR == "SQ":
            for item in ds[tag].value:
                _check_ds_lengths(item, parsed_apart)


def _read_contours(ds: Dataset) -> list[tuple[Dataset, RoiContours]]:
    """Each ROIContourSequence item with its ContourData parsed, their DS texts checked."""
    parsed = []
    for roi in ds.get("ROIContourSequence", []):
        contours = RoiContours.read(roi)
        if len(contours.longest) > 16:
            raise WriteError(f"DS value {contours.longest!r} of {elem_keyword(CONTOUR_DATA)} exceeds 16 characters")
        parsed.append((roi, contours))
    return parsed


def _check_all_ct_referenced(referenced: set[str], ct_headers: Sequence[pydicom.Dataset]) -> None:
    missing = [h for h in ct_headers if h.SOPInstanceUID not in referenced]
    if missing:
        raise WriteError(f"{len(missing)} of {len(ct_headers)} CT instances are not referenced")


def _rtstruct_references(ds: Dataset) -> set[str]:
    return {
        image.ReferencedSOPInstanceUID
        for frame in ds.get("ReferencedFrameOfReferenceSequence", [])
        for study in frame.get("RTReferencedStudySequence", [])
        for series in study.get("RTReferencedSeriesSequence", [])
        for image in series.get("ContourImageSequence", [])
    }


def _check_contours(parsed: Sequence[tuple[Dataset, RoiContours]], ct_uids: set[str]) -> None:
    def where(roi: Dataset, contour: Dataset) -> str:
        return f"ROI {roi.ReferencedROINumber} contour {contour.get('ContourNumber', '?')}"

    for roi, contours in parsed:
        for contour, values in zip(roi.get("ContourSequence", []), contours.counts.tolist(), strict=True):
            n = int(contour.NumberOfContourPoints)
            if n < 3 or values != 3 * n:
                raise WriteError(f"{where(roi, contour)}: {n} points; a closed contour needs >= 3 (x, y, z)")
            images = contour.get("ContourImageSequence", [])
            if len(images) != 1 or images[0].ReferencedSOPInstanceUID not in ct_uids:
                raise WriteError(f"{where(roi, contour)} does not reference one of the CT's instances")


def _check_rois(ds: Dataset, structures: Sequence[StructureInfo]) -> None:
    names = {int(r.ROINumber): str(r.ROIName) for r in ds.get("StructureSetROISequence", [])}
    colors = {
        int(r.ReferencedROINumber): tuple(int(v) for v in r.get("ROIDisplayColor", []))
        for r in ds.get("ROIContourSequence", [])
    }
    for s in structures:
        if names.get(s.label) != s.name:
            raise WriteError(f"ROI {s.label} is named {names.get(s.label)!r}, not {s.name!r}")
        if colors.get(s.label) != tuple(s.color):
            raise WriteError(f"ROI {s.label} ({s.name}) colour is not {tuple(s.color)}")
    if len(names) != len(structures):
        raise WriteError(f"{len(names)} ROIs written for {len(structures)} structures")


def _check_score(score: float, structure: StructureInfo, kind: str) -> None:
    if score < MIN_DICE:
        raise WriteError(f"{kind} {structure.name}: Dice {score:.3f} with the label map < {MIN_DICE}")


def validate_rtstruct(
    source: str | PathLike[str] | Dataset,
    ct_headers: Sequence[pydicom.Dataset],
    labels: np.ndarray,
    structures: Sequence[StructureInfo],
    uids: OutputUIDs,
    masks: Masks | None = None,
    geometry: SliceGeometry | None = None,
) -> None:
    """Check an RT-STRUCT (a file or dataset) against the inputs it was built from.

    ``masks``: the structures' masks where the caller made them already (structure_mask);
    ``geometry``: the checked volume's, as the writer was given it (else from ``ct_headers``).
    """
    ds = _read(source)
    if ds.get("SOPClassUID") != pydicom.uid.RTStructureSetStorage:
        raise WriteError("output is not an RT Structure Set")
    _check_uids(ds, uids)
    _check_same_patient_study(ds, ct_headers[0])
    _check_ds_lengths(ds, parsed_apart=frozenset({CONTOUR_DATA}))
    parsed = _read_contours(ds)
    _check_all_ct_referenced(_rtstruct_references(ds), ct_headers)
    _check_contours(parsed, {h.SOPInstanceUID for h in ct_headers})
    _check_rois(ds, structures)
    geometry = geometry if geometry is not None else SliceGeometry.from_headers(ct_headers)
    rois = {int(roi.ReferencedROINumber): contours for roi, contours in parsed}
    scores = for_each_structure(
        lambda s, expected: _roi_dice(rois[s.label], geometry, expected), labels, structures, masks
    )
    for s, score in zip(structures, scores, strict=True):
        _check_score(score, s, "RT-STRUCT")


def _seg_references(seg: hd.seg.Segmentation) -> set[str]:
    return {
        image.ReferencedSOPInstanceUID
        for series in seg.get("ReferencedSeriesSequence", [])
        for image in series.get("ReferencedInstanceSequence", [])
    }


def _check_segments(seg: hd.seg.Segmentation, structures: Sequence[StructureInfo]) -> None:
    # segment_numbers, not number_of_segments: highdicom 0.28 counts a LABELMAP's one short
    if len(seg.segment_numbers) != len(structures):
        raise WriteError(f"{len(seg.segment_numbers)} segments written for {len(structures)}")
    for number, s in enumerate(structures, start=1):
        description = seg.get_segment_description(number)
        if description.segment_label != s.name:
            raise WriteError(f"segment {number} is {description.segment_label!r}, not {s.name!r}")
        expected = segment_color(s.color).value
        if tuple(description.get("RecommendedDisplayCIELabValue", ())) != expected:
            raise WriteError(f"segment {number} ({s.name}) colour is not {tuple(s.color)}")


def validate_seg(
    source: str | PathLike[str] | Dataset,
    ct_headers: Sequence[pydicom.Dataset],
    labels: np.ndarray,
    structures: Sequence[StructureInfo],
    uids: OutputUIDs,
    masks: Masks | None = None,
) -> None:
    """Check a DICOM SEG (a file or dataset), BINARY or LABELMAP, against the inputs it was
    built from.

    Segment n is ``structures[n-1]``, as :func:`~ie_gateway.write.seg.build_seg` numbers them;
    in a LABELMAP, where the later structure won the voxels their masks share.
    """
    ds = _read(source)
    if ds.get("SOPClassUID") not in (pydicom.uid.SegmentationStorage, LABEL_MAP_SEGMENTATION_STORAGE):
        raise WriteError("output is not a Segmentation")
    seg = hd.seg.Segmentation.from_dataset(ds, copy=False)
    _check_uids(seg, uids)
    _check_same_patient_study(seg, ct_headers[0])
    _check_ds_lengths(seg)
    _check_all_ct_referenced(_seg_references(seg), ct_headers)
    _check_segments(seg, structures)
    if ds.SOPClassUID == LABEL_MAP_SEGMENTATION_STORAGE:
        numbers = segment_numbers(labels, structures, masks)
        for number, s in enumerate(structures, start=1):
            _check_score(dice(seg_mask(seg, ct_headers, number), numbers == number), s, "SEG")
        return
    for number, (s, expected) in enumerate(structure_masks(labels, structures, masks), start=1):
        _check_score(dice(seg_mask(seg, ct_headers, number), expected), s, "SEG")
