"""Clinicians' approved structure sets, linked to the CT series the node contoured.

When a TPS sends back the structure set a clinician reviewed, it references the planning CT
series. ``link_approved`` finds the node's job for that CT and records the link in both jobs'
details, so the next case sync uploads the approved contours beside the AI ones::

    CT job detail:  approved: [{"job": <rt job id>, "approval": "APPROVED", "instances": 1}]
    RT job detail:  linked_to: <ct job id>, approval: "APPROVED"

Structure sets the node wrote itself (their SOP Instance UID is in the outbox) are never linked:
only a clinician's set is ground truth. A revision sent later in the same series arrives as a
new job of that series and is linked on its own, so only the instances whose ApprovalStatus is
APPROVED are uploaded (``approved_files``), never an earlier draft.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pydicom
import structlog
from pydicom.dataset import Dataset
from pydicom.uid import RTStructureSetStorage

from ie_gateway.store import Job, JobState, Store

log = structlog.get_logger(__name__)

APPROVED = "APPROVED"
LINKABLE_STATES = (JobState.SENDING, JobState.DELIVERED)


def link_approved(store: Store, job: Job) -> int | None:
    """Link the RT-STRUCT series of ``job`` to the job of the CT series it references.

    Call it for a complete series whose Modality is RTSTRUCT. Returns the CT job id, or None
    when no file is a clinician's structure set on a CT series the node contoured (the node's
    own output sent back, an unknown CT, a CT not yet sent). Calling it again for the same job
    updates the link instead of adding a second one.
    """
    links: list[tuple[int, str]] = []
    for ds in _clinicians_sets(store, job.id):
        ct_job = _contoured_job(store, _referenced_series(store, ds))
        if ct_job is not None:
            links.append((ct_job, _approval(ds)))
    if not links:
        log.info(
            "structure set not linked",
            job=job.id,
            files=job.instances,
            why="the node's own, or no contoured CT series referenced",
        )
        return None
    ct_job = links[0][0]
    approvals = [approval for linked, approval in links if linked == ct_job]
    approval = APPROVED if APPROVED in approvals else min(approvals)
    _record_link(store, ct_job, job.id, approval, len(approvals))
    log.info("structure set linked", job=job.id, ct_job=ct_job, approval=approval)
    return ct_job


def approved_entries(job: Job) -> list[dict[str, Any]]:
    """The linked structure sets of a CT job that a clinician approved."""
    return [entry for entry in job.detail.get("approved", []) if entry.get("approval") == APPROVED]


def approved_files(store: Store, ct_job: Job) -> list[Path]:
    """The approved clinicians' RT-STRUCT files linked to ``ct_job`` (drafts left out)."""
    return [
        Path(ds.filename)
        for entry in approved_entries(ct_job)
        for ds in _clinicians_sets(store, int(entry["job"]))
        if _approval(ds) == APPROVED
    ]


def approved_sets(store: Store, job_id: int) -> list[Dataset]:
    """The clinician's approved structure sets received in job ``job_id``, in arrival order."""
    return [ds for ds in _clinicians_sets(store, job_id) if _approval(ds) == APPROVED]


def _clinicians_sets(store: Store, job_id: int) -> list[Dataset]:
    """The RT-STRUCTs received in this job (not earlier jobs of the series) that the node did
    not write."""
    rows = store.index.query(
        "SELECT path FROM instances WHERE job_id = ? AND missing = 0 ORDER BY received_at", (job_id,)
    )
    found = [_read_structure_set(store.spool.root / str(r[0])) for r in rows]
    return [ds for ds in found if ds is not None and not _written_by_node(store, str(ds.SOPInstanceUID))]


def _approval(ds: Dataset) -> str:
    return str(ds.get("ApprovalStatus", "")).strip().upper() or "UNKNOWN"


def _read_structure_set(path: Path) -> Dataset | None:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        log.warning("structure set unreadable", file=path.name, error=type(exc).__name__)
        return None
    return ds if ds.get("SOPClassUID") == RTStructureSetStorage else None


def _written_by_node(store: Store, sop_uid: str) -> bool:
    return bool(store.index.query("SELECT 1 FROM outbox WHERE sop_uid = ? LIMIT 1", (sop_uid,)))


def _referenced_series(store: Store, ds: Dataset) -> set[str]:
    """CT series the set is drawn on: its referenced series, else the series of its contour
    images (the RT Referenced Study Sequence is optional in the IOD)."""
    series = {
        str(s.SeriesInstanceUID)
        for frame in ds.get("ReferencedFrameOfReferenceSequence", [])
        for study in frame.get("RTReferencedStudySequence", [])
        for s in study.get("RTReferencedSeriesSequence", [])
        if s.get("SeriesInstanceUID")
    }
    if series:
        return series
    images = {
        str(image.ReferencedSOPInstanceUID)
        for roi in ds.get("ROIContourSequence", [])
        for contour in roi.get("ContourSequence", [])
        for image in contour.get("ContourImageSequence", [])
        if image.get("ReferencedSOPInstanceUID")
    }
    return _series_of_instances(store, images)


def _series_of_instances(store: Store, sop_uids: Iterable[str]) -> set[str]:
    uids = sorted(sop_uids)
    if not uids:
        return set()
    marks = ",".join("?" * len(uids))
    rows = store.index.query(
        "SELECT DISTINCT s.series_uid FROM instances i JOIN series s ON s.id = i.series_id "
        f"WHERE i.sop_uid IN ({marks})",
        tuple(uids),
    )
    return {str(r[0]) for r in rows}


def _contoured_job(store: Store, series_uids: set[str]) -> int | None:
    """The latest job of these series that the node routed and has sent results for, and
    whose files retention has not purged (a purged case cannot be uploaded any more)."""
    if not series_uids:
        return None
    marks = ",".join("?" * len(series_uids))
    states = tuple(s.value for s in LINKABLE_STATES)
    rows = store.index.query(
        "SELECT j.id FROM jobs j JOIN series s ON s.id = j.series_id "
        f"WHERE s.series_uid IN ({marks}) AND j.routes IS NOT NULL "
        "AND json_extract(j.detail, '$.purged') IS NULL "
        f"AND j.state IN ({','.join('?' * len(states))}) ORDER BY j.id DESC LIMIT 1",
        (*sorted(series_uids), *states),
    )
    return int(rows[0][0]) if rows else None


def _record_link(store: Store, ct_job: int, rt_job: int, approval: str, files: int) -> None:
    """Both sides of the link in one transaction; a repeated link replaces the earlier one."""
    entry = {"job": rt_job, "approval": approval, "instances": files}
    with store.index.tx() as db:
        row = db.execute("SELECT detail FROM jobs WHERE id = ?", (ct_job,)).fetchone()
        detail = json.loads(row[0] or "{}")
        others = [e for e in detail.get("approved", []) if e.get("job") != rt_job]
        detail["approved"] = [*others, entry]
        db.execute("UPDATE jobs SET detail = ? WHERE id = ?", (json.dumps(detail), ct_job))
        row = db.execute("SELECT detail FROM jobs WHERE id = ?", (rt_job,)).fetchone()
        rt_detail = {**json.loads(row[0] or "{}"), "linked_to": ct_job, "approval": approval}
        db.execute("UPDATE jobs SET detail = ? WHERE id = ?", (json.dumps(rt_detail), rt_job))
