"""The job page's slice viewer: the CT with the AI's outlines (and the clinician's approved ones,
when a set is linked), one server-rendered PNG per slice.

The page asks for ``/jobs/N/slice/{axial|coronal|sagittal}/{index}.png?window=soft&hide=A,B``;
a few lines of plain JavaScript on the page change the URL on a key press or a wheel turn. The
volumes come from the job's folder, as the worker left them (``ct.mha`` and the first route's
label map), and stay in memory for the last few jobs looked at, so a slice costs only its
drawing. No patient data is drawn: pixels and the model's structure names only.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
import structlog

from ie_gateway.config import GatewayConfig
from ie_gateway.errors import GatewayError
from ie_gateway.imaging import StructureInfo, rasterize_roi, structures_of
from ie_gateway.infer.registry import Registry
from ie_gateway.pictures import render_slice_png
from ie_gateway.plan import CT_FILE, labels_file
from ie_gateway.qa.agreement import match_structures
from ie_gateway.qa.approvals import approved_files
from ie_gateway.roinames import site_aliases
from ie_gateway.store import Job, Store

log = structlog.get_logger(__name__)

#: Window presets (low, high HU) the viewer offers.
WINDOWS: dict[str, tuple[float, float]] = {
    "soft": (-160.0, 240.0),  # level 40, width 400
    "lung": (-1350.0, 150.0),  # level -600, width 1500
    "bone": (-500.0, 1300.0),  # level 400, width 1800
}
PLANES = ("axial", "coronal", "sagittal")
_CACHED_JOBS = 2


@dataclass(frozen=True)
class Volumes:
    """What the viewer draws for one job: (z, y, x) arrays, z towards the head."""

    hu: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float, float]  # x, y, z mm
    structures: list[StructureInfo]
    approved: dict[str, np.ndarray]  # structure name → the clinician's approved mask

    def sizes(self) -> dict[str, int]:
        nz, ny, nx = self.labels.shape
        return {"axial": nz, "coronal": ny, "sagittal": nx}

    def render(self, plane: str, index: int, window: str, hidden: set[str], approved: bool) -> bytes:
        """The PNG of one slice; ValueError for a plane, index or window that does not exist."""
        if plane not in PLANES or window not in WINDOWS or not 0 <= index < self.sizes()[plane]:
            raise ValueError(f"no {plane} slice {index} in window {window}")
        sx, sy, sz = self.spacing
        nz, ny, nx = self.labels.shape
        if plane == "axial":
            cut: tuple[int | slice, ...] = (index, slice(None), slice(None))
            extent = (nx * sx, ny * sy)
        elif plane == "coronal":
            cut = (slice(None, None, -1), index, slice(None))
            extent = (nx * sx, nz * sz)
        else:
            cut = (slice(None, None, -1), slice(None), index)
            extent = (ny * sy, nz * sz)
        shown = [s for s in self.structures if s.name not in hidden]
        outlines = [(s, self.approved[s.name][cut]) for s in shown if approved and s.name in self.approved]
        return render_slice_png(self.hu[cut], self.labels[cut], extent, shown, WINDOWS[window], outlines)


class SliceViewer:
    """Loads a job's volumes once and keeps the last few jobs' in memory."""

    def __init__(self, cfg: GatewayConfig, store: Store, registry: Registry) -> None:
        self.cfg = cfg
        self.store = store
        self.registry = registry
        self._cache: OrderedDict[tuple[int, float], Volumes] = OrderedDict()
        self._lock = threading.Lock()

    def available(self, job: Job) -> bool:
        """Whether the job's CT and label map are still in its folder."""
        folder = self.store.results / f"job-{job.id}"
        return bool(job.routes) and (folder / CT_FILE).is_file() and (folder / labels_file(0)).is_file()

    def volumes(self, job: Job) -> Volumes:
        """The job's volumes, from memory when they were loaded since they last changed."""
        folder = self.store.results / f"job-{job.id}"
        key = (job.id, (folder / labels_file(0)).stat().st_mtime)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        loaded = self._load(job, folder)
        with self._lock:
            self._cache[key] = loaded
            while len(self._cache) > _CACHED_JOBS:
                self._cache.popitem(last=False)
        return loaded

    def _load(self, job: Job, folder: Path) -> Volumes:
        ct = sitk.ReadImage(str(folder / CT_FILE))
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / labels_file(0)))).astype(np.uint8)
        structures = structures_of(self.registry.resolve(job.routes[0].spec).manifest)
        sx, sy, sz = (float(s) for s in ct.GetSpacing())
        return Volumes(
            sitk.GetArrayFromImage(ct), labels, (sx, sy, sz), structures, self._approved(job, structures, labels.shape)
        )

    def _approved(self, job: Job, structures: list[StructureInfo], shape: tuple[int, ...]) -> dict[str, np.ndarray]:
        """The latest approved set's masks of the model's structures (none when no set is linked)."""
        files = approved_files(self.store, job)
        if not files or not job.detail.slice_files:
            return {}
        try:
            ds = pydicom.dcmread(files[-1])
            geometry = self.store.geometry(job)
        except (OSError, pydicom.errors.InvalidDicomError, GatewayError) as exc:
            log.warning("approved outlines not shown", job=job.id, error=type(exc).__name__)
            return {}
        rois = {int(r.ROINumber): str(r.ROIName) for r in ds.get("StructureSetROISequence", [])}
        contours = {int(c.ReferencedROINumber): c for c in ds.get("ROIContourSequence", [])}
        aliases = site_aliases(self.cfg.destinations, list(job.routes[0].send_to))
        matched = match_structures([s.name for s in structures], rois, aliases)
        grid = (shape[0], shape[1], shape[2])
        return {name: rasterize_roi(contours[n], geometry, grid) for name, n in matched.items() if n in contours}
