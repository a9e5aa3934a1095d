"""The spool: instance files plus their index (SQLite or PostgreSQL), and the job state machine.

Receiving writes here; every later stage reads its input from here and writes its output here
before the next stage may see it: durable hand-offs, so a crash repeats at most one stage.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pydicom
import structlog

from ie_gateway.config import Storage
from ie_gateway.store.db import open_database
from ie_gateway.store.index import Index, TransitionError
from ie_gateway.store.records import Job, JobDetail, JobRoute, OutboxState, OutputKind, ReviewPolicy, SegEncoding
from ie_gateway.store.spool import Spool, check_uid
from ie_gateway.store.states import UNFINISHED, JobState

__all__ = [
    "Arrival",
    "Index",
    "Job",
    "JobDetail",
    "JobRoute",
    "JobState",
    "OutboxState",
    "OutputKind",
    "ReviewPolicy",
    "SegEncoding",
    "Spool",
    "Store",
    "TransitionError",
    "check_uid",
    "header_values",
]

log = structlog.get_logger(__name__)

SKIPPED_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UN"})


def header_values(ds: pydicom.Dataset) -> dict[str, Any]:
    """Top-level, non-binary header values by keyword: what routing rules may match on."""
    out: dict[str, Any] = {}
    for elem in ds:
        if elem.tag.group >= 0x7FE0 or elem.tag.is_private or elem.VR in SKIPPED_VRS or not elem.keyword:
            continue
        out[elem.keyword] = _jsonable(elem.value)
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, (list, pydicom.multival.MultiValue)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value) if isinstance(value, float) else int(value)
    if value is None:
        return None
    return str(value)


def _expired(job: Job, unrouted_days: float, finished_days: float, sync_enabled: bool, now: float) -> bool:
    """Whether retention may delete this job's data now (see Store.purge_expired)."""
    if job.state is JobState.DELIVERED or job.detail.linked_to is not None:
        days = finished_days
    elif job.state in (JobState.UNROUTED, JobState.REFUSED):
        days = unrouted_days
    else:
        return False
    if sync_enabled and any(r.sync for r in job.routes) and job.detail.synced is None:
        return False
    return now - job.updated_at >= days * 86400


@dataclass(frozen=True)
class Arrival:
    """What the receiver knows of one instance before it is stored."""

    sop_uid: str
    sop_class: str
    study_uid: str
    series_uid: str
    transfer_syntax: str
    calling_ae: str
    called_ae: str


class Store:
    """Accepts instances durably and hands series jobs from stage to stage."""

    #: a temp file older than this on a shared spool is a crash's leftover, not a C-STORE in flight
    SHARED_TMP_AGE_S = 3600.0

    def __init__(self, root: Path, index: str = "sqlite") -> None:
        """``index``: ``sqlite`` (a file beside the spool) or a ``postgresql://`` URL that
        several nodes sharing ``root`` (a network mount) use together."""
        self.root = root
        self.spool = Spool(root / "spool")
        self.index = Index(open_database(index, root))
        self.results = root / "results"
        self.results.mkdir(parents=True, exist_ok=True)

    @classmethod
    def for_settings(cls, storage: Storage) -> Store:
        """The store ``storage`` (gateway.yaml's ``storage:``) describes."""
        return cls(storage.root, storage.index)

    def accept(
        self, arrival: Arrival, chunks: Iterable[bytes | memoryview], header: Callable[[], dict[str, Any]]
    ) -> tuple[int, bool, bool]:
        """Store one instance durably, then index it.

        Returns (job id, duplicate, late). A duplicate SOP Instance is not written again.
        ``header`` is called only for the first instance of a series (inside the index write).
        Raises OSError or StoreError on failure, leaving nothing half-written visible.
        """
        if self.index.has_instance(arrival.sop_uid):
            return 0, True, False
        final = self.spool.instance_path(arrival.study_uid, arrival.series_uid, arrival.sop_uid)
        size = self.spool.write(final, chunks)
        job_id, late = self._index(arrival, final, size, header)
        return job_id, False, late

    def _index(self, arrival: Arrival, path: Path, size: int, header: Callable[[], dict[str, Any]]) -> tuple[int, bool]:
        """The index row of a stored instance file (received now, or adopted at start-up)."""
        return self.index.add_instance(
            sop_uid=arrival.sop_uid,
            sop_class=arrival.sop_class,
            transfer_syntax=arrival.transfer_syntax,
            study_uid=arrival.study_uid,
            series_uid=arrival.series_uid,
            path=str(path.relative_to(self.spool.root)),
            size=size,
            calling_ae=arrival.calling_ae,
            called_ae=arrival.called_ae,
            header=header,
        )

    def stored_instance(self, sop_uid: str) -> str | None:
        """The SOP class of an instance safe in the spool (indexed and its file there), else None:
        what the node may commit to a caller."""
        found = self.index.present_instance(sop_uid)
        if found is None or not (self.spool.root / found[0]).is_file():
            return None
        return found[1]

    def instance_files(self, job: Job) -> list[Path]:
        """Absolute paths of every present instance of the job's series."""
        return [self.spool.root / p for p in self.index.instance_paths(job.series_id)]

    def job_dir(self, job_id: int) -> Path:
        """The folder for a job's intermediate and result files."""
        folder = self.results / f"job-{job_id}"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def complete_quiet(self, stable_after_s: float, now: float | None = None) -> list[int]:
        """Mark receiving jobs complete after the quiet period, or at once when the series'
        ImagesInAcquisition says every instance is here. Returns the completed job ids."""
        now = now if now is not None else time.time()
        done = []
        for job in self.index.jobs([JobState.RECEIVING]):
            expected = job.header.get("ImagesInAcquisition")
            quiet = now - job.last_instance_at >= stable_after_s
            if quiet or (isinstance(expected, int) and expected > 0 and job.instances >= expected):
                try:
                    self.index.transition(job.id, JobState.COMPLETE, completed_at=now)
                except TransitionError:
                    continue  # another sweep got there first
                done.append(job.id)
                log.info(
                    "series complete",
                    job=job.id,
                    instances=job.instances,
                    quiet_s=round(now - job.last_instance_at, 2),
                    trigger="quiet" if quiet else "expected_count",
                )
        return done

    def purge_expired(
        self, unrouted_days: float, finished_days: float, sync_enabled: bool = False, now: float | None = None
    ) -> int:
        """Delete the instances and results of series whose every job ended long enough ago.

        Delivered jobs go after ``finished_days``; unrouted and refused ones after
        ``unrouted_days``, except a clinician's structure set linked to a case, which lives as
        long as a delivered job. Failed jobs are kept until an admin acts on them, and so is a
        case waiting to be synced. Job rows stay (marked purged) so `status` keeps the history.
        Returns the number of series purged.
        """
        now = now if now is not None else time.time()
        by_series: dict[int, list[Job]] = {}
        for job in self.index.jobs():
            by_series.setdefault(job.series_id, []).append(job)
        purged = 0
        for series_id, jobs in by_series.items():
            if any(j.detail.purged for j in jobs):
                continue
            if not all(_expired(j, unrouted_days, finished_days, sync_enabled, now) for j in jobs):
                continue
            self._purge_series(series_id, jobs, why="age")
            purged += 1
        return purged

    def purge_for_space(self, enough: Callable[[], bool], sync_enabled: bool = False) -> int:
        """Free space under pressure: purge delivered series, oldest first, until ``enough()``.

        Only series whose every job is delivered (and synced, where sync wants it) go; nothing
        undelivered, failed, held for review or waiting for sync is touched, however full the
        disk. Returns the number of series purged.
        """
        by_series: dict[int, list[Job]] = {}
        for job in self.index.jobs():
            by_series.setdefault(job.series_id, []).append(job)
        candidates = [
            (max(j.updated_at for j in jobs), series_id, jobs)
            for series_id, jobs in by_series.items()
            if not any(j.detail.purged for j in jobs)
            and all(j.state is JobState.DELIVERED and _expired(j, 0, 0, sync_enabled, float("inf")) for j in jobs)
        ]
        purged = 0
        for _, series_id, jobs in sorted(candidates, key=lambda c: c[0]):
            if enough():
                break
            self._purge_series(series_id, jobs, why="disk pressure")
            purged += 1
        return purged

    def _purge_series(self, series_id: int, jobs: list[Job], why: str) -> None:
        for path in self.index.instance_paths(series_id):
            (self.spool.root / path).unlink(missing_ok=True)
        self.index.forget_instances(series_id)
        for job in jobs:
            shutil.rmtree(self.results / f"job-{job.id}", ignore_errors=True)
            self.index.update_detail(job.id, lambda d: replace(d, purged=True))
        log.info("series purged", why=why, jobs=[j.id for j in jobs], states=sorted({j.state.value for j in jobs}))

    def recover(self) -> dict[str, int]:
        """Reconcile files and index after a restart; resume unfinished jobs.

        Temp files are removed; a file without a row is indexed (its C-STORE may have been
        answered just before the crash); a row without a file is flagged missing and its job
        notes it. On an index of its own the node holds no job any more: every lease ends and
        a job caught mid-inference goes back to `routed` so it runs again at once. On a shared
        index other nodes' jobs are left alone: a job this node held is taken over (by any
        worker) when its lease lapses.
        """
        shared = self.index.shared
        removed = self.spool.clear_tmp(older_than_s=self.SHARED_TMP_AGE_S if shared else 0.0)
        indexed = self.index.all_instance_paths()
        on_disk = {str(p.relative_to(self.spool.root)): p for p in self.spool.iter_instances()}
        adopted = 0
        for rel, path in on_disk.items():
            if rel not in indexed:
                adopted += self._adopt(path)
        missing = [rel for rel in indexed if rel not in on_disk]
        for job_id in self.index.mark_missing(missing):
            self.index.update_detail(job_id, lambda d: replace(d, missing_instances=True))
        resumed = 0
        if not shared:
            self.index.release_all()
            for job in self.index.jobs([JobState.INFERRING]):
                self.index.transition(job.id, JobState.ROUTED, reason="re-run after restart")
                resumed += 1
        unfinished = len(self.index.jobs(sorted(UNFINISHED, key=lambda s: s.value)))
        summary = {
            "temp_removed": removed,
            "adopted": adopted,
            "missing": len(missing),
            "rerun": resumed,
            "unfinished": unfinished,
        }
        log.info("spool recovered", **summary)
        return summary

    def _adopt(self, path: Path) -> int:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            arrival = Arrival(
                sop_uid=check_uid(ds.SOPInstanceUID, "SOPInstanceUID"),
                sop_class=str(ds.SOPClassUID),
                study_uid=check_uid(ds.StudyInstanceUID, "StudyInstanceUID"),
                series_uid=check_uid(ds.SeriesInstanceUID, "SeriesInstanceUID"),
                transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
                calling_ae="",
                called_ae="",
            )
        except (pydicom.errors.InvalidDicomError, AttributeError, OSError, ValueError) as exc:
            log.warning("unreadable file left in spool", file=path.name, error=type(exc).__name__)
            return 0
        self._index(arrival, path, path.stat().st_size, lambda: header_values(ds))
        return 1
