"""CT series → checked volume: exact HU, geometry, compressed inputs, and every refusal reason."""

from __future__ import annotations

import math
import random
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import UID, EnhancedCTImageStorage, JPEG2000Lossless

from ie_gateway.demo.phantoms import Phantom, make_phantom, write_ct_series
from ie_gateway.errors import VolumeRefused
from ie_gateway.imaging import SliceGeometry
from ie_gateway.store import Store
from ie_gateway.volume import VolumeChecks, load_volume
from tests.conftest import dcm_compress

SLICES, SIZE, PIXEL_MM, SLICE_MM = 40, 128, 3.9, 2.5


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    return make_phantom(5, slices=SLICES, size=SIZE, pixel_mm=PIXEL_MM, slice_mm=SLICE_MM)


@pytest.fixture(scope="module")
def series(phantom: Phantom, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_ct_series(phantom, tmp_path_factory.mktemp("ct40"), seed=5)


def shuffled(paths: list[Path]) -> list[Path]:
    out = list(paths)
    random.Random(7).shuffle(out)
    return out


def edited(
    src: list[Path],
    dst: Path,
    edit: Callable[[int, Dataset], None] | None = None,
    drop: frozenset[int] = frozenset(),
) -> list[Path]:
    """Copy a series, calling ``edit(k, ds)`` on every slice k and leaving out ``drop``."""
    dst.mkdir(parents=True, exist_ok=True)
    out = []
    for k, path in enumerate(src):
        if k in drop:
            continue
        target = dst / path.name
        if edit is None:
            shutil.copy(path, target)
        else:
            ds = pydicom.dcmread(path)
            edit(k, ds)
            ds.save_as(target)
        out.append(target)
    return out


def z_of(phantom: Phantom, k: int) -> float:
    return round(phantom.origin[2] + k * phantom.slice_mm, 4)


def hu(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image)


# --- a good series ------------------------------------------------------------------------------


def test_volume_equals_phantom_hu_from_shuffled_files(phantom: Phantom, series: list[Path]) -> None:
    volume = load_volume(shuffled(series))
    assert volume.image.GetPixelID() == sitk.sitkInt16
    assert np.array_equal(hu(volume.image), phantom.hu)


def test_a_slice_count_that_is_no_multiple_of_the_decode_chunk_is_exact(
    phantom: Phantom, series: list[Path]
) -> None:
    volume = load_volume(shuffled(series[:37]))
    assert np.array_equal(hu(volume.image), phantom.hu[:37])


def test_geometry_matches_the_headers(phantom: Phantom, series: list[Path]) -> None:
    image = load_volume(shuffled(series)).image
    assert image.GetSize() == (SIZE, SIZE, SLICES)
    assert image.GetOrigin() == pytest.approx(phantom.origin, abs=1e-4)
    assert image.GetSpacing() == pytest.approx((PIXEL_MM, PIXEL_MM, SLICE_MM))
    assert image.GetDirection() == pytest.approx((1, 0, 0, 0, 1, 0, 0, 0, 1))


def test_the_volume_carries_the_slice_geometry_of_its_headers_in_slice_order(
    series: list[Path], tmp_path: Path
) -> None:
    volume = load_volume(shuffled(series))
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in series]
    expected = SliceGeometry.from_headers(headers)
    kept = tmp_path / "geometry.json"
    volume.geometry.save(kept)
    for geometry in (volume.geometry, SliceGeometry.load(kept)):
        assert geometry.shape == (SLICES, SIZE, SIZE) == expected.shape
        assert np.array_equal(geometry.positions, expected.positions)
        assert np.array_equal(geometry.row_dir, expected.row_dir)
        assert np.array_equal(geometry.col_dir, expected.col_dir)
        assert (geometry.row_spacing, geometry.col_spacing) == (expected.row_spacing, expected.col_spacing)


def test_a_job_inferred_before_its_geometry_was_kept_is_measured_from_its_headers(
    series: list[Path], tmp_path: Path
) -> None:
    store = Store(tmp_path / "var")
    job_id, _ = store.index.add_instance(
        sop_uid="1.2.3.1.1",
        sop_class="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax="1.2.840.10008.1.2.1",
        study_uid="1.2.3",
        series_uid="1.2.3.1",
        path="1.dcm",
        size=1,
        calling_ae="CT",
        called_ae="IE_GATEWAY",
        header=lambda: {"Modality": "CT"},
    )
    # absolute, as a row written before paths were relative holds them
    store.index.update_detail(job_id, lambda d: replace(d, slice_files=tuple(str(p) for p in series)))
    job = store.index.job(job_id)
    from_headers = store.geometry(job)
    store.keep_geometry(job_id, load_volume(shuffled(series)).geometry)
    kept = store.geometry(job)
    assert from_headers.shape == kept.shape == (SLICES, SIZE, SIZE)
    assert np.array_equal(from_headers.positions, kept.positions)


def test_instances_and_uids_follow_slice_order(series: list[Path]) -> None:
    volume = load_volume(shuffled(series))
    assert volume.paths == series
    first = pydicom.dcmread(series[0], stop_before_pixels=True)
    assert volume.sop_instance_uids == [
        pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in series
    ]
    assert (volume.study_instance_uid, volume.series_instance_uid,
            volume.frame_of_reference_uid) == (
        first.StudyInstanceUID, first.SeriesInstanceUID, first.FrameOfReferenceUID,
    )


def test_order_comes_from_positions_not_instance_numbers(
    phantom: Phantom, series: list[Path], tmp_path: Path
) -> None:
    def reverse_numbers(k: int, ds: Dataset) -> None:
        ds.InstanceNumber = SLICES - k

    volume = load_volume(edited(series, tmp_path, reverse_numbers))
    assert np.array_equal(hu(volume.image), phantom.hu)


def test_rotated_orientation_and_rectangular_pixels_set_direction_and_spacing(
    phantom: Phantom, series: list[Path], tmp_path: Path
) -> None:
    def prone_rectangular(k: int, ds: Dataset) -> None:
        ds.ImageOrientationPatient = [-1, 0, 0, 0, -1, 0]  # rows go right→left, columns up
        ds.PixelSpacing = [2.0, 3.0]  # row spacing (y), column spacing (x)

    image = load_volume(edited(series, tmp_path, prone_rectangular)).image
    assert image.GetDirection() == pytest.approx((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    assert image.GetSpacing() == pytest.approx((3.0, 2.0, SLICE_MM))
    x0, y0, _ = phantom.origin
    # voxel (i, j, k) lies at IPP_k + i * column spacing * row direction + j * row spacing * col
    assert image.TransformIndexToPhysicalPoint((5, 7, 3)) == pytest.approx(
        (x0 - 5 * 3.0, y0 - 7 * 2.0, z_of(phantom, 3)), abs=1e-4
    )
    assert np.array_equal(hu(image), phantom.hu)


def sagittal(k: int, ds: Dataset) -> None:
    """Relabel slice k as a sagittal slice at x = 2.5 k (normal points to -x)."""
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    ds.ImagePositionPatient = [k * SLICE_MM, -100.0, 50.0]


def test_non_axial_series_loads_when_allowed(
    phantom: Phantom, series: list[Path], tmp_path: Path
) -> None:
    paths = edited(series, tmp_path, sagittal)
    image = load_volume(paths, VolumeChecks(allow_non_axial=True)).image
    # sorted along the normal (-x): the slice written last comes first
    assert np.array_equal(hu(image), phantom.hu[::-1])
    assert image.GetDirection() == pytest.approx((0, 0, -1, 1, 0, 0, 0, -1, 0))
    assert image.GetOrigin() == pytest.approx(((SLICES - 1) * SLICE_MM, -100.0, 50.0))


def test_non_integer_rescale_gives_float_hu(
    phantom: Phantom, series: list[Path], tmp_path: Path
) -> None:
    def half_slope(k: int, ds: Dataset) -> None:
        ds.RescaleSlope, ds.RescaleIntercept = "0.5", "-512"  # stored = HU + 1024

    image = load_volume(edited(series, tmp_path, half_slope)).image
    assert image.GetPixelID() == sitk.sitkFloat32
    assert np.array_equal(hu(image), phantom.hu.astype(np.float32) * 0.5)


def test_jpeg2000_lossless_series_gives_the_same_hu(
    phantom: Phantom, series: list[Path], tmp_path: Path
) -> None:
    def j2k(k: int, ds: Dataset) -> None:
        ds.compress(JPEG2000Lossless)

    paths = edited(series, tmp_path, j2k)
    assert pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID == JPEG2000Lossless
    assert np.array_equal(hu(load_volume(shuffled(paths)).image), phantom.hu)


@pytest.mark.peer
@pytest.mark.parametrize(
    ("tool", "syntax"),
    [
        (["dcmcjpeg", "+e1"], "1.2.840.10008.1.2.4.70"),  # JPEG Lossless SV1
        (["dcmcjpls", "+el"], "1.2.840.10008.1.2.4.80"),  # JPEG-LS lossless
        (["dcmcrle"], "1.2.840.10008.1.2.5"),  # RLE lossless
    ],
)
def test_dcmtk_compressed_series_gives_the_same_hu(
    phantom: Phantom, series: list[Path], tmp_path: Path, tool: list[str], syntax: str
) -> None:
    paths = dcm_compress(series, tmp_path, tool)
    assert pydicom.dcmread(paths[0], stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    assert np.array_equal(hu(load_volume(shuffled(paths)).image), phantom.hu)


# --- refusals -------------------------------------------------------------------------------------


DEFAULT_CHECKS = VolumeChecks()


def refusal(paths: list[Path], checks: VolumeChecks = DEFAULT_CHECKS) -> str:
    with pytest.raises(VolumeRefused) as caught:
        load_volume(shuffled(paths), checks)
    return str(caught.value)


def test_missing_slice_is_named_with_its_gap(
    phantom: Phantom, series: list[Path], tmp_path: Path
) -> None:
    reason = refusal(edited(series, tmp_path, drop=frozenset({20})))
    assert reason == (
        f"slice 21 of 40 missing: gap 5.00 mm where spacing is 2.50 mm between "
        f"z={z_of(phantom, 19):.2f} and z={z_of(phantom, 21):.2f}; resend the complete series"
    )


def test_several_missing_slices_are_counted(
    phantom: Phantom, series: list[Path], tmp_path: Path
) -> None:
    reason = refusal(edited(series, tmp_path, drop=frozenset({20, 21})))
    assert reason.startswith("slices 21-22 of 40 missing: gap 7.50 mm where spacing is 2.50 mm")


def test_uneven_spacing_is_refused(phantom: Phantom, series: list[Path], tmp_path: Path) -> None:
    def shift(k: int, ds: Dataset) -> None:
        if k == 20:
            ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], z_of(phantom, 20) + 1.0]

    reason = refusal(edited(series, tmp_path, shift))
    assert reason == (
        f"uneven slice spacing: 3.50 mm where spacing is 2.50 mm between "
        f"z={z_of(phantom, 19):.2f} and z={z_of(phantom, 20) + 1.0:.2f} (1 more uneven step(s))"
    )


def test_duplicate_positions_are_refused(
    phantom: Phantom, series: list[Path], tmp_path: Path
) -> None:
    def repeat(k: int, ds: Dataset) -> None:
        if k == 10:
            ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], z_of(phantom, 9)]

    reason = refusal(edited(series, tmp_path, repeat))
    assert reason.startswith(f"slices 10 and 11 of 40 share the position z={z_of(phantom, 9):.2f}")


def test_gantry_tilt_tag_is_refused(series: list[Path], tmp_path: Path) -> None:
    def tilt(k: int, ds: Dataset) -> None:
        ds.GantryDetectorTilt = 15

    assert refusal(edited(series, tmp_path, tilt)).startswith(
        "gantry tilt of 15.0 degrees (GantryDetectorTilt)"
    )


def test_tilted_slices_without_the_tag_are_refused(series: list[Path], tmp_path: Path) -> None:
    tilt = math.radians(15)

    def tilted(k: int, ds: Dataset) -> None:
        ds.ImageOrientationPatient = [1, 0, 0, 0, math.cos(tilt), math.sin(tilt)]

    reason = refusal(edited(series, tmp_path, tilted))
    assert reason.startswith("slice positions are not along the slice normal")
    assert "(15.0 degrees)" in reason


def test_sideways_drift_of_positions_is_refused(series: list[Path], tmp_path: Path) -> None:
    def drift(k: int, ds: Dataset) -> None:
        x, y, z = ds.ImagePositionPatient
        ds.ImagePositionPatient = [x, y + 0.5 * k, z]

    assert refusal(edited(series, tmp_path, drift)) == (
        "slice positions are not along the slice normal: 19.50 mm sideways over 97.5 mm "
        "(11.3 degrees); a tilted gantry or sheared series is not supported"
    )


def test_non_axial_series_is_refused_by_default(series: list[Path], tmp_path: Path) -> None:
    assert refusal(edited(series, tmp_path, sagittal)) == (
        "the series is not axial (sagittal: slice normal 90.0 degrees from the head-foot axis); "
        "send the axial reconstruction"
    )


def test_mixed_orientation_is_refused(series: list[Path], tmp_path: Path) -> None:
    turn = math.radians(5)

    def rotate_one(k: int, ds: Dataset) -> None:
        if k == 7:
            ds.ImageOrientationPatient = [math.cos(turn), math.sin(turn), 0,
                                          -math.sin(turn), math.cos(turn), 0]

    assert refusal(edited(series, tmp_path, rotate_one)).startswith(
        "slices have different orientations"
    )


def test_mixed_matrix_size_is_refused(series: list[Path], tmp_path: Path) -> None:
    def resize_one(k: int, ds: Dataset) -> None:
        if k == 3:
            ds.Rows = ds.Columns = 64

    reason = refusal(edited(series, tmp_path, resize_one))
    assert "different sizes" in reason and "128x128" in reason and "64x64" in reason


def test_mixed_pixel_spacing_is_refused(series: list[Path], tmp_path: Path) -> None:
    def respace_one(k: int, ds: Dataset) -> None:
        if k == 3:
            ds.PixelSpacing = [0.7, 0.7]

    assert refusal(edited(series, tmp_path, respace_one)).startswith(
        "slices have different pixel spacings"
    )


def test_too_few_slices_are_refused(series: list[Path]) -> None:
    assert refusal(series[:12]) == "only 12 slices; at least 20 are needed for a planning CT"


def test_other_modality_is_refused(series: list[Path], tmp_path: Path) -> None:
    def mr(k: int, ds: Dataset) -> None:
        ds.Modality = "MR"

    assert refusal(edited(series, tmp_path, mr)) == "modality is MR, not CT"


def test_enhanced_ct_is_refused_with_a_clear_reason(series: list[Path], tmp_path: Path) -> None:
    def enhanced(k: int, ds: Dataset) -> None:
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
        ds.NumberOfFrames = 40

    assert refusal(edited(series, tmp_path, enhanced)) == (
        "Enhanced CT Image Storage with 40 frame(s) per file is not supported (multi-frame and "
        "Enhanced CT are refused): configure the sender to send CT Image Storage, one file per "
        "slice"
    )


def test_mixed_series_are_refused(series: list[Path], tmp_path: Path) -> None:
    def other_series(k: int, ds: Dataset) -> None:
        if k == 0:
            ds.SeriesInstanceUID = pydicom.uid.generate_uid()

    assert refusal(edited(series, tmp_path, other_series)) == (
        "the files belong to 2 different series"
    )


def test_missing_position_is_refused(series: list[Path], tmp_path: Path) -> None:
    def no_position(k: int, ds: Dataset) -> None:
        if k == 4:
            del ds.ImagePositionPatient

    assert refusal(edited(series, tmp_path, no_position)) == (
        "ImagePositionPatient is missing in 1 of 40 files"
    )


def test_missing_pixel_data_is_refused(
    phantom: Phantom, series: list[Path], tmp_path: Path
) -> None:
    def no_pixels(k: int, ds: Dataset) -> None:
        if k == 6:
            del ds.PixelData

    reason = refusal(edited(series, tmp_path, no_pixels))
    assert reason.startswith(f"slice 7 of 40 (z={z_of(phantom, 6):.2f}) declares 128x128 pixels (32768 bytes)")
    assert reason.endswith("pixel data missing or truncated")


def test_unsupported_transfer_syntax_is_refused(series: list[Path], tmp_path: Path) -> None:
    def mpeg2(k: int, ds: Dataset) -> None:
        ds.PixelData = encapsulate([ds.PixelData])
        ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.100")

    assert refusal(edited(series, tmp_path, mpeg2)).startswith(
        "transfer syntax MPEG2 Main Profile / Main Level cannot be decoded here"
    )


def test_unreadable_file_is_refused(series: list[Path], tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all" * 10)
    reason = refusal([*series, junk])
    assert reason.startswith("file ") and reason.endswith(
        "of 41 could not be read as DICOM (InvalidDicomError)"
    )


def test_implausible_rescale_is_refused(series: list[Path], tmp_path: Path) -> None:
    def huge_slope(k: int, ds: Dataset) -> None:
        ds.RescaleSlope = 20

    assert "outside what a CT can hold" in refusal(edited(series, tmp_path, huge_slope))


@pytest.mark.peer
def test_lossy_series_is_refused_unless_allowed(
    phantom: Phantom, series: list[Path], tmp_path: Path
) -> None:
    paths = dcm_compress(series, tmp_path, ["dcmcjpeg", "+ee"])
    assert refusal(paths) == (
        "the images are lossy-compressed (JPEG Extended (Process 2 and 4)); planning needs "
        "uncompressed or lossless images"
    )
    image = load_volume(paths, VolumeChecks(allow_lossy=True)).image
    assert image.GetSize() == (SIZE, SIZE, SLICES)


def test_reasons_carry_no_uids_or_file_names(series: list[Path], tmp_path: Path) -> None:
    reason = refusal(edited(series, tmp_path, drop=frozenset({20})))
    header = pydicom.dcmread(series[0], stop_before_pixels=True)
    for secret in (header.SeriesInstanceUID, header.StudyInstanceUID, series[0].name,
                   str(header.PatientName), header.PatientID):
        assert str(secret) not in reason


# --- limits before allocation ---------------------------------------------------------------------

#: Loads a series in a fresh process and prints the reason and how far the peak RSS grew:
#: the peak of the process that would have allocated, not of the test runner.
PEAK_PROBE = """
import json, resource, sys
from pathlib import Path
from ie_gateway.errors import VolumeRefused
from ie_gateway.volume import VolumeChecks, load_volume
checks = VolumeChecks(**json.loads(sys.argv[1]))
paths = [Path(p) for p in sys.argv[2:]]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    load_volume(paths, checks)
    reason = None
except VolumeRefused as exc:
    reason = str(exc)
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({"reason": reason, "grown_mib": grown / 1024}))
"""


def peak_growth(paths: list[Path], **checks: object) -> tuple[str | None, float]:
    import json
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", PEAK_PROBE, json.dumps(checks), *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    out = json.loads(done.stdout)
    return out["reason"], out["grown_mib"]


def big_headers(k: int, ds: Dataset) -> None:
    """4096 x 4096 pixels declared, two bytes of pixel data carried."""
    ds.Rows = ds.Columns = 4096
    ds.PixelData = b"\0\0"


def test_a_4096_matrix_is_refused_on_its_headers_without_allocating(series: list[Path], tmp_path: Path) -> None:
    paths = edited(series, tmp_path, big_headers)
    reason, grown_mib = peak_growth(paths)
    assert reason == "Rows is 4096, outside 1..limits.max_rows (1024)"
    assert grown_mib < 100  # the image alone would be 40 x 4096^2 x 2 bytes = 1280 MiB


def test_pixel_data_shorter_than_its_header_says_is_refused_before_allocating(
    series: list[Path], tmp_path: Path
) -> None:
    paths = edited(series, tmp_path, big_headers)
    reason, grown_mib = peak_growth(paths, max_rows=4096, max_columns=4096)
    assert reason is not None and "declares 4096x4096 pixels (33554432 bytes) but its file holds" in reason
    assert grown_mib < 100


def test_more_slices_than_the_limit_are_refused_before_any_header_is_read(tmp_path: Path) -> None:
    absent = [tmp_path / f"{k}.dcm" for k in range(2001)]
    assert refusal(absent) == "2001 slices, more than limits.max_slices (2000)"


def test_a_volume_over_the_series_limit_is_refused(series: list[Path]) -> None:
    reason = refusal(series, VolumeChecks(max_volume_bytes=SIZE * SIZE * SLICES * 4 - 1))
    assert reason.startswith(f"the volume would take 0.0 GiB ({SLICES} slices of {SIZE}x{SIZE})")
    assert "limits.max_series_gb" in reason


def test_a_slice_over_the_instance_limit_is_refused(series: list[Path]) -> None:
    reason = refusal(series, VolumeChecks(max_instance_bytes=SIZE * SIZE * 2 - 1))
    assert "more than limits.max_instance_mb" in reason
