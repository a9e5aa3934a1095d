"""Agreement between what the model drew and what a clinician approved, per structure.

When a clinician's approved RT Structure Set comes back linked to a CT job the node contoured
(``approvals.link_approved``), every structure of every model that contoured the case is
compared with the approved ROI of the same name, on the CT's own grid in mm:

- ``dice``           volumetric Dice
- ``hd95_mm``        95th-percentile Hausdorff distance (the larger of the two directed ones)
- ``msd_mm``         mean surface distance, over the boundary voxels of both structures
- ``surface_dice``   the share of both surfaces within ``tolerance_mm`` of the other (Nikolov et
                     al. 2021, with sub-voxel surface elements)
- ``volume_diff_pct`` (approved − AI) / AI volume × 100; ``volume_ai_cc``/``volume_approved_cc``

The metrics are MONAI's (``monai.metrics``), not our own. The figures are stored in the index
table ``agreement`` under the CT job, model and version; a later approval of the same case
replaces the earlier one's figures, so each case counts once.

The AI side is the RT-STRUCT the node delivered (what the clinician edited), rasterised with the
same code as the clinician's; a route that sent only SEG uses its label map.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk
import structlog
from pydicom.dataset import Dataset
from scipy import ndimage

from ie_gateway.errors import AgreementError, AssessTimedOut
from ie_gateway.imaging import SliceGeometry, StructureInfo, rasterize_roi, structure_mask
from ie_gateway.infer.modelref import parse_model_ref
from ie_gateway.store import Index, Job
from ie_gateway.store.records import AgreementRow

log = structlog.get_logger(__name__)

#: The figures of one structure, in the order the CLI and the page show them.
FIGURES: tuple[str, ...] = ("dice", "hd95_mm", "msd_mm", "surface_dice", "volume_diff_pct")

#: Approved ROI names a model structure may match, beside its own name (a site's own spelling,
#: e.g. ``{"Lung_L": ["LUNG LT"]}``); compared case-insensitively.
Aliases = Mapping[str, Iterable[str]]


@dataclass(frozen=True)
class StructureFigures:
    """Agreement of one structure of one model version with the approved contour."""

    structure: str
    dice: float
    hd95_mm: float | None  # None when either contour is empty
    msd_mm: float | None
    surface_dice: float
    volume_ai_cc: float
    volume_approved_cc: float

    @property
    def volume_diff_pct(self) -> float | None:
        if self.volume_ai_cc == 0:
            return None
        return 100.0 * (self.volume_approved_cc - self.volume_ai_cc) / self.volume_ai_cc


def measure(
    ai: np.ndarray, approved: np.ndarray, spacing_zyx: Sequence[float], structure: str = "", tolerance_mm: float = 2.0
) -> StructureFigures:
    """Figures of two boolean (z, y, x) masks on one grid of ``spacing_zyx`` mm."""
    import torch
    from monai.metrics.hausdorff_distance import compute_hausdorff_distance
    from monai.metrics.meandice import compute_dice
    from monai.metrics.surface_dice import compute_surface_dice
    from monai.metrics.surface_distance import compute_average_surface_distance

    if ai.shape != approved.shape:
        raise AgreementError(f"{structure}: masks of shape {ai.shape} and {approved.shape} are not on one grid")
    voxel_cc = float(np.prod(spacing_zyx)) / 1000.0
    volumes = float(ai.sum()) * voxel_cc, float(approved.sum()) * voxel_cc
    if not ai.any() or not approved.any():
        both_empty = not ai.any() and not approved.any()
        return StructureFigures(structure, 1.0 if both_empty else 0.0, None, None, 1.0 if both_empty else 0.0, *volumes)
    # Both masks' bounding box plus one voxel of background: every surface lies inside it, so the
    # figures are the same as on the whole grid, at a fraction of the voxels
    box = ndimage.find_objects((ai | approved).astype(np.uint8))[0]
    crop = tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(box, ai.shape, strict=True))
    y_pred = torch.from_numpy(np.ascontiguousarray(ai[crop])[None, None]).float()
    y = torch.from_numpy(np.ascontiguousarray(approved[crop])[None, None]).float()
    spacing = [float(s) for s in spacing_zyx]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns about deprecated defaults of its own
        dice = compute_dice(y_pred, y, include_background=True).item()
        hd95 = compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95, spacing=spacing).item()
        msd = compute_average_surface_distance(
            y_pred, y, include_background=True, symmetric=True, spacing=spacing
        ).item()
        nsd = compute_surface_dice(
            y_pred, y, class_thresholds=[tolerance_mm], include_background=True, spacing=spacing, use_subvoxels=True
        ).item()
    return StructureFigures(structure, float(dice), float(hd95), float(msd), float(nsd), *volumes)


def match_structures(
    model_names: Iterable[str], approved: Mapping[int, str], aliases: Aliases | None = None
) -> dict[str, int]:
    """Model structure name → ROI Number of the approved set, matched by name or alias,
    ignoring case and surrounding blanks. A structure with no approved ROI is left out; when
    several ROIs carry the name, the first (lowest number) wins."""
    by_name: dict[str, int] = {}
    for number in sorted(approved):
        by_name.setdefault(approved[number].strip().casefold(), number)
    matched = {}
    for name in model_names:
        for candidate in (name, *(aliases or {}).get(name, ())):
            found = by_name.get(candidate.strip().casefold())
            if found is not None:
                matched[name] = found
                break
    return matched


@dataclass(frozen=True)
class ModelContours:
    """One route's contours of the CT job: the model version and where its masks are."""

    model: str
    version: str
    structures: list[StructureInfo]
    rtstruct: Path | None  # the delivered RT-STRUCT, when the route wrote one
    labels: Path  # the label map on the CT grid


@dataclass(frozen=True)
class Bounds:
    """The most an approved set may hold for its figures to be computed: rasterising is paid per
    contour and per point, and a peer decides how many there are. ``timeout_s`` bounds the whole
    comparison, checked before each structure, so no set holds the worker longer than that and
    one structure (itself bounded by the counts)."""

    max_contours: int = 20000
    max_points: int = 5_000_000
    timeout_s: float | None = None


def check_bounds(approved: Dataset, bounds: Bounds) -> None:
    """AgreementError when the set holds more contours or points than ``bounds`` (counted from
    Number of Contour Points, before any ContourData is parsed)."""
    counts = [
        int(contour.get("NumberOfContourPoints") or 0)
        for roi in approved.get("ROIContourSequence", [])
        for contour in roi.get("ContourSequence", [])
    ]
    if len(counts) > bounds.max_contours:
        raise AgreementError(
            f"the approved set has {len(counts)} contours, more than agreement.max_contours ({bounds.max_contours})"
        )
    if sum(counts) > bounds.max_points:
        raise AgreementError(
            f"the approved set has {sum(counts)} contour points, more than agreement.max_points ({bounds.max_points})"
        )


def assess(
    approved: Dataset,
    geometry: SliceGeometry,
    contours: Sequence[ModelContours],
    tolerance_mm: float = 2.0,
    aliases: Aliases | None = None,
    bounds: Bounds = Bounds(),
) -> dict[tuple[str, str], list[StructureFigures]]:
    """Figures per (model, version) for every model structure the approved set contains.

    ``geometry`` is the contoured CT's, in volume order (the label maps' z order).
    """
    started = time.monotonic()
    check_bounds(approved, bounds)
    shape = geometry.shape
    spacing = (_slice_spacing(geometry), geometry.row_spacing, geometry.col_spacing)
    rois = {int(item.ROINumber): str(item.get("ROIName", "")) for item in approved.get("StructureSetROISequence", [])}
    approved_contours = {int(item.ReferencedROINumber): item for item in approved.get("ROIContourSequence", [])}
    out: dict[tuple[str, str], list[StructureFigures]] = {}
    for route in contours:
        matched = match_structures([s.name for s in route.structures], rois, aliases)
        missing = sorted({s.name for s in route.structures} - set(matched))
        if missing:
            log.info("structures not in the approved set", model=route.model, version=route.version, structures=missing)
        ai_masks = _ai_masks(route, geometry, shape)
        figures = []
        for s in route.structures:
            if s.name not in matched:
                continue
            _check_time(started, bounds, s.name)
            roi = approved_contours.get(matched[s.name])
            mask = rasterize_roi(roi, geometry, shape) if roi is not None else np.zeros(shape, dtype=bool)
            figures.append(measure(ai_masks(s), mask, spacing, s.name, tolerance_mm))
        out[(route.model, route.version)] = figures
    return out


def _check_time(started: float, bounds: Bounds, next_structure: str) -> None:
    if bounds.timeout_s is not None and time.monotonic() - started >= bounds.timeout_s:
        raise AssessTimedOut(
            f"comparing the approved set ran past agreement.timeout_s ({bounds.timeout_s:g} s) "
            f"before {next_structure}: no figures for this set"
        )


def _slice_spacing(geometry: SliceGeometry) -> float:
    if len(geometry.positions) < 2:
        raise AgreementError("a CT of one slice has no slice spacing")
    normal = np.cross(geometry.row_dir, geometry.col_dir)
    return float(np.abs(np.diff(geometry.positions @ normal)).mean())


def _ai_masks(
    route: ModelContours, geometry: SliceGeometry, shape: tuple[int, int, int]
) -> Callable[[StructureInfo], np.ndarray]:
    """The AI's mask of a structure: its delivered contour if there is one, else the label map."""
    if route.rtstruct is not None and route.rtstruct.is_file():
        ds = pydicom.dcmread(route.rtstruct)
        items = {int(item.ReferencedROINumber): item for item in ds.ROIContourSequence}
        empty = np.zeros(shape, dtype=bool)  # a structure the file left out (empty, or not sent under its names)
        return lambda s: rasterize_roi(items[s.label], geometry, shape) if s.label in items else empty
    if not route.labels.is_file():
        raise AgreementError(f"{route.model}@{route.version}: neither RT-STRUCT nor label map is left (purged?)")
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(route.labels)))
    if labels.shape != shape:
        raise AgreementError(f"label map {labels.shape} is not on the CT grid {shape}")
    return lambda s: structure_mask(labels, s)


# --- the index table --------------------------------------------------------------------------


def record(
    index: Index,
    ct_job: int,
    approval_job: int,
    figures: Mapping[tuple[str, str], Sequence[StructureFigures]],
    tolerance_mm: float,
    at: float | None = None,
) -> int:
    """Store a case's figures, replacing those of an earlier approval of the same case.

    Returns the number of rows written.
    """
    now = at if at is not None else time.time()
    rows = [
        AgreementRow(
            ct_job=ct_job,
            approval_job=approval_job,
            model=model,
            model_version=version,
            structure=f.structure,
            at=now,
            tolerance_mm=tolerance_mm,
            dice=f.dice,
            hd95_mm=f.hd95_mm,
            msd_mm=f.msd_mm,
            surface_dice=f.surface_dice,
            volume_ai_cc=f.volume_ai_cc,
            volume_approved_cc=f.volume_approved_cc,
            volume_diff_pct=f.volume_diff_pct,
        )
        for (model, version), items in figures.items()
        for f in items
    ]
    index.replace_agreement(ct_job, rows)
    return len(rows)


def rows(
    index: Index,
    model: str | None = None,
    structure: str | None = None,
    since: float | None = None,
    ct_job: int | None = None,
) -> list[dict[str, Any]]:
    """Stored figures as JSON-ready rows, oldest first; ``structure`` compares case-insensitively."""
    name, version = parse_model_ref(model) if model is not None else (None, None)
    found = index.agreement(model=name, version=version or None, structure=structure, since=since, ct_job=ct_job)
    return [row.as_dict() for row in found]


@dataclass(frozen=True)
class Spread:
    """n, median and interquartile range of one figure."""

    n: int
    median: float | None
    q1: float | None
    q3: float | None


def spread(values: Iterable[float | None]) -> Spread:
    present = [v for v in values if v is not None]
    if not present:
        return Spread(0, None, None, None)
    q1, median, q3 = (float(v) for v in np.percentile(present, [25, 50, 75]))
    return Spread(len(present), median, q1, q3)


def summary(figure_rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per model version and structure: cases, then n/median/IQR of each figure."""
    groups: dict[tuple[str, str, str], list[Mapping[str, Any]]] = {}
    for row in figure_rows:
        groups.setdefault((row["model"], row["model_version"], row["structure"]), []).append(row)
    out = []
    for (model, version, structure), items in sorted(groups.items()):
        out.append(
            {
                "model": model,
                "version": version,
                "structure": structure,
                "cases": len(items),
                **{f: asdict(spread(r[f] for r in items)) for f in FIGURES},
            }
        )
    return out


# --- the worker's step ------------------------------------------------------------------------


def assess_approval(
    index: Index,
    ct_job: Job,
    geometry: SliceGeometry,
    approval_job_id: int,
    approved: Dataset,
    contours: Sequence[ModelContours],
    tolerance_mm: float,
    aliases: Aliases | None = None,
    bounds: Bounds = Bounds(),
) -> int:
    """Compute and store the figures of an approved set linked to ``ct_job`` (whose CT lies on
    ``geometry``); rows written."""
    started = time.monotonic()
    figures = assess(approved, geometry, contours, tolerance_mm, aliases, bounds)
    written = record(index, ct_job.id, approval_job_id, figures, tolerance_mm)
    for (model, version), items in figures.items():
        log.info(
            "agreement",
            ct_job=ct_job.id,
            approval_job=approval_job_id,
            model=model,
            version=version,
            dice={f.structure: round(f.dice, 4) for f in items},
            hd95_mm={f.structure: None if f.hd95_mm is None else round(f.hd95_mm, 2) for f in items},
        )
    log.info("agreement stored", ct_job=ct_job.id, rows=written, seconds=round(time.monotonic() - started, 2))
    return written
