"""Clinicians' approved structure sets, linked to the CT series the node contoured.

When a TPS sends back the structure set a clinician reviewed, it references the planning CT
series. ``link_approved`` finds the node's job for that CT and records the link in both jobs'
details (``JobDetail.approved`` on the CT job, ``linked_to`` and ``approval`` on the structure
set's), so the agreement figures can be computed and the next case sync uploads the approved
contours beside the AI ones.

Structure sets the node wrote itself (their SOP Instance UID is in the outbox) are never linked:
only a clinician's set is ground truth. Nor is a set from a caller that ``approvals.accept_from``
does not list (a planning system's AE title), or one whose patient, study or frame of reference
is not the contoured CT's: those are kept, and the reason says why they were not linked. A revision sent later in the same series arrives as a
new job of that series and is linked on its own, so only the instances whose ApprovalStatus is
APPROVED are uploaded (``approved_files``), never an earlier draft.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import pydicom
import structlog
from pydicom.dataset import Dataset
from pydicom.uid import RTStructureSetStorage

from ie_gateway.errors import ApprovalRefused
from ie_gateway.store import Job, JobState, Store
from ie_gateway.store.outbox import Outbox
from ie_gateway.store.records import ApprovedSet
from ie_gateway.vocab import ApprovalStatus

log = structlog.get_logger(__name__)

APPROVED = ApprovalStatus.APPROVED
#: Which status a structure-set series shows when its files disagree: an approved file wins,
#: then a rejection, then a draft
PRECEDENCE = (ApprovalStatus.APPROVED, ApprovalStatus.REJECTED, ApprovalStatus.UNAPPROVED, ApprovalStatus.UNKNOWN)
#: a CT job whose RT-STRUCT may be at the TPS (`writing`: sent while the SEG is made)
LINKABLE_STATES = (JobState.WRITING, JobState.SENDING, JobState.DELIVERED)


def link_approved(store: Store, job: Job, accept_from: Collection[str] = ()) -> int | None:
    """Link the RT-STRUCT series of ``job`` to the job of the CT series it references.

    Call it for a complete series whose Modality is RTSTRUCT. Returns the CT job id, or None
    when no file is a clinician's structure set on a CT series the node contoured (the node's
    own output sent back, an unknown CT, a CT not yet sent). Calling it again for the same job
    updates the link instead of adding a second one. Raises ApprovalRefused when a clinician's
    set references a contoured CT but its caller is not in ``accept_from`` or its patient,
    study or frame of reference is not the CT's.
    """
    links: list[tuple[int, ApprovalStatus]] = []
    for ds in _clinicians_sets(store, job.id):
        ct_job = _contoured_job(store, _referenced_series(store, ds))
        if ct_job is not None:
            if job.calling_ae not in accept_from:
                raise ApprovalRefused(
                    f"structure set from {job.calling_ae or 'an unknown caller'} not linked to job {ct_job}: "
                    "approvals.accept_from does not list that caller"
                )
            _check_same_case(ds, store.index.job(ct_job))
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
    approval = next(status for status in PRECEDENCE if status in approvals)
    store.index.link_approved(ct_job, job.id, approval, len(approvals))
    log.info("structure set linked", job=job.id, ct_job=ct_job, approval=approval)
    return ct_job


def _check_same_case(ds: Dataset, ct_job: Job) -> None:
    """The set must be drawn on the CT's patient, study and frame of reference (values are not
    named in the reason: they identify the patient)."""
    ct = ct_job.header
    frames = {str(f.get("FrameOfReferenceUID", "")) for f in ds.get("ReferencedFrameOfReferenceSequence", [])}
    differ = [
        what
        for what, same in (
            ("patient", str(ds.get("PatientID", "")).strip() == str(ct.get("PatientID", "")).strip()),
            ("study", str(ds.get("StudyInstanceUID", "")) == str(ct.get("StudyInstanceUID", ""))),
            ("frame of reference", str(ct.get("FrameOfReferenceUID", "")) in frames),
        )
        if not same
    ]
    if differ:
        raise ApprovalRefused(
            f"structure set not linked to job {ct_job.id}: its {', '.join(differ)} "
            f"{'is' if len(differ) == 1 else 'are'} not the contoured CT's"
        )


def approved_entries(job: Job) -> list[ApprovedSet]:
    """The linked structure sets of a CT job that a clinician approved."""
    return [entry for entry in job.detail.approved if entry.approval == APPROVED]


def approved_files(store: Store, ct_job: Job) -> list[Path]:
    """The approved clinicians' RT-STRUCT files linked to ``ct_job`` (drafts left out)."""
    return [
        Path(ds.filename)
        for entry in approved_entries(ct_job)
        for ds in _clinicians_sets(store, entry.job)
        if _approval(ds) == APPROVED
    ]


def approved_sets(store: Store, job_id: int) -> list[Dataset]:
    """The clinician's approved structure sets received in job ``job_id``, in arrival order."""
    return [ds for ds in _clinicians_sets(store, job_id) if _approval(ds) == APPROVED]


def _clinicians_sets(store: Store, job_id: int) -> list[Dataset]:
    """The RT-STRUCTs received in this job (not earlier jobs of the series) that the node did
    not write."""
    found = [_read_structure_set(store.spool.root / path) for path in store.index.job_instance_paths(job_id)]
    return [ds for ds in found if ds is not None and not _written_by_node(store, str(ds.SOPInstanceUID))]


def _approval(ds: Dataset) -> ApprovalStatus:
    return ApprovalStatus.of(ds.get("ApprovalStatus"))


def _read_structure_set(path: Path) -> Dataset | None:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        log.warning("structure set unreadable", file=path.name, error=type(exc).__name__)
        return None
    return ds if ds.get("SOPClassUID") == RTStructureSetStorage else None


def _written_by_node(store: Store, sop_uid: str) -> bool:
    return Outbox(store.index).has_sop(sop_uid)


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
    return store.index.series_of_instances(images)


def _contoured_job(store: Store, series_uids: set[str]) -> int | None:
    """The latest job of these series that the node routed and has sent results for, and
    whose files retention has not purged (a purged case cannot be uploaded any more)."""
    return store.index.contoured_job(series_uids, LINKABLE_STATES)
