"""The plausibility gate: does a result look like the anatomy its model promises?

A model's ``model.yaml`` may say, per structure, what a sane result looks like (``expect:``,
see :class:`~ie_gateway.infer.manifest.Expect`). Each result is measured on the masks exactly
as they will be written (holes filled where the structure asks, so the External includes
what lies inside it) and every expectation it misses becomes a reason an admin can read, such
as ``Heart: 12 % inside External (expected >= 95 %)``. What happens then is the route's choice
(`review: hold | flag`, see the pipeline).

Sides are the patient's: in DICOM's LPS coordinates +x points to the patient's left, so the
check holds for prone, supine, head- or feet-first scans alike. The midline is the centre of
the EXTERNAL structure when the model has one, else the centre of the image.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from ie_gateway.imaging import SliceGeometry, bounding_box, in_parallel
from ie_gateway.infer.manifest import Structure
from ie_gateway.vocab import InterpretedType, Side

#: Share of a structure's volume that must lie inside the structure named by ``expect.inside``.
INSIDE_SHARE = 0.95


@dataclass(frozen=True)
class Findings:
    """What the gate measured: volumes as contoured, empty structures, failed expectations."""

    volumes_cc: dict[str, float]
    empty: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)


def _centre_x(mask: np.ndarray, geometry: SliceGeometry) -> float:
    """Patient x (LPS mm) of the mask's centre of mass."""
    box = bounding_box(mask)
    if box is None:
        return 0.0
    crop = mask[box]
    total = float(np.count_nonzero(crop))
    k, r, c = (
        float(
            (
                np.count_nonzero(crop, axis=tuple(a for a in range(3) if a != axis))
                * np.arange(box[axis].start, box[axis].stop)
            ).sum()
        )
        / total
        for axis in range(3)
    )
    lo = int(np.floor(k))
    hi = min(lo + 1, mask.shape[0] - 1)
    point = np.array([[r, c]])
    x_lo = float(geometry.to_patient(lo, point)[0, 0])
    x_hi = float(geometry.to_patient(hi, point)[0, 0])
    return x_lo + (k - lo) * (x_hi - x_lo)


def _largest_share(mask: np.ndarray) -> float:
    box = bounding_box(mask)
    if box is None:
        return 0.0
    labelled, count = ndimage.label(mask[box])
    if count <= 1:
        return 1.0
    sizes = np.bincount(labelled.ravel())[1:]
    return float(sizes.max()) / float(sizes.sum())


def check_result(structures: Sequence[Structure], masks: Mapping[int, np.ndarray], geometry: SliceGeometry) -> Findings:
    """Measure every structure's mask (label → (z, y, x) bool) and test its expectations."""
    slices = len(geometry.positions)
    normal = np.cross(geometry.row_dir, geometry.col_dir)
    depths = np.sort(geometry.positions @ normal)
    slice_mm = float(np.median(np.diff(depths))) if slices > 1 else 1.0
    voxel_cc = geometry.row_spacing * geometry.col_spacing * slice_mm / 1000.0
    scan_cm = slices * slice_mm / 10.0
    by_name = {s.name: s for s in structures}
    voxels = in_parallel(lambda s: int(np.count_nonzero(masks[s.label])), structures)
    counts = {s.name: n for s, n in zip(structures, voxels, strict=True)}
    volumes = {name: round(n * voxel_cc, 1) for name, n in counts.items()}
    empty = [name for name, n in counts.items() if n == 0]
    external = next((s for s in structures if s.interpreted_type is InterpretedType.EXTERNAL and counts[s.name]), None)
    midline = (
        _centre_x(masks[external.label], geometry)
        if external is not None
        else float(
            geometry.to_patient(slices // 2, np.array([[0.0, (masks[structures[0].label].shape[2] - 1) / 2]]))[0, 0]
        )
    )

    def unmet(s: Structure) -> list[str]:
        """The reasons ``s`` misses its expectations, if any."""
        reasons: list[str] = []
        expect = s.expect
        if expect is None:
            return reasons
        if counts[s.name] == 0:
            reasons.append(f"{s.name}: empty")
            return reasons
        mask = masks[s.label]
        volume = counts[s.name] * voxel_cc
        if expect.volume_cc is not None and volume not in expect.volume_cc:
            reasons.append(f"{s.name}: volume {volume:.0f} cc (expected {expect.volume_cc} cc)")
        if expect.volume_cc_per_cm is not None and volume / scan_cm not in expect.volume_cc_per_cm:
            reasons.append(f"{s.name}: {volume / scan_cm:.2f} cc per cm of scan (expected {expect.volume_cc_per_cm})")
        if expect.side is not None:
            offset = _centre_x(mask, geometry) - midline  # + is the patient's left
            side = Side.LEFT if offset > 0 else Side.RIGHT
            if side is not expect.side:
                reasons.append(f"{s.name}: centre {abs(offset):.0f} mm {side} of the midline (expected {expect.side})")
        if expect.inside is not None:
            box = bounding_box(mask)
            host = masks[by_name[expect.inside].label]
            share = float(np.count_nonzero(mask[box] & host[box])) / counts[s.name]
            if share < INSIDE_SHARE:
                reasons.append(f"{s.name}: {share:.0%} inside {expect.inside} (expected >= {INSIDE_SHARE:.0%})")
        if expect.largest_component is not None:
            share = _largest_share(mask)
            if share not in expect.largest_component:
                reasons.append(f"{s.name}: largest piece holds {share:.0%} of it (expected {expect.largest_component})")
        if expect.slices_covered is not None:
            covered = int(np.count_nonzero(mask.any(axis=(1, 2)))) / slices
            if covered not in expect.slices_covered:
                reasons.append(f"{s.name}: on {covered:.0%} of the slices (expected {expect.slices_covered})")
        return reasons

    # one structure per thread: the whole-mask passes release the GIL
    reasons = [reason for found in in_parallel(unmet, structures) for reason in found]
    return Findings(volumes_cc=volumes, empty=empty, reasons=reasons)
