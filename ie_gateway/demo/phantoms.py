"""Synthetic thorax CT phantoms with exact labels, and their DICOM CT series.

Tests, benchmarks and the demo model's training all need planning CTs whose true contours are
known and that carry no patient data. A phantom is drawn slice by slice on coordinate grids in
patient millimetres (LPS), so its anatomy depends on the seed, not on the pixel size, and a
200 x 512 x 512 volume takes a few seconds and about three bytes per voxel.

Anatomy (all sizes, positions, HU levels and the noise vary with the seed): an elliptic body
with a subcutaneous fat layer, two textured lungs with a diaphragm dome and a tapering apex,
the heart (anterior, medial, to the patient's left) in a thin shell of epicardial fat, the
liver under the right hemidiaphragm, the vertebral body with the spinal cord in its canal, ribs,
a sternum, and a table below the body that lies outside the External contour. Labels are
exclusive: an organ overrides External.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from scipy import ndimage

STRUCTURES: tuple[str, ...] = ("External", "Lung_L", "Lung_R", "Heart", "SpinalCord")
"""Structure names; a structure's label is its index here plus one (0 is background)."""

EXTERNAL, LUNG_L, LUNG_R, HEART, SPINAL_CORD = range(1, 6)

_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_HU_MIN, _HU_MAX = -1024, 3071  # what a 12-bit stored value with intercept -1024 can carry
_UID_NAMESPACE = "ie_gateway.synthetic"  # kept from its first name: the phantoms' UIDs stay as they were
_HEART_FAT_MM = (5.0, 4.0, 6.0)  # epicardial fat beyond the heart: along, across, z


@dataclass(frozen=True)
class Phantom:
    """A CT volume in Hounsfield units with its exact label map, on one voxel grid."""

    hu: np.ndarray  # int16 (z, y, x), Hounsfield units
    labels: np.ndarray  # uint8 (z, y, x), 0 = background, 1..5 as STRUCTURES
    pixel_mm: float  # row/column spacing (square pixels)
    slice_mm: float  # slice spacing = thickness
    origin: tuple[float, float, float]  # LPS mm of voxel (0, 0, 0), i.e. slice 0's position


@dataclass(frozen=True)
class _Anatomy:
    """Seed-drawn shape and intensity parameters, in nominal mm and HU."""

    centre: tuple[float, float]  # body centre x, y in patient mm
    rotation: float  # in-plane rotation, radians
    scale: float  # in-plane shrink so that the body fits the field of view
    body: tuple[float, float]  # half-axes (left-right, antero-posterior) at mid-thorax
    body_wobble: tuple[float, float]  # amplitude, phase of the slow size change along z
    fat_mm: float  # subcutaneous fat thickness
    carina_z: float  # offset of the carina from the volume centre, mm
    lung_apex: tuple[float, float]  # (left, right) apex height above the carina
    lung_base: tuple[float, float]  # (left, right) dome top below the carina
    lung_centre: tuple[float, float]  # |x| and y of each lung's ellipse centre (body units)
    lung_radii: tuple[float, float]  # half-axes of the lung ellipse (body units)
    heart_centre: tuple[float, float, float]  # x, y (mm from body centre), z (mm from carina)
    heart_radii: tuple[float, float, float]
    heart_angle: float
    spine_depth: float  # vertebral body centre, mm in front of the back skin
    vertebra_r: float
    cord_r: float
    csf_mm: float  # cerebrospinal fluid between cord and canal wall (fixed: a cord's edge is
    # then defined by the bony canal, which a model sees at any resolution)
    rib_period: float
    rib_phase: float
    table_gap: float
    hu_soft: float
    hu_fat: float
    hu_lung: float
    hu_bone: float
    hu_heart: float
    hu_cord: float
    noise_sd: float
    hu_liver: float  # brighter than blood, as on a real non-contrast CT


def _draw_anatomy(seed: int, half_fov_mm: float) -> _Anatomy:
    """Draw one patient's anatomy; the draw order is fixed so a seed always gives the same one."""
    rng = np.random.default_rng([seed, 0x5EED])
    u = rng.uniform
    centre = (u(-20.0, 20.0), u(-25.0, 15.0))
    body = (u(140.0, 180.0), u(95.0, 125.0))
    reach = max(abs(centre[0]) + body[0], abs(centre[1]) + body[1] + 25.0)  # + table
    scale = min(1.0, (half_fov_mm - 4.0) / reach)
    return _Anatomy(
        centre=centre,
        rotation=np.deg2rad(u(-5.0, 5.0)),
        scale=scale,
        body=body,
        body_wobble=(u(0.0, 0.04), u(0.0, 2 * np.pi)),
        fat_mm=u(6.0, 22.0),
        carina_z=u(-30.0, 30.0),
        lung_apex=(u(55.0, 80.0), u(55.0, 80.0)),
        lung_base=(u(140.0, 175.0), u(125.0, 160.0)),
        lung_centre=(u(0.42, 0.46), u(0.0, 0.08)),
        lung_radii=(u(0.36, 0.40), u(0.72, 0.80)),
        heart_centre=(u(15.0, 35.0), u(-45.0, -25.0), u(-95.0, -70.0)),
        heart_radii=(u(55.0, 68.0), u(42.0, 52.0), u(48.0, 60.0)),
        heart_angle=np.deg2rad(u(20.0, 40.0)),
        spine_depth=u(60.0, 75.0),
        vertebra_r=u(15.0, 19.0),
        cord_r=u(6.0, 9.0),
        csf_mm=2.0,
        rib_period=u(22.0, 28.0),
        rib_phase=u(0.0, 30.0),
        table_gap=u(0.0, 4.0),
        hu_soft=u(30.0, 50.0),
        hu_fat=u(-115.0, -85.0),
        hu_lung=u(-880.0, -820.0),
        hu_bone=u(600.0, 800.0),
        hu_heart=u(35.0, 55.0),
        hu_cord=u(25.0, 40.0),
        noise_sd=u(8.0, 25.0),
        hu_liver=u(58.0, 72.0),
    )


def _lung_texture(rng: np.random.Generator, size: int, pixel_mm: float) -> np.ndarray:
    """Two smooth noise tiles (float32, 2 x size x size) that slices blend to texture the lungs."""
    tiles = rng.standard_normal((2, size, size), dtype=np.float32)
    sigma = max(1.0, 3.0 / pixel_mm)
    for tile in tiles:
        ndimage.gaussian_filter(tile, sigma, output=tile)
        tile /= max(float(tile.std()), 1e-6)
    return tiles


class _SliceDrawer:
    """Draws one axial slice at a time on a shared in-plane grid, to keep memory to one slice."""

    def __init__(self, a: _Anatomy, size: int, pixel_mm: float, texture: np.ndarray) -> None:
        self.a = a
        self.texture = texture
        half = (size - 1) / 2.0 * pixel_mm
        axis = (np.arange(size, dtype=np.float32) * pixel_mm - half).astype(np.float32)
        x = axis[None, :] - np.float32(a.centre[0])
        y = axis[:, None] - np.float32(a.centre[1])
        c, s = np.float32(np.cos(a.rotation)), np.float32(np.sin(a.rotation))
        # u: towards the patient's left, v: towards the back, both in nominal (unscaled) mm
        self.u = (c * x + s * y) / np.float32(a.scale)
        self.v = (-s * x + c * y) / np.float32(a.scale)

    def _ellipse(self, cu: float, cv: float, ru: float, rv: float) -> np.ndarray:
        """Squared normalised radius of an axis-aligned ellipse (< 1 inside)."""
        return ((self.u - cu) / ru) ** 2 + ((self.v - cv) / rv) ** 2

    def _ribcage(self, bu: float, bv: float) -> np.ndarray:
        """Inside the ribs: what the lungs, and below them the liver, may fill."""
        a = self.a
        return self._ellipse(0.0, 0.0, bu - a.fat_mm - 12.0, bv - a.fat_mm - 12.0) < 1.0

    def _round_spine(self, vc: float) -> np.ndarray:
        """The vertebral body with a margin, which no organ enters."""
        r = self.a.vertebra_r + 8.0
        return self._ellipse(0.0, vc, r, r) < 1.0

    def _body_axes(self, zc: float) -> tuple[float, float]:
        """Body half-axes at height zc (mm above the carina): neck above the apex, thorax below."""
        a = self.a
        amp, phase = a.body_wobble
        wobble = 1.0 + amp * np.sin(2 * np.pi * zc / 300.0 + phase)
        neck = np.clip((zc - max(a.lung_apex) - 15.0) / 60.0, 0.0, 1.0)
        return (a.body[0] * wobble * (1.0 - 0.55 * neck), a.body[1] * wobble * (1.0 - 0.35 * neck))

    def _lung(self, zc: float, side: int, bu: float, bv: float) -> np.ndarray:
        """Mask of one lung (side +1 = patient's left) with its dome and apex."""
        a = self.a
        k = 0 if side > 0 else 1
        apex, base = a.lung_apex[k], -a.lung_base[k]
        if zc > apex or zc < base - 45.0:
            return np.zeros(self.u.shape, dtype=bool)
        taper = np.sqrt(np.clip(1.0 - ((zc - (apex - 55.0)) / 55.0) ** 2, 0.0, 1.0)) if zc > apex - 55.0 else 1.0
        ru, rv = a.lung_radii[0] * bu * taper, a.lung_radii[1] * bv * taper
        r2 = self._ellipse(side * a.lung_centre[0] * bu, a.lung_centre[1] * bv, max(ru, 1e-3), max(rv, 1e-3))
        # the diaphragm dome: near the base only the outer rim of the lung (the recesses) is left
        dome = np.clip((base - zc) / 45.0 + 1.0, 0.0, 1.0) if zc < base else 0.0
        return (r2 < 1.0) & (r2 > dome)

    def draw(self, zc: float, rng: np.random.Generator, hu: np.ndarray, lab: np.ndarray) -> None:
        """Fill one slice of HU (float32 scratch) and labels at height zc above the carina.

        Tissues are painted back to front (later ones cover earlier ones); labels follow the
        same order, so they are exclusive and an organ overrides External.
        """
        bu, bv = self._body_axes(zc)
        inner = self._body_and_table(bu, bv, hu, lab)
        vc, cord = self._spine(bv, hu)
        self._liver(zc, bu, bv, vc, hu)
        heart, fat_rim = self._heart(zc, hu)
        ribcage = self._lungs(zc, bu, bv, vc, fat_rim, hu, lab)
        self._chest_wall(zc, bu, bv, ribcage, inner, hu)
        hu[heart] = self.a.hu_heart
        lab[heart] = HEART
        lab[cord] = SPINAL_CORD
        hu += rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(self.a.noise_sd)

    def _body_and_table(self, bu: float, bv: float, hu: np.ndarray, lab: np.ndarray) -> np.ndarray:
        """Air, the table under the back (not External), fat under the skin, soft tissue inside.

        Returns the mask inside the fat layer.
        """
        a = self.a
        hu.fill(-1000.0)
        lab.fill(0)
        table = (self.v > bv + a.table_gap) & (self.v < bv + a.table_gap + 18.0)
        hu[table] = -250.0
        hu[table & (self.v > bv + a.table_gap + 15.0)] = 150.0
        body = self._ellipse(0.0, 0.0, bu, bv) < 1.0
        hu[body] = a.hu_fat
        lab[body] = EXTERNAL
        inner = self._ellipse(0.0, 0.0, bu - a.fat_mm, bv - a.fat_mm) < 1.0
        hu[inner] = a.hu_soft
        return inner

    def _spine(self, back: float, hu: np.ndarray) -> tuple[float, np.ndarray]:
        """Vertebral body, then the canal behind it: bony ring, CSF, cord.

        Returns the vertebral body's centre (v) and the cord's mask.
        """
        a = self.a
        vc = back - a.spine_depth
        canal_c = vc + a.vertebra_r + a.cord_r + a.csf_mm + 2.0
        canal_r = a.cord_r + a.csf_mm
        vert = self._ellipse(0.0, vc, a.vertebra_r, a.vertebra_r * 0.9) < 1.0
        ring = (self._ellipse(0.0, canal_c, canal_r + 6.0, canal_r + 6.0) < 1.0) | (
            (np.abs(self.u) < 5.0) & (self.v > canal_c) & (self.v < canal_c + canal_r + 22.0)
        )
        hu[vert | ring] = a.hu_bone
        cancellous = self._ellipse(0.0, vc, a.vertebra_r - 3.0, a.vertebra_r * 0.9 - 3.0) < 1.0
        hu[vert & cancellous] = a.hu_bone * 0.45
        hu[self._ellipse(0.0, canal_c, canal_r, canal_r) < 1.0] = 5.0
        cord = self._ellipse(0.0, canal_c, a.cord_r, a.cord_r) < 1.0
        hu[cord] = a.hu_cord
        return vc, cord

    def _liver(self, zc: float, bu: float, bv: float, vc: float, hu: np.ndarray) -> None:
        """The liver under the right hemidiaphragm: it fills the right lung's dome and below.

        Labelled External (it is not a structure of the demo model); the lungs and the heart's
        fat are painted over it, so it shows only where they are not.
        """
        a = self.a
        top = -a.lung_base[1]  # the right dome's top
        if zc > top:
            return
        reach = 35.0 * min((top - zc) / 40.0, 1.0)  # crosses the midline lower down
        liver = self._ribcage(bu, bv) & (self.u < reach) & (self.v < vc + 10.0)
        liver &= ~self._round_spine(vc)
        hu[liver] = a.hu_liver

    def _heart(self, zc: float, hu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The heart's section (a rotated ellipsoid) and its shell of epicardial fat, painted as fat.

        The fat encloses the heart in 3D (4-5 mm round its sides, 6 mm over its base and apex, as
        the fat pad on the diaphragm), so every surface of the heart, the lower one included, is
        visible in the image; a heart that ended in plain soft tissue could only be guessed at.
        Returns both masks; the heart itself is painted last, over whatever else reached it.
        """
        a = self.a
        hx, hy, hz = a.heart_centre
        rx, ry, rz = a.heart_radii
        fu, fv, fz = _HEART_FAT_MM
        dz2 = ((zc - hz) / (rz + fz)) ** 2
        if dz2 >= 1.0:
            empty = np.zeros(self.u.shape, dtype=bool)
            return empty, empty
        ch, sh = np.cos(a.heart_angle), np.sin(a.heart_angle)
        du, dv = self.u - hx, self.v - hy
        along, across = ch * du + sh * dv, -sh * du + ch * dv
        fat = (along / (rx + fu)) ** 2 + (across / (ry + fv)) ** 2 < 1.0 - dz2
        hu[fat] = a.hu_fat
        heart = (along / rx) ** 2 + (across / ry) ** 2 < 1.0 - ((zc - hz) / rz) ** 2
        return heart, fat

    def _lungs(
        self,
        zc: float,
        bu: float,
        bv: float,
        vc: float,
        fat_rim: np.ndarray,
        hu: np.ndarray,
        lab: np.ndarray,
    ) -> np.ndarray:
        """Textured lungs, kept out of the mediastinum, the heart's fat rim and the spine.

        Returns the rib cage's inner mask (what the lungs may fill).
        """
        a = self.a
        ribcage = self._ribcage(bu, bv)
        keep_out = fat_rim | self._round_spine(vc)
        keep_out |= (np.abs(self.u) < 12.0) & (self.v < vc)
        t = np.float32(2 * np.pi * zc / 40.0)
        tex = np.cos(t) * self.texture[0] + np.sin(t) * self.texture[1]
        for side, label in ((1, LUNG_L), (-1, LUNG_R)):
            lung = self._lung(zc, side, bu, bv) & ribcage & ~keep_out
            hu[lung] = a.hu_lung + 35.0 * tex[lung] + 500.0 * np.clip(tex[lung] - 1.6, 0.0, None)
            lab[lung] = label
        return ribcage

    def _chest_wall(
        self,
        zc: float,
        bu: float,
        bv: float,
        ribcage: np.ndarray,
        inner: np.ndarray,
        hu: np.ndarray,
    ) -> None:
        """Ribs every rib_period mm along the lungs' height; the sternum in front of the heart."""
        a = self.a
        if -max(a.lung_base) - 40.0 < zc < max(a.lung_apex) and (zc - a.rib_phase) % a.rib_period < 9.0:
            rib_r2 = self._ellipse(0.0, 0.0, bu - a.fat_mm - 5.0, bv - a.fat_mm - 5.0)
            ribs = (rib_r2 < 1.0) & ~ribcage & inner & (np.abs(self.u) > 25.0)
            hu[ribs] = a.hu_bone * 0.9
        sternum = (np.abs(self.u) < 15.0) & (self.v < -bv + a.fat_mm + 14.0) & (self.v > -bv + a.fat_mm + 2.0)
        hu[sternum & (zc > a.heart_centre[2] - a.heart_radii[2]) & (zc < max(a.lung_apex) - 20.0)] = a.hu_bone * 0.7


def make_phantom(
    seed: int, *, slices: int = 200, size: int = 512, pixel_mm: float = 0.98, slice_mm: float = 2.5
) -> Phantom:
    """Draw a thorax phantom; the anatomy varies with ``seed`` and is the same in mm at any grid.

    The image is centred on the isocentre (x = y = 0) and the thorax on the volume's middle
    slice (within a few cm). A field of view narrower than the body shrinks the whole in-plane
    anatomy to fit, so very small test volumes stay valid but have a thinner spinal cord.
    """
    if slices < 1 or size < 8 or pixel_mm <= 0 or slice_mm <= 0:
        raise ValueError(f"phantom grid {slices}x{size}x{size} at {pixel_mm}/{slice_mm} mm is empty")
    anatomy = _draw_anatomy(seed, size * pixel_mm / 2.0)
    rng = np.random.default_rng([seed, 0x0015E])
    drawer = _SliceDrawer(anatomy, size, pixel_mm, _lung_texture(rng, size, pixel_mm))
    hu = np.empty((slices, size, size), dtype=np.int16)
    labels = np.empty((slices, size, size), dtype=np.uint8)
    scratch = np.empty((size, size), dtype=np.float32)
    for k in range(slices):
        zc = (k - (slices - 1) / 2.0) * slice_mm - anatomy.carina_z
        drawer.draw(zc, rng, scratch, labels[k])
        np.clip(scratch, _HU_MIN, _HU_MAX, out=scratch)
        np.rint(scratch, out=hu[k], casting="unsafe")
    half = (size - 1) / 2.0 * pixel_mm
    z0 = float(np.random.default_rng([seed, 0x7AB1E]).uniform(-300.0, -100.0))
    return Phantom(hu=hu, labels=labels, pixel_mm=pixel_mm, slice_mm=slice_mm, origin=(-half, -half, z0))


def _uid(seed: int, *parts: object) -> UID:
    """A UID that depends only on the seed and the object it names, so series are reproducible."""
    return generate_uid(entropy_srcs=[_UID_NAMESPACE, str(seed), *map(str, parts)])


def _series_dataset(phantom: Phantom, seed: int, patient_name: str, patient_id: str) -> Dataset:
    """The header every slice shares: patient, study, series, frame of reference, equipment."""
    when = datetime.datetime(2026, 1, 1, 8, 0, 0) + datetime.timedelta(minutes=seed % 100_000)
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    ds.PatientName, ds.PatientID = patient_name, patient_id
    ds.PatientBirthDate, ds.PatientSex = "19600101", "O"
    ds.StudyInstanceUID = _uid(seed, "study")
    ds.StudyDate, ds.StudyTime = date, time
    ds.ReferringPhysicianName, ds.StudyID, ds.AccessionNumber = "", "1", ""
    ds.StudyDescription = "Radiotherapy planning"
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "CT", _uid(seed, "series"), 1
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.SeriesDescription, ds.BodyPartExamined, ds.PatientPosition = (
        "Thorax planning CT",
        "CHEST",
        "HFS",
    )
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = _uid(seed, "frame"), ""
    ds.Manufacturer, ds.ManufacturerModelName = "ie_gateway", "synthetic thorax phantom"
    ds.SoftwareVersions, ds.StationName = "1", "PHANTOM"
    ds.ContentDate, ds.ContentTime = date, time
    ds.AcquisitionDate, ds.AcquisitionTime, ds.AcquisitionNumber = date, time, 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.KVP, ds.XRayTubeCurrent, ds.ExposureTime, ds.ConvolutionKernel = 120, 250, 1000, "STANDARD"
    ds.DataCollectionDiameter = ds.ReconstructionDiameter = round(phantom.hu.shape[2] * phantom.pixel_mm, 2)
    ds.PixelSpacing = [phantom.pixel_mm, phantom.pixel_mm]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SliceThickness = phantom.slice_mm
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = phantom.hu.shape[1], phantom.hu.shape[2]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
    ds.WindowCenter, ds.WindowWidth = 40, 400
    return ds


def write_ct_series(
    phantom: Phantom,
    folder: Path,
    *,
    seed: int = 0,
    transfer_syntax: str = ExplicitVRLittleEndian,
    patient_name: str = "PHANTOM^THORAX",
    patient_id: str = "PH0001",
    extra: dict[str, object] | None = None,
) -> list[Path]:
    """Write one CT Image Storage file per slice into ``folder``; return the paths in slice order.

    UIDs derive from ``seed`` only, so the same seed names the same study, series and instances
    (write different phantoms with different seeds). ``extra`` sets or overrides header keywords
    on every slice. Only uncompressed transfer syntaxes are written; compress with dcmtk.
    """
    syntax = UID(transfer_syntax)
    if syntax not in _UNCOMPRESSED:
        raise ValueError(f"transfer syntax {syntax} is not one of {[str(s) for s in _UNCOMPRESSED]}")
    folder.mkdir(parents=True, exist_ok=True)
    shared = _series_dataset(phantom, seed, patient_name, patient_id)
    x0, y0, z0 = phantom.origin
    paths: list[Path] = []
    for k in range(phantom.hu.shape[0]):
        ds = Dataset()
        ds.update(shared)
        ds.SOPInstanceUID = _uid(seed, "instance", k)
        ds.InstanceNumber = k + 1
        z = round(z0 + k * phantom.slice_mm, 4)
        ds.ImagePositionPatient = [round(x0, 4), round(y0, 4), z]
        ds.SliceLocation = z
        ds.PixelData = (phantom.hu[k].astype(np.int32) - _HU_MIN).astype("<u2").tobytes()
        for keyword, value in (extra or {}).items():
            setattr(ds, keyword, value)
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = syntax
        path = folder / f"CT{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


__all__ = ["STRUCTURES", "Phantom", "make_phantom", "write_ct_series"]
