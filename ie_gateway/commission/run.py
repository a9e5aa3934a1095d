"""A commissioning run: every case through the node's own path, then its agreement figures.

Per case: the CT series becomes a checked volume (``volume.load_volume`` with the node's
checks), the inference child contours it (``InferenceRunner``, on the GPU when the node's
``inference.device`` finds one), the plausibility gate measures the result, the RT-STRUCT is
built and validated as the worker builds it, and that RT-STRUCT, rasterised, is compared with
the clinician's approved set by ``agreement.assess`` (the same name matching as the QA loop,
under the local names of the node's destinations). A structure the model left empty but the
clinician drew counts with Dice 0.

The run keeps its state in ``REPORT_DIR/progress.json`` after every case, so a run stopped
half-way carries on where it stopped (cases done are skipped; cases that could not be run are
tried again). ``figures.json`` is rewritten with it, so it always holds every finished case.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk
import structlog

from ie_gateway.commission.cases import case_folders, read_case
from ie_gateway.config import GatewayConfig
from ie_gateway.errors import CommissionError, GatewayError
from ie_gateway.imaging import SliceGeometry, make_masks, read_headers, structures_of
from ie_gateway.infer.manifest import Commissioning
from ie_gateway.infer.registry import ModelVersion
from ie_gateway.infer.runner import InferenceRunner
from ie_gateway.qa.agreement import Aliases, ModelContours, assess
from ie_gateway.qa.plausibility import check_result
from ie_gateway.roinames import site_aliases
from ie_gateway.volume import VolumeChecks, load_volume
from ie_gateway.write.common import ModelInfo, new_output_uids
from ie_gateway.write.rtstruct import build_rtstruct
from ie_gateway.write.validate import validate_rtstruct

log = structlog.get_logger(__name__)

PROGRESS_FILE = "progress.json"
FIGURES_FILE = "figures.json"
WORK_DIR = "work"  # per case: label map and RT-STRUCT, kept for the report's pictures
RTSTRUCT_FILE = "rtstruct.dcm"
LABELS_FILE = "labels.mha"

#: A line of progress for the person running the command.
Progress = Callable[[str], None]


@dataclass
class CaseResult:
    """What one case gave: figures per structure, or the reason it could not be run."""

    case: str
    done: bool
    reason: str = ""
    findings: list[str] = field(default_factory=list)  # plausibility gate's reasons
    missing: list[str] = field(default_factory=list)  # model structures the approved set lacks
    figures: list[dict[str, Any]] = field(default_factory=list)
    #: volume, inference, check (masks and plausibility), rtstruct (built and validated),
    #: agreement; node (all but inference) and total
    seconds: dict[str, float] = field(default_factory=dict)


def passes(row: Mapping[str, Any], criteria: Commissioning | None) -> bool | None:
    """Whether one case's figures of a structure meet its criteria; None without criteria."""
    if criteria is None or (criteria.dice_min is None and criteria.hd95_max_mm is None):
        return None
    ok = criteria.dice_min is None or row["dice"] >= criteria.dice_min
    hd95 = row["hd95_mm"]
    return ok and (criteria.hd95_max_mm is None or (hd95 is not None and hd95 <= criteria.hd95_max_mm))


def criteria_of(model: ModelVersion) -> dict[str, Commissioning | None]:
    return {s.name: s.commissioning for s in model.manifest.structures}


def figure_rows(model: ModelVersion, results: Sequence[CaseResult]) -> list[dict[str, Any]]:
    """``figures.json``: one object per case and structure, with its pass against the criteria."""
    criteria = criteria_of(model)
    return [
        {
            "case": r.case,
            "structure": f["structure"],
            **{k: f[k] for k in ("dice", "hd95_mm", "msd_mm", "surface_dice", "volume_diff_pct")},
            "pass": passes(f, criteria.get(f["structure"])),
        }
        for r in results
        if r.done
        for f in r.figures
    ]


class Run:
    """A commissioning run of one model version over a folder of cases into a report folder."""

    def __init__(
        self,
        cfg: GatewayConfig,
        model: ModelVersion,
        runner: InferenceRunner,
        cases_dir: Path,
        out_dir: Path,
        progress: Progress = lambda line: None,
    ) -> None:
        self.cfg = cfg
        self.model = model
        self.runner = runner
        self.cases_dir = cases_dir
        self.out_dir = out_dir
        self.progress = progress
        self.checks = VolumeChecks(
            spacing_tolerance_mm=cfg.volume.spacing_tolerance_mm,
            min_slices=cfg.volume.min_slices,
            max_tilt_deg=cfg.volume.max_tilt_deg,
        )
        # the TPS may send structure sets back under a destination's local names
        self.aliases: Aliases = site_aliases(cfg.destinations, list(cfg.destinations))
        self.results: dict[str, CaseResult] = {}

    def run(self) -> list[CaseResult]:
        """Run every case not done yet; the results of every case, in case order."""
        folders = case_folders(self.cases_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._load_progress()
        for number, folder in enumerate(folders, start=1):
            prefix = f"case {number}/{len(folders)} {folder.name}"
            earlier = self.results.get(folder.name)
            if earlier is not None and earlier.done:
                self.progress(f"{prefix}: done in an earlier run, skipped")
                continue
            result = self.run_case(folder)
            self.results[folder.name] = result
            self._save_progress()
            if result.done:
                dice = ", ".join(f"{f['structure']} {f['dice']:.3f}" for f in result.figures)
                self.progress(f"{prefix}: Dice {dice} ({result.seconds['total']:.1f} s)")
            else:
                self.progress(f"{prefix}: not run: {result.reason}")
        return [self.results[f.name] for f in folders if f.name in self.results]

    def run_case(self, folder: Path) -> CaseResult:
        """One case through volume, inference, plausibility, RT-STRUCT and agreement."""
        started = time.monotonic()
        work = self.out_dir / WORK_DIR / work_name(folder.name)
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            case = read_case(folder)
            volume = load_volume(case.ct_files, self.checks)
            volume_s = time.monotonic() - started
            ct_path = work / "ct.mha"
            sitk.WriteImage(volume.image, str(ct_path), useCompression=False)
            headers = read_headers(volume.paths)
            geometry = volume.geometry
            del volume
            inference_started = time.monotonic()
            self.runner.run(self.model, ct_path, work / LABELS_FILE)
            inference_s = time.monotonic() - inference_started
            ct_path.unlink()  # the report reads the CT again for its few pictures
            findings, missing, figures, phases = self._assess(headers, geometry, case.approved, work)
        except GatewayError as exc:  # this case cannot be run; the report says why, a rerun retries it
            log.warning("commissioning case not run", error=str(exc))
            return CaseResult(folder.name, False, reason=str(exc))
        total = time.monotonic() - started
        seconds = {"volume": volume_s, "inference": inference_s, **phases, "node": total - inference_s, "total": total}
        return CaseResult(
            folder.name,
            True,
            findings=findings,
            missing=missing,
            figures=figures,
            seconds={k: round(v, 3) for k, v in seconds.items()},
        )

    def _assess(
        self, headers: Sequence[pydicom.Dataset], geometry: SliceGeometry, approved_path: Path, work: Path
    ) -> tuple[list[str], list[str], list[dict[str, Any]], dict[str, float]]:
        """Plausibility findings, unmatched structures, figures and the phases' seconds of one
        contoured case."""
        started = time.monotonic()
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(work / LABELS_FILE))).astype(np.uint8)
        structures = structures_of(self.model.manifest)
        masks = make_masks(labels, structures)
        findings = check_result(self.model.manifest.structures, masks, geometry)
        present = [s for s in structures if s.name not in findings.empty]
        info = ModelInfo(name=self.model.name, version=self.model.version, needs_review=bool(findings.reasons))
        rtstruct = work / RTSTRUCT_FILE
        checked = time.monotonic()
        if present:
            uids = new_output_uids()
            ds = build_rtstruct(headers, labels, present, info, uids, masks=masks, geometry=geometry)
            ds.save_as(rtstruct, enforce_file_format=True)
            validate_rtstruct(rtstruct, headers, labels, present, uids, masks=masks, geometry=geometry)
        written = time.monotonic()
        approved = pydicom.dcmread(approved_path)
        spec = (self.model.name, self.model.version)
        tolerance = self.cfg.agreement.tolerance_mm
        # what was delivered as RT-STRUCT, and what the model left empty (its label map: no voxels)
        measured = assess(
            approved, geometry, [ModelContours(*spec, present, rtstruct, work / LABELS_FILE)], tolerance, self.aliases
        )[spec]
        empty = [s for s in structures if s.name in findings.empty]
        if empty:
            measured += assess(
                approved, geometry, [ModelContours(*spec, empty, None, work / LABELS_FILE)], tolerance, self.aliases
            )[spec]
        figures = [{**asdict(f), "volume_diff_pct": f.volume_diff_pct} for f in measured]
        order = {s.name: s.label for s in structures}
        figures.sort(key=lambda f: order[f["structure"]])
        missing = sorted(set(order) - {f["structure"] for f in figures}, key=order.__getitem__)
        phases = {"check": checked - started, "rtstruct": written - checked, "agreement": time.monotonic() - written}
        return list(findings.reasons), missing, figures, phases

    def _load_progress(self) -> None:
        path = self.out_dir / PROGRESS_FILE
        if not path.is_file():
            return
        try:
            saved = json.loads(path.read_text())
            if (saved["model"], saved["version"]) != (self.model.name, self.model.version):
                raise CommissionError(
                    f"{self.out_dir} holds a run of {saved['model']}@{saved['version']}: "
                    f"give {self.model.spec} its own report folder"
                )
            self.results = {name: CaseResult(**r) for name, r in saved["cases"].items()}
        except (ValueError, KeyError, TypeError) as exc:
            raise CommissionError(f"{path} is not a commissioning progress file ({exc}); move it away") from exc

    def _save_progress(self) -> None:
        saved = {
            "model": self.model.name,
            "version": self.model.version,
            "cases": {name: asdict(r) for name, r in self.results.items()},
        }
        _write_json(self.out_dir / PROGRESS_FILE, saved)
        _write_json(self.out_dir / FIGURES_FILE, figure_rows(self.model, list(self.results.values())))


def work_name(case: str) -> str:
    """A case's work folder: its name in safe characters, plus a hash so two never collide."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", case)[:40] or "case"
    return f"{safe}-{hashlib.sha256(case.encode()).hexdigest()[:8]}"


def _write_json(path: Path, value: object) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=1))
    tmp.replace(path)
