"""Read-back validation: our own outputs pass, tampered ones are refused with the reason."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import config
from pydicom.dataelem import DataElement
from skimage import draw

from ie_gateway.errors import WriteError
from ie_gateway.imaging import RoiContours, SliceGeometry, fill_even_odd
from ie_gateway.write import (
    OutputUIDs,
    build_rtstruct,
    build_seg,
    new_output_uids,
    validate_rtstruct,
    validate_seg,
)
from ie_gateway.write.validate import _roi_dice, _roi_overlap, dice
from tests.write_case import DEMO_STRUCTURES, MODEL, Case, make_case

CONTOUR_DATA = 0x30060050


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    return make_case(tmp_path_factory.mktemp("ct"), seed=8)


@pytest.fixture(scope="module")
def rt_uids() -> OutputUIDs:
    return new_output_uids()


@pytest.fixture(scope="module")
def seg_uids() -> OutputUIDs:
    return new_output_uids()


@pytest.fixture(scope="module")
def rtstruct_file(
    case: Case, rt_uids: OutputUIDs, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    path = tmp_path_factory.mktemp("rtstruct") / "rtstruct.dcm"
    ds = build_rtstruct(case.headers, case.labels, DEMO_STRUCTURES, MODEL, rt_uids)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def seg_file(case: Case, seg_uids: OutputUIDs, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("seg") / "seg.dcm"
    build_seg(case.headers, case.labels, DEMO_STRUCTURES, MODEL, seg_uids).save_as(path)
    return path


def _saved(ds: pydicom.Dataset, tmp_path: Path) -> Path:
    path = tmp_path / "out.dcm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the values we plant on purpose
        ds.save_as(path, enforce_file_format=True)
    return path


def _first_contour(ds: pydicom.Dataset) -> pydicom.Dataset:
    return ds.ROIContourSequence[1].ContourSequence[0]


def test_fill_even_odd_matches_skimage_polygon_xor() -> None:
    rng = np.random.default_rng(1)
    for _ in range(200):
        rings = [rng.uniform(-5, 45, size=(int(rng.integers(3, 25)), 2)) for _ in range(3)]
        expected = np.zeros((40, 37), dtype=bool)
        for ring in rings:
            one = np.zeros_like(expected)
            rr, cc = draw.polygon(ring[:, 0], ring[:, 1], shape=expected.shape)
            one[rr, cc] = True
            expected ^= one
        assert np.array_equal(fill_even_odd(rings, expected.shape), expected)


#: A CT grid where patient (x, y, z) mm is (column, row, 2 x slice).
GRID = SliceGeometry(
    positions=np.array([[0.0, 0.0, 2.0 * k] for k in range(3)]),
    row_dir=np.array([1.0, 0.0, 0.0]),
    col_dir=np.array([0.0, 1.0, 0.0]),
    row_spacing=1.0,
    col_spacing=1.0,
    rows=40,
    columns=37,
)


def _roi(rings: list[tuple[int, np.ndarray]]) -> pydicom.Dataset:
    """An ROIContourSequence item with one contour per (slice, (n, 2) row/col ring) on GRID."""
    contours = []
    for k, ring in rings:
        contour = pydicom.Dataset()
        points = np.column_stack([ring[:, 1], ring[:, 0], np.full(len(ring), 2.0 * k)])
        contour.ContourData = [f"{v:.6f}" for v in points.ravel()]
        contours.append(contour)
    roi = pydicom.Dataset()
    roi.ContourSequence = contours
    return roi


def _drawn(rings: list[tuple[int, np.ndarray]], shape: tuple[int, int, int]) -> np.ndarray:
    """The reference: each ring drawn by skimage and XOR-ed into its slice."""
    out = np.zeros(shape, dtype=bool)
    for k, ring in rings:
        one = np.zeros(shape[1:], dtype=bool)
        rr, cc = draw.polygon(ring[:, 0], ring[:, 1], shape=shape[1:])
        one[rr, cc] = True
        out[k] ^= one
    return out


def _square(top: float, left: float, side: float) -> np.ndarray:
    """Put it off the pixel centres: skimage counts a pixel on the boundary in, the fill out."""
    bottom, right = top + side, left + side
    return np.array([[top, left], [top, right], [bottom, right], [bottom, left]])


def test_roi_dice_is_the_dice_of_the_rasterised_roi() -> None:
    shape = (3, 40, 37)
    rng = np.random.default_rng(4)
    shapes = [
        # an outline with a hole and an island in it
        [(0, _square(4.5, 5.5, 30)), (0, _square(11.5, 12.5, 10)), (0, _square(14.5, 15.5, 3))],
        # two outlines on one slice, one partly off the grid on another
        [(1, _square(2.5, 3.5, 8)), (1, _square(19.7, 20.2, 12)), (2, _square(-6.5, 30.5, 20))],
        [(k, rng.uniform(-5, 45, size=(int(rng.integers(3, 25)), 2))) for k in (0, 0, 1, 2, 2)],
        [],
    ]
    for rings in shapes:
        drawn = _drawn(rings, shape)
        contours = RoiContours.read(_roi(rings))
        for expected in (
            drawn,
            np.roll(drawn, 2, axis=2),
            rng.random(shape) < 0.3,
            np.zeros(shape, dtype=bool),
            np.ones(shape, dtype=bool),
        ):
            overlap = (int(drawn.sum()), int(expected.sum()), int((drawn & expected).sum()))
            assert _roi_overlap(contours, GRID, expected) == overlap
            assert _roi_dice(contours, GRID, expected) == dice(drawn, expected)


def test_our_rtstruct_file_passes(rtstruct_file: Path, case: Case, rt_uids: OutputUIDs) -> None:
    validate_rtstruct(rtstruct_file, case.headers, case.labels, DEMO_STRUCTURES, rt_uids)


def test_our_rtstruct_dataset_passes_before_it_is_saved(case: Case, rt_uids: OutputUIDs) -> None:
    ds = build_rtstruct(case.headers, case.labels, DEMO_STRUCTURES, MODEL, rt_uids)
    validate_rtstruct(ds, case.headers, case.labels, DEMO_STRUCTURES, rt_uids)


def test_our_seg_file_passes(seg_file: Path, case: Case, seg_uids: OutputUIDs) -> None:
    validate_seg(seg_file, case.headers, case.labels, DEMO_STRUCTURES, seg_uids)


def _set_contour_data(ds: pydicom.Dataset, texts: list[str]) -> None:
    contour = _first_contour(ds)
    contour[CONTOUR_DATA] = DataElement(CONTOUR_DATA, "DS", texts, validation_mode=config.IGNORE)
    contour.NumberOfContourPoints = len(texts) // 3


def _ds_of_17_characters(ds: pydicom.Dataset) -> None:
    texts = [str(v) for v in _first_contour(ds).ContourData]
    texts[0] = f"{float(texts[0]):.15f}"[:17]
    _set_contour_data(ds, texts)


def _two_point_contour(ds: pydicom.Dataset) -> None:
    _set_contour_data(ds, [str(v) for v in _first_contour(ds).ContourData[:6]])


def _missing_ct_reference(ds: pydicom.Dataset) -> None:
    series = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]
    del series.RTReferencedSeriesSequence[0].ContourImageSequence[5]


def _contour_on_a_foreign_image(ds: pydicom.Dataset) -> None:
    _first_contour(ds).ContourImageSequence[0].ReferencedSOPInstanceUID = "1.2.3.4"


def _renamed_roi(ds: pydicom.Dataset) -> None:
    ds.StructureSetROISequence[3].ROIName = "Liver"


def _recoloured_roi(ds: pydicom.Dataset) -> None:
    ds.ROIContourSequence[2].ROIDisplayColor = [1, 2, 3]


def _other_patient(ds: pydicom.Dataset) -> None:
    ds.PatientID = "SOMEONE-ELSE"


def _other_sop_uid(ds: pydicom.Dataset) -> None:
    ds.SOPInstanceUID = pydicom.uid.generate_uid()


def _shifted_contours(ds: pydicom.Dataset) -> None:
    for contour in ds.ROIContourSequence[3].ContourSequence:  # Heart: 8 mm to the side
        points = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3) + [8.0, 0.0, 0.0]
        contour.ContourData = [f"{v:.3f}" for v in points.ravel()]


def _not_a_number(ds: pydicom.Dataset) -> None:
    _set_contour_data(ds, ["nan", *(str(v) for v in _first_contour(ds).ContourData[1:])])


def _dropped_contours(ds: pydicom.Dataset) -> None:
    del ds.ROIContourSequence[4].ContourSequence[::2]  # half the spinal cord's slices


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (_ds_of_17_characters, "exceeds 16 characters"),
        (_two_point_contour, "needs >= 3"),
        (_not_a_number, "not a decimal string"),
        (_missing_ct_reference, "not referenced"),
        (_contour_on_a_foreign_image, "does not reference"),
        (_renamed_roi, "is named 'Liver'"),
        (_recoloured_roi, "colour"),
        (_other_patient, "PatientID"),
        (_other_sop_uid, "UID"),
        (_shifted_contours, "Heart: Dice"),
        (_dropped_contours, "SpinalCord: Dice"),
    ],
)
def test_a_tampered_rtstruct_is_refused_with_the_reason(
    tamper: Callable[[pydicom.Dataset], None],
    reason: str,
    rtstruct_file: Path,
    case: Case,
    rt_uids: OutputUIDs,
    tmp_path: Path,
) -> None:
    ds = pydicom.dcmread(rtstruct_file)
    tamper(ds)
    with pytest.raises(WriteError, match=reason):
        validate_rtstruct(_saved(ds, tmp_path), case.headers, case.labels, DEMO_STRUCTURES, rt_uids)


def _seg_relabelled(ds: pydicom.Dataset) -> None:
    ds.SegmentSequence[1].SegmentLabel = "Lung_X"


def _seg_missing_reference(ds: pydicom.Dataset) -> None:
    del ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]


def _seg_other_study(ds: pydicom.Dataset) -> None:
    ds.StudyDate = "19990101"


def _seg_other_series_uid(ds: pydicom.Dataset) -> None:
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (_seg_relabelled, "'Lung_X'"),
        (_seg_missing_reference, "not referenced"),
        (_seg_other_study, "StudyDate"),
        (_seg_other_series_uid, "UID"),
    ],
)
def test_a_tampered_seg_is_refused_with_the_reason(
    tamper: Callable[[pydicom.Dataset], None],
    reason: str,
    seg_file: Path,
    case: Case,
    seg_uids: OutputUIDs,
    tmp_path: Path,
) -> None:
    ds = pydicom.dcmread(seg_file)
    tamper(ds)
    with pytest.raises(WriteError, match=reason):
        validate_seg(_saved(ds, tmp_path), case.headers, case.labels, DEMO_STRUCTURES, seg_uids)


def test_a_seg_whose_masks_differ_is_refused(
    case: Case, seg_uids: OutputUIDs, tmp_path: Path
) -> None:
    labels = case.labels.copy()
    labels[labels == 4] = 1  # the SEG lacks the heart the model found
    path = tmp_path / "seg.dcm"
    build_seg(case.headers, labels, DEMO_STRUCTURES, MODEL, seg_uids).save_as(path)
    with pytest.raises(WriteError, match="Heart: Dice"):
        validate_seg(path, case.headers, case.labels, DEMO_STRUCTURES, seg_uids)


def test_an_unreadable_file_is_refused(case: Case, rt_uids: OutputUIDs, tmp_path: Path) -> None:
    path = tmp_path / "broken.dcm"
    path.write_bytes(b"not dicom")
    with pytest.raises(WriteError, match="cannot be read back"):
        validate_rtstruct(path, case.headers, case.labels, DEMO_STRUCTURES, rt_uids)
