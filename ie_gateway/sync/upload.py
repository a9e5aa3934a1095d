"""Case upload: anonymise each due case and upload it, recording the outcome in its job.

A case is a delivered CT job whose route says ``sync: true``: its CT series, the node's AI
outputs (RT-STRUCT, SEG) and the clinicians' approved structure sets linked to it
(``cases.link_approved``), each anonymised into a scratch folder under the storage root and
uploaded as ``cases/<pseudonymous series UID>/``. The outcome is kept in the job's detail
(``synced``, or ``sync_error`` with the reason) for ``ie-gateway status``. A case is due again
when the set of approved structure sets linked to it has changed since its last upload; the
idempotent upload then sends only the new blobs and the manifest. One case's failure is
recorded and the run goes on; the case is retried by the next run.

Two case syncs never overlap (a lock file under the storage root).
"""

from __future__ import annotations

import datetime as dt
import functools
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import structlog
from azure.core.exceptions import AzureError
from azure.storage.blob import ContainerClient

from ie_gateway.errors import AnonymiseError, BurnedInAnnotation, SyncError
from ie_gateway.log import scrub
from ie_gateway.qa.approvals import approved_files
from ie_gateway.store import Job, JobDetail, JobState, Store, TransitionError
from ie_gateway.store.records import SyncRecord
from ie_gateway.sync import blob
from ie_gateway.sync.anonymise import Anonymiser
from ie_gateway.sync.lock import exclusive
from ie_gateway.sync.manifest import ai_outputs, case_manifest

log = structlog.get_logger(__name__)

SCRATCH_DIR = "sync-scratch"

CaseProgress = Callable[[str, int, int], None]
"""Called with (what, bytes done, bytes total) while a case uploads; the CLI draws it as a progress bar."""


@dataclass(frozen=True)
class CasesReport:
    """What a case sync did: job ids uploaded, failed (with reasons), blob and byte counts."""

    synced: tuple[int, ...] = ()
    failed: dict[int, str] = field(default_factory=dict)
    blobs: int = 0
    bytes: int = 0


def cases_due(store: Store) -> list[Job]:
    """Delivered jobs with a ``sync: true`` route, not uploaded as they now stand, whose files
    retention has not purged."""
    return [
        job
        for job in store.index.jobs([JobState.DELIVERED])
        if any(route.sync for route in job.routes) and not job.detail.purged and _changed_since_upload(job)
    ]


def _changed_since_upload(job: Job) -> bool:
    synced = job.detail.synced
    return synced is None or sorted(synced.approved_jobs) != job.detail.approved_jobs()


def sync_cases(
    store: Store, container: ContainerClient, anonymiser: Anonymiser, *, progress: CaseProgress | None = None
) -> CasesReport:
    """Anonymise and upload every case that is due; record each outcome in its job's detail.

    A case that fails (anonymisation refused, storage error) is logged with its job id,
    recorded as ``sync_error`` and left for the next run. Raises SyncError when another case
    sync holds the lock.
    """
    scratch = store.root / SCRATCH_DIR
    synced: list[int] = []
    failed: dict[int, str] = {}
    blobs = size = 0
    with exclusive(store.root / "sync-cases.lock", "case sync"):
        shutil.rmtree(scratch, ignore_errors=True)  # left by a run that was killed
        due = cases_due(store)
        log.info("case sync started", cases=len(due))
        for number, job in enumerate(due, 1):
            what = f"case {number}/{len(due)} (job {job.id})"
            step = functools.partial(progress, what) if progress else None
            try:
                record = sync_case(store, container, anonymiser, job, scratch / f"job-{job.id}", progress=step)
            except (BurnedInAnnotation, AnonymiseError) as exc:
                failed[job.id] = _exclude(store, job, exc)
                continue
            except (SyncError, AzureError, OSError) as exc:
                text = blob.remote_error(exc, container.container_name) if isinstance(exc, AzureError) else str(exc)
                reason = scrubbed(f"{type(exc).__name__}: {text}".splitlines()[0])
                log.warning("case sync failed", job=job.id, reason=reason)
                store.index.update_detail(job.id, functools.partial(_sync_failed, reason=reason))
                failed[job.id] = reason
                continue
            finally:
                shutil.rmtree(scratch / f"job-{job.id}", ignore_errors=True)
            synced.append(job.id)
            blobs += record.blobs_uploaded
            size += record.bytes_uploaded
        shutil.rmtree(scratch, ignore_errors=True)
    log.info("case sync done", synced=len(synced), failed=len(failed), blobs=blobs, bytes=size)
    return CasesReport(tuple(synced), failed, blobs, size)


def sync_case(
    store: Store,
    container: ContainerClient,
    anonymiser: Anonymiser,
    job: Job,
    workdir: Path,
    *,
    progress: blob.ProgressCallback | None = None,
) -> SyncRecord:
    """Anonymise one case into ``workdir`` and upload it; record and return its ``synced``."""
    approved_ids = job.detail.approved_jobs()
    outputs = ai_outputs(store, job)
    sources = {
        "ct": store.slice_paths(job),
        "ai": [output.path for output in outputs],
        "approved": approved_files(store, job),
    }
    anonymised = {kind: anonymiser.anonymise_files(paths, workdir / kind) for kind, paths in sources.items() if paths}
    case_id = anonymiser.uid(job.series_uid)
    manifest = case_manifest(case_id, outputs, sources, anonymised)
    report = blob.upload_case(container, case_id, anonymised, manifest, progress=progress)
    record = SyncRecord(
        case=case_id,
        at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        ct=len(anonymised.get("ct", [])),
        ai=len(anonymised.get("ai", [])),
        approved=len(anonymised.get("approved", [])),
        approved_jobs=tuple(approved_ids),
        blobs_uploaded=report.uploaded,
        bytes_uploaded=report.bytes,
    )
    store.index.update_detail(job.id, lambda d: replace(d, synced=record, sync_error=None))
    log.info(
        "case synced",
        job=job.id,
        ct=record.ct,
        ai=record.ai,
        approved=record.approved,
        blobs=report.uploaded,
        bytes=report.bytes,
    )
    return record


def scrubbed(text: str) -> str:
    """A reason fit for status and logs: secrets blanked, UID-shaped text (file names of the spool) hashed."""
    return scrub(text)


def _exclude(store: Store, job: Job, exc: SyncError) -> str:
    """A case that can never be anonymised ends ``excluded`` with the reason: it is not tried at
    every run, and retention purges it like a delivered case. Returns the reason."""
    reason = scrubbed(f"excluded from sync: cannot be anonymised: {exc}".splitlines()[0])
    log.warning("case excluded from sync", job=job.id, reason=reason)
    try:
        store.index.transition(job.id, JobState.EXCLUDED, reason=reason)
    except TransitionError as moved:  # an admin acted on it meanwhile
        log.warning("case not excluded", job=job.id, error=str(moved))
    return reason


def _sync_failed(detail: JobDetail, reason: str) -> JobDetail:
    return replace(detail, sync_error=reason)
