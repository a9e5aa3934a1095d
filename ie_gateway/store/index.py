"""The SQLite index of the spool: series, instances, jobs and their transitions, the outbox.

WAL mode with synchronous=NORMAL: a commit is not fsynced, and need not be, because an instance
file is made durable before its row is written and start-up indexes any file that has no row.
Each thread gets its own connection; writers serialise on SQLite's lock (busy timeout).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ie_gateway.errors import StoreError
from ie_gateway.store.states import ALLOWED, JobState

SCHEMA = """
CREATE TABLE IF NOT EXISTS series (
    id INTEGER PRIMARY KEY,
    series_uid TEXT NOT NULL UNIQUE,
    study_uid TEXT NOT NULL,
    header TEXT NOT NULL,
    calling_ae TEXT NOT NULL,
    called_ae TEXT NOT NULL,
    first_at REAL NOT NULL,
    last_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    series_id INTEGER NOT NULL REFERENCES series(id),
    state TEXT NOT NULL,
    reason TEXT,
    instances INTEGER NOT NULL DEFAULT 0,
    late_instances INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    last_instance_at REAL NOT NULL,
    completed_at REAL,
    routes TEXT,
    model TEXT,
    model_version TEXT,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, id);
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY,
    series_id INTEGER NOT NULL REFERENCES series(id),
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    path TEXT NOT NULL,
    sop_class TEXT NOT NULL,
    transfer_syntax TEXT NOT NULL,
    size INTEGER NOT NULL,
    received_at REAL NOT NULL,
    missing INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_id);
CREATE TABLE IF NOT EXISTS transitions (
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    at REAL NOT NULL,
    from_state TEXT,
    to_state TEXT NOT NULL,
    reason TEXT,
    who TEXT
);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY,
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    destination TEXT NOT NULL,
    path TEXT NOT NULL,
    sop_uid TEXT NOT NULL,
    sop_class TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    created_at REAL NOT NULL,
    last_status INTEGER,
    last_error TEXT,
    UNIQUE (sop_uid, destination)
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox(state, next_at);
CREATE TABLE IF NOT EXISTS attempts (
    outbox_id INTEGER NOT NULL REFERENCES outbox(id),
    at REAL NOT NULL,
    status INTEGER,
    error TEXT
);
CREATE TABLE IF NOT EXISTS agreement (  -- ie_gateway.agreement: AI vs approved, per structure
    ct_job INTEGER NOT NULL,        -- jobs(id) of the contoured CT
    approval_job INTEGER NOT NULL,  -- jobs(id) of the approved structure set
    model TEXT NOT NULL,
    model_version TEXT NOT NULL,
    structure TEXT NOT NULL,
    at REAL NOT NULL,
    tolerance_mm REAL NOT NULL,
    dice REAL NOT NULL,
    hd95_mm REAL,
    msd_mm REAL,
    surface_dice REAL NOT NULL,
    volume_ai_cc REAL NOT NULL,
    volume_approved_cc REAL NOT NULL,
    volume_diff_pct REAL,
    PRIMARY KEY (ct_job, model, model_version, structure)
);
CREATE INDEX IF NOT EXISTS agreement_trend ON agreement(model, model_version, structure, at);
"""


class TransitionError(StoreError):
    """A job was asked to move to a state its current state does not lead to."""


@dataclass(frozen=True)
class Job:
    """One row of `jobs` joined with its series: what the worker and `status` need."""

    id: int
    series_id: int
    state: JobState
    reason: str | None
    instances: int
    late_instances: int
    created_at: float
    updated_at: float
    last_instance_at: float
    completed_at: float | None
    routes: list[dict[str, Any]]
    model: str | None
    model_version: str | None
    detail: dict[str, Any]
    study_uid: str
    series_uid: str
    header: dict[str, Any]
    calling_ae: str
    called_ae: str


JOB_QUERY = """
SELECT j.id, j.series_id, j.state, j.reason, j.instances, j.late_instances, j.created_at,
       j.updated_at, j.last_instance_at, j.completed_at, j.routes, j.model, j.model_version,
       j.detail, s.study_uid, s.series_uid, s.header, s.calling_ae, s.called_ae
FROM jobs j JOIN series s ON s.id = j.series_id
"""


def _job(row: sqlite3.Row) -> Job:
    return Job(
        id=row[0],
        series_id=row[1],
        state=JobState(row[2]),
        reason=row[3],
        instances=row[4],
        late_instances=row[5],
        created_at=row[6],
        updated_at=row[7],
        last_instance_at=row[8],
        completed_at=row[9],
        routes=json.loads(row[10] or "[]"),
        model=row[11],
        model_version=row[12],
        detail=json.loads(row[13] or "{}"),
        study_uid=row[14],
        series_uid=row[15],
        header=json.loads(row[16]),
        calling_ae=row[17],
        called_ae=row[18],
    )


class Index:
    """Thread-safe access to the index database."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._conn().executescript(SCHEMA)
        columns = {r[1] for r in self.query("PRAGMA table_info(transitions)")}
        if "who" not in columns:  # an index made before admins' actions were recorded by name
            self._conn().execute("ALTER TABLE transitions ADD COLUMN who TEXT")

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
        return conn

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that takes the lock at once (BEGIN IMMEDIATE)."""
        db = self._conn()
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreError(f"index unavailable: {exc}") from exc
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        return self._conn().execute(sql, args).fetchall()

    # --- instances -------------------------------------------------------------------------

    def has_instance(self, sop_uid: str) -> bool:
        return bool(self.query("SELECT 1 FROM instances WHERE sop_uid = ?", (sop_uid,)))

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
        header: Callable[[], dict[str, Any]],
        at: float | None = None,
    ) -> tuple[int, bool]:
        """Index a stored instance into the series' open job (a new job if none is open).

        ``header`` is called only when this instance is the series' first: its values are what
        routing reads.

        Returns (job id, late) where late says the series had already completed before this
        instance arrived: the instance then opens a new job for the whole series.
        """
        now = at if at is not None else time.time()
        with self.tx() as db:
            series_id = self._series_id(db, series_uid, study_uid, header, calling_ae, called_ae, now)
            row = db.execute(
                "SELECT id FROM jobs WHERE series_id = ? AND state = ? ORDER BY id DESC LIMIT 1",
                (series_id, JobState.RECEIVING.value),
            ).fetchone()
            late = False
            if row is None:
                late = db.execute("SELECT 1 FROM jobs WHERE series_id = ?", (series_id,)).fetchone() is not None
                if late:
                    db.execute(
                        "UPDATE jobs SET late_instances = late_instances + 1 WHERE id = "
                        "(SELECT MAX(id) FROM jobs WHERE series_id = ?)",
                        (series_id,),
                    )
                job_id = self._new_job(db, series_id, now)
            else:
                job_id = row[0]
            cur = db.execute(
                "INSERT OR IGNORE INTO instances (sop_uid, series_id, job_id, path, sop_class, "
                "transfer_syntax, size, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (sop_uid, series_id, job_id, path, sop_class, transfer_syntax, size, now),
            )
            if cur.rowcount:
                db.execute(
                    "UPDATE jobs SET instances = (SELECT COUNT(*) FROM instances WHERE series_id = ?), "
                    "last_instance_at = ?, updated_at = ? WHERE id = ?",
                    (series_id, now, now, job_id),
                )
                db.execute("UPDATE series SET last_at = ? WHERE id = ?", (now, series_id))
        return job_id, late

    def _series_id(
        self,
        db: sqlite3.Connection,
        series_uid: str,
        study_uid: str,
        header: Callable[[], dict[str, Any]],
        calling_ae: str,
        called_ae: str,
        now: float,
    ) -> int:
        row = db.execute("SELECT id FROM series WHERE series_uid = ?", (series_uid,)).fetchone()
        if row is not None:
            return int(row[0])
        cur = db.execute(
            "INSERT INTO series (series_uid, study_uid, header, calling_ae, called_ae, first_at, last_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (series_uid, study_uid, json.dumps(header()), calling_ae, called_ae, now, now),
        )
        return int(cur.lastrowid or 0)

    def _new_job(self, db: sqlite3.Connection, series_id: int, now: float) -> int:
        cur = db.execute(
            "INSERT INTO jobs (series_id, state, created_at, updated_at, last_instance_at) VALUES (?, ?, ?, ?, ?)",
            (series_id, JobState.RECEIVING.value, now, now, now),
        )
        job_id = int(cur.lastrowid or 0)
        db.execute(
            "INSERT INTO transitions (job_id, at, from_state, to_state) VALUES (?, ?, NULL, ?)",
            (job_id, now, JobState.RECEIVING.value),
        )
        return job_id

    def instance_paths(self, series_id: int) -> list[str]:
        """Spool-relative paths of every present instance of a series (all jobs)."""
        rows = self.query(
            "SELECT path FROM instances WHERE series_id = ? AND missing = 0 ORDER BY received_at",
            (series_id,),
        )
        return [r[0] for r in rows]

    def all_instance_paths(self) -> dict[str, str]:
        """Map of spool-relative path → SOP Instance UID for every indexed instance."""
        return {r[0]: r[1] for r in self.query("SELECT path, sop_uid FROM instances")}

    def mark_missing(self, paths: list[str]) -> list[int]:
        """Flag rows whose file is gone; return the affected job ids."""
        jobs: set[int] = set()
        with self.tx() as db:
            for path in paths:
                row = db.execute("SELECT job_id FROM instances WHERE path = ?", (path,)).fetchone()
                if row:
                    jobs.add(int(row[0]))
                    db.execute("UPDATE instances SET missing = 1 WHERE path = ?", (path,))
        return sorted(jobs)

    # --- jobs ------------------------------------------------------------------------------

    def job(self, job_id: int) -> Job:
        rows = self.query(JOB_QUERY + " WHERE j.id = ?", (job_id,))
        if not rows:
            raise StoreError(f"no job {job_id}")
        return _job(rows[0])

    def jobs(self, states: list[JobState] | None = None) -> list[Job]:
        if not states:
            return [_job(r) for r in self.query(JOB_QUERY + " ORDER BY j.id")]
        marks = ",".join("?" * len(states))
        return [
            _job(r)
            for r in self.query(
                JOB_QUERY + f" WHERE j.state IN ({marks}) ORDER BY j.id", tuple(s.value for s in states)
            )
        ]

    def transition(
        self, job_id: int, to: JobState, reason: str | None = None, *, who: str | None = None, **fields: Any
    ) -> JobState:
        """Move a job to ``to`` if its state allows; set extra columns; return the old state.

        ``who``: the admin whose action this is (None: the node itself).
        """
        now = time.time()
        with self.tx() as db:
            row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise StoreError(f"no job {job_id}")
            old = JobState(row[0])
            if to not in ALLOWED[old]:
                raise TransitionError(f"job {job_id}: {old.value} cannot become {to.value}")
            sets = {"state": to.value, "reason": reason, "updated_at": now, **fields}
            for key in ("routes", "detail"):
                if key in sets and not isinstance(sets[key], str):
                    sets[key] = json.dumps(sets[key])
            assignments = ", ".join(f"{k} = ?" for k in sets)
            db.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*sets.values(), job_id))
            db.execute(
                "INSERT INTO transitions (job_id, at, from_state, to_state, reason, who) VALUES (?, ?, ?, ?, ?, ?)",
                (job_id, now, old.value, to.value, reason, who),
            )
        return old

    def transitions(self, job_id: int) -> list[dict[str, Any]]:
        """A job's history, oldest first: at, from, to, reason, who."""
        rows = self.query(
            "SELECT at, from_state, to_state, reason, who FROM transitions WHERE job_id = ? ORDER BY rowid", (job_id,)
        )
        return [{"at": r[0], "from": r[1], "to": r[2], "reason": r[3], "who": r[4]} for r in rows]

    def update_detail(self, job_id: int, **items: Any) -> None:
        """Merge ``items`` into a job's JSON detail (result paths, volumes, timings)."""
        with self.tx() as db:
            row = db.execute("SELECT detail FROM jobs WHERE id = ?", (job_id,)).fetchone()
            detail = json.loads(row[0] or "{}") if row else {}
            detail.update(items)
            db.execute(
                "UPDATE jobs SET detail = ?, updated_at = ? WHERE id = ?", (json.dumps(detail), time.time(), job_id)
            )

    def next_job(self, state: JobState) -> Job | None:
        """The oldest job in ``state`` (by completion, then arrival)."""
        rows = self.query(JOB_QUERY + " WHERE j.state = ? ORDER BY j.completed_at, j.id LIMIT 1", (state.value,))
        return _job(rows[0]) if rows else None
