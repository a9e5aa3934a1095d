"""Volume: the files of a complete CT series → one checked 3D image in Hounsfield units.

A model contours what it is given; a series with a missing slice, a tilted gantry or two
acquisitions mixed together gives contours in the wrong place without any error. So every
geometric assumption is checked on the headers before a pixel is decoded, and a series that
fails one is refused with a reason the admin can act on (``VolumeRefused``). Reasons name slice
numbers and positions (mm), never UIDs, file names or patient data.

Decisions a caller must know:

- Slices are ordered by their position along the slice normal n = row x column of
  ImageOrientationPatient (ascending), never by InstanceNumber. ``Volume.sop_instance_uids[k]``
  and ``Volume.paths[k]`` belong to z index k of the image.
- The image has origin = ImagePositionPatient of the first sorted slice, spacing
  (column spacing, row spacing, mean slice step) and direction columns (row, column, normal),
  in LPS, as DICOM defines them.
- Pixels are HU after RescaleSlope/Intercept: ``sitkInt16`` when every slice's slope and
  intercept are integers (every CT we have seen), ``sitkFloat32`` otherwise.
- Memory: the image is allocated once and decoded slices are pasted into it in place, a few at
  a time, so the peak is about one volume plus a few slices. Compressed transfer syntaxes are
  decoded slice by slice by pydicom's pixel handlers (pylibjpeg: JPEG Lossless, JPEG-LS,
  JPEG 2000, RLE).
- ``spacing_tolerance_mm`` is absolute: every step between neighbouring slices must be within
  it of the series' median step; a step of about k steps is reported as k-1 missing slices.
- Memory is spent only on what the headers promise within ``VolumeChecks``' limits (matrix,
  slice count, bytes per instance and per volume), and an uncompressed file must be at least
  as long as the pixels it declares: a series of headers that declare a 4096² matrix, or
  declare 1024² pixels and carry two bytes, is refused before the image is allocated.
- Multi-frame objects (Enhanced CT) are refused, not decoded: they are rare from planning
  scanners and their per-frame geometry needs its own checks. Lossy-compressed images are
  refused unless ``allow_lossy``: contours on them are not trustworthy for planning.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
import structlog
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.utils import pixel_array
from pydicom.uid import (
    UID,
    CTImageStorage,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
)

from ie_gateway.errors import VolumeRefused
from ie_gateway.imaging import SliceGeometry

log = structlog.get_logger(__name__)

_LOSSY_SYNTAXES = {JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless}
_SAME_TOLERANCE = 1e-4  # orientation cosines and pixel spacing that count as identical
_INT16 = np.iinfo(np.int16)
_CHUNK = 8  # slices decoded between two pastes into the image


@dataclass(frozen=True)
class VolumeChecks:
    """Limits a series must meet; the service maps gateway.yaml onto these."""

    spacing_tolerance_mm: float = 0.01
    min_slices: int = 20
    allow_non_axial: bool = False
    max_tilt_deg: float = 0.5
    allow_lossy: bool = False
    max_rows: int = 1024
    max_columns: int = 1024
    max_slices: int = 2000
    max_instance_bytes: int = 2**30
    max_volume_bytes: int = 8 * 2**30


@dataclass(frozen=True)
class Volume:
    """A checked CT volume and the instances it came from, in slice (z index) order.

    ``geometry`` is where each slice's pixels lie, from the headers the checks read: the later
    stages (plausibility, the writers, agreement) use it instead of reading them again.
    """

    image: sitk.Image
    sop_instance_uids: list[str]
    paths: list[Path]
    frame_of_reference_uid: str
    study_instance_uid: str
    series_instance_uid: str
    geometry: SliceGeometry


@dataclass(frozen=True)
class _Slice:
    """What the checks need from one header."""

    path: Path
    sop_instance_uid: str
    position: tuple[float, float, float]
    orientation: tuple[float, ...]
    pixel_spacing: tuple[float, float]
    rows: int
    columns: int
    slope: float
    intercept: float
    transfer_syntax: UID
    bytes_per_pixel: int


def load_volume(paths: Sequence[Path], checks: VolumeChecks = VolumeChecks()) -> Volume:
    """Check a series' geometry from its headers, then decode it into one HU image.

    Raises VolumeRefused with an admin-readable reason when the series cannot be trusted.
    """
    started = time.perf_counter()
    if not paths:
        raise VolumeRefused("the series has no files")
    if len(paths) > checks.max_slices:
        raise VolumeRefused(f"{len(paths)} slices, more than limits.max_slices ({checks.max_slices})")
    headers = [_read_header(path, i, len(paths)) for i, path in enumerate(paths)]
    _check_series(headers, checks)
    slices = [_slice_facts(path, ds) for path, ds in zip(paths, headers, strict=True)]
    first = headers[0]
    del headers
    _check_grid(slices)
    normal = _normal(slices[0].orientation)
    slices.sort(key=lambda s: float(np.dot(s.position, normal)))
    step = _check_positions(slices, normal, checks)
    _check_memory(slices, checks)
    image = _decode(slices)
    image.SetOrigin(slices[0].position)
    image.SetSpacing((slices[0].pixel_spacing[1], slices[0].pixel_spacing[0], step))
    image.SetDirection(_direction(slices[0].orientation, normal))
    log.info(
        "volume_loaded",
        slices=len(slices),
        pixel_type=image.GetPixelIDTypeAsString(),
        seconds=round(time.perf_counter() - started, 3),
    )
    return Volume(
        image=image,
        sop_instance_uids=[s.sop_instance_uid for s in slices],
        paths=[s.path for s in slices],
        frame_of_reference_uid=str(first.FrameOfReferenceUID),
        study_instance_uid=str(first.StudyInstanceUID),
        series_instance_uid=str(first.SeriesInstanceUID),
        geometry=_geometry(slices),
    )


# --- headers ------------------------------------------------------------------------------------


def _read_header(path: Path, index: int, count: int) -> Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
        raise VolumeRefused(f"file {index + 1} of {count} could not be read as DICOM ({type(exc).__name__})") from exc


def _check_series(headers: list[Dataset], checks: VolumeChecks) -> None:
    """Checks on what every file must share before geometry means anything."""
    count = len(headers)
    for ds in headers:
        _check_kind(ds)
    for keyword, what in (
        ("SeriesInstanceUID", "series"),
        ("StudyInstanceUID", "studies"),
        ("FrameOfReferenceUID", "frames of reference"),
    ):
        _require(headers, keyword)
        distinct = {str(ds.get(keyword)) for ds in headers}
        if len(distinct) > 1:
            raise VolumeRefused(f"the files belong to {len(distinct)} different {what}")
    if count < checks.min_slices:
        raise VolumeRefused(f"only {count} slices; at least {checks.min_slices} are needed for a planning CT")
    for keyword in (
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "PixelSpacing",
        "Rows",
        "Columns",
        "RescaleSlope",
        "RescaleIntercept",
    ):
        _require(headers, keyword)
    for ds in headers:
        _check_matrix(ds, checks)
        _check_pixels_encoding(ds, checks)
    tilts = [abs(float(ds.get("GantryDetectorTilt") or 0.0)) for ds in headers]
    if max(tilts) > checks.max_tilt_deg:
        raise VolumeRefused(
            f"gantry tilt of {max(tilts):.1f} degrees (GantryDetectorTilt); tilted series are "
            "not supported: rescan without tilt or resample to axial on the scanner"
        )


def _check_kind(ds: Dataset) -> None:
    modality = str(ds.get("Modality", "") or "missing")
    if modality != "CT":
        raise VolumeRefused(f"modality is {modality}, not CT")
    sop_class = UID(str(ds.get("SOPClassUID", "")))
    frames = int(ds.get("NumberOfFrames") or 1)
    if sop_class != CTImageStorage or frames > 1:
        raise VolumeRefused(
            f"{sop_class.name or 'unknown SOP class'} with {frames} frame(s) per file is not "
            "supported (multi-frame and Enhanced CT are refused): configure the sender to send "
            "CT Image Storage, one file per slice"
        )


def _require(headers: list[Dataset], keyword: str) -> None:
    lacking = sum(1 for ds in headers if ds.get(keyword) in (None, ""))
    if lacking:
        raise VolumeRefused(f"{keyword} is missing in {lacking} of {len(headers)} files")


def _check_matrix(ds: Dataset, checks: VolumeChecks) -> None:
    for keyword, limit, name in (("Rows", checks.max_rows, "max_rows"), ("Columns", checks.max_columns, "max_columns")):
        value = int(ds.get(keyword))
        if not 0 < value <= limit:
            raise VolumeRefused(f"{keyword} is {value}, outside 1..limits.{name} ({limit})")


def _check_pixels_encoding(ds: Dataset, checks: VolumeChecks) -> None:
    syntax = UID(str(ds.file_meta.get("TransferSyntaxUID", "")))
    try:
        available = get_decoder(syntax).is_available
    except NotImplementedError:
        available = False
    if not available:
        raise VolumeRefused(
            f"transfer syntax {syntax.name or syntax or 'missing'} cannot be decoded here: "
            "send uncompressed or lossless (JPEG Lossless, JPEG-LS, JPEG 2000, RLE)"
        )
    lossy = syntax in _LOSSY_SYNTAXES or ds.get("LossyImageCompression") == "01"
    if lossy and not checks.allow_lossy:
        raise VolumeRefused(
            f"the images are lossy-compressed ({syntax.name}); planning needs uncompressed or lossless images"
        )
    photometric = ds.get("PhotometricInterpretation")
    if int(ds.get("SamplesPerPixel") or 1) != 1 or photometric != "MONOCHROME2":
        raise VolumeRefused(
            f"pixels are {photometric} with {ds.get('SamplesPerPixel')} sample(s); a CT must be MONOCHROME2 grey levels"
        )


def _slice_facts(path: Path, ds: Dataset) -> _Slice:
    position = tuple(float(v) for v in ds.ImagePositionPatient)
    spacing = tuple(float(v) for v in ds.PixelSpacing)
    return _Slice(
        path=path,
        sop_instance_uid=str(ds.SOPInstanceUID),
        position=(position[0], position[1], position[2]),
        orientation=tuple(float(v) for v in ds.ImageOrientationPatient),
        pixel_spacing=(spacing[0], spacing[1]),
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        slope=float(ds.RescaleSlope),
        intercept=float(ds.RescaleIntercept),
        transfer_syntax=UID(str(ds.file_meta.TransferSyntaxUID)),
        bytes_per_pixel=max(1, int(ds.get("BitsAllocated") or 16) // 8),
    )


def _check_memory(slices: list[_Slice], checks: VolumeChecks) -> None:
    """What decoding will hold, from the headers alone, within the limits; and every
    uncompressed file long enough for the pixels it declares (a header that promises a large
    matrix and carries a few bytes must not cost the memory of the matrix)."""
    ref, count = slices[0], len(slices)
    pixels = ref.rows * ref.columns
    instance = pixels * ref.bytes_per_pixel
    if instance > checks.max_instance_bytes:
        raise VolumeRefused(
            f"each slice declares {instance / 2**20:.0f} MiB of pixels, more than limits.max_instance_mb "
            f"({checks.max_instance_bytes / 2**20:.0f})"
        )
    volume = pixels * count * 4  # float32 at worst, as the image is allocated
    if volume > checks.max_volume_bytes:
        raise VolumeRefused(
            f"the volume would take {volume / 2**30:.1f} GiB ({count} slices of {ref.rows}x{ref.columns}), "
            f"more than limits.max_series_gb ({checks.max_volume_bytes / 2**30:g})"
        )
    for k, s in enumerate(slices):
        if s.transfer_syntax.is_encapsulated:
            continue  # compressed: the decoder checks the size of what it decodes
        declared = s.rows * s.columns * s.bytes_per_pixel
        size = s.path.stat().st_size
        if size < declared:
            raise VolumeRefused(
                f"slice {k + 1} of {count} (z={s.position[2]:.2f}) declares {s.rows}x{s.columns} pixels "
                f"({declared} bytes) but its file holds {size} bytes: pixel data missing or truncated"
            )


# --- geometry -----------------------------------------------------------------------------------


def _check_grid(slices: list[_Slice]) -> None:
    """Every slice must share orientation, matrix and pixel spacing."""
    ref = slices[0]
    for s in slices[1:]:
        if not np.allclose(s.orientation, ref.orientation, atol=_SAME_TOLERANCE, rtol=0):
            raise VolumeRefused(
                "slices have different orientations (ImageOrientationPatient "
                f"{_fmt(ref.orientation)} and {_fmt(s.orientation)}): the series mixes scans"
            )
        if (s.rows, s.columns) != (ref.rows, ref.columns):
            raise VolumeRefused(
                f"slices have different sizes ({ref.rows}x{ref.columns} and "
                f"{s.rows}x{s.columns} pixels): the series mixes reconstructions"
            )
        if not np.allclose(s.pixel_spacing, ref.pixel_spacing, atol=_SAME_TOLERANCE, rtol=0):
            raise VolumeRefused(
                f"slices have different pixel spacings ({_fmt(ref.pixel_spacing)} and "
                f"{_fmt(s.pixel_spacing)} mm): the series mixes reconstructions"
            )
    row, col = np.array(ref.orientation[:3]), np.array(ref.orientation[3:])
    if not (
        math.isclose(float(np.linalg.norm(row)), 1.0, abs_tol=1e-3)
        and math.isclose(float(np.linalg.norm(col)), 1.0, abs_tol=1e-3)
        and abs(float(np.dot(row, col))) < 1e-3
    ):
        raise VolumeRefused(f"ImageOrientationPatient {_fmt(ref.orientation)} is not two perpendicular unit vectors")


def _geometry(slices: list[_Slice]) -> SliceGeometry:
    """The checked grid in volume order: the first slice's orientation and spacing (the others
    agree within the checks' tolerance), every slice's own position."""
    ref = slices[0]
    return SliceGeometry(
        positions=np.array([s.position for s in slices], dtype=float),
        row_dir=np.array(ref.orientation[:3], dtype=float),
        col_dir=np.array(ref.orientation[3:], dtype=float),
        row_spacing=ref.pixel_spacing[0],
        col_spacing=ref.pixel_spacing[1],
        rows=ref.rows,
        columns=ref.columns,
    )


def _normal(orientation: tuple[float, ...]) -> np.ndarray:
    row, col = np.array(orientation[:3]), np.array(orientation[3:])
    normal = np.cross(row, col)
    return np.asarray(normal / np.linalg.norm(normal), dtype=float)


def _direction(orientation: tuple[float, ...], normal: np.ndarray) -> tuple[float, ...]:
    row = np.array(orientation[:3]) / np.linalg.norm(orientation[:3])
    col = np.array(orientation[3:]) / np.linalg.norm(orientation[3:])
    return tuple(float(v) for v in np.column_stack([row, col, normal]).ravel())


def _check_positions(slices: list[_Slice], normal: np.ndarray, checks: VolumeChecks) -> float:
    """Refuse duplicates, shear (tilt), non-axial series and gaps; return the slice step in mm."""
    positions = np.array([s.position for s in slices])
    along = positions @ normal
    steps = np.diff(along)
    tol = checks.spacing_tolerance_mm
    count = len(slices)
    duplicates = np.flatnonzero(steps <= tol)
    if duplicates.size:
        i = int(duplicates[0])
        raise VolumeRefused(
            f"slices {i + 1} and {i + 2} of {count} share the position z={along[i]:.2f} "
            f"({duplicates.size} duplicate position(s) in all): the series holds two "
            "acquisitions or repeated images"
        )
    _check_shear(positions, along, normal, checks)
    _check_axial(normal, checks)
    step = float(np.median(steps))
    uneven = np.flatnonzero(np.abs(steps - step) > tol)
    if uneven.size:
        raise VolumeRefused(_gap_reason(along, steps, int(uneven[0]), step, uneven.size, tol))
    return float((along[-1] - along[0]) / (count - 1))


def _check_shear(positions: np.ndarray, along: np.ndarray, normal: np.ndarray, checks: VolumeChecks) -> None:
    """Positions must advance along the normal; sideways drift means a tilted gantry."""
    travel = positions - positions[0]
    distance = along - along[0]
    sideways = np.linalg.norm(travel - np.outer(distance, normal), axis=1)
    allowed = checks.spacing_tolerance_mm + math.tan(math.radians(checks.max_tilt_deg)) * np.abs(distance)
    worst = int(np.argmax(sideways - allowed))
    if sideways[worst] > allowed[worst]:
        span = abs(float(distance[worst]))
        degrees = math.degrees(math.atan2(float(sideways[worst]), span))
        raise VolumeRefused(
            f"slice positions are not along the slice normal: {sideways[worst]:.2f} mm sideways "
            f"over {span:.1f} mm ({degrees:.1f} degrees); a tilted gantry or sheared series "
            "is not supported"
        )


def _check_axial(normal: np.ndarray, checks: VolumeChecks) -> None:
    if checks.allow_non_axial:
        return
    off_axis = math.degrees(math.acos(min(1.0, abs(float(normal[2])))))
    if off_axis > checks.max_tilt_deg:
        plane = ("sagittal", "coronal", "oblique")[int(np.argmax(np.abs(normal)))]
        raise VolumeRefused(
            f"the series is not axial ({plane}: slice normal {off_axis:.1f} degrees from the "
            "head-foot axis); send the axial reconstruction"
        )


def _gap_reason(along: np.ndarray, steps: np.ndarray, i: int, step: float, bad: int, tol: float) -> str:
    gap = float(steps[i])
    between = f"between z={along[i]:.2f} and z={along[i + 1]:.2f}"
    expected = round((along[-1] - along[0]) / step) + 1
    multiple = round(gap / step)
    more = f" ({bad - 1} more uneven step(s))" if bad > 1 else ""
    if multiple >= 2 and abs(gap - multiple * step) <= tol * multiple:
        missing = multiple - 1
        which = f"slice {i + 2} of {expected}" if missing == 1 else f"slices {i + 2}-{i + 1 + missing} of {expected}"
        return (
            f"{which} missing: gap {gap:.2f} mm where spacing is {step:.2f} mm {between}{more}; "
            "resend the complete series"
        )
    return f"uneven slice spacing: {gap:.2f} mm where spacing is {step:.2f} mm {between}{more}"


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


# --- pixels -------------------------------------------------------------------------------------


def _decode(slices: list[_Slice]) -> sitk.Image:
    """Decode slice by slice into one preallocated image, never holding a second volume.

    Slices collect in a small buffer that is pasted into the image in place (Image.__setitem__
    runs ITK's in-place paste); one paste per _CHUNK slices costs a fifth of one per slice.
    """
    integral = all(s.slope.is_integer() and s.intercept.is_integer() for s in slices)
    dtype, pixel_id = (np.int16, sitk.sitkInt16) if integral else (np.float32, sitk.sitkFloat32)
    ref, count = slices[0], len(slices)
    image = sitk.Image([ref.columns, ref.rows, count], pixel_id)
    buffer = np.empty((min(_CHUNK, count), ref.rows, ref.columns), dtype=dtype)
    for start in range(0, count, _CHUNK):
        chunk = slices[start : start + _CHUNK]
        for offset, s in enumerate(chunk):
            k = start + offset
            stored = _read_pixels(s, k, count)
            if integral:
                buffer[offset] = _rescale_int16(stored, s, k, count)
            else:
                buffer[offset] = _rescale_float(stored, s)
        image[:, :, start : start + len(chunk)] = sitk.GetImageFromArray(buffer[: len(chunk)])
    return image


def _read_pixels(s: _Slice, k: int, count: int) -> np.ndarray:
    where = f"slice {k + 1} of {count} (z={s.position[2]:.2f})"
    try:
        stored = pixel_array(s.path)
    except AttributeError as exc:
        raise VolumeRefused(f"{where} has no pixel data") from exc
    except (ValueError, RuntimeError, NotImplementedError, OSError) as exc:
        raise VolumeRefused(f"{where} could not be decoded ({s.transfer_syntax.name}): {exc}") from exc
    if stored.shape != (s.rows, s.columns):
        raise VolumeRefused(f"{where} decoded to {stored.shape} pixels, not {s.rows}x{s.columns}")
    return stored


def _rescale_int16(stored: np.ndarray, s: _Slice, k: int, count: int) -> np.ndarray:
    hu = stored.astype(np.int32)
    if s.slope != 1:
        hu *= int(s.slope)
    hu += int(s.intercept)
    low, high = int(hu.min()), int(hu.max())
    if low < _INT16.min or high > _INT16.max:
        raise VolumeRefused(
            f"slice {k + 1} of {count} has values {low}..{high} HU after rescale, outside "
            "what a CT can hold; check RescaleSlope/RescaleIntercept"
        )
    return hu.astype(np.int16)


def _rescale_float(stored: np.ndarray, s: _Slice) -> np.ndarray:
    hu = stored.astype(np.float32)
    hu *= np.float32(s.slope)
    hu += np.float32(s.intercept)
    return hu
