"""The synthetic thorax phantom and its CT series: headers, geometry, labels, reproducibility."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLosslessSV1,
)
from scipy import ndimage

from ie_gateway.demo.phantoms import STRUCTURES, Phantom, make_phantom, write_ct_series
from ie_gateway.infer.manifest import load_manifest

REPO = Path(__file__).resolve().parents[1]

# a coarse grid with a full-size field of view: the anatomy is the real size, the test is fast
GRID = {"slices": 60, "size": 160, "pixel_mm": 3.125, "slice_mm": 5.0}


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    return make_phantom(7, **GRID)


@pytest.fixture(scope="module")
def small() -> Phantom:
    return make_phantom(3, slices=5, size=96, pixel_mm=4.0, slice_mm=3.0)


def _volumes_cc(p: Phantom) -> np.ndarray:
    voxel_cc = p.pixel_mm * p.pixel_mm * p.slice_mm / 1000.0
    return np.bincount(p.labels.ravel(), minlength=len(STRUCTURES) + 1) * voxel_cc


def test_structures_are_the_demo_models_labels() -> None:
    """The phantom's label k is structure k of every shipped demo-thorax version."""
    packages = sorted((REPO / "models" / "demo-thorax").glob("*/model.yaml"))
    assert packages, "no demo-thorax version in models/"
    for path in packages:
        manifest = load_manifest(path.parent)
        by_label = {s.label: s.name for s in manifest.structures}
        assert by_label == dict(enumerate(STRUCTURES, start=1)), path


def test_arrays_have_the_documented_types_and_shape(phantom: Phantom) -> None:
    assert phantom.hu.dtype == np.int16 and phantom.labels.dtype == np.uint8
    assert phantom.hu.shape == phantom.labels.shape == (60, 160, 160)
    assert set(np.unique(phantom.labels)) == set(range(len(STRUCTURES) + 1))


def test_image_is_centred_on_the_isocentre(phantom: Phantom) -> None:
    x0, y0, _ = phantom.origin
    last = x0 + (phantom.hu.shape[2] - 1) * phantom.pixel_mm
    assert x0 == pytest.approx(-last) and y0 == pytest.approx(x0)


def test_organ_volumes_are_anatomical(phantom: Phantom) -> None:
    cc = _volumes_cc(phantom)
    assert 600 < cc[2] < 3500 and 600 < cc[3] < 3500  # lungs
    assert 150 < cc[4] < 1200  # heart
    assert cc[1] > cc[2] + cc[3]  # the External part alone (body minus organs) over 30 cm of z


def test_hu_of_each_label_matches_its_tissue(phantom: Phantom) -> None:
    mean = {lab: float(phantom.hu[phantom.labels == lab].mean()) for lab in range(6)}
    assert mean[0] < -700  # air, with the table
    assert -900 < mean[2] < -780 and -900 < mean[3] < -780
    assert 20 < mean[4] < 70
    assert 10 < mean[5] < 55
    assert -120 < mean[1] < 150  # fat, muscle, bone


def test_left_lung_is_on_the_patients_left_and_heart_anterior(phantom: Phantom) -> None:
    centre = {lab: ndimage.center_of_mass(phantom.labels == lab) for lab in (1, 2, 3, 4, 5)}
    assert centre[2][2] > centre[1][2] > centre[3][2]  # +x (column) is the patient's left
    assert centre[4][1] < centre[5][1]  # heart in front of (smaller y than) the cord
    assert centre[4][2] > centre[5][2]  # heart to the left of the midline


def test_fat_encloses_the_heart_above_and_below_as_well_as_round_it() -> None:
    """Each heart surface is visible: in every column, the voxels just past its ends are fat."""
    p = make_phantom(7, slices=160, size=160, pixel_mm=3.125, slice_mm=2.5)
    heart = p.labels == 4
    columns = heart.any(axis=0)
    lowest = np.argmax(heart, axis=0)[columns]
    highest = (heart.shape[0] - 1 - np.argmax(heart[::-1], axis=0))[columns]
    ys, xs = np.nonzero(columns)
    below, above = p.hu[lowest - 1, ys, xs], p.hu[highest + 1, ys, xs]
    assert lowest.min() > 0 and highest.max() < heart.shape[0] - 1  # the whole heart is inside
    assert (below < -40).mean() > 0.98 and (above < -40).mean() > 0.98


def test_below_the_right_lung_lies_a_liver_brighter_than_the_heart() -> None:
    """Under the right hemidiaphragm the soft tissue is liver, as on a real CT, not blood-like."""
    p = make_phantom(7, slices=160, size=160, pixel_mm=3.125, slice_mm=2.5)
    right_lung = (p.labels == 3).any(axis=(1, 2))
    below = np.arange(len(right_lung)) < np.argmax(right_lung)  # slices under the right lung
    assert below.sum() > 4
    right_half = np.zeros(p.labels.shape[1:], dtype=bool)
    right_half[:, : p.labels.shape[2] // 2] = True  # low columns: the patient's right
    soft = (p.labels[below] == 1) & right_half & (p.hu[below] > 0) & (p.hu[below] < 200)
    assert np.median(p.hu[below][soft]) > np.median(p.hu[p.labels == 4]) + 10


def test_spinal_cord_is_a_realistic_tube_inside_bone(phantom: Phantom) -> None:
    cord = phantom.labels == 5
    assert cord.any(axis=(1, 2)).all()  # the cord runs through every slice
    radius = np.sqrt(cord.sum(axis=(1, 2)) * phantom.pixel_mm**2 / np.pi)
    assert 4.5 < radius.mean() < 10.0
    ring = ndimage.binary_dilation(cord, iterations=4, structure=np.ones((1, 3, 3))) & ~cord
    assert np.percentile(phantom.hu[ring], 75) > 300  # the canal wall is bone


def test_external_contains_everything_inside_the_skin(phantom: Phantom) -> None:
    inside = phantom.labels > 0
    for k in range(inside.shape[0]):
        assert (ndimage.binary_fill_holes(inside[k]) == inside[k]).all()
        assert ndimage.label(inside[k])[1] == 1
    table = (phantom.labels == 0) & (phantom.hu > -400)
    assert table.sum() > 1000  # the table is there and is not External


def test_a_narrow_field_of_view_shrinks_the_anatomy_to_fit(small: Phantom) -> None:
    inside = small.labels > 0
    assert not inside[:, 0, :].any() and not inside[:, -1, :].any()
    assert not inside[:, :, 0].any() and not inside[:, :, -1].any()


def test_same_seed_gives_the_same_phantom() -> None:
    a, b = make_phantom(11, **GRID), make_phantom(11, **GRID)
    assert (
        np.array_equal(a.hu, b.hu) and np.array_equal(a.labels, b.labels) and a.origin == b.origin
    )


def test_anatomy_in_mm_does_not_depend_on_the_grid() -> None:
    coarse = make_phantom(11, **GRID)
    fine = make_phantom(11, slices=30, size=320, pixel_mm=GRID["pixel_mm"] / 2, slice_mm=10.0)
    assert _volumes_cc(fine)[1:] == pytest.approx(_volumes_cc(coarse)[1:], rel=0.08)


def test_anatomy_intensity_and_noise_vary_across_seeds() -> None:
    phantoms = [make_phantom(seed, **GRID) for seed in range(5)]
    volumes = np.array([_volumes_cc(p)[1:] for p in phantoms])
    assert (volumes.std(axis=0) / volumes.mean(axis=0) > 0.03).all()
    centres = np.array([ndimage.center_of_mass(p.labels == 4) for p in phantoms]) * GRID["pixel_mm"]
    assert np.ptp(centres[:, 2]) > 10.0 and np.ptp(centres[:, 0]) > 10.0  # mm, in x and z
    lung_hu = [float(p.hu[p.labels == 2].mean()) for p in phantoms]
    assert np.ptp(lung_hu) > 10.0
    air_sd = [float(p.hu[:, :8, :8].std()) for p in phantoms]  # a corner of air: noise only
    assert max(air_sd) > 1.3 * min(air_sd)


def test_series_headers_read_back(small: Phantom, tmp_path: Path) -> None:
    paths = write_ct_series(small, tmp_path, seed=3)
    assert [p.name for p in paths] == sorted(p.name for p in paths) and len(paths) == 5
    slices = [pydicom.dcmread(p) for p in paths]
    first = slices[0]
    assert first.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert first.SOPClassUID == CTImageStorage == first.file_meta.MediaStorageSOPClassUID
    assert (first.Modality, first.BodyPartExamined, first.SeriesDescription) == (
        "CT",
        "CHEST",
        "Thorax planning CT",
    )
    assert (first.PatientName, first.PatientID) == ("PHANTOM^THORAX", "PH0001")
    assert list(first.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert (first.RescaleIntercept, first.RescaleSlope, first.BitsAllocated) == (-1024, 1, 16)
    assert first.KVP and first.Manufacturer and first.AcquisitionNumber == 1
    assert first.PositionReferenceIndicator == "" and first.SliceThickness == small.slice_mm
    assert [ds.InstanceNumber for ds in slices] == [1, 2, 3, 4, 5]
    for uid in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        assert len({ds[uid].value for ds in slices}) == 1
    assert len({ds.SOPInstanceUID for ds in slices}) == 5
    assert all(ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID for ds in slices)


def test_series_pixels_and_geometry_are_the_phantoms(small: Phantom, tmp_path: Path) -> None:
    slices = [pydicom.dcmread(p) for p in write_ct_series(small, tmp_path, seed=3)]
    for k, ds in enumerate(slices):
        hu = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
        assert np.array_equal(hu, small.hu[k])
        expected = (small.origin[0], small.origin[1], small.origin[2] + k * small.slice_mm)
        assert [float(v) for v in ds.ImagePositionPatient] == pytest.approx(expected, abs=1e-3)
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert [float(v) for v in ds.PixelSpacing] == [small.pixel_mm, small.pixel_mm]


def test_implicit_transfer_syntax_and_extra_keywords(small: Phantom, tmp_path: Path) -> None:
    paths = write_ct_series(
        small,
        tmp_path,
        transfer_syntax=ImplicitVRLittleEndian,
        extra={"BodyPartExamined": "LUNG", "StationName": "CT9"},
    )
    ds = pydicom.dcmread(paths[2])
    assert ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert (ds.BodyPartExamined, ds.StationName) == ("LUNG", "CT9")
    assert np.array_equal(ds.pixel_array.astype(np.int32) - 1024, small.hu[2])


def test_compressed_transfer_syntax_is_refused(small: Phantom, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="transfer syntax"):
        write_ct_series(small, tmp_path, transfer_syntax=JPEGLosslessSV1)


def test_uids_are_deterministic_by_seed(small: Phantom, tmp_path: Path) -> None:
    def uids(seed: int, folder: Path) -> list[str]:
        ds = pydicom.dcmread(write_ct_series(small, folder, seed=seed)[0])
        return [
            ds.StudyInstanceUID,
            ds.SeriesInstanceUID,
            ds.FrameOfReferenceUID,
            ds.SOPInstanceUID,
        ]

    a, b, c = uids(5, tmp_path / "a"), uids(5, tmp_path / "b"), uids(6, tmp_path / "c")
    assert a == b
    assert not set(a) & set(c)
    assert all(len(uid) <= 64 for uid in a)


@pytest.mark.peer
def test_dciodvfy_finds_no_error(small: Phantom, tmp_path: Path) -> None:
    path = write_ct_series(small, tmp_path, seed=3)[0]
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Error" not in result.stdout + result.stderr
