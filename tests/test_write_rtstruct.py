"""RT-STRUCT writer: contours that rasterise back to the label map, complete references and
headers, DS values that fit, and a file dciodvfy accepts."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from skimage import measure

from ie_gateway.errors import WriteError
from ie_gateway.write import (
    OutputUIDs,
    StructureInfo,
    build_rtstruct,
    new_output_uids,
    rasterize_rtstruct,
    structure_mask,
)
from ie_gateway.write.common import contour_data_bytes, ds_strings
from ie_gateway.write.contours import mask_rings
from ie_gateway.write.validate import dice
from tests.write_case import DEMO_STRUCTURES, MODEL, Case, make_case

RING = StructureInfo(
    label=1, name="Ring", color=(200, 0, 200), interpreted_type="ORGAN", fill_holes=False
)


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    return make_case(tmp_path_factory.mktemp("ct"))


@pytest.fixture(scope="module")
def uids() -> OutputUIDs:
    return new_output_uids()


@pytest.fixture(scope="module")
def written(case: Case, uids: OutputUIDs, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("out") / "rtstruct.dcm"
    build_rtstruct(case.headers, case.labels, DEMO_STRUCTURES, MODEL, uids).save_as(
        path, enforce_file_format=True
    )
    return path


@pytest.fixture(scope="module")
def ds(written: Path) -> pydicom.Dataset:
    return pydicom.dcmread(written)


def _contours(ds: pydicom.Dataset) -> list[pydicom.Dataset]:
    return [c for roi in ds.ROIContourSequence for c in roi.get("ContourSequence", [])]


def test_round_trip_dice_per_structure_at_least_098(ds: pydicom.Dataset, case: Case) -> None:
    back = rasterize_rtstruct(ds, case.headers)
    for structure in DEMO_STRUCTURES:
        assert dice(back == structure.label, case.labels == structure.label) >= 0.98, structure.name


def test_external_encloses_the_organs(ds: pydicom.Dataset, case: Case) -> None:
    external = next(roi for roi in ds.ROIContourSequence if roi.ReferencedROINumber == 1)
    only_external = pydicom.Dataset()
    only_external.ROIContourSequence = [external]
    body = rasterize_rtstruct(only_external, case.headers) == 1
    assert body[case.labels == 4].all()  # the heart lies inside the body outline
    assert dice(body, structure_mask(case.labels, DEMO_STRUCTURES[0])) >= 0.98


def test_every_ds_value_fits_16_characters(written: Path) -> None:
    ds = pydicom.dcmread(written)
    lengths: list[int] = []

    def visit(_: pydicom.Dataset, elem: pydicom.DataElement) -> None:
        if elem.VR == "DS":
            values = elem.value if elem.VM > 1 else [elem.value]
            lengths.extend(len(v.original_string) for v in values)

    ds.walk(visit)
    assert len(lengths) > 1000
    assert max(lengths) <= 16


def test_ds_strings_keeps_huge_and_long_values_within_16_characters() -> None:
    values = np.array([1.0e13 + 0.5, -123.456789123, -98765.43210987, 0.0])
    texts = ds_strings(values)
    assert all(len(t) <= 16 for t in texts)
    assert np.allclose([float(t) for t in texts], values, rtol=1e-9, atol=1e-3)


def test_an_axial_contour_is_written_to_the_micrometre_with_its_slice_z_to_six_decimals() -> None:
    points = np.array([[-249.51171875, 10.0, -123.4567891], [0.00049, -0.25, -123.4567891], [1.5, 2.0, -123.4567891]])
    data = contour_data_bytes(points)
    assert len(data) % 2 == 0
    texts = data.rstrip(b" ").decode().split("\\")
    assert texts[:3] == ["-249.512", "10.000", "-123.456789"]
    assert texts[3:5] == ["0.000", "-0.250"]
    assert np.allclose(np.array(texts, dtype=float).reshape(-1, 3), points, rtol=0, atol=5e-4)
    assert contour_data_bytes(np.c_[points[:, :2], [-120.5] * 3]).rstrip(b" ").endswith(b"\\-120.5")  # zeros dropped


def test_a_contour_off_the_axial_plane_keeps_six_decimals_throughout() -> None:
    points = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.1234567], [4.0, 5.0, 6.0]])
    texts = contour_data_bytes(points).rstrip(b" ").decode().split("\\")
    assert texts == [f"{v:.6f}" for v in points.ravel()]


def test_every_contour_is_closed_planar_with_at_least_3_points(ds: pydicom.Dataset) -> None:
    contours = _contours(ds)
    assert contours
    for contour in contours:
        assert contour.ContourGeometricType == "CLOSED_PLANAR"
        assert contour.NumberOfContourPoints >= 3
        assert len(contour.ContourData) == 3 * contour.NumberOfContourPoints
        points = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
        assert np.ptp(points[:, 2]) == 0  # one axial plane


def test_every_contour_references_the_ct_slice_it_lies_on(ds: pydicom.Dataset, case: Case) -> None:
    z_of = {h.SOPInstanceUID: float(h.ImagePositionPatient[2]) for h in case.headers}
    for contour in _contours(ds):
        (image,) = contour.ContourImageSequence
        assert image.ReferencedSOPClassUID == case.headers[0].SOPClassUID
        assert float(contour.ContourData[2]) == pytest.approx(
            z_of[image.ReferencedSOPInstanceUID], abs=1e-6
        )


def test_every_ct_instance_is_referenced(ds: pydicom.Dataset, case: Case) -> None:
    (frame,) = ds.ReferencedFrameOfReferenceSequence
    assert frame.FrameOfReferenceUID == case.headers[0].FrameOfReferenceUID
    (study,) = frame.RTReferencedStudySequence
    assert study.ReferencedSOPInstanceUID == case.headers[0].StudyInstanceUID
    (series,) = study.RTReferencedSeriesSequence
    assert series.SeriesInstanceUID == case.headers[0].SeriesInstanceUID
    referenced = [item.ReferencedSOPInstanceUID for item in series.ContourImageSequence]
    assert sorted(referenced) == sorted(h.SOPInstanceUID for h in case.headers)


def test_patient_and_study_are_the_cts_and_the_series_is_new(
    ds: pydicom.Dataset, case: Case, uids: OutputUIDs
) -> None:
    ct = case.headers[0]
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "StudyID",
        "AccessionNumber",
        "FrameOfReferenceUID",
    ):
        assert ds[keyword].value == ct[keyword].value, keyword
    assert ds.Modality == "RTSTRUCT"
    assert ds.SOPClassUID == pydicom.uid.RTStructureSetStorage
    assert (ds.SeriesInstanceUID, ds.SOPInstanceUID) == (uids.series_uid, uids.sop_uid)
    assert ds.file_meta.MediaStorageSOPInstanceUID == uids.sop_uid
    assert ds.SeriesInstanceUID != ct.SeriesInstanceUID


def test_model_and_version_are_named_and_approval_is_pending(ds: pydicom.Dataset) -> None:
    assert "demo-thorax" in ds.SeriesDescription and "v1" in ds.SeriesDescription
    assert "demo-thorax@1" in ds.SoftwareVersions
    assert any(v.startswith("ie_gateway ") for v in ds.SoftwareVersions)
    assert ds.ApprovalStatus == "UNAPPROVED"
    for roi in ds.StructureSetROISequence:
        assert roi.ROIGenerationAlgorithm == "AUTOMATIC"
        assert roi.ROIGenerationDescription == "AI model demo-thorax@1"


def test_roi_names_colours_and_types_come_from_the_structures(ds: pydicom.Dataset) -> None:
    names = {r.ROINumber: r.ROIName for r in ds.StructureSetROISequence}
    colours = {r.ReferencedROINumber: tuple(r.ROIDisplayColor) for r in ds.ROIContourSequence}
    types = {o.ReferencedROINumber: o.RTROIInterpretedType for o in ds.RTROIObservationsSequence}
    for s in DEMO_STRUCTURES:
        assert (names[s.label], colours[s.label], types[s.label]) == (
            s.name,
            s.color,
            s.interpreted_type,
        )


def _single_slice_headers(case: Case, pixel_spacing: list[float]) -> list[pydicom.Dataset]:
    headers = [copy.deepcopy(h) for h in case.headers[:3]]  # Dataset(h) would share h's elements
    for h in headers:
        h.PixelSpacing = pixel_spacing
    return headers


def test_contour_coordinates_follow_pixel_spacing_row_then_column(case: Case) -> None:
    headers = _single_slice_headers(case, [0.5, 2.0])  # 0.5 mm between rows, 2 mm between columns
    labels = np.zeros((3, *case.labels.shape[1:]), dtype=np.uint8)
    labels[1, 10:20, 30:34] = 1  # rows 10..19, columns 30..33
    ds = build_rtstruct(headers, labels, [RING], MODEL, new_output_uids())
    (contour,) = _contours(ds)
    points = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
    x0, y0, z1 = (float(v) for v in headers[1].ImagePositionPatient)
    assert points[:, 0].min() == pytest.approx(x0 + 29.5 * 2.0)
    assert points[:, 0].max() == pytest.approx(x0 + 33.5 * 2.0)
    assert points[:, 1].min() == pytest.approx(y0 + 9.5 * 0.5)
    assert points[:, 1].max() == pytest.approx(y0 + 19.5 * 0.5)
    assert np.all(points[:, 2] == pytest.approx(z1))
    assert len(points) == 8  # a rectangle with cut corners, collinear vertices dropped


def _ring_labels(case: Case) -> np.ndarray:
    labels = np.zeros((3, *case.labels.shape[1:]), dtype=np.uint8)
    labels[1, 20:60, 20:60] = 1
    labels[1, 30:50, 30:50] = 0  # the hole
    labels[1, 38:42, 38:42] = 1  # an island inside the hole
    return labels


def test_holes_are_separate_contours_combined_even_odd(case: Case) -> None:
    headers = _single_slice_headers(case, [1.0, 1.0])
    labels = _ring_labels(case)
    ds = build_rtstruct(headers, labels, [RING], MODEL, new_output_uids())
    assert len(_contours(ds)) == 3  # outer boundary, hole, island
    assert np.array_equal(rasterize_rtstruct(ds, headers), labels)


def test_fill_holes_structures_get_outer_contours_only(case: Case) -> None:
    headers = _single_slice_headers(case, [1.0, 1.0])
    labels = _ring_labels(case)
    filled = StructureInfo(**{**RING.__dict__, "fill_holes": True})
    ds = build_rtstruct(headers, labels, [filled], MODEL, new_output_uids())
    assert len(_contours(ds)) == 1
    back = rasterize_rtstruct(ds, headers)
    assert back[1, 20:60, 20:60].all() and back.sum() == 40 * 40


def test_single_voxels_are_kept(case: Case) -> None:
    headers = _single_slice_headers(case, [1.0, 1.0])
    labels = np.zeros((3, *case.labels.shape[1:]), dtype=np.uint8)
    labels[1, 5, 5] = labels[2, 7, 9] = 1
    ds = build_rtstruct(headers, labels, [RING], MODEL, new_output_uids())
    assert [c.NumberOfContourPoints for c in _contours(ds)] == [4, 4]
    assert np.array_equal(rasterize_rtstruct(ds, headers), labels)


def test_a_structure_without_voxels_gets_an_roi_without_contours(case: Case) -> None:
    headers = _single_slice_headers(case, [1.0, 1.0])
    labels = np.zeros((3, *case.labels.shape[1:]), dtype=np.uint8)
    ds = build_rtstruct(headers, labels, [RING], MODEL, new_output_uids())
    assert [r.ROIName for r in ds.StructureSetROISequence] == ["Ring"]
    assert "ContourSequence" not in ds.ROIContourSequence[0]


def test_a_label_map_off_the_ct_grid_is_refused(case: Case) -> None:
    with pytest.raises(WriteError, match="not the CT grid"):
        build_rtstruct(case.headers, case.labels[:-1], DEMO_STRUCTURES, MODEL, new_output_uids())


@pytest.mark.peer
def test_dciodvfy_accepts_the_rtstruct(written: Path) -> None:
    result = subprocess.run(
        ["dciodvfy", str(written)], check=False, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "Error" not in result.stderr


def test_a_ct_without_frame_of_reference_is_refused(case: Case) -> None:
    headers = copy.deepcopy(case.headers)  # the module's case stays whole for the tests after this one
    del headers[7].FrameOfReferenceUID
    with pytest.raises(WriteError, match="no FrameOfReferenceUID"):
        build_rtstruct(headers, case.labels, DEMO_STRUCTURES, MODEL, new_output_uids())


def _cycle(ring: np.ndarray) -> tuple[tuple[float, float], ...]:
    """A ring's vertices in order, started at its smallest one: equal for the same closed path."""
    points = [tuple(p) for p in ring.round(3).tolist()]
    start = points.index(min(points))
    return tuple(points[start:] + points[:start])


def _skimage_rings(mask: np.ndarray) -> list[tuple[tuple[float, float], ...]]:
    """The reference: skimage's marching squares at 0.5, collinear vertices dropped, wound as
    ours are (counter-clockwise around the background in (row, col))."""
    rings = []
    padded = np.pad(mask, 1).astype(np.float32)
    for line in measure.find_contours(padded, 0.5, positive_orientation="low"):
        ring = line[:-1] - 1.0
        d_in, d_out = ring - np.roll(ring, 1, axis=0), np.roll(ring, -1, axis=0) - ring
        kept = ring[np.abs(d_in[:, 0] * d_out[:, 1] - d_in[:, 1] * d_out[:, 0]) > 1e-9]
        if len(kept) >= 3:
            rings.append(_cycle(kept))
    return sorted(rings)


def test_contours_are_skimages_marching_squares_on_random_masks_saddles_included() -> None:
    rng = np.random.default_rng(3)
    for _ in range(100):
        mask = rng.random((3, 12, 15)) < rng.uniform(0.2, 0.8)
        mine = mask_rings(mask)
        for k in range(3):
            assert sorted(_cycle(r) for r in mine.get(k, [])) == _skimage_rings(mask[k])
