"""The manifest of an uploaded case: what a reader of the training data needs, no identifiers.

It lists the node's AI outputs with the model version that made each, and of the clinicians'
approved structure sets only the ROIs named as the model names them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom

from ie_gateway.qa.approvals import APPROVED
from ie_gateway.store import Job, Store
from ie_gateway.sync import anonymise, blob

MANIFEST_SCHEMA = 1


@dataclass(frozen=True)
class AIOutput:
    """One result file of a ``sync: true`` route and the model version that made it."""

    path: Path
    kind: str
    model: str
    version: str


def ai_outputs(store: Store, job: Job) -> list[AIOutput]:
    """The result files of the job's ``sync: true`` routes: those its output plan wrote."""
    folder = store.job_dir(job.id)
    return [
        AIOutput(
            folder / output.file, str(output.kind), job.routes[output.route].model, job.routes[output.route].version
        )
        for output in job.detail.plan.outputs
        if job.routes[output.route].sync
    ]


def case_manifest(
    case_id: str, outputs: list[AIOutput], sources: dict[str, list[Path]], anonymised: dict[str, list[Path]]
) -> dict[str, Any]:
    """What a reader of the case needs, without identifiers and without timestamps (a re-run
    must produce the same bytes, or the upload would see a changed manifest).

    Structure names come from the node's outputs (the model's names); ROI names in the
    anonymised files are emptied by the profile. Of a clinician's set only the ROIs named as
    the model names them are listed (their number and name); other, free-text ROI names are
    only counted, as they may carry anything.
    """
    first = pydicom.dcmread(anonymised["ct"][0], stop_before_pixels=True)
    ai = [_ai_entry(output, dst) for output, dst in zip(outputs, anonymised.get("ai", []), strict=True)]
    known = {s["name"].lower() for entry in ai for s in entry["structures"]}
    approved = [
        _approved_entry(src, dst, known)
        for src, dst in zip(sources["approved"], anonymised.get("approved", []), strict=True)
    ]
    return {
        "schema": MANIFEST_SCHEMA,
        "case": case_id,
        "patient": str(first.PatientID),
        "study": str(first.StudyInstanceUID),
        "deidentification": anonymise.DEIDENTIFICATION_METHOD,
        "models": _unique_dicts({"name": o.model, "version": o.version} for o in outputs),
        "counts": {kind: len(anonymised.get(kind, [])) for kind in blob.CASE_KINDS},
        "ai": ai,
        "approved": approved,
    }


def _ai_entry(output: AIOutput, dst: Path) -> dict[str, Any]:
    return {
        "file": dst.name,
        "kind": output.kind,
        "model": output.model,
        "version": output.version,
        "structures": _structures(output.path),
    }


def _approved_entry(src: Path, dst: Path, known: set[str]) -> dict[str, Any]:
    structures = _structures(src)
    named = [s for s in structures if s["name"].lower() in known]
    return {"file": dst.name, "approval": APPROVED, "structures": named, "other_rois": len(structures) - len(named)}


def _structures(path: Path) -> list[dict[str, Any]]:
    """(number, name) of each ROI of an RT-STRUCT or segment of a SEG, from the original file."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    if "StructureSetROISequence" in ds:
        return [{"number": int(r.ROINumber), "name": str(r.ROIName)} for r in ds.StructureSetROISequence]
    return [{"number": int(s.SegmentNumber), "name": str(s.SegmentLabel)} for s in ds.get("SegmentSequence", [])]


def _unique_dicts(items: Iterable[dict[str, str]]) -> list[dict[str, str]]:
    return [dict(t) for t in dict.fromkeys(tuple(sorted(i.items())) for i in items)]
