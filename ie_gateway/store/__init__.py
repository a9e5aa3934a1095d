"""The spool: instance files plus their index (SQLite or PostgreSQL), and the job state machine.

Receiving writes here; every later stage reads its input from here and writes its output here
before the next stage may see it: durable hand-offs, so a crash repeats at most one stage.
"""

from __future__ import annotations

import filecmp
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydicom
import structlog

from ie_gateway.config import Storage
from ie_gateway.errors import TransitionError
from ie_gateway.store.db import open_database
from ie_gateway.store.groupcommit import GroupCommit
from ie_gateway.store.index import Index, NewInstance
from ie_gateway.store.records import Job, JobDetail, JobRoute, SeriesHeader
from ie_gateway.store.spool import SUFFIX, Spool, check_uid
from ie_gateway.store.states import UNFINISHED, JobState
from ie_gateway.vocab import OutputKind, ReviewPolicy

if TYPE_CHECKING:  # the imaging stack (scipy) is loaded by the stages that measure, not by the store
    from ie_gateway.imaging import SliceGeometry

__all__ = [
    "Accepted",
    "Arrival",
    "Index",
    "Job",
    "JobDetail",
    "JobRoute",
    "JobState",
    "OutputKind",
    "ReviewPolicy",
    "SeriesHeader",
    "Spool",
    "Store",
    "TransitionError",
    "check_uid",
    "header_values",
]

log = structlog.get_logger(__name__)

#: The CT's slice geometry (``SliceGeometry.save``) in a job's folder.
GEOMETRY_FILE = "geometry.json"

SKIPPED_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UN"})


def header_values(ds: pydicom.Dataset) -> SeriesHeader:
    """Top-level, non-binary header values by keyword: what routing rules may match on."""
    out: dict[str, Any] = {}
    for elem in ds:
        if elem.tag.group >= 0x7FE0 or elem.tag.is_private or elem.VR in SKIPPED_VRS or not elem.keyword:
            continue
        out[elem.keyword] = _jsonable(elem.value)
    return SeriesHeader(out)


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
    if job.state in (JobState.DELIVERED, JobState.EXCLUDED) or job.detail.linked_to is not None:
        days = finished_days
    elif job.state in (JobState.UNROUTED, JobState.REFUSED):
        days = unrouted_days
    else:
        return False
    waits_for_sync = job.state is not JobState.EXCLUDED and any(r.sync for r in job.routes)
    if sync_enabled and waits_for_sync and job.detail.synced is None:
        return False
    return now - job.updated_at >= days * 86400


@dataclass(frozen=True)
class Accepted:
    """What became of an instance handed to the store."""

    job_id: int
    duplicate: bool = False  # the same bytes were already stored: nothing new kept
    late: bool = False  # its series had completed: it opened a new job for the whole series
    replaced: bool = False  # other bytes under a stored SOP Instance UID: kept beside, used from now


def _same_bytes(staged: Path, stored: Path) -> bool:
    """Whether two files hold the same bytes (compared in blocks; a missing stored file differs)."""
    try:
        return filecmp.cmp(staged, stored, shallow=False)
    except FileNotFoundError:
        return False


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

    @classmethod
    def of(cls, ds: pydicom.Dataset, calling_ae: str, called_ae: str) -> Arrival:
        """The arrival of a data set that came with its file meta (STOW-RS, a DICOMweb
        retrieve), every UID checked as a file name. Raises UnsafeUIDError."""
        return cls(
            sop_uid=check_uid(ds.get("SOPInstanceUID"), "SOPInstanceUID"),
            sop_class=check_uid(ds.get("SOPClassUID"), "SOPClassUID"),
            study_uid=check_uid(ds.get("StudyInstanceUID"), "StudyInstanceUID"),
            series_uid=check_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID"),
            transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
            calling_ae=calling_ae,
            called_ae=called_ae,
        )


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
        # the rows of instances several receivers made durable at once, in one transaction
        self._group: GroupCommit[NewInstance, tuple[int, bool]] = GroupCommit(
            self.index.add_instances, "index-commit", on_idle=self.index.close
        )

    @classmethod
    def for_settings(cls, storage: Storage) -> Store:
        """The store ``storage`` (gateway.yaml's ``storage:``) describes."""
        return cls(storage.root, storage.index)

    def accept(
        self, arrival: Arrival, chunks: Iterable[bytes | memoryview], header: Callable[[], Mapping[str, Any]]
    ) -> tuple[int, bool, bool]:
        """Store one instance, given as bytes, durably, then index it (see ``accept_file``).

        Returns (job id, duplicate, late).
        """
        accepted = self._accept_staged(arrival, self.spool.stage(chunks), header)
        return accepted.job_id, accepted.duplicate, accepted.late

    def accept_file(self, arrival: Arrival, source: Path, header: Callable[[], Mapping[str, Any]]) -> Accepted:
        """Store the instance file ``source`` (moved, not copied, where it can be) durably, then
        index it.

        The same SOP Instance with the same bytes is a duplicate and not kept twice; with other
        bytes (a re-send after a correction) the new copy is kept beside the first and used from
        then on. ``header`` is called only for the first instance of a series (inside the index
        write). Raises OSError or StoreError on failure, leaving nothing half-written visible.
        """
        return self._accept_staged(arrival, self.spool.take(source), header)

    def _accept_staged(self, arrival: Arrival, staged: Path, header: Callable[[], Mapping[str, Any]]) -> Accepted:
        try:
            current = self.index.instance_path(arrival.sop_uid)
            if current is None:
                final = self.spool.instance_path(arrival.study_uid, arrival.series_uid, arrival.sop_uid)
                size = self.spool.commit(staged, final)
                job_id, late = self._group.submit(self._new_instance(arrival, final, size, header))
                return Accepted(job_id, late=late)
            if _same_bytes(staged, self.spool.root / current):
                return Accepted(0, duplicate=True)
            copy = uuid.uuid4().hex[:8]
            final = self.spool.instance_path(arrival.study_uid, arrival.series_uid, arrival.sop_uid, copy)
            size = self.spool.commit(staged, final)
            rel = str(final.relative_to(self.spool.root))
            job_id, late = self.index.replace_instance(arrival.sop_uid, rel, size, arrival.transfer_syntax)
            return Accepted(job_id, late=late, replaced=True)
        finally:
            staged.unlink(missing_ok=True)

    def _new_instance(
        self, arrival: Arrival, path: Path, size: int, header: Callable[[], Mapping[str, Any]]
    ) -> NewInstance:
        """The index row of a stored instance file (received now, or adopted at start-up)."""
        return NewInstance(
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

    def slice_paths(self, job: Job) -> list[Path]:
        """The CT's instance files in the volume's slice order. The index keeps them relative to
        the spool, so a worker that mounts the shared spool elsewhere finds them (a row written
        before paths were relative holds absolute ones, which stay as they are)."""
        return [self.spool.root / p for p in job.detail.slice_files]

    def keep_geometry(self, job_id: int, geometry: SliceGeometry) -> None:
        """Keep the checked volume's slice geometry in the job's folder, for the stages after it."""
        geometry.save(self.job_dir(job_id) / GEOMETRY_FILE)

    def geometry(self, job: Job) -> SliceGeometry:
        """The CT's slice geometry as the volume stage kept it; for a job inferred before the
        node kept it, built from the slice headers. Raises OSError or WriteError when neither
        can be read."""
        from ie_gateway.imaging import SliceGeometry, read_headers

        try:
            return SliceGeometry.load(self.results / f"job-{job.id}" / GEOMETRY_FILE)  # read: no folder made
        except FileNotFoundError:
            headers = read_headers(self.slice_paths(job))
            return SliceGeometry.from_headers(headers)

    def spool_relative(self, paths: Iterable[Path]) -> tuple[str, ...]:
        """What the index keeps for files in the spool: their paths relative to it."""
        return tuple(str(p.relative_to(self.spool.root)) for p in paths)

    def qa_png(self, job: Job) -> Path | None:
        """The job's QA picture (kept relative to the results folder), if it has one."""
        return self.results / job.detail.qa_png if job.detail.qa_png else None

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
            expected = job.header.images_in_acquisition
            quiet = now - job.last_instance_at >= stable_after_s
            if quiet or (expected is not None and job.instances >= expected):
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

        Delivered jobs go after ``finished_days``, and so do excluded ones (delivered, but a
        case sync can never take: they wait for no upload); unrouted and refused ones after
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
        paths = [self.spool.root / p for p in self.index.instance_paths(series_id)]
        for path in paths:
            path.unlink(missing_ok=True)
        for folder in {p.parent for p in paths}:  # earlier copies of re-sent instances, not indexed
            for leftover in folder.glob("*" + SUFFIX):
                leftover.unlink(missing_ok=True)
        self.index.forget_instances(series_id)
        for job in jobs:
            shutil.rmtree(self.results / f"job-{job.id}", ignore_errors=True)
            self.index.update_detail(job.id, lambda d: replace(d, purged=True))
        log.info("series purged", why=why, jobs=[j.id for j in jobs], states=sorted({j.state.value for j in jobs}))

    def recover(self) -> dict[str, int]:
        """Reconcile files and index after a restart; resume unfinished jobs.

        Temp files are removed; a file without a row is indexed (its C-STORE may have been
        answered just before the crash); a row without a file is flagged missing and its job
        notes it. On an index of its own the node holds no job nor outbox row any more: every
        lease ends (a delivery pass the crash cut off goes again at once), a
        stage that was running counts a crash of its job (``Index.count_interrupted``), and a
        job caught mid-inference goes back to `routed` so it runs again at once. On a shared
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
        crashed = []
        if not shared:
            # the node died in these stages: counted now; the worker fails a job that did it too often
            crashed = self.index.count_interrupted()
            for job_id, stage, crashes in crashed:
                log.warning("stage interrupted by a crash", job=job_id, stage=stage, crashes=crashes)
            self.index.release_all()
            for job in self.index.jobs([JobState.INFERRING]):
                # its volume was stored before inference began (an earlier node stored none)
                back = JobState.PREPARED if job.detail.slice_files else JobState.ROUTED
                self.index.transition(job.id, back, reason="re-run after restart")
                resumed += 1
        unfinished = len(self.index.jobs(sorted(UNFINISHED, key=lambda s: s.value)))
        summary = {
            "temp_removed": removed,
            "adopted": adopted,
            "missing": len(missing),
            "rerun": resumed,
            "crashed": len(crashed),
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
        if self.index.instance_path(arrival.sop_uid) is not None:
            return 0  # an earlier copy of an instance sent again with other bytes: kept, not used
        self.index.add_instances([self._new_instance(arrival, path, path.stat().st_size, lambda: header_values(ds))])
        return 1
