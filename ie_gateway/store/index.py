"""The index of the spool: series, instances, jobs and their transitions, leases, agreement.

Every read and write of these tables goes through here (and the outbox, ``outbox.py``), with
typed records in and out (``records.py``); the database behind it is SQLite or PostgreSQL
(``db.py``). A job is worked on by one node at a time: ``claim`` takes the first job of a
stage in queue order (see ``queue_order``) that no live lease holds, the worker renews its lease while the stage runs and releases
it when the stage ends; a worker that dies stops renewing, and another claims the job when the
lease lapses.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from ie_gateway.errors import StoreError, TransitionError
from ie_gateway.store.db import Database, SQLite, Tx
from ie_gateway.store.records import (
    AGREEMENT_COLUMNS,
    AgreementRow,
    ApprovedSet,
    Job,
    JobDetail,
    JobRoute,
    SeriesHeader,
    StageAttempts,
    Transition,
)
from ie_gateway.store.schema import migrate
from ie_gateway.store.states import ALLOWED, JobState
from ie_gateway.vocab import ApprovalStatus, OutboxState, Priority

JOB_QUERY = """
SELECT j.id, j.series_id, j.state, j.reason, j.instances, j.late_instances, j.created_at,
       j.updated_at, j.last_instance_at, j.completed_at, j.routes, j.detail, s.study_uid,
       s.series_uid, s.header, s.calling_ae, s.called_ae, j.claimed_by, j.lease_until, j.priority
FROM jobs j JOIN series s ON s.id = j.series_id
"""

#: A job's place in line (one parameter: the completion time before which a job has waited too
#: long). Priority first (high, normal, low), then completion order, then arrival; a job that
#: completed before the parameter counts as high, so it goes before every newer job (aging:
#: low-priority work waits at most that long behind a stream of more urgent jobs).
JOB_ORDER = " ORDER BY CASE WHEN j.completed_at < ? THEN 0 ELSE j.priority END, j.completed_at, j.id"

#: how long a job waits before aging lifts it (``worker.max_wait_s`` overrides it)
MAX_WAIT_S = 3600.0


def _job(row: Sequence[Any]) -> Job:
    return Job(
        id=int(row[0]),
        series_id=int(row[1]),
        state=JobState(row[2]),
        reason=row[3],
        instances=int(row[4]),
        late_instances=int(row[5]),
        created_at=float(row[6]),
        updated_at=float(row[7]),
        last_instance_at=float(row[8]),
        completed_at=row[9],
        routes=tuple(JobRoute.from_dict(r) for r in json.loads(row[10] or "[]")),
        detail=JobDetail.from_json(row[11]),
        study_uid=row[12],
        series_uid=row[13],
        header=SeriesHeader(json.loads(row[14])),
        calling_ae=row[15],
        called_ae=row[16],
        claimed_by=row[17],
        lease_until=row[18],
        priority=Priority.of_rank(int(row[19])),
    )


@dataclass(frozen=True)
class NewInstance:
    """An instance file in the spool, to be indexed (``Index.add_instances``); ``path`` is
    relative to the spool, ``header`` is called only for a series' first instance."""

    sop_uid: str
    sop_class: str
    transfer_syntax: str
    study_uid: str
    series_uid: str
    path: str
    size: int
    calling_ae: str
    called_ae: str
    header: Callable[[], Mapping[str, Any]]


def _marks(values: Sequence[Any]) -> str:
    return ",".join("?" * len(values))


class Index:
    """Thread-safe access to the index database, schema migrated on opening."""

    def __init__(self, path_or_db: Path | Database) -> None:
        self.db = path_or_db if isinstance(path_or_db, Database) else SQLite(path_or_db)
        migrate(self.db)

    @property
    def shared(self) -> bool:
        """Whether other nodes may use this index at the same time (PostgreSQL)."""
        return self.db.shared

    def singleton(self, name: str) -> AbstractContextManager[bool]:
        """Hold the named lock for a block, if no other node does: a scheduled task that must
        run on one node at a time (retention, sync, the completion sweep)."""
        return self.db.singleton(name)

    def check_writable(self) -> None:
        """Take the write lock and let it go, writing nothing; StoreError when the index cannot."""
        with self.db.tx():
            pass

    def close(self) -> None:
        self.db.close()

    # --- instances -------------------------------------------------------------------------

    def has_instance(self, sop_uid: str) -> bool:
        return bool(self.db.query("SELECT 1 FROM instances WHERE sop_uid = ?", (sop_uid,)))

    def present_instance(self, sop_uid: str) -> tuple[str, str] | None:
        """(path under the spool, SOP class) of an indexed instance not flagged missing."""
        rows = self.db.query("SELECT path, sop_class FROM instances WHERE sop_uid = ? AND missing = 0", (sop_uid,))
        return (str(rows[0][0]), str(rows[0][1])) if rows else None

    def add_instance(
        self,
        *,
        sop_uid: str,
        sop_class: str,
        transfer_syntax: str,
        study_uid: str,
        series_uid: str,
        path: str,
        size: int,
        calling_ae: str,
        called_ae: str,
        header: Callable[[], Mapping[str, Any]],
        at: float | None = None,
    ) -> tuple[int, bool]:
        """Index a stored instance into the series' open job (a new job if none is open).

        ``header`` is called only when this instance is the series' first: its values are what
        routing reads.

        Returns (job id, late) where late says the series had already completed before this
        instance arrived: the instance then opens a new job for the whole series.
        """
        row = NewInstance(
            sop_uid, sop_class, transfer_syntax, study_uid, series_uid, path, size, calling_ae, called_ae, header
        )
        return self.add_instances([row], at=at)[0]

    def add_instances(self, rows: Sequence[NewInstance], at: float | None = None) -> list[tuple[int, bool]]:
        """Index stored instances in one transaction, each as ``add_instance`` does; all or none.
        Returns (job id, late) for each, in order."""
        now = at if at is not None else time.time()
        with self.db.tx() as db:
            return [self._add_instance(db, row, now) for row in rows]

    def _add_instance(self, db: Tx, row: NewInstance, now: float) -> tuple[int, bool]:
        series_id = self._series_id(db, row.series_uid, row.study_uid, row.header, row.calling_ae, row.called_ae, now)
        job_id, late = self._open_job(db, series_id, now)
        cur = db.execute(
            "INSERT INTO instances (sop_uid, series_id, job_id, path, sop_class, transfer_syntax, size, "
            "received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (row.sop_uid, series_id, job_id, row.path, row.sop_class, row.transfer_syntax, row.size, now),
        )
        if cur.rowcount:
            db.execute(
                "UPDATE jobs SET instances = (SELECT COUNT(*) FROM instances WHERE series_id = ?), "
                "last_instance_at = ?, updated_at = ? WHERE id = ?",
                (series_id, now, now, job_id),
            )
            db.execute("UPDATE series SET last_at = ? WHERE id = ?", (now, series_id))
        return job_id, late

    def _open_job(self, db: Tx, series_id: int, now: float) -> tuple[int, bool]:
        """The series' receiving job, or a new one (late: the series had completed before)."""
        # the series row is locked from here (PostgreSQL), so two receivers of one series
        # cannot both open a job for it
        db.execute("SELECT id FROM series WHERE id = ?" + self._for_update, (series_id,))
        row = db.execute(
            "SELECT id FROM jobs WHERE series_id = ? AND state = ? ORDER BY id DESC LIMIT 1",
            (series_id, JobState.RECEIVING.value),
        ).fetchone()
        if row is not None:
            return int(row[0]), False
        late = db.execute("SELECT 1 FROM jobs WHERE series_id = ?", (series_id,)).fetchone() is not None
        if late:
            db.execute(
                "UPDATE jobs SET late_instances = late_instances + 1 WHERE id = "
                "(SELECT MAX(id) FROM jobs WHERE series_id = ?)",
                (series_id,),
            )
        return self._new_job(db, series_id, now), late

    def instance_path(self, sop_uid: str) -> str | None:
        """The spool-relative path of the instance's current copy, or None if it is not indexed."""
        rows = self.db.query("SELECT path FROM instances WHERE sop_uid = ?", (sop_uid,))
        return str(rows[0][0]) if rows else None

    def series_totals(self, series_uid: str) -> tuple[int, int]:
        """(instances, bytes) stored of a series: what ``limits:`` bounds at receive."""
        rows = self.db.query(
            "SELECT COUNT(*), COALESCE(SUM(i.size), 0) FROM instances i JOIN series s ON s.id = i.series_id "
            "WHERE s.series_uid = ?",
            (series_uid,),
        )
        return int(rows[0][0]), int(rows[0][1])

    def replace_instance(self, sop_uid: str, path: str, size: int, transfer_syntax: str) -> tuple[int, bool]:
        """Point an indexed instance at a later copy with other bytes, which the series' open job
        (a new, late one if it had completed) now uses; the job counts it in
        ``detail.replaced_instances`` so an admin sees it. Returns (job id, late)."""
        now = time.time()
        with self.db.tx() as db:
            row = db.execute("SELECT series_id FROM instances WHERE sop_uid = ?", (sop_uid,)).fetchone()
            if row is None:
                raise StoreError("the instance to replace is not indexed")
            series_id = int(row[0])
            job_id, late = self._open_job(db, series_id, now)
            db.execute(
                "UPDATE instances SET path = ?, size = ?, transfer_syntax = ?, job_id = ?, received_at = ?, "
                "missing = 0 WHERE sop_uid = ?",
                (path, size, transfer_syntax, job_id, now, sop_uid),
            )
            detail = JobDetail.from_json(db.execute("SELECT detail FROM jobs WHERE id = ?", (job_id,)).fetchone()[0])
            detail = replace(detail, replaced_instances=detail.replaced_instances + 1)
            db.execute(
                "UPDATE jobs SET instances = (SELECT COUNT(*) FROM instances WHERE series_id = ?), detail = ?, "
                "last_instance_at = ?, updated_at = ? WHERE id = ?",
                (series_id, detail.to_json(), now, now, job_id),
            )
            db.execute("UPDATE series SET last_at = ? WHERE id = ?", (now, series_id))
        return job_id, late

    def _series_id(
        self,
        db: Tx,
        series_uid: str,
        study_uid: str,
        header: Callable[[], Mapping[str, Any]],
        calling_ae: str,
        called_ae: str,
        now: float,
    ) -> int:
        row = db.execute("SELECT id FROM series WHERE series_uid = ?", (series_uid,)).fetchone()
        if row is not None:
            return int(row[0])
        row = db.execute(
            "INSERT INTO series (series_uid, study_uid, header, calling_ae, called_ae, first_at, last_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (series_uid) DO UPDATE SET last_at = series.last_at "
            "RETURNING id",
            (series_uid, study_uid, json.dumps(dict(header())), calling_ae, called_ae, now, now),
        ).fetchone()
        return int(row[0])

    def _new_job(self, db: Tx, series_id: int, now: float) -> int:
        row = db.execute(
            "INSERT INTO jobs (series_id, state, created_at, updated_at, last_instance_at) VALUES (?, ?, ?, ?, ?) "
            "RETURNING id",
            (series_id, JobState.RECEIVING.value, now, now, now),
        ).fetchone()
        job_id = int(row[0])
        db.execute(
            "INSERT INTO transitions (job_id, at, from_state, to_state) VALUES (?, ?, NULL, ?)",
            (job_id, now, JobState.RECEIVING.value),
        )
        return job_id

    def instance_paths(self, series_id: int) -> list[str]:
        """Spool-relative paths of every present instance of a series (all jobs)."""
        rows = self.db.query(
            "SELECT path FROM instances WHERE series_id = ? AND missing = 0 ORDER BY received_at", (series_id,)
        )
        return [r[0] for r in rows]

    def job_instance_paths(self, job_id: int) -> list[str]:
        """Spool-relative paths of the present instances that arrived in this job (not earlier
        jobs of its series), in arrival order."""
        rows = self.db.query(
            "SELECT path FROM instances WHERE job_id = ? AND missing = 0 ORDER BY received_at", (job_id,)
        )
        return [r[0] for r in rows]

    def all_instance_paths(self) -> dict[str, str]:
        """Map of spool-relative path → SOP Instance UID for every indexed instance."""
        return {r[0]: r[1] for r in self.db.query("SELECT path, sop_uid FROM instances")}

    def series_of_instances(self, sop_uids: Iterable[str]) -> set[str]:
        """Series Instance UIDs of the indexed instances among ``sop_uids``."""
        uids = sorted(sop_uids)
        if not uids:
            return set()
        rows = self.db.query(
            "SELECT DISTINCT s.series_uid FROM instances i JOIN series s ON s.id = i.series_id "
            f"WHERE i.sop_uid IN ({_marks(uids)})",
            uids,
        )
        return {str(r[0]) for r in rows}

    def mark_missing(self, paths: list[str]) -> list[int]:
        """Flag rows whose file is gone; return the affected job ids."""
        jobs: set[int] = set()
        with self.db.tx() as db:
            for path in paths:
                row = db.execute("SELECT job_id FROM instances WHERE path = ?", (path,)).fetchone()
                if row:
                    jobs.add(int(row[0]))
                    db.execute("UPDATE instances SET missing = 1 WHERE path = ?", (path,))
        return sorted(jobs)

    def forget_instances(self, series_id: int) -> None:
        """Drop a purged series' instance rows (its files are gone)."""
        with self.db.tx() as db:
            db.execute("DELETE FROM instances WHERE series_id = ?", (series_id,))

    # --- jobs ------------------------------------------------------------------------------

    def job(self, job_id: int) -> Job:
        rows = self.db.query(JOB_QUERY + " WHERE j.id = ?", (job_id,))
        if not rows:
            raise StoreError(f"no job {job_id}")
        return _job(rows[0])

    def jobs(self, states: Iterable[JobState] | None = None) -> list[Job]:
        wanted = [s.value for s in states] if states is not None else []
        if not wanted:
            return [_job(r) for r in self.db.query(JOB_QUERY + " ORDER BY j.id")]
        rows = self.db.query(JOB_QUERY + f" WHERE j.state IN ({_marks(wanted)}) ORDER BY j.id", wanted)
        return [_job(r) for r in rows]

    def job_counts(self) -> dict[JobState, int]:
        """How many jobs are in each state."""
        return {JobState(r[0]): int(r[1]) for r in self.db.query("SELECT state, COUNT(*) FROM jobs GROUP BY state")}

    def transition(
        self,
        job_id: int,
        to: JobState,
        reason: str | None = None,
        *,
        who: str | None = None,
        routes: Sequence[JobRoute] | None = None,
        detail: JobDetail | None = None,
        completed_at: float | None = None,
        priority: Priority | None = None,
    ) -> JobState:
        """Move a job to ``to`` if its state allows; return the old state.

        ``routes``, ``detail``, ``completed_at`` and ``priority`` replace the job's when given
        (an empty ``routes`` clears them). ``who``: the admin whose action this is (None: the node).
        """
        now = time.time()
        sets: dict[str, Any] = {"state": to.value, "reason": reason, "updated_at": now}
        if routes is not None:
            sets["routes"] = json.dumps([asdict(r) for r in routes])
            sets["model"] = routes[0].model if routes else None
            sets["model_version"] = routes[0].version if routes else None
        if detail is not None:
            sets["detail"] = detail.to_json()
        if completed_at is not None:
            sets["completed_at"] = completed_at
        if priority is not None:
            sets["priority"] = priority.rank
        with self.db.tx(durable=True) as db:
            row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise StoreError(f"no job {job_id}")
            old = JobState(row[0])
            if to not in ALLOWED[old]:
                raise TransitionError(f"job {job_id}: {old.value} cannot become {to.value}")
            assignments = ", ".join(f"{k} = ?" for k in sets)
            db.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*sets.values(), job_id))
            db.execute(
                "INSERT INTO transitions (job_id, at, from_state, to_state, reason, who) VALUES (?, ?, ?, ?, ?, ?)",
                (job_id, now, old.value, to.value, reason, who),
            )
        return old

    def transitions(self, job_id: int | None = None) -> list[Transition]:
        """A job's history (every job's, when None), oldest first."""
        sql = "SELECT job_id, at, from_state, to_state, reason, who FROM transitions"
        rows = (
            self.db.query(sql + " WHERE job_id = ? ORDER BY id", (job_id,))
            if job_id is not None
            else self.db.query(sql + " ORDER BY at, id")
        )
        return [Transition(int(r[0]), float(r[1]), r[2], r[3], r[4], r[5]) for r in rows]

    def last_transition_id(self) -> int:
        """The id of the newest transition (0 when there is none): where a reader of new ones starts."""
        rows = self.db.query("SELECT MAX(id) FROM transitions")
        return int(rows[0][0]) if rows and rows[0][0] is not None else 0

    def transitions_after(
        self, after_id: int, states: Iterable[JobState], limit: int = 100
    ) -> list[tuple[int, Transition]]:
        """Transitions into ``states`` newer than ``after_id``, oldest first, with their ids:
        what a notifier has not told yet."""
        wanted = [s.value for s in states]
        if not wanted:
            return []
        marks = ", ".join("?" for _ in wanted)
        rows = self.db.query(
            "SELECT id, job_id, at, from_state, to_state, reason, who FROM transitions "
            f"WHERE id > ? AND to_state IN ({marks}) ORDER BY id LIMIT ?",
            (after_id, *wanted, limit),
        )
        return [(int(r[0]), Transition(int(r[1]), float(r[2]), r[3], r[4], r[5], r[6])) for r in rows]

    def entered_at(self, job_id: int, state: JobState) -> float | None:
        """When the job last entered ``state``."""
        rows = self.db.query("SELECT MAX(at) FROM transitions WHERE job_id = ? AND to_state = ?", (job_id, state.value))
        return float(rows[0][0]) if rows and rows[0][0] is not None else None

    def update_detail(
        self, job_id: int, change: Callable[[JobDetail], JobDetail], *, durable: bool = False
    ) -> JobDetail:
        """Apply ``change`` to a job's detail in one transaction (``dataclasses.replace`` it);
        return the new detail. ``durable``: on disk when it returns (output UIDs)."""
        with self.db.tx(durable) as db:
            row = db.execute("SELECT detail FROM jobs WHERE id = ?" + self._for_update, (job_id,)).fetchone()
            if row is None:
                raise StoreError(f"no job {job_id}")
            detail = change(JobDetail.from_json(row[0]))
            db.execute(
                "UPDATE jobs SET detail = ?, updated_at = ? WHERE id = ?", (detail.to_json(), time.time(), job_id)
            )
        return detail

    @property
    def _for_update(self) -> str:
        return " FOR UPDATE" if self.db.shared else ""

    def link_approved(self, ct_job: int, rt_job: int, approval: ApprovalStatus, files: int) -> None:
        """Both sides of a clinician's set linked to its CT job, in one transaction; a repeated
        link replaces the earlier one."""
        entry = ApprovedSet(job=rt_job, approval=approval, instances=files)
        with self.db.tx() as db:
            for job_id in sorted((ct_job, rt_job)):  # one lock order: no deadlock with another link
                db.execute("SELECT id FROM jobs WHERE id = ?" + self._for_update, (job_id,))
            ct = JobDetail.from_json(db.execute("SELECT detail FROM jobs WHERE id = ?", (ct_job,)).fetchone()[0])
            others = tuple(a for a in ct.approved if a.job != rt_job)
            ct_detail = replace(ct, approved=(*others, entry))
            rt = JobDetail.from_json(db.execute("SELECT detail FROM jobs WHERE id = ?", (rt_job,)).fetchone()[0])
            rt_detail = replace(rt, linked_to=ct_job, approval=approval)
            db.execute("UPDATE jobs SET detail = ? WHERE id = ?", (ct_detail.to_json(), ct_job))
            db.execute("UPDATE jobs SET detail = ? WHERE id = ?", (rt_detail.to_json(), rt_job))

    def contoured_job(self, series_uids: set[str], states: Iterable[JobState]) -> int | None:
        """The latest job of these series in one of ``states`` that was routed to a model and
        whose files retention has not purged."""
        if not series_uids:
            return None
        wanted = [s.value for s in states]
        rows = self.db.query(
            "SELECT j.id, j.detail FROM jobs j JOIN series s ON s.id = j.series_id "
            f"WHERE s.series_uid IN ({_marks(sorted(series_uids))}) AND j.routes IS NOT NULL AND j.routes != '[]' "
            f"AND j.state IN ({_marks(wanted)}) ORDER BY j.id DESC",
            (*sorted(series_uids), *wanted),
        )
        for job_id, detail in rows:
            if not JobDetail.from_json(detail).purged:
                return int(job_id)
        return None

    # --- claims ----------------------------------------------------------------------------

    def claim(
        self,
        states: Sequence[JobState],
        node: str,
        lease_s: float,
        now: float | None = None,
        max_wait_s: float = MAX_WAIT_S,
        behind_first_delivery_s: float | None = None,
    ) -> Job | None:
        """Take the first job in queue order (:meth:`queue_order`) among ``states`` that no live
        lease holds, for ``lease_s``.

        ``behind_first_delivery_s``: pass over a job with a queued file whose first delivery
        attempt has not ended, for at most that long after it was queued. The work that follows
        the RT-STRUCT (the SEG, the QA picture) then never competes with its C-STORE for the
        CPU, and a destination that hangs holds it up no longer than that.

        On PostgreSQL the row is locked with SKIP LOCKED, so workers claiming at once each get a
        different job and never wait on one another.
        """
        now = now if now is not None else self.db.now()
        wanted = [s.value for s in states]
        behind = ""
        behind_args: tuple[object, ...] = ()
        if behind_first_delivery_s is not None:
            behind = (
                " AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.job_id = j.id AND o.state = ? "
                "AND o.attempts = 0 AND o.created_at > ?)"
            )
            behind_args = (OutboxState.PENDING.value, now - behind_first_delivery_s)
        with self.db.tx() as db:
            row = db.execute(
                f"SELECT j.id FROM jobs j WHERE j.state IN ({_marks(wanted)}) "
                "AND (j.lease_until IS NULL OR j.lease_until < ?)"
                + behind
                + JOB_ORDER
                + " LIMIT 1"
                + self.db.skip_locked,
                (*wanted, now, *behind_args, now - max_wait_s),
            ).fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET claimed_by = ?, lease_until = ? WHERE id = ?", (node, now + lease_s, row[0]))
        return self.job(int(row[0]))

    def queue_order(
        self, states: Sequence[JobState], now: float | None = None, max_wait_s: float = MAX_WAIT_S
    ) -> list[Job]:
        """The jobs in ``states`` in the order claims take them: high before normal before low,
        each by completion; a job that has waited ``max_wait_s`` since its series completed goes
        before all newer ones (aging, so low-priority work is never starved)."""
        now = now if now is not None else self.db.now()
        wanted = [s.value for s in states]
        rows = self.db.query(
            JOB_QUERY + f" WHERE j.state IN ({_marks(wanted)})" + JOB_ORDER, (*wanted, now - max_wait_s)
        )
        return [_job(r) for r in rows]

    def renew(self, job_id: int, node: str, lease_s: float) -> bool:
        """Extend ``node``'s lease on a job; False when it no longer holds it (it lapsed and
        another node claimed the job)."""
        with self.db.tx() as db:
            cur = db.execute(
                "UPDATE jobs SET lease_until = ? WHERE id = ? AND claimed_by = ?",
                (self.db.now() + lease_s, job_id, node),
            )
            return cur.rowcount > 0

    def release(self, job_id: int, node: str) -> None:
        """End ``node``'s lease on a job (its stage is over); the job stays where it got to."""
        with self.db.tx() as db:
            db.execute(
                "UPDATE jobs SET claimed_by = NULL, lease_until = NULL WHERE id = ? AND claimed_by = ?", (job_id, node)
            )

    def defer(self, job_id: int, until: float, reason: str) -> None:
        """Keep a job from every worker until ``until`` (its retry after a transient failure),
        with the reason `status` shows meanwhile; its state stays as it is."""
        with self.db.tx() as db:
            db.execute(
                "UPDATE jobs SET claimed_by = NULL, lease_until = ?, reason = ?, updated_at = ? WHERE id = ?",
                (until, reason, time.time(), job_id),
            )

    # --- attempts per stage ----------------------------------------------------------------

    def begin_stage(self, job_id: int, stage: str) -> StageAttempts:
        """Count an attempt at ``stage``; an earlier attempt still marked running never ended,
        so the process died in it (killed, out of memory, a crash) and counts as a crash.
        Returns the counts including this attempt."""
        with self.db.tx() as db:
            db.execute(
                "INSERT INTO stage_attempts (job_id, stage) VALUES (?, ?) ON CONFLICT DO NOTHING", (job_id, stage)
            )
            row = db.execute(
                "UPDATE stage_attempts SET attempts = attempts + 1, crashes = crashes + running, running = 1 "
                "WHERE job_id = ? AND stage = ? RETURNING attempts, crashes",
                (job_id, stage),
            ).fetchone()
        return StageAttempts(int(row[0]), int(row[1]))

    def end_stage(self, job_id: int, stage: str, *, crashed: bool = False) -> None:
        """The attempt at ``stage`` is over; ``crashed``: a process of ours died in it (the
        inference child), which counts like the node dying."""
        with self.db.tx() as db:
            db.execute(
                "UPDATE stage_attempts SET running = 0, crashes = crashes + ? WHERE job_id = ? AND stage = ?",
                (int(crashed), job_id, stage),
            )

    def count_interrupted(self) -> list[tuple[int, str, int]]:
        """Every attempt still marked running ended with the process: count it as a crash now
        (an index of this node's own, at start-up). Returns (job, stage, crashes so far)."""
        with self.db.tx() as db:
            rows = db.execute(
                "UPDATE stage_attempts SET crashes = crashes + 1, running = 0 WHERE running = 1 "
                "RETURNING job_id, stage, crashes"
            ).fetchall()
        return sorted((int(r[0]), str(r[1]), int(r[2])) for r in rows)

    def crashes(self) -> dict[int, dict[str, int]]:
        """Job → stage → how often the process died in it, for the jobs that crashed at all."""
        out: dict[int, dict[str, int]] = {}
        for job_id, stage, count in self.db.query(
            "SELECT job_id, stage, crashes FROM stage_attempts WHERE crashes > 0"
        ):
            out.setdefault(int(job_id), {})[str(stage)] = int(count)
        return out

    def forget_stages(self, job_id: int) -> None:
        """Start a job's attempt and crash counts afresh (an admin sends it through again)."""
        with self.db.tx() as db:
            db.execute("DELETE FROM stage_attempts WHERE job_id = ?", (job_id,))

    def stage_attempts(self, job_id: int) -> dict[str, StageAttempts]:
        """Attempts and crashes of each stage a job has been through."""
        rows = self.db.query("SELECT stage, attempts, crashes FROM stage_attempts WHERE job_id = ?", (job_id,))
        return {str(r[0]): StageAttempts(int(r[1]), int(r[2])) for r in rows}

    def release_all(self) -> int:
        """End every lease, on jobs and on outbox rows (an index only this node uses, at its
        start: the holder was this node before a crash); return how many. A row whose pass the
        crash cut off is due again at once, not when its lease (a minute per file) lapses; it
        goes with the same UIDs, so a TPS that stored it already gets the same instance."""
        with self.db.tx() as db:
            jobs = db.execute("UPDATE jobs SET claimed_by = NULL, lease_until = NULL WHERE claimed_by IS NOT NULL")
            rows = db.execute("UPDATE outbox SET claimed_by = NULL, lease_until = NULL WHERE claimed_by IS NOT NULL")
            return int(jobs.rowcount) + int(rows.rowcount)

    # --- agreement -------------------------------------------------------------------------

    def replace_agreement(self, ct_job: int, rows: Sequence[AgreementRow]) -> None:
        """A case's figures, replacing those of an earlier approval of the same case."""
        columns = ", ".join(AGREEMENT_COLUMNS)
        with self.db.tx() as db:
            db.execute("DELETE FROM agreement WHERE ct_job = ?", (ct_job,))
            for row in rows:
                db.execute(
                    f"INSERT INTO agreement ({columns}) VALUES ({_marks(AGREEMENT_COLUMNS)})",
                    tuple(getattr(row, c) for c in AGREEMENT_COLUMNS),
                )

    def agreement(
        self,
        model: str | None = None,
        version: str | None = None,
        structure: str | None = None,
        since: float | None = None,
        ct_job: int | None = None,
    ) -> list[AgreementRow]:
        """Stored figures, oldest first; ``structure`` compares case-insensitively."""
        where: list[str] = []
        args: list[Any] = []
        for column, value in (("model", model), ("model_version", version), ("ct_job", ct_job)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if structure is not None:
            where.append("lower(structure) = lower(?)")
            args.append(structure)
        if since is not None:
            where.append("at >= ?")
            args.append(since)
        sql = f"SELECT {', '.join(AGREEMENT_COLUMNS)} FROM agreement"
        if where:
            sql += " WHERE " + " AND ".join(where)
        return [AgreementRow(*r) for r in self.db.query(sql + " ORDER BY at, ct_job", args)]
